"""Logit knowledge: divergences between teacher and student output distributions.

Conventions (docs/methods.md, "Divergences"):

* ``p = softmax(teacher_logits / T)`` is the teacher distribution and ``q = softmax(student_logits / T)``
  the student's; both are formed in float32 with ``jax.nn.log_softmax`` (never ``log(softmax)``), so
  they stay exact for bf16 inputs, for ``|logits|`` up to 1e4 and for large temperatures.
* Logits are ``[..., V]``; the mask covers the leading ``[...]`` shape (e.g. ``[B, S]`` for a language
  model, ``[B]`` for a classifier). Token-level values are averaged over valid positions only.
* Entries with zero probability contribute exactly 0 to a KL sum, with a finite (zero) gradient.

:func:`per_token_divergence` is the unreduced building block: it is what a chunked large-vocabulary
loss calls on each sequence chunk, so it takes no mask and applies no ``T²``. :func:`divergence` is
the reduced term the engine calls.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from kdjax.knowledge import _util

Array = jax.Array

FORWARD_KL = "forward_kl"
REVERSE_KL = "reverse_kl"
JSD = "jsd"
SKEW_KL = "skew_kl"
SKEW_REVERSE_KL = "skew_reverse_kl"
TVD = "tvd"
KINDS = (FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")


def _check_logits(student_logits, teacher_logits, what: str) -> None:
    """Static shape checks shared by all logit terms."""
    if student_logits.ndim < 1 or teacher_logits.ndim < 1:
        raise ValueError(f"{what}: logits need a trailing vocabulary axis, got shapes "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    v_student, v_teacher = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_student != v_teacher:
        raise ValueError(
            f"{what}: student vocab size {v_student} != teacher vocab size {v_teacher}; slice the "
            "teacher logits to the student's vocabulary (e.g. GLMD vocabulary compression) first")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"{what}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in their leading (batch/sequence) shape")


def _check_fraction(value, arg: str, kind: str) -> float:
    """``beta``/``lam`` select special-cased endpoints, so they must be static Python numbers."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{kind}: {arg} must be a Python float in [0, 1] (it is static), got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{kind}: {arg}={value} is outside [0, 1]")
    return value


def _check_temperature(temperature) -> None:
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(logits, temperature) -> Array:
    return jax.nn.log_softmax(_util.as_f32(logits) / temperature, axis=-1)


def per_token_divergence(student_logits, teacher_logits, *, kind: str, temperature=1.0,
                         beta: float = 0.5, lam: float = 0.1) -> Array:
    """Divergence between teacher and student distributions at every position, shape ``[...]``.

    Kinds (``p`` teacher, ``q`` student, both at temperature ``T``):

    * ``forward_kl``: ``KL(p ‖ q) = Σ p (log p − log q)`` — mean-seeking, the Hinton KD term.
    * ``reverse_kl``: ``KL(q ‖ p) = Σ q (log q − log p)`` — mode-seeking (MiniLLM).
    * ``jsd``: generalized JSD in TRL's ``GKDTrainer`` convention: ``M = β p + (1 − β) q`` and
      ``β KL(p ‖ M) + (1 − β) KL(q ‖ M)``. The formula itself vanishes at both ends, so, as TRL does,
      ``β = 0`` is special-cased to forward ``KL(p ‖ q)`` and ``β = 1`` to reverse ``KL(q ‖ p)``.
      (EasyDeL uses the opposite β; kdjax pins TRL's.)
    * ``skew_kl`` (DistiLLM): ``KL(p ‖ λ p + (1 − λ) q)``; ``λ = 0`` is forward KL.
    * ``skew_reverse_kl`` (DistiLLM): ``KL(q ‖ (1 − λ) p + λ q)``; ``λ = 0`` is reverse KL.
    * ``tvd``: total variation ``½ Σ |p − q|``.

    No ``T²`` factor and no reduction: this is the building block for chunked computation.

    Args:
      student_logits: ``[..., V]``, any float dtype (computed in float32).
      teacher_logits: ``[..., V]``, same shape.
      kind: one of :data:`KINDS`.
      temperature: softmax temperature ``T > 0`` (Python number or traced scalar).
      beta: JSD interpolation, static Python float in ``[0, 1]``.
      lam: skew weight λ, static Python float in ``[0, 1]``.

    Returns:
      float32 ``[...]`` divergence per position.
    """
    _check_kind(kind)
    _check_logits(student_logits, teacher_logits, f"divergence {kind!r}")
    _check_temperature(temperature)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    kl = _util.kl_from_log_probs

    if kind == FORWARD_KL:
        return kl(log_p, log_q)
    if kind == REVERSE_KL:
        return kl(log_q, log_p)
    if kind == JSD:
        beta = _check_fraction(beta, "beta", kind)
        if beta == 0.0:
            return kl(log_p, log_q)
        if beta == 1.0:
            return kl(log_q, log_p)
        log_m = _util.log_mixture(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)
    if kind == SKEW_KL:
        lam = _check_fraction(lam, "lam", kind)
        if lam == 0.0:
            return kl(log_p, log_q)
        if lam == 1.0:  # the mixture is p itself
            return jnp.zeros(log_p.shape[:-1], jnp.float32)
        return kl(log_p, _util.log_mixture(log_p, log_q, lam))
    if kind == SKEW_REVERSE_KL:
        lam = _check_fraction(lam, "lam", kind)
        if lam == 0.0:
            return kl(log_q, log_p)
        if lam == 1.0:  # the mixture is q itself
            return jnp.zeros(log_p.shape[:-1], jnp.float32)
        return kl(log_q, _util.log_mixture(log_p, log_q, 1.0 - lam))
    # TVD: probabilities are bounded, so exp of the stable log-softmax is safe here.
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def divergence(student_logits, teacher_logits, mask=None, *, kind: str = FORWARD_KL,
               temperature=1.0, beta: float = 0.5, lam: float = 0.1, scale_by_t2: bool = True,
               name: str = "kd"):
    """Masked mean of :func:`per_token_divergence` over valid positions, times ``T²`` by default.

    The ``T²`` factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures,
    because soft-target gradients scale as ``1/T²``.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      mask: ``[...]`` (1 = valid) or ``None``.
      kind, temperature, beta, lam: see :func:`per_token_divergence`.
      scale_by_t2: multiply by ``T²``.
      name: metric-key prefix.

    Returns:
      ``(loss, {f"{name}/{kind}": (sum, count)})`` with ``loss = sum / max(count, 1)``.
    """
    _check_kind(kind)
    _check_logits(student_logits, teacher_logits, f"divergence {kind!r}")
    _util.check_mask(mask, student_logits.shape[:-1], f"divergence {kind!r}")
    valid = None if mask is None else _util.valid_bool(mask, mask.shape)
    per_token = per_token_divergence(_util.zero_invalid(student_logits, valid),
                                     _util.zero_invalid(teacher_logits, valid), kind=kind,
                                     temperature=temperature, beta=beta, lam=lam)
    if scale_by_t2:
        per_token = per_token * jnp.square(jnp.asarray(temperature, jnp.float32))
    loss, pair = _util.masked_mean(per_token, mask)
    return loss, {f"{name}/{kind}": pair}


def soft_cross_entropy(student_logits, teacher_logits, mask=None, *, temperature=1.0,
                       scale_by_t2: bool = False, name: str = "soft_ce"):
    """Soft-target cross-entropy ``−Σ p log q`` (TinyBERT's prediction-layer loss).

    Equals forward KL plus the teacher entropy, which has no student gradient; TinyBERT uses it
    at ``T = 1`` without the ``T²`` factor, hence ``scale_by_t2=False`` by default.

    Returns:
      ``(loss, {name: (sum, count)})`` averaged over valid positions of the leading ``[...]`` shape.
    """
    _check_logits(student_logits, teacher_logits, "soft_cross_entropy")
    _check_temperature(temperature)
    _util.check_mask(mask, student_logits.shape[:-1], "soft_cross_entropy")
    valid = None if mask is None else _util.valid_bool(mask, mask.shape)
    log_q = _log_probs(_util.zero_invalid(student_logits, valid), temperature)
    log_p = _log_probs(_util.zero_invalid(teacher_logits, valid), temperature)
    p = jnp.exp(log_p)
    keep = p > 0  # 0 · log q = 0 even where the student puts -inf
    per_token = -jnp.sum(jnp.where(keep, p, 0.0) * jnp.where(keep, log_q, 0.0), axis=-1)
    if scale_by_t2:
        per_token = per_token * jnp.square(jnp.asarray(temperature, jnp.float32))
    loss, pair = _util.masked_mean(per_token, mask)
    return loss, {name: pair}


def cross_entropy(logits, labels, mask=None, *, ignore_index: int = -100, name: str = "ce"):
    """Hard-label cross-entropy ``−log softmax(z)[y]``, averaged over valid, non-ignored positions.

    Args:
      logits: ``[..., V]``.
      labels: integer ``[...]``; positions equal to ``ignore_index`` are excluded (the Hugging Face
        convention), as are positions with ``mask == 0``. Other labels must lie in ``[0, V)``.
      mask: optional ``[...]``.

    Returns:
      ``(loss, {name: (sum, count)})``; ``count`` is the number of positions that carry a label.
    """
    if logits.ndim < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: labels shape {tuple(labels.shape)} must equal the logits "
                         f"shape without its vocabulary axis, {tuple(logits.shape[:-1])}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"cross_entropy: labels must be integer token/class ids, got {labels.dtype}")
    _util.check_mask(mask, labels.shape, "cross_entropy")
    valid = labels != ignore_index
    if mask is not None:
        valid = jnp.logical_and(valid, _util.valid_bool(mask, labels.shape))
    logits = _util.as_f32(_util.zero_invalid(logits, valid))
    safe_labels = jnp.where(valid, labels, 0)
    target_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    loss, pair = _util.masked_mean(nll, valid)
    return loss, {name: pair}


def logit_mse(student_logits, teacher_logits, mask=None, *, name: str = "logit_mse"):
    """Mean squared error between student and teacher outputs, for regression heads (e.g. STS-B).

    Inputs are ``[..., K]`` (``[B]`` is read as ``[B, 1]``); the squared error is averaged over the
    last axis, then over the valid positions of ``[...]``.

    Returns:
      ``(loss, {name: (sum, count)})``.
    """
    _util.check_same_shape(student_logits, teacher_logits, "logit_mse")
    student = _util.as_f32(student_logits)
    teacher = _util.as_f32(teacher_logits)
    if student.ndim == 1:
        student, teacher = student[:, None], teacher[:, None]
    _util.check_mask(mask, student.shape[:-1], "logit_mse")
    valid = None if mask is None else _util.valid_bool(mask, mask.shape)
    student, teacher = _util.zero_invalid(student, valid), _util.zero_invalid(teacher, valid)
    per_position = jnp.mean(jnp.square(student - teacher), axis=-1)
    loss, pair = _util.masked_mean(per_position, mask)
    return loss, {name: pair}
