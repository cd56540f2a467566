"""Sparse logit knowledge: divergences against a cached top-k teacher distribution.

An offline teacher cache (:mod:`kdjax.cache`) keeps, per token, the teacher's ``k`` most likely token
ids with their log-probabilities and one more number, the log of the remaining mass (the *tail*).
That is a distribution over ``k + 1`` buckets: the ``k`` ids, and "any other token". The student's
full softmax is aggregated onto the same buckets — its probability on each of the ``k`` ids, and
all of its remaining mass in the tail bucket — and the divergences below compare the two ``k + 1``
bucket distributions with the dense formulas of :mod:`kdjax.knowledge.divergences`.

Conventions match the dense terms: ``q = softmax(student_logits / T)`` in float32 from
``log_softmax``; the teacher side is used as cached (it was cached at temperature
``manifest["k_temperature"]``, which the caller passes as ``temperature``); ``T²`` scaling by
default; masked mean over valid tokens; ``(loss, {f"{name}/{kind}": (sum, count)})``.

The cached log-probabilities may be quantized, so the ``k + 1`` teacher masses are renormalized
(a log-sum-exp over the buckets) before use; for an exact cache this changes nothing.

Bias: merging tokens into one bucket can only lose information, so for forward and reverse KL the
sparse value is a lower bound of the full-vocabulary one (data processing inequality). The gap is
``p_tail · KL(p(·|tail) ‖ q(·|tail))`` for forward KL: it vanishes when ``k = V`` or when the
teacher's tail mass is negligible. See docs/cache.md for measured values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax.knowledge import _util
from kdjax.knowledge import divergences as dense

Array = jax.Array

KINDS = dense.KINDS


def _check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, what: str) -> None:
    lead = tuple(student_logits.shape[:-1])
    if student_logits.ndim < 1:
        raise ValueError(f"{what}: student logits need a trailing vocabulary axis, got shape {tuple(student_logits.shape)}")
    if tuple(topk_ids.shape[:-1]) != lead or tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{what}: teacher_topk_ids {tuple(topk_ids.shape)} and teacher_topk_logprobs "
                         f"{tuple(topk_logprobs.shape)} must both be the student logits' leading shape {lead} + (k,)")
    if tuple(tail_logprob.shape) != lead:
        raise ValueError(f"{what}: teacher_tail_logprob shape {tuple(tail_logprob.shape)} must be {lead}")
    k, vocab = topk_ids.shape[-1], student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"{what}: k={k} must be in [1, V={vocab}] (the student's vocabulary)")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise ValueError(f"{what}: teacher_topk_ids must be integer token ids, got {topk_ids.dtype}")


def student_bucket_log_probs(student_logits, topk_ids, temperature=1.0) -> Array:
    """``log q`` aggregated onto the cache's buckets: ``[..., k + 1]`` (the k ids, then the tail).

    The tail is a log-sum-exp over the tokens *not* among the ids (never ``log(1 − Σ q)``, which
    loses all precision when the tail is tiny). When ``k = V`` the tail bucket is empty: ``-inf``
    with a zero gradient. The ids must be distinct within a position.
    """
    log_q = jax.nn.log_softmax(_util.as_f32(student_logits) / temperature, axis=-1)
    ids = topk_ids.astype(jnp.int32)
    on_ids = jnp.take_along_axis(log_q, ids, axis=-1)
    k, vocab = ids.shape[-1], log_q.shape[-1]
    if k == vocab:
        tail = jnp.full(log_q.shape[:-1], -jnp.inf, jnp.float32)
    else:
        flat_ids = ids.reshape(-1, k)
        in_topk = jax.vmap(lambda i: jnp.zeros((vocab,), bool).at[i].set(True))(flat_ids).reshape(log_q.shape)
        rest = jnp.where(in_topk, -jnp.inf, log_q)
        # A position whose remaining entries are all -inf (a student that masks them) would give a NaN
        # gradient through logsumexp; route it around (double where) and report an empty tail.
        empty = jnp.all(jnp.isneginf(rest), axis=-1, keepdims=True)
        tail = jax.nn.logsumexp(jnp.where(empty, 0.0, rest), axis=-1)
        tail = jnp.where(empty[..., 0], -jnp.inf, tail)
    return jnp.concatenate([on_ids, tail[..., None]], axis=-1)


def teacher_bucket_log_probs(topk_logprobs, tail_logprob) -> Array:
    """The cached teacher distribution as ``[..., k + 1]`` normalized log-probabilities."""
    buckets = jnp.concatenate([_util.as_f32(topk_logprobs), _util.as_f32(tail_logprob)[..., None]], axis=-1)
    return buckets - jax.nn.logsumexp(buckets, axis=-1, keepdims=True)


def per_token_sparse_divergence(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                                *, kind: str, temperature=1.0, beta: float = 0.5, lam: float = 0.1) -> Array:
    """Divergence between the cached teacher buckets and the student's, at every position: ``[...]``.

    Kinds and the ``beta``/``lam`` conventions are those of
    :func:`kdjax.knowledge.divergences.per_token_divergence` (TRL's JSD-β). No ``T²``, no reduction.
    """
    dense._check_kind(kind)
    dense._check_temperature(temperature)
    _check_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                  f"sparse divergence {kind!r}")
    log_q = student_bucket_log_probs(student_logits, teacher_topk_ids, temperature)
    log_p = teacher_bucket_log_probs(teacher_topk_logprobs, teacher_tail_logprob)
    # Both are normalized log-probabilities, so at T = 1 the dense kernel's log_softmax is the identity.
    return dense.per_token_divergence(log_q, log_p, kind=kind, temperature=1.0, beta=beta, lam=lam)


def sparse_divergence(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, mask=None, *,
                      kind: str = dense.FORWARD_KL, temperature=1.0, beta: float = 0.5, lam: float = 0.1,
                      scale_by_t2: bool = True, name: str = "kd"):
    """Masked mean of :func:`per_token_sparse_divergence` over valid positions, times ``T²`` by default.

    Args:
      student_logits: ``[..., V]`` (e.g. ``[B, S, V]``), any float dtype.
      teacher_topk_ids: ``[..., k]`` integer ids, distinct per position (a cache batch's
        ``teacher_topk_ids``).
      teacher_topk_logprobs: ``[..., k]`` teacher log-probabilities on those ids.
      teacher_tail_logprob: ``[...]`` log of the teacher's mass outside the ids (``-inf`` if none).
      mask: ``[...]`` 1 = valid, or None. Values at invalid positions (any garbage, even repeated
        ids or NaN) affect neither the loss nor its gradient.
      kind, beta, lam: as in :func:`kdjax.knowledge.divergences.divergence`.
      temperature: the student's softmax temperature; pass the cache's ``k_temperature``.
      scale_by_t2: multiply by ``T²``.
      name: metric-key prefix.

    Returns:
      ``(loss, {f"{name}/{kind}": (sum, count)})`` with ``loss = sum / max(count, 1)``.
    """
    dense._check_kind(kind)
    what = f"sparse divergence {kind!r}"
    _check_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, what)
    lead = tuple(student_logits.shape[:-1])
    _util.check_mask(mask, lead, what)
    valid = None if mask is None else _util.valid_bool(mask, lead)
    ids, lp, tail = teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob
    if valid is not None:
        # Invalid positions get a harmless stand-in: distinct ids 0..k-1, a uniform teacher, no tail.
        k = ids.shape[-1]
        v = valid[..., None]
        ids = jnp.where(v, ids, jnp.broadcast_to(jnp.arange(k, dtype=ids.dtype), ids.shape))
        lp = jnp.where(v, _util.as_f32(lp), -jnp.log(jnp.float32(k)))
        tail = jnp.where(valid, _util.as_f32(tail), -jnp.inf)
        student_logits = _util.zero_invalid(student_logits, valid)
    per_token = per_token_sparse_divergence(student_logits, ids, lp, tail, kind=kind, temperature=temperature,
                                            beta=beta, lam=lam)
    if scale_by_t2:
        per_token = per_token * jnp.square(jnp.asarray(temperature, jnp.float32))
    loss, pair = _util.masked_mean(per_token, mask)
    return loss, {f"{name}/{kind}": pair}


def dense_to_sparse(teacher_logits, k: int, temperature=1.0):
    """``(topk_ids int32, topk_logprobs f32, tail_logprob f32)`` of full teacher logits ``[..., V]``.

    What the cache writer stores per token (before quantization): the ``k`` largest log-probabilities
    at ``temperature``, and the log of the remaining mass as a log-sum-exp over the other tokens.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, V={vocab}]")
    log_p = jax.nn.log_softmax(_util.as_f32(teacher_logits) / temperature, axis=-1)
    values, ids = jax.lax.top_k(log_p, k)
    if k == vocab:
        return ids.astype(jnp.int32), values, jnp.full(log_p.shape[:-1], -jnp.inf, jnp.float32)
    # The tail without a scatter: every entry below the k-th value, plus the entries *equal* to it
    # that top_k left out (ties), each of which carries exactly the k-th value's mass. The barrier keeps
    # XLA:CPU from rewriting top_k into a path ~30x slower when its operand has another consumer.
    values, ids, log_p = jax.lax.optimization_barrier((values, ids, log_p))
    kth = values[..., -1:]
    below = jnp.where(log_p < kth, log_p, -jnp.inf)
    none_below = jnp.all(jnp.isneginf(below), axis=-1)
    tail = jnp.where(none_below, -jnp.inf, jax.nn.logsumexp(jnp.where(none_below[..., None], 0.0, below), axis=-1))
    extra_ties = jnp.sum(log_p >= kth, axis=-1) - k
    tie_mass = jnp.where(extra_ties > 0, kth[..., 0] + jnp.log(jnp.maximum(extra_ties, 1).astype(jnp.float32)),
                         -jnp.inf)
    tail = jnp.logaddexp(tail, tie_mass)
    return ids.astype(jnp.int32), values, tail


# ------------------------------------------------------------------------------------------------
# A cache-backed teacher inside the training step.

#: Knowledge kinds a cache-backed teacher can serve: logit divergences (every kind of
#: :data:`kdjax.knowledge.divergences.KINDS`) over the cached support, and terms that read no teacher.
CACHEABLE_KNOWLEDGE = ("divergence",)
TEACHER_FREE_SOURCES = ("labels", "none")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CachedLogits:
    """The teacher's "outputs" in a cache-backed stage: its cached top-k and tail, ``[B, S, k]``/``[B, S]``.

    Stands where a live teacher's `ModelOutputs` would; a term that reads anything else (full logits,
    hidden states) is refused when the stage is assembled, and reading them here fails in one line.
    """

    topk_ids: Array
    topk_logprobs: Array
    tail_logprob: Array
    temperature: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    def __getattr__(self, name):
        if name in ("logits", "last_hidden_state", "pooler_output"):
            raise ValueError(f"a cache-backed teacher has no {name}, only its cached top-k log-probabilities; "
                             "use a live teacher (drop data.<source>.teacher_cache) for this term or loss")
        raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class CachedTeacherRef:
    """Stands for a teacher's graphdef in a cache-backed stage: where its fields are in the batch.

    ``suffix`` is "" for a single-teacher cache and ``/<name>`` for an ensemble cache (the keys that
    :func:`kdjax.cache.make_cache_loader` yields); ``temperature`` is the cache's ``k_temperature``.
    """

    name: str
    suffix: str
    temperature: float
    k: int

    def fields(self) -> tuple[str, str, str]:
        return tuple(f"{f}{self.suffix}" for f in ("teacher_topk_ids", "teacher_topk_logprobs",
                                                   "teacher_tail_logprob"))

    def outputs(self, batch) -> CachedLogits:
        missing = [f for f in self.fields() if f not in batch]
        if missing:
            raise ValueError(f"the batch has no {missing[0]!r}: a cache-backed stage reads its batches from "
                             "the teacher cache (kdjax.cache.make_cache_loader)")
        ids, lp, tail = (batch[f] for f in self.fields())
        return CachedLogits(ids.astype(jnp.int32), _util.as_f32(lp), _util.as_f32(tail), float(self.temperature))


def is_cached(graphdef) -> bool:
    return isinstance(graphdef, CachedTeacherRef)


def check_cached_terms(terms, *, temperature: float, where: str) -> None:
    """One line, before compiling, for a term a cached top-k cannot serve.

    Allowed: logit ``divergence`` terms (any kind) at the cache's temperature, without chunking or
    a scheduled temperature, and terms that read no teacher (hard labels). Everything else reads the
    teacher's full logits, hidden states or attention, which the cache does not hold.
    """
    for term in terms:
        if term.source in TEACHER_FREE_SOURCES:
            continue
        if term.source != "logits":
            raise ValueError(f"term {term.name!r} ({term.fn}) reads the teacher's {term.source}, which {where} does "
                             "not hold (it keeps top-k log-probabilities only); use a live teacher for this stage")
        if term.fn not in CACHEABLE_KNOWLEDGE:
            raise ValueError(f"term {term.name!r} ({term.fn}) needs the teacher's full logits; {where} serves "
                             f"{', '.join(CACHEABLE_KNOWLEDGE)} terms only (forward/reverse KL, JSD-β, skew KL, TVD)")
        kw = term.kwargs
        if kw.get("chunk_size") is not None:
            raise ValueError(f"term {term.name!r}: chunk_size recomputes the teacher's head, which {where} does not "
                             "have; drop chunk_size (the sparse divergence never builds teacher logits)")
        kind = kw.get("kind", dense.FORWARD_KL)
        if kind not in KINDS:
            raise ValueError(f"term {term.name!r}: divergence kind {kind!r} is not one of {', '.join(KINDS)}")
        t = kw.get("temperature", 1.0)
        if isinstance(t, (tuple, list)):
            raise ValueError(f"term {term.name!r} schedules its temperature, but {where} holds one temperature; "
                             "use a constant temperature equal to the cache's k_temperature")
        if abs(float(t) - float(temperature)) > 1e-6 * max(1.0, abs(float(temperature))):
            raise ValueError(f"term {term.name!r} uses temperature {float(t):g} but {where} was written at "
                             f"k_temperature={float(temperature):g}; set the term's temperature to "
                             f"{float(temperature):g} or rewrite the cache with cache.k_temperature={float(t):g}")


def cached_logits_apply(ctx, term):
    """`(loss, metrics)` of a logit divergence term against a :class:`CachedLogits` teacher.

    The term's keyword arguments are the dense term's (`kind`, `temperature`, `beta`, `lam`,
    `scale_by_t2`); the student is softened at `temperature` (checked equal to the cache's), the
    teacher side is used as cached.
    """
    t = ctx.t_out
    kw = dict(ctx.args(term))
    kw.pop("chunk_size", None)
    s_logits = ctx.s_out.logits
    if s_logits is None or s_logits.ndim != 3:
        raise ValueError(f"term {term.name!r}: a cached teacher serves token-level LM logits; the student has "
                         f"{'none' if s_logits is None else f'shape {tuple(s_logits.shape)}'}")
    return sparse_divergence(s_logits, t.topk_ids, t.topk_logprobs, t.tail_logprob, ctx.mask(term),
                             name=term.name, **kw)
