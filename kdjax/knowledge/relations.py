"""Sample-level relation knowledge (MLKD-BERT stage 2): relations *between examples* of a batch.

Inputs are pooled / ``[CLS]`` vectors ``[B, D]``; ``mask`` is ``[B]`` (0 for padded examples, e.g.
the filler rows of a last, short batch). Padded examples are removed both as rows (they do not
count in the mean) and as columns (they get no probability mass in anyone's softmax).

Both terms see the whole (per-device) batch at once, so their value depends on how the batch is
split: a sharded run computes them over each shard's examples unless the caller gathers first.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from kdjax.knowledge import _util

SIMILARITIES = ("dot", "cosine")


def _check_pooled(student_x, teacher_x, mask, what: str) -> None:
    if student_x.ndim != 2 or teacher_x.ndim != 2:
        raise ValueError(f"{what}: expected pooled [B, D] vectors, got student "
                         f"{tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)}")
    if student_x.shape[0] != teacher_x.shape[0]:
        raise ValueError(f"{what}: student batch {student_x.shape[0]} != teacher batch "
                         f"{teacher_x.shape[0]}; pass the same examples to both")
    _util.check_mask(mask, student_x.shape[:1], what)


def _check_temperature(temperature, what: str) -> None:
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")


def _similarity_bb(x_bd, similarity: str):
    x_bd = _util.as_f32(x_bd)
    if similarity == "cosine":
        x_bd = _util.l2_normalize(x_bd)
        return x_bd @ x_bd.T
    return (x_bd @ x_bd.T) / jnp.sqrt(jnp.float32(x_bd.shape[-1]))


def sample_relation_kl(student_x, teacher_x, mask=None, *, temperature=1.0, similarity: str = "dot",
                       name: str = "sample_relation"):
    """MLKD-BERT sample-similarity relation: ``KL(R_T ‖ R_S)`` over the batch.

    ``R = row-softmax(sim(X, X) / temperature)`` is a ``B × B`` matrix over valid examples, the
    diagonal (self-similarity) included as in MLKD-BERT's in-batch similarity matrix. ``sim`` is
    ``x_i · x_j / √D`` (``"dot"``, each model its own ``D``) or the cosine (``"cosine"``), so the
    student and teacher widths may differ. The row KLs are averaged over valid examples.

    Returns:
      ``(loss, {name: (sum, count)})`` with ``count`` = number of valid examples.
    """
    _check_pooled(student_x, teacher_x, mask, "sample_relation_kl")
    _check_temperature(temperature, "sample_relation_kl")
    if similarity not in SIMILARITIES:
        raise ValueError(f"sample_relation_kl: unknown similarity {similarity!r}; "
                         f"expected one of {', '.join(SIMILARITIES)}")
    b = student_x.shape[0]
    valid_b = _util.valid_bool(mask, (b,))
    col_valid = valid_b[None, :]
    sim_s = _similarity_bb(_util.zero_invalid(student_x, valid_b), similarity)
    sim_t = _similarity_bb(_util.zero_invalid(teacher_x, valid_b), similarity)
    log_s = _util.masked_log_softmax(sim_s / temperature, col_valid)
    log_t = _util.masked_log_softmax(sim_t / temperature, col_valid)
    kl_b = _util.kl_from_log_probs(log_t, log_s, where=col_valid)
    loss, pair = _util.masked_mean(kl_b, valid_b)
    return loss, {name: pair}


def supervised_contrastive(student_x, teacher_x, labels, mask=None, *, temperature=0.1,
                           name: str = "supcon"):
    """Supervised contrastive loss (Khosla et al., 2020) over student and teacher ``[CLS]`` vectors.

    The ``2B`` L2-normalized vectors ``z`` (student rows, then teacher rows) form one pool. For an
    anchor ``i`` the positives ``P(i)`` are the other valid vectors with the same label — always
    including the other model's view of the same example — and

        ``loss_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i, a valid} exp(z_i·z_a/τ) )``

    (the "L_out" form). The loss is averaged over valid anchors with at least one positive.
    Gradients flow into both inputs; stop the teacher's gradient at the call site if it is frozen.

    Args:
      student_x, teacher_x: ``[B, D]`` with the same ``D`` (project the student first if needed).
      labels: integer ``[B]`` class labels.
      mask: ``[B]`` or ``None``.
      temperature: ``τ``.

    Returns:
      ``(loss, {name: (sum, count)})`` where ``count`` is the number of anchors with positives.
    """
    _check_pooled(student_x, teacher_x, mask, "supervised_contrastive")
    _check_temperature(temperature, "supervised_contrastive")
    if student_x.shape[-1] != teacher_x.shape[-1]:
        raise ValueError(
            f"supervised_contrastive: student width {student_x.shape[-1]} != teacher width "
            f"{teacher_x.shape[-1]}; project the student vectors to the teacher width first")
    b = student_x.shape[0]
    if tuple(labels.shape) != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"supervised_contrastive: labels must be integer [B]=({b},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    valid_b = _util.valid_bool(mask, (b,))
    z_nd = jnp.concatenate([_util.l2_normalize(_util.as_f32(_util.zero_invalid(student_x, valid_b))),
                            _util.l2_normalize(_util.as_f32(_util.zero_invalid(teacher_x, valid_b)))],
                           axis=0)
    labels_n = jnp.concatenate([labels, labels])
    valid_n = jnp.tile(valid_b, 2)
    n = 2 * b
    not_self = ~jnp.eye(n, dtype=bool)
    others_nn = jnp.logical_and(not_self, valid_n[None, :])
    logits_nn = (z_nd @ z_nd.T) / temperature
    log_prob_nn = _util.masked_log_softmax(logits_nn, others_nn)
    positive_nn = jnp.logical_and(others_nn, labels_n[:, None] == labels_n[None, :])
    num_pos_n = jnp.sum(positive_nn, axis=-1).astype(jnp.float32)
    pos_log_prob_n = jnp.sum(jnp.where(positive_nn, log_prob_nn, 0.0), axis=-1)
    loss_n = -pos_log_prob_n / jnp.maximum(num_pos_n, 1.0)
    anchors_n = jnp.logical_and(valid_n, num_pos_n > 0)
    loss, pair = _util.masked_mean(loss_n, anchors_n)
    return loss, {name: pair}

