"""MLKD-BERT (Zhang et al., 2024): feature- and relation-level knowledge in two task stages.

1. **intermediate** (unweighted sum):
   * EMB — embedding relation `KL(R_T ‖ R_S)`, `R = softmax(E Eᵀ/√d)` per model, over tokens;
   * MHA — head-split relation on the attention *context* vectors: the teacher's heads are grouped
     into as many groups as the student has heads, `R = softmax(O_a O_aᵀ/√d_split)` per group, so the
     student may have fewer heads than the teacher (the point of the method);
   * FFN — `MSE(H_S W, H_T)` on the layer outputs, uniformly matched.
2. **prediction**: SS — a b×b softmax over [CLS] similarities within the batch, `KL(R_T ‖ R_S)`;
   SC — supervised contrastive loss on [CLS] (positives share a label; needs `batch["labels"]`);
   KD — `KL(softmax(z_T/τ) ‖ softmax(z_S/τ))` on the task logits.

Both stages run on the task data. Note on FFN pairs: the "uniform" hidden-state matching includes
the embedding output (pair (0, 0)); give `student_layers` and `teacher_layers` to match only the
transformer layers, as the paper does.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from kdjax.matching import MatchingError, layer_pairs
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_positive_int, check_student_init, check_temperature, check_weight,
                              keep_nonzero, logit_kd_term, stage_overrides)


@register("mlkd_bert", "MLKD-BERT: (EMB relation + head-split MHA relation + FFN MSE) -> (sample relation + SupCon + KD)")
def mlkd_bert(*, layers: Union[str, tuple] = "uniform", ffn_layers: Optional[Union[str, tuple]] = None,
              student_layers: Optional[int] = None, teacher_layers: Optional[int] = None,
              num_groups: Optional[int] = None, temperature: Schedule = 1.0, sample_temperature: Schedule = 1.0,
              contrastive_temperature: Schedule = 0.1, weights: Optional[Mapping[str, Schedule]] = None,
              data: str = "train", teacher: Optional[str] = None,
              steps: Optional[Mapping[str, int]] = None, learning_rates: Optional[Mapping[str, float]] = None,
              student_init: Union[str, tuple] = "uniform") -> Method:
    """MLKD-BERT's two-stage task distillation.

    Args:
      layers: attention-space matching of the MHA relation term.
      ffn_layers: hidden-space matching of the FFN term; None: "uniform", or — with `student_layers`
        and `teacher_layers` — the uniform pairs without the embedding pair.
      student_layers, teacher_layers: model depths, only to drop the embedding pair from the FFN term.
      num_groups: head groups of the MHA relation; None uses the student's head count.
      temperature: τ of the stage-2 KD term (× τ²).
      sample_temperature: temperature of the sample-similarity softmax.
      contrastive_temperature: temperature of the supervised contrastive loss.
      weights: optional per-term weights keyed by `emb`, `mha`, `ffn`, `ss`, `sc`, `kd` (default 1 each).
      data, teacher: `config.data` / `config.teachers` keys of both stages.
      steps, learning_rates: per-stage overrides keyed by `intermediate` / `prediction`.
    """
    what = "mlkd_bert"
    names = ("emb", "mha", "ffn", "ss", "sc", "kd")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise MethodError(f"{what}: unknown weight key(s) {', '.join(map(repr, unknown))}; known: {', '.join(names)}")
    w = {k: check_weight(weights.get(k, 1.0), f"{what}: weights[{k!r}]") for k in names}
    layers = check_layers(layers, f"{what}: layers")
    if ffn_layers is None:
        ffn_layers = "uniform"
        if student_layers is not None and teacher_layers is not None:
            try:
                pairs = layer_pairs("uniform", check_positive_int(student_layers, f"{what}: student_layers"),
                                    check_positive_int(teacher_layers, f"{what}: teacher_layers"), "hidden")
            except MatchingError as e:
                raise MethodError(f"{what}: {e}") from None
            ffn_layers = tuple(p for p in pairs if p != (0, 0))
    ffn_layers = check_layers(ffn_layers, f"{what}: ffn_layers")
    group_args = {} if num_groups is None else {"num_groups": check_positive_int(num_groups, f"{what}: num_groups")}
    intermediate = keep_nonzero(
            Term.make("embedding_relation_kl", "embeddings", weight=w["emb"], name="emb_relation"),
            Term.make("head_split_relation_kl", "attention_context", weight=w["mha"], layers=layers,
                      name="mha_relation", **group_args),
            Term.make("hidden_mse", "hidden_states", weight=w["ffn"], layers=ffn_layers, name="ffn"),
            what=f"{what} stage intermediate")
    prediction = keep_nonzero(
            Term.make("sample_relation_kl", "cls", weight=w["ss"], layers="final", name="sample_relation",
                      temperature=check_temperature(sample_temperature, f"{what}: sample_temperature")),
            Term.make("supervised_contrastive", "cls", weight=w["sc"], layers="final", name="supcon",
                      temperature=check_temperature(contrastive_temperature, f"{what}: contrastive_temperature")),
            logit_kd_term(w["kd"], check_temperature(temperature, f"{what}: temperature")),
            what=f"{what} stage prediction")
    stages = (Stage("intermediate", intermediate, data=data, teacher=teacher),
              Stage("prediction", prediction, data=data, teacher=teacher))
    return Method(name="mlkd_bert", stages=stage_overrides(stages, what, steps, learning_rates),
                  description="MLKD-BERT: EMB + MHA-split + FFN -> SS + SC + KD",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
