"""TAKD: teacher → teacher assistant → student, as one run of two stages (GKD §17).

Mirzadeh, Farajtabar, Li, Levine, Matsukawa, Ghasemzadeh, "Improved Knowledge Distillation via Teacher
Assistant" (AAAI 2020). A large capacity gap is bridged by an intermediate-size teacher assistant (TA):

    stage "assistant":  the TA learns from the teacher   L = ρ_s · T² · KL(p_T^T ‖ q_T^TA) + ρ_h · CE(y, z_TA)
    stage "student":    the student learns from the TA    L = ρ_s · T² · KL(p_T^TA ‖ q_T^S) + ρ_h · CE(y, z_S)

Defaults are the logged GKD TA step: T = 10, KL with T², ρ_s = ρ_h = 1. The TA is a chain model
(`kdjax.methods.base.ChainModel`): derived from the teacher by layer selection (`assistant_init`,
default "uniform"; GKD truncates to the first layers, `assistant_init="first"`), with
`assistant_layers` layers (default: halfway between the teacher and the student, rounded up) and the
teacher's width unless `assistant_shape` says otherwise (e.g. `{"hidden_size": 256}`; a narrower TA
starts from a random initialization). The student is derived from the trained TA (`student_init`
picks its layers), as GKD's chain hands the TA's checkpoint to the next run; `student_from_assistant=
False` derives it from the teacher instead.

Where this differs from GKD: GKD runs the two steps as separate jobs and slices wider weights into
narrower ones (which misaligns its fused Q/K/V, see docs/methods.md); here both steps are one config
and a narrower model is initialised randomly.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from kdjax.methods.base import ChainModel, Method, MethodError, Stage, register
from kdjax.methods.kd import (check_kind, check_positive_int, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero, logit_kd_term, stage_overrides)

ASSISTANT = "assistant"


def kd_terms(soft_weight, hard_weight, temperature, kind="forward_kl", what="takd"):
    """ρ_s · T² · D(p_T ‖ q_T) + ρ_h · CE(y, q): the loss of each step of the chain."""
    return keep_nonzero(logit_kd_term(soft_weight, temperature, kind=kind), hard_label_term(hard_weight), what=what)


def assistant_model(what: str, layers, init, shape, name: str = ASSISTANT, derive_from=None) -> ChainModel:
    layers = check_positive_int(layers, f"{what}: assistant_layers", allow_none=True)
    init = check_student_init(init, f"{what}: assistant_init")
    shape = dict(shape or {})
    allowed = {"hidden_size", "num_heads", "num_kv_heads", "intermediate_size"}
    unknown = sorted(set(shape) - allowed)
    if unknown:
        raise MethodError(f"{what}: assistant_shape takes {', '.join(sorted(allowed))}; got {', '.join(unknown)}")
    return ChainModel.make(name, num_layers=layers, init=init, derive_from=derive_from, **shape)


@register("takd", "TAKD: teacher → assistant → student in one run; each step T²·KL_T=10 + CE")
def takd(*, temperature=10.0, soft_weight=1.0, hard_weight=1.0, kind: str = "forward_kl",
         assistant_layers: Optional[int] = None, assistant_init: Union[str, tuple] = "uniform",
         assistant_shape: Optional[Mapping[str, int]] = None, student_from_assistant: bool = True,
         student_init: Union[str, tuple] = "uniform", steps: Optional[Mapping[str, int]] = None,
         learning_rates: Optional[Mapping[str, float]] = None) -> Method:
    """Teacher-assistant KD (Mirzadeh et al., 2020; GKD §17).

    Args:
      temperature, soft_weight, hard_weight, kind: T, ρ_s, ρ_h and the divergence of both steps
        (10, 1, 1, forward KL with T² in GKD).
      assistant_layers: the TA's depth (None: halfway between teacher and student, rounded up).
      assistant_init: which teacher layers the TA copies ("uniform", "first" = GKD's truncation, a tuple).
      assistant_shape: the TA's width fields (hidden_size, num_heads, num_kv_heads, intermediate_size).
      student_from_assistant: derive the student from the trained TA (True) or from the teacher.
      student_init: which layers the student copies from the model it is derived from.
      steps, learning_rates: per-stage overrides, {"assistant": n, "student": m}.
    """
    what = "takd"
    temperature = check_temperature(temperature, f"{what}: temperature")
    terms = kd_terms(check_weight(soft_weight, f"{what}: soft_weight"),
                     check_weight(hard_weight, f"{what}: hard_weight"), temperature, check_kind(kind, f"{what}: kind"),
                     what)
    assistant = assistant_model(what, assistant_layers, assistant_init, assistant_shape)
    stages = (Stage("assistant", terms, trains=ASSISTANT), Stage("student", terms, teacher=ASSISTANT))
    return Method("takd", stage_overrides(stages, what, steps, learning_rates),
                  description=f"TAKD: teacher → assistant → student, T²·KL at T={temperature} + CE",
                  student_init=check_student_init(student_init, f"{what}: student_init"), models=(assistant,),
                  student_from=ASSISTANT if student_from_assistant else None)
