"""The user-facing model handle: load, call, derive a student, save.

`Model` bundles a `ModelConfig`, the NNX graphdef, the parameter state and (optionally) a tokenizer.
Calling it runs a cached jitted `forward` and returns HF-shaped outputs (tuples of per-layer arrays),
so code written against `transformers` reads the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.hub import checkpoint as ckpt
from kdjax.hub.families import config_from_hf, config_to_hf, family
from kdjax.models.config import ModelConfig
from kdjax.models.taps import Intermediates, TapSpec
from kdjax.models.transformer import Transformer, forward

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                                      "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model",
                                      "chat_template.jinja")


@dataclasses.dataclass
class Output:
    """What `Model.__call__` returns; per-layer taps as tuples in HF order."""

    logits: Optional[jax.Array]
    last_hidden_state: jax.Array
    pooler_output: Optional[jax.Array]
    intermediates: Intermediates
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


def flat_params(params: nnx.State) -> dict[str, jax.Array]:
    return {"/".join(str(p) for p in path): (v.get_value() if hasattr(v, "get_value") else v)
                    for path, v in nnx.to_flat_state(params)}


def params_from_flat(abstract_params: nnx.State, flat: dict[str, Any], dtype) -> nnx.State:
    """Fill an abstract parameter state from a flat `{path: array}` dict."""
    leaves = []
    for path, var in nnx.to_flat_state(abstract_params):
        key = "/".join(str(p) for p in path)
        leaves.append((path, var.replace(jnp.asarray(flat[key], dtype=dtype))))
    return nnx.from_flat_state(leaves)


def abstract_model(config: ModelConfig):
    """(graphdef, abstract params) without allocating any weights."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


class Model:
    """A kdjax transformer with its parameters (and tokenizer, when loaded from a checkpoint)."""

    def __init__(self, config: ModelConfig, graphdef, params, tokenizer=None, *, source: Optional[str] = None,
                              id2label: Optional[dict] = None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self.id2label = id2label
        self._jitted = jax.jit(forward, static_argnums=(0, 3))

    @classmethod
    def init(cls, config: ModelConfig, seed: int = 0, tokenizer=None) -> "Model":
        graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param)
        return cls(config, graphdef, params, tokenizer)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def module(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)

    def __call__(self, input_ids, attention_mask=None, *, token_type_ids=None, position_ids=None,
                              taps: Any = None) -> Output:
        batch = {"input_ids": jnp.asarray(input_ids, jnp.int32)}
        for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                                                ("position_ids", position_ids)):
            if value is not None:
                batch[name] = jnp.asarray(value, jnp.int32)
        spec = TapSpec.of(taps)
        outputs, inter = self._jitted(self.graphdef, self.params, batch, spec)
        out = Output(logits=outputs.logits, last_hidden_state=outputs.last_hidden_state,
                                  pooler_output=outputs.pooler_output, intermediates=inter)
        if inter.hidden_states is not None:
            out.hidden_states = tuple(inter.hidden_states)
        if inter.attention_probs is not None:
            out.attentions = tuple(inter.attention_probs)
        return out

    def encode(self, texts: Union[str, Sequence[str]], max_length: int = 128):
        """Tokenize with the model's tokenizer into numpy arrays."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; load it from a checkpoint directory with tokenizer files")
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        return {k: v.astype(np.int32) for k, v in enc.items()}

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, head={c.head}, layers={c.num_layers}, hidden={c.hidden_size}, "
                        f"heads={c.num_heads}, vocab={c.vocab_size}, params={self.num_params:,})")


def _load_tokenizer(directory: str):
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "vocab.txt", "vocab.json",
                                                                                                                                    "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


def check_model_type(hf: dict) -> None:
    """One-line error for a `config.json` whose `model_type` kdjax cannot build."""
    family(hf.get("model_type"))


def checkpoint_config(hf: dict, tensor_names: Sequence[str], *, dtype: Optional[str] = None,
                      param_dtype: Optional[str] = None, head: Optional[str] = None, scan_layers: Optional[bool] = None,
                      remat_policy: str = "none", **config_overrides) -> ModelConfig:
    """The `ModelConfig` for a checkpoint's `config.json` and tensor names, as every loader builds it.

    `dtype` sets the compute dtype (and the parameter dtype unless `param_dtype` is given); BERT-style
    encoders get a pooler exactly when the checkpoint holds one.
    """
    check_model_type(hf)
    overrides = dict(config_overrides, scan_layers=scan_layers, remat_policy=remat_policy)
    if dtype is not None:
        overrides["dtype"] = dtype
        overrides["param_dtype"] = param_dtype or dtype
    elif param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if hf.get("model_type") in ("bert", "roberta") and "add_pooler" not in overrides:
        # Encoders are saved with or without BERT's pooler; follow the checkpoint.
        overrides["add_pooler"] = any(n.endswith("pooler.dense.weight") for n in tensor_names)
    return config_from_hf(hf, head=head, **overrides)


def load_pretrained(name_or_path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                                        head: Optional[str] = None, strict: bool = True, scan_layers: Optional[bool] = None,
                                        remat_policy: str = "none", progress: bool = False, **config_overrides) -> Model:
    """Load a Hugging Face checkpoint (directory or hub id) as a kdjax `Model` with its tokenizer.

    `dtype` sets the compute dtype (and the parameter dtype unless `param_dtype` is given). `head`
    overrides the head implied by `architectures` (e.g. `"base"` to drop an MLM head).
    """
    directory = ckpt.resolve_checkpoint_dir(name_or_path)
    hf = ckpt.read_hf_config(directory)
    check_model_type(hf)
    reader = ckpt.TensorReader(directory)
    config = checkpoint_config(hf, reader.names(), dtype=dtype, param_dtype=param_dtype, head=head,
                               scan_layers=scan_layers, remat_policy=remat_policy, **config_overrides)
    graphdef, abstract = abstract_model(config)
    shapes = {k: tuple(v.shape) for k, v in flat_params(abstract).items()}
    flat = ckpt.load_flat_params(directory, config, shapes, strict=strict, progress=progress, reader=reader)
    params = params_from_flat(abstract, flat, config.params_dtype)
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()} or None
    return Model(config, graphdef, params, _load_tokenizer(directory), source=directory, id2label=id2label)


def save_pretrained(model: Model, directory: str, *, tokenizer=None, dtype: Optional[str] = None) -> str:
    """Write `model` in Hugging Face layout: config.json, model.safetensors and tokenizer files.

    The result loads with `transformers.AutoModel*.from_pretrained(directory)`. Weights are written in
    the parameter dtype unless `dtype` is given (bfloat16 goes through ml_dtypes).
    """
    os.makedirs(directory, exist_ok=True)
    config = model.config
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(model.params).items()}
    tensors = ckpt.export_tensors(config, flat)
    if dtype is not None:
        target = np.dtype(jnp.dtype(dtype))
        tensors = {k: v.astype(target) for k, v in tensors.items()}
    hf = config_to_hf(config, id2label=model.id2label)
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype) if tensors else "float32"
    hf["dtype"] = hf["torch_dtype"]
    hf["kdjax_config"] = {k: v for k, v in config.to_dict().items() if k not in ("extra",)}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    ckpt.write_safetensors(tensors, directory)
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is not None:
        tok.save_pretrained(directory)
    elif model.source:
        for name in TOKENIZER_FILES:
            src = os.path.join(model.source, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(directory, name))
    return directory
