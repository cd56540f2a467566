"""A run's claim on its workdir: a lock, the config fingerprint, and whether the run already finished.

* `run.lock` (pid, host, start time) is held while a run uses the workdir. A second live run is
  refused; the lock of a process that no longer exists on this host is taken over with a warning.
  Object-store workdirs (gs://) are not locked: a multi-host job shares them by design.
* `config_fingerprint.json` records the config sections that change a run's result
  (`kdjax.config.RESULT_FIELDS`). A resumed run with other values is refused unless
  `--config.resume_mismatch=continue`.
* `summary.json` marks a finished run: rerunning it is a no-op that prints the summary.

Nothing here writes before the caller has validated its inputs, and `release(failed=True)` removes
what this process created, so a refused run leaves the workdir as it found it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from typing import Optional

from kdjax import config as config_lib
from kdjax import fileio

log = logging.getLogger("kdjax")

LOCK = "run.lock"
FINGERPRINT = "config_fingerprint.json"
SUMMARY = "summary.json"


class WorkdirError(ValueError):
    """The workdir is in use, or holds a run with another config (the message says what to do)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workdir:
    """The lock, fingerprint and summary files of one workdir (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.remote = fileio.is_remote(path)
        self.existed = fileio.exists(path)
        self._created: list[str] = []
        self._locked = False

    def file(self, name: str) -> str:
        return fileio.join(self.path, name)

    def finished_summary(self) -> Optional[dict]:
        """The summary of a finished run in this workdir, or None."""
        path = self.file(SUMMARY)
        if not fileio.exists(path):
            return None
        try:
            return json.loads(fileio.read_text(path))
        except ValueError:
            return None  # a summary cut short: the run did not finish writing it; rerun to finish

    def check_fingerprint(self, config) -> None:
        """Refuses a config whose result-changing sections differ from the run stored here."""
        path = self.file(FINGERPRINT)
        if not fileio.exists(path):
            return
        try:
            stored = json.loads(fileio.read_text(path))
        except ValueError:
            log.warning("%s is unreadable; it is rewritten for this run", path)
            return
        current = config_lib.fingerprint(config)
        if stored.get("sha256") == current["sha256"]:
            return
        old, new = stored.get("fields", {}), current["fields"]
        changed = [k for k in config_lib.RESULT_FIELDS if json.dumps(old.get(k), sort_keys=True, default=str)
                   != json.dumps(new.get(k), sort_keys=True, default=str)] or ["the config"]
        if config_lib.get(config, "resume_mismatch") == "continue":
            log.warning("resuming %s although %s changed since it started (resume_mismatch=continue)", self.path,
                        ", ".join(changed))
            return
        raise WorkdirError(f"--workdir={self.path} holds a run started with a different {', '.join(changed)} "
                           f"(see {FINGERPRINT}); rerun with the original config, use a new --workdir, or pass "
                           "--config.resume_mismatch=continue to continue it anyway")

    def acquire(self) -> None:
        """Creates the workdir if needed and takes its lock (refusing a live run's lock)."""
        if not self.existed:
            fileio.makedirs(self.path)
        if self.remote:
            return
        path = self.file(LOCK)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over(path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._locked = True
            return

    def _take_over(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("removing the unreadable lock %s", path)
            os.unlink(path)
            return
        if host == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
            raise WorkdirError(f"--workdir={self.path} is in use by a running kdjax (pid {pid} on {host}, since "
                               f"{holder.get('started', '?')}); wait for it to finish or use another --workdir")
        if host != socket.gethostname():
            raise WorkdirError(f"--workdir={self.path} is locked by pid {pid} on host {host}; if that run is gone, "
                               f"delete {path} and rerun")
        log.warning("taking over the stale lock %s of pid %d, which no longer runs", path, pid)
        os.unlink(path)

    def record_fingerprint(self, config) -> None:
        path = self.file(FINGERPRINT)
        current = config_lib.fingerprint(config)
        if fileio.exists(path):
            try:
                if json.loads(fileio.read_text(path)).get("sha256") == current["sha256"]:
                    return
            except ValueError:
                pass
        else:
            self._created.append(path)
        fileio.write_text(path, json.dumps(current, indent=2, sort_keys=True, default=str) + "\n")

    def release(self, *, failed: bool = False) -> None:
        """Drops the lock; after a refused start (`failed`) also removes what this process created."""
        if self._locked:
            try:
                os.unlink(self.file(LOCK))
            except FileNotFoundError:
                pass
            self._locked = False
        if not failed or self.remote or _has_checkpoint(self.path):
            return  # a run that saved a checkpoint keeps its workdir, to resume from
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in self._created:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _has_checkpoint(path: str) -> bool:
    folder = os.path.join(path, "checkpoints")
    return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))
