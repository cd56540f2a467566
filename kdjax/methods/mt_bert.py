"""MT-BERT: multi-teacher KD with per-example teacher weights and teacher-side projections (GKD §14).

Wu, Wu, Huang, "One Teacher is Enough? Pre-trained Language Model Distillation from Multiple Teachers"
(Findings of ACL 2021). For each teacher k:

    w_b^k    = 1 / (1 + CE(y_b, z_T^k,b))                     the teacher's own loss on the gold label
    soft^k_b = α · CE_T(z_S, z_T^k)_b                         soft cross-entropy, T = 1, no T²
    hid^k    = β · Σ_(i,j) MSE(H^S_i, F_k H^T_j)              PKD layer map, F_k: d_T^k → d_S trained
    L        = Σ_k [ mean_b(w_b^k · soft^k_b) + hid^k ] + CE(y, z_S)

Teachers are summed, not averaged; the hard loss is added once (`hard_weight=0` drops it). Layers:
student 1..L_S against teacher g(i) = i·L_T/L_S (the uniform map without the embeddings), MSE over the
valid tokens of the full sequence. Defaults are the logged GKD run: α = β = 1, T = 1,
`--mt_bert_fit_teacher` (F_k on the teacher side). `fit_teacher=False` puts the map on the student side
(d_S → d_T^k, GLMKD's default). F_k is a method module (`mt_bert_fit`), trained with the student.

The paper also co-finetunes the teachers; GLMKD does not, and neither does this recipe (teachers are
frozen). The weights w use each teacher's per-example loss: an example's labeled tokens averaged for
token-level heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import knowledge
from kdjax.methods.base import Method, MethodError, Module, Stage, Term, register
from kdjax.methods.kd import check_temperature, check_weight, hard_label_term

MODULE = "mt_bert_fit"


def _pairs(ctx, term):
    return tuple((i, j) for i, j in ctx.pairs(term) if i > 0)


@knowledge("mt_bert_hidden", sources=("hidden_states",))
def mt_bert_hidden(ctx, term):
    """Σ over student layers 1..L_S of the masked token mean of mean_d (H^S − F_k H^T)² (or W H^S − H^T)."""
    fit = ctx.modules[MODULE][ctx.teacher_name]
    teacher_side = term.kwargs.get("fit_teacher", True)
    mask = ctx.mask(term).astype(jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for i, j in _pairs(ctx, term):
        s = ctx.student_at("hidden_states", i).astype(jnp.float32)
        t = ctx.teacher_at("hidden_states", j).astype(jnp.float32)
        if teacher_side:
            t = t @ fit["kernel"] + fit["bias"]
        else:
            s = s @ fit["kernel"] + fit["bias"]
        per_token = jnp.mean(jnp.square(s - t), axis=-1)
        total = total + jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1.0)
    return total, {term.name: (total, jnp.ones((), jnp.float32))}


def init_fit(fit_teacher: bool):
    def init(rng, student, teachers):
        out = {}
        for n, (name, cfg) in enumerate(sorted(teachers.items())):
            d_in, d_out = (cfg.hidden_size, student.hidden_size) if fit_teacher else (student.hidden_size,
                                                                                       cfg.hidden_size)
            key = jax.random.fold_in(rng, n)
            out[name] = {"kernel": jax.random.normal(key, (d_in, d_out), jnp.float32) / jnp.sqrt(d_in),
                         "bias": jnp.zeros((d_out,), jnp.float32)}
        return out
    return init


def per_example_teacher_ce(logits, labels, causal: bool = False):
    """`[B]` CE of a teacher's logits on the gold labels (token-level: mean over labeled tokens)."""
    logits = logits.astype(jnp.float32)
    if logits.ndim == 3 and causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    safe = jnp.where(valid, labels, 0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    if nll.ndim == 1:
        return nll
    v = valid.astype(jnp.float32)
    return jnp.sum(nll * v, -1) / jnp.maximum(v.sum(-1), 1.0)


def mt_bert_loss(sctx):
    soft_terms = [t for t in sctx.terms if t.fn == "soft_cross_entropy"]
    hidden_terms = [t for t in sctx.terms if t.fn == "mt_bert_hidden"]
    hard_terms = [t for t in sctx.terms if t.fn == "cross_entropy"]
    one = jnp.ones((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    labels = sctx.batch["labels"]
    for spec in sctx.teachers:
        name = spec.name
        if soft_terms:
            t_logits = sctx.teacher_results[name][0].logits
            w = jax.lax.stop_gradient(1.0 / (1.0 + per_example_teacher_ce(t_logits, labels, spec.config.causal)))
            soft = jnp.mean(w * sctx.per_example(name, terms=soft_terms))
            total = total + soft
            metrics[f"{name}/soft"] = (soft, one)
            metrics[f"{name}/weight"] = (w.sum(), jnp.asarray(w.shape[0], jnp.float32))
        if hidden_terms:
            hidden, _ = sctx.teacher_loss(name, terms=hidden_terms)
            total = total + hidden
            metrics[f"{name}/hidden"] = (hidden, one)
    if hard_terms:
        hard, m = sctx.teacher_loss(sctx.teachers[0].name, terms=hard_terms)
        total = total + hard
        metrics["hard"] = (hard, one)
    return total, metrics


@register("mt_bert", "MT-BERT: Σ_k [per-example 1/(1+CE_T^k)-weighted soft CE + PKD hidden MSE via F_k] + CE")
def mt_bert(*, alpha=1.0, beta=1.0, temperature=1.0, hard_weight=1.0, fit_teacher: bool = True,
            fit_learning_rate=None, student_init="uniform", layers="uniform") -> Method:
    """MT-BERT multi-teacher distillation (GKD §14).

    Args:
      alpha: α of the per-example weighted soft CE (GKD's pkd_alpha = 1).
      beta: β of the hidden-state MSE (pkd_beta = 1 in the logged run).
      temperature: T of the soft CE (1; no T²).
      hard_weight: weight of the student's hard-label CE, added once (0 = `--mt_bert_wo_hard`).
      fit_teacher: F_k maps teacher features to the student width (True) or the student's to each teacher's.
      fit_learning_rate: the projections' own peak learning rate (None: the stage's).
      layers: the hidden term's layer matching, applied to every teacher (`kdjax.matching`). GKD's
        uniform map needs each teacher's depth to be a multiple of the student's; with teachers of other
        depths (6 and 4 layers for a 3-layer student) use "last" or explicit pairs.
    """
    alpha = check_weight(alpha, "mt_bert: alpha")
    beta = check_weight(beta, "mt_bert: beta")
    hard_weight = check_weight(hard_weight, "mt_bert: hard_weight")
    temperature = check_temperature(temperature, "mt_bert: temperature")
    terms = tuple(t for t in (
        Term.make("soft_cross_entropy", "logits", weight=alpha, name="soft", temperature=temperature),
        Term.make("mt_bert_hidden", "hidden_states", weight=beta, name="hidden", layers=layers,
                  fit_teacher=bool(fit_teacher)),
        hard_label_term(hard_weight)) if not (isinstance(t.weight, float) and t.weight == 0.0))
    if not terms:
        raise MethodError("mt_bert: every weight is 0")
    modules = (Module(MODULE, init_fit(bool(fit_teacher)), learning_rate=fit_learning_rate),) if beta else ()
    return Method("mt_bert", (Stage("distill", terms, loss=mt_bert_loss, modules=modules),),
                  description="MT-BERT multi-teacher KD", student_init=student_init)
