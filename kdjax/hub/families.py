"""Hugging Face <-> kdjax translation tables, one per family.

Each family gives (1) a config translation both ways and (2) a weight table of
`(hf_name, kdjax_path, transform)` rows. Layer rows carry `{i}` in the HF name and a `layers/...`
kdjax path; the kdjax side stores layers stacked on a leading axis. Transforms:

- `copy`     the tensor as is
- `linear`   a torch `nn.Linear` weight [out, in] -> kdjax kernel [in, out] (transpose)
- `qkv:N`    GPT-2's fused Conv1D `c_attn` [in, 3·out]: the N-th third of the columns
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from kdjax.models.config import ROPE_SCALING_KEYS, SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, preset

_ACT_FROM_HF = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                                "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}

_BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model.",
                                "qwen2": "model.", "mistral": "model."}

_ARCH_SUFFIX_TO_HEAD = (("ForMaskedLM", "mlm"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
                                                ("ForSequenceClassification", "classification"))

_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2",
                                  "mistral": "Mistral"}


def _unsupported(model_type: Any) -> ConfigError:
    return ConfigError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def head_from_architectures(architectures: Optional[list]) -> str:
    for arch in architectures or ():
        for suffix, head in _ARCH_SUFFIX_TO_HEAD:
            if arch.endswith(suffix):
                return head
    return "base"


def architecture_name(config: ModelConfig) -> str:
    prefix = _CLASS_PREFIX[config.model_type]
    if config.head == "mlm":
        return prefix + "ForMaskedLM"
    if config.head == "causal_lm":
        return prefix + ("LMHeadModel" if config.model_type == "gpt2" else "ForCausalLM")
    if config.head == "classification":
        return prefix + "ForSequenceClassification"
    return prefix + "Model"


def _rope_theta(hf: dict, default: float) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def _rope_scaling(hf: dict) -> tuple:
    """`ModelConfig.rope_scaling` from `rope_parameters` (transformers >= 5) or `rope_scaling` (older)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
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


def config_from_hf(hf: dict, *, head: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model_type)
    head = head or head_from_architectures(hf.get("architectures"))
    num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    act = hf.get("hidden_act", hf.get("activation_function", "gelu"))
    if act not in _ACT_FROM_HF:
        raise ConfigError(f"activation {act!r} is not supported; supported: {', '.join(sorted(_ACT_FROM_HF))}")
    common = dict(head=head, num_labels=num_labels, activation=_ACT_FROM_HF[act])
    if model_type in ("bert", "roberta"):
        kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                            max_position_embeddings=hf.get("max_position_embeddings", 512),
                            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
                            pad_token_id=hf.get("pad_token_id", 0 if model_type == "bert" else 1),
                            tie_word_embeddings=hf.get("tie_word_embeddings", True),
                            initializer_range=hf.get("initializer_range", 0.02))
    elif model_type == "gpt2":
        d = hf["n_embd"]
        kw = dict(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
                            intermediate_size=hf.get("n_inner") or 4 * d, max_position_embeddings=hf.get("n_positions", 1024),
                            norm_eps=hf.get("layer_norm_epsilon", 1e-5), pad_token_id=hf.get("pad_token_id"),
                            tie_word_embeddings=hf.get("tie_word_embeddings", True),
                            initializer_range=hf.get("initializer_range", 0.02))
    else:
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        qkv_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
        kw = dict(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["num_hidden_layers"], num_heads=h,
                            num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=hf.get("head_dim") or d // h,
                            intermediate_size=hf["intermediate_size"],
                            max_position_embeddings=hf.get("max_position_embeddings", 4096),
                            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, 10000.0),
                            rope_scaling=_rope_scaling(hf),
                            qkv_bias=qkv_bias, out_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
                            mlp_bias=bool(hf.get("mlp_bias", False)), pad_token_id=hf.get("pad_token_id"),
                            tie_word_embeddings=hf.get("tie_word_embeddings", False),
                            initializer_range=hf.get("initializer_range", 0.02))
        if model_type in ("mistral", "qwen2"):
            window = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                window = None
            kw["sliding_window"] = window
    return preset(model_type, **{**kw, **common, **overrides})


def config_to_hf(config: ModelConfig, *, id2label: Optional[dict] = None) -> dict:
    """A Hugging Face config dict (the arguments of `transformers.<Family>Config`)."""
    c = config
    act = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}[c.activation]
    labels = id2label or {i: f"LABEL_{i}" for i in range(c.num_labels)}
    out: dict[str, Any] = dict(model_type=c.model_type, architectures=[architecture_name(c)],
                                                          vocab_size=c.vocab_size, id2label={int(k): v for k, v in labels.items()},
                                                          label2id={v: int(k) for k, v in labels.items()},
                                                          tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id,
                                                          initializer_range=c.initializer_range)
    if c.model_type in ("bert", "roberta"):
        out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                              intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                              type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, hidden_act=act,
                              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    elif c.model_type == "gpt2":
        out.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.intermediate_size,
                              n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps, activation_function=act)
    else:
        out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                              num_key_value_heads=c.kv_heads, head_dim=c.dim_per_head, intermediate_size=c.intermediate_size,
                              max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps, hidden_act=act,
                              rope_theta=c.rope_theta,
                              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                                               **dict(c.rope_scaling)},
                              mlp_bias=c.mlp_bias)
        if c.model_type == "llama":
            if c.qkv_bias != c.out_bias:
                raise ConfigError("Llama checkpoints have one attention_bias switch; qkv_bias and out_bias must agree")
            out["attention_bias"] = c.qkv_bias
        if c.model_type in ("mistral", "qwen2"):
            out["sliding_window"] = c.sliding_window
            if c.model_type == "qwen2":
                out["use_sliding_window"] = c.sliding_window is not None
    out.update(dict(c.extra))
    return out


@dataclasses.dataclass(frozen=True)
class WeightRow:
    hf: str  # may contain {i}
    path: str  # kdjax flat path, "/"-separated; layer rows start with "layers/"
    transform: str = "copy"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _linear(hf: str, path: str, bias: bool) -> list[WeightRow]:
    rows = [WeightRow(hf + ".weight", path + "/kernel", "linear")]
    if bias:
        rows.append(WeightRow(hf + ".bias", path + "/bias"))
    return rows


def _norm(hf: str, path: str, config: ModelConfig, names=("weight", "bias")) -> list[WeightRow]:
    rows = [WeightRow(f"{hf}.{names[0]}", path + "/scale")]
    if config.norm == "layernorm":
        rows.append(WeightRow(f"{hf}.{names[1]}", path + "/bias"))
    return rows


def weight_table(config: ModelConfig) -> tuple[list[WeightRow], str]:
    """(rows, base_prefix). HF names are given without the base-model prefix (e.g. `bert.`); the head rows
    (`cls.`, `lm_head.`, `classifier.`, `score.`) are given in full. The prefix applies to trunk rows when
    the checkpoint has a head."""
    c = config
    t = c.model_type
    rows: list[WeightRow] = []
    if t in ("bert", "roberta"):
        rows += [WeightRow("embeddings.word_embeddings.weight", "embed/word/embedding"),
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
    elif t == "gpt2":
        rows += [WeightRow("wte.weight", "embed/word/embedding"), WeightRow("wpe.weight", "embed/position/embedding")]
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
    else:
        rows.append(WeightRow("embed_tokens.weight", "embed/word/embedding"))
        lay = "layers.{i}."
        for name, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            rows += _linear(lay + "self_attn." + name, "layers/attn/" + short, c.qkv_bias)
        rows += _linear(lay + "self_attn.o_proj", "layers/attn/o", c.out_bias)
        rows += _norm(lay + "input_layernorm", "layers/attn_norm", c)
        rows += _norm(lay + "post_attention_layernorm", "layers/mlp_norm", c)
        if c.gated_mlp:
            rows += _linear(lay + "mlp.gate_proj", "layers/mlp/gate", c.mlp_bias)
        rows += _linear(lay + "mlp.up_proj", "layers/mlp/up", c.mlp_bias)
        rows += _linear(lay + "mlp.down_proj", "layers/mlp/down", c.mlp_bias)
        rows += _norm("norm", "final_norm", c)

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
    prefix = "" if c.head == "base" else _BASE_PREFIX[t]
    rows = [dataclasses.replace(r, hf=prefix + r.hf) for r in rows] + head_rows
    return rows, prefix


# Checkpoint entries that carry no parameters (buffers) or duplicate a tied one.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "attn.bias", "attn.masked_bias",
                                        "cls.predictions.decoder.bias", "lm_head.decoder.bias")


def tied_names(config: ModelConfig) -> tuple[str, ...]:
    """HF names that alias the word embedding when `tie_word_embeddings` (present in some checkpoints)."""
    if not config.tie_word_embeddings:
        return ()
    return ("cls.predictions.decoder.weight", "lm_head.decoder.weight", "lm_head.weight")
