"""Declared feature taps: what a distillation method asks a model to return.

A method names the intermediates it needs (`TapSpec`); the model records exactly those as typed
`nnx.Intermediate` variables, read back with `nnx.capture`, and hands them over as an `Intermediates`
pytree. A layer never knows about a loss, and a forward pass that asks for nothing records nothing.

Shapes (B batch, S sequence, D hidden, H query heads, K key/value heads, d head dim, L layers):

=====================  ==========================  =============================================
kind                   stacked shape               meaning
=====================  ==========================  =============================================
embeddings             [B, S, D]                   embedding output (after the embedding norm)
hidden_states          [n, B, S, D]                HF convention: index 0 = embeddings, i = layer i
attention_scores       [n, B, H, S, S]             QKᵀ/√d before softmax, masked keys = finfo.min
attention_probs        [n, B, H, S, S]             softmax of the scores
query                  [n, B, S, H, d]             projected queries (after RoPE where used)
key / value            [n, B, S, K, d]             projected keys (after RoPE) / values
attention_context      [n, B, S, H, d]             per-head attention outputs before the out proj
ffn_output             [n, B, S, D]                output of the feed-forward block (pre-residual)
router_logits          [n, B, S, E]                mixture-of-experts router logits (E experts);
                                                   None for a dense model
logits                 [B, S, V] or [B, C]         head output
=====================  ==========================  =============================================

`n` is the number of selected layers (all by default); `Intermediates.layers[kind]` says which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_KINDS = ("attention_scores", "attention_probs", "query", "key", "value", "attention_context",
                              "ffn_output", "router_logits")
TAP_KINDS = ("embeddings", "hidden_states") + LAYER_KINDS + ("logits",)


class Tap(nnx.Intermediate):
    """Base type of every kdjax tap variable."""


class EmbeddingsTap(Tap):
    pass


class HiddenStatesTap(Tap):
    pass


class AttentionScoresTap(Tap):
    pass


class AttentionProbsTap(Tap):
    pass


class QueryTap(Tap):
    pass


class KeyTap(Tap):
    pass


class ValueTap(Tap):
    pass


class AttentionContextTap(Tap):
    pass


class FfnOutputTap(Tap):
    pass


class RouterLogitsTap(Tap):
    pass


class LogitsTap(Tap):
    pass


TAP_TYPES: dict[str, type[Tap]] = {
        "embeddings": EmbeddingsTap,
        "hidden_states": HiddenStatesTap,
        "attention_scores": AttentionScoresTap,
        "attention_probs": AttentionProbsTap,
        "query": QueryTap,
        "key": KeyTap,
        "value": ValueTap,
        "attention_context": AttentionContextTap,
        "ffn_output": FfnOutputTap,
        "router_logits": RouterLogitsTap,
        "logits": LogitsTap,
}


class TapError(ValueError):
    """A tap request that names an unknown kind or a layer the model does not have."""


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """Which intermediates to record: `((kind, layers_or_None), ...)`, sorted, hashable.

    `layers=None` means every layer. For `hidden_states` the indices run over 0..L (0 = embeddings);
    for per-layer kinds over 0..L-1.
    """

    items: tuple[tuple[str, Optional[tuple[int, ...]]], ...] = ()

    @staticmethod
    def of(taps: Union["TapSpec", None, str, Iterable[str], Mapping[str, Any]]) -> "TapSpec":
        if isinstance(taps, TapSpec):
            return taps
        if taps is None:
            return TapSpec()
        if isinstance(taps, str):
            taps = (taps,)
        if isinstance(taps, Mapping):
            pairs = list(taps.items())
        else:
            pairs = [(t, None) for t in taps]
        merged: dict[str, Optional[set[int]]] = {}
        for kind, layers in pairs:
            if kind not in TAP_TYPES:
                raise TapError(f"unknown tap {kind!r}; known taps: {', '.join(TAP_KINDS)}")
            if layers is None or merged.get(kind, set()) is None:
                merged[kind] = None
            else:
                merged.setdefault(kind, set()).update(int(i) for i in layers)
        return TapSpec(tuple(sorted((k, None if v is None else tuple(sorted(v))) for k, v in merged.items())))

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def layers(self, kind: str) -> Optional[tuple[int, ...]]:
        return dict(self.items).get(kind)

    def resolve(self, num_layers: int) -> dict[str, tuple[int, ...]]:
        """Concrete layer indices per kind, validated against the model depth."""
        out = {}
        for kind, layers in self.items:
            if kind in ("embeddings", "logits"):
                out[kind] = ()
                continue
            n = num_layers + 1 if kind == "hidden_states" else num_layers
            idx = tuple(range(n)) if layers is None else layers
            bad = [i for i in idx if not -n <= i < n]
            if bad:
                raise TapError(f"tap {kind!r} asks for layer(s) {bad} but the model has "
                                              f"{'indices 0..' + str(n - 1)} for this kind")
            out[kind] = tuple(i % n for i in idx)
        return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Intermediates:
    """The recorded taps of one forward pass; unrequested kinds are `None` (and cost nothing).

    Per-layer kinds are stacked on a leading axis; `layers[kind]` (static) maps position -> layer index.
    """

    embeddings: Optional[jax.Array] = None
    hidden_states: Optional[jax.Array] = None
    attention_scores: Optional[jax.Array] = None
    attention_probs: Optional[jax.Array] = None
    query: Optional[jax.Array] = None
    key: Optional[jax.Array] = None
    value: Optional[jax.Array] = None
    attention_context: Optional[jax.Array] = None
    ffn_output: Optional[jax.Array] = None
    router_logits: Optional[jax.Array] = None
    logits: Optional[jax.Array] = None
    layers: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    def layer_index(self, kind: str) -> tuple[int, ...]:
        return dict(self.layers).get(kind, ())

    def at(self, kind: str, layer: int) -> jax.Array:
        """The tap of `kind` at model layer `layer` (hidden_states: 0 = embeddings)."""
        value = getattr(self, kind)
        if value is None:
            raise TapError(f"tap {kind!r} was not requested; add it to the method's taps")
        index = self.layer_index(kind)
        if layer not in index:
            raise TapError(f"tap {kind!r} holds layers {list(index)}, not layer {layer}")
        return value[index.index(layer)]

    def take(self, kind: str, layers: jax.Array) -> jax.Array:
        """The taps of `kind` at traced model layer indices `layers` (a scalar or a vector).

        For methods that pick layers per step: the recorded layers must include every index that can be
        drawn (an index outside them reads the nearest recorded position's garbage, so the caller's tap
        request must cover the range; `kdjax.knowledge.registry.all_layers` requests every layer).
        """
        value = getattr(self, kind)
        if value is None:
            raise TapError(f"tap {kind!r} was not requested; add it to the method's taps")
        index = self.layer_index(kind)
        table = np.zeros(max(index) + 1, np.int32)
        for position, layer in enumerate(index):
            table[layer] = position
        return value[jnp.asarray(table)[layers]]

    def requested(self) -> tuple[str, ...]:
        return tuple(k for k in TAP_KINDS if getattr(self, k) is not None)
