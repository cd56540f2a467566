"""PD — Pre-trained Distillation (Turc, Chang, Lee, Toutanova, "Well-Read Students Learn Better: On the
Importance of Pre-training Compact Models", arXiv 2019).

The compact student is first pre-trained on unlabeled text with the masked-LM objective, with no
teacher at all, and only then learns the task from the teacher's soft predictions:

1. **pretrain** — on `config.data.corpus` (`pretrain_data`) with an MLM head (`pretrain_head`):
   L = CE(y_masked, z_S) over the masked positions. Masking is BERT's: each maskable (non-special,
   non-pad) token is chosen with probability `mlm_probability` (0.15), then 80% become [MASK], 10% a
   random id, 10% stay. The masking is a data hook, so its draw is a function of (seed, stage, step)
   and a resumed run masks what the uninterrupted run masked. The teacher's outputs are never read in
   this stage (XLA removes its forward from the compiled step).
2. **distill** — on task data (`task_data`, default `config.data.train`) with the task head:
   L = soft_weight · CE_T(z_S, z_T) + hard_weight · CE(y, z_S), where CE_T = −Σ p_T log q_T at T = 1
   without a T² factor (GKD spec §1: `--distill_ft_soft --distill_temperature=1`, soft labels only,
   hard_weight 0). The paper also distills with soft labels only.

The paper's pre-training objective is BERT's MLM; GKD's reference pre-trains with GLM's blank
infilling (a different model family), which an encoder student here replaces by MLM. `pretrain=False`
keeps only the distillation stage (a student already pre-trained elsewhere, e.g. loaded with
`config.student.init`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np

from kdjax.distill.hooks import DataHook
from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_student_init, check_temperature, check_weight, hard_label_term, keep_nonzero,
                              stage_overrides)

LABELS = "mlm_labels"


class MaskTokens(DataHook):
    """BERT masking of `input_ids` on the host; the targets go to `batch["mlm_labels"]` (−100 elsewhere)."""

    def __init__(self, probability: float = 0.15):
        self.probability = float(probability)

    def __call__(self, run, state, batch, rng, *, stage, step):
        tok = run.student.tokenizer or next(iter(run.teachers.values()))[0].tokenizer
        if tok is None or tok.mask_token_id is None:
            raise MethodError("pd: MLM pre-training needs a tokenizer with a mask token; give the teacher or the "
                              "student a BERT-style tokenizer, or use pd with pretrain=False")
        return mask_tokens(batch, rng, probability=self.probability, mask_id=int(tok.mask_token_id),
                           vocab_size=int(run.student.config.vocab_size), special_ids=tok.all_special_ids)


def mask_tokens(batch, rng: np.random.Generator, *, probability: float, mask_id: int, vocab_size: int,
                special_ids) -> dict:
    """80% [MASK] / 10% random / 10% kept of the tokens chosen with `probability` among maskable ones."""
    ids = np.array(batch["input_ids"])
    attention = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    maskable = np.isin(ids, np.asarray(list(special_ids)), invert=True) & (attention == 1)
    chosen = (rng.random(ids.shape) < probability) & maskable
    roll = rng.random(ids.shape)
    random_ids = rng.integers(0, vocab_size, ids.shape)
    out = dict(batch)
    out[LABELS] = np.where(chosen, ids, -100).astype(np.int32)
    ids = np.where(chosen & (roll < 0.8), mask_id, ids)
    ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
    out["input_ids"] = ids.astype(np.int32)
    return out


@knowledge("masked_lm", sources=("none",), fn=divergences_lib.cross_entropy)
def masked_lm(ctx, term):
    """CE(y, z_S) over the positions the data hook masked (the student alone; no teacher)."""
    if LABELS not in ctx.batch:
        raise KnowledgeError(f"term {term.name!r} reads batch[{LABELS!r}], which the stage's MaskTokens data hook "
                             "writes; run it in a stage with data_hook=MaskTokens()")
    logits = ctx.s_out.logits
    if logits is None or logits.ndim != 3:
        raise KnowledgeError(f"term {term.name!r}: masked-LM pre-training needs token logits; give the stage an "
                             "LM head (student_head='mlm')")
    return divergences_lib.cross_entropy(logits, ctx.batch[LABELS], ctx.mask(term), name=term.name)


@register("pd", "PD: teacher-free MLM pre-training of the student, then soft CE (T=1) on the teacher's predictions")
def pd(*, pretrain: bool = True, mlm_probability: float = 0.15, temperature: Schedule = 1.0,
       soft_weight: Schedule = 1.0, hard_weight: Schedule = 0.0, pretrain_data: str = "corpus",
       task_data: str = "train", pretrain_head: str = "mlm", task_head: Optional[str] = None,
       steps: Optional[Mapping[str, int]] = None, learning_rates: Optional[Mapping[str, float]] = None,
       student_init: Union[str, tuple] = "uniform") -> Method:
    """Pre-trained Distillation.

    Args:
      pretrain: run the teacher-free MLM stage first (False: distillation only).
      mlm_probability: share of maskable tokens chosen for the MLM loss (0.15).
      temperature: T of the soft cross-entropy (1; no T² factor).
      soft_weight, hard_weight: weights of the soft CE and of the gold-label CE (1 and 0, as GKD's log).
      pretrain_data, task_data: `config.data` keys of the corpus and of the task data.
      pretrain_head: the student's head while pre-training ("mlm").
      task_head: the student's head while distilling (None: the configured one, e.g. classification).
      steps, learning_rates: per-stage overrides keyed by "pretrain" / "distill".
      student_init: `kdjax.students` initialization ("random" for a student pre-trained from scratch, as
        the paper; the default copies teacher layers, a cheaper start).
    """
    what = "pd"
    if not isinstance(mlm_probability, (int, float)) or not 0 < mlm_probability < 1:
        raise MethodError(f"{what}: mlm_probability must be in (0, 1), got {mlm_probability!r}")
    distill = keep_nonzero(
        Term.make("soft_cross_entropy", "logits", weight=check_weight(soft_weight, f"{what}: soft_weight"),
                  name="soft_ce", temperature=check_temperature(temperature, f"{what}: temperature"),
                  scale_by_t2=False),
        hard_label_term(check_weight(hard_weight, f"{what}: hard_weight")),
        what=what)
    stages = []
    if pretrain:
        stages.append(Stage("pretrain", (Term.make("masked_lm", "none", name="mlm"),), data=pretrain_data,
                            student_head=pretrain_head, data_hook=MaskTokens(mlm_probability)))
    stages.append(Stage("distill", distill, data=task_data, student_head=task_head))
    return Method(name=what, stages=stage_overrides(stages, what, steps, learning_rates),
                  description=("PD: " + ("MLM pre-training (no teacher) -> " if pretrain else "")
                               + f"soft CE (T={temperature})"),
                  student_init=check_student_init(student_init, f"{what}: student_init"))
