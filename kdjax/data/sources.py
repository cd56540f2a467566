"""Random-access data sources: prepared tfds data sets and local text/JSONL/CSV files.

Every source implements grain's ``RandomAccessDataSource`` protocol (``__len__`` and
``__getitem__``) and returns one flat ``dict`` per record, so the pipeline treats a GLUE split, a
JSONL file and the embedded corpus alike. Random access is what makes grain's global shuffle,
per-host sharding and exact checkpoint resume possible without reading the data in order.

tfds sources are opened with ``tfds.builder_from_directory`` on the prepared folder: that reads the
stored metadata and never instantiates the catalog builder class (several of which need TensorFlow
merely to *describe* their features) and never downloads. A missing preparation is reported as a
one-line :class:`DatasetNotPreparedError` that names the ``tfds build`` command to run.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

__all__ = [
    "CsvSource",
    "DatasetNotPreparedError",
    "InMemorySource",
    "JsonlSource",
    "TextFileSource",
    "default_tfds_data_dir",
    "find_prepared_dir",
    "tfds_source",
]


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds data set is not prepared locally (kdjax never downloads at run time)."""


def default_tfds_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else tfds' own default ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return (-1,)


def find_prepared_dir(tfds_name: str, data_dir: str | os.PathLike | None = None) -> epath.Path | None:
    """Folder ``<data_dir>/<name>/<config>/<version>`` of the newest prepared version, or None.

    ``tfds_name`` may pin a version (``"glue/cola:2.0.0"``). Only folders holding a
    ``dataset_info.json`` count: tfds writes it last, so half-written ``incomplete.*`` folders are
    ignored.
    """
    name, _, version = tfds_name.partition(":")
    root = epath.Path(data_dir if data_dir is not None else default_tfds_data_dir()) / name
    if version:
        candidates = [root / version]
    elif root.is_dir():
        candidates = sorted(
            (p for p in root.iterdir() if _version_key(p.name) != (-1,)),
            key=lambda p: _version_key(p.name),
            reverse=True,
        )
    else:
        candidates = []
    for path in candidates:
        if (path / "dataset_info.json").exists():
            return path
    return None


def tfds_source(
    tfds_name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    decoders: Any = None,
):
    """Random-access ``ArrayRecordDataSource`` of a *prepared* tfds data set.

    Args:
      tfds_name: ``"glue/cola"``, ``"super_glue/boolq"``, ``"c4/en"``, optionally ``":<version>"``.
      split: a split name, or a tfds slice such as ``"train[:10%]"``.
      data_dir: where it was prepared; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      decoders: optional tfds decoders, passed through.

    Raises:
      DatasetNotPreparedError: with a one-line message naming the ``tfds build`` command.
    """
    import tensorflow_datasets as tfds

    data_dir = os.fspath(data_dir) if data_dir is not None else default_tfds_data_dir()
    path = find_prepared_dir(tfds_name, data_dir)
    if path is None:
        bare = tfds_name.partition(":")[0]
        raise DatasetNotPreparedError(
            f"tfds dataset '{tfds_name}' is not prepared under {data_dir}; run: tfds build {bare} "
            f"--data_dir {data_dir} --file_format array_record "
            f"(or set TFDS_DATA_DIR=gs://<bucket>/tensorflow_datasets)"
        )
    builder = tfds.builder_from_directory(path)
    from tensorflow_datasets.core import file_adapters

    if builder.info.file_format not in file_adapters.FileFormat.with_random_access():
        raise DatasetNotPreparedError(
            f"tfds dataset '{tfds_name}' under {path} is stored as {builder.info.file_format}, which has no "
            f"random access; run: tfds build {tfds_name.partition(':')[0]} --data_dir {data_dir} "
            f"--file_format array_record"
        )
    return builder.as_data_source(split=split, decoders=decoders)


class InMemorySource:
    """A list of record dicts behind the random-access protocol (tests, small generated data)."""

    def __init__(self, records: Sequence[dict[str, Any]]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._records[index]

    def __repr__(self) -> str:
        return f"InMemorySource(len={len(self)})"


def _require_file(path: str | os.PathLike, kind: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path}; check the path (relative paths resolve from {os.getcwd()})")
    return path


class _LineIndexedFile:
    """Byte offsets of the non-blank lines of a file; lines are read on demand with ``seek``.

    Only the offsets (8 bytes per line) live in memory, so a multi-GB corpus file costs little,
    and the object pickles cheaply into grain worker processes (the file handle is reopened
    lazily in each process).
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = _require_file(path, kind)
        offsets = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._file = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets)

    def line(self, index: int) -> str:
        n = len(self._offsets)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records in {self.path}")
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "rb")
            self._file.seek(int(self._offsets[index]))
            raw = self._file.readline()
        return raw.decode("utf-8").rstrip("\r\n")

    def __getstate__(self):
        return {"path": self.path, "_offsets": self._offsets}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file = None
        self._lock = threading.Lock()


class TextFileSource:
    """One example per non-blank line: ``{field: line}`` (``field`` defaults to ``"text"``)."""

    def __init__(self, path: str | os.PathLike, field: str = "text"):
        self._lines = _LineIndexedFile(path, "text")
        self.path, self.field = self._lines.path, field

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {self.field: self._lines.line(index)}

    def __repr__(self) -> str:
        return f"TextFileSource({self.path!r}, len={len(self)})"


class JsonlSource:
    """One JSON object per non-blank line, returned as the record dict."""

    def __init__(self, path: str | os.PathLike):
        self._lines = _LineIndexedFile(path, "JSONL")
        self.path = self._lines.path

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        line = self._lines.line(index)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: record {index} is not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}: record {index} is a {type(record).__name__}, expected a JSON object")
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, len={len(self)})"


class CsvSource:
    """Rows of a CSV/TSV file with a header line, as ``{column: string}`` dicts.

    Rows are loaded eagerly: quoted CSV fields may span lines, so line offsets cannot index rows,
    and task CSVs are small. Use ``delimiter="\\t"`` for TSV (GLUE's raw format).
    """

    def __init__(self, path: str | os.PathLike, delimiter: str = ",", encoding: str = "utf-8"):
        self.path = _require_file(path, "CSV")
        with open(self.path, newline="", encoding=encoding) as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames:
                raise ValueError(f"{self.path}: empty CSV, expected a header row naming the columns")
            self.columns = tuple(reader.fieldnames)
            self._rows = [row for row in reader if any(v for v in row.values() if v)]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self._rows[index]

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r}, columns={self.columns}, len={len(self)})"
