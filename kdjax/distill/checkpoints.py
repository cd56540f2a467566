"""Train-state checkpoints (orbax): save only finite states, restore the newest readable one.

Shared by the trainer and `kdjax.evaluate` (which restores a run's student without training), so
neither imports the other. A checkpoint is the state's leaves plus JSON metadata (stage, step,
data iterator state, and whatever host-side state the run and the trainer's hooks keep).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax import fileio

log = logging.getLogger("kdjax")

__all__ = ["Checkpointer", "NonFiniteStateError", "non_finite_leaves"]


class NonFiniteStateError(ValueError):
    """A train state with NaN/inf values, which is never written as a checkpoint."""


@jax.jit
def _leaf_finite(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def non_finite_leaves(state) -> list[str]:
    """Paths of the floating-point leaves of `state` that hold NaN or inf (one fused device check)."""
    flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flat:
        return []
    ok = jax.device_get(_leaf_finite([x for _, x in flat]))
    return [name for (name, _), good in zip(flat, ok) if not bool(good)]


class Checkpointer:
    """orbax `CheckpointManager` over (state leaves, metadata); steps are global step numbers."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = directory if fileio.is_remote(directory) else os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, global_step: int, state, meta: dict) -> None:
        """Writes the checkpoint of `global_step`; refuses a state with NaN/inf leaves."""
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteStateError(f"the train state at global step {global_step} has non-finite values in "
                                      f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; not saved")
        leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state))}
        self.manager.save(global_step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(leaves), meta=self.ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, global_step: int) -> dict:
        return self.manager.restore(global_step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]

    def restore_state(self, global_step: int, template):
        leaves, treedef = jax.tree.flatten(template)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                    for i, x in enumerate(leaves)}
        restored = self.manager.restore(global_step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract)))["state"]
        return jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))])

    def restore_latest(self, run):
        """(global_step, metadata, train state) of the newest readable checkpoint of `run`, or None.

        A checkpoint that cannot be read (a file truncated or deleted, a state with NaN/inf) is moved
        aside to `corrupt-<step>-<time>` with a warning and the previous one is tried.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                meta = self.restore_meta(step)
                state = self.restore_state(step, run.init_state(int(meta["stage"])))
                bad = non_finite_leaves(state)
                if bad:
                    raise NonFiniteStateError(f"non-finite values in {', '.join(bad[:3])}")
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "starting from scratch"
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); %s", step, self.directory,
                            type(e).__name__, " ".join(str(e).split())[:200], older)
                self._move_aside(step)
                continue
            return step, meta, state
        return None

    def _move_aside(self, step: int) -> None:
        self.manager.wait_until_finished()
        src = fileio.join(self.directory, str(step))
        if fileio.is_remote(self.directory):
            self.manager.delete(step)
        elif os.path.isdir(src):
            os.replace(src, os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}"))
        self.manager.close()
        self.manager = self.ocp.CheckpointManager(self.directory, options=self._options)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
