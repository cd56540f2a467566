"""On-policy distillation of causal language models: GKD, MiniLLM's policy gradient, DistiLLM, reverse KL.

Each recipe is one stage with a data hook that builds the batch on the host (prompts from the data,
continuations sampled from the student, the teacher or a mixture of both) and a stage loss over the
continuation tokens. docs/onpolicy.md describes the batch layout and each loss; in short:

* a row is `prompt + continuation`, right-padded; `labels` hold the token ids of the continuation and
  −100 on the prompt and padding (the LM convention: label `t` is token `t`);
* the distributions that are scored are the ones that *predict* a continuation token: position `t`
  counts when `labels[t + 1] != −100` (`scored_positions`);
* `sampled` `[B]` says where each row's continuation came from (0 data, 1 student, 2 teacher,
  3 DistiLLM's replay buffer).

Recipes (the off-policy forms stay in `kdjax/methods/llm.py`):

* **gkd_onpolicy** (Agarwal et al., 2024): with probability `lmbda` per step the continuations are
  student samples, otherwise teacher samples (`seq_kd`) or the data; generalized JSD_β at temperature T.
* **minillm_pg** (Gu et al., 2024): reverse KL of sequences optimized by policy gradient with the
  single-step decomposition, teacher-mixed sampling (ratio α) with per-token importance weights,
  length-normalized rewards and PPO-style clipping of the importance ratio.
* **distillm_adaptive** (Ko et al., 2024): skew (reverse) KL on data or student-generated outputs;
  student outputs go to a replay buffer that is checkpointed with the run, and the probability of
  training on them rises over the stage.
* **onpolicy_rkl**: per-token reverse KL of teacher and student on the student's own samples.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.distill.hooks import DataHook
from kdjax.knowledge import divergences as divergences_lib
from kdjax.methods.base import Method, MethodError, Stage, Term, register
from kdjax.methods.kd import check_fraction, check_kind, check_student_init, check_temperature
from kdjax.models.transformer import extend_cache, prefill_cache

IGNORE = -100
FROM_DATA, FROM_STUDENT, FROM_TEACHER, FROM_REPLAY = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def mixture_logits(student_logits, teacher_logits, *, alpha: float, temperature: float):
    """`log(α softmax(z_T / T) + (1 − α) softmax(z_S / T))`: the log-probabilities a token is drawn from."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if alpha == 0.0:
        return log_q
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if alpha == 1.0:
        return log_p
    return jnp.logaddexp(jnp.log(alpha) + log_p, jnp.log1p(-alpha) + log_q)


def sample_mixture_fn(student_graphdef, student_params, teacher_graphdef, teacher_params, input_ids, attention_mask,
                      key, *, max_new_tokens: int, alpha: float, temperature: float = 1.0,
                      eos_token_id: Optional[int] = None):
    """Sample `max_new_tokens` tokens after right-padded prompts from `α p + (1 − α) q` (pure, jittable).

    `p` is the teacher's and `q` the student's next-token distribution at `temperature`; both models
    keep their own KV cache. `alpha = 0` runs the student alone, `alpha = 1` the teacher alone. Token
    `t` is drawn with `fold_in(key, t)`. After a row's `eos_token_id` its tokens are that id and it is
    finished. Returns `(tokens [B, N] int32, lengths [B] int32)`, lengths counting the EOS.
    """
    use_s, use_t = alpha < 1.0, alpha > 0.0
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask).astype(bool)
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    last_index = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)[:, None, None]
    models = []
    sides = ((use_s, student_graphdef, student_params), (use_t, teacher_graphdef, teacher_params))
    for used, graphdef, params in sides:
        if not used:
            models.append(None)
            continue
        hidden, cache = prefill_cache(graphdef, params, ids, mask, total)
        last = jnp.take_along_axis(hidden, last_index, axis=1)[:, 0]
        models.append((graphdef, params, cache, last))

    def logits_of(model, hidden):
        graphdef, params = model[:2]
        return nnx.merge(graphdef, params).lm_logits(hidden)

    def choose(hidden_s, hidden_t, t):
        zs = logits_of(models[0], hidden_s) if use_s else None
        zt = logits_of(models[1], hidden_t) if use_t else None
        logp = mixture_logits(zs if use_s else zt, zt if use_t else zs, alpha=alpha, temperature=temperature)
        return jax.random.categorical(jax.random.fold_in(key, t), logp, axis=-1).astype(jnp.int32)

    pad = -1 if eos_token_id is None else int(eos_token_id)
    h_s = models[0][3] if use_s else None
    h_t = models[1][3] if use_t else None
    token = choose(h_s, h_t, 0)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == pad
    caches = (models[0][2] if use_s else None, models[1][2] if use_t else None)

    def body(t, carry):
        caches, prev, done, tokens = carry
        hiddens, new_caches = [], []
        for model, cache in zip(models, caches):
            if model is None:
                hiddens.append(None)
                new_caches.append(None)
                continue
            h, cache = extend_cache(model[0], model[1], cache, prev[:, None])
            hiddens.append(h[:, 0])
            new_caches.append(cache)
        token = jnp.where(done, pad, choose(hiddens[0], hiddens[1], t))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
        return tuple(new_caches), token, done | (token == pad), tokens

    _, _, _, tokens = jax.lax.fori_loop(1, max_new_tokens, body, (caches, token, done, tokens))
    hits = tokens == pad
    lengths = jnp.where(jnp.any(hits, axis=1), jnp.argmax(hits, axis=1) + 1, max_new_tokens).astype(jnp.int32)
    if eos_token_id is None:
        lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    return tokens, lengths


_sample_jit = jax.jit(sample_mixture_fn, static_argnums=(0, 2),
                      static_argnames=("max_new_tokens", "alpha", "temperature", "eos_token_id"))


def prompt_lengths(batch: Mapping[str, Any], prompt_length: int) -> np.ndarray:
    """`[B]` prompt lengths: the valid tokens before a row's first label, or `prompt_length` tokens for
    rows labeled from their first token (LM windows); always at least 1 and at most `S − 1`."""
    mask = np.asarray(batch["attention_mask"]) == 1
    seq = mask.shape[1]
    valid = mask.sum(1)
    if (valid == 0).any():
        raise ValueError(f"on-policy prompts: rows {np.flatnonzero(valid == 0).tolist()} have no tokens; "
                         "drop empty rows from the data")
    lengths = np.full(mask.shape[0], prompt_length)
    labels = batch.get("labels")
    if labels is not None and np.shape(labels) == mask.shape:
        unlabeled = (np.asarray(labels) == IGNORE) & mask
        lead = np.argmin(unlabeled, axis=1)          # first labeled (or padded) position
        lead = np.where(unlabeled.all(1), valid, lead)
        lengths = np.where(lead > 0, lead, lengths)
    return np.clip(np.minimum(lengths, valid), 1, seq - 1).astype(np.int32)


def assemble_rows(input_ids: np.ndarray, prompts: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
                  seq: int) -> dict:
    """`prompt + continuation` rows of width `seq` with the attention mask and continuation labels."""
    batch = input_ids.shape[0]
    ids = np.zeros((batch, seq), np.int32)
    mask = np.zeros((batch, seq), np.int32)
    labels = np.full((batch, seq), IGNORE, np.int32)
    for b in range(batch):
        p = int(prompts[b])
        n = int(min(lengths[b], seq - p))
        ids[b, :p] = input_ids[b, :p]
        ids[b, p:p + n] = tokens[b, :n]
        mask[b, :p + n] = 1
        labels[b, p:p + n] = tokens[b, :n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def data_rows(batch: Mapping[str, Any], prompts: np.ndarray) -> dict:
    """The data's own continuations in the same layout: labels −100 on each row's prompt."""
    ids = np.asarray(batch["input_ids"]).astype(np.int32)
    mask = np.asarray(batch["attention_mask"]).astype(np.int32)
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    labels[np.arange(ids.shape[1])[None, :] < prompts[:, None]] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class OnPolicyHook(DataHook):
    """Rewrites each batch into prompts with data, student or teacher continuations (module docstring).

    Per step one uniform draw `u` from the step's generator decides: `u < lmbda` → student samples
    (from `α p + (1 − α) q` when `alpha > 0`), else teacher samples when `seq_kd`, else the data.
    Sampling keys come from the same generator, so the hook is a function of (seed, stage, step) and
    the current parameters. `seconds` accumulates host time spent sampling (not checkpointed).
    """

    def __init__(self, *, lmbda: float, seq_kd: bool = False, alpha: float = 0.0, temperature: float = 1.0,
                 prompt_length: int = 8, max_new_tokens: Optional[int] = None, eos_token_id: Optional[int] = None):
        self.lmbda, self.seq_kd, self.alpha, self.temperature = lmbda, seq_kd, alpha, temperature
        self.prompt_length, self.max_new_tokens, self.eos_token_id = prompt_length, max_new_tokens, eos_token_id
        self.seconds = {"generate": 0.0}

    # -- the models -----------------------------------------------------------------------------------
    @staticmethod
    def _models(run, state, stage: int):
        student = run.student_model(state, stage)
        params = run.teacher_params(stage)
        name = next(iter(params))
        teacher = run.teachers[name][0]
        if getattr(run, "compression", None) is not None or student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError("on-policy sampling needs the student and teacher to share one vocabulary; drop the "
                             "vocabulary compression (student.vocab_size / vocab settings) for this recipe")
        return student, (teacher.graphdef, params[name])

    def sample(self, run, state, batch, rng: np.random.Generator, *, stage: int, alpha: float) -> dict:
        """Rows with continuations sampled from `α teacher + (1 − α) student` for the batch's prompts."""
        student, (t_graphdef, t_params) = self._models(run, state, stage)
        ids = np.asarray(batch["input_ids"]).astype(np.int32)
        seq = ids.shape[1]
        prompts = prompt_lengths(batch, self.prompt_length)
        width = int(prompts.max())
        prompt_ids = np.where(np.arange(width)[None, :] < prompts[:, None], ids[:, :width], 0).astype(np.int32)
        prompt_mask = (np.arange(width)[None, :] < prompts[:, None]).astype(np.int32)
        new = seq - int(prompts.min()) if self.max_new_tokens is None else int(self.max_new_tokens)
        key = jax.random.key(int(rng.integers(0, 2 ** 31 - 1)))
        start = time.perf_counter()
        tokens, lengths = _sample_jit(student.graphdef, student.params, t_graphdef, t_params, prompt_ids, prompt_mask,
                                      key, max_new_tokens=new, alpha=float(alpha), temperature=float(self.temperature),
                                      eos_token_id=self.eos_token_id)
        tokens, lengths = jax.device_get((tokens, lengths))
        self.seconds["generate"] += time.perf_counter() - start
        return assemble_rows(ids, prompts, np.asarray(tokens), np.asarray(lengths), seq)

    def choose_source(self, rng: np.random.Generator) -> int:
        u = rng.random()
        if u < self.lmbda:
            return FROM_STUDENT
        return FROM_TEACHER if self.seq_kd else FROM_DATA

    def __call__(self, run, state, batch, rng, *, stage, step):
        source = self.choose_source(rng)
        if source == FROM_STUDENT:
            rows = self.sample(run, state, batch, rng, stage=stage, alpha=self.alpha)
        elif source == FROM_TEACHER:
            rows = self.sample(run, state, batch, rng, stage=stage, alpha=1.0)
        else:
            rows = data_rows(batch, prompt_lengths(batch, self.prompt_length))
        out = {k: v for k, v in batch.items() if k not in ("token_type_ids", "position_ids")}
        out.update(rows)
        out["sampled"] = np.full((rows["input_ids"].shape[0],), source, np.int32)
        return out


class ReplayHook(OnPolicyHook):
    """DistiLLM's adaptive off-policy data: student-generated outputs (SGOs) in a replay buffer.

    At stage step `s` of `steps` (default: the stage's step count), the probability of training on
    SGOs is `phi(s) = max_prob · min(1, s / (ramp · steps))`. With probability `phi` the hook samples new
    continuations from the student for the batch's prompts, appends them to a FIFO buffer of
    `capacity` rows, and returns a batch drawn uniformly (without replacement) from the buffer, so
    older outputs are reused; otherwise it returns the data. The buffer is the hook's `state_dict`.
    """

    def __init__(self, *, steps: Optional[int] = None, max_prob: float = 0.5, ramp: float = 1.0, capacity: int = 256,
                 **kw):
        super().__init__(lmbda=0.0, **kw)
        self.steps, self.max_prob, self.ramp, self.capacity = steps, float(max_prob), float(ramp), int(capacity)
        self.buffer: list[tuple[list[int], list[int], list[int]]] = []

    def probability(self, step: int, steps: int) -> float:
        """`phi` at stage step `step` of `steps`."""
        if self.ramp <= 0:
            return self.max_prob
        return self.max_prob * min(1.0, step / max(self.ramp * steps, 1e-9))

    def __call__(self, run, state, batch, rng, *, stage, step):
        steps = self.steps if self.steps is not None else run.stage_steps(stage)
        if rng.random() >= self.probability(step, steps):
            rows = data_rows(batch, prompt_lengths(batch, self.prompt_length))
            source = FROM_DATA
        else:
            sampled = self.sample(run, state, batch, rng, stage=stage, alpha=0.0)
            for b in range(sampled["input_ids"].shape[0]):
                self.buffer.append(tuple(sampled[k][b].tolist() for k in ("input_ids", "attention_mask", "labels")))
            del self.buffer[:max(len(self.buffer) - self.capacity, 0)]
            size = sampled["input_ids"].shape[0]
            pick = rng.choice(len(self.buffer), size=size, replace=len(self.buffer) < size)
            rows = {k: np.asarray([self.buffer[i][j] for i in pick], np.int32)
                    for j, k in enumerate(("input_ids", "attention_mask", "labels"))}
            source = FROM_REPLAY
        out = {k: v for k, v in batch.items() if k not in ("token_type_ids", "position_ids")}
        out.update(rows)
        out["sampled"] = np.full((rows["input_ids"].shape[0],), source, np.int32)
        return out

    def state_dict(self) -> dict:
        return {"buffer": [list(map(list, row)) for row in self.buffer]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer = [tuple(list(map(int, part)) for part in row) for row in state.get("buffer", [])]


# ---------------------------------------------------------------------------------------------------
# Losses (pure functions of logits; the stage losses below feed them the step's forwards)
# ---------------------------------------------------------------------------------------------------

def scored_positions(labels, attention_mask):
    """`[B, S]` float32: 1 where position `t` predicts a continuation token (`labels[t + 1] != −100`)."""
    nxt = (labels[:, 1:] != IGNORE) & (attention_mask[:, 1:] == 1)
    return jnp.pad(nxt, ((0, 0), (0, 1))).astype(jnp.float32)


def token_divergence_loss(student_logits, teacher_logits, scored, *, kind: str, temperature=1.0, beta: float = 0.5,
                          lam: float = 0.1, name: str):
    """Mean over scored positions of a per-token divergence (times T², the conventions of docs/methods.md)."""
    return divergences_lib.divergence(student_logits, teacher_logits, scored, kind=kind, temperature=temperature,
                                      beta=beta, lam=lam, name=name)


def minillm_pg_loss(student_logits, teacher_logits, input_ids, scored, *, alpha: float = 0.2,
                    clip: Optional[float] = 0.2, length_norm: bool = True, single_step: bool = True,
                    name: str = "minillm"):
    """MiniLLM's policy-gradient surrogate on sampled sequences (see docs/onpolicy.md).

    With `log q_t`, `log p_t` the student's and teacher's log-probabilities of the sampled token
    `y_{t+1}` at scored position `t`, `r_t = log p_t − log q_t` (no gradient), the sampling mixture
    `p̃_t = α p_t + (1 − α) q_t` (no gradient) and the ratio `ρ_t = exp(log q_t − log p̃_t)`:

    * single-step part: `sg(ρ_t) · KL(q(·|t) ‖ p(·|t))` over the whole vocabulary (its gradient is the
      exact expectation of the one-step reward);
    * long-term part: `−min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)` with `A_t` the reward of the later
      tokens, `R_{t+1} = Σ_{t' > t} r_{t'}`, divided by their count when `length_norm`;
      without `single_step`, `A_t` includes `r_t` itself and the single-step part is dropped.

    The loss is the mean over scored positions. Returns `(loss, metrics)`.
    """
    log_q_all = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_p_all = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    nxt = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))[..., None]
    log_q = jnp.take_along_axis(log_q_all, nxt, axis=-1)[..., 0]
    log_p = jnp.take_along_axis(log_p_all, nxt, axis=-1)[..., 0]
    m = scored
    reward = jax.lax.stop_gradient(log_p - log_q) * m
    log_q_sg = jax.lax.stop_gradient(log_q)
    if alpha > 0:
        log_mix = jnp.logaddexp(jnp.log(alpha) + log_p, jnp.log1p(-alpha) + log_q_sg)
    else:
        log_mix = log_q_sg
    ratio = jnp.exp(log_q - log_mix)                                     # value: the importance weight
    weight = jax.lax.stop_gradient(ratio)
    # Suffix sums over later scored positions (exclusive of t).
    later = jnp.flip(jnp.cumsum(jnp.flip(reward, 1), 1), 1) - reward
    later_count = jnp.flip(jnp.cumsum(jnp.flip(m, 1), 1), 1) - m
    advantage = later if single_step else later + reward
    count_for = later_count if single_step else later_count + m
    if length_norm:
        advantage = jnp.where(count_for > 0, advantage / jnp.maximum(count_for, 1.0), 0.0)
    advantage = jax.lax.stop_gradient(advantage)
    surrogate = ratio * advantage
    if clip is not None:
        surrogate = jnp.minimum(surrogate, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)
    long = -surrogate
    total_count = jnp.sum(m)
    denom = jnp.maximum(total_count, 1.0)
    metrics = {f"{name}/long": (jnp.sum(long * m), total_count),
               f"{name}/reward": (jnp.sum(reward), total_count),
               f"{name}/weight": (jnp.sum(weight * m), total_count)}
    per_token = long
    if single_step:
        rkl = jnp.sum(jnp.exp(log_q_all) * (log_q_all - log_p_all), axis=-1)
        single = weight * rkl
        per_token = per_token + single
        metrics[f"{name}/single"] = (jnp.sum(single * m), total_count)
    return jnp.sum(per_token * m) / denom, metrics


def _logits(sctx):
    s_out, _ = sctx.student()
    name = next(iter(sctx.teacher_weights))
    t_out = sctx.teacher_results[name][0]
    return s_out.logits, t_out.logits


def _with_source_metrics(loss, metrics, batch):
    sampled = batch["sampled"]
    n = jnp.asarray(sampled.shape[0], jnp.float32)
    metrics = dict(metrics)
    metrics["onpolicy/student_rows"] = (jnp.sum((sampled == FROM_STUDENT) | (sampled == FROM_REPLAY)), n)
    return loss, metrics


def divergence_stage_loss(kind: str, temperature, beta: float = 0.5, lam: float = 0.1, name: str = "onpolicy"):
    def loss(sctx):
        s_logits, t_logits = _logits(sctx)
        scored = scored_positions(sctx.batch["labels"], sctx.batch["attention_mask"])
        value, metrics = token_divergence_loss(s_logits, t_logits, scored, kind=kind,
                                               temperature=temperature, beta=beta, lam=lam, name=name)
        return _with_source_metrics(value, metrics, sctx.batch)
    return loss


def minillm_stage_loss(**kw):
    def loss(sctx):
        s_logits, t_logits = _logits(sctx)
        scored = scored_positions(sctx.batch["labels"], sctx.batch["attention_mask"])
        value, metrics = minillm_pg_loss(s_logits, t_logits, sctx.batch["input_ids"], scored, **kw)
        return _with_source_metrics(value, metrics, sctx.batch)
    return loss


# ---------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------

def _positive_int(value, what: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MethodError(f"{what} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _constant_fraction(value, what: str) -> float:
    value = check_fraction(value, what)
    if isinstance(value, tuple):
        raise MethodError(f"{what} must be a constant in [0, 1], not a schedule")
    return float(value)


def _constant_temperature(value, what: str) -> float:
    value = check_temperature(value, what)
    if isinstance(value, tuple):
        raise MethodError(f"{what} must be a constant > 0, not a schedule")
    return float(value)


def _hook_args(name, prompt_length, max_new_tokens, eos_token_id, temperature) -> dict:
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
        raise MethodError(f"{name}: eos_token_id must be an int or None, got {eos_token_id!r}")
    return dict(prompt_length=_positive_int(prompt_length, f"{name}: prompt_length"),
                max_new_tokens=_positive_int(max_new_tokens, f"{name}: max_new_tokens", allow_none=True),
                eos_token_id=eos_token_id, temperature=temperature)


def _stage(kind_term: str, loss, hook) -> Stage:
    # The term declares what the step computes (both models' logits); the stage loss uses them.
    term = Term.make("divergence", "logits", kind=kind_term, name="onpolicy")
    return Stage("distill", (term,), loss=loss, data_hook=hook)


@register("gkd_onpolicy", "GKD: JSD_β on student samples with probability λ (TRL defaults λ=0.5, β=0.5, T=0.9)")
def gkd_onpolicy(*, lmbda: float = 0.5, beta: float = 0.5, temperature: float = 0.9, seq_kd: bool = False,
                 prompt_length: int = 8, max_new_tokens: Optional[int] = None, eos_token_id: Optional[int] = None,
                 student_init: Union[str, tuple] = "uniform") -> Method:
    """Generalized knowledge distillation with on-policy student samples.

    Args:
      lmbda: probability per step that the batch's continuations are student samples (1: fully
        on-policy, 0 with `seq_kd=False`: the off-policy `gkd`).
      beta: JSD_β in TRL's convention (0 forward KL, 1 reverse KL).
      temperature: the sampling temperature and the divergence's T (the divergence is multiplied by T²).
      seq_kd: when a step is not on-policy, use teacher-generated continuations instead of the data.
      prompt_length: prompt tokens of rows labeled from their first token (LM windows); rows whose
        leading labels are −100 use those tokens as the prompt.
      max_new_tokens: continuation length; None fills each row to the batch's sequence length.
      eos_token_id: a row's sampling stops at this id (None: never).
    """
    lmbda = _constant_fraction(lmbda, "gkd_onpolicy: lmbda")
    beta = _constant_fraction(beta, "gkd_onpolicy: beta")
    temperature = _constant_temperature(temperature, "gkd_onpolicy: temperature")
    hook = OnPolicyHook(lmbda=lmbda, seq_kd=bool(seq_kd),
                        **_hook_args("gkd_onpolicy", prompt_length, max_new_tokens, eos_token_id, temperature))
    return Method("gkd_onpolicy", (_stage("jsd", divergence_stage_loss("jsd", temperature, beta=beta, name="gkd"),
                                          hook),),
                  description=f"GKD: JSD β={beta}, λ={lmbda}, T={temperature}, seq_kd={bool(seq_kd)}",
                  student_init=check_student_init(student_init, "gkd_onpolicy: student_init"))


@register("onpolicy_rkl", "On-policy reverse KL: per-token KL(q ‖ p) on the student's own samples")
def onpolicy_rkl(*, temperature: float = 1.0, prompt_length: int = 8, max_new_tokens: Optional[int] = None,
                 eos_token_id: Optional[int] = None, student_init: Union[str, tuple] = "uniform") -> Method:
    """Per-token reverse KL over the full vocabulary at the positions of the student's sampled tokens.

    Args: as `gkd_onpolicy` (every step samples from the student).
    """
    temperature = _constant_temperature(temperature, "onpolicy_rkl: temperature")
    hook = OnPolicyHook(lmbda=1.0, **_hook_args("onpolicy_rkl", prompt_length, max_new_tokens, eos_token_id,
                                                temperature))
    return Method("onpolicy_rkl", (_stage("reverse_kl", divergence_stage_loss("reverse_kl", temperature, name="rkl"),
                                          hook),),
                  description="on-policy reverse KL", student_init=check_student_init(student_init,
                                                                                      "onpolicy_rkl: student_init"))


@register("minillm_pg",
          "MiniLLM: policy gradient of sequence reverse KL (single-step, α=0.2 mixing, length norm, clip)")
def minillm_pg(*, alpha: float = 0.2, clip: Optional[float] = 0.2, length_norm: bool = True,
               single_step: bool = True, prompt_length: int = 8, max_new_tokens: Optional[int] = None,
               eos_token_id: Optional[int] = None, student_init: Union[str, tuple] = "uniform") -> Method:
    """MiniLLM's policy-gradient optimization of the sequence-level reverse KL.

    Args:
      alpha: teacher-mixed sampling ratio (tokens drawn from `α p + (1 − α) q`; 0.2 in the paper).
      clip: ε of the PPO-style clipping of the importance ratio (0.2); None turns clipping off.
      length_norm: average the future rewards instead of summing them.
      single_step: the single-step decomposition (exact one-step term + long-term policy gradient).
      prompt_length, max_new_tokens, eos_token_id: as `gkd_onpolicy`. Sampling is at T = 1.
    The token-level (off-policy) reverse KL is the `minillm` recipe.
    """
    alpha = _constant_fraction(alpha, "minillm_pg: alpha")
    if alpha == 1.0:
        raise MethodError("minillm_pg: alpha must be < 1 (alpha = 1 samples from the teacher alone, which gives the "
                          "student's tokens no weight); use 0.2 as in the paper")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < 1):
        raise MethodError(f"minillm_pg: clip must be in (0, 1) or None, got {clip!r}")
    hook = OnPolicyHook(lmbda=1.0, alpha=alpha, **_hook_args("minillm_pg", prompt_length, max_new_tokens,
                                                             eos_token_id, 1.0))
    loss = minillm_stage_loss(alpha=alpha, clip=None if clip is None else float(clip), length_norm=bool(length_norm),
                              single_step=bool(single_step))
    return Method("minillm_pg", (_stage("reverse_kl", loss, hook),),
                  description=f"MiniLLM policy gradient: α={alpha}, clip={clip}, length_norm={bool(length_norm)}",
                  student_init=check_student_init(student_init, "minillm_pg: student_init"))


@register("distillm_adaptive",
          "DistiLLM: skew (reverse) KL with student outputs from a replay buffer, rising probability")
def distillm_adaptive(*, kind: str = "skew_reverse_kl", lam: float = 0.1, steps: Optional[int] = None,
                      max_prob: float = 0.5, ramp: float = 1.0, capacity: int = 256, prompt_length: int = 8,
                      max_new_tokens: Optional[int] = None, eos_token_id: Optional[int] = None,
                      student_init: Union[str, tuple] = "uniform") -> Method:
    """DistiLLM's skew divergences with its adaptive off-policy use of student-generated outputs.

    Args:
      kind: `"skew_reverse_kl"` (SRKL) or `"skew_kl"` (SKL); lam: the skew λ (0.1).
      steps: the probability schedule's time axis in steps; None: the stage's step count.
      max_prob: the largest probability of a step on student outputs (0.5).
      ramp: fraction of `steps` over which the probability rises linearly from 0 (0: constant).
      capacity: replay-buffer rows (FIFO); the buffer is saved in every checkpoint.
      prompt_length, max_new_tokens, eos_token_id: as `gkd_onpolicy`. Sampling is at T = 1.
    """
    check_kind(kind, "distillm_adaptive: kind", ("skew_kl", "skew_reverse_kl"))
    lam = _constant_fraction(lam, "distillm_adaptive: lam")
    max_prob = _constant_fraction(max_prob, "distillm_adaptive: max_prob")
    ramp = _constant_fraction(ramp, "distillm_adaptive: ramp")
    hook = ReplayHook(steps=_positive_int(steps, "distillm_adaptive: steps", allow_none=True), max_prob=max_prob,
                      ramp=ramp, capacity=_positive_int(capacity, "distillm_adaptive: capacity"),
                      **_hook_args("distillm_adaptive", prompt_length, max_new_tokens, eos_token_id, 1.0))
    label = "SRKL" if kind == "skew_reverse_kl" else "SKL"
    return Method("distillm_adaptive", (_stage(kind, divergence_stage_loss(kind, 1.0, lam=lam, name="distillm"),
                                               hook),),
                  description=f"DistiLLM: {label} λ={lam}, SGO probability up to {max_prob}, buffer {capacity}",
                  student_init=check_student_init(student_init, "distillm_adaptive: student_init"))
