"""Hugging Face <-> kdjax families: one table, one `Family` entry per family.

A `Family` is data: the HF `model_type`(s) it reads, its transformers class names, the `config.json`
fields that map one-to-one onto `ModelConfig` fields (read and written from the same tuple), a few
family-specific config hooks (biases, sliding windows, MoE fields), and the names that differ in its
weight layout (norm names, fused projections, the MoE block). The model-side switches of each family
(norm kind, activation, q/k norms, ...) are `kdjax.models.config.preset`'s; every family runs on the
one `kdjax.models.Transformer`.

Weight rows are `(hf_name, kdjax_path, transform)`. Layer rows carry `{i}` in the HF name and a
`layers/...` kdjax path (stacked on a leading axis); expert rows also carry `{e}` and stack experts
on the next axis (`[L, E, ...]`). Transforms:

- `copy`        the tensor as is
- `linear`      a torch `nn.Linear` weight [out, in] -> kdjax kernel [in, out] (transpose)
- `qkv:N`       GPT-2's fused Conv1D `c_attn` [in, 3·out]: the N-th third of the columns
- `rows:A:B`    rows A..B of a fused `nn.Linear` weight (Phi-3's `qkv_proj`, `gate_up_proj`), transposed;
                export concatenates the parts back in row order
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from kdjax.models.config import ROPE_SCALING_KEYS, SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, preset

_ACT_FROM_HF = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}

_ARCH_SUFFIX_TO_HEAD = (("ForMaskedLM", "mlm"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
                        ("ForSequenceClassification", "classification"))

# (ModelConfig field, HF config key, default); default None = the key is required.
Fields = tuple[tuple[str, str, Any], ...]

_ENCODER_FIELDS: Fields = (
    ("vocab_size", "vocab_size", None), ("hidden_size", "hidden_size", None),
    ("num_layers", "num_hidden_layers", None), ("num_heads", "num_attention_heads", None),
    ("intermediate_size", "intermediate_size", None), ("max_position_embeddings", "max_position_embeddings", 512),
    ("type_vocab_size", "type_vocab_size", 2), ("norm_eps", "layer_norm_eps", 1e-12),
    ("tie_word_embeddings", "tie_word_embeddings", True), ("initializer_range", "initializer_range", 0.02))

_GPT2_FIELDS: Fields = (
    ("vocab_size", "vocab_size", None), ("hidden_size", "n_embd", None), ("num_layers", "n_layer", None),
    ("num_heads", "n_head", None), ("max_position_embeddings", "n_positions", 1024),
    ("norm_eps", "layer_norm_epsilon", 1e-5), ("pad_token_id", "pad_token_id", None),
    ("tie_word_embeddings", "tie_word_embeddings", True), ("initializer_range", "initializer_range", 0.02))

_DECODER_FIELDS: Fields = (
    ("vocab_size", "vocab_size", None), ("hidden_size", "hidden_size", None),
    ("num_layers", "num_hidden_layers", None), ("num_heads", "num_attention_heads", None),
    ("intermediate_size", "intermediate_size", None), ("max_position_embeddings", "max_position_embeddings", 4096),
    ("norm_eps", "rms_norm_eps", 1e-6), ("pad_token_id", "pad_token_id", None),
    ("tie_word_embeddings", "tie_word_embeddings", False), ("initializer_range", "initializer_range", 0.02),
    ("mlp_bias", "mlp_bias", False))

_GEMMA_FIELDS: Fields = tuple(f for f in _DECODER_FIELDS if f[0] not in ("tie_word_embeddings", "mlp_bias")) + (
    ("tie_word_embeddings", "tie_word_embeddings", True), ("query_pre_attn_scalar", "query_pre_attn_scalar", 256),
    ("attn_logit_softcap", "attn_logit_softcapping", 0), ("final_logit_softcap", "final_logit_softcapping", 0))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The weight names of a decoder family (`model.layers.{i}.` ...) where they differ from Llama's."""

    norms: tuple[tuple[str, str], ...] = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
    fused_qkv: Optional[str] = None  # one [q; k; v] projection (Phi-3's "qkv_proj")
    fused_gate_up: Optional[str] = None  # one [gate; up] projection (Phi-3's "gate_up_proj")
    moe_block: str = "mlp"  # module holding the router ("gate") and the experts
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down of one expert


_LLAMA_LAYOUT = Layout()
_GEMMA_LAYOUT = Layout(norms=(("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
                              ("pre_feedforward_layernorm", "mlp_norm"),
                              ("post_feedforward_layernorm", "mlp_post_norm")))
_PHI3_LAYOUT = Layout(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj")
_MIXTRAL_LAYOUT = Layout(moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"))


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything kdjax needs to read and write one Hugging Face family."""

    model_type: str  # kdjax model_type, also the HF model_type written on export
    class_prefix: str  # transformers class names: <prefix>ForCausalLM, <prefix>Model, ...
    base_prefix: str  # the trunk's module name in a checkpoint with a head ("model.", "bert.", ...)
    fields: Fields  # one-to-one config fields, read and written
    weights: str  # "encoder" (BERT/RoBERTa), "gpt2" or "decoder"
    hf_model_types: tuple[str, ...] = ()  # extra HF model_types read as this family
    read: Optional[Callable[[dict], dict]] = None  # family-specific ModelConfig fields from config.json
    write: Optional[Callable[[ModelConfig], dict]] = None  # family-specific config.json fields
    layout: Layout = _LLAMA_LAYOUT
    act_key: str = "hidden_act"
    act_out: Optional[str] = None  # HF activation spelling on export (default: `_ACT_TO_HF`)
    class_names: tuple[tuple[str, str], ...] = ()  # per-head class names that break the prefix pattern
    export_constants: tuple[tuple[str, Any], ...] = ()  # fixed config.json entries on export

    def class_name(self, head: str) -> str:
        override = dict(self.class_names).get(head)
        if override:
            return override
        suffix = {"mlm": "ForMaskedLM", "causal_lm": "ForCausalLM", "classification": "ForSequenceClassification",
                  "base": "Model"}[head]
        if head == "causal_lm" and self.model_type == "gpt2":
            suffix = "LMHeadModel"
        return self.class_prefix + suffix


# --------------------------------------------------------------------------------------------------
# Config hooks shared by several families.


def _rope_params(hf: dict) -> dict:
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_theta(hf: dict, default: float) -> float:
    params = _rope_params(hf)
    if "full_attention" in params:  # per layer type (Gemma 3)
        params = params["full_attention"]
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def _scaling_from(params: dict) -> tuple:
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type in ("default", None):
        return ()
    if rope_type not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope scaling {rope_type!r} is not supported; supported: default, "
                          f"{', '.join(ROPE_SCALING_KEYS)}")
    keys = ROPE_SCALING_KEYS[rope_type]
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"rope scaling {rope_type!r} in config.json lacks {', '.join(missing)}")
    return tuple(sorted([("rope_type", rope_type)] + [(k, params[k]) for k in keys]))


def _rope_scaling(hf: dict) -> tuple:
    """`ModelConfig.rope_scaling` from `rope_parameters` (transformers >= 5) or `rope_scaling` (older)."""
    params = _rope_params(hf)
    if "full_attention" in params:
        params = params["full_attention"]
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
    if params and params.get("rope_type", params.get("type")) == "longrope":
        return _longrope_from(params, hf)
    return _scaling_from(params)


def _longrope_from(params: dict, hf: dict) -> tuple:
    """Phi-3's LongRoPE: both factor lists, the original context and the resolved cos/sin scale.

    As transformers does: `factor` defaults to `max_position_embeddings / original_max_position_embeddings`
    and `attention_factor` to `sqrt(1 + ln(factor) / ln(original))` (1 when `factor <= 1`)."""
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    missing = [k for k, v in (("long_factor", params.get("long_factor")), ("short_factor", params.get("short_factor")),
                              ("original_max_position_embeddings", original)) if v is None]
    if missing:
        raise ConfigError(f"rope scaling 'longrope' in config.json lacks {', '.join(missing)}")
    original = int(original)
    factor = params.get("factor")
    if factor is None:
        factor = float(hf.get("max_position_embeddings", original)) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return (("attention_factor", float(attention)), ("long_factor", tuple(float(x) for x in params["long_factor"])),
            ("original_max_position_embeddings", original), ("rope_type", "longrope"),
            ("short_factor", tuple(float(x) for x in params["short_factor"])))


def _rope_out(c: ModelConfig) -> dict:
    return {"rope_type": "default", "rope_theta": c.rope_theta,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dict(c.rope_scaling).items()}}


def _longrope_out(c: ModelConfig) -> dict:
    """Phi-3 keeps `original_max_position_embeddings` at the top level of config.json as well."""
    scaling = dict(c.rope_scaling)
    if scaling.get("rope_type") != "longrope":
        return {}
    return dict(original_max_position_embeddings=scaling["original_max_position_embeddings"])


def _decoder_read(hf: dict) -> dict:
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    return dict(num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=hf.get("head_dim") or d // h,
                rope_theta=_rope_theta(hf, 10000.0), rope_scaling=_rope_scaling(hf))


def _decoder_write(c: ModelConfig) -> dict:
    return dict(num_key_value_heads=c.kv_heads, head_dim=c.dim_per_head, rope_theta=c.rope_theta,
                rope_parameters=_rope_out(c))


def _attention_bias(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, out_bias=bias)


def _attention_bias_out(c: ModelConfig) -> dict:
    if c.qkv_bias != c.out_bias:
        raise ConfigError(f"{c.model_type} checkpoints have one attention_bias switch; qkv_bias and out_bias "
                          "must agree")
    return dict(attention_bias=c.qkv_bias)


def _window(hf: dict, switch: Optional[str] = None) -> dict:
    """Mistral-style sliding window (all layers), or per-layer windows when `layer_types` says so."""
    window = hf.get("sliding_window")
    if switch is not None and not hf.get(switch, False):
        window = None
    types = tuple(hf.get("layer_types") or ())
    if window and types and "full_attention" in types:
        return dict(sliding_window=window, layer_types=types)
    return dict(sliding_window=window)


def _window_out(c: ModelConfig, switch: Optional[str] = None) -> dict:
    out = dict(sliding_window=c.sliding_window)
    if switch:
        out[switch] = c.sliding_window is not None
    if c.layer_types:
        out["layer_types"] = list(c.layer_types)
    return out


def _chain(*fns: Callable) -> Callable:
    def merged(arg):
        out: dict = {}
        for fn in fns:
            out.update(fn(arg))
        return out
    return merged


def _gpt2_read(hf: dict) -> dict:
    return dict(intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"])


def _gemma_types(hf: dict, pattern: int) -> tuple:
    types = hf.get("layer_types")
    if types:
        return tuple(types)
    pattern = int(hf.get("sliding_window_pattern") or pattern)
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(hf["num_hidden_layers"]))


def _gemma2_read(hf: dict) -> dict:
    return dict(sliding_window=hf.get("sliding_window"), layer_types=_gemma_types(hf, 2),
                attn_logit_softcap=hf.get("attn_logit_softcapping") or None,
                final_logit_softcap=hf.get("final_logit_softcapping") or None)


def _gemma3_read(hf: dict) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True (Gemma 3 as an encoder) is not supported")
    params = _rope_params(hf)
    local = params.get("sliding_attention", {}).get("rope_theta") if "sliding_attention" in params else None
    local = local or hf.get("rope_local_base_freq", 10000.0)
    return dict(_gemma2_read(hf), layer_types=_gemma_types(hf, 6), rope_local_theta=float(local))


def _gemma_write(c: ModelConfig) -> dict:
    return dict(layer_types=list(c.layer_types), sliding_window=c.sliding_window,
                attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap)


def _gemma3_write(c: ModelConfig) -> dict:
    local = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
    return dict(_gemma_write(c), rope_parameters={
        "full_attention": _rope_out(c), "sliding_attention": {"rope_type": "default", "rope_theta": local}},
        rope_local_base_freq=local)


def _mixtral_read(hf: dict) -> dict:
    return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02))


def _mixtral_write(c: ModelConfig) -> dict:
    return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                router_aux_loss_coef=c.router_aux_loss_coef)


def _qwen3_moe_read(hf: dict) -> dict:
    # As transformers decides: layer i is sparse when it is not in mlp_only_layers and (i + 1) is a
    # multiple of decoder_sparse_step; the others are dense MLPs of width intermediate_size.
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    num_layers = int(hf["num_hidden_layers"])
    wrong = [i for i in hf.get("mlp_only_layers") or () if not 0 <= int(i) < num_layers]
    if wrong:
        raise ConfigError(f"qwen3_moe mlp_only_layers {wrong} lie outside the model's {num_layers} layers")
    dense_layers = tuple(sorted({int(i) for i in hf.get("mlp_only_layers") or ()} | {
        i for i in range(num_layers) if (i + 1) % step}))
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not experts:
        raise ConfigError("qwen3_moe config.json lacks num_experts (or num_local_experts)")
    return dict(num_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 8),
                moe_intermediate_size=hf.get("moe_intermediate_size"),
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), dense_layers=dense_layers)


def _qwen3_moe_write(c: ModelConfig) -> dict:
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.expert_size, norm_topk_prob=c.norm_topk_prob,
                router_aux_loss_coef=c.router_aux_loss_coef, decoder_sparse_step=1,
                mlp_only_layers=list(c.dense_layers))


# --------------------------------------------------------------------------------------------------
# The table.

_ENCODER_CONSTANTS = (("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert", "Bert", "bert.", _ENCODER_FIELDS + (("pad_token_id", "pad_token_id", 0),), "encoder",
           export_constants=_ENCODER_CONSTANTS),
    Family("roberta", "Roberta", "roberta.", _ENCODER_FIELDS + (("pad_token_id", "pad_token_id", 1),), "encoder",
           export_constants=_ENCODER_CONSTANTS),
    Family("gpt2", "GPT2", "transformer.", _GPT2_FIELDS, "gpt2", read=_gpt2_read,
           write=lambda c: dict(n_inner=c.intermediate_size), act_key="activation_function"),
    Family("llama", "Llama", "model.", _DECODER_FIELDS, "decoder", read=_chain(_decoder_read, _attention_bias),
           write=_chain(_decoder_write, _attention_bias_out)),
    Family("qwen2", "Qwen2", "model.", _DECODER_FIELDS, "decoder",
           read=_chain(_decoder_read, lambda hf: dict(qkv_bias=True, out_bias=False,
                                                       **_window(hf, "use_sliding_window"))),
           write=_chain(_decoder_write, lambda c: _window_out(c, "use_sliding_window"))),
    Family("mistral", "Mistral", "model.", _DECODER_FIELDS, "decoder", read=_chain(_decoder_read, _window),
           write=_chain(_decoder_write, _window_out)),
    Family("qwen3", "Qwen3", "model.", _DECODER_FIELDS, "decoder",
           read=_chain(_decoder_read, _attention_bias, lambda hf: _window(hf, "use_sliding_window")),
           write=_chain(_decoder_write, _attention_bias_out, lambda c: _window_out(c, "use_sliding_window"))),
    Family("phi3", "Phi3", "model.", _DECODER_FIELDS, "decoder", read=_chain(_decoder_read, _window),
           write=_chain(_decoder_write, _window_out, _longrope_out), layout=_PHI3_LAYOUT),
    Family("gemma2", "Gemma2", "model.", _GEMMA_FIELDS, "decoder",
           read=_chain(_decoder_read, _attention_bias, _gemma2_read),
           write=_chain(_decoder_write, _attention_bias_out, _gemma_write), layout=_GEMMA_LAYOUT,
           act_key="hidden_activation", act_out="gelu_pytorch_tanh"),
    Family("gemma3_text", "Gemma3", "model.", _GEMMA_FIELDS, "decoder",
           read=_chain(_decoder_read, _attention_bias, _gemma3_read),
           write=_chain(_decoder_write, _attention_bias_out, _gemma3_write), layout=_GEMMA_LAYOUT,
           act_key="hidden_activation", act_out="gelu_pytorch_tanh",
           class_names=(("base", "Gemma3TextModel"), ("classification", "Gemma3TextForSequenceClassification"))),
    Family("mixtral", "Mixtral", "model.", _DECODER_FIELDS, "decoder", read=_chain(_decoder_read, _window,
                                                                                    _mixtral_read),
           write=_chain(_decoder_write, _window_out, _mixtral_write), layout=_MIXTRAL_LAYOUT),
    Family("qwen3_moe", "Qwen3Moe", "model.", _DECODER_FIELDS, "decoder",
           read=_chain(_decoder_read, _attention_bias, lambda hf: _window(hf, "use_sliding_window"), _qwen3_moe_read),
           write=_chain(_decoder_write, _attention_bias_out, lambda c: _window_out(c, "use_sliding_window"),
                        _qwen3_moe_write)),
)}
assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES), "kdjax.models.config.SUPPORTED_MODEL_TYPES and FAMILIES disagree"

_BY_HF_TYPE = {t: f for f in FAMILIES.values() for t in (f.model_type,) + f.hf_model_types}


def family(model_type: Any) -> Family:
    """The family of a kdjax or HF `model_type`; a one-line error naming the supported ones otherwise."""
    found = _BY_HF_TYPE.get(model_type)
    if found is None:
        raise ConfigError(f"unknown model_type {model_type!r}; supported: {', '.join(_BY_HF_TYPE)}")
    return found


def head_from_architectures(architectures: Optional[list]) -> str:
    for arch in architectures or ():
        for suffix, head in _ARCH_SUFFIX_TO_HEAD:
            if arch.endswith(suffix):
                return head
    return "base"


def architecture_name(config: ModelConfig) -> str:
    return family(config.model_type).class_name(config.head)


def config_from_hf(hf: dict, *, head: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict."""
    fam = family(hf.get("model_type"))
    head = head or head_from_architectures(hf.get("architectures"))
    num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    act = hf.get(fam.act_key) or hf.get("hidden_act") or "gelu"
    if act not in _ACT_FROM_HF:
        raise ConfigError(f"activation {act!r} ({fam.act_key}) is not supported; supported: "
                          f"{', '.join(sorted(_ACT_FROM_HF))}")
    kw: dict[str, Any] = {}
    for field, key, default in fam.fields:
        if default is None and field != "pad_token_id":
            if key not in hf:
                raise ConfigError(f"{fam.model_type} config.json lacks {key!r}")
            kw[field] = hf[key]
        else:
            kw[field] = hf.get(key, default)
    if fam.read is not None:
        kw.update(fam.read(hf))
    kw.update(head=head, num_labels=num_labels, activation=_ACT_FROM_HF[act])
    return preset(fam.model_type, **{**kw, **overrides})


def config_to_hf(config: ModelConfig, *, id2label: Optional[dict] = None) -> dict:
    """A Hugging Face config dict (the arguments of `transformers.<Family>Config`)."""
    c = config
    fam = family(c.model_type)
    labels = id2label or {i: f"LABEL_{i}" for i in range(c.num_labels)}
    out: dict[str, Any] = dict(model_type=c.model_type, architectures=[architecture_name(c)],
                               vocab_size=c.vocab_size, id2label={int(k): v for k, v in labels.items()},
                               label2id={v: int(k) for k, v in labels.items()},
                               tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id,
                               initializer_range=c.initializer_range)
    for field, key, _ in fam.fields:
        out[key] = getattr(c, field)
    out[fam.act_key] = fam.act_out or _ACT_TO_HF[c.activation]
    if fam.write is not None:
        out.update(fam.write(c))
    out.update(dict(fam.export_constants))
    out.update(dict(c.extra))
    return out


# --------------------------------------------------------------------------------------------------
# Weight tables.


@dataclasses.dataclass(frozen=True)
class WeightRow:
    hf: str  # may contain {i} (layer) and {e} (expert)
    path: str  # kdjax flat path, "/"-separated; layer rows start with "layers/"
    transform: str = "copy"
    layers: Optional[tuple] = None  # the layers that have this tensor (None: all); the others' slices are zero

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


def row_names(row: WeightRow, config: ModelConfig) -> Any:
    """The HF tensor names of one row, nested like the kdjax stack: `[L][E]`, `[L]` or a single name.

    A layer outside `row.layers` has no tensor: its name is None (its slice of the stack is zeros)."""
    def experts(i):
        if row.layers is not None and i not in row.layers:
            return [None] * config.num_experts if row.per_expert else None
        if row.per_expert:
            return [row.hf.format(i=i, e=e) for e in range(config.num_experts)]
        return row.hf.format(i=i) if row.per_layer else row.hf
    if row.per_layer:
        return [experts(i) for i in range(config.num_layers)]
    return experts(None)


def flat_names(nested: Any) -> list[str]:
    if nested is None:  # a layer without this tensor
        return []
    if isinstance(nested, str):
        return [nested]
    return [n for item in nested for n in flat_names(item)]


def _linear(hf: str, path: str, bias: bool) -> list[WeightRow]:
    rows = [WeightRow(hf + ".weight", path + "/kernel", "linear")]
    if bias:
        rows.append(WeightRow(hf + ".bias", path + "/bias"))
    return rows


def _fused_linear(hf: str, parts: list[tuple[str, int]], bias: bool) -> list[WeightRow]:
    """Rows of one fused `nn.Linear` split by output rows into `(kdjax path, width)` parts, in order."""
    rows, start = [], 0
    for path, width in parts:
        rows.append(WeightRow(hf + ".weight", path + "/kernel", f"rows:{start}:{start + width}"))
        if bias:
            rows.append(WeightRow(hf + ".bias", path + "/bias", f"slice:{start}:{start + width}"))
        start += width
    return rows


def _norm(hf: str, path: str, config: ModelConfig, names=("weight", "bias")) -> list[WeightRow]:
    rows = [WeightRow(f"{hf}.{names[0]}", path + "/scale")]
    if config.norm == "layernorm":
        rows.append(WeightRow(f"{hf}.{names[1]}", path + "/bias"))
    return rows


def _encoder_rows(c: ModelConfig) -> list[WeightRow]:
    rows = [WeightRow("embeddings.word_embeddings.weight", "embed/word/embedding"),
            WeightRow("embeddings.position_embeddings.weight", "embed/position/embedding")]
    if c.type_vocab_size:
        rows.append(WeightRow("embeddings.token_type_embeddings.weight", "embed/token_type/embedding"))
    rows += _norm("embeddings.LayerNorm", "embed/norm", c)
    lay = "encoder.layer.{i}."
    for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
        rows += _linear(lay + "attention.self." + name, "layers/attn/" + short, c.qkv_bias)
    rows += _linear(lay + "attention.output.dense", "layers/attn/o", c.out_bias)
    rows += _norm(lay + "attention.output.LayerNorm", "layers/attn_norm", c)
    rows += _linear(lay + "intermediate.dense", "layers/mlp/up", c.mlp_bias)
    rows += _linear(lay + "output.dense", "layers/mlp/down", c.mlp_bias)
    rows += _norm(lay + "output.LayerNorm", "layers/mlp_norm", c)
    return rows


def _gpt2_rows(c: ModelConfig) -> list[WeightRow]:
    rows = [WeightRow("wte.weight", "embed/word/embedding"), WeightRow("wpe.weight", "embed/position/embedding")]
    lay = "h.{i}."
    rows += _norm(lay + "ln_1", "layers/attn_norm", c)
    for n, short in enumerate(("q", "k", "v")):
        rows.append(WeightRow(lay + "attn.c_attn.weight", f"layers/attn/{short}/kernel", f"qkv:{n}"))
        rows.append(WeightRow(lay + "attn.c_attn.bias", f"layers/attn/{short}/bias", f"qkv:{n}"))
    rows += [WeightRow(lay + "attn.c_proj.weight", "layers/attn/o/kernel"),
             WeightRow(lay + "attn.c_proj.bias", "layers/attn/o/bias")]
    rows += _norm(lay + "ln_2", "layers/mlp_norm", c)
    rows += [WeightRow(lay + "mlp.c_fc.weight", "layers/mlp/up/kernel"),
             WeightRow(lay + "mlp.c_fc.bias", "layers/mlp/up/bias"),
             WeightRow(lay + "mlp.c_proj.weight", "layers/mlp/down/kernel"),
             WeightRow(lay + "mlp.c_proj.bias", "layers/mlp/down/bias")]
    rows += _norm("ln_f", "final_norm", c)
    return rows


def _decoder_rows(c: ModelConfig, layout: Layout) -> list[WeightRow]:
    rows = [WeightRow("embed_tokens.weight", "embed/word/embedding")]
    lay = "layers.{i}."
    q_width, kv_width = c.num_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
    if layout.fused_qkv:
        rows += _fused_linear(lay + "self_attn." + layout.fused_qkv, [
            ("layers/attn/q", q_width), ("layers/attn/k", kv_width), ("layers/attn/v", kv_width)], c.qkv_bias)
    else:
        for name, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            rows += _linear(lay + "self_attn." + name, "layers/attn/" + short, c.qkv_bias)
    rows += _linear(lay + "self_attn.o_proj", "layers/attn/o", c.out_bias)
    if c.qk_norm:
        rows += _norm(lay + "self_attn.q_norm", "layers/attn/q_norm", c)
        rows += _norm(lay + "self_attn.k_norm", "layers/attn/k_norm", c)
    for hf_name, path in layout.norms:
        rows += _norm(lay + hf_name, "layers/" + path, c)
    if c.num_experts:
        block = lay + layout.moe_block + "."
        sparse = tuple(i for i in range(c.num_layers) if i not in c.dense_layers) if c.dense_layers else None
        moe_rows = _linear(block + "gate", "layers/moe/router", False)
        for hf_name, path in zip(layout.expert_names, ("gate", "up", "down")):
            moe_rows.append(WeightRow(block + "experts.{e}." + hf_name + ".weight", "layers/moe/" + path, "linear"))
        rows += [dataclasses.replace(r, layers=sparse) for r in moe_rows]
        if c.dense_layers:  # Qwen3-MoE's dense layers: a gated MLP under the same `mlp.` prefix
            dense_rows = []
            for name, path in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                dense_rows += _linear(lay + "mlp." + name, "layers/mlp/" + path, c.mlp_bias)
            rows += [dataclasses.replace(r, layers=tuple(c.dense_layers)) for r in dense_rows]
    elif layout.fused_gate_up:
        rows += _fused_linear(lay + "mlp." + layout.fused_gate_up, [
            ("layers/mlp/gate", c.intermediate_size), ("layers/mlp/up", c.intermediate_size)], c.mlp_bias)
    else:
        if c.gated_mlp:
            rows += _linear(lay + "mlp.gate_proj", "layers/mlp/gate", c.mlp_bias)
        rows += _linear(lay + "mlp.up_proj", "layers/mlp/up", c.mlp_bias)
    if not c.num_experts:
        rows += _linear(lay + "mlp.down_proj", "layers/mlp/down", c.mlp_bias)
    rows += _norm("norm", "final_norm", c)
    return rows


def weight_table(config: ModelConfig) -> tuple[list[WeightRow], str]:
    """(rows, base_prefix). HF names are given without the base-model prefix (e.g. `bert.`); the head rows
    (`cls.`, `lm_head.`, `classifier.`, `score.`) are given in full. The prefix applies to trunk rows when
    the checkpoint has a head."""
    c = config
    fam = family(c.model_type)
    t = c.model_type
    if fam.weights == "encoder":
        rows = _encoder_rows(c)
    elif fam.weights == "gpt2":
        rows = _gpt2_rows(c)
    else:
        rows = _decoder_rows(c, fam.layout)

    head_rows: list[WeightRow] = []
    if c.head == "base" and c.add_pooler and not c.causal:
        rows += _linear("pooler.dense", "pooler", True)
    elif c.head == "mlm":
        if t == "bert":
            head_rows += _linear("cls.predictions.transform.dense", "mlm_transform", True)
            head_rows += _norm("cls.predictions.transform.LayerNorm", "mlm_norm", c)
            head_rows.append(WeightRow("cls.predictions.bias", "mlm_bias"))
            if not c.tie_word_embeddings:
                head_rows += _linear("cls.predictions.decoder", "decoder", False)
        else:
            head_rows += _linear("lm_head.dense", "mlm_transform", True)
            head_rows += _norm("lm_head.layer_norm", "mlm_norm", c)
            head_rows.append(WeightRow("lm_head.bias", "mlm_bias"))
            if not c.tie_word_embeddings:
                head_rows += _linear("lm_head.decoder", "decoder", False)
    elif c.head == "causal_lm":
        if not c.tie_word_embeddings:
            head_rows += _linear("lm_head", "decoder", False)
    elif c.head == "classification":
        if c.classifier_style == "bert_pooler":
            rows += _linear("pooler.dense", "pooler", True)
            head_rows += _linear("classifier", "classifier", True)
        elif c.classifier_style == "roberta":
            head_rows += _linear("classifier.dense", "pooler", True)
            head_rows += _linear("classifier.out_proj", "classifier", True)
        else:
            head_rows += _linear("score", "classifier", False)
    prefix = "" if c.head == "base" else fam.base_prefix
    rows = [dataclasses.replace(r, hf=prefix + r.hf) for r in rows] + head_rows
    return rows, prefix


BASE_PREFIXES = tuple(sorted({f.base_prefix for f in FAMILIES.values()}))

# Checkpoint entries that carry no parameters (buffers) or duplicate a tied one.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "attn.bias", "attn.masked_bias",
                    "cls.predictions.decoder.bias", "lm_head.decoder.bias")


def tied_names(config: ModelConfig) -> tuple[str, ...]:
    """HF names that alias the word embedding when `tie_word_embeddings` (present in some checkpoints)."""
    if not config.tie_word_embeddings:
        return ()
    return ("cls.predictions.decoder.weight", "lm_head.decoder.weight", "lm_head.weight")
