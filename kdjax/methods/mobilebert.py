"""MobileBERT (Sun et al., 2020): progressive knowledge transfer, then pre-training distillation.

The student (a bottlenecked BERT of the teacher's depth) is trained one layer at a time: stage `l`
trains only student layer `l` (`train_scope="progressive:<l>"`, 0-based; the layers below are frozen)
on that layer's

* feature-map transfer: `MSE(H_S, H_T)` of the layer outputs (a projection is learned only when the
  widths differ; MobileBERT's bottlenecks make them equal), and
* attention transfer: per-head `KL(A_T ‖ A_S)` of the attention distributions (equal head counts).

A final stage trains every parameter with MobileBERT's pre-training distillation loss
`α · CE_MLM + (1 − α) · KL(p ‖ q)` at T = 1 on the masked positions, α = 0.5 (GKD's
`--mobilebert_kd_w=0.5 --distill_pt_hard`). The NSP term of the paper has no counterpart here.

The student depth `num_layers` (24 in the paper) sets the number of stages; when the teacher is deeper,
give `teacher_layers` and student layer `l` learns from uniformly matched teacher layers. The paper
trains the intermediate stages with a smaller learning rate (GKD: 0.1×); pass `progressive_learning_rate`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from kdjax.matching import MatchingError, layer_pairs
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_fraction, check_positive_int, check_positions, check_student_init, check_temperature,
                              check_weight, complement, hard_label_term, keep_nonzero, logit_kd_term, stage_overrides)


@register("mobilebert", "MobileBERT: progressive per-layer feature-map MSE + attention KL, then MLM + logit KD")
def mobilebert(*, num_layers: int = 24, teacher_layers: Optional[int] = None, feature_weight: Schedule = 1.0,
               attention_weight: Schedule = 1.0, alpha: Schedule = 0.5, temperature: Schedule = 1.0,
               kd_positions: str = "labeled", progressive_learning_rate: Optional[float] = None,
               steps: Optional[Mapping[str, int]] = None, learning_rates: Optional[Mapping[str, float]] = None,
               student_init: Union[str, tuple] = "random") -> Method:
    """MobileBERT's progressive knowledge transfer.

    Args:
      num_layers: student depth; one progressive stage per student layer.
      teacher_layers: teacher depth when it differs from the student's (must be a multiple of it).
      feature_weight, attention_weight: weights of the per-layer feature-map and attention terms.
      alpha: weight of the hard MLM loss in the final stage; the logit KD gets 1 − α.
      temperature: T of the final logit KD.
      kd_positions: `"labeled"` (masked tokens, as MobileBERT's MLM KD) or `"all"` valid tokens.
      progressive_learning_rate: learning rate of the per-layer stages (None: the configured one).
      steps, learning_rates: per-stage overrides keyed by stage name (`progressive_<l>`, `final`).
      student_init: `"random"`, since MobileBERT's bottlenecked student shares no shapes with its teacher.
    """
    what = "mobilebert"
    num_layers = check_positive_int(num_layers, f"{what}: num_layers")
    teacher_layers = check_positive_int(teacher_layers, f"{what}: teacher_layers", allow_none=True) or num_layers
    try:
        hidden = layer_pairs("uniform", num_layers, teacher_layers, "hidden")
        attention = layer_pairs("uniform", num_layers, teacher_layers, "attention")
    except MatchingError as e:
        raise MethodError(f"{what}: {e}") from None
    feature_weight = check_weight(feature_weight, f"{what}: feature_weight")
    attention_weight = check_weight(attention_weight, f"{what}: attention_weight")
    if progressive_learning_rate is not None and not (isinstance(progressive_learning_rate, (int, float))
                                                      and progressive_learning_rate > 0):
        raise MethodError(f"{what}: progressive_learning_rate must be > 0, got {progressive_learning_rate!r}")
    stages = []
    for layer in range(num_layers):
        # Student layer `layer` (0-based) is hidden index layer + 1 and attention index `layer`.
        terms = keep_nonzero(
                Term.make("hidden_mse", "hidden_states", weight=feature_weight, layers=(hidden[layer + 1],),
                          name="feature_map"),
                Term.make("attention_kl", "attention_scores", weight=attention_weight, layers=(attention[layer],),
                          name="attention"),
                what=f"{what} stage progressive_{layer}")
        stages.append(Stage(f"progressive_{layer}", terms, learning_rate=progressive_learning_rate,
                            train_scope=f"progressive:{layer}"))
    alpha = check_fraction(alpha, f"{what}: alpha")
    positions = check_positions(kd_positions, f"{what}: kd_positions")
    final = keep_nonzero(hard_label_term(alpha, name="mlm", positions="labeled"),
                         logit_kd_term(complement(alpha), check_temperature(temperature, f"{what}: temperature"),
                                       positions=positions),
                         what=f"{what} stage final")
    stages.append(Stage("final", final))
    return Method(name="mobilebert", stages=stage_overrides(stages, what, steps, learning_rates),
                  description=(f"MobileBERT: {num_layers} progressive stages (feature-map MSE + attention KL), "
                               f"then {alpha}·MLM + {complement(alpha)}·KD"),
                  student_init=check_student_init(student_init, f"{what}: student_init"))
