"""CKD — Contextual Knowledge Distillation (Park, Kim, Yang, "Distilling Linguistic Context for Language
Model Compression", EMNLP 2021).

The student matches *relations*, not features, so widths may differ and no projection is learned.
With E = [H_0, H_{g(1)}, …, H_{g(L_S)}] the uniformly matched hidden states (embeddings included; the
teacher at stride L_T/L_S), e_{l,i} the state of token i at layer l, m the valid-token mask, and
cos(·,·) the cosine similarity:

* **WR-Dist** (word relation, distance): per layer, P_{l,i,·} = softmax_j cos(e_{l,i}, e_{l,j}) with the
  diagonal and pads excluded; Σ_l Σ_valid i KL(P^T_{l,i} ‖ P^S_{l,i}) / Σ m.
* **WR-Angle** (word relation, angle, windowed): for token i and the W = 21 positions j, k of its
  window (i − 10 … i + 10, clamped at the sequence ends), ψ = ⟨n(e_j − e_i), n(e_k − e_i)⟩ with n the
  L2 normalisation; Σ (ψ_S − ψ_T)² over layers and valid (i, j, k) / Σ m.
* **LTR-Dist** (layer-transforming relation, distance): per token, Q_{i,a,·} = softmax_b cos(e_{a,i},
  e_{b,i}) over layers, diagonal excluded; Σ_valid i Σ_a KL(Q^T_{i,a} ‖ Q^S_{i,a}) / Σ m.
* **LTR-Angle**: per token, ⟨n(e_b − e_a), n(e_c − e_a)⟩ over all layer triplets (a, b, c);
  Σ (S − T)² over valid tokens and triplets / Σ m.

Total (GKD spec §7, the reference code's defaults): L = 0.9·CE_{T=3}(z_S, z_T) + 0.1·CE(y, z_S)
+ 1·WR-Dist + 10·WR-Angle + 1·LTR-Dist + 10·LTR-Angle, where CE_T = −Σ p_T log q_T has no T² factor.
The student starts from the PD student in GKD's pipeline (run `pd` first, or load one with
`config.student.init`). Pads: window entries and triplets that touch a pad are left out (the relations
are defined on tokens); rows are all valid tokens.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_student_init, check_temperature, check_weight, hard_label_term,
                              keep_nonzero)

NEG = -1e9


def _normalize(x, eps=1e-8):
    """x / max(‖x‖, eps), with a zero (not NaN) gradient at x = 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _stacks(ctx, term):
    """`[L, B, N, D]` float32 states of the matched layers on each side, and the mask `[B, N]`."""
    pairs = ctx.pairs(term)
    if len(pairs) < 2:
        raise KnowledgeError(f"term {term.name!r}: CKD relations need at least 2 matched layers, got {pairs}")
    s = jnp.stack([ctx.student_at("hidden_states", i) for i, _ in pairs]).astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.stack([ctx.teacher_at("hidden_states", j) for _, j in pairs]).astype(jnp.float32))
    return s, t, ctx.mask(term).astype(jnp.float32)


def _kl_rows(logits_s, logits_t, excluded):
    """Σ_last KL(softmax(t) ‖ softmax(s)) with `excluded` entries left out of both softmaxes."""
    logits_s = jnp.where(excluded, NEG, logits_s)
    logits_t = jnp.where(excluded, NEG, logits_t)
    logp_t, logp_s = jax.nn.log_softmax(logits_t, -1), jax.nn.log_softmax(logits_s, -1)
    return jnp.sum(jnp.where(excluded, 0.0, jnp.exp(logp_t) * (logp_t - logp_s)), -1)


def wr_dist(s, t, m):
    def cos(e):
        u = _normalize(e)
        return jnp.einsum("lbid,lbjd->lbij", u, u)
    n = s.shape[2]
    excluded = jnp.eye(n, dtype=bool)[None, None] | (m[None, :, None, :] == 0)
    return jnp.sum(_kl_rows(cos(s), cos(t), excluded) * m[None]) / jnp.maximum(m.sum(), 1.0)


def window_index(n: int, window: int):
    half = window // 2
    return jnp.clip(jnp.arange(n)[:, None] + jnp.arange(-half, window - half)[None, :], 0, n - 1)   # [N, W]


def wr_angle(s, t, m, window: int):
    idx = window_index(s.shape[2], window)

    same = (idx == jnp.arange(idx.shape[0])[:, None])[None, None, :, :, None]     # j = i: no direction

    def angles(e):
        u = jnp.where(same, 0.0, _normalize(e[:, :, idx] - e[:, :, :, None]))   # [L, B, N, W, D]
        return jnp.einsum("lbiwd,lbivd->lbiwv", u, u)
    mw = m[:, idx]                                                        # [B, N, W]
    valid = m[:, :, None, None] * mw[:, :, :, None] * mw[:, :, None, :]
    err = jnp.square(angles(s) - angles(t)) * valid[None]
    return jnp.sum(err) / jnp.maximum(m.sum(), 1.0)


def ltr_dist(s, t, m):
    def cos(e):
        u = _normalize(e)
        return jnp.einsum("xbid,ybid->bixy", u, u)                        # [B, N, L, L]
    n_layers = s.shape[0]
    excluded = jnp.eye(n_layers, dtype=bool)[None, None]
    return jnp.sum(_kl_rows(cos(s), cos(t), excluded).sum(-1) * m) / jnp.maximum(m.sum(), 1.0)


def ltr_angle(s, t, m):
    def angles(e):
        e = jnp.moveaxis(e, 0, 2)                                          # [B, N, L, D]
        same = jnp.eye(e.shape[2], dtype=bool)[None, None, :, :, None]
        u = jnp.where(same, 0.0, _normalize(e[:, :, None, :, :] - e[:, :, :, None, :]))  # [B, N, a, b, D]: e_b − e_a
        return jnp.einsum("zixyd,zixwd->zixyw", u, u)
    err = jnp.square(angles(s) - angles(t)).sum((-3, -2, -1))
    return jnp.sum(err * m) / jnp.maximum(m.sum(), 1.0)


def _register(name, fn):
    @knowledge(name, sources=("hidden_states",), fn=fn)
    def apply(ctx, term):
        s, t, m = _stacks(ctx, term)
        kw = term.kwargs
        loss = fn(s, t, m, kw["window"]) if name == "ckd_wr_angle" else fn(s, t, m)
        return loss, {term.name: (loss, jnp.ones((), jnp.float32))}
    return apply


for _name, _fn in (("ckd_wr_dist", wr_dist), ("ckd_wr_angle", wr_angle), ("ckd_ltr_dist", ltr_dist),
                   ("ckd_ltr_angle", ltr_angle)):
    _register(_name, _fn)


@register("ckd", "CKD: word-relation and layer-transforming-relation distances (KL) and angles + 0.9 soft CE "
                 "(T=3) + 0.1 hard")
def ckd(*, wr_dist_weight: Schedule = 1.0, wr_angle_weight: Schedule = 10.0, ltr_dist_weight: Schedule = 1.0,
        ltr_angle_weight: Schedule = 10.0, window: int = 21, soft_weight: Schedule = 0.9,
        hard_weight: Schedule = 0.1, temperature: Schedule = 3.0, layers: Union[str, tuple] = "uniform",
        student_init: Union[str, tuple] = "uniform") -> Method:
    """CKD fine-tuning.

    Args:
      wr_dist_weight, wr_angle_weight, ltr_dist_weight, ltr_angle_weight: weights of the four relation
        terms (1, 10, 1, 10); a zero weight drops the term.
      window: W, the neighbourhood of the word-relation angles (21).
      soft_weight, hard_weight, temperature: the soft CE (T = 3, no T²) and gold-label CE weights.
      layers: the hidden-state pairs stacked on each side ("uniform": embeddings and every student layer).
    """
    what = "ckd"
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise MethodError(f"{what}: window must be an integer >= 2, got {window!r}")
    layers = check_layers(layers, f"{what}: layers")
    relation = [Term.make(fn, "hidden_states", weight=check_weight(w, f"{what}: {arg}"), layers=layers,
                          name=fn[len("ckd_"):], window=window)
                for fn, w, arg in (("ckd_wr_dist", wr_dist_weight, "wr_dist_weight"),
                                   ("ckd_wr_angle", wr_angle_weight, "wr_angle_weight"),
                                   ("ckd_ltr_dist", ltr_dist_weight, "ltr_dist_weight"),
                                   ("ckd_ltr_angle", ltr_angle_weight, "ltr_angle_weight"))]
    terms = keep_nonzero(
        Term.make("soft_cross_entropy", "logits", weight=check_weight(soft_weight, f"{what}: soft_weight"),
                  name="soft_ce", temperature=check_temperature(temperature, f"{what}: temperature"),
                  scale_by_t2=False),
        hard_label_term(check_weight(hard_weight, f"{what}: hard_weight")),
        *relation, what=what)
    return Method(name=what, stages=(Stage("distill", terms),),
                  description=f"CKD: WR/LTR distance and angle relations + soft CE (T={temperature}) + hard CE",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
