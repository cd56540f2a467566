"""Universal-KD (Wu, Rezagholizadeh, Ghaddar, Haidar, Ghodsi, "Universal-KD: Attention-based
Output-Grounded Intermediate Layer Knowledge Distillation", EMNLP 2021).

Every student layer attends over all teacher layers after both are projected into one space, and the
student's projected layer matches the attended teacher mixture as a distribution. With x^S_i the
[CLS] state (or the mean over valid tokens, `pooling="mean"`) of student layer i = 1..L_S−1 and x^T_j
that of teacher layer j = 1..L_T−1 (GKD spec §9; `final_only=True` uses only the final layers):

    s_i = P^S_i x^S_i,   t_j = P^T_j x^T_j          (per-layer linear maps without bias, into u dims)
    α_ij = softmax_j ⟨s_i, t_j⟩,   c_i = Σ_j α_ij t_j
    L_inter = Σ_i KL(softmax(c_i) ‖ softmax(s_i))   (the u features as logits, T = 1; mean over the batch)

u = `size` (0: the student's width). The maps P^S (one per student layer) and P^T (one per teacher
layer, one set per teacher) are method modules, trained with the student; the gradient reaches the
student, both map sets and (through α and c) the teacher-side maps.

Total (GKD log, stage 1): L = 0.5·KL_{T=1}(z_S, z_T) + γ·L_inter with γ = 0.5, no hard label; the
student starts from the teacher's first L_S blocks (`student_init="first"`). The paper grounds the
projections through the output classifier; GKD's reference replaces that with generic linear maps,
which this recipe follows (a classifier-grounded map needs a classification head on both models).
`finetune_stage=True` appends GKD's stage 2, a hard-label-only fine-tune.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import KnowledgeError, all_layers, knowledge
from kdjax.methods.base import Method, MethodError, Module, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_student_init, check_temperature, check_weight, hard_label_term, keep_nonzero,
                              logit_kd_term)

STUDENT_PROJ = "universal_kd/student_proj"
TEACHER_PROJ = "universal_kd/teacher_proj"


def compared_layers(num_layers: int, final_only: bool) -> list[int]:
    """Hidden-state indices a model contributes: 1..L−1, or [L] with `final_only`."""
    return [num_layers] if final_only else list(range(1, num_layers))


def _pooled(read, layers, mask, pooling):
    h = jnp.stack([read("hidden_states", i) for i in layers]).astype(jnp.float32)       # [n, B, S, D]
    if pooling == "cls":
        return h[:, :, 0]
    m = mask.astype(jnp.float32)
    return jnp.einsum("nbsd,bs->nbd", h, m) / jnp.maximum(m.sum(1), 1.0)[None, :, None]


@knowledge("universal_kd", sources=("hidden_states",), taps=all_layers)
def universal_kd_loss(ctx, term):
    """Σ_i KL(softmax(c_i) ‖ softmax(s_i)) of projected student layers against attended teacher layers."""
    kw = term.kwargs
    s_layers = compared_layers(ctx.student.num_layers, kw["final_only"])
    t_layers = compared_layers(ctx.teacher.num_layers, kw["final_only"])
    if not s_layers or not t_layers:
        raise KnowledgeError(f"term {term.name!r}: Universal-KD compares intermediate layers 1..L-1, so both "
                             "models need at least 2 layers (or use final_only=True)")
    mask = ctx.mask(term)
    xs = _pooled(ctx.student_at, s_layers, mask, kw["pooling"])
    xt = _pooled(ctx.teacher_at, t_layers, mask, kw["pooling"])
    s = jnp.einsum("nbd,ndu->nbu", xs, ctx.modules[STUDENT_PROJ]["kernel"])
    t = jnp.einsum("nbd,ndu->nbu", xt, ctx.modules[TEACHER_PROJ][ctx.teacher_name]["kernel"])
    alpha = jax.nn.softmax(jnp.einsum("ibu,jbu->bij", s, t), axis=-1)
    c = jnp.einsum("bij,jbu->ibu", alpha, t)
    logp_c, logp_s = jax.nn.log_softmax(c, -1), jax.nn.log_softmax(s, -1)
    kl = jnp.sum(jnp.exp(logp_c) * (logp_c - logp_s), -1)                               # [n, B]
    loss = kl.sum(0).mean()
    one = jnp.ones((), jnp.float32)
    metrics = {term.name: (loss, one)}
    where = jnp.einsum("bij,j->bi", alpha, jnp.asarray(t_layers, jnp.float32)).mean(0)
    for k, i in enumerate(s_layers):
        metrics[f"{term.name}/mean_teacher_layer{i}"] = (where[k], one)
    return loss, metrics


def projection_modules(size: int, final_only: bool, learning_rate: Optional[float] = None):
    """P^S (`[n_S, d_S, u]`) and, per teacher, P^T (`[n_T, d_T, u]`), without biases."""

    def maps(key, n, d, u):
        return {"kernel": jax.random.normal(key, (n, d, u), jnp.float32) / jnp.sqrt(d)}

    def init_student(rng, student, teachers):
        u = size or student.hidden_size
        return maps(jax.random.fold_in(rng, 0x0C5), len(compared_layers(student.num_layers, final_only)),
                    student.hidden_size, u)

    def init_teacher(rng, student, teachers):
        u = size or student.hidden_size
        return {name: maps(jax.random.fold_in(jax.random.fold_in(rng, 0x0C7), n),
                           len(compared_layers(cfg.num_layers, final_only)), cfg.hidden_size, u)
                for n, (name, cfg) in enumerate(sorted(teachers.items()))}

    return (Module(STUDENT_PROJ, init_student, learning_rate=learning_rate),
            Module(TEACHER_PROJ, init_teacher, learning_rate=learning_rate))


@register("universal_kd", "Universal-KD: attention over projected teacher layers, KL per student layer (γ=0.5) "
                          "+ 0.5 KL (T=1)")
def universal_kd(*, gamma: Schedule = 0.5, kd_weight: Schedule = 0.5, temperature: Schedule = 1.0,
                 size: int = 0, pooling: str = "cls", final_only: bool = False, finetune_stage: bool = False,
                 projection_learning_rate: Optional[float] = None,
                 student_init: Union[str, tuple] = "first") -> Method:
    """Universal-KD (intermediate-layer variant).

    Args:
      gamma: weight γ of the layer-attention KL (0.5).
      kd_weight, temperature: the logit KL (T²·KL_T; 0.5 at T = 1).
      size: u, the width of the shared space (0: the student's hidden size).
      pooling: "cls" (token 0, as the paper and GKD) or "mean" over valid tokens (`--universal_kd_avg`).
      final_only: compare only the final layers (`--universal_kd_cg`).
      finetune_stage: append a hard-label-only stage (GKD's stage 2).
      projection_learning_rate: the maps' own peak rate (None: the stage's).
      student_init: "first" (the teacher's first L_S blocks, as GKD's log) or any `kdjax.students` init.
    """
    what = "universal_kd"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise MethodError(f"{what}: size must be an integer >= 0 (0: the student's width), got {size!r}")
    if pooling not in ("cls", "mean"):
        raise MethodError(f"{what}: pooling must be 'cls' or 'mean', got {pooling!r}")
    inter = Term.make("universal_kd", "hidden_states", weight=check_weight(gamma, f"{what}: gamma"),
                      name="universal_kd", pooling=pooling, final_only=bool(final_only))
    terms = keep_nonzero(logit_kd_term(check_weight(kd_weight, f"{what}: kd_weight"),
                                       check_temperature(temperature, f"{what}: temperature")), inter, what=what)
    modules = projection_modules(size, bool(final_only), projection_learning_rate) \
        if any(t.fn == "universal_kd" for t in terms) else ()
    stages = [Stage("distill", terms, modules=modules)]
    if finetune_stage:
        stages.append(Stage("finetune", (hard_label_term(1.0),)))
    return Method(name=what, stages=tuple(stages),
                  description=f"Universal-KD: layer attention KL (γ={gamma}) + KL (T={temperature})",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
