"""ALP-KD (Passban et al., "ALP-KD: Attention-Based Layer Projection for Knowledge Distillation", AAAI
2021): every student layer learns from an attention-weighted combination of *all* teacher layers,
instead of a fixed skip map.

With s_i the [CLS] state of student layer i = 1..L_S and t_j that of teacher layer j = 1..L_T
(GKD spec §6; the final layer is each model's last output):

    α_ij = softmax_j(⟨s_i, t_j⟩)        (unscaled dot product, per example)
    c_i  = Σ_j α_ij t_j
    L_ALP = Σ_i MSE(s_i, c_i)           (MSE: mean over batch and dimensions)

The gradient also flows through α into the student; the teacher is frozen. Total (GKD log):
L = 1·L_ALP + 0.7·CE_{T=20}(z_S, z_T) + 0.1·CE(y, z_S), with the soft cross-entropy −Σ p_T log q_T and
no T² factor. The log passes `--alp_kd_lambda=0.2`, but the code never reads it, so the ALP weight is
1 (`alp_weight`). The student starts from the teacher's first L_S blocks (`--student_truncate_tn=0`:
`student_init="first"`).

Widths: the paper and the reference code compare equal widths and have no trainable parameters. When
the student is narrower, `projection=None` (default) learns a student→teacher width projection
W (an engine width-projection module `proj/alp`); `projection=False` requires equal widths.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import all_layers, knowledge
from kdjax.methods.base import Method, Schedule, Stage, Term, register
from kdjax.methods.kd import check_student_init, check_temperature, check_weight, hard_label_term, keep_nonzero


@knowledge("alp_kd", sources=("hidden_states",), taps=all_layers, projectable=True)
def alp_kd_loss(ctx, term):
    """Σ_i MSE(s_i, Σ_j softmax_j(⟨s_i, t_j⟩) t_j) over [CLS] states of layers 1..L_S and 1..L_T."""
    s = jnp.stack([ctx.projection(term, ctx.student_at("hidden_states", i)[:, 0].astype(jnp.float32))
                   for i in range(1, ctx.student.num_layers + 1)])                   # [Ls, B, D]
    t = jnp.stack([ctx.teacher_at("hidden_states", j)[:, 0].astype(jnp.float32)
                   for j in range(1, ctx.teacher.num_layers + 1)])                   # [Lt, B, D]
    alpha = jax.nn.softmax(jnp.einsum("ibd,jbd->bij", s, t), axis=-1)
    context = jnp.einsum("bij,jbd->ibd", alpha, t)
    per_layer = jnp.mean(jnp.square(s - context), axis=(1, 2))
    loss = per_layer.sum()
    one = jnp.ones((), jnp.float32)
    metrics = {term.name: (loss, one)}
    # Where each student layer looks: the attention-weighted mean teacher layer index.
    where = jnp.einsum("bij,j->bi", alpha, jnp.arange(1, t.shape[0] + 1, dtype=jnp.float32)).mean(0)
    for i in range(s.shape[0]):
        metrics[f"{term.name}/mean_teacher_layer{i + 1}"] = (where[i], one)
    return loss, metrics


@register("alp_kd", "ALP-KD: Σ_i MSE(s_i, attention over all teacher [CLS] layers) + 0.7 soft CE (T=20) + 0.1 hard")
def alp_kd(*, alp_weight: Schedule = 1.0, soft_weight: Schedule = 0.7, hard_weight: Schedule = 0.1,
           temperature: Schedule = 20.0, projection: Optional[bool] = None,
           student_init: Union[str, tuple] = "first") -> Method:
    """ALP-KD fine-tuning.

    Args:
      alp_weight: weight of the ALP term (1: the log's unused `alp_kd_lambda` does not apply).
      soft_weight, hard_weight: weights of the soft CE (T, no T²) and of the hard CE.
      temperature: T of the soft cross-entropy.
      projection: None learns W only when widths differ; False requires equal widths; True always.
      student_init: "first" (the teacher's first L_S blocks, as the log), or any `kdjax.students` init.
    """
    what = "alp_kd"
    terms = keep_nonzero(
        Term.make("alp_kd", "hidden_states", weight=check_weight(alp_weight, f"{what}: alp_weight"), name="alp",
                  projection=projection),
        Term.make("soft_cross_entropy", "logits", weight=check_weight(soft_weight, f"{what}: soft_weight"),
                  name="soft_ce", temperature=check_temperature(temperature, f"{what}: temperature"),
                  scale_by_t2=False),
        hard_label_term(check_weight(hard_weight, f"{what}: hard_weight")),
        what=what)
    return Method(name=what, stages=(Stage("distill", terms),),
                  description=f"ALP-KD: attention over all teacher layers + soft CE (T={temperature}) + hard CE",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
