"""The *KD Revisited* grid: a method assembled from named kinds of knowledge and one layer matching.

Rather than a fixed recipe, `unified` lets an experiment sweep the design space of the unified
studies of BERT distillation — which knowledge is transferred, how layers are matched, how the student
is initialized — with one builder:

    get_method("unified", knowledge=("hidden", "attention"), matching="uniform", student_init="first")

Every knowledge name maps to one term (`KNOWLEDGE`). Layer-wise kinds use `matching` in their own
index space (hidden states: 0 = embeddings; attention: 0-based layers) unless `layers` overrides them
per kind; `embedding` is always the pair (0, 0). Note that "uniform" hidden-state matching already
includes the embeddings, so `("embedding", "hidden")` with it counts the embedding pair twice.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register
from kdjax.methods.kd import (check_layers, check_positive_int, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero, logit_kd_term)

# name -> (knowledge fn, source, layer-wise?, one-line meaning)
KNOWLEDGE: dict[str, tuple[str, str, bool, str]] = {
        "embedding": ("hidden_mse", "hidden_states", False, "MSE of the embedding outputs, pair (0, 0)"),
        "hidden": ("hidden_mse", "hidden_states", True, "MSE of matched hidden states (TinyBERT)"),
        "attention": ("attention_score_mse", "attention_scores", True, "MSE of pre-softmax attention scores"),
        "attention_kl": ("attention_kl", "attention_scores", True, "KL of attention distributions (MiniLM)"),
        "value_relation": ("value_relation_kl", "value", True, "value-relation KL (MiniLM)"),
        "qkv_relation": ("qkv_relation_kl", "qkv", True, "Q/K/V relation KL (MiniLMv2)"),
        "logits": ("divergence", "logits", False, "T²·divergence of the head logits (Hinton)"),
        "soft_ce": ("soft_cross_entropy", "logits", False, "soft cross-entropy of the head logits (TinyBERT)"),
        "cosine": ("cosine", "hidden_states", True, "1 − cos of matched hidden states (DistilBERT)"),
        "pkd": ("pkd", "cls", True, "normalized [CLS] MSE of matched layers (PKD)"),
        "hard": ("cross_entropy", "labels", False, "cross-entropy with the hard labels"),
}


def _knowledge_names(knowledge: Union[str, Sequence[str]]) -> tuple[str, ...]:
    if isinstance(knowledge, str):
        knowledge = [k.strip() for k in knowledge.split(",") if k.strip()]
    names = tuple(knowledge)
    if not names:
        raise MethodError(f"unified: knowledge is empty; choose from {', '.join(KNOWLEDGE)}")
    unknown = [k for k in names if k not in KNOWLEDGE]
    if unknown:
        raise MethodError(f"unified: unknown knowledge {', '.join(map(repr, unknown))}; known: {', '.join(KNOWLEDGE)}")
    if len(set(names)) != len(names):
        raise MethodError(f"unified: knowledge {names} names a kind twice; list each once")
    return names


def _per_kind(table: Optional[Mapping[str, Any]], names: Sequence[str], what: str) -> dict:
    table = dict(table or {})
    stray = sorted(set(table) - set(names))
    if stray:
        raise MethodError(f"unified: {what} given for {', '.join(map(repr, stray))}, which is not in knowledge "
                          f"{tuple(names)}")
    return table


@register("unified", "KD Revisited grid: any mix of embedding/hidden/attention/relation/logit/hard knowledge, one matching")
def unified(*, knowledge: Union[str, Sequence[str]] = ("hidden", "attention"), matching: Union[str, tuple] = "uniform",
            weights: Optional[Mapping[str, Schedule]] = None, layers: Optional[Mapping[str, Any]] = None,
            temperature: Schedule = 1.0, kind: str = "forward_kl", num_relation_heads: int = 48,
            projection: Optional[bool] = None, student_init: Union[str, tuple] = "uniform") -> Method:
    """A one-stage method from the chosen knowledge kinds.

    Args:
      knowledge: names from `KNOWLEDGE` (a sequence or a comma-separated string).
      matching: layer matching (a `kdjax.matching` strategy or explicit pairs) of the layer-wise kinds.
      weights: per-kind weights (default 1).
      layers: per-kind matching overrides, e.g. `{"cosine": "final", "pkd": "skip"}`.
      temperature: T of the `logits` and `soft_ce` kinds (`logits` is multiplied by T²).
      kind: the divergence of the `logits` kind.
      num_relation_heads: A_r of the `qkv_relation` kind.
      projection: learned student→teacher projection of the hidden-state kinds (None: when widths differ).
      student_init: `kdjax.students` initialization (an axis of the grid).
    """
    names = _knowledge_names(knowledge)
    matching = check_layers(matching, "unified: matching")
    weights = _per_kind(weights, names, "weights")
    overrides = _per_kind(layers, names, "layers")
    if "embedding" in overrides:
        raise MethodError("unified: the 'embedding' kind is always the pair (0, 0); use 'hidden' with explicit "
                          "pairs for other embedding matchings")
    fixed = sorted(k for k in overrides if not KNOWLEDGE[k][2])
    if fixed:
        raise MethodError(f"unified: {', '.join(map(repr, fixed))} read no layers; drop them from `layers`")
    temperature = check_temperature(temperature, "unified: temperature")
    terms = []
    for name in names:
        fn, source, layerwise, _ = KNOWLEDGE[name]
        weight = check_weight(weights.get(name, 1.0), f"unified: weights[{name!r}]")
        pairs = check_layers(overrides.get(name, matching), f"unified: layers[{name!r}]") if layerwise else "final"
        if name == "embedding":
            terms.append(Term.make(fn, source, weight=weight, layers="embeddings", projection=projection, name=name))
        elif name == "logits":
            terms.append(logit_kd_term(weight, temperature, kind=kind, name=name))
        elif name == "soft_ce":
            terms.append(Term.make(fn, source, weight=weight, name=name, temperature=temperature, scale_by_t2=False))
        elif name == "hard":
            terms.append(hard_label_term(weight, name=name))
        elif name == "qkv_relation":
            terms.append(Term.make(fn, source, weight=weight, layers=pairs, name=name,
                                   num_relation_heads=check_positive_int(num_relation_heads,
                                                                         "unified: num_relation_heads")))
        elif source == "hidden_states":
            terms.append(Term.make(fn, source, weight=weight, layers=pairs, projection=projection, name=name))
        else:
            terms.append(Term.make(fn, source, weight=weight, layers=pairs, name=name))
    terms = keep_nonzero(*terms, what="unified")
    label = matching if isinstance(matching, str) else "custom"
    return Method(name="unified", stages=(Stage("distill", terms),),
                  description=f"unified: {' + '.join(t.name for t in terms)} with {label} matching",
                  student_init=check_student_init(student_init, "unified: student_init"))
