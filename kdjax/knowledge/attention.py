"""Attention knowledge: attention maps (TinyBERT, MiniLM) and self-attention relations (MiniLMv2,
MLKD-BERT).

Attention tensors are ``[B, H, S, S]`` with query rows and key columns; ``mask`` is always the
``[B, S]`` token mask. Padded *keys* are removed before any softmax and the value is averaged over
valid *query rows* (and heads), so padding never changes a loss, whatever the padded entries hold.

Relation terms compare token-token similarity distributions instead of raw maps. Each model builds
its own ``[B, A_r, S, S]`` relation from its own features, so student and teacher may differ in
width and head count: that is what makes MiniLMv2 and MLKD-BERT projection-free.

The relation score matmuls run at JAX's default matmul precision, like the models' own attention.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from kdjax.knowledge import _util


def _check_attention(student, teacher, mask, what: str) -> None:
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(f"{what}: expected [B, H, S, S] attention tensors, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{what}: student has {student.shape[1]} heads but teacher has {teacher.shape[1]}; "
            "use qkv_relation_kl (or head_split_relation_kl), which allows different head counts")
    _util.check_same_shape(student, teacher, what)
    if student.shape[2] != student.shape[3]:
        raise ValueError(f"{what}: self-attention maps must be square in S, got {tuple(student.shape)}")
    _util.check_mask(mask, (student.shape[0], student.shape[2]), what)


def _token_valid(mask, batch: int, seq: int):
    return _util.valid_bool(mask, (batch, seq))


def attention_score_mse(student_scores, teacher_scores, mask=None, *, name: str = "att_mse"):
    """TinyBERT attention loss: MSE between *pre-softmax* scores ``QKᵀ/√d_k``.

    As in TinyBERT's reference code, entries ``≤ −100`` (additive-mask positions, e.g. causal
    masking) are set to 0 in both maps before the difference. The squared error is averaged over
    heads and valid (query, key) pairs; TinyBERT's code averages over all ``S²`` entries instead,
    padded ones included.

    Args:
      student_scores, teacher_scores: ``[B, H, S, S]``; equal head counts are required.
      mask: ``[B, S]`` token mask or ``None``.

    Returns:
      ``(loss, {name: (sum, count)})`` with ``count = H × #valid pairs``.
    """
    _check_attention(student_scores, teacher_scores, mask, "attention_score_mse")
    b, _, s, _ = student_scores.shape
    tok = _token_valid(mask, b, s)
    pair_valid = jnp.logical_and(tok[:, None, :, None], tok[:, None, None, :])
    student = jnp.where(pair_valid, _util.as_f32(student_scores), 0.0)
    teacher = jnp.where(pair_valid, _util.as_f32(teacher_scores), 0.0)
    student = jnp.where(student <= -100.0, 0.0, student)
    teacher = jnp.where(teacher <= -100.0, 0.0, teacher)
    sq_bhqk = jnp.square(student - teacher)
    loss, pair = _util.masked_mean(sq_bhqk, pair_valid)
    return loss, {name: pair}


def _row_kl_sum_count(log_t_bhqk, log_s_bhqk, tok_bs):
    """Σ over heads and valid query rows of ``KL(teacher row ‖ student row)``, and that count."""
    key_valid = tok_bs[:, None, None, :]
    kl_bhq = _util.kl_from_log_probs(log_t_bhqk, log_s_bhqk, where=key_valid)
    return _util.masked_sum_count(kl_bhq, tok_bs[:, None, :])


def attention_kl(student_scores, teacher_scores, mask=None, *, name: str = "att_kl"):
    """MiniLM self-attention distribution transfer: ``KL(softmax(A_T) ‖ softmax(A_S))`` per row.

    Takes pre-softmax scores; padded keys may hold any value (they are replaced by a large negative
    inside, so feeding scores that already include an additive mask is fine too). The KL is summed
    over keys, then averaged over heads and valid query rows.

    Args:
      student_scores, teacher_scores: ``[B, H, S, S]``; equal head counts are required.
      mask: ``[B, S]`` or ``None``.

    Returns:
      ``(loss, {name: (sum, count)})`` with ``count = H × #valid rows``.
    """
    _check_attention(student_scores, teacher_scores, mask, "attention_kl")
    b, _, s, _ = student_scores.shape
    tok = _token_valid(mask, b, s)
    key_valid = tok[:, None, None, :]
    # Padded query rows are zeroed (then dropped from the mean) so garbage there cannot turn the
    # backward pass into nan; padded keys get MASK_VALUE inside masked_log_softmax.
    row_valid = tok[:, None, :, None]
    log_s = _util.masked_log_softmax(jnp.where(row_valid, _util.as_f32(student_scores), 0.0), key_valid)
    log_t = _util.masked_log_softmax(jnp.where(row_valid, _util.as_f32(teacher_scores), 0.0), key_valid)
    total, count = _row_kl_sum_count(log_t, log_s, tok)
    return _util.safe_mean(total, count), {name: (total, count)}


def _relation_log_probs(x_bsd, num_heads: int, key_valid_b11s):
    """``log softmax(X_a X_aᵀ / √d_r)`` per relation head: ``[B, S, D]`` → ``[B, A_r, S, S]``.

    Heads are contiguous slices of ``D`` (the usual ``[B, S, A, d]`` reshape of concatenated heads).
    """
    b, s, d = x_bsd.shape
    d_r = d // num_heads
    x_basd = _util.as_f32(x_bsd).reshape(b, s, num_heads, d_r).transpose(0, 2, 1, 3)
    scores = jnp.einsum("basd,batd->bast", x_basd, x_basd) / jnp.sqrt(jnp.float32(d_r))
    return _util.masked_log_softmax(scores, key_valid_b11s)


def _relation_sum_count(student_x, teacher_x, mask, num_heads: int, what: str):
    for model, x in (("student", student_x), ("teacher", teacher_x)):
        if x.ndim != 3:
            raise ValueError(f"{what}: expected {model} features [B, S, D], got {tuple(x.shape)}")
    if student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(f"{what}: student {tuple(student_x.shape)} and teacher "
                         f"{tuple(teacher_x.shape)} must share [B, S] (widths may differ)")
    if not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"{what}: the number of relation heads must be a positive int, got {num_heads!r}")
    for model, x in (("student", student_x), ("teacher", teacher_x)):
        if x.shape[-1] % num_heads:
            raise ValueError(
                f"{what}: {model} width D={x.shape[-1]} is not divisible by A_r={num_heads} relation "
                "heads; pick A_r dividing both widths")
    b, s, _ = student_x.shape
    _util.check_mask(mask, (b, s), what)
    tok = _token_valid(mask, b, s)
    key_valid = tok[:, None, None, :]
    log_s = _relation_log_probs(_util.zero_invalid(student_x, tok), num_heads, key_valid)
    log_t = _relation_log_probs(_util.zero_invalid(teacher_x, tok), num_heads, key_valid)
    return _row_kl_sum_count(log_t, log_s, tok)


def relation_kl(student_x, teacher_x, mask=None, *, num_relation_heads: int, name: str = "relation"):
    """General self-relation KL (MiniLMv2): ``KL(R_T ‖ R_S)`` with ``R = softmax(X_a X_aᵀ / √d_r)``.

    ``X`` (concatenated heads, ``[B, S, D]``) is re-split into ``A_r`` relation heads of width
    ``d_r = D / A_r``; each model uses its own ``D`` and hence its own ``d_r``. Padded keys are masked
    before the softmax; the KL is summed over keys and averaged over relation heads and valid query
    rows, i.e. ``1/(A_r |x|) Σ_a Σ_t KL``.

    Returns:
      ``(loss, {name: (sum, count)})`` with ``count = A_r × #valid rows``.
    """
    total, count = _relation_sum_count(student_x, teacher_x, mask, num_relation_heads, "relation_kl")
    return _util.safe_mean(total, count), {name: (total, count)}


def value_relation_kl(student_v, teacher_v, mask=None, *, num_heads: int,
                      name: str = "value_relation"):
    """MiniLM value relation ``KL(VR_T ‖ VR_S)``, ``VR = softmax(V Vᵀ/√d_k)`` per attention head.

    :func:`relation_kl` on the value vectors with ``A_r = num_heads`` (MiniLM needs equal head
    counts; the widths may differ).
    """
    total, count = _relation_sum_count(student_v, teacher_v, mask, num_heads, "value_relation_kl")
    return _util.safe_mean(total, count), {name: (total, count)}


def qkv_relation_kl(student_qkv, teacher_qkv, mask=None, *, num_relation_heads: int = 48,
                    name: str = "qkv_relation"):
    """MiniLMv2: sum of the Q-Q, K-K and V-V :func:`relation_kl` terms.

    Args:
      student_qkv, teacher_qkv: tuples ``(q, k, v)``, each ``[B, S, D]`` (concatenated heads).
      mask: ``[B, S]`` or ``None``.
      num_relation_heads: ``A_r``; 48 for base-size teachers, 64 for large ones.

    Returns:
      ``(loss, metrics)`` with ``loss = Σ_X mean_X``; metrics hold ``name/q``, ``name/k``, ``name/v``
      and the total under ``name`` (the three share one count, so ``total_sum / count == loss``).
    """
    for model, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise ValueError(f"qkv_relation_kl: {model}_qkv must be a (q, k, v) tuple of [B, S, D] arrays")
    metrics = {}
    loss = jnp.float32(0.0)
    total = jnp.float32(0.0)
    count = None
    for part, x_s, x_t in zip("qkv", student_qkv, teacher_qkv):
        part_sum, part_count = _relation_sum_count(x_s, x_t, mask, num_relation_heads,
                                                   f"qkv_relation_kl ({part})")
        metrics[f"{name}/{part}"] = (part_sum, part_count)
        loss = loss + _util.safe_mean(part_sum, part_count)
        total = total + part_sum
        count = part_count
    metrics[name] = (total, count)
    return loss, metrics


def head_split_relation_kl(student_ctx, teacher_ctx, mask=None, *, num_groups: int,
                           name: str = "mha_relation"):
    """MLKD-BERT head-split multi-head-attention relation.

    The per-head attention *context* outputs (concatenated, ``[B, S, D]``) of each model are split
    into ``num_groups`` contiguous groups (``num_groups`` = student heads, so the teacher's heads are
    grouped ``H_T / H_S`` at a time) and compared as relations ``softmax(O_a O_aᵀ / √d_split)``;
    this equals :func:`relation_kl` with ``A_r = num_groups`` for both models.
    """
    total, count = _relation_sum_count(student_ctx, teacher_ctx, mask, num_groups,
                                       "head_split_relation_kl")
    return _util.safe_mean(total, count), {name: (total, count)}


def embedding_relation_kl(student_e, teacher_e, mask=None, *, name: str = "emb_relation"):
    """MLKD-BERT embedding relation: :func:`relation_kl` with a single head, ``softmax(E Eᵀ/√d)``."""
    total, count = _relation_sum_count(student_e, teacher_e, mask, 1, "embedding_relation_kl")
    return _util.safe_mean(total, count), {name: (total, count)}


__all__ = [
    "attention_score_mse",
    "attention_kl",
    "relation_kl",
    "value_relation_kl",
    "qkv_relation_kl",
    "head_split_relation_kl",
    "embedding_relation_kl",
]
