"""DistilBERT (Sanh et al., 2019): a triple loss during masked-LM pre-training.

    L = 5.0 · T² · KL(p_T ‖ q_T) + 2.0 · CE_MLM + 1.0 · (1 − cos(h_S, h_T)),   T = 2

The weights and T are those of the reference training script (`alpha_ce=5.0, alpha_mlm=2.0,
alpha_cos=1.0, temperature=2.0`), also used by GKD's DistilBERT baseline. As in both references the KL
is taken at the masked (labeled) positions only; the cosine term aligns the last hidden states of all
valid tokens. The student copies every other teacher layer (`(0, 2, 4, 7, 9, 11)` for 6 of 12), which
only fits a 12-layer teacher: pass `student_init="uniform"` (or your own tuple) for other depths.
"""

from __future__ import annotations

from typing import Union

from kdjax.methods.base import Method, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_positions, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero, logit_kd_term)

DISTILBERT_INIT = (0, 2, 4, 7, 9, 11)


@register("distilbert", "DistilBERT: 5·T²·KL (T=2) + 2·MLM CE + 1·cosine on last hidden states")
def distilbert(*, temperature: Schedule = 2.0, alpha_ce: Schedule = 5.0, alpha_mlm: Schedule = 2.0,
               alpha_cos: Schedule = 1.0, kl_positions: str = "labeled", cos_layers: Union[str, tuple] = "final",
               student_init: Union[str, tuple] = DISTILBERT_INIT) -> Method:
    """DistilBERT's pre-training distillation.

    Args:
      temperature: T of the KL term (multiplied by T²).
      alpha_ce, alpha_mlm, alpha_cos: weights of the KL, the hard MLM cross-entropy and the cosine term;
        a zero weight drops the term.
      kl_positions: `"labeled"` (MLM-masked tokens, as in the reference code) or `"all"` valid tokens.
      cos_layers: hidden-state pairs for the cosine term (the last layers by default).
      student_init: teacher layers the student copies (default: DistilBERT's alternate layers).
    """
    what = "distilbert"
    temperature = check_temperature(temperature, f"{what}: temperature")
    terms = keep_nonzero(
            logit_kd_term(check_weight(alpha_ce, f"{what}: alpha_ce"), temperature, kind="forward_kl",
                          positions=check_positions(kl_positions, f"{what}: kl_positions")),
            hard_label_term(check_weight(alpha_mlm, f"{what}: alpha_mlm"), name="mlm", positions="labeled"),
            Term.make("cosine", "hidden_states", weight=check_weight(alpha_cos, f"{what}: alpha_cos"),
                      layers=check_layers(cos_layers, f"{what}: cos_layers"), name="cosine"),
            what=what)
    return Method(name="distilbert", stages=(Stage("distill", terms),),
                  description=f"DistilBERT: {alpha_ce}·T²·KL (T={temperature}) + {alpha_mlm}·MLM + {alpha_cos}·cosine",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
