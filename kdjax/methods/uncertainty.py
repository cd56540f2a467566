"""Dynamic KD's uncertainty-based teacher adoption (GKD's `Uncertainty` combiner).

Li, Lin, Ren, Li, Zhou, Sun, "Dynamic Knowledge Distillation for Pre-trained Language Models"
(EMNLP 2021). The student's prediction uncertainty decides, example by example, which of K teachers
(listed small → large) it learns from:

    u_b = H(softmax(z_S,b)) / log C                      (normalised entropy, no gradient)
    L   = Σ_k mean_b[ r_{b,k} · KL_T(z_T^k ‖ z_S)_b ] · s + ρ_h · CE(y, z_S)

* `selection="hard"`: rank the batch by descending u (rank r_b = 1..B); example b goes to bucket
  ⌈r_b·K/B⌉ − 1 and teacher k takes bucket k (`teacher_order`, default: the order of the teachers in
  the config). With two teachers the most uncertain half learns from the small one, the rest from the
  large one.
* `selection="soft"`: r_{b,k} ∝ u_b + (1 − 2u_b)·k/(K − 1), normalised to sum to K over k (for K = 2:
  2u_b and 2(1 − u_b)).

The scale s: the paper gives each example a unit budget over the teachers (hard: its one teacher with
weight 1; soft: weights summing to 1), so s = 1 for hard and s = 1/K for soft (whose r sums to K).
GLMKD's code multiplies both by 1/K, which halves the KD term under hard selection with two teachers;
`one_over_k=True` selects that. Defaults from the logged GKD run: hard selection, T = 1, KL with T²,
ρ_s = ρ_h = 1. For token-level logits u_b is the mean normalised entropy over the example's valid
tokens and each example's KD is its token mean (`StageContext.per_example`).

The ranking couples the batch: with gradient accumulation each micro-batch is ranked on its own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from kdjax.methods.base import Method, MethodError, Stage, register
from kdjax.methods.kd import (check_kind, check_positions, check_temperature, check_weight, hard_label_term,
                              is_zero, logit_kd_term)

SELECTIONS = ("hard", "soft")


def student_uncertainty(logits, mask=None):
    """`[B]` normalised entropy of the student's predictions (token-level logits: mean over valid tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1) / jnp.log(logits.shape[-1])
    if entropy.ndim == 1:
        return entropy
    m = jnp.ones(entropy.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(entropy * m, axis=-1) / jnp.maximum(m.sum(-1), 1.0)


def teacher_weights(u, num_teachers: int, selection: str):
    """`[K, B]` per-example weights r_{b,k} of teacher slot k (before the scale s)."""
    batch = u.shape[0]
    k = jnp.arange(num_teachers, dtype=jnp.float32)[:, None]
    if selection == "hard":
        rank = jnp.argsort(jnp.argsort(-u, stable=True), stable=True) + 1              # 1 = most uncertain
        bucket = (rank * num_teachers + batch - 1) // batch - 1                      # ⌈r·K/B⌉ − 1, exact
        return (bucket[None, :] == k.astype(jnp.int32)).astype(jnp.float32)
    if num_teachers == 1:
        return jnp.ones((1, batch), jnp.float32)
    r = u[None, :] + (1.0 - 2.0 * u[None, :]) * k / (num_teachers - 1)
    return num_teachers * r / jnp.sum(r, axis=0, keepdims=True)


def _uncertainty_loss(selection: str, one_over_k: bool, order: Optional[Sequence[str]]):
    def loss(sctx):
        names = list(order) if order else [t.name for t in sctx.teachers]
        unknown = sorted(set(names) - {t.name for t in sctx.teachers})
        if unknown:
            raise MethodError(f"uncertainty: teacher_order names unknown teachers {unknown}")
        kd_terms = [t for t in sctx.terms if t.fn == "divergence"]
        hard_terms = [t for t in sctx.terms if t.fn == "cross_entropy"]
        s_out, _ = sctx.student()
        mask = sctx.batch.get("attention_mask") if s_out.logits.ndim == 3 else None
        u = jax.lax.stop_gradient(student_uncertainty(s_out.logits, mask))
        weights = jax.lax.stop_gradient(teacher_weights(u, len(names), selection))
        scale = 1.0 / len(names) if (one_over_k or selection == "soft") else 1.0
        one = jnp.ones((), jnp.float32)
        total = jnp.zeros((), jnp.float32)
        metrics = {"uncertainty/u": (u.sum(), jnp.asarray(u.shape[0], jnp.float32))}
        if kd_terms:
            kd = jnp.zeros((), jnp.float32)
            for k, name in enumerate(names):
                kd = kd + jnp.mean(weights[k] * sctx.per_example(name, terms=kd_terms))
                metrics[f"uncertainty/share_{name}"] = (weights[k].sum() / len(names) if selection == "soft"
                                                        else weights[k].sum(), jnp.asarray(u.shape[0], jnp.float32))
            total = total + scale * kd
            metrics["uncertainty/kd"] = (scale * kd, one)
        if hard_terms:
            hard, m = sctx.teacher_loss(names[0], terms=hard_terms)
            total = total + hard
            metrics.update(m)
            metrics["uncertainty/hard"] = (hard, one)
        return total, metrics

    return loss


@register("uncertainty", "Dynamic KD: per-example teacher by student uncertainty (hard buckets or soft) + CE")
def uncertainty(*, selection: str = "hard", temperature=1.0, soft_weight=1.0, hard_weight=1.0,
                kind: str = "forward_kl", one_over_k: bool = False, teacher_order: Optional[Sequence[str]] = None,
                positions: str = "all", student_init="uniform") -> Method:
    """Uncertainty-routed multi-teacher KD (Li et al., 2021; GKD §15).

    Args:
      selection: "hard" (rank buckets) or "soft" (entropy-interpolated weights).
      temperature: T of the KL (with T²); 1 in GKD.
      soft_weight, hard_weight: ρ_s (inside the KD term's weight) and ρ_h of the hard-label CE.
      kind: the divergence; GKD uses forward KL.
      one_over_k: GLMKD's extra 1/K on the routed KD term under hard selection (False: the paper's
        unit weight per example).
      teacher_order: teacher names from small to large (default: the config's order).
      positions, student_init: as in `kd`.
    """
    if selection not in SELECTIONS:
        raise MethodError(f"uncertainty: selection must be one of {SELECTIONS}, got {selection!r}")
    soft_weight = check_weight(soft_weight, "uncertainty: soft_weight")
    hard_weight = check_weight(hard_weight, "uncertainty: hard_weight")
    temperature = check_temperature(temperature, "uncertainty: temperature")
    kind = check_kind(kind, "uncertainty: kind")
    positions = check_positions(positions, "uncertainty: positions")
    terms = tuple(t for t in (logit_kd_term(soft_weight, temperature, kind=kind, positions=positions),
                              hard_label_term(hard_weight, positions=positions)) if not is_zero(t.weight))
    if not terms:
        raise MethodError("uncertainty: soft_weight and hard_weight are both 0")
    order = tuple(teacher_order) if teacher_order else None
    stage = Stage("distill", terms, loss=_uncertainty_loss(selection, bool(one_over_k), order))
    return Method("uncertainty", (stage,), description=f"Dynamic KD ({selection} selection by uncertainty)",
                  student_init=student_init)
