"""RL-KD: a learned policy picks, example by example, which teachers the student learns from (GKD §16).

Yuan, Shou, Pei, Lin, Gong, Fu, Jiang, "Reinforced Multi-Teacher Selection for Knowledge Distillation"
(AAAI 2021). With K selectable teachers, batch b = 1..B, classification logits of C classes:

    state     s_b = [e_b; ℓ^1_b .. ℓ^K_b],  x_b = [z^1_b; .. ; z^K_b]            (no gradient)
    policy    π_{b,k} = σ( s_b W_1 + b_1 + x_b W_2 + b_2 )_k                    (a trainable module)
    action    a_{b,k} ~ Bernoulli(π_{b,k})                                      (drawn with the step's key)
    KD        L_kd = mean_{b,k} a_{b,k} · CE_T(z_S, z^k)_b                      (soft CE, T = 10, no T²)
    reward    R = −CE(y, z_S)  (reward=1)   or   −(CE(y, z_S) + mean_b ℓ^K_b)  (reward=2), no gradient
    policy    L_rl = −Σ_{b,k} log p_{b,k} · R,   p = π·a + (1 − π)(1 − a)       (REINFORCE)
    total     L = α (L_kd + L_rl) + (1 − α) CE(y, z_S),  α = 0.5

e_b is a semantic representation of the example: the final hidden state at position 0 of
`semantic_teacher` (a teacher that is then only read, never selected; GKD uses a pre-trained encoder)
or, by default, of the student (detached). ℓ^k_b is teacher k's own cross-entropy on the gold label.
`average_stage=True` prepends GKD's first stage, α·mean_k CE_T(z_S, z^k) + (1 − α)·CE.

The gradient of L_rl with respect to the policy logits is −R·(a − π): REINFORCE with the batch's
reward. GKD writes −Σ p·R (the probability, not its log); `policy_objective="prob"` selects that.
GKD also delays the policy update by one step (the previous step's state and action, re-scored with
the current weights, rewarded by the current batch); this recipe rewards each step's actions with the
same step's student loss, before the update, so no state or action has to be carried between steps.
The actions are a function of (seed, stage, step), so a resumed run draws the same ones.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.methods.base import Method, MethodError, Module, Stage, Term, register
from kdjax.methods.kd import (_is_number, check_fraction, check_student_init, check_temperature, hard_label_term,
                              keep_nonzero)
from kdjax.methods.mt_bert import per_example_teacher_ce

MODULE = "rl_kd_policy"
KEY = "rl_kd/action"
REWARDS = (1, 2)
OBJECTIVES = ("log_prob", "prob")


def selectable(teachers, semantic_teacher):
    return [n for n in teachers if n != semantic_teacher]


def init_policy(semantic_teacher: Optional[str]):
    def init(rng, student, teachers):
        names = selectable(list(teachers), semantic_teacher)
        if not names:
            raise MethodError("rl_kd: no teacher left to select besides the semantic teacher; add a teacher")
        if semantic_teacher is not None and semantic_teacher not in teachers:
            raise MethodError(f"rl_kd: semantic_teacher {semantic_teacher!r} is not a teacher of the stage "
                              f"({', '.join(teachers)})")
        width = (teachers[semantic_teacher] if semantic_teacher else student).hidden_size
        k, c = len(names), student.num_labels
        d1, d2 = width + k, c * k
        k1, k2 = jax.random.split(rng)
        return {"w1": jax.random.normal(k1, (d1, k), jnp.float32) / jnp.sqrt(d1), "b1": jnp.zeros((k,), jnp.float32),
                "w2": jax.random.normal(k2, (d2, k), jnp.float32) / jnp.sqrt(d2), "b2": jnp.zeros((k,), jnp.float32)}
    return init


def policy_probs(policy, state, logits):
    """`[B, K]` π = σ(state W_1 + b_1 + logits W_2 + b_2)."""
    return jax.nn.sigmoid(state @ policy["w1"] + policy["b1"] + logits @ policy["w2"] + policy["b2"])


def draw_actions(key, probs):
    """`[B, K]` a ~ Bernoulli(π), as a = 1[u < π] with u ~ U[0, 1) from `key`."""
    return (jax.random.uniform(key, probs.shape) < probs).astype(jnp.float32)


def policy_loss(probs, actions, reward, objective: str = "log_prob"):
    """−Σ log p · R (REINFORCE) or −Σ p · R (GKD), p = π·a + (1 − π)(1 − a)."""
    p = probs * actions + (1.0 - probs) * (1.0 - actions)
    score = jnp.log(jnp.maximum(p, 1e-12)) if objective == "log_prob" else p
    return -jnp.sum(score) * reward


def _rl_loss(alpha: float, reward_kind: int, semantic_teacher: Optional[str], objective: str):
    def loss(sctx):
        names = selectable([t.name for t in sctx.teachers], semantic_teacher)
        soft_terms = [t for t in sctx.terms if t.fn == "soft_cross_entropy"]
        hard_terms = [t for t in sctx.terms if t.fn == "cross_entropy"]
        s_out, _ = sctx.student()
        if s_out.logits.ndim != 2:
            raise MethodError("rl_kd selects teachers per example from class logits [B, C]; use a classification "
                              "student and teachers (config.student.head='classification')")
        labels = sctx.batch["labels"]
        results = {n: sctx.teacher_results[n][0] for n in names}
        ell = jnp.stack([per_example_teacher_ce(results[n].logits, labels) for n in names], -1)       # [B, K]
        sem = (sctx.teacher_results[semantic_teacher][0] if semantic_teacher else s_out).last_hidden_state[:, 0]
        state = jax.lax.stop_gradient(jnp.concatenate([sem.astype(jnp.float32), ell], -1))
        z = jax.lax.stop_gradient(jnp.concatenate([results[n].logits.astype(jnp.float32) for n in names], -1))
        probs = policy_probs(sctx.modules[MODULE], state, z)
        actions = jax.lax.stop_gradient(draw_actions(sctx.key(KEY), probs))
        one = jnp.ones((), jnp.float32)
        hard, _ = sctx.teacher_loss(names[0], terms=hard_terms)
        reward = -hard if reward_kind == 1 else -(hard + jnp.mean(ell[:, -1]))
        reward = jax.lax.stop_gradient(reward)
        kd = jnp.zeros((), jnp.float32)
        for k, name in enumerate(names):
            kd = kd + jnp.sum(actions[:, k] * sctx.per_example(name, terms=soft_terms))
        kd = kd / (actions.shape[0] * len(names))
        rl = policy_loss(probs, actions, reward, objective)
        total = alpha * (kd + rl) + (1.0 - alpha) * hard
        count = jnp.asarray(actions.shape[0], jnp.float32)
        metrics = {"rl_kd/kd": (kd, one), "rl_kd/policy": (rl, one), "rl_kd/reward": (reward, one),
                   "rl_kd/hard": (hard, one)}
        for k, name in enumerate(names):
            metrics[f"rl_kd/pick_{name}"] = (actions[:, k].sum(), count)
            metrics[f"rl_kd/pi_{name}"] = (probs[:, k].sum(), count)
        return total, metrics

    return loss


def _average_loss(semantic_teacher: Optional[str]):
    """Stage 1: mean over the selectable teachers of the weighted soft CE, plus the hard CE once."""
    def loss(sctx):
        names = selectable([t.name for t in sctx.teachers], semantic_teacher)
        soft_terms = [t for t in sctx.terms if t.fn == "soft_cross_entropy"]
        hard_terms = [t for t in sctx.terms if t.fn == "cross_entropy"]
        one = jnp.ones((), jnp.float32)
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        if soft_terms:
            soft = sum(sctx.teacher_loss(n, terms=soft_terms)[0] for n in names) / len(names)
            total, metrics["rl_kd/soft"] = total + soft, (soft, one)
        if hard_terms:
            hard, _ = sctx.teacher_loss(names[0], terms=hard_terms)
            total, metrics["rl_kd/hard"] = total + hard, (hard, one)
        return total, metrics
    return loss


@register("rl_kd", "RL-KD: a policy net picks teachers per example (REINFORCE, reward −CE); α(KD + RL) + (1−α)CE")
def rl_kd(*, alpha=0.5, temperature=10.0, reward: int = 1, semantic_teacher: Optional[str] = None,
          average_stage: bool = False, policy_objective: str = "log_prob", policy_learning_rate=None,
          student_init="uniform") -> Method:
    """Reinforced multi-teacher selection (Yuan et al., 2021; GKD §16).

    Args:
      alpha: α between (KD + policy loss) and the hard CE (0.5).
      temperature: T of the soft cross-entropy (10, no T²).
      reward: 1 → R = −CE(y, z_S); 2 → R = −(CE(y, z_S) + the last teacher's mean gold-label CE).
      semantic_teacher: a teacher whose position-0 final hidden state is e_b and which is not selected
        (None: the student's own, detached).
      average_stage: first train a stage of α·mean_k CE_T + (1 − α)·CE (GKD's stage 1).
      policy_objective: "log_prob" (REINFORCE) or "prob" (GKD's −Σ p·R).
      policy_learning_rate: the policy's own peak learning rate (None: the stage's).
    """
    alpha = check_fraction(alpha, "rl_kd: alpha")
    if not _is_number(alpha):
        raise MethodError(f"rl_kd: alpha must be a number (the policy loss shares it), got {alpha!r}")
    temperature = check_temperature(temperature, "rl_kd: temperature")
    if reward not in REWARDS:
        raise MethodError(f"rl_kd: reward must be 1 (−CE) or 2 (−CE − last teacher's loss), got {reward!r}")
    if policy_objective not in OBJECTIVES:
        raise MethodError(f"rl_kd: policy_objective must be one of {OBJECTIVES}, got {policy_objective!r}")
    soft = Term.make("soft_cross_entropy", "logits", name="soft", temperature=temperature)
    terms = (soft, hard_label_term(1.0))
    stages = []
    if average_stage:
        stages.append(Stage("average", keep_nonzero(soft.replace(weight=float(alpha)),
                                                    hard_label_term(1.0 - float(alpha)), what="rl_kd"),
                            loss=_average_loss(semantic_teacher)))
    stages.append(Stage("select", terms, loss=_rl_loss(float(alpha), int(reward), semantic_teacher, policy_objective),
                        modules=(Module(MODULE, init_policy(semantic_teacher), learning_rate=policy_learning_rate),)))
    return Method("rl_kd", tuple(stages), description=f"RL-KD teacher selection (reward {reward}, α={alpha})",
                  student_init=check_student_init(student_init, "rl_kd: student_init"))
