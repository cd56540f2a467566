"""Data hooks: a method's host-side rewrite of each batch before the jitted step.

On-policy distillation samples from the student, sequence-level KD from the teacher, curricula pick
examples: all of that happens between the data loader and the step, on the host. A stage names a
`DataHook`; `Distillation.train_step` calls it with the current train state, the batch and a NumPy
generator seeded by (seed, stage, step), so a resumed run draws exactly what the uninterrupted run
drew. A hook that keeps state across steps (a replay buffer) returns it from `state_dict` as JSON-able
data; the trainer stores it in every checkpoint's metadata and gives it back through
`load_state_dict` on resume.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class DataHook:
    """Base class: override `__call__` (and `state_dict`/`load_state_dict` for stateful hooks)."""

    def __call__(self, run: Any, state: Any, batch: Mapping[str, Any], rng: np.random.Generator, *, stage: int,
                 step: int) -> dict:
        """The batch the step will see. `run` is the `Distillation` (its models and configs), `state` the
        current `TrainState` (e.g. the student's parameters to sample from), `step` the stage's step."""
        return dict(batch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def hook_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """The data hook's generator for one step: a function of (seed, stage, step) only."""
    return np.random.default_rng([int(seed), int(stage), int(step), 0xDA7A])
