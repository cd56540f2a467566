"""Shared numerics for the knowledge terms: masked means, safe KL sums, key masking.

Every knowledge term reduces a per-position value (per token, per query row, per sample) to a
scalar with :func:`masked_mean` and reports it as a ``(sum, count)`` pair. Reporting the pair rather
than the mean keeps averages exact when the engine adds metrics across hosts, micro-batches and
uneven padding: the global mean is ``Σ sum / Σ count``, not a mean of means.

The helpers here are written so that neither the value nor the gradient of a term can be poisoned
by padded positions or by zero-probability entries:

* reductions select with ``jnp.where`` (never multiply by the mask), so ``inf``/``nan`` garbage in a
    padded position cannot leak into the sum as ``0 * inf``;
* KL sums use the "double where" pattern: the log-ratio itself is replaced by 0 where ``p == 0``
    before it is multiplied by ``p``, so ``0 * (-inf - -inf)`` never appears in the forward pass nor
    in the backward pass;
* padded keys are replaced by a large *finite* negative before a softmax, so the log-softmax stays
    finite and its gradient is exactly zero there.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

# Value written into masked (padded) key positions before a softmax. It is finite so that
# ``x - max(x)`` and the log-softmax stay finite (``-inf - -inf`` would be NaN), and small enough
# that ``exp`` of it underflows to exactly 0 in float32 for any realistic score.
MASK_VALUE = -1e30


def as_f32(x) -> Array:
    """Casts to float32: all knowledge terms compute in fp32 whatever the input dtype (e.g. bf16)."""
    return jnp.asarray(x).astype(jnp.float32)


def check_same_shape(student, teacher, what: str, hint: str = "") -> None:
    """Raises a one-line ValueError if student and teacher tensors have different shapes."""
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
            + (f"; {hint}" if hint else "; pass tensors of the same shape"))


def check_mask(mask, expected_shape: tuple[int, ...], what: str) -> None:
    """Raises a ValueError if a mask does not have the leading shape the term reduces over."""
    if mask is None:
        return
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"{what}: mask shape {tuple(mask.shape)} does not match the expected "
            f"{tuple(expected_shape)}; pass 1 for valid and 0 for padded positions")


def valid_bool(mask, shape: tuple[int, ...]) -> Array:
    """Boolean validity array of ``shape`` (all True when ``mask`` is None)."""
    if mask is None:
        return jnp.ones(shape, dtype=bool)
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return jnp.broadcast_to(mask, shape)
    return jnp.broadcast_to(mask != 0, shape)


def zero_invalid(x, valid) -> Array:
    """Replaces the entries of ``x`` at invalid positions by 0, before any arithmetic.

    ``valid`` covers the leading axes of ``x`` (e.g. ``[B, S]`` for ``[B, S, V]`` logits). Selecting
    the inputs, not only the outputs, is what keeps *gradients* clean as well: with inf/nan garbage
    in a padded position the backward pass would otherwise form ``0 * nan`` there, which reaches the
    parameters through the model's matmuls. The select fuses into the consumer, so it is free.
    """
    if valid is None:
        return x
    valid = jnp.reshape(valid, valid.shape + (1,) * (x.ndim - valid.ndim))
    return jnp.where(valid, x, jnp.zeros((), x.dtype))


def masked_sum_count(values, mask=None) -> tuple[Array, Array]:
    """Float32 ``(sum of values over valid positions, number of valid positions)``.

    ``mask`` must broadcast to ``values.shape``; entries with mask 0 are *selected away*
    (``jnp.where``), so they may hold inf/nan without affecting the result.
    """
    values = as_f32(values)
    valid = valid_bool(mask, values.shape)
    total = jnp.sum(jnp.where(valid, values, 0.0))
    count = jnp.sum(valid.astype(jnp.float32))
    return total, count


def safe_mean(total: Array, count: Array) -> Array:
    """``total / max(count, 1)``: a fully padded batch gives 0, not NaN."""
    return total / jnp.maximum(count, 1.0)


def masked_mean(values, mask=None) -> tuple[Array, tuple[Array, Array]]:
    """Mean of ``values`` over valid positions, with the exact ``(sum, count)`` pair.

    Args:
        values: any shape; cast to float32.
        mask: ``None`` (all valid) or an array broadcastable to ``values.shape``, 1/True = valid.

    Returns:
        ``(mean, (sum, count))`` with ``mean == sum / max(count, 1)``; all float32 scalars.
    """
    total, count = masked_sum_count(values, mask)
    return safe_mean(total, count), (total, count)


def kl_from_log_probs(log_p: Array, log_q: Array, axis: int = -1, where=None) -> Array:
    """``KL(p ‖ q) = Σ p (log p − log q)`` along ``axis`` from log-probabilities.

    Entries with ``p == 0`` contribute exactly 0 (the ``0 log 0 = 0`` convention), including where
    ``log p`` and ``log q`` are both ``-inf``; their gradient is 0 as well (double-where). Entries
    with ``where == False`` are dropped too (e.g. padded keys).
    """
    p = jnp.exp(log_p)
    keep = p > 0
    if where is not None:
        keep = jnp.logical_and(keep, where)
    log_ratio = jnp.where(keep, log_p - log_q, 0.0)
    return jnp.sum(jnp.where(keep, p, 0.0) * log_ratio, axis=axis)


def log_mixture(log_p: Array, log_q: Array, weight_p: float) -> Array:
    """``log(w p + (1 − w) q)`` computed stably in log space, for ``0 < w < 1``.

    Where both probabilities are exactly 0 (e.g. vocabulary columns set to ``-inf`` by both models)
    the result is ``-inf``; ``logaddexp(-inf, -inf)`` itself would give a NaN gradient, so those
    entries are routed around it (double-where).
    """
    a = log_p + jnp.log(weight_p)
    b = log_q + jnp.log1p(-weight_p)
    both_zero = jnp.logical_and(jnp.isneginf(a), jnp.isneginf(b))
    mixed = jnp.logaddexp(jnp.where(both_zero, 0.0, a), jnp.where(both_zero, 0.0, b))
    return jnp.where(both_zero, -jnp.inf, mixed)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / ‖x‖`` with the norm floored at ``eps`` so a zero vector has a finite gradient."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def masked_log_softmax(scores: Array, key_valid: Array) -> Array:
    """Log-softmax over the last axis with invalid keys set to :data:`MASK_VALUE` first.

    ``key_valid`` broadcasts against ``scores``. Invalid keys get probability exactly 0 and a zero
    gradient, whatever value (even inf/nan) the caller left in them.
    """
    scores = jnp.where(key_valid, scores, MASK_VALUE)
    return jax.nn.log_softmax(scores, axis=-1)


def total_metric(metrics: Mapping[str, tuple[Array, Array]], key: str) -> Array:
    """Mean of one ``(sum, count)`` metric; convenience for logging and tests."""
    total, count = metrics[key]
    return safe_mean(total, count)
