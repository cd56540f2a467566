"""Annealing-KD (Jafari et al., "Annealing Knowledge Distillation", EACL 2021): close the capacity gap
gradually by regressing the student's logits onto *annealed* teacher logits, then fine-tune on labels.

1. **annealing** — L = MSE(z_S, Φ·z_T): no temperature, no hard label, no intermediate layers, with

       τ = (1 − step/steps)·τ_max,   Φ = 1 − (max(1, ⌈τ⌉) − 1)/τ_max,

   so Φ steps through 1/τ_max, 2/τ_max, …, 1 in τ_max equal phases of the stage (τ_max = 7).
   The MSE is the mean over all logit entries (GKD's `mse_loss` over B×C classification logits; for
   token-level logits the mean over classes, then over valid positions).
2. **hard** — L = CE(y, z_S) on the gold labels only.

Defaults follow GKD spec §11 (the log's `--annealing_kd_max_t=7 --distill_ft_soft_mse`, then stage 2
with only `--distill_ft_hard`); paper and code agree on the staircase. The reference pipeline starts from
a pre-trained-distillation (PD) student; this recipe holds the two fine-tuning stages. Φ reads the
stage's progress in float32: a step within ~4e-7·τ_max of a phase boundary (relative to the stage's
length) is placed exactly, so the staircase is exact for stages of up to ~10⁵ steps.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import jax.numpy as jnp

from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge.registry import knowledge
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import _is_number, check_student_init, check_weight, hard_label_term, stage_overrides


def annealing_factor(progress, max_t):
    """Φ at stage progress p: 1 − (max(1, ⌈(1 − p)·τ_max⌉) − 1)/τ_max (float32, traced)."""
    max_t = float(max_t)
    tau = (1.0 - jnp.asarray(progress, jnp.float32)) * max_t
    k = jnp.maximum(1.0, jnp.ceil(tau - 4e-7 * max_t))
    return 1.0 - (k - 1.0) / max_t


def check_max_t(max_t, what: str) -> float:
    if not _is_number(max_t) or max_t < 1:
        raise MethodError(f"{what} must be a number >= 1, got {max_t!r}")
    return float(max_t)


@knowledge("annealed_logit_mse", sources=("logits",))
def annealed_logit_mse(ctx, term):
    """MSE(z_S, Φ(progress)·z_T) (`kdjax.knowledge.logit_mse` on the scaled teacher logits)."""
    phi = annealing_factor(ctx.progress, term.kwargs["max_t"])
    s, t = ctx.s_out.logits, ctx.t_out.logits
    mask = ctx.mask(term) if s.ndim == 3 else None
    loss, metrics = divergences_lib.logit_mse(s, phi * t.astype(jnp.float32), mask, name=term.name)
    metrics = dict(metrics)
    metrics[f"{term.name}/phi"] = (phi, jnp.ones((), jnp.float32))
    return loss, metrics


@register("annealing_kd", "Annealing-KD: MSE(z_S, Φ·z_T) with Φ = 1/7 … 1 in 7 phases, then hard-label CE")
def annealing_kd(*, max_t: float = 7.0, mse_weight: Schedule = 1.0, hard_weight: Schedule = 1.0,
                 hard_stage: bool = True, steps: Optional[Mapping[str, int]] = None,
                 learning_rates: Optional[Mapping[str, float]] = None,
                 student_init: Union[str, tuple] = "uniform") -> Method:
    """Annealing-KD's two fine-tuning stages.

    Args:
      max_t: τ_max, the number of annealing phases (Φ = k/τ_max in phase k).
      mse_weight: weight of the annealed MSE (stage "annealing").
      hard_weight: weight of the hard-label CE (stage "hard").
      hard_stage: keep the hard-label stage.
      steps, learning_rates: per-stage overrides keyed by stage name ("annealing", "hard").
    """
    what = "annealing_kd"
    max_t = check_max_t(max_t, f"{what}: max_t")
    stages = [Stage("annealing", (Term.make("annealed_logit_mse", "logits", name="annealed_mse",
                                            weight=check_weight(mse_weight, f"{what}: mse_weight"), max_t=max_t),))]
    if hard_stage:
        stages.append(Stage("hard", (hard_label_term(check_weight(hard_weight, f"{what}: hard_weight")),)))
    return Method(name=what, stages=stage_overrides(stages, what, steps, learning_rates),
                  description=f"Annealing-KD: MSE to Φ·z_T (τ_max={max_t})" + (" -> hard CE" if hard_stage else ""),
                  student_init=check_student_init(student_init, f"{what}: student_init"))
