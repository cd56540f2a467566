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

Two ways through the backward pass:

* a generic student head (any callable) is differentiated by JAX inside the checkpointed scan step.
  That is exact for every head, but each chunk's head-weight gradient ``h_cᵀ · dlogits_c`` is a
  full ``[D, V]`` matrix that the compiler writes before adding it to the scan's accumulator, a
  floor on the memory that does not shrink with the chunk size;
* a :class:`LinearHead` (``pre(h) @ W + b``, every LM head in kdjax) goes through a
  ``jax.custom_vjp``: the forward scan keeps only its inputs, the backward scan recomputes each
  chunk's logits, takes ``d loss / d logits_c`` from ``jax.vjp`` of the same per-chunk divergence
  (so every divergence kind works unchanged), maps it back through ``W`` and ``pre``, and adds
  ``x_cᵀ · dlogits_c`` into the ``W`` gradient one vocabulary block at a time with in-place
  ``dynamic_update_slice`` adds, so the largest weight-sized scratch buffer is ``[D, V / blocks]``.
  The blocks are strided (block ``k`` holds the columns ``k, k + n, k + 2n, …``), so when ``V`` is
  sharded every device owns an equal slice of every block and no block is gathered.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Optional

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
from kdjax.models.transformer import head_projection

Array = jax.Array
Head = Callable[[Array], Array]

__all__ = ["LinearHead", "chunked_divergence", "num_chunks", "vocab_blocks"]


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Number of scan steps for ``seq_len`` positions: ``ceil(seq_len / min(chunk_size, seq_len))``."""
    return math.ceil(seq_len / min(chunk_size, seq_len)) if seq_len else 0


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: its fields may be tracers
class LinearHead:
    """An LM head that ends in a linear map: ``logits = pre(h) @ W + b``.

    Passing one as the *student* head of :func:`chunked_divergence` selects the memory-lean
    ``custom_vjp`` backward pass (module docstring); as a plain callable it gives the same logits.

    Attributes:
      weight: ``[D', V]``, or ``[V, D']`` with ``vocab_major=True`` (a tied word-embedding matrix).
      bias: ``[V]`` or ``None``.
      pre: ``h [.., D] -> x [.., D']`` applied before the projection (e.g. BERT's MLM transform and
        norm), or ``None`` for the identity. It may close over parameters; they get gradients.
      vocab_major: ``weight`` is stored ``[V, D']``.
      dtype: dtype of the projection (``x`` and ``W`` are cast to it, as ``nnx.Linear(dtype=...)``
        does); ``None`` promotes the two.
    """

    weight: Any
    bias: Optional[Any] = None
    pre: Optional[Callable] = None
    vocab_major: bool = False
    dtype: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0 if self.vocab_major else 1])

    def features(self, h: Array) -> Array:
        return h if self.pre is None else self.pre(h)

    def project(self, x: Array, weight: Array, bias: Optional[Array]) -> Array:
        """``x @ W + b`` for explicit ``(W, b)`` (the backward pass differentiates this by hand)."""
        # Accumulated and returned in float32 whatever `dtype`: bf16 logits would lose ~3 significant
        # bits against float32 before the divergence sees them.
        logits = head_projection(x, weight, self.dtype, vocab_major=self.vocab_major)
        if bias is not None:
            logits = logits + bias.astype(logits.dtype)
        return logits

    def __call__(self, h: Array) -> Array:
        return self.project(self.features(h), self.weight, self.bias)


def vocab_blocks(vocab_size: int, block_size: int) -> int:
    """Number ``n`` of strided vocabulary blocks (``n`` divides ``V``) for the ``W`` gradient.

    The smallest divisor of ``V`` that makes blocks of at most ``block_size`` columns, unless that
    needs far more blocks than ``ceil(V / block_size)`` (an awkward ``V``, e.g. a prime): then the
    largest divisor not above that count, down to 1 (one block: a full ``[D, V]`` scratch buffer).
    """
    want = max(1, math.ceil(vocab_size / block_size))
    limit = 4 * want
    for n in range(want, min(limit, vocab_size) + 1):
        if vocab_size % n == 0:
            return n
    for n in range(min(want, vocab_size), 0, -1):
        if vocab_size % n == 0:
            return n
    return 1


def _check_chunk_size(chunk_size, what: str = "chunk_size") -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunked_divergence: {what} must be a positive Python int (it fixes the "
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
                       scale_by_t2: bool = True, chunk_size: int = 128, vocab_block_size: int = 4096,
                       name: str = "kd"):
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
        side effects (no RNG draws, no ``sow``). A :class:`LinearHead` selects the ``custom_vjp``
        backward pass whose scratch memory has no ``[D, V]`` weight-gradient buffer.
      teacher_head: the same for the teacher; its logits are under ``stop_gradient``.
      mask: ``[B, S]`` (1/True = valid) or ``None``.
      kind, temperature, beta, lam: see :func:`~kdjax.knowledge.per_token_divergence`.
      scale_by_t2: multiply the per-token values by ``T²`` (Hinton et al.).
      chunk_size: positions per scan step (static). Peak logit memory scales with it, while the
        number of sequential steps is ``ceil(S / chunk_size)``; a chunk larger than ``S`` is
        clamped to ``S``. 128–512 suit an accelerator.
      vocab_block_size: with a :class:`LinearHead` student, the most columns of the ``W`` gradient
        formed at once in the backward pass (see :func:`vocab_blocks`); ignored otherwise.
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
    block = _check_chunk_size(vocab_block_size, "vocab_block_size")
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
    if isinstance(student_head, LinearHead):
        total = _linear_head_total(hs_nbcd, ht_nbcd, valid_nbc, student_head, teacher_head,
                                   jnp.asarray(temperature, jnp.float32), kind=kind, beta=beta, lam=lam,
                                   scale_by_t2=scale_by_t2,
                                   n_blocks=vocab_blocks(student_head.vocab_size, block))
        count = jnp.sum(valid_nbc.astype(jnp.float32))
        return _util.safe_mean(total, count), {key: (total, count)}
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
        return _masked_divergence_sum(s_logits, t_logits, valid_bc, temperature, kind=kind, beta=beta, lam=lam,
                                      scale_by_t2=scale_by_t2)

    def step(total, xs):
        hs_bcd, ht_bcd, valid_bc = xs
        return total + chunk_sum(hs_bcd, ht_bcd, valid_bc), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs_nbcd, ht_nbcd, valid_nbc))
    count = jnp.sum(valid_nbc.astype(jnp.float32))
    return _util.safe_mean(total, count), {key: (total, count)}


def _masked_divergence_sum(s_logits, t_logits, valid_bc, temperature, *, kind: str, beta: float, lam: float,
                           scale_by_t2: bool) -> Array:
    """Σ over valid positions of one chunk's per-token divergence (times T² when asked)."""
    per_token_bc = per_token_divergence(s_logits, t_logits, kind=kind, temperature=temperature, beta=beta, lam=lam)
    if scale_by_t2:
        per_token_bc = per_token_bc * jnp.square(jnp.asarray(temperature, jnp.float32))
    return jnp.sum(jnp.where(valid_bc, per_token_bc, 0.0))


def _linear_head_total(hs_nbcd, ht_nbcd, valid_nbc, head: LinearHead, teacher_head: Head, temperature, *,
                       kind: str, beta: float, lam: float, scale_by_t2: bool, n_blocks: int):
    """Masked divergence sum over all chunks, with a hand-written backward pass (module docstring).

    Everything that must be differentiated or that is a traced value is an explicit argument of
    the ``custom_vjp`` function: the head's ``pre`` and the teacher head are closure-converted, so
    parameters they close over are hoisted into arguments (the teacher's get zero cotangents).
    """
    example_s = jax.ShapeDtypeStruct(hs_nbcd.shape[1:], hs_nbcd.dtype)
    example_t = jax.ShapeDtypeStruct(ht_nbcd.shape[1:], ht_nbcd.dtype)
    pre_fn, pre_consts = jax.closure_convert(head.features, example_s)
    t_fn, t_consts = jax.closure_convert(teacher_head, example_t)
    t_consts = jax.lax.stop_gradient(t_consts)
    vocab = head.vocab_size

    def features(h_bcd, valid_bc, consts):
        return pre_fn(_util.zero_invalid(h_bcd, valid_bc), *consts)

    def teacher_logits(ht_bcd, valid_bc, consts):
        return _util.zero_invalid(t_fn(_util.zero_invalid(ht_bcd, valid_bc), *consts), valid_bc)

    def chunk_sum(s_logits, t_logits, valid_bc, temp):
        # Same expression as the generic path: select invalid logits to 0, then the masked sum.
        return _masked_divergence_sum(_util.zero_invalid(s_logits, valid_bc), t_logits, valid_bc, temp, kind=kind,
                                      beta=beta, lam=lam, scale_by_t2=scale_by_t2)

    @jax.custom_vjp
    def total_fn(hs, ht, valid, consts, weight, bias, tconsts, temp):
        def step(total, xs):
            h_bcd, ht_bcd, valid_bc = xs
            s_logits = head.project(features(h_bcd, valid_bc, consts), weight, bias)
            return total + chunk_sum(s_logits, teacher_logits(ht_bcd, valid_bc, tconsts), valid_bc, temp), None

        total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs, ht, valid))
        return total

    def total_fwd(hs, ht, valid, consts, weight, bias, tconsts, temp):
        # Residuals are the inputs only: no per-chunk logits survive the forward pass.
        return total_fn(hs, ht, valid, consts, weight, bias, tconsts, temp), (
            hs, ht, valid, consts, weight, bias, tconsts, temp)

    def total_bwd(res, g):
        hs, ht, valid, consts, weight, bias, tconsts, temp = res
        d_in = weight.shape[1] if head.vocab_major else weight.shape[0]
        # The W gradient is carried as [D', V/n, n] ([V/n, n, D'] vocab-major): block k is the
        # strided column set k, k+n, ...; the carry is updated in place one block at a time.
        w_acc_shape = (vocab // n_blocks, n_blocks, d_in) if head.vocab_major else (d_in, vocab // n_blocks, n_blocks)

        def add_weight_grad(dw, x_nd, dz_nv):
            if n_blocks == 1:
                upd = jnp.dot(dz_nv.T, x_nd) if head.vocab_major else jnp.dot(x_nd.T, dz_nv)
                return dw + jnp.reshape(upd, w_acc_shape)
            dz_nbk = jnp.reshape(dz_nv, (dz_nv.shape[0], vocab // n_blocks, n_blocks))
            axis = 1 if head.vocab_major else 2

            def block(k, dw):
                dz_nb = jax.lax.dynamic_index_in_dim(dz_nbk, k, axis=2, keepdims=False)
                if head.vocab_major:
                    upd = jnp.dot(dz_nb.T, x_nd)[:, None, :]
                else:
                    upd = jnp.dot(x_nd.T, dz_nb)[:, :, None]
                cur = jax.lax.dynamic_slice_in_dim(dw, k, 1, axis=axis)
                return jax.lax.dynamic_update_slice_in_dim(dw, cur + upd, k, axis=axis)

            return jax.lax.fori_loop(0, n_blocks, block, dw)

        def step(carry, xs):
            dw, db, dconsts = carry
            h_bcd, ht_bcd, valid_bc = xs
            t_logits = teacher_logits(ht_bcd, valid_bc, tconsts)
            x, pre_vjp = jax.vjp(lambda h, c: features(h, valid_bc, c), h_bcd, consts)
            s_logits, proj_vjp = jax.vjp(lambda x_: head.project(x_, weight, bias), x)
            dz = jax.grad(chunk_sum)(s_logits, t_logits, valid_bc, temp) * g.astype(s_logits.dtype)
            (dx,) = proj_vjp(dz)
            dh, dc = pre_vjp(dx.astype(x.dtype))
            x_nd = jnp.reshape(x, (-1, x.shape[-1])).astype(dz.dtype)
            dz_nv = jnp.reshape(dz, (-1, vocab))
            dw = add_weight_grad(dw, x_nd, dz_nv.astype(dw.dtype))
            if db is not None:
                db = db + jnp.sum(dz_nv, axis=0).astype(db.dtype)
            dconsts = jax.tree.map(lambda a, b: a + b.astype(a.dtype), dconsts, dc)
            return (dw, db, dconsts), dh

        dw0 = jnp.zeros(w_acc_shape, jnp.float32)
        db0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
        dc0 = jax.tree.map(jnp.zeros_like, consts)
        (dw, db, dconsts), dhs = jax.lax.scan(step, (dw0, db0, dc0), (hs, ht, valid))
        dw = jnp.reshape(dw, weight.shape).astype(weight.dtype)
        db = None if db is None else db.astype(bias.dtype)
        return (dhs.astype(hs.dtype), jnp.zeros_like(ht), None, dconsts, dw, db,
                jax.tree.map(jnp.zeros_like, tconsts), jnp.zeros_like(temp))

    total_fn.defvjp(total_fwd, total_bwd)
    return total_fn(hs_nbcd, ht_nbcd, valid_nbc, pre_consts, head.weight, head.bias, t_consts, temperature)
