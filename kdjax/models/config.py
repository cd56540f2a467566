"""`ModelConfig`: one description for every transformer family kdjax runs.

A single frozen dataclass covers encoders (BERT, RoBERTa) and decoders (GPT-2, Llama, Qwen2/3, Mistral,
Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE): the families differ only in switches (norm placement and kind,
position scheme, activation, gating, attention grouping, biases, head tying, q/k norms, soft-capping,
local/global layers, mixture-of-experts MLPs).  Keeping them as data, not subclasses,
lets a student be derived from a teacher by `dataclasses.replace` and lets the hub map Hugging Face
configs in one table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text",
                         "phi3", "mixtral", "qwen3_moe")
LAYER_TYPES = ("full_attention", "sliding_attention")
HEADS = ("base", "mlm", "classification", "causal_lm")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
POSITION_EMBEDDINGS = ("learned", "rope", "none")
# RoPE scalings beyond the plain one, with the keys each needs (Hugging Face `rope_parameters` names).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # Phi-3 LongRoPE: per-frequency factors (short up to the original context, long beyond it) and the
    # cos/sin scale `attention_factor` (resolved from the context ratio when config.json omits it).
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings", "attention_factor"),
}
MOE_DISPATCHES = ("dense", "routed")
CLASSIFIER_STYLES = ("bert_pooler", "roberta", "last_token")
REMAT_POLICIES = (
        "none",  # keep every activation (fastest, most memory)
        "full",  # recompute the whole layer in the backward pass
        "dots",  # save matmul outputs, recompute elementwise ops
        "dots_no_batch",  # save only weight matmuls (no batch dims), as MaxText's default
        "minimal",  # save only the attention and MLP block outputs (named checkpoints)
)


class ConfigError(ValueError):
        """A model configuration that cannot describe a valid model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one transformer; hashable, so it can be a static jit argument."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: Optional[int] = None  # None -> num_heads (MHA); fewer -> GQA
    head_dim: Optional[int] = None  # None -> hidden_size // num_heads
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0 -> no token-type embeddings
    position_embedding: str = "learned"
    position_style: str = "absolute"  # "absolute" (arange) or "roberta" (offset past padding)
    rope_theta: float = 10000.0
    # RoPE frequency scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ("high_freq_factor", 4.0),
    # ("low_freq_factor", 1.0), ("original_max_position_embeddings", 8192), ("rope_type", "llama3")); () = none.
    rope_scaling: tuple = ()
    norm: str = "layernorm"
    norm_eps: float = 1e-12
    pre_norm: bool = False  # False: post-LN (BERT); True: pre-LN (GPT-2, Llama)
    embedding_norm: bool = True  # LayerNorm right after the embeddings (BERT/RoBERTa)
    final_norm: bool = False  # norm after the last layer (pre-LN decoders)
    activation: str = "gelu"
    gated_mlp: bool = False  # SwiGLU-style gate * up
    causal: bool = False
    sliding_window: Optional[int] = None  # Mistral-style local attention
    # Per-layer attention kind ("full_attention" / "sliding_attention"), as HF `layer_types`; () = every
    # layer uses `sliding_window` (None: full). Gemma 2/3 alternate local and global layers.
    layer_types: tuple = ()
    rope_local_theta: Optional[float] = None  # RoPE base of sliding layers (Gemma 3); None = rope_theta
    qk_norm: bool = False  # per-head norm of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: bool = False  # RMSNorm scales by (1 + w) with w initialized at 0 (Gemma)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP, before each residual add (Gemma 2/3)
    embedding_scale: bool = False  # multiply the token embeddings by sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: Optional[float] = None  # scores scale 1/sqrt(this); None = head_dim
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # Mixture of experts (Mixtral, Qwen3-MoE): 0 = dense MLP. Experts are gated MLPs of width
    # `moe_intermediate_size` (None = intermediate_size), stacked [L, E, ...].
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (kdjax.models.moe)
    # "dense": every expert on every token, weighted by the sparse gate (exact); "routed": each expert
    # gets a fixed-size buffer of ceil(moe_capacity_factor * tokens * k / E) tokens, overflow is dropped.
    moe_dispatch: str = "dense"
    moe_capacity_factor: float = 1.25
    # Layers of an MoE model whose FFN is a dense MLP of width intermediate_size (Qwen3-MoE's
    # mlp_only_layers / decoder_sparse_step). Both FFNs are stored stacked over all layers; a layer
    # uses one and the other's slice stays zero (not loaded, not exported).
    dense_layers: tuple = ()
    qkv_bias: bool = True
    out_bias: bool = True  # attention output projection bias
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 0
    head: str = "base"
    num_labels: int = 2
    add_pooler: bool = True  # encoders: tanh pooler over token 0 (BertModel's pooler)
    classifier_style: str = "bert_pooler"
    initializer_range: float = 0.02
    # Training-time dropout (inverted), active only when a forward pass is given a dropout key: `dropout`
    # on the embeddings and on each attention / FFN output before its residual add (BERT's hidden
    # dropout), `attention_dropout` on the attention probabilities. Teachers and evaluation run without.
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: Optional[bool] = None  # None: auto (kdjax.models.transformer.scans_layers)
    remat_policy: str = "none"
    extra: tuple = ()  # (key, value) pairs carried to the exported HF config

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping) or hasattr(self.rope_scaling, "to_dict"):
            # A dict from a config file or a HF config: stored as sorted pairs to stay hashable.
            scaling = self.rope_scaling.to_dict() if hasattr(self.rope_scaling, "to_dict") else self.rope_scaling
            object.__setattr__(self, "rope_scaling", tuple(sorted(
                (k, tuple(v) if isinstance(v, list) else v) for k, v in dict(scaling).items())))
        elif self.rope_scaling is None:
            object.__setattr__(self, "rope_scaling", ())
        if not isinstance(self.dense_layers, tuple):
            object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers or ()))
        object.__setattr__(self, "layer_types", tuple(self.layer_types or ()))
        self.validate()

    # ----------------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def per_layer_attention(self) -> bool:
        """Whether layers differ in their attention window or RoPE base (passed through the scan)."""
        return "sliding_attention" in self.layer_types

    @property
    def is_decoder(self) -> bool:
        return self.causal

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad(f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for field, allowed in (("head", HEADS), ("norm", NORMS), ("activation", ACTIVATIONS),
                                                      ("position_embedding", POSITION_EMBEDDINGS),
                                                      ("classifier_style", CLASSIFIER_STYLES),
                                                      ("remat_policy", REMAT_POLICIES), ("moe_dispatch", MOE_DISPATCHES)):
            value = getattr(self, field)
            if value not in allowed:
                bad(f"ModelConfig.{field}={value!r} is not one of {', '.join(allowed)}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if int(getattr(self, field)) <= 0:
                bad(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly")
        if self.num_heads % self.kv_heads:
            bad(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.position_embedding == "rope" and self.dim_per_head % 2:
            bad(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.rope_scaling:
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type")
            required = ROPE_SCALING_KEYS.get(kind)
            if required is None:
                bad(f"rope scaling {kind!r} is not supported; supported: default, {', '.join(ROPE_SCALING_KEYS)}")
            missing = [k for k in required if k not in scaling]
            if missing:
                bad(f"rope scaling {kind!r} needs {', '.join(missing)}; got {', '.join(sorted(scaling)) or 'nothing'}")
            if "factor" in scaling and float(scaling["factor"]) <= 0:
                bad(f"rope scaling factor must be positive, got {scaling['factor']}")
            if kind == "longrope":
                for key in ("long_factor", "short_factor"):
                    if len(scaling[key]) != self.dim_per_head // 2:
                        bad(f"longrope {key} has {len(scaling[key])} entries; it needs head_dim / 2 = "
                            f"{self.dim_per_head // 2}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                bad(f"ModelConfig.layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                bad(f"ModelConfig.layer_types has {unknown}; each entry is one of {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                bad("ModelConfig.layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts "
                    f"({self.num_experts})")
            if not self.gated_mlp:
                bad("ModelConfig.num_experts > 0 needs gated_mlp=True (experts are gated MLPs)")
            if not float(self.moe_capacity_factor) > 0:
                bad(f"ModelConfig.moe_capacity_factor must be positive, got {self.moe_capacity_factor}")
        if self.dense_layers:
            if not self.num_experts:
                bad("ModelConfig.dense_layers applies to mixture-of-experts models (num_experts > 0)")
            wrong = [i for i in self.dense_layers if not 0 <= int(i) < self.num_layers]
            if wrong or list(self.dense_layers) != sorted(set(self.dense_layers)):
                bad(f"ModelConfig.dense_layers must be sorted distinct layer indices in 0..{self.num_layers - 1}, "
                    f"got {list(self.dense_layers)}")
        for field in ("dropout", "attention_dropout"):
            rate = getattr(self, field)
            if not 0.0 <= float(rate) < 1.0:
                bad(f"ModelConfig.{field} must be in [0, 1), got {rate}")
        if self.head == "classification" and self.num_labels < 1:
            bad("a classification head needs num_labels >= 1")
        for dt in (self.dtype, self.param_dtype):
            try:
                jnp.dtype(dt)
            except TypeError:
                bad(f"unknown dtype {dt!r}; use float32 or bfloat16")

    # ----------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameter count computed from the shapes (no model is built)."""
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        h, kv, hd = self.num_heads, self.kv_heads, self.dim_per_head
        ln = 2 * d if self.norm == "layernorm" else d
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.out_bias:
            attn += d
        mlp = (3 if self.gated_mlp else 2) * d * f + ((f * (2 if self.gated_mlp else 1) + d) if self.mlp_bias else 0)
        dense_mlp = mlp
        if self.num_experts:
            mlp = self.num_experts * 3 * d * self.expert_size + d * self.num_experts
            mlp += len(self.dense_layers) * (dense_mlp - mlp) / max(l, 1)  # per-layer average
        if self.qk_norm:
            attn += 2 * hd
        total = l * (attn + mlp + (4 if self.sandwich_norm else 2) * ln) + v * d
        if self.position_embedding == "learned":
            total += self.max_position_embeddings * d
        total += self.type_vocab_size * d
        total += ln if self.embedding_norm else 0
        total += ln if self.final_norm else 0
        if self.head == "mlm":
            total += d * d + d + ln + v + (0 if self.tie_word_embeddings else v * d)
        elif self.head == "causal_lm" and not self.tie_word_embeddings:
            total += v * d
        elif self.head == "classification":
            pool = d * d + d if self.classifier_style in ("bert_pooler", "roberta") else 0
            total += pool + d * self.num_labels + (self.num_labels if self.classifier_style != "last_token" else 0)
        if self.head == "base" and self.add_pooler and not self.causal:
            total += d * d + d
        return int(total)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Family presets with tiny defaults that tests and examples override."""
    family = dict(
            bert=dict(model_type="bert", type_vocab_size=2, norm="layernorm", norm_eps=1e-12,
                                pre_norm=False, embedding_norm=True, activation="gelu", classifier_style="bert_pooler"),
            roberta=dict(model_type="roberta", type_vocab_size=1, norm="layernorm", norm_eps=1e-5,
                                      pre_norm=False, embedding_norm=True, activation="gelu", position_style="roberta",
                                      pad_token_id=1, classifier_style="roberta", add_pooler=False),
            gpt2=dict(model_type="gpt2", norm="layernorm", norm_eps=1e-5, pre_norm=True, embedding_norm=False,
                                final_norm=True, activation="gelu_new", causal=True, classifier_style="last_token",
                                pad_token_id=None, add_pooler=False),
            llama=dict(model_type="llama", norm="rmsnorm", norm_eps=1e-6, pre_norm=True, embedding_norm=False,
                                  final_norm=True, activation="silu", gated_mlp=True, causal=True, position_embedding="rope",
                                  qkv_bias=False, out_bias=False, mlp_bias=False, tie_word_embeddings=False,
                                  classifier_style="last_token", pad_token_id=None, add_pooler=False),
    )
    family["qwen2"] = dict(family["llama"], model_type="qwen2", qkv_bias=True, rope_theta=1e6)
    family["mistral"] = dict(family["llama"], model_type="mistral")
    family["qwen3"] = dict(family["llama"], model_type="qwen3", qk_norm=True, rope_theta=1e6)
    family["phi3"] = dict(family["llama"], model_type="phi3", norm_eps=1e-5)
    family["gemma2"] = dict(family["llama"], model_type="gemma2", activation="gelu_new", norm_offset=True,
                            sandwich_norm=True, embedding_scale=True, tie_word_embeddings=True)
    family["gemma3_text"] = dict(family["gemma2"], model_type="gemma3_text", qk_norm=True)
    family["mixtral"] = dict(family["llama"], model_type="mixtral", num_experts=8, num_experts_per_tok=2,
                             router_aux_loss_coef=0.02)
    family["qwen3_moe"] = dict(family["qwen3"], model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                               router_aux_loss_coef=0.001)
    if name not in family:
        raise ConfigError(f"unknown model_type {name!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return ModelConfig(**{**family[name], **overrides})


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)
