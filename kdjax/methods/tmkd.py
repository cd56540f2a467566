"""TMKD: two-stage multi-teacher KD by soft-target regression (GKD's "similar" TMKD).

Yang, Shou, Gong, Lin, Jiang, "Model Compression with Two-stage Multi-teacher Knowledge Distillation
for Web Question Answering System" (WSDM 2020). The student regresses the logits of K frozen teachers,
first on an unlabeled corpus, then on the task:

    pre-train:  L = mean_k MSE(z_S, z_T^k)                       (vocabulary logits, predicted positions)
    fine-tune:  L = mean_k [ MSE(z_S, z_T^k) + ρ_h · CE(y, z_S) ]  = mean_k MSE_k + ρ_h · CE

with ρ_h = 0.5 (GKD §13: `--distill_hard_rate=0.5`). Teachers are averaged with their config weights
(equal by default), which is the engine's default combination, so the recipe needs no stage loss.

Where this differs from the paper: the paper gives the student one output head per teacher (each
regressing its teacher) and its own weighting; GLMKD — and this recipe — use the student's one head and
plain averaging. The pre-training stage (`pretrain=True`, data `config.data.corpus`) needs LM teachers;
by default only the fine-tuning stage runs. The student is initialised from the first teacher.
"""

from __future__ import annotations

from kdjax.methods.base import Method, Stage, Term, register
from kdjax.methods.kd import check_positions, check_weight, hard_label_term, keep_nonzero


@register("tmkd", "TMKD: mean over teachers of logit MSE (+0.5·CE in fine-tuning); optional pre-training stage")
def tmkd(*, soft_weight=1.0, hard_weight=0.5, pretrain: bool = False, pretrain_data: str = "corpus",
         pretrain_positions: str = "labeled", student_init="uniform") -> Method:
    """Multi-teacher soft-target regression (GKD §13).

    Args:
      soft_weight: weight of each teacher's logit MSE (averaged over teachers).
      hard_weight: ρ_h of the hard-label CE in fine-tuning (0.5 in GKD).
      pretrain: add the multi-teacher pre-training stage (MSE only) on `pretrain_data`.
      pretrain_positions: positions of the pre-training MSE ("labeled" = GLM's loss mask, "all").
    """
    soft_weight = check_weight(soft_weight, "tmkd: soft_weight")
    hard_weight = check_weight(hard_weight, "tmkd: hard_weight")
    positions = check_positions(pretrain_positions, "tmkd: pretrain_positions")
    stages = []
    if pretrain:
        stages.append(Stage("pretrain", (Term.make("logit_mse", "logits", weight=soft_weight, name="mse",
                                                   positions=positions),), data=pretrain_data))
    stages.append(Stage("finetune", keep_nonzero(Term.make("logit_mse", "logits", weight=soft_weight, name="mse"),
                                                 hard_label_term(hard_weight), what="tmkd")))
    return Method("tmkd", tuple(stages), description="TMKD multi-teacher logit regression", student_init=student_init)
