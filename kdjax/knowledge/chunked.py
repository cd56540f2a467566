"""Logit distillation over large vocabularies without materializing ``[B, S, V]`` logits.

A 150k-token vocabulary at ``S = 2048`` makes one float32 logit tensor 1.2 GB per sequence, and a
KD loss needs several of them at once (student and teacher logits, both log-softmaxes, the
probabilities, the logit cotangent), in the forward pass and again in the backward pass. That is
often more memory than the whole student. :func:`chunked_divergence` computes the same term as
:func:`kdjax.knowledge.divergence` from the *final hidden states* instead of the logits:

* the sequence is cut into chunks of ``chunk_size`` positions (padded up to a multiple, the padding
  masked out) and a ``jax.lax.scan`` walks over them;
* each scan step applies the LM heads to its chunk, forms the per-token divergence and adds its
  masked sum to a float32 scalar carry, so only ``[B, chunk_size, V]`` logits exist at a time;
* the step is wrapped in ``jax.checkpoint``, so the backward pass saves no per-chunk logits as
  residuals (that would be the full ``[B, S, V]`` again, stacked over chunks) but recomputes each
  chunk's logits from its hidden states. The cost is one extra head matmul per chunk, against a
  memory saving of roughly ``S / chunk_size``.

The teacher side is wrapped in ``stop_gradient`` (its hidden states and its logits), so neither
the teacher's trunk nor its head receives a gradient whatever the caller differentiates.

With the vocabulary axis of the head weights sharded over a ``tensor`` mesh axis, each chunk's
logits come out sharded along ``V`` and every reduction over ``V`` (the log-softmax normalizers,
the KL sums) is a local partial sum followed by an all-reduce of a ``[B, chunk_size]`` array:
no device ever gathers a full row of logits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.knowledge import _util
from kdjax.knowledge.divergences import (
    FORWARD_KL,
    _check_fraction,
    _check_kind,
    _check_temperature,
    per_token_divergence,
)

Array = jax.Array
Head = Callable[[Array], Array]

__all__ = ["chunked_divergence", "num_chunks"]


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Number of scan steps for ``seq_len`` positions: ``ceil(seq_len / min(chunk_size, seq_len))``."""
    return math.ceil(seq_len / min(chunk_size, seq_len)) if seq_len else 0


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunked_divergence: chunk_size must be a positive Python int (it fixes the "
                         f"scan shapes), got {chunk_size!r}")
    return int(chunk_size)


def _check_hidden(student_hidden, teacher_hidden) -> None:
    for role, h in (("student", student_hidden), ("teacher", teacher_hidden)):
        if getattr(h, "ndim", None) != 3:
            raise ValueError(f"chunked_divergence: {role}_hidden must be [B, S, D] final hidden states, got "
                             f"shape {tuple(getattr(h, 'shape', ()))}; pass the output of the final norm")
    if tuple(student_hidden.shape[:2]) != tuple(teacher_hidden.shape[:2]):
        raise ValueError(f"chunked_divergence: student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in [B, S]; both models must see the same tokens")


def _check_heads(student_head: Head, teacher_head: Head, hs_chunk, ht_chunk) -> None:
    """Traces each head once abstractly (no FLOPs) so that a wrong head fails with a clear message."""
    for role, head in (("student", student_head), ("teacher", teacher_head)):
        if not callable(head):
            raise ValueError(f"chunked_divergence: {role}_head must be a function hidden [.., D] -> logits "
                             f"[.., V], got {type(head).__name__}")
    s_out = jax.eval_shape(student_head, hs_chunk)
    t_out = jax.eval_shape(teacher_head, ht_chunk)
    lead = tuple(hs_chunk.shape[:-1])
    for role, out in (("student", s_out), ("teacher", t_out)):
        shape = tuple(getattr(out, "shape", ()))
        if len(shape) != len(lead) + 1 or shape[:-1] != lead:
            raise ValueError(f"chunked_divergence: {role}_head maps hidden {tuple(hs_chunk.shape[:-1])} + (D,) to "
                             f"{shape}; it must return logits of shape {lead} + (V,)")
    if s_out.shape[-1] != t_out.shape[-1]:
        raise ValueError(
            f"chunked_divergence: student vocab size {s_out.shape[-1]} != teacher vocab size {t_out.shape[-1]}; "
            "slice the teacher head to the student's vocabulary (e.g. GLMD vocabulary compression) first")


def _chunk_major(x: Array, n_chunks: int, chunk: int) -> Array:
    """``[B, n·c, ...]`` -> ``[n, B, c, ...]``: the leading axis is what ``lax.scan`` walks over."""
    b = x.shape[0]
    x = jnp.reshape(x, (b, n_chunks, chunk) + tuple(x.shape[2:]))
    return jnp.swapaxes(x, 0, 1)


def chunked_divergence(student_hidden, teacher_hidden, student_head: Head, teacher_head: Head, mask=None, *,
                       kind: str = FORWARD_KL, temperature=1.0, beta: float = 0.5, lam: float = 0.1,
                       scale_by_t2: bool = True, chunk_size: int = 128, name: str = "kd"):
    """:func:`~kdjax.knowledge.divergence` of two LM heads' logits, computed chunk by chunk over the sequence.

    The value equals ``divergence(student_head(student_hidden), teacher_head(teacher_hidden), mask,
    kind=..., ...)`` up to float32 summation order, and so do the gradients with respect to the
    student hidden states and anything ``student_head`` closes over (its parameters). Neither pass
    ever holds more than ``[B, chunk_size, V]`` logits of each model.

    Args:
      student_hidden: ``[B, S, Ds]`` student final hidden states (after the final norm).
      teacher_hidden: ``[B, S, Dt]`` teacher final hidden states; no gradient flows into them.
      student_head: pure function ``h [B, c, Ds] -> logits [B, c, V]``, a closure over the head
        parameters, e.g. ``lambda h: nnx.merge(graphdef, params).lm_logits(h)`` or ``lambda h: h @ w_dv``.
        It is called once per chunk inside a ``jax.checkpoint``-ed scan step, so it must not have
        side effects (no RNG draws, no ``sow``).
      teacher_head: the same for the teacher; its logits are under ``stop_gradient``.
      mask: ``[B, S]`` (1/True = valid) or ``None``.
      kind, temperature, beta, lam: see :func:`~kdjax.knowledge.per_token_divergence`.
      scale_by_t2: multiply the per-token values by ``T²`` (Hinton et al.).
      chunk_size: positions per scan step (static). Peak logit memory scales with it, while the
        number of sequential steps is ``ceil(S / chunk_size)``; a chunk larger than ``S`` is
        clamped to ``S``. 128–512 suit an accelerator.
      name: metric-key prefix.

    Returns:
      ``(loss, {f"{name}/{kind}": (sum, count)})`` with ``loss = sum / max(count, 1)``, float32.
    """
    _check_kind(kind)
    _check_temperature(temperature)
    if kind == "jsd":
        _check_fraction(beta, "beta", kind)
    if kind in ("skew_kl", "skew_reverse_kl"):
        _check_fraction(lam, "lam", kind)
    chunk = _check_chunk_size(chunk_size)
    _check_hidden(student_hidden, teacher_hidden)
    batch, seq_len = student_hidden.shape[:2]
    _util.check_mask(mask, (batch, seq_len), f"chunked_divergence {kind!r}")
    key = f"{name}/{kind}"
    valid_bs = _util.valid_bool(mask, (batch, seq_len))
    if seq_len == 0:
        zero = jnp.zeros((), jnp.float32)
        return zero, {key: (zero, zero)}

    chunk = min(chunk, seq_len)
    n_chunks = num_chunks(seq_len, chunk)
    padded_len = n_chunks * chunk
    _check_heads(student_head, teacher_head,
                 jax.ShapeDtypeStruct((batch, chunk, student_hidden.shape[-1]), student_hidden.dtype),
                 jax.ShapeDtypeStruct((batch, chunk, teacher_hidden.shape[-1]), teacher_hidden.dtype))

    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    pad = padded_len - seq_len
    if pad:
        student_hidden = jnp.pad(student_hidden, ((0, 0), (0, pad), (0, 0)))
        teacher_hidden = jnp.pad(teacher_hidden, ((0, 0), (0, pad), (0, 0)))
        valid_bs = jnp.pad(valid_bs, ((0, 0), (0, pad)), constant_values=False)
    hs_nbcd = _chunk_major(student_hidden, n_chunks, chunk)
    ht_nbcd = _chunk_major(teacher_hidden, n_chunks, chunk)
    valid_nbc = _chunk_major(valid_bs, n_chunks, chunk)
    t2 = jnp.square(jnp.asarray(temperature, jnp.float32)) if scale_by_t2 else None

    # Rematerialized: the backward pass keeps only this step's inputs (hidden chunks and mask) and
    # recomputes the [B, c, V] logits, instead of saving them for every chunk.
    @jax.checkpoint
    def chunk_sum(hs_bcd, ht_bcd, valid_bc):
        # Invalid positions are zeroed in the hidden states *and* the logits: the logits select keeps
        # the value identical to `divergence`, the hidden select keeps inf/nan garbage in padded
        # positions out of the head's weight gradient (0 · nan would otherwise reach it).
        s_logits = _util.zero_invalid(student_head(_util.zero_invalid(hs_bcd, valid_bc)), valid_bc)
        t_logits = _util.zero_invalid(teacher_head(_util.zero_invalid(ht_bcd, valid_bc)), valid_bc)
        t_logits = jax.lax.stop_gradient(t_logits)
        per_token_bc = per_token_divergence(s_logits, t_logits, kind=kind, temperature=temperature,
                                            beta=beta, lam=lam)
        if t2 is not None:
            per_token_bc = per_token_bc * t2
        return jnp.sum(jnp.where(valid_bc, per_token_bc, 0.0))

    def step(total, xs):
        hs_bcd, ht_bcd, valid_bc = xs
        return total + chunk_sum(hs_bcd, ht_bcd, valid_bc), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs_nbcd, ht_nbcd, valid_nbc))
    count = jnp.sum(valid_nbc.astype(jnp.float32))
    return _util.safe_mean(total, count), {key: (total, count)}
