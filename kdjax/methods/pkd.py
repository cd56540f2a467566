"""Patient knowledge distillation (Sun et al., 2019), task-specific.

    L = (1 − α) · CE(y, q) + α · T² · KL(p_T ‖ q_T) + β · Σ_layers ‖ĥ_S − ĥ_T‖²

where ĥ are the L2-normalized [CLS] vectors of matched *intermediate* layers (the last one is left
to the logit term). PKD-skip matches every k-th teacher layer (a 6-layer student of a 12-layer teacher
learns from teacher layers 2, 4, 6, 8, 10); PKD-last matches the top layers below the last (7..11).
Defaults α = 0.5, β = 100, T = 10 follow GKD's PKD baseline (`--pkd_alpha=0.5 --pkd_beta=100
--distill_temperature=10 --distill_ft_soft_kl --pkd_normalized_patience --pkd_only_cls --pkd_wo_final`),
and the student starts from the teacher's first layers (`--student_truncate_tn=0`; docs/methods.md).
"""

from __future__ import annotations

from typing import Union

from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_fraction, check_layers, check_student_init, check_temperature, check_weight,
                              complement, hard_label_term, keep_nonzero, logit_kd_term)

# The paper's two variants, as `kdjax.matching` strategies in the hidden-state index space.
PKD_STRATEGIES = {"skip": "skip", "last": "pkd_last"}


@register("pkd", "Patient KD: (1-α)·CE + α·T²·KL (T=10) + β·[CLS] patience loss; α=0.5, β=100, skip|last")
def pkd(*, strategy: Union[str, tuple] = "skip", alpha: Schedule = 0.5, beta: Schedule = 100.0,
        temperature: Schedule = 10.0, student_init: Union[str, tuple] = "first") -> Method:
    """PKD-skip or PKD-last.

    Args:
      strategy: `"skip"`, `"last"`, or explicit `(student, teacher)` pairs in the hidden index space
        (0 = embeddings).
      alpha: weight of the soft term; the hard term gets 1 − α.
      beta: weight of the patience term on [CLS].
      temperature: T of the soft term (multiplied by T²).
      student_init: `"first"` copies the teacher's bottom layers, as PKD does.
    """
    what = "pkd"
    if isinstance(strategy, str):
        if strategy not in PKD_STRATEGIES:
            raise MethodError(f"{what}: strategy {strategy!r} is not 'skip' or 'last' (or explicit layer pairs)")
        layers = PKD_STRATEGIES[strategy]
    else:
        layers = check_layers(strategy, f"{what}: strategy")
    alpha = check_fraction(alpha, f"{what}: alpha")
    temperature = check_temperature(temperature, f"{what}: temperature")
    terms = keep_nonzero(
            hard_label_term(complement(alpha)),
            logit_kd_term(alpha, temperature, kind="forward_kl"),
            Term.make("pkd", "cls", weight=check_weight(beta, f"{what}: beta"), layers=layers, name="patience"),
            what=what)
    label = strategy if isinstance(strategy, str) else "custom"
    return Method(name="pkd", stages=(Stage("distill", terms),),
                  description=f"PKD-{label}: {complement(alpha)}·CE + {alpha}·T²·KL (T={temperature}) + {beta}·PT",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
