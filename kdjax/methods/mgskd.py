"""MGSKD — Multi-Granularity Structural KD (Liu, Tao, Feng, Zhao, "Multi-Granularity Structural Knowledge
Distillation for Language Model Compression", ACL 2022).

The student matches *relations* at three granularities — tokens, spans and samples — instead of raw
features: pairwise interactions and triplet angles. Lower layers carry token and span structure, upper
layers sample structure. Layers: the uniformly matched hidden states E = [H_0, H_{g(1)}, …, H_{g(L_S)}]
(embeddings included, teacher at stride L_T/L_S); no projection (relations are width-free). For layer
index j < M (`sample_level`, 2): w_tok·token_j + w_span·span_j; for j ≥ M: w_samp·sample_j;
(w_tok, w_span, w_samp) = (1, 1, 4). With R relation heads (64; d split in R slices), a pad mask m, n(·)
the L2 normalisation and SL1 the smooth-L1 (β = 1):

* **TP(X^S, X^T, m)** on `[B, N, d]`:
  pair = Σ (P_S − P_T)² / #valid entries, P_r = X_r X_rᵀ/√(d/R) per head, entries with m_i m_j = 1;
  triplet: on the teacher, A = softmax_j(P_T) over valid j; token importance Σ_r Σ_valid i A_{r,i,·};
  the top-k1 (20) tokens are anchors, each with its top-k2 (20) neighbours by Σ_r A_{r,a,·} (itself
  excluded); ψ = ⟨n(x_j − x_a), n(x_k − x_a)⟩ on full-width vectors at those (teacher-chosen) indices in
  both models; triplet = Σ SL1(ψ_S, ψ_T) / #valid (a, j, k), where a triplet is valid when a, j, k are valid
  and j, k ≠ a (when fewer than k2 valid neighbours exist, the padding slots count for nothing). TP = pair +
  triplet.
* **token_j** = TP(E_j^S, E_j^T, m).
* **span_j** = TP on span states: the sequence is cut into n = ⌊0.4·N⌋ random contiguous spans, each
  mean-pooled (pads included) and valid when it holds a valid token. Lengths ⌊|ε_i|/Σ|ε|·(N − n)⌋ + 1,
  ε ~ N(0, 1), the last ones lengthened by one until they sum to N. One segmentation per step, shared
  by both models, a function of (seed, stage, step): a resumed run draws the same.
* **sample_j**: x_b = mean of example b's valid tokens, split in R heads; for all sample triplets
  (a, b, c): ψ = ⟨n(x_b − x_a), n(x_c − x_a)⟩ per head; mean SL1(ψ_S, ψ_T). This couples the batch.

The paper segments spans with a syntactic parser; GKD's reference (and this recipe) draws random
segmentations instead. Pipeline (GKD spec §3): TinyBERT general distillation (the `tinybert` recipe) →
**structural** (relations only) → **prediction** (T²·KL_{T=1} on the logits only). `stages` picks them.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_positive_int, check_student_init, check_temperature,
                              check_weight, keep_nonzero, logit_kd_term, stage_overrides)

SPAN_KEY = "mgskd/spans"
NEG = -1e9


def _normalize(x, eps=1e-8):
    """x / max(‖x‖, eps), with a zero (not NaN) gradient at x = 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def smooth_l1(a, b):
    d = jnp.abs(a - b)
    return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _heads(x, heads: int):
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads)


def pair_relation(x, heads: int):
    """`[B, R, N, N]`: X_r X_rᵀ / √(d/R) per relation head."""
    xr = _heads(x, heads)
    return jnp.einsum("bird,bjrd->brij", xr, xr) / jnp.sqrt(xr.shape[-1])


def triplet_indices(p_teacher, m, k1: int, k2: int):
    """Teacher-chosen anchors `[B, k1]` and their neighbours `[B, k1, k2]`."""
    n = m.shape[1]
    valid_col = m[:, None, None, :] > 0
    attn = jax.nn.softmax(jnp.where(valid_col, p_teacher, NEG), -1) * m[:, None, :, None]      # rows of valid i
    importance = jnp.where(m > 0, attn.sum((1, 2)), NEG)
    anchors = jax.lax.top_k(importance, k1)[1]                                                   # [B, k1]
    local = jnp.take_along_axis(attn.sum(1), anchors[:, :, None], axis=1)                        # [B, k1, N]
    excluded = (jnp.arange(n)[None, None, :] == anchors[:, :, None]) | (m[:, None, :] == 0)
    neighbours = jax.lax.top_k(jnp.where(excluded, NEG, local), k2)[1]
    return anchors, neighbours


def triplet_angles(x, anchors, neighbours):
    """`[B, k1, k2, k2]`: ⟨n(x_j − x_a), n(x_k − x_a)⟩ at the given indices."""
    xa = jnp.take_along_axis(x, anchors[:, :, None], axis=1)                                    # [B, k1, D]
    xj = jax.vmap(lambda xb, idx: xb[idx])(x, neighbours)                                       # [B, k1, k2, D]
    same = (neighbours == anchors[:, :, None])[..., None]
    u = jnp.where(same, 0.0, _normalize(xj - xa[:, :, None, :]))
    return jnp.einsum("bajd,bakd->bajk", u, u)


def token_phrase(xs, xt, m, heads: int, k1: int, k2: int):
    """TP(X^S, X^T, m) = pair + triplet (see the module docstring)."""
    m = m.astype(jnp.float32)
    ps, pt = pair_relation(xs, heads), pair_relation(xt, heads)
    mm = (m[:, :, None] * m[:, None, :])[:, None]
    pair = jnp.sum(jnp.square(ps - pt) * mm) / jnp.maximum(mm.sum() * heads, 1.0)
    n = xs.shape[1]
    k1, k2 = min(k1, n), min(k2, n - 1)
    if k2 < 1:
        return pair
    anchors, neighbours = triplet_indices(pt, m, k1, k2)
    ma = jnp.take_along_axis(m, anchors, axis=1)
    # With fewer than k2 valid candidates, top_k fills the remaining slots from the tied excluded entries, which
    # can be the anchor itself (lowest index wins a tie): such a slot is not a neighbour and must not count.
    mj = jax.vmap(lambda mb, idx: mb[idx])(m, neighbours) * (neighbours != anchors[:, :, None])
    valid = ma[:, :, None, None] * mj[:, :, :, None] * mj[:, :, None, :]
    err = smooth_l1(triplet_angles(xs, anchors, neighbours), triplet_angles(xt, anchors, neighbours)) * valid
    return pair + jnp.sum(err) / jnp.maximum(valid.sum(), 1.0)


def span_lengths(key, seq_len: int, rate: float):
    """`[n]` lengths of a random segmentation of `seq_len` positions into n = ⌊rate·seq_len⌋ spans."""
    n = max(int(seq_len * rate), 1)
    eps = jnp.abs(jax.random.normal(key, (n,)))
    lengths = jnp.floor(eps / eps.sum() * (seq_len - n)).astype(jnp.int32) + 1
    deficit = seq_len - lengths.sum()
    return lengths + (jnp.arange(n) >= n - deficit).astype(jnp.int32)


def span_pooling(lengths, seq_len: int):
    """`[n, N]`: row s averages the positions of span s."""
    ends = jnp.cumsum(lengths)
    segment = jnp.searchsorted(ends, jnp.arange(seq_len), side="right")                          # span of each position
    member = (segment[None, :] == jnp.arange(lengths.shape[0])[:, None]).astype(jnp.float32)
    return member / jnp.maximum(member.sum(1, keepdims=True), 1.0)


def sample_angles(x, heads: int):
    xr = _heads(x[None], heads)[0]                                                                # [B, R, d/R]
    same = jnp.eye(xr.shape[0], dtype=bool)[:, :, None, None]                                   # b = a: no direction
    u = jnp.where(same, 0.0, _normalize(xr[None, :, :, :] - xr[:, None, :, :]))                  # [a, b, R, e]
    return jnp.einsum("abre,acre->rabc", u, u)


def sample_loss(xs, xt, m, heads: int):
    m = m.astype(jnp.float32)

    def pool(x):
        return jnp.einsum("bnd,bn->bd", x, m) / jnp.maximum(m.sum(1), 1.0)[:, None]
    return jnp.mean(smooth_l1(sample_angles(pool(xs), heads), sample_angles(pool(xt), heads)))


def _layers(ctx, term, low: bool):
    kw = term.kwargs
    pairs = ctx.pairs(term)
    chosen = [(i, j) for n, (i, j) in enumerate(pairs) if (n < kw["sample_level"]) == low]
    heads = kw["heads"]
    for cfg, side in ((ctx.student, "student"), (ctx.teacher, "teacher")):
        if cfg.hidden_size % heads:
            raise KnowledgeError(f"term {term.name!r}: the {side} width {cfg.hidden_size} is not divisible by "
                                 f"{heads} relation heads; set method_args.mgskd.relation_heads to a divisor")
    for i, j in chosen:
        yield (ctx.student_at("hidden_states", i).astype(jnp.float32),
               jax.lax.stop_gradient(ctx.teacher_at("hidden_states", j).astype(jnp.float32)))


def _result(term, loss):
    return loss, {term.name: (loss, jnp.ones((), jnp.float32))}


@knowledge("mgskd_token", sources=("hidden_states",))
def mgskd_token(ctx, term):
    kw, m = term.kwargs, ctx.mask(term)
    loss = sum((token_phrase(s, t, m, kw["heads"], kw["k1"], kw["k2"]) for s, t in _layers(ctx, term, True)),
               jnp.zeros((), jnp.float32))
    return _result(term, loss)


@knowledge("mgskd_span", sources=("hidden_states",))
def mgskd_span(ctx, term):
    kw, m = term.kwargs, ctx.mask(term).astype(jnp.float32)
    n = m.shape[1]
    pool = span_pooling(span_lengths(ctx.key(SPAN_KEY), n, kw["span_rate"]), n)
    span_mask = (jnp.einsum("sn,bn->bs", (pool > 0).astype(jnp.float32), m) > 0).astype(jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    for s, t in _layers(ctx, term, True):
        loss = loss + token_phrase(jnp.einsum("sn,bnd->bsd", pool, s), jnp.einsum("sn,bnd->bsd", pool, t),
                                   span_mask, kw["heads"], kw["k1"], kw["k2"])
    return _result(term, loss)


@knowledge("mgskd_sample", sources=("hidden_states",), per_token=False)
def mgskd_sample(ctx, term):
    kw, m = term.kwargs, ctx.mask(term)
    loss = sum((sample_loss(s, t, m, kw["heads"]) for s, t in _layers(ctx, term, False)),
               jnp.zeros((), jnp.float32))
    return _result(term, loss)


STAGES = ("structural", "prediction")


@register("mgskd", "MGSKD: token/span (pairs + top-k triplet angles) and sample (angle) relations, then KL (T=1)")
def mgskd(*, token_weight: Schedule = 1.0, span_weight: Schedule = 1.0, sample_weight: Schedule = 4.0,
          sample_level: int = 2, relation_heads: int = 64, k1: int = 20, k2: int = 20, span_rate: float = 0.4,
          kd_weight: Schedule = 1.0, temperature: Schedule = 1.0, layers: Union[str, tuple] = "uniform",
          stages: Sequence[str] = STAGES, steps: Optional[Mapping[str, int]] = None,
          learning_rates: Optional[Mapping[str, float]] = None,
          student_init: Union[str, tuple] = "uniform") -> Method:
    """MGSKD fine-tuning (after a TinyBERT general distillation).

    Args:
      token_weight, span_weight, sample_weight: (1, 1, 4).
      sample_level: M, the first layer index (in the stacked E) that uses the sample loss (2; GKD's log 3).
      relation_heads: R (64); both widths must be divisible by it.
      k1, k2: anchors and neighbours per anchor of the triplet angles (20, 20).
      span_rate: spans per token (0.4).
      kd_weight, temperature: the prediction stage's T²·KL.
      layers: the stacked hidden-state pairs ("uniform": embeddings and every student layer).
      stages: which of "structural", "prediction" to run, in order.
    """
    what = "mgskd"
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise MethodError(f"{what}: stages must be a non-empty sequence of {', '.join(STAGES)}; got {stages!r}")
    for value, arg in ((sample_level, "sample_level"), (relation_heads, "relation_heads"), (k1, "k1"), (k2, "k2")):
        check_positive_int(value, f"{what}: {arg}")
    if not isinstance(span_rate, (int, float)) or not 0 < span_rate < 1:
        raise MethodError(f"{what}: span_rate must be in (0, 1), got {span_rate!r}")
    args = dict(layers=check_layers(layers, f"{what}: layers"), sample_level=sample_level, heads=relation_heads,
                k1=k1, k2=k2, span_rate=float(span_rate))
    structural = keep_nonzero(
        Term.make("mgskd_token", "hidden_states", weight=check_weight(token_weight, f"{what}: token_weight"),
                  name="token", **args),
        Term.make("mgskd_span", "hidden_states", weight=check_weight(span_weight, f"{what}: span_weight"),
                  name="span", **args),
        Term.make("mgskd_sample", "hidden_states", weight=check_weight(sample_weight, f"{what}: sample_weight"),
                  name="sample", **args),
        what=what)
    prediction = keep_nonzero(logit_kd_term(check_weight(kd_weight, f"{what}: kd_weight"),
                                            check_temperature(temperature, f"{what}: temperature")), what=what)
    built = {"structural": Stage("structural", structural), "prediction": Stage("prediction", prediction)}
    return Method(name=what, stages=stage_overrides([built[s] for s in stages], what, steps, learning_rates),
                  description="MGSKD: multi-granularity relations -> prediction-layer KL",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
