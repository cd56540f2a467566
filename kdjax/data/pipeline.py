"""grain input pipelines: random-access source → shard → shuffle → tokenize → batch.

The pipeline is built with grain's dataset API (``MapDataset`` → ``IterDataset``) rather than the
older ``DataLoader``: every stage, including concat-then-split packing, contributes to the
iterator's state, so ``iterator.get_state()`` captures the exact position and a restored run
yields the very next batch an uninterrupted run would have (``DataLoader`` only records the last
sampled index, which loses a packing buffer).

Order of stages and why:

1. **shard** first (``ds[shard_index::shard_count]``): each host owns a fixed, disjoint subset of
   records and never reads the others' — on a pod, hosts are data-parallel replicas. Strided
   slicing keeps every record (shards differ in size by at most one).
2. **shuffle** (a global permutation of the shard, reseeded every epoch), then **repeat**.
3. **tokenize** in a grain ``MapTransform``. Unpacked data is batched *before* tokenization so the
   fast tokenizer runs once per batch (and dynamic padding sees the whole batch); packed data is
   tokenized per text, concatenated and cut into ``max_length`` windows, then batched.

Batches are dicts of numpy arrays: ``input_ids``/``attention_mask``/(``token_type_ids``) int32
``[B, L]`` and ``labels`` (int32 classes, float32 regression, or int32 token ids for packed LM
data, :data:`IGNORE_INDEX` on padding). Shapes are fixed at ``[batch_size, max_length]`` by
default so a jitted step compiles once.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from kdjax.data import sources as sources_lib
from kdjax.data import tasks as tasks_lib

__all__ = [
    "IGNORE_INDEX",
    "make_loader",
    "make_task_loader",
    "restore_iterator_state",
    "save_iterator_state",
]

IGNORE_INDEX = -100  # label value that LM losses skip (same convention as HF / optax masks)

FormatFn = Callable[[Mapping[str, Any]], "tuple[str, str | None]"]


def _to_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _to_str(value.item())
    return str(value)


def _fields_formatter(text_fields: Sequence[str]) -> FormatFn:
    fields = tuple(text_fields)

    def format_record(record):
        missing = [f for f in fields if f not in record]
        if missing:
            raise KeyError(f"record has no field(s) {missing}; its fields are {sorted(record)} — fix text_fields")
        return _to_str(record[fields[0]]), (_to_str(record[fields[1]]) if len(fields) == 2 else None)

    return format_record


@dataclasses.dataclass
class _LabelEncoder:
    """Record label → number: class ids from ints or names, floats for regression."""

    label_field: str
    label_names: tuple[str, ...] | None
    is_regression: bool

    def __call__(self, record: Mapping[str, Any]) -> float | int:
        if self.label_field not in record:
            raise KeyError(f"record has no label field {self.label_field!r}; its fields are {sorted(record)}")
        value = record[self.label_field]
        if isinstance(value, np.ndarray):
            value = value.item()
        if self.is_regression:
            return float(value)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, str):
            if self.label_names and value in self.label_names:
                return self.label_names.index(value)
            if value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError(f"label {value!r} is not in label_names={self.label_names}; pass the task's label names")
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if float(value) != int(value):
            raise ValueError(f"class label {value!r} is not an integer; pass is_regression=True for real-valued labels")
        value = int(value)
        if self.label_names and not 0 <= value < len(self.label_names):
            raise ValueError(f"label id {value} is outside [0, {len(self.label_names)}) for label_names={self.label_names}")
        return value


class _TokenizeBatch(grain.transforms.Map):
    """A list of raw records → a padded, tokenized batch of numpy arrays."""

    def __init__(self, tokenizer, format_fn: FormatFn, label_encoder: _LabelEncoder | None,
                 max_length: int, pad_to_multiple_of: int | None):
        self._tokenizer = tokenizer
        self._format = format_fn
        self._labels = label_encoder
        self._max_length = max_length
        self._pad_to_multiple_of = pad_to_multiple_of

    def map(self, records: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        pairs = [self._format(r) for r in records]
        texts_a = [a for a, _ in pairs]
        has_b = [b is not None for _, b in pairs]
        if any(has_b) and not all(has_b):
            raise ValueError("some records have a second text and some do not; a batch must be all single or all pairs")
        texts_b = [b for _, b in pairs] if all(has_b) else None
        padding = "longest" if self._pad_to_multiple_of else "max_length"
        enc = self._tokenizer(
            texts_a,
            texts_b,
            truncation=True,
            max_length=self._max_length,
            padding=padding,
            pad_to_multiple_of=self._pad_to_multiple_of,
            return_tensors="np",
        )
        batch = {k: np.asarray(enc[k], dtype=np.int32) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if self._labels is not None:
            dtype = np.float32 if self._labels.is_regression else np.int32
            batch["labels"] = np.asarray([self._labels(r) for r in records], dtype=dtype)
        return batch


class _TokenizeForPacking(grain.transforms.Map):
    """One record → its unpadded token ids (with the tokenizer's own special tokens)."""

    def __init__(self, tokenizer, format_fn: FormatFn):
        self._tokenizer = tokenizer
        self._format = format_fn

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        text_a, text_b = self._format(record)
        # No truncation: long documents are what packing cuts into windows. `verbose=False`
        # silences the "longer than model_max_length" warning that does not apply here.
        ids = self._tokenizer(text_a, text_b, truncation=False, verbose=False)["input_ids"]
        return {"input_ids": np.asarray(ids, dtype=np.int32)}


class _FinishPacked(grain.transforms.Map):
    """Packed window → causal-LM example: mask from segment ids, labels = ids (ignored on pad)."""

    def __init__(self, with_token_type_ids: bool):
        self._with_token_type_ids = with_token_type_ids

    def map(self, packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids_l = packed["input_ids"].astype(np.int32)
        mask_l = (packed["input_ids_segment_ids"] > 0).astype(np.int32)  # 0 only on final padding
        out = {
            "input_ids": ids_l,
            "attention_mask": mask_l,
            "labels": np.where(mask_l == 1, ids_l, IGNORE_INDEX).astype(np.int32),
        }
        if self._with_token_type_ids:
            out["token_type_ids"] = np.zeros_like(ids_l)
        return out


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither (then jax.process_index()/process_count() are used)")
    if shard_index is None:
        opts = grain.sharding.ShardByJaxProcess()
        shard_index, shard_count = opts.shard_index, opts.shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def sharded_records(source, *, shard_index: int | None, shard_count: int | None, shuffle: bool, seed: int,
                    num_epochs: int | None, what: str = "records", error: type = ValueError) -> grain.MapDataset:
    """This process's rows of `source` (``shard_index::shard_count``), shuffled, repeated `num_epochs` times.

    The first stages of every kdjax loader; `what` and `error` word the empty-shard error.
    """
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise error(f"shard {shard_index}/{shard_count} of the {len(source)} {what} is empty; use fewer shards")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def with_workers(it_ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """`it_ds` prefetched by `worker_count` processes (0: in this process)."""
    if worker_count > 0:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app they are unparsed, which
        # grain treats as an error. Their defaults are what we want, so accept them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds


def make_loader(
    source,
    tokenizer,
    *,
    text_fields: Sequence[str] | None = None,
    label_field: str | None = None,
    label_names: Sequence[str] | None = None,
    is_regression: bool = False,
    max_length: int = 128,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pack: bool = False,
    drop_remainder: bool = True,
    worker_count: int = 0,
    pad_to_multiple_of: int | None = None,
    format_fn: FormatFn | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Tokenized, batched, checkpointable input pipeline over a random-access source.

    Args:
      source: anything with ``__len__``/``__getitem__`` returning dict records (a tfds data
        source, :class:`~kdjax.data.sources.JsonlSource`, ...).
      tokenizer: a Hugging Face tokenizer (fast or slow).
      text_fields: 1 or 2 record fields tokenized as one segment or a segment pair.
      label_field: record field holding the label; omit for unlabeled data.
      label_names: class names, to map string labels (JSONL/CSV) to ids and range-check ids.
      is_regression: labels are real numbers (float32) rather than class ids (int32).
      max_length: sequence length; every batch is ``[batch_size, max_length]`` unless
        ``pad_to_multiple_of`` is set.
      batch_size: per-host batch size.
      shuffle, seed: global shuffle of this host's shard, reshuffled each epoch.
      num_epochs: passes over the data; None repeats forever (training).
      shard_index, shard_count: this host's shard; default ``jax.process_index()/process_count()``.
      pack: concatenate tokenized texts and cut into ``max_length`` windows (LM corpora).
      drop_remainder: drop a final partial batch (keep shapes fixed).
      worker_count: >0 runs the pipeline in that many grain worker processes.
      pad_to_multiple_of: dynamic padding to the batch's longest sequence rounded up to this
        multiple (fewer wasted FLOPs, a bounded number of compiled shapes).
      format_fn: ``record -> (text_a, text_b or None)``; overrides ``text_fields`` (tasks whose
        input is built from several features, see :func:`kdjax.data.tasks.text_pair_formatter`).
      read_options: threads and prefetch depth of the in-process reader. grain's default (16
        threads, 500 elements ahead) would tokenize hundreds of *batches* ahead each time an
        iterator is created or restored; the default here keeps a few batches in flight.

    Returns:
      A ``grain.IterDataset``; ``iter()`` of it has ``get_state()``/``set_state()``.
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"need batch_size >= 1 and max_length >= 2, got batch_size={batch_size}, max_length={max_length}")
    if format_fn is None:
        if not text_fields or not 1 <= len(text_fields) <= 2:
            raise ValueError(f"text_fields must name 1 or 2 record fields (or pass format_fn), got {text_fields!r}")
        format_fn = _fields_formatter(text_fields)
    if pack and label_field is not None:
        raise ValueError("pack=True builds LM windows whose labels are the token ids; drop label_field")
    if pad_to_multiple_of is not None and (pack or pad_to_multiple_of < 1):
        raise ValueError("pad_to_multiple_of must be >= 1 and cannot be combined with pack=True (packed windows are full)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    if len(source) == 0:
        raise ValueError(f"source {source!r} is empty; check the file or split")
    ds = sharded_records(source, shard_index=shard_index, shard_count=shard_count, shuffle=shuffle, seed=seed,
                         num_epochs=num_epochs)

    if pack:
        with_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        if read_options is None:
            read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size)
        it_ds = ds.map(_TokenizeForPacking(tokenizer, format_fn)).to_iter_dataset(read_options)
        it_ds = grain.experimental.ConcatThenSplitIterDataset(it_ds, length_struct={"input_ids": max_length})
        it_ds = it_ds.map(_FinishPacked(with_tt)).batch(batch_size, drop_remainder=drop_remainder)
    else:
        labels = None
        if label_field is not None:
            labels = _LabelEncoder(label_field, tuple(label_names) if label_names else None, is_regression)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
        ds = ds.map(_TokenizeBatch(tokenizer, format_fn, labels, max_length, pad_to_multiple_of))
        it_ds = ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    return with_workers(it_ds, worker_count)


def make_task_loader(
    task: tasks_lib.TaskSpec | str,
    role: str,
    tokenizer,
    *,
    data_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> grain.IterDataset:
    """:func:`make_loader` for a registered task split (``role`` = "train", "validation", ...).

    The embedded data sets are prepared on first use; catalog data sets must already be prepared
    under ``data_dir`` (else :class:`~kdjax.data.sources.DatasetNotPreparedError`). Corpora are
    packed by default; other keyword arguments pass through.
    """
    from kdjax.data import embedded

    spec = tasks_lib.get_task(task) if isinstance(task, str) else task
    split = spec.split(role)
    if spec.tfds_name in (embedded.CORPUS_NAME, embedded.REVIEWS_NAME):
        source = embedded.load_split(spec.tfds_name, split, data_dir=data_dir)
    else:
        source = sources_lib.tfds_source(spec.tfds_name, split, data_dir=data_dir)
    if spec.is_corpus:
        kwargs.setdefault("pack", True)
        return make_loader(source, tokenizer, text_fields=spec.text_fields, **kwargs)
    if spec.label_field is None:
        raise ValueError(f"task {spec.name!r} ({spec.input_format}) has no class label; build its loader with make_loader and a format_fn")
    kwargs.setdefault("format_fn", tasks_lib.text_pair_formatter(spec))
    return make_loader(
        source,
        tokenizer,
        label_field=spec.label_field,
        label_names=spec.label_names,
        is_regression=spec.is_regression,
        **kwargs,
    )


# --- iterator checkpoints ------------------------------------------------------------------------
# grain iterator states are nested dicts whose leaves include tuples (packing slices) and, for
# DataLoader iterators, bytes. Plain JSON would turn tuples into lists, and grain's packing state
# compares against tuples, so both are tagged to survive the round trip exactly.


def _encode(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"iterator state has non-string keys {list(obj)}; cannot store it as JSON")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(x) for x in obj["__tuple__"])
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(x) for x in obj]
    return obj


def save_iterator_state(iterator, path: str | os.PathLike) -> None:
    """Write ``iterator.get_state()`` to ``path`` as JSON, atomically (write then rename).

    Call it at the same step as the model checkpoint; each host saves its own iterator (the
    states differ per shard), e.g. to ``<ckpt>/data_state.<process_index>.json``.
    """
    path = os.fspath(path)
    payload = json.dumps({"format": "kdjax.grain_iterator_state.v1", "state": _encode(iterator.get_state())})
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".iterator_state.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def restore_iterator_state(iterator, path: str | os.PathLike) -> None:
    """Load a state saved by :func:`save_iterator_state` into a fresh iterator of the same pipeline."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no iterator state at {path}; was save_iterator_state called for this step and host?")
    with open(path) as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != "kdjax.grain_iterator_state.v1":
        raise ValueError(f"{path} is not a kdjax iterator state file; pass the file written by save_iterator_state")
    iterator.set_state(_decode(payload["state"]))


def encode_iterator_state(state: Any) -> Any:
    """A grain iterator state as JSON-safe data (tuples and bytes tagged), for checkpoint metadata."""
    return _encode(state)


def decode_iterator_state(data: Any) -> Any:
    """The inverse of :func:`encode_iterator_state`."""
    return _decode(data)
