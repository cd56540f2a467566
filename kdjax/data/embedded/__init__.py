"""Offline data written for kdjax: a topical sentence corpus and a 3-class review task.

Two small data sets ship inside the package so that every recipe can run end to end on a machine
with no network (no hub, no GCS bucket):

* ``corpus/<topic>.txt`` — one sentence per line, grouped by topic. Used for general
  (task-agnostic) distillation and for GLMD's vocabulary statistics.
* ``task/<domain>.jsonl`` — ``{"text": ..., "label": "negative"|"neutral"|"positive"}`` reviews
  grouped by domain. Used for task-specific distillation and evaluation.

They are exposed in two ways that agree example for example:

* as tfds builders ``kdjax_corpus`` / ``kdjax_reviews`` (see :mod:`kdjax.data.embedded.builders`),
  prepared to ArrayRecord and read with random access, so they flow through exactly the same grain
  pipeline as GLUE or C4; :func:`load_split` prepares on first use;
* as plain Python lists (:func:`corpus_sentences`, :func:`review_examples`) for code that wants no
  tfds at all (vocabulary counting, quick scripts). This module itself never imports tfds.

The split rule is deterministic and lives here, once, so both views can never disagree: files are
read in sorted order, exact duplicate texts are dropped (a duplicate in two splits would leak
evaluation data into training), then a fixed-seed permutation assigns splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CORPUS_NAME",
    "REVIEWS_NAME",
    "REVIEW_LABELS",
    "SPLIT_SEED",
    "EmbeddedDataError",
    "corpus_sentences",
    "default_data_dir",
    "default_source_dir",
    "load_split",
    "review_examples",
    "source_fingerprint",
]

CORPUS_NAME = "kdjax_corpus"
REVIEWS_NAME = "kdjax_reviews"
REVIEW_LABELS = ("negative", "neutral", "positive")
CORPUS_SPLITS = ("train", "validation")
REVIEW_SPLITS = ("train", "validation", "test")
# Changing the seed or the fractions changes every split: bump the builders' VERSION if you do.
SPLIT_SEED = 20240611
CORPUS_VALIDATION_FRACTION = 0.05
CORPUS_MIN_VALIDATION = 200
REVIEW_FRACTIONS = (0.8, 0.1, 0.1)


class EmbeddedDataError(ValueError):
    """The embedded data files are missing or malformed."""


def default_source_dir() -> pathlib.Path:
    """Directory holding ``corpus/`` and ``task/`` (this package's own directory)."""
    return pathlib.Path(__file__).resolve().parent


def default_data_dir() -> str:
    """Where prepared ArrayRecord files go: ``$KDJAX_DATA_DIR`` or ``~/.cache/kdjax/tensorflow_datasets``."""
    env = os.environ.get("KDJAX_DATA_DIR")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "kdjax", "tensorflow_datasets")


def _files(source_dir: str | os.PathLike | None, sub: str, suffix: str) -> list[pathlib.Path]:
    root = pathlib.Path(source_dir) if source_dir is not None else default_source_dir()
    folder = root / sub
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not files:
        raise EmbeddedDataError(
            f"no {sub}/*{suffix} files under {root}; reinstall kdjax with its package data "
            f"or pass source_dir= pointing at a folder with {sub}/*{suffix}"
        )
    return files


def source_fingerprint(name: str, source_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over the file names and bytes behind ``name``; detects a stale prepared copy."""
    sub, suffix = {CORPUS_NAME: ("corpus", ".txt"), REVIEWS_NAME: ("task", ".jsonl")}[name]
    digest = hashlib.sha256()
    for path in _files(source_dir, sub, suffix):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _read_corpus(source_dir) -> list[dict[str, str]]:
    seen: set[str] = set()
    records = []
    for path in _files(source_dir, "corpus", ".txt"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if text and text not in seen:
                    seen.add(text)
                    records.append({"text": text, "topic": path.stem})
    return records


def _read_reviews(source_dir) -> list[dict[str, Any]]:
    seen: set[str] = set()
    records = []
    for path in _files(source_dir, "task", ".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EmbeddedDataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None
                text, label = str(row.get("text", "")).strip(), row.get("label")
                if label not in REVIEW_LABELS or not text:
                    raise EmbeddedDataError(
                        f"{path}:{lineno}: need non-empty 'text' and 'label' in {list(REVIEW_LABELS)}, got label={label!r}"
                    )
                if text not in seen:
                    seen.add(text)
                    records.append({"text": text, "label": label, "domain": path.stem})
    return records


def _check_split(split: str, allowed: Sequence[str], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r} for {name}; use one of {list(allowed)}")


def corpus_validation_size(n: int) -> int:
    """5% of the corpus, at least 200 sentences, but never more than half of a tiny corpus."""
    return min(max(math.ceil(CORPUS_VALIDATION_FRACTION * n), CORPUS_MIN_VALIDATION), n // 2)


def corpus_splits(source_dir: str | os.PathLike | None = None) -> dict[str, list[dict[str, str]]]:
    """All corpus splits as ``{"train": [{"text", "topic"}, ...], "validation": [...]}``."""
    records = _read_corpus(source_dir)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(records))
    n_val = corpus_validation_size(len(records))
    return {
        "validation": [records[i] for i in order[:n_val]],
        "train": [records[i] for i in order[n_val:]],
    }


def review_splits(source_dir: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """All review splits, stratified by label: 80/10/10 of each class, then a fixed-seed mix."""
    records = _read_reviews(source_dir)
    rng = np.random.default_rng(SPLIT_SEED)
    out: dict[str, list] = {s: [] for s in REVIEW_SPLITS}
    for label in REVIEW_LABELS:
        members = [r for r in records if r["label"] == label]
        members = [members[i] for i in rng.permutation(len(members))]
        n_val = round(REVIEW_FRACTIONS[1] * len(members))
        n_test = round(REVIEW_FRACTIONS[2] * len(members))
        out["validation"] += members[:n_val]
        out["test"] += members[n_val : n_val + n_test]
        out["train"] += members[n_val + n_test :]
    # Interleave the classes so a sequential read is not sorted by label.
    return {s: [rows[i] for i in rng.permutation(len(rows))] for s, rows in out.items()}


def corpus_sentences(split: str = "train", source_dir: str | os.PathLike | None = None) -> list[str]:
    """Sentences of one corpus split, in the same order as the ``kdjax_corpus`` tfds split."""
    _check_split(split, CORPUS_SPLITS, CORPUS_NAME)
    return [r["text"] for r in corpus_splits(source_dir)[split]]


def review_examples(split: str = "train", source_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Review records ``{"text", "label" (str), "domain"}`` in ``kdjax_reviews`` split order."""
    _check_split(split, REVIEW_SPLITS, REVIEWS_NAME)
    return review_splits(source_dir)[split]


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
):
    """Random-access tfds source for ``name`` ∈ {kdjax_corpus, kdjax_reviews}, preparing it if needed.

    Preparation writes ArrayRecord files (a second or so, no TensorFlow) into ``data_dir``, else
    ``$KDJAX_DATA_DIR``, else ``~/.cache/kdjax/tensorflow_datasets``. A prepared copy whose source
    fingerprint no longer matches the package files is rebuilt, so edits to the text files are
    never silently ignored.
    """
    from kdjax.data.embedded import builders  # tfds is only needed here

    return builders.load_split(name, split, data_dir=data_dir, source_dir=source_dir)
