"""TinyBERT (Jiao et al., 2020): two-stage transformer distillation.

1. **general** — on a general corpus (`data="corpus"`) with the pre-trained teacher: intermediate
   layers only, `Σ_m MSE(H_S W, H_T)` over the uniformly matched hidden states *including the
   embedding output* (pair (0, 0)) plus `Σ_m MSE(A_S, A_T)` over pre-softmax attention scores.
2. **task_intermediate** — the same terms on task data (`data="task"`) with the fine-tuned teacher.
3. **task_prediction** — soft cross-entropy `−Σ p log q` on the task logits at T = 1, without `T²`.

One learned projection `W` (student width → teacher width) serves every hidden-state pair, as the
reference code's single `fit_dense`; it is always learned (`projection=True`) even when widths agree,
as in TinyBERT and GKD. Task-data augmentation is a data concern and is not part of the recipe.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from kdjax.methods.base import Method, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_student_init, check_temperature, check_weight, keep_nonzero,
                              stage_overrides)


def intermediate_terms(hidden_weight: Schedule = 1.0, attention_weight: Schedule = 1.0,
                       layers: Union[str, tuple] = "uniform", projection: Optional[bool] = True) -> tuple[Term, ...]:
    """TinyBERT's intermediate-layer terms: hidden-state (with embeddings) and attention-score MSE."""
    return keep_nonzero(
            Term.make("hidden_mse", "hidden_states", weight=hidden_weight, layers=layers, projection=projection,
                      name="hidden"),
            Term.make("attention_score_mse", "attention_scores", weight=attention_weight, layers=layers,
                      name="attention"),
            what="tinybert intermediate terms")


@register("tinybert", "TinyBERT: general (hidden+emb MSE, attention-score MSE) -> task intermediate -> task soft CE")
def tinybert(*, general: bool = True, layers: Union[str, tuple] = "uniform", hidden_weight: Schedule = 1.0,
             attention_weight: Schedule = 1.0, prediction_temperature: Schedule = 1.0, projection: Optional[bool] = True,
             general_data: str = "corpus", task_data: str = "task", general_teacher: Optional[str] = None,
             task_teacher: Optional[str] = None, task_head: Optional[str] = None,
             steps: Optional[Mapping[str, int]] = None, learning_rates: Optional[Mapping[str, float]] = None,
             student_init: Union[str, tuple] = "uniform") -> Method:
    """TinyBERT's general + task distillation.

    Args:
      general: keep the general-distillation stage; `False` starts from an already distilled student.
      layers: layer matching for both intermediate terms (the hidden terms use the hidden index space,
        where "uniform" includes the embeddings, the attention terms the attention space).
      hidden_weight, attention_weight: weights of the two intermediate terms.
      prediction_temperature: T of the prediction-layer soft cross-entropy (no T² factor).
      projection: `True` always learns W (TinyBERT); `None` only when widths differ.
      general_data, task_data: `config.data` keys of the corpus and the task data.
      general_teacher, task_teacher: `config.teachers` keys of the pre-trained and fine-tuned teachers
        (e.g. "pretrained" / "finetuned"); None uses every configured teacher.
      task_head: student head for the task stages (e.g. "classification"); None keeps the configured one.
      steps, learning_rates: per-stage overrides, keyed by stage name.
    """
    what = "tinybert"
    layers = check_layers(layers, f"{what}: layers")
    inter = intermediate_terms(check_weight(hidden_weight, f"{what}: hidden_weight"),
                               check_weight(attention_weight, f"{what}: attention_weight"), layers, projection)
    prediction = (Term.make("soft_cross_entropy", "logits", name="prediction", scale_by_t2=False,
                            temperature=check_temperature(prediction_temperature, f"{what}: prediction_temperature")),)
    stages = []
    if general:
        stages.append(Stage("general", inter, data=general_data, teacher=general_teacher))
    stages.append(Stage("task_intermediate", inter, data=task_data, teacher=task_teacher, student_head=task_head))
    stages.append(Stage("task_prediction", prediction, data=task_data, teacher=task_teacher, student_head=task_head))
    return Method(name="tinybert", stages=stage_overrides(stages, what, steps, learning_rates),
                  description=("TinyBERT: " + ("general -> " if general else "")
                               + "task intermediate (hidden/emb + attention-score MSE) -> task soft CE "
                               f"(T={prediction_temperature})"),
                  student_init=check_student_init(student_init, f"{what}: student_init"))
