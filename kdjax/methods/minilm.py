"""MiniLM (Wang et al., 2020) and MiniLMv2 (Wang et al., 2021): last-layer self-attention distillation.

**MiniLM**: on the last layer of both models, per head,
`KL(softmax(A_T) ‖ softmax(A_S))` over the attention distributions plus the value relation
`KL(VR_T ‖ VR_S)`, `VR = softmax(V Vᵀ/√d_k)`. Both need equal head counts; the widths may differ, so
no projection is learned. (GKD feeds probabilities into `kl_div` and softmaxes twice; kdjax gives the
term pre-softmax scores, as the paper intends.)

**MiniLMv2**: Q-Q, K-K and V-V relations with heads concatenated and re-split into `A_r` relation heads
(48 for base-size teachers, 64 for large), so head counts need not match. The student's last layer
learns from the teacher's last layer (base teachers) or an upper-middle one (large teachers, e.g.
layer 21 of 24).
"""

from __future__ import annotations

from typing import Optional, Union

from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_positive_int, check_student_init, check_weight, keep_nonzero)


@register("minilm", "MiniLM: last-layer attention KL + value-relation KL")
def minilm(*, attention_weight: Schedule = 1.0, value_weight: Schedule = 1.0, layers: Union[str, tuple] = "final",
           num_heads: Optional[int] = None, student_init: Union[str, tuple] = "uniform") -> Method:
    """MiniLM's deep self-attention distillation.

    Args:
      attention_weight, value_weight: weights of the attention-distribution and value-relation terms.
      layers: attention-space layer pairs (the last layers by default).
      num_heads: relation heads of the value term; None uses the student's head count.
    """
    what = "minilm"
    layers = check_layers(layers, f"{what}: layers")
    value_args = {} if num_heads is None else {"num_heads": check_positive_int(num_heads, f"{what}: num_heads")}
    terms = keep_nonzero(
            Term.make("attention_kl", "attention_scores", weight=check_weight(attention_weight, f"{what}: attention_weight"),
                      layers=layers, name="attention"),
            Term.make("value_relation_kl", "value", weight=check_weight(value_weight, f"{what}: value_weight"),
                      layers=layers, name="value_relation", **value_args),
            what=what)
    return Method(name="minilm", stages=(Stage("distill", terms),),
                  description="MiniLM: attention KL + value relation at the last layer",
                  student_init=check_student_init(student_init, f"{what}: student_init"))


@register("minilmv2", "MiniLMv2: Q-Q/K-K/V-V relation KL with 48 relation heads, last student layer")
def minilmv2(*, num_relation_heads: int = 48, teacher_layer: Optional[int] = None,
             student_layers: Optional[int] = None, teacher_layers: Optional[int] = None, weight: Schedule = 1.0,
             student_init: Union[str, tuple] = "uniform") -> Method:
    """MiniLMv2's multi-head self-attention relation distillation.

    Args:
      num_relation_heads: A_r, the number of relation heads (48 for base teachers, 64 for large ones);
        both models' widths must be divisible by it.
      teacher_layer: the teacher layer to learn from, **1-based** as in the paper and GKD's
        `--minilmv2_teacher_layer` (e.g. 21 for a 24-layer teacher). None: the teacher's last layer.
        A recipe does not know model depths, so a given `teacher_layer` needs `student_layers` (the
        student depth) to name the student's last layer; `teacher_layers`, if given, is checked against.
      student_layers, teacher_layers: model depths, used only with `teacher_layer`.
      weight: weight of the summed Q/K/V relation term.
    """
    what = "minilmv2"
    heads = check_positive_int(num_relation_heads, f"{what}: num_relation_heads")
    if teacher_layer is None:
        layers: Union[str, tuple] = "final"
        where = "last layers"
    else:
        teacher_layer = check_positive_int(teacher_layer, f"{what}: teacher_layer")
        if student_layers is None:
            raise MethodError(f"{what}: teacher_layer={teacher_layer} needs student_layers=<student depth> to pair "
                              "it with the student's last layer (or leave teacher_layer=None for the last layers)")
        student_layers = check_positive_int(student_layers, f"{what}: student_layers")
        teacher_layers = check_positive_int(teacher_layers, f"{what}: teacher_layers", allow_none=True)
        if teacher_layers is not None and teacher_layer > teacher_layers:
            raise MethodError(f"{what}: teacher_layer={teacher_layer} (1-based) but the teacher has only "
                              f"{teacher_layers} layers")
        # Attention-space indices are 0-based: layer n is index n - 1.
        layers = ((student_layers - 1, teacher_layer - 1),)
        where = f"student layer {student_layers} <- teacher layer {teacher_layer}"
    terms = keep_nonzero(Term.make("qkv_relation_kl", "qkv", weight=check_weight(weight, f"{what}: weight"),
                                   layers=layers, name="qkv_relation", num_relation_heads=heads),
                         what=what)
    return Method(name="minilmv2", stages=(Stage("distill", terms),),
                  description=f"MiniLMv2: Q/K/V relations, {heads} relation heads, {where}",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
