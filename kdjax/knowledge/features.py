"""Feature knowledge: matching hidden states (TinyBERT, DistilBERT, PKD).

The student's features arrive already projected to the teacher's width where a method needs it:
the learned projection ``W`` belongs to the distillation state (docs/methods.md, "Conventions"), not to
the loss, so these functions stay pure and parameter-free.
"""

from __future__ import annotations

import jax.numpy as jnp

from kdjax.knowledge import _util


def _check_features(student_h, teacher_h, what: str) -> None:
    if student_h.ndim != 3 or teacher_h.ndim != 3:
        raise ValueError(f"{what}: expected [B, S, D] hidden states, got student "
                         f"{tuple(student_h.shape)} and teacher {tuple(teacher_h.shape)}")
    if student_h.shape[-1] != teacher_h.shape[-1]:
        raise ValueError(
            f"{what}: student width {student_h.shape[-1]} != teacher width {teacher_h.shape[-1]}; "
            "project the student features to the teacher width (a learned projection) first")
    _util.check_same_shape(student_h, teacher_h, what)


def _masked_inputs(student, teacher, mask):
    """float32 inputs with padded positions zeroed, so garbage there reaches no value or gradient."""
    valid = None if mask is None else _util.valid_bool(mask, mask.shape)
    return (_util.as_f32(_util.zero_invalid(student, valid)),
            _util.as_f32(_util.zero_invalid(teacher, valid)))


def hidden_mse(student_h, teacher_h, mask=None, *, name: str = "hidden_mse"):
    """TinyBERT hidden-state / embedding loss ``MSE(H_S W, H_T)``, over valid tokens only.

    Per token the squared error is averaged over the feature axis ``D``; tokens are then averaged
    over the mask. (TinyBERT's reference code averages over padded tokens too; kdjax excludes them,
    per the token-level convention.)

    Args:
      student_h: ``[B, S, D]`` student features, already projected to the teacher width.
      teacher_h: ``[B, S, D]``.
      mask: ``[B, S]`` or ``None``.

    Returns:
      ``(loss, {name: (sum, count)})``.
    """
    _check_features(student_h, teacher_h, "hidden_mse")
    _util.check_mask(mask, student_h.shape[:2], "hidden_mse")
    student, teacher = _masked_inputs(student_h, teacher_h, mask)
    err_bs = jnp.mean(jnp.square(student - teacher), axis=-1)
    loss, pair = _util.masked_mean(err_bs, mask)
    return loss, {name: pair}


def cosine(student_h, teacher_h, mask=None, *, name: str = "cosine"):
    """DistilBERT's cosine-embedding loss: mean over valid tokens of ``1 − cos(h_S, h_T)``.

    Norms are floored at 1e-12 so an all-zero vector gives ``cos = 0`` with finite gradients.

    Returns:
      ``(loss, {name: (sum, count)})``.
    """
    _check_features(student_h, teacher_h, "cosine")
    _util.check_mask(mask, student_h.shape[:2], "cosine")
    student, teacher = _masked_inputs(student_h, teacher_h, mask)
    s_bsd = _util.l2_normalize(student)
    t_bsd = _util.l2_normalize(teacher)
    loss, pair = _util.masked_mean(1.0 - jnp.sum(s_bsd * t_bsd, axis=-1), mask)
    return loss, {name: pair}


def pkd(student_cls, teacher_cls, mask=None, *, name: str = "pkd"):
    """PKD "patient" loss on the ``[CLS]`` vectors of ``L`` matched intermediate layers.

    Each vector is L2-normalized, then ``loss = Σ_layers mean_{batch, D} (ĥ_S − ĥ_T)²``. The PKD
    paper writes a plain sum of squared distances; its reference code takes one mean over
    ``[B, L, D]``, which is this value divided by ``L``. kdjax sums over layers (docs/methods.md), so the
    weight β = 100 of the PKD recipe keeps its per-layer meaning.

    Args:
      student_cls: ``[B, L, D]`` (student already projected to the teacher width if they differ).
      teacher_cls: ``[B, L, D]``.
      mask: optional ``[B]`` to drop padded examples (sample-level term).

    Returns:
      ``(loss, {name: (sum, count)})`` where ``sum`` adds the per-example values and ``count`` is the
      number of valid examples.
    """
    if student_cls.ndim != 3 or teacher_cls.ndim != 3:
        raise ValueError(f"pkd: expected [B, L, D] [CLS] vectors per matched layer, got student "
                         f"{tuple(student_cls.shape)} and teacher {tuple(teacher_cls.shape)}")
    if student_cls.shape[-1] != teacher_cls.shape[-1]:
        raise ValueError(
            f"pkd: student width {student_cls.shape[-1]} != teacher width {teacher_cls.shape[-1]}; "
            "project the student [CLS] vectors to the teacher width first")
    _util.check_same_shape(student_cls, teacher_cls, "pkd",
                           "match the same number of student and teacher layers")
    _util.check_mask(mask, student_cls.shape[:1], "pkd")
    student, teacher = _masked_inputs(student_cls, teacher_cls, mask)
    s_bld = _util.l2_normalize(student)
    t_bld = _util.l2_normalize(teacher)
    per_example_b = jnp.sum(jnp.mean(jnp.square(s_bld - t_bld), axis=-1), axis=-1)
    loss, pair = _util.masked_mean(per_example_b, mask)
    return loss, {name: pair}
