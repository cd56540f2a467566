"""One Flax NNX transformer for every kdjax family (BERT ... Gemma, Phi-3, Mixtral; see kdjax.hub.families).

The layer stack is stored stacked (a leading `layers` axis on every block parameter) whether it runs
scanned or unrolled, so checkpoints, sharding rules and student initialization see one layout.
Scanned execution (`jax.lax.scan` over the stacked block) keeps compile time flat in depth; unrolled
execution slices the same parameters layer by layer. Taps come out of the block as scan outputs and
are sown once, at the top, as typed `nnx.Intermediate` variables — so a forward pass that asks for no
taps is, op for op, the plain forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kdjax.models import activations
from kdjax.models.config import ModelConfig
from kdjax.models.taps import LAYER_KINDS, TAP_TYPES, Intermediates, TapSpec

Array = jax.Array
NEG_INF = float(jnp.finfo(jnp.float32).min)

_REMAT_POLICIES = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "minimal": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_out"),
}


def _init(config: ModelConfig):
    return nnx.initializers.normal(config.initializer_range)


def _act(name: str, x: Array) -> Array:
    if name == "gelu":
        # Exact GELU in BERT's own form, x/2 · (1 + erf(x/√2)): on the CPU, XLA's erf is one polynomial, about
        # half the cost of the erfc that jax.nn.gelu(approximate=False) evaluates (forward and gradient).
        return x * (0.5 + 0.5 * jax.lax.erf(x * 0.7071067811865476))
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.silu(x)


def _dense(config: ModelConfig, din: int, dout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=config.compute_dtype, param_dtype=config.params_dtype,
                                        kernel_init=_init(config), rngs=rngs)


class RMSNorm(nnx.Module):
    """Llama-style RMSNorm: normalize in float32, then scale in the compute dtype.

    With `offset` (Gemma) the scale is `1 + w` and `w` starts at zero.
    """

    def __init__(self, dim: int, eps: float, dtype, param_dtype, offset: bool = False):
        self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype
        self.offset = offset

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return ((1.0 + scale if self.offset else scale) * y).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (BERT/GPT-2 convention), output in the compute dtype."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(config: ModelConfig, dim: Optional[int] = None):
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.compute_dtype, config.params_dtype, config.norm_offset)
    return LayerNorm(dim, config.norm_eps, config.compute_dtype, config.params_dtype)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """`cap * tanh(x / cap)` (Gemma 2's soft-capping), identity without a cap."""
    if not cap:
        return x
    return jnp.tanh(x / cap) * cap


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> np.ndarray:
    """Inverse frequencies `theta^(-2i/d)` (float64 on the host), with an optional scaling applied.

    `linear` divides every frequency by `factor` (position interpolation). `llama3` (Llama 3.1+) leaves
    the high frequencies (wavelength below `original_max_position_embeddings / high_freq_factor`)
    alone, divides the low ones (wavelength above `original / low_freq_factor`) by `factor`, and
    blends the band between linearly in `original / wavelength`.
    """
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling or dict(scaling)["rope_type"] == "longrope":  # longrope: see rope_tables
        return inv_freq
    s = dict(scaling)
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv_freq / factor
    if s["rope_type"] == "llama3":
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        original = float(s["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv_freq
        blend = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
        return np.where(wavelen < original / high, inv_freq, np.where(wavelen > original / low, inv_freq / factor,
                                                                      scaled))
    raise ValueError(f"rope scaling {s['rope_type']!r} is not supported")


def rope_tables(positions: Array, head_dim: int, theta: float, scaling: tuple = ()) -> tuple[Array, Array]:
    """cos/sin tables [B, S, head_dim] in the rotate-half layout used by HF Llama checkpoints.

    `longrope` (Phi-3) divides the frequencies by `short_factor` while the batch's largest position is
    within `original_max_position_embeddings` and by `long_factor` beyond it (as transformers decides per
    forward), and scales cos and sin by `attention_factor`.
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta, scaling), jnp.float32)
    s = dict(scaling)
    scale = 1.0
    if s.get("rope_type") == "longrope":
        short = jnp.asarray(inv_freq / np.asarray(s["short_factor"], np.float64), jnp.float32)
        long = jnp.asarray(inv_freq / np.asarray(s["long_factor"], np.float64), jnp.float32)
        inv_freq = jnp.where(jnp.max(positions) + 1 > int(s["original_max_position_embeddings"]), long, short)
        scale = float(s["attention_factor"])
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if scale != 1.0:
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bshd: Array, cos: Array, sin: Array) -> Array:
    half = x_bshd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bshd[..., half:], x_bshd[..., :half]], axis=-1)
    x32 = x_bshd.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x_bshd.dtype)


def head_projection(x: Array, weight: Array, dtype=None, vocab_major: bool = False) -> Array:
    """Vocabulary logits ``x @ W`` (``x @ W.T`` for a ``[V, D]`` ``weight``) with float32 accumulation and output.

    Inputs are cast to ``dtype`` (the compute dtype, as ``nnx.Linear(dtype=...)`` does; ``None``
    promotes the two), so bf16 weights are read as bf16, but the products are summed and returned in
    float32.
    """
    dtype = dtype if dtype is not None else jnp.result_type(x.dtype, weight.dtype)
    x, weight = x.astype(dtype), weight.astype(dtype)
    contract = ((x.ndim - 1,), (1 if vocab_major else 0,))
    return jax.lax.dot_general(x, weight, (contract, ((), ())), preferred_element_type=jnp.float32)


def dropout(x: Array, rate: float, key: Optional[Array]) -> Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate).

    A no-op without a key or at rate 0, so inference and teacher passes need no flag.
    """
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Attention(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        d, h, kv, hd = c.hidden_size, c.num_heads, c.kv_heads, c.dim_per_head
        self.q = _dense(c, d, h * hd, c.qkv_bias, rngs)
        self.k = _dense(c, d, kv * hd, c.qkv_bias, rngs)
        self.v = _dense(c, d, kv * hd, c.qkv_bias, rngs)
        self.o = _dense(c, h * hd, d, c.out_bias, rngs)
        self.q_norm = nnx.data(make_norm(c, hd) if c.qk_norm else None)
        self.k_norm = nnx.data(make_norm(c, hd) if c.qk_norm else None)
        self.config = c

    def __call__(self, x: Array, bias_bqk: Array, rope: Optional[tuple[Array, Array]], kinds: frozenset,
                 dropout_key: Optional[Array] = None):
        c = self.config
        b, s, _ = x.shape
        h, kv, hd = c.num_heads, c.kv_heads, c.dim_per_head
        q = self.q(x).reshape(b, s, h, hd)
        k = self.k(x).reshape(b, s, kv, hd)
        v = self.v(x).reshape(b, s, kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        rep = h // kv
        k_full = jnp.repeat(k, rep, axis=2) if rep > 1 else k
        v_full = jnp.repeat(v, rep, axis=2) if rep > 1 else v
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_full, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / float(c.query_pre_attn_scalar or hd) ** 0.5)
        scores = softcap(scores, c.attn_logit_softcap)
        scores = jnp.where(bias_bqk[:, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        # The tapped probabilities stay undropped (they are what distillation compares); the context
        # uses the dropped ones, as in training.
        dropped = dropout(probs, c.attention_dropout, dropout_key)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v_full.dtype), v_full)
        out = self.o(ctx.reshape(b, s, h * hd))
        out = checkpoint_name(out, "attention_out")
        taps = {}
        for kind, value in (("attention_scores", scores), ("attention_probs", probs), ("query", q),
                                                ("key", k), ("value", v), ("attention_context", ctx)):
            if kind in kinds:
                taps[kind] = value
        return out, taps


class MLP(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.up = _dense(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs)
        self.gate = nnx.data(_dense(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs) if c.gated_mlp else None)
        self.down = _dense(c, c.intermediate_size, c.hidden_size, c.mlp_bias, rngs)
        self.activation = c.activation

    def __call__(self, x: Array) -> Array:
        if self.gate is not None:
            hidden = _act(self.activation, self.gate(x)) * self.up(x)
        else:
            hidden = _act(self.activation, self.up(x))
        return checkpoint_name(self.down(hidden), "mlp_out")


class Block(nnx.Module):
    """One transformer layer, post-LN (BERT) or pre-LN (GPT-2/Llama) by config.

    Gemma's sandwich norms add `attn_post_norm` / `mlp_post_norm` on each branch before its residual add;
    a mixture-of-experts config replaces the MLP by `moe` (kdjax.models.moe).
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        from kdjax.models.moe import MoE  # the MoE module builds on this file's helpers

        self.attn = Attention(config, rngs)
        self.attn_norm = make_norm(config)
        self.mlp = nnx.data(MLP(config, rngs) if not config.num_experts or config.dense_layers else None)
        self.moe = nnx.data(MoE(config, rngs) if config.num_experts else None)
        self.mlp_norm = make_norm(config)
        self.attn_post_norm = nnx.data(make_norm(config) if config.sandwich_norm else None)
        self.mlp_post_norm = nnx.data(make_norm(config) if config.sandwich_norm else None)
        self.pre_norm = config.pre_norm
        self.rate = config.dropout

    def _ffn(self, x: Array, taps: dict, kinds: frozenset, dense=None) -> Array:
        if self.moe is None:
            return self.mlp(x)
        if self.mlp is None or dense is False:
            out, router_logits = self.moe(x)
        else:  # a model with dense layers: `dense` is this layer's flag (a Python bool, or traced under scan)
            def dense_ffn():
                return self.mlp(x), jnp.zeros(x.shape[:-1] + (self.moe.config.num_experts,), x.dtype)
            if dense is True:
                out, router_logits = dense_ffn()
            else:
                out, router_logits = jax.lax.cond(dense, dense_ffn, lambda: self.moe(x))
        if "router_logits" in kinds:
            taps["router_logits"] = router_logits  # dense layers' zeros are dropped by the model
        return out

    def __call__(self, h: Array, bias_bqk: Array, rope, kinds: frozenset, dropout_key: Optional[Array] = None,
                 dense=None):
        keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
        if self.attn_post_norm is not None:
            a, taps = self.attn(self.attn_norm(h), bias_bqk, rope, kinds, keys[0])
            h = h + dropout(self.attn_post_norm(a), self.rate, keys[1])
            f = self.mlp_post_norm(self._ffn(self.mlp_norm(h), taps, kinds, dense))
            h = h + dropout(f, self.rate, keys[2])
        elif self.pre_norm:
            a, taps = self.attn(self.attn_norm(h), bias_bqk, rope, kinds, keys[0])
            h = h + dropout(a, self.rate, keys[1])
            f = self._ffn(self.mlp_norm(h), taps, kinds, dense)
            h = h + dropout(f, self.rate, keys[2])
        else:
            a, taps = self.attn(h, bias_bqk, rope, kinds, keys[0])
            h = self.attn_norm(h + dropout(a, self.rate, keys[1]))
            f = self.mlp(h)
            h = self.mlp_norm(h + dropout(f, self.rate, keys[2]))
        if "ffn_output" in kinds:
            taps["ffn_output"] = f
        return h, taps


class Embeddings(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, embedding_init=_init(c), rngs=rngs)
        self.word = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
        self.position = nnx.data(nnx.Embed(c.max_position_embeddings, c.hidden_size, **kw)
                                                  if c.position_embedding == "learned" else None)
        self.token_type = nnx.data(nnx.Embed(c.type_vocab_size, c.hidden_size, **kw) if c.type_vocab_size else None)
        self.norm = nnx.data(make_norm(c) if c.embedding_norm else None)
        # Gemma scales the embeddings by sqrt(hidden), rounded to the parameter dtype as HF does.
        self.scale = float(np.asarray(c.hidden_size ** 0.5, c.params_dtype)) if c.embedding_scale else None

    def __call__(self, input_ids: Array, position_ids: Array, token_type_ids: Optional[Array]) -> Array:
        h = self.word(input_ids)
        if self.scale is not None:
            h = h * jnp.asarray(self.scale, h.dtype)
        if self.token_type is not None:  # summed in HF's order so fp32 rounding matches
            tt = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            h = h + self.token_type(tt)
        if self.position is not None:
            h = h + self.position(position_ids)
        if self.norm is not None:
            h = self.norm(h)
        return h


class ForwardHooks:
    """Rewrites of the residual stream inside one forward pass (interventions), all traced in the step.

    embeddings(h) -> h: after the embedding layer (and its dropout), e.g. an adversarial perturbation.
    block(layer, h_in, h_out, ctx) -> h_out: after each layer; `layer` is the layer index (traced under
      scan), `h_in` the layer's input, `ctx` a `BlockContext` (the attention bias and RoPE tables of this
      pass, so a hook can run another model's block on `h_in`: `apply_block`). Examples: overwrite
      positions with another pass's states (interchange intervention), or replace a student block by
      teacher blocks (module replacement).
    A forward without hooks is the plain forward, op for op.
    """

    def __init__(self, embeddings: Optional[Callable] = None, block: Optional[Callable] = None):
        self.embeddings = embeddings
        self.block = block


@dataclasses.dataclass(frozen=True)
class BlockContext:
    """What a block needs besides its input: the additive attention bias and the RoPE tables (or None)."""

    bias_bqk: Array
    rope: Any


def apply_block(graphdef, params, layer, h: Array, ctx: BlockContext) -> Array:
    """Layer `layer` (an int or a traced index) of the model `(graphdef, params)` applied to `h`.

    The model must have the same width as `h`; its own attention heads and RoPE base are used with the
    caller's attention bias and RoPE tables (same positions).
    """
    model = nnx.merge(graphdef, params)
    layers_graphdef, state = nnx.split(model.layers)
    layer_state = jax.tree.map(lambda x: x[layer], state)
    dense = None
    if model.config.dense_layers:
        dense = jnp.isin(layer, jnp.asarray(model.config.dense_layers))
    out, _ = nnx.merge(layers_graphdef, layer_state)(h, ctx.bias_bqk, ctx.rope, frozenset(), None, dense)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutputs:
    logits: Optional[Array] = None  # [B,S,V] (mlm / causal_lm) or [B,C] (classification)
    last_hidden_state: Optional[Array] = None  # [B,S,D], after the final norm where there is one
    pooler_output: Optional[Array] = None  # [B,D] (encoders with a pooler)


class Transformer(nnx.Module):
    """Embeddings -> stacked blocks -> optional final norm -> head.

    Heads: `base` (encoder/decoder trunk, BERT pooler if `add_pooler`), `mlm`, `classification`,
    `causal_lm`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = Embeddings(c, rngs)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r):
            return Block(c, r)

        self.layers = make_layers(rngs)
        self.final_norm = nnx.data(make_norm(c) if c.final_norm else None)

        d = c.hidden_size
        pooler = classifier = mlm_transform = mlm_norm = mlm_bias = decoder = None
        if c.head == "mlm":
            mlm_transform = _dense(c, d, d, True, rngs)
            mlm_norm = make_norm(c)
            mlm_bias = nnx.Param(jnp.zeros((c.vocab_size,), c.params_dtype))
        if c.head in ("mlm", "causal_lm") and not c.tie_word_embeddings:
            decoder = _dense(c, d, c.vocab_size, False, rngs)
        if c.head == "classification":
            if c.classifier_style in ("bert_pooler", "roberta"):
                pooler = _dense(c, d, d, True, rngs)
            classifier = _dense(c, d, c.num_labels, c.classifier_style != "last_token", rngs)
        if c.head == "base" and c.add_pooler and not c.causal:
            pooler = _dense(c, d, d, True, rngs)
        # Optional submodules are marked as data explicitly so `None` and a module share one slot.
        self.pooler = nnx.data(pooler)
        self.classifier = nnx.data(classifier)
        self.mlm_transform = nnx.data(mlm_transform)
        self.mlm_norm = nnx.data(mlm_norm)
        self.mlm_bias = nnx.data(mlm_bias)
        self.decoder = nnx.data(decoder)

    # ----------------------------------------------------------------------------------------------
    def _positions(self, input_ids: Array, attention_mask: Array, position_ids: Optional[Array]) -> Array:
        c = self.config
        if position_ids is not None:
            return position_ids
        if c.position_style == "roberta":
            # RoBERTa counts positions past the padding index and gives padding the padding index.
            not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def _attention_mask(self, attention_mask: Array) -> Array:
        """Boolean [B, S_q, S_k]: which keys each query may attend to."""
        c = self.config
        s = attention_mask.shape[1]
        allowed = jnp.broadcast_to(attention_mask[:, None, :].astype(bool), (attention_mask.shape[0], s, s))
        if c.causal:
            q = jnp.arange(s)[:, None]
            k = jnp.arange(s)[None, :]
            causal = k <= q
            if c.sliding_window and not c.per_layer_attention:
                causal = causal & (q - k < c.sliding_window)
            allowed = allowed & causal[None]
        return allowed

    def mlm_features(self, h: Array) -> Array:
        """The MLM head's transform (dense, activation, norm) before its vocabulary projection."""
        return self.mlm_norm(_act(self.config.activation, self.mlm_transform(h)))

    def lm_logits(self, h: Array) -> Array:
        """Vocabulary logits from final hidden states (MLM or causal-LM head); reusable per chunk."""
        c = self.config
        if c.head == "mlm":
            h = self.mlm_features(h)
        # The projection accumulates and returns float32 (like the attention scores): a bf16 result would
        # round every logit to 8 mantissa bits before any softmax, sampler or divergence reads it.
        if self.decoder is not None:
            logits = head_projection(h, self.decoder.kernel[...], self.decoder.dtype)
        else:
            logits = head_projection(h, self.embed.word.embedding[...], self.embed.word.dtype, vocab_major=True)
        if c.head == "mlm":
            logits = logits + self.mlm_bias[...].astype(logits.dtype)
        return softcap(logits, c.final_logit_softcap)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                              token_type_ids: Optional[Array] = None, position_ids: Optional[Array] = None,
                              taps: Any = None, dropout_key: Optional[Array] = None,
                              hooks: Optional[ForwardHooks] = None, outputs: bool = True) -> ModelOutputs:
        """One forward pass. `outputs=False` says the caller reads only the taps (a frozen teacher whose
        terms read features): the pass then stops after the last tapped layer and computes neither the
        final norm (unless the last hidden state is tapped), the pooler nor the head; every field of the
        returned `ModelOutputs` is None. A `logits` tap still runs the whole model."""
        c = self.config
        if not (c.dropout or c.attention_dropout):
            dropout_key = None
        spec = TapSpec.of(taps)
        resolved = spec.resolve(c.num_layers)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        positions = self._positions(input_ids, attention_mask, position_ids)
        h = self.embed(input_ids, positions, token_type_ids)
        layer_keys = None
        if dropout_key is not None:
            embed_key, layers_key = jax.random.split(dropout_key)
            h = dropout(h, c.dropout, embed_key)
            layer_keys = jax.random.split(layers_key, c.num_layers)
        if hooks is not None and hooks.embeddings is not None:
            h = hooks.embeddings(h)
        h = activations.constrain(h)
        if "embeddings" in resolved:
            self.sow(TAP_TYPES["embeddings"], "embeddings", h)

        # A dense model has no router: a `router_logits` request records nothing (the tap stays None), so
        # one tap set (e.g. every kind) serves dense and MoE models alike.
        layer_kinds = frozenset(k for k in resolved if k in LAYER_KINDS and (k != "router_logits" or c.num_experts))
        depth = c.num_layers if outputs or "logits" in resolved else tapped_depth(resolved, layer_kinds)
        if depth:
            rope = (rope_tables(positions, c.dim_per_head, c.rope_theta, c.rope_scaling)
                    if c.position_embedding == "rope" else None)
            if c.per_layer_attention and rope is not None and c.rope_local_theta is not None:
                rope = (rope, rope_tables(positions, c.dim_per_head, c.rope_local_theta))
            allowed = self._attention_mask(attention_mask)
            block_hook = None if hooks is None else hooks.block
            h, stacked = self._run_layers(h, allowed, rope, layer_kinds, resolved, depth, layer_keys, block_hook)
        else:
            stacked = {"hidden_states": h[None]} if "hidden_states" in resolved else {}
        if "hidden_states" in resolved:
            self.sow(TAP_TYPES["hidden_states"], "hidden_states", stacked["hidden_states"])
        for kind in sorted(layer_kinds):
            values = stacked[kind]
            if kind == "router_logits" and c.dense_layers:  # MoE layers only, as transformers reports them
                values = values[jnp.asarray([j for j, i in enumerate(resolved[kind]) if i not in c.dense_layers],
                                            jnp.int32)]
            self.sow(TAP_TYPES[kind], kind, values)
        if depth < c.num_layers or not outputs and "logits" not in resolved:
            return ModelOutputs()
        h_last = h if self.final_norm is None else self.final_norm(h)

        out = ModelOutputs(last_hidden_state=h_last)
        if c.head in ("mlm", "causal_lm"):
            out.logits = self.lm_logits(h_last)
        elif c.head == "classification":
            if c.classifier_style == "last_token":
                last = jnp.maximum(jnp.sum(attention_mask, axis=1) - 1, 0)
                pooled = jnp.take_along_axis(h_last, last[:, None, None], axis=1)[:, 0]
            else:
                pooled = jnp.tanh(self.pooler(h_last[:, 0]))
                out.pooler_output = pooled
            out.logits = self.classifier(pooled)
        elif self.pooler is not None:
            out.pooler_output = jnp.tanh(self.pooler(h_last[:, 0]))
        if "logits" in resolved and out.logits is not None:
            self.sow(TAP_TYPES["logits"], "logits", out.logits)
        return out

    def _layer_plan(self):
        """Per-layer (window, is_local) arrays for layers that differ (Gemma's local/global), else None.

        They travel through the scan with the stacked parameters, so a local and a global layer share
        one compiled body: the window becomes a mask term, the local flag picks the RoPE table.
        """
        c = self.config
        if not c.per_layer_attention:
            return None
        local = np.array([t == "sliding_attention" for t in c.layer_types])
        window = np.where(local, int(c.sliding_window), np.iinfo(np.int32).max).astype(np.int32)
        return jnp.asarray(window), jnp.asarray(local)

    def _layer_inputs(self, allowed, rope, plan):
        """The mask and RoPE tables one layer sees, given its entry of `_layer_plan` (or None)."""
        if plan is None:
            return allowed, rope
        window, local = plan
        s = allowed.shape[-1]
        q = jnp.arange(s)[:, None]
        k = jnp.arange(s)[None, :]
        allowed = allowed & ((q - k) < window)[None]
        if rope is not None and isinstance(rope[0], tuple):
            (cos_g, sin_g), (cos_l, sin_l) = rope
            rope = (jnp.where(local, cos_l, cos_g), jnp.where(local, sin_l, sin_g))
        return allowed, rope

    def _run_layers(self, h, allowed, rope, layer_kinds, resolved, depth, layer_keys=None, block_hook=None):
        """Blocks `0 .. depth-1` on `h`; returns the last block's output and `{kind: stacked taps}`.

        The blocks are cut into segments of consecutive layers that record the same tap kinds, so a
        layer records only what was asked of it: under `scan` each segment of more than one layer is
        one `lax.scan` (whose stacked outputs hold exactly the segment's layers), otherwise the layers
        are applied one by one from slices of the stacked parameters. With no taps, or one kind on
        every layer, the stack is a single scan (or a plain unrolled loop). `hidden_states` index 0 is
        the embeddings `h`, index L the last output after the final norm where the model has one.
        """
        c = self.config
        graphdef, state = nnx.split(self.layers)
        plan = self._layer_plan()
        scanned = scans_layers(c)
        hidden_index = set(resolved.get("hidden_states", ()))

        def needs(i: int) -> frozenset:
            kinds = {k for k in layer_kinds if i in resolved[k]}
            return frozenset(kinds | ({"_hidden"} if i + 1 in hidden_index else set()))

        def make_body(kinds: frozenset):
            block_kinds = kinds - {"_hidden"}

            def body(carry, xs):
                layer_state, key, layer_plan, index = xs
                dense = None
                if isinstance(layer_plan, dict):  # a model with dense layers among its MoE layers
                    layer_plan, dense = layer_plan["attention"], layer_plan["dense"]
                layer = nnx.merge(graphdef, layer_state)
                layer_allowed, layer_rope = self._layer_inputs(allowed, rope, layer_plan)
                new_h, taps = layer(carry, layer_allowed, layer_rope, block_kinds, key, dense)
                if block_hook is not None:
                    new_h = block_hook(index, carry, new_h, BlockContext(layer_allowed, layer_rope))
                new_h = activations.constrain(new_h)
                if "_hidden" in kinds:
                    taps["_hidden"] = new_h
                return new_h, taps

            if c.remat_policy != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=not scanned)
            return body

        segments: list[list] = []  # [start, stop, kinds]
        for i in range(depth):
            kinds = needs(i)
            if segments and segments[-1][2] == kinds:
                segments[-1][1] = i + 1
            else:
                segments.append([i, i + 1, kinds])

        # Where each recorded (kind, layer) lives: ("scan", segment outputs, position) or ("one", value).
        found: dict[tuple[str, int], tuple] = {}
        h_in = h
        for start, stop, kinds in segments:
            body = make_body(kinds)
            if scanned and stop - start > 1:
                whole = start == 0 and stop == c.num_layers
                cut = (lambda x: x) if whole else (lambda x: x[start:stop])
                seg_plan = None if plan is None else tuple(cut(p) for p in plan)
                if c.dense_layers:  # scanned: a per-layer flag picks the FFN (lax.cond in the block)
                    seg_plan = {"attention": seg_plan, "dense": jnp.asarray([i in c.dense_layers
                                                                             for i in range(start, stop)])}
                xs = (jax.tree.map(cut, state), None if layer_keys is None else cut(layer_keys), seg_plan,
                      jnp.arange(start, stop))
                h, ys = jax.lax.scan(body, h, xs)
                for kind, values in ys.items():
                    for i in range(start, stop):
                        found[(kind, i)] = ("scan", values, i - start, start, stop)
            else:
                for i in range(start, stop):
                    one_plan = None if plan is None else tuple(p[i] for p in plan)
                    if c.dense_layers:  # one layer at a time: its own FFN only (a static choice)
                        one_plan = {"attention": one_plan, "dense": i in c.dense_layers}
                    xs = (jax.tree.map(lambda x: x[i], state), None if layer_keys is None else layer_keys[i],
                          one_plan, i)
                    h, taps = body(h, xs)
                    for kind, value in taps.items():
                        found[(kind, i)] = ("one", value)

        if depth == c.num_layers and c.num_layers in hidden_index and self.final_norm is not None:
            # HF convention: decoders report the last hidden state after the final norm.
            found[("_hidden", c.num_layers - 1)] = ("one", self.final_norm(h))
        stacked = {kind: _stack([found[(kind, i)] for i in resolved[kind]]) for kind in layer_kinds}
        if hidden_index:
            stacked["hidden_states"] = _stack([("one", h_in) if i == 0 else found[("_hidden", i - 1)]
                                               for i in resolved["hidden_states"]])
        return h, stacked


def _stack(entries: list) -> Array:
    """`[n, ...]` from per-layer entries, slicing runs of consecutive scan outputs instead of re-stacking them."""
    pieces: list = []  # [values, first, last] for scan runs, or an array with a leading 1 axis
    for entry in entries:
        if entry[0] == "scan":
            _, values, pos = entry[:3]
            last = pieces[-1] if pieces else None
            if isinstance(last, list) and last[0] is values and last[2] == pos - 1:
                last[2] = pos
            else:
                pieces.append([values, pos, pos])
        else:
            pieces.append(entry[1][None])
    arrays = []
    for piece in pieces:
        if isinstance(piece, list):
            values, first, last = piece
            arrays.append(values if (first, last) == (0, values.shape[0] - 1) else values[first:last + 1])
        else:
            arrays.append(piece)
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)


def tapped_depth(resolved: Mapping[str, tuple], layer_kinds) -> int:
    """How many blocks a pass must run to record `resolved` taps (0: the embeddings suffice)."""
    depth = 0
    for kind, index in resolved.items():
        if kind == "hidden_states":
            depth = max(depth, max(index, default=0))
        elif kind in layer_kinds:
            depth = max(depth, max(index, default=-1) + 1)
    return depth


AUTO_UNROLL_MAX_LAYERS = 12


def scans_layers(config: ModelConfig) -> bool:
    """Whether the layer loop runs as `lax.scan`: `config.scan_layers`, or when it is None (auto), scan
    unless the backend is the CPU and the model has at most `AUTO_UNROLL_MAX_LAYERS` layers.

    On the CPU a scanned stack runs its iterations one after the other, writes every tapped tensor
    into a zero-initialized stacked buffer and slices each layer's weights per iteration; unrolled,
    XLA overlaps and fuses across layers. Deep models and accelerators keep the scan, whose compile
    time does not grow with depth.
    """
    if config.scan_layers is not None:
        return bool(config.scan_layers)
    return not (jax.default_backend() == "cpu" and config.num_layers <= AUTO_UNROLL_MAX_LAYERS)


# --------------------------------------------------------------------------------------------------
# Pure functional form used at the jit boundary.


def split(model: Transformer):
    """(graphdef, params) of a model; params is an `nnx.State` pytree of its `nnx.Param`s."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def forward(graphdef, params, batch: Mapping[str, Array], taps: Any = None, dropout_key: Optional[Array] = None,
            hooks: Optional[ForwardHooks] = None, outputs: bool = True):
    """`(outputs, intermediates)` of one forward pass; a pure function of its arguments.

    `batch` holds `input_ids` and optionally `attention_mask`, `token_type_ids`, `position_ids`.
    `taps` is anything `TapSpec.of` accepts; it must be static under jit (it is hashable).
    `dropout_key` turns on the config's dropout (training); without it the pass is deterministic.
    `hooks` (`ForwardHooks`) rewrite the residual stream after the embeddings and after each layer.
    `outputs=False`: only the taps are read; the pass stops after the last tapped layer and skips the
    final norm, pooler and head (`Transformer.__call__`), and the returned outputs are all None.
    """
    spec = TapSpec.of(taps)
    model = nnx.merge(graphdef, params)
    kwargs = dict(attention_mask=batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids"),
                                position_ids=batch.get("position_ids"), dropout_key=dropout_key)
    if hooks is not None:
        kwargs["hooks"] = hooks
    if not outputs:
        kwargs["outputs"] = False
    if not spec:
        return model(batch["input_ids"], **kwargs), Intermediates()
    outputs, *captured = nnx.capture(model, *TAP_TYPES.values())(batch["input_ids"], taps=spec, **kwargs)
    values = {}
    for state in captured:
        for path, var in nnx.to_flat_state(state):
            value = var.get_value() if hasattr(var, "get_value") else var
            values[path[-1]] = value[0] if isinstance(value, tuple) else value
    resolved = spec.resolve(model.config.num_layers)
    inter = Intermediates(**{k: values.get(k) for k in spec.kinds},
                                                layers=tuple(sorted((k, v) for k, v in resolved.items())))
    return outputs, inter


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(config, rngs=nnx.Rngs(seed))


# --------------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache (the engine under `kdjax.generate`).
#
# The cache keeps one slot per position: slot j of a row holds the key and value of that row's token
# at position j. Prompts are right-padded, so a row's prompt fills slots 0..n-1 and its t-th new
# token lands in slot n+t; the slot index *is* the position, for every row. A row's `length` says how
# many leading slots hold its tokens; slots past it (prompt padding, not yet generated positions) are
# never attended to and are overwritten as the row grows.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values by position, and how many positions of each row are filled."""

    key: Array  # [L, B, T, K, d] (K = kv heads), RoPE already applied, compute dtype
    value: Array  # [L, B, T, K, d]
    length: Array  # [B] int32: slots [0, length) are this row's tokens

    @property
    def max_length(self) -> int:
        return int(self.key.shape[2])


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` positions (prompt plus new tokens)."""
    c = config
    shape = (c.num_layers, batch, max_length, c.kv_heads, c.dim_per_head)
    return KVCache(jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype), jnp.zeros((batch,), jnp.int32))


def _cached_attention(attn: Attention, x: Array, positions_bq: Array, valid_bq: Array, key_btkd: Array,
                      value_btkd: Array, length_b: Array, rope) -> tuple[Array, Array, Array]:
    """Attention of Q new tokens over the cached positions of their row and over each other.

    Returns the attention output and the new tokens' keys and values (to be written to the cache).
    Scores against the cache and against the new chunk are formed separately and share one softmax,
    so the cache is only read here. Query heads are grouped by the kv head they share (GQA) instead
    of repeating the cached keys.
    """
    c = attn.config
    b, q_len, _ = x.shape
    h, kv, hd = c.num_heads, c.kv_heads, c.dim_per_head
    q = attn.q(x).reshape(b, q_len, h, hd)
    k = attn.k(x).reshape(b, q_len, kv, hd)
    v = attn.v(x).reshape(b, q_len, kv, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q.reshape(b, q_len, kv, h // kv, hd)
    scale = 1.0 / float(hd) ** 0.5
    s_cache = jnp.einsum("bqgrd,btgd->bgrqt", q, key_btkd, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("bqgrd,bsgd->bgrqs", q, k, preferred_element_type=jnp.float32) * scale

    slot = jnp.arange(key_btkd.shape[1])
    allow_cache = slot[None, None, :] < length_b[:, None, None]  # [B, 1, T]
    idx = jnp.arange(q_len)
    allow_new = valid_bq[:, None, :].astype(bool) & (idx[None, :] <= idx[:, None])[None]  # [B, Q, Q]
    if c.sliding_window:
        allow_cache = allow_cache & (positions_bq[:, :, None] - slot[None, None, :] < c.sliding_window)
        allow_new = allow_new & ((idx[:, None] - idx[None, :]) < c.sliding_window)[None]
    s_cache = jnp.where(allow_cache[:, None, None], s_cache, NEG_INF)
    s_new = jnp.where(allow_new[:, None, None], s_new, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1)
    p_cache, p_new = probs[..., :key_btkd.shape[1]], probs[..., key_btkd.shape[1]:]
    ctx = (jnp.einsum("bgrqt,btgd->bqgrd", p_cache.astype(value_btkd.dtype), value_btkd,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bgrqs,bsgd->bqgrd", p_new.astype(v.dtype), v, preferred_element_type=jnp.float32))
    out = attn.o(ctx.astype(v.dtype).reshape(b, q_len, h * hd))
    return out, k, v


def _extend_layers(model: Transformer, cache: KVCache, input_ids: Array, valid: Array) -> tuple[Array, Array, Array]:
    """Final hidden states [B, Q, D] of Q new tokens over `cache`, and their keys and values [L, B, Q, K, d]."""
    c = model.config
    if not c.causal or not c.pre_norm:
        raise ValueError(f"extend_cache needs a causal pre-norm decoder, got model_type={c.model_type!r}")
    q_len = input_ids.shape[1]
    positions = cache.length[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    h = model.embed(input_ids, positions, None)
    rope = (rope_tables(positions, c.dim_per_head, c.rope_theta, c.rope_scaling)
            if c.position_embedding == "rope" else None)
    layers_def, layers_state = nnx.split(model.layers)

    def body(h, xs):
        layer_state, key_btkd, value_btkd = xs
        block = nnx.merge(layers_def, layer_state)
        a, k, v = _cached_attention(block.attn, block.attn_norm(h), positions, valid, key_btkd, value_btkd,
                                    cache.length, rope)
        h = h + a
        h = h + block.mlp(block.mlp_norm(h))
        return h, (k, v)

    h, (new_k, new_v) = jax.lax.scan(body, h, (layers_state, cache.key, cache.value))
    if model.final_norm is not None:
        h = model.final_norm(h)
    return h, new_k, new_v


def extend_cache(graphdef, params, cache: KVCache, input_ids: Array, valid: Optional[Array] = None
                 ) -> tuple[Array, KVCache]:
    """Run Q new tokens per row through a causal model on top of its cache; a pure function.

    `input_ids` [B, Q] are placed at positions `cache.length + 0..Q-1` of each row; `valid` [B, Q]
    (right-padded, default all true) marks real tokens, and each row's length grows by its count.
    Each new token is one call with Q = 1 (a prompt is `prefill_cache`, or this on an empty cache).
    Returns the final hidden states [B, Q, D] (after the final norm, the input of `lm_logits`) and
    the updated cache. `cache.max_length` must hold every position written.
    """
    model = nnx.merge(graphdef, params)
    b, q_len = input_ids.shape
    valid = jnp.ones((b, q_len), bool) if valid is None else valid.astype(bool)
    h, new_k, new_v = _extend_layers(model, cache, input_ids, valid)

    def write(buf_ltkd, new_lqkd, start):
        return jax.lax.dynamic_update_slice(buf_ltkd, new_lqkd.astype(buf_ltkd.dtype), (0, start, 0, 0))

    write_rows = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)
    new_cache = KVCache(write_rows(cache.key, new_k, cache.length), write_rows(cache.value, new_v, cache.length),
                        cache.length + jnp.sum(valid, axis=1, dtype=jnp.int32))
    return h, new_cache


def prefill_cache(graphdef, params, input_ids: Array, valid: Optional[Array], max_length: int
                  ) -> tuple[Array, KVCache]:
    """`extend_cache` of right-padded prompts [B, S] on an empty cache of `max_length` slots.

    The same computation, but the (empty) cache is not attended to at all: the prompts' keys and
    values are computed over a zero-width cache and padded out to `max_length` slots.
    """
    model = nnx.merge(graphdef, params)
    c = model.config
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if valid is None else valid.astype(bool)
    h, new_k, new_v = _extend_layers(model, init_cache(c, b, 0), input_ids, valid)
    pad = ((0, 0), (0, 0), (0, max_length - s), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(new_k.astype(c.compute_dtype), pad), jnp.pad(new_v.astype(c.compute_dtype), pad),
                    jnp.sum(valid, axis=1, dtype=jnp.int32))
    return h, cache
