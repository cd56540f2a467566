"""Workdir files on local disk or in a bucket (``gs://``, ``s3://``): the few operations a run needs.

On a multi-host TPU slice every host must see the same checkpoints, so the workdir is usually a GCS
path. orbax writes checkpoints there itself; everything else a run writes -- ``metrics.jsonl``, the
exported student, loss plots, ``summary.json`` -- goes through these helpers, which use plain
``os``/``open`` for local paths and `etils.epath` (fsspec, with ``gcsfs`` for ``gs://``) for remote
ones. Object stores have no append and no rename, so appends rewrite the object and files produced by
libraries that only write to local disk (safetensors, matplotlib) are written to a temporary local
directory first and then copied up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Union

PathLike = Union[str, os.PathLike]

__all__ = ["append_text", "copy_tree", "exists", "is_remote", "join", "local_staging", "makedirs", "read_text",
           "write_text"]


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URI of an object store (``gs://bucket/...``) rather than a local path."""
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def _epath(path: PathLike):
    from etils import epath
    try:
        return epath.Path(os.fspath(path))
    except Exception as e:  # unknown scheme, missing backend
        raise ValueError(f"cannot open workdir path {os.fspath(path)!r} ({type(e).__name__}: {e}); for gs:// "
                         "paths install gcsfs (pip install gcsfs), or use a local directory") from None


def join(path: PathLike, *parts: str) -> str:
    """``os.path.join`` that keeps a URI's scheme intact."""
    base = os.fspath(path)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def makedirs(path: PathLike) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: PathLike) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def read_text(path: PathLike) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` whole: atomically on local disk (temporary file + rename); object writes are atomic."""
    if is_remote(path):
        _epath(path).write_text(text)
        return
    folder = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(os.fspath(path))}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text``; on an object store the object is rewritten (fine for logs of a few MB)."""
    if is_remote(path):
        p = _epath(path)
        p.write_text((p.read_text() if p.exists() else "") + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies a local file or directory tree to ``dst`` (local or remote), overwriting files."""
    src = os.fspath(src)
    if os.path.isfile(src):
        if is_remote(dst):
            parent = os.fspath(dst).rstrip("/").rsplit("/", 1)[0]
            makedirs(parent)  # a no-op on object stores; their mocks and mounted buckets need it
            with open(src, "rb") as f:
                _epath(dst).write_bytes(f.read())
        else:
            os.makedirs(os.path.dirname(os.fspath(dst)) or ".", exist_ok=True)
            shutil.copyfile(src, dst)
        return
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else join(dst, *rel.split(os.sep))
        makedirs(target)
        for name in files:
            copy_tree(os.path.join(root, name), join(target, name))


@contextlib.contextmanager
def local_staging(path: PathLike) -> Iterator[str]:
    """A local path to write ``path``'s content to: ``path`` itself if local, else a temporary directory
    (or file) whose content is copied to ``path`` when the block exits without an error."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    tmp = tempfile.mkdtemp(prefix="kdjax-stage-")
    local = os.path.join(tmp, os.path.basename(os.fspath(path).rstrip("/")) or "out")
    try:
        yield local
        if os.path.exists(local):
            copy_tree(local, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
