"""Streaming, sharded loading of Hugging Face checkpoints: each process reads only its devices' slices.

Why: `load_pretrained` reads every tensor into host memory, stacks the layers and only then places
the result on devices. For a 100B teacher that is hundreds of GB on one host, and on a multi-host
pod every host would read the whole model. `load_sharded` instead creates every parameter with
`jax.make_array_from_callback(shape, sharding, callback)`: JAX asks for the block of the global
(kdjax-layout) array that each *addressable* device holds, and the callback reads just that block
from the safetensors files through their lazy slicing (`safe_open(...).get_slice(name)[...]`,
which copies only the requested region out of the memory-mapped file). Host memory at any moment
holds at most the distinct local blocks of one parameter.

How a kdjax index maps back to the checkpoint. The weight tables (`kdjax.hub.families`) relate
each kdjax parameter to one HF tensor (or one per layer) through a transform:

- per-layer stacking: kdjax stores layer tensors on a leading axis. The first entry of the index
  selects layers, and only those layers' tensors are opened; the rest of the index applies to
  each of them.
- `copy`: the index is used as is.
- `linear` (transpose, HF `[out, in]` -> kdjax `[in, out]`): the index is permuted to
  `(out_slice, in_slice)`, the block is read and transposed.
- `qkv:N` (GPT-2's fused `c_attn`, the N-th third of the last axis): the last slice is shifted by
  `N * third`, a contiguous range of the fused tensor.
- `rows:A:B` (Phi-3's fused `qkv_proj` / `gate_up_proj`, rows A..B transposed): the index is permuted
  as for `linear` and its row slice shifted by A; `slice:A:B` (the matching bias) shifts the slice.
- stacked experts (`{e}` rows, `[L, E, ...]`): like layers, the second entry of the index selects the
  experts whose tensors are opened, so an `expert`-sharded device reads only its own experts.

A transform that has no mapping (none of today's tables has one) falls back to reading the whole
tensor, applying the transform and cutting the block out of it; such reads are listed in
`ReadStats.full_reads` so the cost is visible.

What is read once per process. Devices whose blocks coincide (axes replicated by the rules, e.g.
`tensor` for a norm scale or `data` for everything) ask for the identical index; each parameter
keeps a cache keyed by the index while it is being created, so every distinct block is read from
disk once per process however many local devices hold it. With every axis of the mesh inside one
process, each checkpoint byte is therefore read exactly once.

`ReadStats` is the byte counter: bytes copied out of the checkpoint files by this process, each
read (parameter, tensor, bytes), and per device the bytes of the blocks that device received. The
counts are of tensor data in the checkpoint's dtype; a strided block (a column range of a row-major
matrix) also makes the OS page in whole pages around each row, which the counter does not see.

Only safetensors checkpoints (`model.safetensors` or a sharded `model.safetensors.index.json`)
can be sliced; a PyTorch `.bin` checkpoint is rejected with a one-line error that says how to
convert it (or to use `load_pretrained`, which reads it whole). Every process needs the checkpoint
files on a path it can read (a shared file system or a local copy).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from kdjax.hub import checkpoint as ckpt
from kdjax.hub.api import Model, _load_tokenizer, abstract_model, checkpoint_config, check_model_type, flat_params
from kdjax.hub.families import WeightRow, flat_names, row_names, weight_table
from kdjax.sharding import DEFAULT_TEACHER_RULES, Rules, param_shardings

__all__ = ["ReadRecord", "ReadStats", "SliceReader", "checkpoint_index", "load_sharded"]

Index = tuple[slice, ...]

# safetensors dtypes that numpy cannot represent; these are sliced through a memory map instead.
_ML_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


@dataclasses.dataclass(frozen=True)
class ReadRecord:
    """One read from a checkpoint file."""

    param: str  # kdjax parameter path the read was for
    tensor: str  # checkpoint tensor name
    nbytes: int  # tensor bytes copied out of the file
    full: bool  # True when the whole tensor was read because its transform cannot be sliced


@dataclasses.dataclass
class ReadStats:
    """Bytes a `load_sharded` call read from disk in this process, and what each device received.

    `process_bytes` counts every byte copied out of the checkpoint files; `device_bytes[device]` the
    bytes (in the checkpoint dtype) of the blocks each addressable device holds, which come from the
    per-process reads (a block several devices share is read once). `param_device_bytes` and
    `param_process_bytes` split the same numbers by kdjax parameter path.
    """

    process_bytes: int = 0
    reads: list[ReadRecord] = dataclasses.field(default_factory=list)
    device_bytes: dict[Any, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    param_process_bytes: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    param_device_bytes: dict[str, dict[Any, int]] = dataclasses.field(default_factory=dict)
    cache_hits: int = 0

    @property
    def num_reads(self) -> int:
        return len(self.reads)

    @property
    def max_read_bytes(self) -> int:
        return max((r.nbytes for r in self.reads), default=0)

    @property
    def full_reads(self) -> list[str]:
        return [r.tensor for r in self.reads if r.full]

    def record(self, param: str, tensor: str, nbytes: int, *, full: bool = False) -> None:
        self.process_bytes += int(nbytes)
        self.param_process_bytes[param] += int(nbytes)
        self.reads.append(ReadRecord(param, tensor, int(nbytes), full))


class SliceReader:
    """Counted, lazy block reads from a checkpoint's safetensors files (single file or index shards).

    Files stay open (memory-mapped) until `close`; `read(name, index)` copies only the block.
    """

    def __init__(self, directory: str, stats: Optional[ReadStats] = None):
        kind, files = ckpt.checkpoint_files(directory)
        if kind != "safetensors":
            raise ckpt.CheckpointError(
                f"{files[0]} is a PyTorch .bin checkpoint, which cannot be read in slices; convert it to "
                "safetensors (transformers: model.save_pretrained(dir, safe_serialization=True)) or use "
                "kdjax.load_pretrained, which reads it whole")
        from safetensors import safe_open
        self.stats = stats if stats is not None else ReadStats()
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        self._file: dict[str, str] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        try:
            for file in files:
                handle = self._stack.enter_context(safe_open(file, framework="numpy"))
                for name in handle.keys():
                    self._where[name] = handle
                    self._file[name] = file
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def read(self, name: str, index: Optional[Index], *, param: str = "", full: bool = False) -> np.ndarray:
        """The block `tensor[index]` (the whole tensor for `index=None`), counted in `stats`."""
        view = self._where[name].get_slice(name)
        if index is None:
            index = tuple(slice(0, n) for n in view.get_shape())
        if view.get_dtype() in _ML_DTYPES:
            block = np.array(self._memmap(name, view.get_dtype(), tuple(view.get_shape()))[index])
        else:
            block = view[index]
        self.stats.record(param, name, block.nbytes, full=full)
        return block

    def _memmap(self, name: str, dtype_code: str, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only memory map of one tensor whose dtype numpy lacks (bf16, fp8) via ml_dtypes."""
        import ml_dtypes
        file = self._file[name]
        if file not in self._headers:
            with open(file, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (header_len, json.loads(fh.read(header_len)))
        header_len, header = self._headers[file]
        start, _ = header[name]["data_offsets"]
        dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                 "F8_E5M2": ml_dtypes.float8_e5m2}[dtype_code]
        return np.memmap(file, dtype=dtype, mode="r", offset=8 + header_len + start, shape=shape)


def _normalize(index: Sequence[slice], shape: Sequence[int]) -> Index:
    """Concrete `slice(start, stop, step)` per dim, so identical blocks compare equal."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _key(index: Index) -> tuple[tuple[int, int, int], ...]:
    """A hashable form of a normalized index (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop, s.step) for s in index)


def checkpoint_index(transform: str, index: Index,
                     hf_shape: Sequence[int]) -> Optional[tuple[Index, Callable[[np.ndarray], np.ndarray]]]:
    """Map a normalized block index of a transformed (kdjax-layout) tensor to the checkpoint tensor.

    Returns `(hf_index, post)` with `post(hf_tensor[hf_index]) == _apply(transform, hf_tensor)[index]`,
    or None when the transform has no sliced form (the caller then reads the whole tensor).
    """
    if transform == "copy":
        return index, lambda block: block
    if transform == "linear" and len(index) == 2 and len(hf_shape) == 2:
        return (index[1], index[0]), lambda block: block.T
    if transform.startswith("qkv:") and index:
        offset = int(transform[4:]) * (int(hf_shape[-1]) // 3)
        last = index[-1]
        return index[:-1] + (slice(last.start + offset, last.stop + offset, last.step),), lambda block: block
    if transform.startswith("rows:") and len(index) == 2 and len(hf_shape) == 2:
        offset = ckpt._span(transform)[0]
        cols, rows = index
        return (slice(rows.start + offset, rows.stop + offset, rows.step), cols), lambda block: block.T
    if transform.startswith("slice:") and len(index) == 1:
        offset = ckpt._span(transform)[0]
        return (slice(index[0].start + offset, index[0].stop + offset, index[0].step),), lambda block: block
    return None


@dataclasses.dataclass(frozen=True)
class _NamedRow:
    """A weight row with its HF names expanded over layers and experts (nested like the kdjax stack)."""

    row: WeightRow
    hf_names: Any

    def __getattr__(self, name):
        return getattr(self.row, name)


class _ParamLoader:
    """Reads the blocks of one kdjax parameter for `jax.make_array_from_callback`, once per distinct index."""

    def __init__(self, reader: SliceReader, row: WeightRow, tensors: Any, shape: tuple[int, ...],
                 dtype: np.dtype):
        self.reader, self.row, self.tensors, self.shape, self.dtype = reader, row, tensors, shape, dtype
        self.cache: dict[tuple, np.ndarray] = {}
        self.block_bytes: dict[tuple, int] = {}

    def _read_one(self, tensor: str, inner: Index) -> np.ndarray:
        mapped = checkpoint_index(self.row.transform, inner, self.reader.shape(tensor))
        if mapped is None:
            whole = self.reader.read(tensor, None, param=self.row.path, full=True)
            return np.asarray(ckpt._apply(self.row.transform, whole))[inner]
        hf_index, post = mapped
        return post(self.reader.read(tensor, hf_index, param=self.row.path))

    def __call__(self, index: Sequence[slice]) -> np.ndarray:
        index = _normalize(index, self.shape)
        key = _key(index)
        if key in self.cache:
            self.reader.stats.cache_hits += 1
            return self.cache[key]
        before = self.reader.stats.process_bytes

        def read(tensors, inner):  # leading stacked axes (layers, experts) select which tensors to open
            if tensors is None:  # a layer without this tensor: its block is zeros
                dims = self.shape[len(self.shape) - len(inner):]
                return np.zeros(tuple(len(range(*sl.indices(n))) for sl, n in zip(inner, dims)), self.dtype)
            if isinstance(tensors, str):
                return self._read_one(tensors, inner)
            return np.stack([read(tensors[i], inner[1:]) for i in range(len(tensors))[inner[0]]])

        block = read(self.tensors, index)
        self.block_bytes[key] = self.reader.stats.process_bytes - before
        self.cache[key] = np.ascontiguousarray(block).astype(self.dtype, copy=False)
        return self.cache[key]


def _check_shapes(reader: SliceReader, rows: list[WeightRow], names: dict[str, list[str]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """Every checkpoint tensor's (transformed) shape against the config, from the headers alone."""
    for r in rows:
        want = shapes.get(r.path)
        if want is None:
            raise ckpt.CheckpointError(f"internal: kdjax model has no parameter {r.path}")
        expect = tuple(want[int(r.per_layer) + int(r.per_expert):])
        for hf_name, tensor in zip(flat_names(r.hf_names), flat_names(names[r.path])):
            got = ckpt.transformed_shape(r.transform, reader.shape(tensor))
            if got != expect:
                raise ckpt.shape_mismatch(hf_name, got, r.path, expect)


def load_sharded(name_or_path: str, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_TEACHER_RULES, *,
                 dtype: Optional[str] = None, param_dtype: Optional[str] = None, head: Optional[str] = None,
                 strict: bool = True, scan_layers: Optional[bool] = None, remat_policy: str = "none",
                 progress: bool = False, strict_sharding: bool = False, stats: Optional[ReadStats] = None,
                 **config_overrides) -> Model:
    """Load a Hugging Face safetensors checkpoint as a `Model` whose params are sharded over `mesh`.

    Keywords and config handling are those of `kdjax.load_pretrained`; `rules` map logical axes to
    mesh axes (see `kdjax.sharding`), `strict_sharding` is `param_shardings`' `strict`. Each process
    reads from disk only the blocks its addressable devices hold, each distinct block once. Pass a
    `ReadStats` as `stats` to get the byte counts. The parameters equal `load_pretrained`'s bitwise
    (after the cast to the parameter dtype).
    """
    directory = ckpt.resolve_checkpoint_dir(name_or_path)
    hf = ckpt.read_hf_config(directory)
    check_model_type(hf)
    stats = stats if stats is not None else ReadStats()
    with SliceReader(directory, stats) as reader:
        config = checkpoint_config(hf, reader.names(), dtype=dtype, param_dtype=param_dtype, head=head,
                                   scan_layers=scan_layers, remat_policy=remat_policy, **config_overrides)
        graphdef, abstract = abstract_model(config)
        shapes = {k: tuple(v.shape) for k, v in flat_params(abstract).items()}
        shardings = flat_params(param_shardings(abstract, mesh, rules, strict=strict_sharding))
        rows, _ = weight_table(config)
        concrete = ckpt.match_tensor_names(directory, config, reader.names(), strict=strict)
        def concrete_names(nested):
            return concrete[nested] if isinstance(nested, str) else [concrete_names(n) for n in nested]

        rows = [_NamedRow(r, row_names(r, config)) for r in rows]
        names = {r.path: concrete_names(r.hf_names) for r in rows}
        _check_shapes(reader, rows, names, shapes)
        uncovered = sorted(set(shapes) - set(names))
        if uncovered:
            raise ckpt.CheckpointError(f"internal: no weight-table row fills kdjax parameter(s) {', '.join(uncovered)}")
        target = np.dtype(config.params_dtype)
        iterator: Any = rows
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(rows, desc="loading weight shards", unit="tensor")
        arrays: dict[str, jax.Array] = {}
        for r in iterator:
            shape, sharding = shapes[r.path], shardings[r.path]
            loader = _ParamLoader(reader, r.row, names[r.path], shape, target)
            arrays[r.path] = jax.make_array_from_callback(shape, sharding, loader, dtype=target)
            per_device = stats.param_device_bytes.setdefault(r.path, {})
            for device, index in sharding.addressable_devices_indices_map(shape).items():
                nbytes = loader.block_bytes[_key(_normalize(index, shape))]
                per_device[device] = nbytes
                stats.device_bytes[device] += nbytes
    leaves = [(path, var.replace(arrays["/".join(str(p) for p in path)]))
              for path, var in nnx.to_flat_state(abstract)]
    params = nnx.from_flat_state(leaves)
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()} or None
    return Model(config, graphdef, params, _load_tokenizer(directory), source=directory, id2label=id2label)
