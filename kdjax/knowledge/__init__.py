"""Knowledge terms: pure, masked, float32-stable distillation losses.

Every term is a pure ``jax.numpy`` function returning ``(loss, metrics)``: ``loss`` is a float32
scalar and ``metrics`` maps names to ``(sum, count)`` float32 pairs, so averages stay exact when they
are summed across hosts, micro-batches and uneven padding. The main metric of a term is keyed by its
``name`` argument (``f"{name}/{kind}"`` for :func:`divergence`) and satisfies
``loss == sum / max(count, 1)``. Inputs may be bf16; all arithmetic is float32.

:data:`TERMS` maps each term's public name to its function, for configs that name terms by string.
"""

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

TERMS = {
    "divergence": divergence,
    "soft_cross_entropy": soft_cross_entropy,
    "cross_entropy": cross_entropy,
    "logit_mse": logit_mse,
    "hidden_mse": hidden_mse,
    "cosine": cosine,
    "pkd": pkd,
    "attention_score_mse": attention_score_mse,
    "attention_kl": attention_kl,
    "relation_kl": relation_kl,
    "value_relation_kl": value_relation_kl,
    "qkv_relation_kl": qkv_relation_kl,
    "head_split_relation_kl": head_split_relation_kl,
    "embedding_relation_kl": embedding_relation_kl,
    "sample_relation_kl": sample_relation_kl,
    "supervised_contrastive": supervised_contrastive,
}

__all__ = [
    "DIVERGENCE_KINDS",
    "TERMS",
    "chunked_divergence",
    "masked_mean",
    "per_token_divergence",
    *TERMS,
]
