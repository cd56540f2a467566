"""Continuation-KD (Jafari et al., "Continuation KD: Improved Knowledge Distillation through the Lens of
Continuation Optimization", Findings of EMNLP 2022): KD as a continuation method — annealed teacher
targets, a hinge margin on each example's KD term, and a smooth hand-over from KD to the hard labels.

One stage; per example b (GKD spec §12):

    ℓ_b = ψ·CE(y, z_S) + (1 − ψ)·MSE_b(z_S, Φ·z_T)·1[MSE_b > δ·Φ],   L = mean_b ℓ_b

* Φ: Annealing-KD's staircase over the whole stage with τ_max = 10 (Φ = k/10 in 10 equal phases).
* ψ = p/1.333 while p ≤ 0.666 (p = step/steps), then 1: rising to ≈ 0.4996, then the last third is pure
  hard-label loss.
* MSE_b averages over the classes; δ = 1 (`--continuation_kd_margin`). The gate depends on the
  student's own predictions: once an example is within the margin its KD term switches off.
* The hard CE is the batch mean (weight ρ_h = 1).

Defaults are the log's flags (identical to the code's defaults). Token-level logits are read as one
"example" per valid position. The reference pipeline starts from a PD student.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge.registry import knowledge
from kdjax.methods.annealing_kd import annealing_factor, check_max_t
from kdjax.methods.base import Method, MethodError, Stage, Term, register
from kdjax.methods.kd import _is_number, check_student_init


def hand_over(progress, sep: float, denominator: float):
    """ψ at stage progress p: p/denominator while p <= sep, then 1."""
    p = jnp.asarray(progress, jnp.float32)
    return jnp.where(p <= sep, p / denominator, 1.0)


@knowledge("continuation_kd", sources=("logits",))
def continuation_kd_loss(ctx, term):
    kw = term.kwargs
    phi = annealing_factor(ctx.progress, kw["max_t"])
    psi = hand_over(ctx.progress, kw["psi_sep"], kw["psi_denominator"])
    s = ctx.s_out.logits.astype(jnp.float32)
    t = ctx.t_out.logits.astype(jnp.float32)
    labels = ctx.batch["labels"]
    if s.ndim == 3:
        mask = ctx.mask(term).astype(jnp.float32)
        if ctx.student.causal:
            ce_logits, ce_labels, ce_mask = s[:, :-1], labels[:, 1:], mask[:, 1:]
        else:
            ce_logits, ce_labels, ce_mask = s, labels, mask
        ce, _ = divergences_lib.cross_entropy(ce_logits, ce_labels, ce_mask)
    else:
        mask = jnp.ones(s.shape[:1], jnp.float32)
        ce, _ = divergences_lib.cross_entropy(s, labels)
    mse = jnp.mean(jnp.square(s - phi * t), axis=-1)                       # per example (or position)
    gate = jax.lax.stop_gradient((mse > kw["margin"] * phi).astype(jnp.float32)) * mask
    count = jnp.maximum(mask.sum(), 1.0)
    kd = jnp.sum(mse * gate) / count
    loss = psi * ce + (1.0 - psi) * kd
    one = jnp.ones((), jnp.float32)
    metrics = {term.name: (loss, one), f"{term.name}/hard_ce": (ce, one), f"{term.name}/kd": (kd, one),
               f"{term.name}/phi": (phi, one), f"{term.name}/psi": (psi, one),
               f"{term.name}/active": (gate.sum(), count)}
    return loss, metrics


@register("continuation_kd", "Continuation-KD: ψ·CE + (1-ψ)·hinge MSE(z_S, Φ·z_T), Φ in 10 phases, ψ -> 1")
def continuation_kd(*, max_t: float = 10.0, margin: float = 1.0, psi_sep: float = 0.666,
                    psi_denominator: float = 1.333, weight: float = 1.0,
                    student_init: Union[str, tuple] = "uniform") -> Method:
    """Continuation-KD fine-tuning.

    Args:
      max_t: τ_max of the Φ staircase (10 phases).
      margin: δ; an example's KD term is kept while MSE_b > δ·Φ.
      psi_sep, psi_denominator: ψ = p/psi_denominator while p <= psi_sep, then 1.
      weight: overall weight of the term.
    """
    what = "continuation_kd"
    max_t = check_max_t(max_t, f"{what}: max_t")
    for name, value in (("margin", margin), ("psi_denominator", psi_denominator), ("weight", weight)):
        if not _is_number(value) or value < 0 or (name == "psi_denominator" and value == 0):
            raise MethodError(f"{what}: {name} must be a {'positive' if name == 'psi_denominator' else 'non-negative'} "
                              f"number, got {value!r}")
    if not _is_number(psi_sep) or not 0 <= psi_sep <= 1:
        raise MethodError(f"{what}: psi_sep must be in [0, 1], got {psi_sep!r}")
    term = Term.make("continuation_kd", "logits", name="continuation", weight=float(weight), max_t=max_t,
                     margin=float(margin), psi_sep=float(psi_sep), psi_denominator=float(psi_denominator))
    return Method(name=what, stages=(Stage("distill", (term,)),),
                  description=f"Continuation-KD (τ_max={max_t}, δ={margin})",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
