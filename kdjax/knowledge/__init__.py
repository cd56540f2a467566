"""Knowledge terms: pure, masked, float32-stable distillation losses.

Every term is a pure ``jax.numpy`` function returning ``(loss, metrics)``: ``loss`` is a float32
scalar and ``metrics`` maps names to ``(sum, count)`` float32 pairs, so averages stay exact when they
are summed across hosts, micro-batches and uneven padding. The main metric of a term is keyed by its
``name`` argument (``f"{name}/{kind}"`` for :func:`divergence`) and satisfies
``loss == sum / max(count, 1)``. Inputs may be bf16; all arithmetic is float32.

:data:`KNOWLEDGE` (``kdjax.knowledge.registry``) is the one table of knowledge kinds: each loss registered
with the sources it reads and how the step applies it; :data:`TERMS` views it as name -> function.
"""

from collections.abc import Mapping

from kdjax.knowledge._util import masked_mean
from kdjax.knowledge.chunked import chunked_divergence
from kdjax.knowledge.attention import (
    attention_kl,
    attention_score_mse,
    embedding_relation_kl,
    head_split_relation_kl,
    qkv_relation_kl,
    relation_kl,
    value_relation_kl,
)
from kdjax.knowledge.divergences import (
    KINDS as DIVERGENCE_KINDS,
    cross_entropy,
    divergence,
    logit_mse,
    per_token_divergence,
    soft_cross_entropy,
)
from kdjax.knowledge.features import cosine, hidden_mse, pkd
from kdjax.knowledge.relations import sample_relation_kl, supervised_contrastive

from kdjax.knowledge.registry import KNOWLEDGE, SOURCES, TermContext, knowledge


class _TermFunctions(Mapping):
    """A live view of the registry: knowledge name -> its pure loss function."""

    def __getitem__(self, name):
        spec = KNOWLEDGE[name]
        if spec.fn is None:
            raise KeyError(name)
        return spec.fn

    def __iter__(self):
        return (k for k, v in KNOWLEDGE.items() if v.fn is not None)

    def __len__(self):
        return sum(1 for v in KNOWLEDGE.values() if v.fn is not None)


TERMS = _TermFunctions()

__all__ = [
    "DIVERGENCE_KINDS",
    "KNOWLEDGE",
    "SOURCES",
    "TERMS",
    "TermContext",
    "knowledge",
    "chunked_divergence",
    "masked_mean",
    "per_token_divergence",
    *TERMS,
]
