"""LRC-BERT: latent-representation contrastive distillation (GKD §10).

Fu, Zhou, Yang, Tang, Liu, Liu, Li, "LRC-BERT: Latent-representation Contrastive Knowledge Distillation
for Natural Language Understanding" (AAAI 2021). A COS-NCE loss on intermediate representations with
the other examples of the batch as negatives, then all losses:

    cos_ℓn(i, j) = cos(W s^(i)_ℓn, t^(j)_ℓn)        W: d_S → d_T, no bias, trained (one per teacher)
    g(i, j)      = 1 − mean_{ℓ, n} cos_ℓn(i, j)      over every position (pads not masked, as in GLMKD)
    ℓ_i          = 1 + 1.5 · g(i, i) − ½ · mean_{j≠i} g(i, j)
    L_inter      = α · (#layers) · mean_i ℓ_i

Layers: student 1..L_S against teacher g(i) = i·L_T/L_S. Stage 1 ("contrastive") trains L_inter alone;
stage 2 ("all") adds 1 · T²·KL_T(z_T ‖ z_S) with T = 1.1 and 3 · CE(y, z_S). Defaults are GKD's
(α = 1). ℓ_i is GLMKD's code form 1 − (Σ_j g_ij − B·g_ii)/(2(B − 1)) + g_ii simplified.

Gradient perturbation (`perturb=True`, the paper's training trick; off in GKD's logged runs): a first
pass takes the gradient of the loss with respect to the embedding output, a second pass adds it,
L2-normalised per token (step `perturb_step`, 1), through `ForwardHooks(embeddings=...)`; only the
second pass's loss is trained (the first pass's gradient is discarded, as GLMKD's
`--ignore_first_backward_gard` does).

The loss couples the batch (in-batch negatives): gradient accumulation contrasts each micro-batch on its
own; GLMKD's cross-rank gather (`--lrc_bert_gather_dp`) corresponds to the global batch of a sharded
step, which kdjax computes as one program anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import knowledge
from kdjax.methods.base import Method, MethodError, Module, Stage, Term, register
from kdjax.methods.kd import check_temperature, check_weight, hard_label_term, keep_nonzero, logit_kd_term
from kdjax.models.transformer import ForwardHooks

MODULE = "lrc_fit"


@knowledge("lrc_cos_nce", sources=("hidden_states",), per_token=False)
def lrc_cos_nce(ctx, term):
    """(#layers) · mean_i [1 + 1.5 g_ii − ½ mean_{j≠i} g_ij] over the matched layers 1..L_S."""
    w = ctx.modules[MODULE][ctx.teacher_name]["kernel"]
    pairs = [(i, j) for i, j in ctx.pairs(term) if i > 0]
    cos = 0.0
    for i, j in pairs:
        s = ctx.student_at("hidden_states", i).astype(jnp.float32) @ w
        t = ctx.teacher_at("hidden_states", j).astype(jnp.float32)
        s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-8)
        t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        cos = cos + jnp.einsum("bsd,csd->bc", s, t) / s.shape[1]
    g = 1.0 - cos / len(pairs)                                                   # [B, B]
    b = g.shape[0]
    diag = jnp.diagonal(g)
    negatives = (g.sum(1) - diag) / max(b - 1, 1)
    per_example = 1.0 + 1.5 * diag - 0.5 * negatives
    loss = len(pairs) * per_example.mean()
    return loss, {term.name: (loss, jnp.ones((), jnp.float32))}


def init_fit(rng, student, teachers):
    return {name: {"kernel": jax.random.normal(jax.random.fold_in(rng, n), (student.hidden_size, cfg.hidden_size),
                                               jnp.float32) / jnp.sqrt(student.hidden_size)}
            for n, (name, cfg) in enumerate(sorted(teachers.items()))}


def _perturbed_loss(step_size: float):
    def loss(sctx):
        def first_pass(delta):
            s_out, s_inter = sctx.student_forward(hooks=ForwardHooks(embeddings=lambda h: h + delta))
            return _combined(sctx, s_out, s_inter)[0]

        s_out0, _ = sctx.student()
        shape = s_out0.last_hidden_state.shape
        grad = jax.lax.stop_gradient(jax.grad(first_pass)(jnp.zeros(shape[:2] + (sctx.student_config.hidden_size,),
                                                                     jnp.float32)))
        delta = step_size * grad / jnp.maximum(jnp.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)
        s_out, s_inter = sctx.student_forward(hooks=ForwardHooks(embeddings=lambda h: h + delta.astype(h.dtype)))
        return _combined(sctx, s_out, s_inter)

    return loss


def _combined(sctx, s_out, s_inter):
    total, metrics = jnp.zeros((), jnp.float32), {}
    weights = sctx.teacher_weights
    for name, w in weights.items():
        loss, m = sctx.teacher_loss(name, s_out, s_inter)
        total = total + w * loss
        if len(weights) > 1:
            m = {f"{name}/{k}": v for k, v in m.items()}
        metrics.update(m)
    return total, metrics


@register("lrc_bert", "LRC-BERT: in-batch COS-NCE on W-projected hidden states, then + KL(T=1.1) + 3·CE")
def lrc_bert(*, alpha=1.0, kd_weight=1.0, hard_weight=3.0, temperature=1.1, stages=("contrastive", "all"),
             perturb: bool = False, perturb_step: float = 1.0, fit_learning_rate=None,
             student_init="uniform") -> Method:
    """LRC-BERT (GKD §10).

    Args:
      alpha: α of the contrastive term.
      kd_weight, hard_weight, temperature: stage 2's KL (with T²) and hard CE.
      stages: which of "contrastive" (stage 1) and "all" (stage 2) to run, in order.
      perturb, perturb_step: gradient perturbation of the embedding output (two passes per step).
      fit_learning_rate: W's own peak learning rate (None: the stage's).
    """
    alpha = check_weight(alpha, "lrc_bert: alpha")
    kd_weight = check_weight(kd_weight, "lrc_bert: kd_weight")
    hard_weight = check_weight(hard_weight, "lrc_bert: hard_weight")
    temperature = check_temperature(temperature, "lrc_bert: temperature")
    contrastive = Term.make("lrc_cos_nce", "hidden_states", weight=alpha, name="cos_nce", layers="uniform")
    module = (Module(MODULE, init_fit, learning_rate=fit_learning_rate),)
    loss = _perturbed_loss(float(perturb_step)) if perturb else None
    built = {"contrastive": Stage("contrastive", keep_nonzero(contrastive, what="lrc_bert"), modules=module,
                                  loss=loss),
             "all": Stage("all", keep_nonzero(contrastive, logit_kd_term(kd_weight, temperature),
                                              hard_label_term(hard_weight), what="lrc_bert"), modules=module,
                          loss=loss)}
    unknown = [s for s in stages if s not in built]
    if unknown or not stages:
        raise MethodError(f"lrc_bert: stages must be a non-empty sequence of 'contrastive', 'all'; got {stages!r}")
    return Method("lrc_bert", tuple(built[s] for s in stages), description="LRC-BERT contrastive KD",
                  student_init=student_init)
