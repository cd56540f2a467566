"""Logical sharding constraints on activations, applied where the caller has set a mesh and rules.

The model marks its residual stream at block boundaries with logical names
(`("act_batch", "act_len", "act_embed")`); a sharded step traces the model inside
`constraints(fn)` with `fn` from `kdjax.sharding.activation_constrainer(mesh, rules)`, so both models'
activations take the layout of the shared activation rules (batch over data/fsdp, features whole) and
teacher and student intermediates meet in a loss without resharding. Outside such a context (one
device, the planner's single-model paths, plain `forward` calls) marking is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional, Sequence

_CONSTRAIN: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("kdjax_activation_constraint",
                                                                               default=None)

RESIDUAL = ("act_batch", "act_len", "act_embed")


def constrain(x, logical_axes: Sequence[Optional[str]] = RESIDUAL):
    fn = _CONSTRAIN.get()
    return x if fn is None else fn(x, logical_axes)


@contextlib.contextmanager
def constraints(fn: Optional[Callable]):
    """Trace inside this context to constrain marked activations with `fn(x, logical_axes)`."""
    token = _CONSTRAIN.set(fn)
    try:
        yield
    finally:
        _CONSTRAIN.reset(token)
