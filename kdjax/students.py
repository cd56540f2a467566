"""Students derived from teachers: a smaller config, initialized from chosen teacher layers.

Initializations (the *KD Revisited* axis "initialization"):

- `uniform` (TinyBERT mapping): student layer m <- teacher layer (m+1)*N/M - 1, e.g. 6 -> 3 takes
    teacher layers 1, 3, 5 (0-based);
- `first` (PKD): teacher layers 0..M-1;
- an explicit tuple of teacher layer indices (DistilBERT takes (0, 2, 4, 7, 9, 11) for 6 of 12);
- `random`: a fresh initialization (needed when widths differ).

Embeddings, norms and heads are copied from the teacher whenever their shapes agree.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.hub.api import Model, flat_params, params_from_flat
from kdjax.models.config import ConfigError, ModelConfig
from kdjax.models.transformer import Transformer

INITS = ("uniform", "first", "random")


def student_layers(teacher_layers: int, student_layers: int, init: Union[str, Sequence[int]]) -> Optional[tuple]:
    """Teacher layer (0-based) for each student layer, or None for random init."""
    if not isinstance(init, str):
        layers = tuple(int(i) for i in init)
        if len(layers) != student_layers:
            raise ConfigError(f"{len(layers)} teacher layers given for a {student_layers}-layer student")
        bad = [i for i in layers if not 0 <= i < teacher_layers]
        if bad:
            raise ConfigError(f"teacher layer(s) {bad} out of range: the teacher has layers 0..{teacher_layers - 1}")
        return layers
    if init == "random":
        return None
    if student_layers > teacher_layers:
        raise ConfigError(f"a {student_layers}-layer student cannot copy layers from a {teacher_layers}-layer "
                                            "teacher; use init='random'")
    if init == "first":
        return tuple(range(student_layers))
    if init == "uniform":
        step = teacher_layers / student_layers
        return tuple(int(round((m + 1) * step)) - 1 for m in range(student_layers))
    raise ConfigError(f"unknown student init {init!r}; use one of {', '.join(INITS)} or a tuple of layer indices")


def student_config(teacher: ModelConfig, *, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
                                      num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                                      intermediate_size: Optional[int] = None, vocab_size: Optional[int] = None,
                                      head: Optional[str] = None, **overrides) -> ModelConfig:
    changes = dict(overrides)
    for key, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
                                          ("intermediate_size", intermediate_size), ("vocab_size", vocab_size), ("head", head)):
        if value is not None:
            changes[key] = value
    if num_heads is not None or hidden_size is not None:
        # Head dim follows the new width unless given; GQA grouping is kept when it still divides.
        changes.setdefault("head_dim", None)
        heads = num_heads or teacher.num_heads
        kv = num_kv_heads or (teacher.num_kv_heads if teacher.num_kv_heads and heads % teacher.num_kv_heads == 0
                                                    else None)
        changes["num_kv_heads"] = kv
    elif num_kv_heads is not None:
        changes["num_kv_heads"] = num_kv_heads
    return teacher.replace(**changes)


def student_from(teacher: Model, *, num_layers: Optional[int] = None,
                                  layers: Union[None, str, Sequence[int]] = None, init: Union[str, Sequence[int]] = "uniform",
                                  hidden_size: Optional[int] = None, num_heads: Optional[int] = None,
                                  num_kv_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                                  vocab_size: Optional[int] = None, head: Optional[str] = None, seed: int = 0,
                                  **config_overrides) -> Model:
    """A smaller `Model` derived from `teacher`; `layers=(1, 3, 5)` copies those teacher layers.

    Parameters whose shapes differ from the teacher's (a narrower width, a new vocabulary) start from a
    random initialization; asking to copy layers into a student of another width is an error.
    The student's precision is its own: it computes in float32 and keeps float32 (master) parameters
    whatever the teacher's dtypes, unless `dtype` / `param_dtype` ask otherwise (a bfloat16 teacher is a
    frozen, cheaper forward; its student is still trained in float32).
    """
    config_overrides.setdefault("dtype", "float32")
    config_overrides.setdefault("param_dtype", "float32")
    if layers is not None:
        init = layers
    if num_layers is None:
        num_layers = len(init) if not isinstance(init, str) else teacher.config.num_layers
    if teacher.config.dense_layers and "dense_layers" not in config_overrides:
        # A copied layer keeps its kind (dense MLP or experts); a random student keeps the indices that exist.
        copied = student_layers(teacher.config.num_layers, num_layers, init)
        config_overrides["dense_layers"] = tuple(
            j for j, t in enumerate(copied) if t in teacher.config.dense_layers) if copied is not None else tuple(
            i for i in teacher.config.dense_layers if i < num_layers)
    config = student_config(teacher.config, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                                                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                                                    head=head, **config_overrides)
    mapping = student_layers(teacher.config.num_layers, num_layers, init)
    fresh = Transformer(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(fresh, nnx.Param)
    if mapping is None:
        return Model(config, graphdef, params, teacher.tokenizer, source=teacher.source, id2label=teacher.id2label)

    t_flat = flat_params(teacher.params)
    s_flat = flat_params(params)
    widths_differ = [k for k, v in s_flat.items()
                                      if k.startswith("layers/") and k in t_flat and v.shape[1:] != t_flat[k].shape[1:]]
    if widths_differ:
        raise ConfigError(f"cannot copy teacher layers into a student of another shape ({widths_differ[0]}: "
                                            f"{t_flat[widths_differ[0]].shape[1:]} vs {s_flat[widths_differ[0]].shape[1:]}); "
                                            "use init='random' or keep the teacher's hidden/FFN sizes")
    index = jnp.asarray(mapping)
    merged = {}
    for key, value in s_flat.items():
        source = t_flat.get(key)
        if key.startswith("layers/"):
            merged[key] = source[index]
        elif source is not None and source.shape == value.shape:
            merged[key] = source
        else:
            merged[key] = value
    params = params_from_flat(params, merged, config.params_dtype)
    return Model(config, graphdef, params, teacher.tokenizer, source=teacher.source, id2label=teacher.id2label)


def copy_report(teacher: Model, student: Model) -> dict:
    """Which student parameters equal the teacher's (for logs and tests)."""
    t_flat, s_flat = flat_params(teacher.params), flat_params(student.params)
    out = {}
    for key, value in s_flat.items():
        out[key] = bool(key in t_flat and t_flat[key].shape == value.shape and np.array_equal(t_flat[key], value))
    return out
