"""GLMD vocabulary compression (GLMD-vc): a student with a smaller vocabulary than its teacher.

Most of a small student's parameters sit in its embedding and LM-head matrices, and most rows of
those matrices belong to tokens that almost never occur in the distillation corpus. GLMD-vc keeps
only the tokens that matter and gives the student a vocabulary of ``K < V`` rows:

1. :func:`count_token_frequencies` counts how often each teacher id occurs in the tokenized corpus.
2. :func:`select_kept_tokens` keeps the special tokens, then the task verbalizer tokens, then the
   most frequent tokens, up to ``rate * V`` rounded up to a multiple of 128 (TPU/GPU friendly). The
   order of the kept ids *defines* the student's ids ``0..K-1``.
3. :func:`build_remap` sends every dropped teacher id to the kept token whose teacher input
   embedding has the largest dot product with it (or cosine, or simply ``[UNK]``), so the student
   still sees a meaningful token where the teacher saw a rare one.

During distillation the teacher keeps its original ids and vocabulary; only the student's side is
compressed:

* student inputs: ``compression.remap_ids(input_ids)``;
* student labels: ``compression.remap_ids(labels)`` (``-100`` stays ``-100``);
* teacher targets: ``compression.slice_teacher_logits(teacher_logits)`` *before* the softmax, so the
  teacher distribution is renormalized over the kept vocabulary and lives in the student's id space;
* student initialization from the teacher: ``compression.compress_rows(embedding_vd)``.

:class:`CompressedTokenizer` bundles a Hugging Face tokenizer with the compression so that a
compressed student can be used on raw text after training.

The selection and remap are one-off numpy computations; ``remap_ids``, ``slice_teacher_logits`` and
``compress_rows`` also accept ``jax`` arrays and work inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "COMPRESSION_FILENAME",
    "REMAP_RULES",
    "CompressedTokenizer",
    "VocabCompression",
    "build_remap",
    "count_token_frequencies",
    "load_tokenizer",
    "select_kept_tokens",
    "special_token_ids",
]

COMPRESSION_FILENAME = "vocab_compression.json"
REMAP_RULES = ("dot", "cosine", "unk")

_FORMAT_NAME = "kdjax.vocab_compression"
_FORMAT_VERSION = 1
# Largest [rows, kept] score block build_remap materializes at once (float32 elements, 128 MiB).
_MAX_SCORE_BLOCK_ELEMENTS = 1 << 25
_COSINE_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Counting and selection
# --------------------------------------------------------------------------------------------------


def _flatten_ids(batch: Any) -> np.ndarray:
    """Flattens one batch of ids (array, nested list, possibly ragged) into a 1-D int64 array."""
    try:
        arr = np.asarray(batch)
    except ValueError:  # ragged nested lists on recent numpy
        arr = None
    if arr is None or arr.dtype == object:
        parts = [_flatten_ids(item) for item in batch]
        return np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"token ids must be integers, got dtype {arr.dtype}; pass tokenized ids, not text or floats"
        )
    return arr.reshape(-1).astype(np.int64, copy=False)


def count_token_frequencies(
    token_id_batches: Iterable[Any],
    vocab_size: int,
    *,
    ignore_ids: Iterable[int] = (),
    progress: bool = False,
) -> np.ndarray:
    """Counts how often each id in ``[0, vocab_size)`` occurs in a tokenized corpus.

    Args:
      token_id_batches: an iterable of integer arrays or (possibly ragged) nested lists of any shape,
        e.g. the ``input_ids`` of each batch of a data pipeline.
      vocab_size: size of the teacher vocabulary ``V`` (use the teacher's embedding row count, which
        may exceed the tokenizer length when the embedding is padded).
      ignore_ids: ids that are not counted, typically the pad id and ``-100``; they may be outside
        the vocabulary.
      progress: show a tqdm progress bar over batches.

    Returns:
      ``int64[V]`` occurrence counts.

    Raises:
      ValueError: on an id outside ``[0, vocab_size)`` that is not ignored, or non-integer ids.
    """
    vocab_size = int(vocab_size)
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    ignore_arr = np.asarray(sorted({int(i) for i in ignore_ids}), dtype=np.int64)
    counts_v = np.zeros((vocab_size,), np.int64)
    iterator = token_id_batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(token_id_batches, desc="counting tokens", unit="batch")
    for batch in iterator:
        ids = _flatten_ids(batch)
        if ignore_arr.size:
            ids = ids[~np.isin(ids, ignore_arr)]
        if ids.size == 0:
            continue
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            bad_id = int(ids[np.argmax(bad)])
            raise ValueError(
                f"token id {bad_id} is outside the vocabulary [0, {vocab_size}); pass the teacher's "
                "vocab size or add the id (e.g. pad or -100) to ignore_ids"
            )
        counts_v += np.bincount(ids, minlength=vocab_size)
    return counts_v


def _unique_in_order(ids: Iterable[int], vocab_size: int, what: str) -> list[int]:
    """Deduplicates ``ids`` keeping the first occurrence, checking the range."""
    seen: set[int] = set()
    out: list[int] = []
    for raw in ids:
        i = int(raw)
        if not 0 <= i < vocab_size:
            raise ValueError(f"{what} id {i} is outside the vocabulary [0, {vocab_size})")
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def kept_vocab_size(vocab_size: int, rate: float, multiple: int = 128) -> int:
    """``K = min(V, ceil(rate * V / multiple) * multiple)``: the compressed vocabulary size."""
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"rate must be a number in (0, 1], got {rate!r}") from None
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    # Round away float noise (0.3 * 1280 = 384.00000000000006) before the ceil.
    target = round(rate * vocab_size, 6)
    return min(int(vocab_size), int(math.ceil(target / multiple)) * int(multiple))


def select_kept_tokens(
    frequencies: Any,
    *,
    rate: float,
    special_ids: Iterable[int],
    required_ids: Iterable[int] = (),
    multiple: int = 128,
) -> np.ndarray:
    """Chooses the teacher ids the student keeps; their order defines the student's new ids.

    The kept size is ``K = min(V, ceil(rate * V / multiple) * multiple)``. The order is: the
    special ids (as given, duplicates dropped), then the required ids (task verbalizer tokens, which
    must survive however rare they are in the corpus), then the remaining ids by descending
    frequency, ties broken by the lower id, until ``K`` ids are chosen.

    Args:
      frequencies: ``[V]`` non-negative counts (or probabilities) per teacher id.
      rate: fraction of the vocabulary to keep, in ``(0, 1]`` (0.5 in the GLMD paper).
      special_ids: ids that must keep their meaning exactly ([CLS], [SEP], [PAD], [MASK], [UNK]...).
      required_ids: further ids that must be kept (verbalizer tokens).
      multiple: ``K`` is rounded up to this multiple, so the student's embedding and LM head tile
        well on accelerators.

    Returns:
      ``int32[K]`` kept teacher ids; position ``k`` holds the teacher id of student id ``k``.
    """
    freq_v = np.asarray(frequencies)
    if freq_v.ndim != 1 or freq_v.size == 0:
        raise ValueError(f"frequencies must be a non-empty 1-D array [V], got shape {freq_v.shape}")
    if not (np.issubdtype(freq_v.dtype, np.integer) or np.issubdtype(freq_v.dtype, np.floating)):
        raise ValueError(f"frequencies must be numeric, got dtype {freq_v.dtype}")
    if np.issubdtype(freq_v.dtype, np.floating) and not np.isfinite(freq_v).all():
        raise ValueError("frequencies contain NaN or inf; pass finite counts")
    if (freq_v < 0).any():
        raise ValueError("frequencies must be non-negative; pass occurrence counts")
    vocab_size = freq_v.shape[0]
    k = kept_vocab_size(vocab_size, rate, multiple)

    specials = _unique_in_order(special_ids, vocab_size, "special")
    special_set = set(specials)
    required = [i for i in _unique_in_order(required_ids, vocab_size, "required") if i not in special_set]
    forced = specials + required
    if len(forced) > k:
        needed = len(forced) / vocab_size
        raise ValueError(
            f"{len(specials)} special + {len(required)} required ids do not fit in the kept "
            f"vocabulary of {k} (rate={rate}, V={vocab_size}); use a rate of at least {needed:.4f}"
        )

    # Stable sort on negated frequency: descending counts, lower id first among ties.
    by_frequency = np.argsort(-freq_v.astype(np.float64 if freq_v.dtype.kind == "f" else np.int64),
                              kind="stable")
    forced_mask = np.zeros((vocab_size,), bool)
    forced_mask[np.asarray(forced, dtype=np.int64)] = True
    rest = by_frequency[~forced_mask[by_frequency]][: k - len(forced)]
    return np.concatenate([np.asarray(forced, dtype=np.int64), rest]).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Remap of dropped ids
# --------------------------------------------------------------------------------------------------


def _check_kept_ids(kept_ids: Any, vocab_size: int) -> np.ndarray:
    kept = np.asarray(kept_ids)
    if kept.ndim != 1 or kept.size == 0:
        raise ValueError(f"kept_ids must be a non-empty 1-D array, got shape {kept.shape}")
    if not np.issubdtype(kept.dtype, np.integer):
        raise ValueError(f"kept_ids must be integers, got dtype {kept.dtype}")
    kept = kept.astype(np.int64)
    if kept.min() < 0 or kept.max() >= vocab_size:
        raise ValueError(
            f"kept_ids must lie in [0, {vocab_size}), got range [{kept.min()}, {kept.max()}]"
        )
    if np.unique(kept).size != kept.size:
        raise ValueError("kept_ids contain duplicates; each teacher id may be kept at most once")
    return kept


def build_remap(
    kept_ids: Any,
    teacher_embeddings: Any,
    *,
    rule: str = "dot",
    unk_id: int | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Builds the teacher-id → student-id table ``old_to_new`` ``int32[V]``.

    A kept id maps to its position in ``kept_ids``. A dropped id maps to the position of the kept
    token that is closest in the teacher's *input* embedding space:

    * ``"dot"`` (GLMD default): largest ``e_dropped · e_kept``;
    * ``"cosine"``: largest cosine similarity;
    * ``"unk"``: every dropped id becomes ``unk_id`` (which must be kept).

    Ties go to the earliest kept position. The dropped token itself is never a candidate because
    only kept tokens are. Scores are computed in float32, ``batch_size`` dropped rows at a time and
    in column blocks over the kept tokens, so ``V = 150k, D = 4096`` needs a few hundred MiB beyond
    a float32 copy of the kept rows.

    Args:
      kept_ids: ``[K]`` kept teacher ids from :func:`select_kept_tokens`.
      teacher_embeddings: ``[V, D]`` teacher input embedding matrix (numpy or jax, any float dtype).
      rule: one of ``"dot"``, ``"cosine"``, ``"unk"``.
      unk_id: teacher id of the unknown token; required for ``rule="unk"``.
      batch_size: dropped ids scored per matmul.

    Returns:
      ``int32[V]`` with values in ``[0, K)``.
    """
    if rule not in REMAP_RULES:
        raise ValueError(f"rule must be one of {REMAP_RULES}, got {rule!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    emb_vd = np.asarray(teacher_embeddings)
    if emb_vd.ndim != 2:
        raise ValueError(f"teacher_embeddings must be a 2-D [V, D] matrix, got shape {emb_vd.shape}")
    vocab_size = emb_vd.shape[0]
    kept = _check_kept_ids(kept_ids, vocab_size)
    num_kept = kept.size

    old_to_new_v = np.full((vocab_size,), -1, np.int32)
    old_to_new_v[kept] = np.arange(num_kept, dtype=np.int32)
    dropped = np.flatnonzero(old_to_new_v < 0)
    if dropped.size == 0:
        return old_to_new_v

    if rule == "unk":
        if unk_id is None:
            raise ValueError('rule="unk" needs unk_id; pass the tokenizer\'s unk_token_id')
        if not 0 <= int(unk_id) < vocab_size or old_to_new_v[int(unk_id)] < 0:
            raise ValueError(f"unk_id {unk_id} is not among the kept ids; add it to special_ids")
        old_to_new_v[dropped] = old_to_new_v[int(unk_id)]
        return old_to_new_v

    def as_f32(rows: np.ndarray) -> np.ndarray:
        out = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(out).all():
            raise ValueError("teacher_embeddings contain NaN or inf; check the loaded checkpoint")
        if rule == "cosine":
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), _COSINE_EPS)
        return out

    kept_kd = as_f32(emb_vd[kept])
    batch_size = int(batch_size)
    for start in range(0, dropped.size, batch_size):
        rows = dropped[start : start + batch_size]
        query_bd = as_f32(emb_vd[rows])
        col_block = max(1, _MAX_SCORE_BLOCK_ELEMENTS // rows.size)
        best_score_b = np.full((rows.size,), -np.inf, np.float32)
        best_pos_b = np.zeros((rows.size,), np.int32)
        for c0 in range(0, num_kept, col_block):
            scores_bk = query_bd @ kept_kd[c0 : c0 + col_block].T
            pos_b = np.argmax(scores_bk, axis=-1)
            score_b = np.take_along_axis(scores_bk, pos_b[:, None], axis=-1)[:, 0]
            better = score_b > best_score_b  # strict: earlier blocks win ties
            best_score_b = np.where(better, score_b, best_score_b)
            best_pos_b = np.where(better, pos_b + c0, best_pos_b).astype(np.int32)
        old_to_new_v[rows] = best_pos_b
    return old_to_new_v


# --------------------------------------------------------------------------------------------------
# The compression object
# --------------------------------------------------------------------------------------------------


def _is_jax_array(x: Any) -> bool:
    # Tracers are jax.Array instances too, so this also holds inside jit.
    return isinstance(x, jax.Array)


@dataclasses.dataclass(frozen=True, eq=False)
class VocabCompression:
    """A kept vocabulary and the map from teacher ids to student ids.

    Attributes:
      kept_ids: ``int32[K]`` new → old: the teacher id of each student id.
      old_to_new: ``int32[V]`` old → new: the student id each teacher id is fed as.
      original_vocab_size: ``V``, the teacher's vocabulary (embedding rows / logit columns).
      rule: the remap rule the table was built with (metadata, saved with it).
      rate: the keep rate the selection used (metadata, saved with it).
    """

    kept_ids: np.ndarray
    old_to_new: np.ndarray
    original_vocab_size: int
    rule: str | None = None
    rate: float | None = None

    def __post_init__(self):
        vocab_size = int(self.original_vocab_size)
        kept = _check_kept_ids(self.kept_ids, vocab_size).astype(np.int32)
        table = np.asarray(self.old_to_new)
        if table.shape != (vocab_size,) or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(
                f"old_to_new must be an integer array of shape ({vocab_size},), got "
                f"{table.dtype}{list(table.shape)}"
            )
        table = table.astype(np.int32)
        if table.min() < 0 or table.max() >= kept.size:
            raise ValueError(f"old_to_new values must lie in [0, {kept.size}); rebuild it with build_remap")
        if not np.array_equal(table[kept], np.arange(kept.size)):
            raise ValueError("old_to_new must send kept_ids[k] to k; rebuild it with build_remap")
        if self.rule is not None and self.rule not in REMAP_RULES:
            raise ValueError(f"rule must be one of {REMAP_RULES} or None, got {self.rule!r}")
        kept.setflags(write=False)
        table.setflags(write=False)
        object.__setattr__(self, "kept_ids", kept)
        object.__setattr__(self, "old_to_new", table)
        object.__setattr__(self, "original_vocab_size", vocab_size)
        if self.rate is not None:
            object.__setattr__(self, "rate", float(self.rate))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabCompression):
            return NotImplemented
        return (
            self.original_vocab_size == other.original_vocab_size
            and self.rule == other.rule
            and self.rate == other.rate
            and np.array_equal(self.kept_ids, other.kept_ids)
            and np.array_equal(self.old_to_new, other.old_to_new)
        )

    __hash__ = None  # arrays are not hashable; equality is by value

    @property
    def size(self) -> int:
        """``K``: the student's vocabulary size."""
        return int(self.kept_ids.shape[0])

    @classmethod
    def build(
        cls,
        frequencies: Any,
        teacher_embeddings: Any,
        *,
        rate: float = 0.5,
        special_ids: Iterable[int],
        required_ids: Iterable[int] = (),
        rule: str = "dot",
        unk_id: int | None = None,
        multiple: int = 128,
    ) -> VocabCompression:
        """Selects the kept tokens and builds the remap in one go (see the module docstring)."""
        freq_v = np.asarray(frequencies)
        emb_shape = np.shape(teacher_embeddings)
        if len(emb_shape) != 2 or freq_v.shape != (emb_shape[0],):
            raise ValueError(
                f"frequencies {list(freq_v.shape)} and teacher_embeddings {list(emb_shape)} disagree on V; "
                "count with vocab_size=teacher_embeddings.shape[0]"
            )
        kept = select_kept_tokens(
            freq_v, rate=rate, special_ids=special_ids, required_ids=required_ids, multiple=multiple
        )
        table = build_remap(kept, teacher_embeddings, rule=rule, unk_id=unk_id)
        return cls(kept_ids=kept, old_to_new=table, original_vocab_size=emb_shape[0], rule=rule, rate=rate)

    # ---- array transforms (numpy or jax, jit-safe for jax) ----

    def remap_ids(self, ids: Any, *, ignore_index: int | None = -100) -> Any:
        """Maps teacher ids to student ids; entries equal to ``ignore_index`` pass through unchanged.

        Use it for the student's ``input_ids`` and for its ``labels`` alike. numpy input is
        range-checked; jax input (including tracers under ``jit``) is clipped to ``[0, V)`` instead,
        since a traced value cannot be checked.
        """
        if _is_jax_array(ids):
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
            table = jnp.asarray(self.old_to_new)
            mapped = table[jnp.clip(ids, 0, self.original_vocab_size - 1)].astype(ids.dtype)
            if ignore_index is None:
                return mapped
            return jnp.where(ids == ignore_index, ids, mapped)

        arr = np.asarray(ids)
        if arr.size == 0:  # np.asarray([]) is float64; an empty batch is still a valid id batch
            return arr.astype(arr.dtype if np.issubdtype(arr.dtype, np.integer) else np.int32)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
        keep = np.ones(arr.shape, bool) if ignore_index is None else arr != ignore_index
        bad = keep & ((arr < 0) | (arr >= self.original_vocab_size))
        if bad.any():
            raise ValueError(
                f"id {int(arr[bad].flat[0])} is outside the teacher vocabulary [0, "
                f"{self.original_vocab_size}); only ignore_index={ignore_index} may be out of range"
            )
        mapped = self.old_to_new[np.where(keep, arr, 0)].astype(arr.dtype)
        return np.where(keep, mapped, arr)

    def slice_teacher_logits(self, logits_v: Any) -> Any:
        """``logits[..., kept_ids]``: teacher logits over the kept vocabulary, in student id order.

        Slice *before* the softmax: the teacher distribution is then renormalized over the kept
        tokens, ``softmax(z[kept]) = p[kept] / p[kept].sum()``, and can be compared with the
        student's ``K``-way distribution directly.
        """
        shape = np.shape(logits_v)
        if not shape or shape[-1] != self.original_vocab_size:
            raise ValueError(
                f"teacher logits must end in the teacher vocabulary ({self.original_vocab_size}), "
                f"got shape {list(shape)}"
            )
        if _is_jax_array(logits_v):
            return jnp.take(logits_v, jnp.asarray(self.kept_ids), axis=-1)
        return np.asarray(logits_v)[..., self.kept_ids]

    def compress_rows(self, matrix_vd: Any) -> Any:
        """Rows of a ``[V, ...]`` embedding or LM-head matrix for the kept ids → ``[K, ...]``.

        Initializing the student's embedding from ``compress_rows(teacher_embedding)`` gives each
        student id the vector of the teacher token it stands for.
        """
        shape = np.shape(matrix_vd)
        if not shape or shape[0] != self.original_vocab_size:
            raise ValueError(
                f"matrix must have {self.original_vocab_size} rows (one per teacher id), got shape "
                f"{list(shape)}; transpose a [D, V] LM head first"
            )
        if _is_jax_array(matrix_vd):
            return jnp.take(matrix_vd, jnp.asarray(self.kept_ids), axis=0)
        return np.asarray(matrix_vd)[self.kept_ids]

    # ---- persistence ----

    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``<directory>/vocab_compression.json``; returns the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, COMPRESSION_FILENAME)
        payload = {
            "format": _FORMAT_NAME,
            "version": _FORMAT_VERSION,
            "original_vocab_size": self.original_vocab_size,
            "size": self.size,
            "rule": self.rule,
            "rate": self.rate,
            "kept_ids": self.kept_ids.tolist(),
            "old_to_new": self.old_to_new.tolist(),
        }
        tmp_path = path + ".tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp_path, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> VocabCompression:
        """Reads a compression written by :meth:`save` (a directory or the JSON file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, COMPRESSION_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {COMPRESSION_FILENAME} at {path}; save one with VocabCompression.save"
            )
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a vocabulary compression file (invalid JSON: {e.msg})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT_NAME:
            raise ValueError(
                f"{path} is not a vocabulary compression file (missing format={_FORMAT_NAME!r}); "
                "write it with VocabCompression.save"
            )
        if payload.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {payload.get('version')!r}; "
                f"this kdjax reads version {_FORMAT_VERSION}"
            )
        try:
            kept = np.asarray(payload["kept_ids"], dtype=np.int64)
            table = np.asarray(payload["old_to_new"], dtype=np.int64)
            vocab_size = int(payload["original_vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is a corrupt vocabulary compression file ({type(e).__name__}: {e})"
            ) from None
        try:
            return cls(
                kept_ids=kept,
                old_to_new=table,
                original_vocab_size=vocab_size,
                rule=payload.get("rule"),
                rate=payload.get("rate"),
            )
        except ValueError as e:
            raise ValueError(f"{path} is a corrupt vocabulary compression file: {e}") from None


# --------------------------------------------------------------------------------------------------
# Tokenizer wrapper
# --------------------------------------------------------------------------------------------------


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special ids ([CLS], [SEP], [PAD], ...), sorted and unique."""
    return sorted({int(i) for i in tokenizer.all_special_ids})


def _remap_encoded(compression: VocabCompression, value: Any, ignore_index: int | None) -> Any:
    """Remaps an ``input_ids``/``labels`` entry that may be an array or (ragged) lists."""
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is not None and arr.dtype != object:
        return compression.remap_ids(arr, ignore_index=ignore_index)
    return [_remap_encoded(compression, v, ignore_index) for v in value]


class CompressedTokenizer:
    """A Hugging Face tokenizer that emits (and decodes) the compressed student's ids.

    Text is tokenized with the teacher's tokenizer, then ``input_ids`` (and ``labels``, if the
    tokenizer produced them) go through ``compression.remap_ids``. Decoding maps student ids back to
    the teacher ids they stand for (``kept_ids[ids]``) before calling the tokenizer's ``decode``.
    Other tokenizer attributes are reachable through ``.tokenizer`` (in teacher ids).
    """

    def __init__(self, tokenizer: Any, compression: VocabCompression):
        if len(tokenizer) > compression.original_vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the compression covers only "
                f"{compression.original_vocab_size} teacher ids; pair it with the teacher's own tokenizer"
            )
        self.tokenizer = tokenizer
        self.compression = compression

    def __len__(self) -> int:
        return self.compression.size

    @property
    def vocab_size(self) -> int:
        """``K``: the student's vocabulary size."""
        return self.compression.size

    @property
    def pad_token_id(self) -> int | None:
        """The pad token in student ids (``None`` when the tokenizer has none)."""
        pad = self.tokenizer.pad_token_id
        return None if pad is None else int(self.compression.old_to_new[pad])

    @property
    def all_special_ids(self) -> list[int]:
        """The tokenizer's special tokens in student ids."""
        return [int(self.compression.old_to_new[i]) for i in self.tokenizer.all_special_ids]

    def __call__(self, texts: Any, **kwargs: Any) -> Any:
        """Tokenizes like the wrapped tokenizer (numpy tensors by default) with remapped ids."""
        return_tensors = kwargs.setdefault("return_tensors", "np")
        if return_tensors not in ("np", None):
            raise ValueError(
                f"CompressedTokenizer returns numpy arrays; got return_tensors={return_tensors!r}, "
                "pass 'np' or None and convert afterwards"
            )
        encoded = self.tokenizer(texts, **kwargs)
        if "input_ids" in encoded:
            encoded["input_ids"] = _remap_encoded(self.compression, encoded["input_ids"], None)
        if "labels" in encoded:
            encoded["labels"] = _remap_encoded(self.compression, encoded["labels"], -100)
        return encoded

    def _to_teacher_ids(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        size = self.compression.size
        if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= size):
            raise ValueError(
                f"student ids must be integers in [0, {size}), got {arr.dtype} ids in "
                f"[{arr.min()}, {arr.max()}]; decode ids produced by this CompressedTokenizer"
            )
        return self.compression.kept_ids[arr.astype(np.int64)]

    def decode(self, ids: Any, **kwargs: Any) -> str:
        """Decodes one sequence of student ids to text."""
        return self.tokenizer.decode(self._to_teacher_ids(ids).tolist(), **kwargs)

    def batch_decode(self, sequences: Sequence[Any], **kwargs: Any) -> list[str]:
        """Decodes several sequences of student ids."""
        return [self.decode(seq, **kwargs) for seq in sequences]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the Hugging Face tokenizer files and ``vocab_compression.json`` to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(os.fspath(directory))
        self.compression.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **tokenizer_kwargs: Any) -> CompressedTokenizer:
        """Loads a directory written by :meth:`save_pretrained` (local files only)."""
        from transformers import AutoTokenizer

        compression = VocabCompression.load(directory)
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(directory), **tokenizer_kwargs)
        return cls(tokenizer, compression)

    def __repr__(self) -> str:
        return (
            f"CompressedTokenizer({type(self.tokenizer).__name__}, "
            f"{self.compression.original_vocab_size} -> {self.compression.size} tokens)"
        )


def load_tokenizer(directory: str | os.PathLike, **tokenizer_kwargs: Any) -> Any:
    """A :class:`CompressedTokenizer` if ``directory`` holds ``vocab_compression.json``, else the
    plain Hugging Face tokenizer."""
    if os.path.isfile(os.path.join(directory, COMPRESSION_FILENAME)):
        return CompressedTokenizer.from_pretrained(directory, **tokenizer_kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(directory), **tokenizer_kwargs)


# --------------------------------------------------------------------------------------------------
# Teacher and student vocabularies of one run
# --------------------------------------------------------------------------------------------------


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two Hugging Face tokenizers map every token string to the same id (and agree on the
    special tokens); the padded rows of a model's embedding are not part of either."""
    if a is b:
        return True
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        return False
    return list(a.all_special_ids) == list(b.all_special_ids)


@dataclasses.dataclass(frozen=True)
class LogitSlice:
    """``logits[..., :width]``: a teacher's logits cut to the student's width (padded head rows dropped).

    A hashable callable, used as the run's teacher-logit map (the same hook GLMD's slice uses)."""

    width: int

    def __call__(self, logits_v: Any) -> Any:
        return logits_v[..., : self.width]


def align_vocabularies(teacher_size: int, student_size: int, teacher_tokenizer: Any = None,
                       student_tokenizer: Any = None, *, cross_tokenizer: bool = False) -> LogitSlice | None:
    """How a run compares teacher and student logits whose vocabularies may differ.

    * Different tokenizers (both known and :func:`same_tokenizer` is false): a ``ValueError`` unless
      the method is a cross-tokenizer one (``cross_tokenizer=True``), which handles the mismatch itself.
    * The same tokenizer and the same logit width, or a cross-tokenizer method: ``None`` (nothing to do).
    * The same tokenizer, the teacher's head padded to more rows than the student's (e.g. 152064 vs
      151936 for a 151665-token tokenizer): a :class:`LogitSlice` that cuts the teacher's logits to the
      student's width, which still covers every token of the tokenizer.
    * Anything else (unknown tokenizers, a student head wider than the teacher's or narrower than the
      tokenizer): ``None``; the run's term check then refuses logit terms over different widths.
    """
    teacher_size, student_size = int(teacher_size), int(student_size)
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if not same_tokenizer(teacher_tokenizer, student_tokenizer):
            if cross_tokenizer:
                return None
            raise ValueError(
                f"the teacher's tokenizer ({len(teacher_tokenizer)} tokens) and the student's "
                f"({len(student_tokenizer)} tokens) differ; use the teacher's tokenizer for the student or a "
                "cross-tokenizer method (uld, xtok_align)")
    if cross_tokenizer or teacher_size == student_size:
        return None
    if teacher_tokenizer is None or student_tokenizer is None:
        return None
    if teacher_size > student_size >= len(teacher_tokenizer):
        return LogitSlice(student_size)
    return None  # not a padding difference: the term check refuses logit terms over different widths
