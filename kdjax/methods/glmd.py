"""GLMD (Tan et al., 2023): distillation without intermediate layers or hard labels.

The only knowledge is the teacher's word prediction: a temperature-15 KL between the LM-head
distributions of teacher and student at **every valid position** (not only masked ones), no hard
labels and no layer matching, so teacher and student may differ in depth, width and heads.

1. **general** — on a corpus (`data="corpus"`) with the pre-trained teacher; the student starts from a
   random initialization (`student_init="random"`).
2. **task_kl** — the same KL on task inputs (`data="task"`) with the fine-tuned teacher
   (`teacher="finetuned"`).
3. **task_prediction** — soft cross-entropy `−Σ p log q` at T = 1 (no `T²`) on the *task logits*: in
   GLM's cloze formulation these are the LM head's scores of each class's verbalizer token at the
   [MASK] position, i.e. sample-level `[B, C]` logits (`kdjax.data.tasks` verbalizers).

Checked against GKD's implementation (`--student_model=logitsdistil --distill_temperature=15
--logitsdistil_mask_pad`): the word-prediction KL there is multiplied by `T²`, so it is here; stage 3
(`--distill_ft_soft`) is a plain soft cross-entropy without `T²`.

Vocabulary compression (GLMD-vc) is applied to the student's tokenizer, embeddings and LM head by
`kdjax.vocab` before training; the recipe only records the rate in its description.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import check_student_init, check_temperature, logit_kd_term, stage_overrides


@register("glmd", "GLMD: word-prediction KL only (T=15, all positions): corpus -> task (fine-tuned teacher) -> task soft CE")
def glmd(*, temperature: Schedule = 15.0, prediction_temperature: Schedule = 1.0, general: bool = True,
         corpus_data: str = "corpus", task_data: str = "task", general_teacher: Optional[str] = None,
         task_teacher: Optional[str] = "finetuned", vocab_compression: Optional[float] = None,
         steps: Optional[Mapping[str, int]] = None, learning_rates: Optional[Mapping[str, float]] = None,
         student_init: Union[str, tuple] = "random") -> Method:
    """GLMD's three stages.

    Args:
      temperature: T of the word-prediction KL (× T²).
      prediction_temperature: T of the stage-3 soft cross-entropy (no T²).
      general: keep the corpus stage; False starts from an already distilled student.
      corpus_data, task_data: `config.data` keys.
      general_teacher: `config.teachers` key of the pre-trained teacher for stage 1 (None: every teacher;
        set it, e.g. "pretrained", when the config also holds the fine-tuned one).
      task_teacher: `config.teachers` key of the fine-tuned teacher for stages 2 and 3.
      vocab_compression: GLMD-vc rate (0.5 in the paper), or None; see `kdjax.vocab`.
      steps, learning_rates: per-stage overrides keyed by stage name.
    """
    what = "glmd"
    if vocab_compression is not None and not (isinstance(vocab_compression, (int, float))
                                              and not isinstance(vocab_compression, bool)
                                              and 0 < vocab_compression <= 1):
        raise MethodError(f"{what}: vocab_compression must be a rate in (0, 1] (0.5 in the paper) or None, "
                          f"got {vocab_compression!r}")
    kl = (logit_kd_term(1.0, check_temperature(temperature, f"{what}: temperature"), kind="forward_kl",
                        name="word_kl", positions="all"),)
    prediction = (Term.make("soft_cross_entropy", "logits", name="prediction", scale_by_t2=False,
                            temperature=check_temperature(prediction_temperature, f"{what}: prediction_temperature")),)
    stages = []
    if general:
        stages.append(Stage("general", kl, data=corpus_data, teacher=general_teacher))
    stages.append(Stage("task_kl", kl, data=task_data, teacher=task_teacher))
    stages.append(Stage("task_prediction", prediction, data=task_data, teacher=task_teacher))
    vc = "" if vocab_compression is None else f"; vocabulary compression rate {vocab_compression} (kdjax.vocab)"
    return Method(name="glmd", stages=stage_overrides(stages, what, steps, learning_rates),
                  description=f"GLMD: word-prediction KL (T={temperature}, all positions), no hard labels{vc}",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
