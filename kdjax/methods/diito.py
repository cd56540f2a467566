"""DIITO — causal distillation by interchange intervention (Wu, Geiger, Rozner, Kreiss, Lu, Icard, Potts,
Goodman, "Causal Distillation for Language Models", NAACL 2022).

Besides DistilBERT's triple loss, the student learns to *simulate the teacher's causal behaviour*: both
models run a second pass in which aligned hidden states at a token span are overwritten with the
states the same model computed on another example, and the student's intervened output matches the
teacher's intervened output. Masked-LM pre-training data (`config.data.mlm_probability`), an MLM teacher.

Pass 0 (plain), on positions that carry an MLM label for the KL and MLM terms:

    L0 = α_ce·T²·KL_T(z_T ‖ z_S) + α_mlm·CE_MLM + α_cos·(1 − cos(H^S_L, H^T_L)),  T = 2

Interchange (redrawn every step, a function of (seed, stage, step): a resumed run draws the same):

* the dual of example b is example b + 1 (cyclically, the batch rolled by one);
* a student layer l ~ Uniform{1..L_S} (`alignment="full"`; "middle" fixes l = ⌈L_S/2⌉, "late" l = L_S);
  it is aligned with teacher layers g(l−1)+1 .. g(l), g(i) = ⌊i·L_T/L_S⌋;
* a span (`way="consecutive"`): k = ⌊prop·min(len_b, len_dual)⌋ tokens (prop 0.3; capped by
  `max_tokens` when > 0), starting at a uniform position of example b (s_b ∈ [0, len_b − k]) and of its
  dual (s_d ∈ [0, len_dual − k]);
* pass 1 overwrites positions s_b … s_b+k−1 of the aligned layers' outputs (the residual stream) with
  the dual's pass-0 states at s_d … s_d+k−1, in both models (student → student, teacher → teacher).
  The student's recorded states keep their gradient; the teacher is frozen.

    L1 = α_causal_ce·T²·KL_T(z_T^int ‖ z_S^int) + α_causal_cos·(1 − cos(H^S_L^int, H^T_L^int))

L = L0 + L1, one backward. Defaults are GKD's log (spec §4): α_ce = α_mlm = α_cos = α_causal_ce = 0.25,
α_causal_cos = 0, T = 2, prop 0.3, consecutive spans, full alignment. GKD's reference overwrites the
LayerNorm output that feeds block l rather than the residual stream; this recipe intervenes on the
residual stream as the paper does. Fine-tuning the DIITO student afterwards is the `supervised` method.
"""

from __future__ import annotations

from typing import Optional, Union

import dataclasses

import jax
import jax.numpy as jnp

from kdjax.distill import terms as terms_lib
from kdjax.knowledge import features as features_lib
from kdjax.knowledge.registry import all_layers, knowledge
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_fraction, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero, logit_kd_term)
from kdjax.models.transformer import ForwardHooks

LAYER_KEY, SPAN_KEY = "diito/layer", "diito/span"
ALIGNMENTS = ("full", "middle", "late")


@knowledge("diito_cos", sources=("hidden_states",), taps=all_layers, projectable=True)
def diito_cos(ctx, term):
    """Mean over valid tokens of 1 − cos(H^S_L, H^T_L) (records every layer for the interchange)."""
    return features_lib.cosine(ctx.projection(term, ctx.student_at("hidden_states", ctx.student.num_layers)),
                               ctx.teacher_at("hidden_states", ctx.teacher.num_layers), ctx.mask(term),
                               name=term.name)


def draw_layer(key, num_layers: int, alignment: str):
    """The student hidden-state index l in 1..L_S whose output is intervened."""
    if alignment == "full":
        return jax.random.randint(key, (), 1, num_layers + 1)
    return jnp.asarray((num_layers + 1) // 2 if alignment == "middle" else num_layers, jnp.int32)


def draw_spans(key, mask, prop: float, max_tokens: int):
    """Consecutive interchange spans: `(k [B], start [B], dual_start [B])` for example b and its dual b+1."""
    lengths = mask.astype(jnp.int32).sum(1)
    dual = jnp.roll(lengths, -1)
    k = jnp.floor(prop * jnp.minimum(lengths, dual)).astype(jnp.int32)
    if max_tokens > 0:
        k = jnp.minimum(k, max_tokens)
    u = jax.random.uniform(key, (2, lengths.shape[0]))
    start = jnp.floor(u[0] * (lengths - k + 1)).astype(jnp.int32)
    dual_start = jnp.floor(u[1] * (dual - k + 1)).astype(jnp.int32)
    return k, start, dual_start


def span_map(k, start, dual_start, seq_len: int):
    """(`[B, S]` bools: the positions overwritten, `[B, S]` the dual's position each one reads)."""
    pos = jnp.arange(seq_len)[None, :]
    inside = (pos >= start[:, None]) & (pos < (start + k)[:, None])
    source = jnp.clip(dual_start[:, None] + pos - start[:, None], 0, seq_len - 1)
    return inside, source


def swapped(states, source):
    """`states [..., B, S, D]` of each example's dual, read at `source [B, S]`."""
    dual = jnp.roll(states, -1, axis=-3)
    idx = jnp.broadcast_to(source[..., None], source.shape + (1,))
    idx = jnp.broadcast_to(idx, states.shape[:-3] + idx.shape)
    return jnp.take_along_axis(dual, idx, axis=-2)


def _diito_loss(causal_terms: tuple, alignment: str, prop: float, max_tokens: int):
    def loss(sctx):
        total, metrics = sctx.default_loss()
        s_out, s_inter = sctx.student()
        spec = sctx.teachers[0]
        t_out, t_inter = sctx.teacher_results[spec.name][:2]
        n_s, n_t = sctx.student_config.num_layers, spec.config.num_layers
        mask = sctx.batch.get("attention_mask")
        if mask is None:
            mask = jnp.ones(sctx.batch["input_ids"].shape, jnp.int32)
        layer = draw_layer(sctx.key(LAYER_KEY), n_s, alignment)
        k, start, dual_start = draw_spans(sctx.key(SPAN_KEY), mask, prop, max_tokens)
        inside, source = span_map(k, start, dual_start, mask.shape[1])
        s_states = s_inter.hidden_states                                           # [L_S+1, B, S, D]
        s_target = swapped(jnp.take(s_states, layer, axis=0), source)
        t_target = swapped(jax.lax.stop_gradient(t_inter.hidden_states), source)    # every teacher layer
        lo, hi = (layer - 1) * n_t // n_s, layer * n_t // n_s

        def s_block(i, h_in, h_out, ctx):
            hit = (i + 1 == layer) & inside[..., None]
            return jnp.where(hit, s_target.astype(h_out.dtype), h_out)

        def t_block(j, h_in, h_out, ctx):
            hit = (j + 1 > lo) & (j + 1 <= hi) & inside[..., None]
            return jnp.where(hit, jnp.take(t_target, j + 1, axis=0).astype(h_out.dtype), h_out)

        s_out1, s_inter1 = sctx.student_forward(hooks=ForwardHooks(block=s_block))
        t_out1, t_inter1 = sctx.teacher_forward(spec.name, hooks=ForwardHooks(block=t_block))
        ctx = dataclasses.replace(sctx.term_context(spec.name, s_out1, s_inter1), t_out=t_out1, t_inter=t_inter1)
        causal, causal_metrics = terms_lib.terms_loss(ctx, causal_terms)
        metrics = terms_lib.merge_metrics(dict(metrics), causal_metrics)
        one = jnp.ones((), jnp.float32)
        metrics["diito/layer"] = (layer.astype(jnp.float32), one)
        metrics["diito/span_tokens"] = (k.astype(jnp.float32).mean(), one)
        return total + causal, metrics

    return loss


@register("diito", "DIITO: DistilBERT triple loss + KL of both models' outputs under the same interchange "
                   "intervention (random layer and span per step)")
def diito(*, alpha_ce: Schedule = 0.25, alpha_mlm: Schedule = 0.25, alpha_cos: Schedule = 0.25,
          alpha_causal_ce: Schedule = 0.25, alpha_causal_cos: Schedule = 0.0, temperature: Schedule = 2.0,
          alignment: str = "full", prop: float = 0.3, max_tokens: int = -1, way: str = "consecutive",
          student_init: Union[str, tuple] = "uniform") -> Method:
    """DIITO pre-training distillation.

    Args:
      alpha_ce, alpha_mlm, alpha_cos: pass-0 weights of the KL (T², masked positions), the MLM CE and the
        last-layer cosine term.
      alpha_causal_ce, alpha_causal_cos: weights of the intervened pass's KL and cosine terms.
      temperature: T of both KL terms.
      alignment: "full" (a uniform student layer per step), "middle" or "late" (fixed layers).
      prop: the share of the shorter sequence of a pair that is interchanged (0.3).
      max_tokens: cap on the span length (≤ 0: none).
      way: "consecutive" spans (the only mode implemented).
    """
    what = "diito"
    if alignment not in ALIGNMENTS:
        raise MethodError(f"{what}: alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    if way != "consecutive":
        raise MethodError(f"{what}: way must be 'consecutive' (random-position interchange is not implemented)")
    prop = check_fraction(prop, f"{what}: prop")
    if isinstance(prop, tuple):
        raise MethodError(f"{what}: prop must be a number")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise MethodError(f"{what}: max_tokens must be an integer (<= 0: no cap), got {max_tokens!r}")
    temperature = check_temperature(temperature, f"{what}: temperature")
    # The cosine term stays in the stage even at weight 0: it records every layer for the interchange.
    cos = Term.make("diito_cos", "hidden_states", weight=check_weight(alpha_cos, f"{what}: alpha_cos"),
                    name="cosine")
    terms = keep_nonzero(logit_kd_term(check_weight(alpha_ce, f"{what}: alpha_ce"), temperature, positions="labeled"),
                         hard_label_term(check_weight(alpha_mlm, f"{what}: alpha_mlm"), name="mlm",
                                         positions="labeled"), what=what) + (cos,)
    causal = keep_nonzero(
        logit_kd_term(check_weight(alpha_causal_ce, f"{what}: alpha_causal_ce"), temperature, positions="labeled",
                      name="causal_kd"),
        Term.make("diito_cos", "hidden_states", weight=check_weight(alpha_causal_cos, f"{what}: alpha_causal_cos"),
                  name="causal_cosine"), what=what)
    stage = Stage("distill", terms, loss=_diito_loss(causal, alignment, float(prop), int(max_tokens)))
    return Method(name=what, stages=(stage,),
                  description=f"DIITO: KL/MLM/cosine + interchange-intervention KL (T={temperature})",
                  student_init=check_student_init(student_init, f"{what}: student_init"))
