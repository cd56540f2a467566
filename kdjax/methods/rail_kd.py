"""RAIL-KD (Haidar et al., "RAIL-KD: RAndom Intermediate Layer Mapping for Knowledge Distillation",
Findings of NAACL 2022): the student's intermediate layers learn from a *random, sorted* subset of the
teacher's intermediate layers, re-drawn during training, instead of a fixed layer map.

Inter-layer loss (concatenated variant, the one GKD's logs run):

    ū_l = mean over the sequence of H_l                      (pads included, as the reference code)
    s = W_S [ū^S_1; …; ū^S_{L_S−1}] + b_S,   t = W_T [ū^T_{π_1}; …; ū^T_{π_{L_S−1}}] + b_T
    L_inter = Σ_{batch, dims} (s/‖s‖ − t/‖t‖)²             (a sum over the batch, not a mean)

with π_1 < … < π_{L_S−1} drawn without replacement from the teacher's intermediate layers 1..L_T−1.
W_S ((L_S−1)·d_S → u) and W_T ((L_S−1)·d_T → u, one per teacher) are trainable method modules,
u = 128. The layer-wise variant (`concatenated=False`) projects each layer with a shared
W_S (d_S → u) / W_T (d_T → u), normalises each layer's vector and sums over layers as well.

Total (GKD log): L = ⅓·CE_{T=10}(z_S, z_T) + ⅓·CE(y, z_S) + ⅓·L_inter, where the soft term is the soft
cross-entropy −Σ p_T log q_T without a T² factor (the log's flags are 0.3333 each).

Redraws: the reference code draws a new subset once per epoch (`--rail_kd_epochs=1`), or every
`--rail_kd_iters` (default 3000) iterations when epochs are off. The engine has no epoch counter, so
`steps_per_epoch` says how many steps an epoch has (a draw then lasts `epochs_per_draw` epochs); left
None, the subset changes every `redraw_every` steps (3000, the code's iteration mode). Every draw is a
function of (seed, stage, step // period): a resumed run draws what the uninterrupted run drew.

Paper and code: the paper describes the random mapping and the projected, normalised concatenation;
the pooling over pads, the sum reduction and the missing T² are the code's (GKD spec §2, §0.9).
`include_embeddings` / `include_final` add the pair (0, 0) / (L_S, L_T) (`--rail_kd_has_embed` /
`--rail_kd_has_final`, off in the logs); `random=False` uses a fixed stride map
(`--rail_kd_no_random`); `pooling="valid"` averages over valid tokens only. The reference pipeline
starts from a DistilBERT-pre-trained student (the `distilbert` recipe); this recipe is the fine-tune.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import KnowledgeError, all_layers, knowledge
from kdjax.methods.base import Method, MethodError, Module, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_positive_int, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero)

STUDENT_PROJ = "rail_kd/student_proj"
TEACHER_PROJ = "rail_kd/teacher_proj"


def layer_count(student_layers: int, include_embeddings: bool, include_final: bool) -> int:
    """How many layers each side contributes: L_S − 1 intermediate ones, plus the optional ends."""
    return student_layers - 1 + int(include_embeddings) + int(include_final)


def stride_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """The fixed map of `random=False`: teacher layer round(i·L_T/L_S) for student layer i = 1..L_S−1."""
    return [max(1, min(teacher_layers - 1, round(i * teacher_layers / student_layers)))
            for i in range(1, student_layers)]


def _layers(ctx, term):
    """(student indices, teacher indices (traced when drawn)) of the compared hidden states, in order."""
    kw = term.kwargs
    ls, lt = ctx.student.num_layers, ctx.teacher.num_layers
    if ls < 2 and not (kw["include_embeddings"] or kw["include_final"]):
        raise KnowledgeError(f"term {term.name!r}: RAIL-KD needs a student with at least 2 layers "
                             "(it maps the L_S - 1 intermediate ones)")
    if ls - 1 > lt - 1:
        raise KnowledgeError(f"term {term.name!r}: cannot map {ls - 1} student layers to {lt - 1} teacher layers")
    student = list(range(1, ls))
    if ls > 1:
        if kw["random"]:
            teacher = ctx.random_layers(term, "teacher", ls - 1, every=kw["every"], low=1, high=lt)
        else:
            teacher = jnp.asarray(stride_layers(ls, lt), jnp.int32)
    else:
        teacher = jnp.zeros((0,), jnp.int32)
    if kw["include_embeddings"]:
        student = [0] + student
        teacher = jnp.concatenate([jnp.zeros((1,), jnp.int32), teacher.astype(jnp.int32)])
    if kw["include_final"]:
        student = student + [ls]
        teacher = jnp.concatenate([teacher.astype(jnp.int32), jnp.full((1,), lt, jnp.int32)])
    return student, teacher


def _pool(h, mask, pooling):
    """`[n, B, S, D]` -> `[n, B, D]`: the sequence mean (all positions, or valid ones)."""
    h = h.astype(jnp.float32)
    if pooling == "all":
        return h.mean(axis=2)
    m = mask.astype(jnp.float32)
    return jnp.einsum("nbsd,bs->nbd", h, m) / jnp.maximum(m.sum(1), 1.0)[None, :, None]


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@knowledge("rail_kd", sources=("hidden_states",), taps=all_layers)
def rail_kd_inter(ctx, term):
    """Σ (ŝ − t̂)² over the batch and dimensions of the projected, L2-normalised pooled layers."""
    kw = term.kwargs
    student_idx, teacher_idx = _layers(ctx, term)
    mask = ctx.mask(term)
    s = _pool(jnp.stack([ctx.student_at("hidden_states", i) for i in student_idx]), mask, kw["pooling"])
    t = _pool(ctx.teacher_at("hidden_states", teacher_idx), mask, kw["pooling"])        # [n, B, D]
    ps = ctx.modules[STUDENT_PROJ]
    pt = ctx.modules[TEACHER_PROJ][ctx.teacher_name]
    if kw["concatenated"]:
        s = jnp.concatenate(list(s), axis=-1)                                            # [B, n·Ds]
        t = jnp.concatenate(list(t), axis=-1)
    s = _normalize(s @ ps["kernel"] + ps["bias"])
    t = _normalize(t @ pt["kernel"] + pt["bias"])
    per_example = jnp.square(s - t).sum(axis=-1)
    if not kw["concatenated"]:
        per_example = per_example.sum(axis=0)                                            # over layers
    loss = per_example.sum()
    one = jnp.ones((), jnp.float32)
    metrics = {term.name: (loss, one)}
    for k in range(len(student_idx)):
        metrics[f"{term.name}/teacher_layer{k}"] = (teacher_idx[k].astype(jnp.float32), one)
    return loss, metrics


def _linear(key, fan_in, u):
    return {"kernel": 0.02 * jax.random.normal(key, (fan_in, u), jnp.float32), "bias": jnp.zeros((u,), jnp.float32)}


def projection_modules(u: int, concatenated: bool, include_embeddings: bool, include_final: bool,
                       learning_rate: Optional[float] = None) -> tuple[Module, Module]:
    """W_S (student side) and W_T (teacher side, one per teacher) as method modules."""

    def fan_in(student, cfg):
        n = layer_count(student.num_layers, include_embeddings, include_final) if concatenated else 1
        return n * cfg.hidden_size

    def init_student(rng, student, teachers):
        return _linear(jax.random.fold_in(rng, 0x5A11), fan_in(student, student), u)

    def init_teacher(rng, student, teachers):
        return {name: _linear(jax.random.fold_in(jax.random.fold_in(rng, 0x7A11), i), fan_in(student, cfg), u)
                for i, (name, cfg) in enumerate(sorted(teachers.items()))}

    return (Module(STUDENT_PROJ, init_student, learning_rate=learning_rate),
            Module(TEACHER_PROJ, init_teacher, learning_rate=learning_rate))


@register("rail_kd", "RAIL-KD: ⅓ soft CE (T=10, no T²) + ⅓ hard CE + ⅓ random sorted teacher layers, pooled, "
                     "projected to u=128, normalised")
def rail_kd(*, soft_weight: Schedule = 1 / 3, hard_weight: Schedule = 1 / 3, inter_weight: Schedule = 1 / 3,
            temperature: Schedule = 10.0, u: int = 128, concatenated: bool = True,
            steps_per_epoch: Optional[int] = None, epochs_per_draw: int = 1, redraw_every: int = 3000,
            random: bool = True, include_embeddings: bool = False, include_final: bool = False,
            pooling: str = "all", projection_learning_rate: Optional[float] = None,
            student_init: Union[str, tuple] = "uniform") -> Method:
    """RAIL-KD fine-tuning.

    Args:
      soft_weight, hard_weight, inter_weight: weights of the soft CE, hard CE and RAIL term (⅓ each).
      temperature: T of the soft cross-entropy (no T² factor).
      u: width of the shared space both projections map to.
      concatenated: concatenate the pooled layers before projecting (True, the logs) or project and
        compare layer by layer.
      steps_per_epoch: steps in one epoch; the subset is re-drawn every `epochs_per_draw` epochs.
        None: re-draw every `redraw_every` steps.
      random: False uses a fixed stride map instead of draws.
      include_embeddings, include_final: also compare the embeddings (0, 0) / final layers (L_S, L_T).
      pooling: "all" positions, pads included (reference code), or "valid" tokens only.
      projection_learning_rate: peak rate of W_S/W_T (None: the stage's, as the reference code).
    """
    what = "rail_kd"
    if steps_per_epoch is not None:
        every = check_positive_int(steps_per_epoch, f"{what}: steps_per_epoch") * \
            check_positive_int(epochs_per_draw, f"{what}: epochs_per_draw")
    else:
        every = check_positive_int(redraw_every, f"{what}: redraw_every")
    u = check_positive_int(u, f"{what}: u")
    if pooling not in ("all", "valid"):
        raise MethodError(f"{what}: pooling must be 'all' or 'valid', got {pooling!r}")
    inter = Term.make("rail_kd", "hidden_states", weight=check_weight(inter_weight, f"{what}: inter_weight"),
                      layers="final", name="rail_kd", every=every, random=bool(random),
                      include_embeddings=bool(include_embeddings), include_final=bool(include_final),
                      concatenated=bool(concatenated), pooling=pooling)
    soft = Term.make("soft_cross_entropy", "logits", weight=check_weight(soft_weight, f"{what}: soft_weight"),
                     name="soft_ce", temperature=check_temperature(temperature, f"{what}: temperature"),
                     scale_by_t2=False)
    hard = hard_label_term(check_weight(hard_weight, f"{what}: hard_weight"))
    terms = keep_nonzero(soft, hard, inter, what=what)
    modules = projection_modules(u, concatenated, include_embeddings, include_final, projection_learning_rate) \
        if any(t.name == "rail_kd" for t in terms) else ()
    return Method(name=what, stages=(Stage("distill", terms, modules=modules),),
                  description=f"RAIL-KD: soft CE (T={temperature}) + hard CE + random layers (every {every} steps)",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
