"""Offline teacher cache: run the teacher once, keep compact top-k log-probabilities per token.

Training from a cache: set ``config.data.<source>.teacher_cache`` to the cache directory; the stages
on that source load no teacher (:class:`TeacherCache`, :func:`stage_caches`, docs/cache.md).

Writing (once per data set and teacher; several processes each write their own rows)::

    python -m kdjax.cache --config=configs/cache_quickstart.py --workdir=workdir/cache

Reading (what a training stage that replaces its teacher by a cache calls)::

    from kdjax import cache
    from kdjax.knowledge.sparse import sparse_divergence

    manifest = cache.read_manifest(cache_dir)            # dict (see "Manifest" below); one-line errors
    cache.check_cache(cache_dir,                         # refuses a cache of another teacher/data, in one line
                      teacher_fingerprint=cache.teacher_fingerprint(teacher_model),   # or None to skip
                      tokenizer_fingerprint=cache.tokenizer_fingerprint(tokenizer),
                      dataset_fingerprint=cache.dataset_fingerprint(config.data.train),
                      max_length=config.data.train.max_length)
    ds = cache.make_cache_loader(cache_dir, batch_size=32, shuffle=True, seed=0)   # a grain IterDataset
    it = iter(ds)                                        # it.get_state()/set_state(): exact resume, and
    batch = next(it)                                     # kdjax.data.pipeline.save_iterator_state works on it
    loss, metrics = sparse_divergence(student_logits, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                      batch["teacher_tail_logprob"], batch["attention_mask"],
                                      kind="forward_kl", temperature=manifest["k_temperature"])

A batch holds numpy arrays: ``input_ids``/``attention_mask`` int32 ``[B, L]`` (``L`` = the cache's
``max_length``), ``token_type_ids`` int32 ``[B, L]`` and ``labels`` (``[B]`` class ids / regression
targets, or ``[B, L]`` token labels with -100 on padding) when the data had them, and
``teacher_topk_ids`` int32 ``[B, L, k]``, ``teacher_topk_logprobs`` float32 ``[B, L, k]`` (sorted,
largest first), ``teacher_tail_logprob`` float32 ``[B, L]`` (log of the mass outside the k ids).
Positions with ``attention_mask == 0`` hold zeros in the teacher fields. A cache of several teachers
(``config.teachers``) yields those three fields once per teacher, keyed ``teacher_topk_ids/<name>``
etc., and ``manifest["teachers"]`` gives each one's weight. ``make_cache_loader`` shards rows over
processes like :func:`kdjax.data.pipeline.make_loader` (``shard_index::shard_count`` of all rows), so a
cache written by N processes is read by any number M of them.

Storage (per row, an ArrayRecord record): the row's tokens up to its last valid position (the
reader re-pads with the tokenizer's pad id), its mask as bits, and per valid token the k ids
bit-packed to ``ceil(log2 V)`` bits each, the k log-probabilities as ``uint16`` (default) or
``uint8`` codes with a per-token float32 range, or as ``bfloat16``/``float32``, and the tail as
float32; a CRC32 per row detects corruption. ``manifest["bytes_per_token"]`` is measured on disk.

Manifest (``manifest.json``, written when every process has finished): format, kdjax version,
``teachers`` (name, weight, fingerprint = SHA-256 of the model config and weights, config, vocab
size, bits per id, LM head), ``tokenizer`` (fingerprint = SHA-256 of the vocabulary and special
tokens), ``dataset`` (fingerprint of source/task, split, preprocessing and packing; ``max_length``),
``k``, ``k_temperature``, ``logprob_format``, ``fields``, ``shards`` (file, rows, tokens, bytes, in
reading order), ``process_count``, ``rows``, ``tokens``, ``bytes_per_token``.

Resume: each process writes shards of ``cache.rows_per_shard`` rows to a temporary name and renames
them when complete, then records them (with the data iterator state) in its
``progress-<p>-of-<P>.json``. A rerun of the same command skips recorded shards, restores the data
iterator after the last of them and rewrites anything else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Mapping
from typing import Any, Optional

import grain
import numpy as np

log = logging.getLogger("kdjax")

FORMAT = "kdjax.teacher_cache.v1"
MANIFEST = "manifest.json"
LOGPROB_FORMATS = ("uint16", "uint8", "bfloat16", "float32")
TEACHER_FIELDS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
_HEADER = struct.Struct("<HHI")  # stored length, valid tokens, CRC32 of the payload
# One record per chunk, so random access reads only that row; uncompressed, because bit-packed ids and
# quantized codes barely compress and a compressed chunk costs about 130 framing bytes instead of 65.
_RECORD_OPTIONS = "group_size:1,uncompressed"

__all__ = ["CacheError", "LOGPROB_FORMATS", "MANIFEST", "TEACHER_FIELDS", "TeacherCache", "cache_settings",
           "check_cache", "checkpoint_fingerprint", "dataset_fingerprint", "dataset_spec", "make_cache_loader",
           "read_manifest", "stage_caches", "teacher_fingerprint", "tokenizer_fingerprint", "write_cache"]


class CacheError(ValueError):
    """A cache that is missing, corrupted, or of another teacher/tokenizer/data set (one-line message)."""


# ------------------------------------------------------------------------------------------------
# Fingerprints


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint(model) -> str:
    """SHA-256 over a model's config and the bytes of every parameter (in path order).

    Parameters spread over several processes are gathered one at a time, so a host holds at most one
    whole parameter.
    """
    import jax
    from kdjax.hub.api import flat_params

    digest = hashlib.sha256(_sha(model.config.to_dict()).encode())
    for path, value in sorted(flat_params(model.params).items()):
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils
            value = multihost_utils.process_allgather(value, tiled=True)
        array = np.ascontiguousarray(np.asarray(jax.device_get(value)))
        digest.update(f"{path}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(directory: Optional[str]) -> Optional[str]:
    """A teacher checkpoint's identity without reading its weights whole, or None for no checkpoint.

    SHA-256 over ``config.json`` and, per weight file (sorted names), its name, size and 16 evenly
    spaced 64 KiB windows (first and last included): about 1 MiB read per file. Any other checkpoint,
    and any fine-tune of the same one (which changes essentially every weight), gives another value;
    it is an identity check for caches, not a defence against a deliberate edit of unsampled bytes.
    """
    if not directory or not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    from kdjax.hub import checkpoint as ckpt
    try:
        _, files = ckpt.checkpoint_files(directory)
    except Exception:  # no weights here (a config-only directory): nothing to identify
        return None
    digest = hashlib.sha256()
    with open(os.path.join(directory, "config.json"), "rb") as f:
        digest.update(f.read())
    window, samples = 1 << 16, 16
    for path in sorted(files):
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - window) * i // (samples - 1)))
                digest.update(f.read(window))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over the vocabulary (token → id), the special tokens and, for fast tokenizers, the
    normalizer and pre-tokenizer (lower-casing changes the ids of the same text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = None
    if backend is not None:
        spec = json.loads(backend.to_str())
        pipeline = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor")}
    return _sha({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map,
                 "pipeline": pipeline})


def _cfg(cfg, key, default=None):
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def dataset_spec(data_spec) -> dict:
    """What identifies the cached data: source (task or file, with a content hash where one is cheap),
    split, preprocessing and packing. ``max_length`` is kept apart (it is checked on its own)."""
    task = _cfg(data_spec, "task")
    path = _cfg(data_spec, "path")
    out: dict[str, Any] = {"split": _cfg(data_spec, "split", "train"), "pack": bool(_cfg(data_spec, "pack", False))}
    if task:
        from kdjax.data import embedded
        from kdjax.data import tasks as tasks_lib
        spec = tasks_lib.get_task(task)
        out.update(source=f"task:{spec.name}", tfds_name=spec.tfds_name, text_fields=list(spec.text_fields),
                   label_field=spec.label_field, input_format=spec.input_format,
                   split_name=spec.split(out["split"]))
        if spec.tfds_name in (embedded.CORPUS_NAME, embedded.REVIEWS_NAME):
            out["content_sha256"] = embedded.source_fingerprint(spec.tfds_name)
        if spec.is_corpus and _cfg(data_spec, "pack") is None:
            out["pack"] = True  # make_task_loader packs corpora unless told otherwise
    elif path:
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        out.update(source=f"file:{os.path.basename(path)}", content_sha256=content,
                   format=_cfg(data_spec, "format") or os.path.splitext(path)[1].lstrip("."),
                   text_fields=list(_cfg(data_spec, "text_fields", ("text",))),
                   label_field=_cfg(data_spec, "label_field"))
    else:
        raise CacheError("config.data.train needs `task` (a registered task) or `path` (a local file) to cache")
    return out


def dataset_fingerprint(data_spec) -> str:
    """SHA-256 of :func:`dataset_spec` (a config's ``data.train`` section, or the dict itself)."""
    spec = data_spec if isinstance(data_spec, dict) and "source" in data_spec else dataset_spec(data_spec)
    return _sha(spec)


# ------------------------------------------------------------------------------------------------
# Row encoding


def _bits_for(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2**bits, ``bits`` bits each, little-endian bit order."""
    v = np.asarray(values, np.uint32).reshape(-1)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=count * bits)
    return (planes.reshape(count, bits).astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1)


def _logprob_nbytes(fmt: str, n: int, k: int) -> int:
    if fmt == "uint16":
        return n * k * 2 + n * 8
    if fmt == "uint8":
        return n * k + n * 8
    return n * k * (2 if fmt == "bfloat16" else 4)


def encode_logprobs(lp: np.ndarray, fmt: str) -> bytes:
    """``[n, k]`` log-probabilities → bytes. Integer codes map each token's [min, max] range linearly
    (float32 min and max stored per token), so the error is at most (max − min) / (2 (2^b − 1))."""
    lp = np.asarray(lp, np.float32)
    if fmt in ("uint16", "uint8"):
        levels = 65535 if fmt == "uint16" else 255
        lo, hi = lp.min(-1, keepdims=True), lp.max(-1, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        codes = np.rint((lp - lo) / span * levels).astype(np.uint16 if fmt == "uint16" else np.uint8)
        return codes.tobytes() + np.concatenate([lo, hi], -1).astype(np.float32).tobytes()
    if fmt == "bfloat16":
        import ml_dtypes
        return lp.astype(ml_dtypes.bfloat16).tobytes()
    return lp.tobytes()


def decode_logprobs(data: bytes, fmt: str, n: int, k: int) -> np.ndarray:
    if fmt in ("uint16", "uint8"):
        dtype, levels = (np.uint16, 65535) if fmt == "uint16" else (np.uint8, 255)
        codes = np.frombuffer(data, dtype, count=n * k).reshape(n, k).astype(np.float32)
        lo_hi = np.frombuffer(data, np.float32, offset=n * k * np.dtype(dtype).itemsize).reshape(n, 2)
        return lo_hi[:, :1] + codes / levels * (lo_hi[:, 1:] - lo_hi[:, :1])
    if fmt == "bfloat16":
        import ml_dtypes
        return np.frombuffer(data, ml_dtypes.bfloat16).reshape(n, k).astype(np.float32)
    return np.frombuffer(data, np.float32).reshape(n, k).copy()


class RowCodec:
    """Encodes one example (its tokens and each teacher's top-k per valid token) as bytes, and back."""

    def __init__(self, layout: Mapping[str, Any]):
        self.layout = dict(layout)
        self.max_length = int(layout["max_length"])
        self.pad_id = int(layout["pad_id"])
        self.id_dtype = np.dtype(layout["id_dtype"])
        self.token_type_ids = bool(layout["token_type_ids"])
        self.labels = layout["labels"]  # None, "token", "int32" or "float32"
        self.k = int(layout["k"])
        self.fmt = layout["logprob_format"]
        self.teachers = [(t["name"], int(t["bits_per_id"])) for t in layout["teachers"]]

    def encode(self, row: Mapping[str, np.ndarray], topk: Mapping[str, tuple]) -> tuple[bytes, int]:
        """``row``: one example's arrays ``[L]``; ``topk[name]``: ``(ids [L, k], logprobs [L, k], tail [L])``."""
        mask = np.asarray(row["attention_mask"]).astype(bool)
        ids = np.asarray(row["input_ids"])
        stored = int(np.nonzero(mask)[0][-1]) + 1 if mask.any() else 0
        trailing_plain = (np.all(ids[stored:] == self.pad_id)
                          and (not self.token_type_ids or np.all(row["token_type_ids"][stored:] == 0))
                          and (self.labels != "token" or np.all(row["labels"][stored:] == -100)))
        if not trailing_plain:
            stored = len(ids)
        valid = np.nonzero(mask[:stored])[0]
        parts = [ids[:stored].astype(self.id_dtype).tobytes(), np.packbits(mask[:stored]).tobytes()]
        if self.token_type_ids:
            parts.append(np.asarray(row["token_type_ids"][:stored]).astype(np.uint8).tobytes())
        if self.labels == "token":
            parts.append(np.asarray(row["labels"][:stored]).astype(np.int32).tobytes())
        elif self.labels is not None:
            parts.append(np.asarray(row["labels"]).astype(self.labels).reshape(1).tobytes())
        for name, bits in self.teachers:
            t_ids, t_lp, t_tail = topk[name]
            parts.append(pack_bits(np.asarray(t_ids)[valid], bits))
            parts.append(encode_logprobs(np.asarray(t_lp)[valid], self.fmt))
            parts.append(np.asarray(t_tail)[valid].astype(np.float32).tobytes())
        payload = b"".join(parts)
        return _HEADER.pack(stored, len(valid), zlib.crc32(payload)) + payload, len(valid)

    def decode(self, record: bytes, where: str) -> dict[str, np.ndarray]:
        if len(record) < _HEADER.size:
            raise CacheError(f"{where} is truncated ({len(record)} bytes); rewrite the cache")
        stored, n, crc = _HEADER.unpack_from(record)
        payload = memoryview(record)[_HEADER.size:]
        if zlib.crc32(payload) != crc:
            raise CacheError(f"{where} is corrupted (checksum mismatch); rewrite the cache")
        L, k = self.max_length, self.k
        if stored > L:
            raise CacheError(f"{where} holds {stored} tokens, more than the manifest's max_length {L}")
        pos = 0

        def take(nbytes):
            nonlocal pos
            chunk = payload[pos:pos + nbytes]
            if len(chunk) != nbytes:
                raise CacheError(f"{where} is shorter than its layout says; rewrite the cache")
            pos += nbytes
            return bytes(chunk)

        out = {"input_ids": np.full(L, self.pad_id, np.int32), "attention_mask": np.zeros(L, np.int32)}
        out["input_ids"][:stored] = np.frombuffer(take(stored * self.id_dtype.itemsize), self.id_dtype)
        mask = np.unpackbits(np.frombuffer(take((stored + 7) // 8), np.uint8), count=stored)
        out["attention_mask"][:stored] = mask
        if self.token_type_ids:
            out["token_type_ids"] = np.zeros(L, np.int32)
            out["token_type_ids"][:stored] = np.frombuffer(take(stored), np.uint8)
        if self.labels == "token":
            out["labels"] = np.full(L, -100, np.int32)
            out["labels"][:stored] = np.frombuffer(take(stored * 4), np.int32)
        elif self.labels is not None:
            out["labels"] = np.frombuffer(take(4), self.labels)[0]
        valid = np.nonzero(mask)[0]
        if len(valid) != n:
            raise CacheError(f"{where} has {len(valid)} valid tokens but its header says {n}; rewrite the cache")
        single = len(self.teachers) == 1
        for name, bits in self.teachers:
            ids = np.zeros((L, k), np.int32)
            lp = np.zeros((L, k), np.float32)
            tail = np.zeros(L, np.float32)
            ids[valid] = unpack_bits(take((n * k * bits + 7) // 8), bits, n * k).reshape(n, k)
            lp[valid] = decode_logprobs(take(_logprob_nbytes(self.fmt, n, k)), self.fmt, n, k)
            tail[valid] = np.frombuffer(take(n * 4), np.float32)
            suffix = "" if single else f"/{name}"
            out[f"teacher_topk_ids{suffix}"] = ids
            out[f"teacher_topk_logprobs{suffix}"] = lp
            out[f"teacher_tail_logprob{suffix}"] = tail
        if pos != len(payload):
            raise CacheError(f"{where} has {len(payload) - pos} bytes beyond its layout; rewrite the cache")
        return out


# ------------------------------------------------------------------------------------------------
# Manifest and checks


def _json_load(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"no {what} at {path}; write the cache with python -m kdjax.cache (or finish that run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); rewrite the cache") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path} is not a kdjax teacher cache {what} (format {FORMAT})")
    return data


def read_manifest(cache_dir: str) -> dict:
    """The cache's ``manifest.json`` as a dict (see the module docstring); one-line errors."""
    manifest = _json_load(os.path.join(os.fspath(cache_dir), MANIFEST), "manifest")
    for field in ("teachers", "tokenizer", "dataset", "k", "k_temperature", "logprob_format", "layout", "shards"):
        if field not in manifest:
            raise CacheError(f"{os.path.join(cache_dir, MANIFEST)} has no {field!r} field; rewrite the cache")
    return manifest


def check_cache(cache_dir: str, *, teacher_fingerprint: Optional[str] = None,
                tokenizer_fingerprint: Optional[str] = None, dataset_fingerprint: Optional[str] = None,
                max_length: Optional[int] = None) -> dict:
    """The manifest, if the cache matches every given expectation (None skips that check).

    Raises:
      CacheError: one line naming each field that differs (teacher, tokenizer, dataset, max_length).
    """
    manifest = read_manifest(cache_dir)
    got_teacher = ",".join(t["fingerprint"] for t in manifest["teachers"])
    checks = (("teacher", teacher_fingerprint, got_teacher),
              ("tokenizer", tokenizer_fingerprint, manifest["tokenizer"]["fingerprint"]),
              ("dataset", dataset_fingerprint, manifest["dataset"]["fingerprint"]),
              ("max_length", max_length, manifest["dataset"]["max_length"]))
    short = lambda v: str(v)[:12]  # noqa: E731
    diffs = [f"{name} (cache {short(have)}, expected {short(want)})" for name, want, have in checks
             if want is not None and str(want) != str(have)]
    if diffs:
        raise CacheError(f"teacher cache {cache_dir} does not match this run: {'; '.join(diffs)}")
    return manifest


# ------------------------------------------------------------------------------------------------
# Reader


class CacheSource:
    """Random-access source over a cache's shards: row ``i`` decoded into padded numpy arrays.

    Rows are in the manifest's shard order. Every shard is opened (and its row count checked against
    the manifest) on construction, so a truncated or missing shard is reported before training starts.
    """

    def __init__(self, cache_dir: str, manifest: Optional[dict] = None):
        self.cache_dir = os.fspath(cache_dir)
        self.manifest = manifest or read_manifest(cache_dir)
        self.codec = RowCodec(self.manifest["layout"])
        self.paths = [os.path.join(self.cache_dir, s["file"]) for s in self.manifest["shards"]]
        rows = []
        for path, shard in zip(self.paths, self.manifest["shards"]):
            n = _count_rows(path)
            if n != shard["rows"]:
                raise CacheError(f"shard {path} has {n} rows, the manifest says {shard['rows']}; rewrite the cache")
            rows.append(n)
        self.offsets = np.cumsum([0] + rows)
        self._source = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        index = int(index)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        where = f"row {index - self.offsets[shard]} of shard {self.paths[shard]}"
        try:
            record = self._source[index]
        except Exception as e:  # riegeli reports damage with bare RuntimeErrors
            raise CacheError(f"cannot read {where} ({type(e).__name__}: {str(e)[:120] or 'unreadable'}); "
                             "rewrite the cache") from None
        return self.codec.decode(record, where)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def __repr__(self) -> str:
        return f"CacheSource({self.cache_dir!r}, rows={len(self)})"


def _count_rows(path: str) -> int:
    from array_record.python import array_record_module as arm
    if not os.path.isfile(path):
        raise CacheError(f"shard {path} is missing; rewrite the cache")
    try:
        reader = arm.ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
    except Exception:
        raise CacheError(f"shard {path} is truncated or corrupted (cannot open it); rewrite the cache") from None
    return int(n)


def make_cache_loader(cache_dir: str, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                      num_epochs: Optional[int] = None, shard_index: Optional[int] = None,
                      shard_count: Optional[int] = None, drop_remainder: bool = True,
                      worker_count: int = 0, read_options: Optional[grain.ReadOptions] = None) -> grain.IterDataset:
    """Batches of a teacher cache (fields in the module docstring), as a checkpointable grain dataset.

    Order of stages as in :func:`kdjax.data.pipeline.make_loader`: this process's rows
    (``shard_index::shard_count``, default ``jax.process_index()/process_count()``), a global
    shuffle reseeded every epoch, repeat (``num_epochs=None`` = forever), decode, batch.
    """
    from kdjax.data.pipeline import sharded_records, with_workers
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = CacheSource(cache_dir)
    if len(source) == 0:
        raise CacheError(f"teacher cache {cache_dir} has no rows")
    ds = sharded_records(source, shard_index=shard_index, shard_count=shard_count, shuffle=shuffle, seed=seed,
                         num_epochs=num_epochs, what="cached rows", error=CacheError)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return with_workers(ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)),
                        worker_count)


# ------------------------------------------------------------------------------------------------
# Training from a cache: `data.<source>.teacher_cache`


class TeacherCache:
    """A verified teacher cache standing in for the teachers of the stages that read its data source.

    Built by :func:`stage_caches` from ``config.data.<source>.teacher_cache``. Verification reads the
    manifest, each configured teacher's ``config.json`` and a sampled fingerprint of its weight files
    (:func:`checkpoint_fingerprint`, about 1 MiB per file) and its tokenizer files; no teacher weights
    are loaded. ``teachers(weights)`` gives ``{name: (Model shell, weight)}``: the cached teacher's
    config (its head included, e.g. the tied MLM head), a :class:`kdjax.knowledge.sparse.CachedTeacherRef`
    as graphdef and no parameters, so the step runs no teacher forward. ``loader(seed)`` is the stage's
    data: the cached rows themselves (tokens, mask, labels and top-k together), so batch and teacher
    rows cannot drift apart and the loader's checkpointed state resumes both.
    """

    def __init__(self, cache_dir: str, manifest: dict, section: str, batch_size: int, tokenizer,
                 teacher_paths: Mapping[str, str]):
        from kdjax.knowledge.sparse import CachedTeacherRef
        from kdjax.models.config import ModelConfig
        self.cache_dir, self.manifest, self.section, self.batch_size = cache_dir, manifest, section, int(batch_size)
        self.tokenizer = tokenizer
        self.teacher_paths = dict(teacher_paths)
        single = len(manifest["teachers"]) == 1
        self.refs, self.configs = {}, {}
        for t in manifest["teachers"]:
            self.refs[t["name"]] = CachedTeacherRef(name=t["name"], suffix="" if single else f"/{t['name']}",
                                                    temperature=float(manifest["k_temperature"]), k=int(manifest["k"]))
            fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in t["config"].items()}
            self.configs[t["name"]] = ModelConfig(**fields)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for ref in self.refs.values() for f in ref.fields())

    def teachers(self, weights: Mapping[str, float]) -> dict:
        from kdjax.hub.api import Model
        if not hasattr(self, "_shells"):  # built once: the run asks for them every step
            self._shells = {name: Model(self.configs[name], ref, None, self.tokenizer,
                                        source=self.teacher_paths.get(name)) for name, ref in self.refs.items()}
        return {name: (shell, float(weights.get(name, 1.0))) for name, shell in self._shells.items()}

    def init_teacher(self, name: Optional[str] = None, **load_kwargs):
        """The checkpoint of teacher ``name`` loaded once, with the head the cache was written with: what a
        student that copies teacher layers is initialized from (the run then drops it)."""
        from kdjax.hub.api import load_pretrained
        name = name or next(iter(self.refs))
        model = load_pretrained(self.teacher_paths[name], **load_kwargs)
        lm_head = next(t for t in self.manifest["teachers"] if t["name"] == name).get("lm_head")
        return tied_lm_head(model) if lm_head == "tied" else model

    def loader(self, seed: int) -> grain.IterDataset:
        return make_cache_loader(self.cache_dir, batch_size=self.batch_size, shuffle=True, seed=seed, num_epochs=None,
                                 drop_remainder=True)

    def __repr__(self) -> str:
        return f"TeacherCache({self.cache_dir!r}, data.{self.section}, teachers={list(self.refs)})"


def open_teacher_cache(cache_dir: str, data_spec, teacher_specs: Mapping[str, Mapping[str, Any]], *,
                       section: str = "train") -> TeacherCache:
    """Verify a cache against a run's teachers and data source, without loading any teacher weights.

    Refuses, in one line naming every difference: other teacher names, another teacher checkpoint
    (:func:`checkpoint_fingerprint`), tokenizer, data set (source, split, preprocessing, packing) or
    ``max_length``.
    """
    from kdjax.distill.run import resolve_model_path
    from kdjax.hub import checkpoint as ckpt
    from kdjax.hub.api import _load_tokenizer
    where = f"config.data.{section}.teacher_cache"
    manifest = read_manifest(cache_dir)
    cached = [t["name"] for t in manifest["teachers"]]
    if sorted(cached) != sorted(teacher_specs):
        raise CacheError(f"{where}={cache_dir} holds teacher(s) {', '.join(cached)} but this run names "
                         f"{', '.join(teacher_specs)}; write a cache for these teachers")
    diffs, paths, tokenizer = [], {}, None
    short = lambda v: str(v)[:12]  # noqa: E731
    for t in manifest["teachers"]:
        spec = teacher_specs[t["name"]]
        if not spec.get("path"):
            raise CacheError(f"teacher {t['name']!r} has no path; {where} checks the cache against its checkpoint")
        try:
            directory = ckpt.resolve_checkpoint_dir(resolve_model_path(spec["path"]), allow_download=False)
        except Exception as e:  # pylint: disable=broad-except
            raise CacheError(f"{where}: teacher {t['name']!r}: {e}") from None
        paths[t["name"]] = directory
        have = t.get("checkpoint")
        if have is None:
            raise CacheError(f"{where}={cache_dir} records no checkpoint fingerprint for teacher {t['name']!r} (written "
                             "from an in-memory model); rewrite it with python -m kdjax.cache from the checkpoint")
        want = checkpoint_fingerprint(directory)
        if want != have:
            diffs.append(f"teacher {t['name']!r} (cache {short(have)}, run {short(want)})")
        if tokenizer is None:
            tokenizer = _load_tokenizer(directory)
    if tokenizer is None:
        raise CacheError(f"{where}: the teacher directory has no tokenizer files to check the cache against")
    checks = (("tokenizer", tokenizer_fingerprint(tokenizer), manifest["tokenizer"]["fingerprint"]),
              ("dataset", dataset_fingerprint(data_spec), manifest["dataset"]["fingerprint"]),
              ("max_length", int(_cfg(data_spec, "max_length", 128)), manifest["dataset"]["max_length"]))
    diffs += [f"{name} (cache {short(have)}, run {short(want)})" for name, want, have in checks if str(want) != str(have)]
    if diffs:
        raise CacheError(f"{where}={cache_dir} does not match this run: {'; '.join(diffs)}")
    CacheSource(cache_dir, manifest)  # every shard present with its recorded row count
    return TeacherCache(os.fspath(cache_dir), manifest, section, int(_cfg(data_spec, "batch_size", 32)), tokenizer,
                        paths)


def stage_caches(config, method) -> dict[int, TeacherCache]:
    """``{stage index: TeacherCache}`` of the stages whose data source (``data[stage.data]``, else
    ``data.train``) sets ``teacher_cache``; each cache is opened and verified once."""
    from kdjax.distill.run import teacher_specs
    data = _cfg(config, "data")
    out, opened = {}, {}
    for i, stage in enumerate(method.stages):
        section = stage.data if _cfg(data, stage.data) is not None else "train"
        spec = _cfg(data, section)
        cache_dir = _cfg(spec, "teacher_cache")
        if not cache_dir:
            continue
        if section not in opened:
            opened[section] = open_teacher_cache(cache_dir, spec, teacher_specs(config), section=section)
        out[i] = opened[section]
    return out


# ------------------------------------------------------------------------------------------------
# Writer


def cache_settings(config) -> dict:
    """``config.cache`` with defaults: k=64, k_temperature=1, logprob_format="uint16",
    rows_per_shard=1024, batch_size (default data.train.batch_size), lm_head (None or "tied")."""
    c = _cfg(config, "cache")
    data = _cfg(_cfg(config, "data"), "train")
    out = dict(k=int(_cfg(c, "k", 64)), k_temperature=float(_cfg(c, "k_temperature", 1.0)),
               logprob_format=str(_cfg(c, "logprob_format", "uint16")), rows_per_shard=int(_cfg(c, "rows_per_shard", 1024)),
               batch_size=int(_cfg(c, "batch_size", _cfg(data, "batch_size", 32))), lm_head=_cfg(c, "lm_head"))
    if out["logprob_format"] not in LOGPROB_FORMATS:
        raise CacheError(f"config.cache.logprob_format={out['logprob_format']!r} is not one of {', '.join(LOGPROB_FORMATS)}")
    if out["k"] < 1:
        raise CacheError(f"config.cache.k={out['k']} must be >= 1")
    if not out["k_temperature"] > 0:
        raise CacheError(f"config.cache.k_temperature={out['k_temperature']} must be > 0")
    if out["lm_head"] not in (None, "tied"):
        raise CacheError(f"config.cache.lm_head={out['lm_head']!r} must be None (the checkpoint's head) or 'tied'")
    if out["rows_per_shard"] < 1 or out["batch_size"] < 1:
        raise CacheError("config.cache.rows_per_shard and the batch size must be >= 1")
    return out


def tied_lm_head(model):
    """A model with an MLM head built only from its own weights: identity transform, unit layer norm,
    zero bias, decoder tied to the input embeddings, so ``logits = LN(act(h)) · Eᵀ``.

    For encoders shipped without an MLM head (sentence-transformers checkpoints such as
    all-MiniLM-L6-v2). It is a deterministic function of the checkpoint, not a trained MLM head.
    """
    import jax.numpy as jnp
    from kdjax.distill.run import with_head
    from kdjax.hub.api import Model, flat_params, params_from_flat

    if model.config.head in ("mlm", "causal_lm"):
        return model
    if not model.config.tie_word_embeddings:
        raise CacheError(f"cache.lm_head='tied' needs a model with tied word embeddings; {model.source} has none")
    headed = with_head(model, "mlm")
    flat = dict(flat_params(headed.params))
    d = model.config.hidden_size
    for key, value in list(flat.items()):
        if key.startswith("mlm_transform/") and key.endswith("kernel"):
            flat[key] = jnp.eye(d, dtype=value.dtype)
        elif key.startswith("mlm_transform/") or key == "mlm_bias" or (key.startswith("mlm_norm/") and "bias" in key):
            flat[key] = jnp.zeros_like(value)
        elif key.startswith("mlm_norm/"):
            flat[key] = jnp.ones_like(value)
    params = params_from_flat(headed.params, flat, headed.config.params_dtype)
    return Model(headed.config, headed.graphdef, params, model.tokenizer, source=model.source, id2label=model.id2label)


def _data_loader(config, tokenizer, batch_size: int, shard_index: int, shard_count: int):
    from kdjax.data import pipeline, sources
    from kdjax.data import tasks as tasks_lib
    spec = _cfg(_cfg(config, "data"), "train")
    if spec is None:
        raise CacheError("the config has no data.train section: set config.data.train.task (e.g. 'kdjax_corpus')")
    kw = dict(max_length=int(_cfg(spec, "max_length", 128)), batch_size=batch_size, shuffle=False, num_epochs=1,
              drop_remainder=False, shard_index=shard_index, shard_count=shard_count)
    if _cfg(spec, "pack") is not None:
        kw["pack"] = bool(_cfg(spec, "pack"))
    task = _cfg(spec, "task")
    if task:
        return pipeline.make_task_loader(tasks_lib.get_task(task), _cfg(spec, "split", "train"), tokenizer,
                                         data_dir=_cfg(spec, "data_dir"), **kw)
    path = _cfg(spec, "path")
    fmt = _cfg(spec, "format") or os.path.splitext(path)[1].lstrip(".")
    source = {"jsonl": sources.JsonlSource, "csv": sources.CsvSource}.get(fmt, sources.TextFileSource)(path)
    return pipeline.make_loader(source, tokenizer, text_fields=tuple(_cfg(spec, "text_fields", ("text",))),
                                label_field=_cfg(spec, "label_field"), label_names=_cfg(spec, "label_names"), **kw)


@functools.lru_cache(maxsize=8)
def _topk_fn(graphdefs: tuple, k: int, temperature: float):
    """One jitted function: (params, batch) → {name: (ids, logprobs, tail)} for every teacher.

    Cached per (teachers' graphdefs, k, temperature), so writing several caches in one process (the
    benchmark, tests) compiles once. On a mesh the parameters carry their shardings and the caller
    places the batch; jit follows them.
    """
    import jax
    from kdjax.knowledge.sparse import dense_to_sparse
    from kdjax.models.transformer import forward

    def fn(params, batch):
        out = {}
        for name, graphdef in graphdefs:
            teacher = jax.named_call(lambda p, b, g=graphdef: forward(g, p, b)[0].logits, name="teacher")
            out[name] = dense_to_sparse(teacher(params[name], batch), k, temperature)
        return out

    return jax.jit(fn)


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _progress_path(workdir: str, p: int, count: int) -> str:
    return os.path.join(workdir, f"progress-{p:05d}-of-{count:05d}.json")


def write_cache(config, workdir: str, *, process_index: Optional[int] = None, process_count: Optional[int] = None,
                max_shards: Optional[int] = None, teachers=None, progress: Optional[bool] = None) -> Optional[dict]:
    """Run the configured teacher(s) once over ``config.data.train`` and write this process's rows.

    Args:
      config: a kdjax config with ``teacher``/``teachers``, ``data.train`` and optionally ``cache``
        (:func:`cache_settings`) and ``mesh``.
      workdir: the cache directory (local).
      process_index, process_count: this writer's share of the data (default: the jax process).
      max_shards: stop after writing this many new shards (a resumable partial run).
      teachers: ``{name: (Model, weight)}`` instead of loading them (tests).
      progress: show a tqdm bar (default: on process 0).

    Returns:
      The manifest once every process has finished, else None.
    """
    import jax
    from array_record.python import array_record_module as arm
    from kdjax import __version__
    from kdjax.data import pipeline
    from kdjax.distill.run import build_mesh, load_teachers

    settings = cache_settings(config)
    p = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < count:
        raise CacheError(f"process_index={p} must be in [0, process_count={count})")
    workdir = os.fspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=workdir, prefix=".probe.")
        probe.close()
    except OSError as e:
        raise CacheError(f"cache workdir {workdir} is not writable ({e.strerror or e})") from None

    mesh = None
    if teachers is None:
        mesh = build_mesh(config) if jax.device_count() > 1 else None
        teachers = load_teachers(config, mesh)
    models = {}
    for name, (model, _) in teachers.items():
        if settings["lm_head"] == "tied":
            if mesh is not None and mesh.size > 1:
                raise CacheError("cache.lm_head='tied' is for small unsharded teachers; drop config.mesh")
            model = tied_lm_head(model)
        if model.config.head not in ("mlm", "causal_lm"):
            raise CacheError(f"teacher {name!r} has head {model.config.head!r}, which gives no token logits; load it "
                             "with config.teacher.head='mlm' or 'causal_lm', or set config.cache.lm_head='tied'")
        if settings["k"] > model.config.vocab_size:
            raise CacheError(f"config.cache.k={settings['k']} exceeds teacher {name!r}'s vocabulary size "
                             f"V={model.config.vocab_size}")
        models[name] = model
    first = next(iter(models.values()))
    tokenizer = first.tokenizer
    if tokenizer is None:
        raise CacheError("the teacher has no tokenizer; load it from a directory with tokenizer files")
    data_spec = _cfg(_cfg(config, "data"), "train")
    max_length = int(_cfg(data_spec, "max_length", 128))
    dataset = dataset_spec(data_spec)
    vocab_limit = max(len(tokenizer), max(m.config.vocab_size for m in models.values()))
    header = {
        "format": FORMAT, "kdjax_version": __version__, "k": settings["k"], "k_temperature": settings["k_temperature"],
        "logprob_format": settings["logprob_format"],
        "teachers": [{"name": n, "weight": float(teachers[n][1]), "fingerprint": teacher_fingerprint(m),
                      "config": m.config.to_dict(), "vocab_size": m.config.vocab_size,
                      "bits_per_id": _bits_for(m.config.vocab_size), "lm_head": settings["lm_head"] or "checkpoint",
                      "source": m.source, "checkpoint": checkpoint_fingerprint(m.source)} for n, m in models.items()],
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "name": type(tokenizer).__name__,
                      "size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
        "dataset": dict(dataset, fingerprint=dataset_fingerprint(dataset), max_length=max_length),
        "process_count": count,
    }
    fingerprint = _sha(header)
    prog_path = _progress_path(workdir, p, count)
    others = [f for f in os.listdir(workdir) if f.startswith("progress-") and not f.endswith(f"-of-{count:05d}.json")]
    if others:
        raise CacheError(f"{workdir} holds a cache being written by a different number of processes ({others[0]}); "
                         f"use that number or a new workdir")
    state = {"format": FORMAT, "fingerprint": fingerprint, "shards": [], "done": False}
    if os.path.exists(prog_path):
        state = _json_load(prog_path, "progress file")
        if state.get("fingerprint") != fingerprint:
            raise CacheError(f"{prog_path} belongs to a cache of another teacher, data set or cache setting; "
                             "use a new workdir")
    if state["done"]:
        if os.path.exists(os.path.join(workdir, MANIFEST)):
            return read_manifest(workdir)
        return _finalize(workdir, state["header"], count)

    batch_size = settings["batch_size"]
    loader = _data_loader(config, tokenizer, batch_size, p, count)
    it = iter(loader)
    if state["shards"]:
        it.set_state(pipeline.decode_iterator_state(state["shards"][-1]["iterator_state"]))
    # Anything of this process not recorded as complete (a shard cut short by a kill) is rewritten.
    done_files = {s["file"] for s in state["shards"]}
    prefix = f"shard-{p:05d}-of-{count:05d}-"
    for f in os.listdir(workdir):
        if (f.startswith(prefix) or f.startswith("." + prefix)) and f not in done_files:
            os.remove(os.path.join(workdir, f))

    sample = next(iter(_data_loader(config, tokenizer, 1, p, count)))
    labels = None
    if "labels" in sample:
        labels = "token" if np.ndim(sample["labels"]) == 2 else str(np.asarray(sample["labels"]).dtype)
    layout = {"max_length": max_length, "pad_id": int(tokenizer.pad_token_id or 0),
              "id_dtype": "uint16" if vocab_limit <= 65536 else "uint32",
              "token_type_ids": "token_type_ids" in sample, "labels": labels, "k": settings["k"],
              "logprob_format": settings["logprob_format"],
              "teachers": [{"name": t["name"], "bits_per_id": t["bits_per_id"]} for t in header["teachers"]]}
    codec = RowCodec(layout)
    header["layout"] = layout

    fn = _topk_fn(tuple((n, m.graphdef) for n, m in models.items()), settings["k"], settings["k_temperature"])
    params = {n: m.params for n, m in models.items()}
    batches_per_shard = max(1, math.ceil(settings["rows_per_shard"] / batch_size))
    show = (p == 0) if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(desc=f"caching teacher top-{settings['k']}", unit="row", file=sys.stderr,
                   initial=sum(s["rows"] for s in state["shards"]))
    new_shards = 0
    exhausted = False
    while not exhausted and (max_shards is None or new_shards < max_shards):
        index = len(state["shards"])
        name = f"{prefix}{index:05d}.arrayrecord"
        tmp_path = os.path.join(workdir, "." + name)
        writer = None
        rows = tokens = record_bytes = 0
        for _ in range(batches_per_shard):
            try:
                batch = next(it)
            except StopIteration:
                exhausted = True
                break
            n = len(batch["input_ids"])
            feed = {k: _pad_rows(np.asarray(v), batch_size) for k, v in batch.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")}
            if mesh is not None and mesh.size > 1:
                from kdjax import sharding as sharding_lib
                from kdjax.distill.run import model_rules
                feed = sharding_lib.shard_batch(feed, sharding_lib.batch_sharding(mesh, model_rules(config, "teacher",
                                                                                                   next(iter(models)))))
            result = fn(params, feed)
            result = {t: tuple(_host_rows(x) for x in v) for t, v in result.items()}
            if writer is None:
                writer = arm.ArrayRecordWriter(tmp_path, _RECORD_OPTIONS)
            for b in range(n):
                row = {key: np.asarray(v)[b] for key, v in batch.items()}
                record, valid = codec.encode(row, {t: tuple(x[b] for x in v) for t, v in result.items()})
                writer.write(record)
                record_bytes += len(record)
                rows += 1
                tokens += valid
            if bar is not None:
                bar.update(n)
        if writer is None:
            break
        writer.close()
        os.replace(tmp_path, os.path.join(workdir, name))
        state["shards"].append({"file": name, "rows": rows, "tokens": tokens, "record_bytes": record_bytes,
                                "bytes": os.path.getsize(os.path.join(workdir, name)),
                                "iterator_state": pipeline.encode_iterator_state(it.get_state())})
        new_shards += 1
        _atomic_write(prog_path, json.dumps(state))
    if bar is not None:
        bar.close()
    if not exhausted:
        try:  # the loop stopped on max_shards, or ended exactly at a shard boundary
            next(it)
            return None
        except StopIteration:
            pass
    state["done"] = True
    state["header"] = header
    _atomic_write(prog_path, json.dumps(state))
    if count > 1 and jax.process_count() == count:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("kdjax.cache.written")
        if p != 0:
            return None
    return _finalize(workdir, header, count)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """A final partial batch padded with empty rows, so the teacher compiles one shape."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def _host_rows(x) -> np.ndarray:
    import jax
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))
    return np.asarray(x)


def _finalize(workdir: str, header: dict, count: int) -> Optional[dict]:
    """Write the manifest when every process's progress file says done; else return None."""
    shards = []
    for q in range(count):
        path = _progress_path(workdir, q, count)
        if not os.path.exists(path):
            return None
        state = _json_load(path, "progress file")
        if not state.get("done"):
            return None
        if state.get("fingerprint") != _sha({k: v for k, v in header.items() if k != "layout"}):
            raise CacheError(f"{path} was written with another teacher, data set or cache setting; use a new workdir")
        shards += [{k: s[k] for k in ("file", "rows", "tokens", "record_bytes", "bytes")} for s in state["shards"]]
    rows = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    disk = sum(s["bytes"] for s in shards)
    records = sum(s["record_bytes"] for s in shards)
    # record_bytes_per_token: what the row format costs (tokens, mask, labels, top-k, headers);
    # bytes_per_token: the shard files on disk (adds ArrayRecord's framing and each file's final block).
    manifest = dict(header, shards=shards, rows=rows, tokens=tokens, bytes=disk, record_bytes=records,
                    bytes_per_token=round(disk / max(tokens, 1), 2),
                    record_bytes_per_token=round(records / max(tokens, 1), 2))
    _atomic_write(os.path.join(workdir, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


# ------------------------------------------------------------------------------------------------
# Command line

# Errors a user can fix; reported as one line without a traceback (as kdjax.main does).
_USER_ERRORS = ("ConfigError", "CheckpointError", "DatasetNotPreparedError", "UnknownTaskError", "MeshError",
                "ShardingError")


def main(argv):
    del argv
    from absl import flags
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = flags.FLAGS["config"].value
    workdir = flags.FLAGS["workdir"].value or _cfg(config, "workdir") or "workdir/cache"
    import jax
    from kdjax import sharding
    sharding.maybe_initialize_distributed()
    jax.config.update("jax_threefry_partitionable", True)
    try:
        manifest = write_cache(config, workdir)
    except Exception as e:  # pylint: disable=broad-except
        if isinstance(e, CacheError) or type(e).__name__ in _USER_ERRORS or (
                isinstance(e, (ValueError, FileNotFoundError)) and len(str(e).splitlines()) == 1):
            print(f"kdjax.cache: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    if manifest is not None:
        print(f"kdjax.cache: wrote {manifest['rows']} rows, {manifest['tokens']} tokens, "
              f"{manifest['bytes_per_token']} bytes/token to {workdir}")


def run():
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "A configs/<recipe>.py file with a teacher, data.train and cache.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "The cache directory.")
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
