"""The engine's side of knowledge terms: taps, modules, validation and the weighted stage loss.

What each knowledge kind reads and how it is applied lives in one table,
`kdjax.knowledge.registry.KNOWLEDGE`; this module asks that table (and nothing else) which taps each
model must record, which terms learn a width projection, what a stage may not combine, and sums the
weighted terms of a stage for one teacher.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.knowledge import registry
from kdjax.knowledge.chunked import LinearHead
from kdjax.knowledge.registry import TermContext, merge_metrics, projection_module_name, schedule_value
from kdjax.matching import layer_pairs
from kdjax.methods.base import MethodError, Module, Term
from kdjax.models.config import ModelConfig
from kdjax.models.taps import TapSpec

__all__ = ["LM_HEADS", "TAP_ONLY_SOURCES", "teacher_outputs_needed", "TermContext", "init_modules", "lm_head", "logit_chunk_size", "logits_needed", "merge_metrics",
           "module_specs", "pairs_for", "required_taps", "schedule_value", "terms_loss", "validate_terms"]

LM_HEADS = ("mlm", "causal_lm")


def logit_chunk_size(term: Term) -> Optional[int]:
    """The sequence chunk size of a chunked logit term, else None."""
    if term.source != "logits":
        return None
    return term.kwargs.get("chunk_size")


def logits_needed(terms: Sequence[Term]) -> tuple[bool, bool]:
    """(student, teacher): whether a forward pass must compute its full LM logits for these terms.

    Chunked logit terms read the final hidden states and recompute the head per chunk; every other
    term that reads logits (an unchunked divergence, the hard-label cross-entropy) needs them whole.
    """
    student = any((t.source == "logits" and logit_chunk_size(t) is None) or t.source == "labels" for t in terms)
    teacher = any(t.source == "logits" and logit_chunk_size(t) is None for t in terms)
    return student, teacher


# Sources whose terms read only the models' taps (never `ModelOutputs`: logits, hidden state, pooler).
TAP_ONLY_SOURCES = ("hidden_states", "embeddings", "cls", "attention_scores", "attention_probs", "qkv", "value",
                    "attention_context")


def teacher_outputs_needed(terms: Sequence[Term], stage_loss: Optional[Callable] = None) -> bool:
    """Whether a teacher pass must compute its outputs (head, pooler, last hidden state) for a stage.

    Not when every term reads taps only (its source and every source its knowledge kind declares) and the
    stage has no loss function of its own (which may read anything): then the teacher runs only up to its
    last tapped layer.
    """
    if stage_loss is not None:
        return True
    for t in terms:
        kind = registry.KNOWLEDGE.get(t.fn)
        sources = (t.source, *(kind.sources if kind is not None else ()))
        if any(s not in TAP_ONLY_SOURCES for s in sources):
            return True
    return False


def lm_head(graphdef, params) -> LinearHead:
    """The LM head of a model as `pre(h) @ W + b`: the same logits as `Transformer.lm_logits`.

    MLM: `pre` is the transform + activation + norm, `b` the MLM bias; causal LM: `pre` is the identity.
    `W` is the untied decoder kernel `[D, V]` or the tied word-embedding matrix `[V, D]`.
    """
    model = nnx.merge(graphdef, params)
    c = model.config
    if c.head not in LM_HEADS:
        raise MethodError(f"chunked logit terms need an LM head ('mlm' or 'causal_lm'), got a '{c.head}' model; "
                          "drop chunk_size for this term")
    if c.final_logit_softcap:
        raise MethodError(f"chunked logit terms recompute a linear LM head, but this {c.model_type} model soft-caps "
                          f"its logits (final_logit_softcap={c.final_logit_softcap}); drop chunk_size for this term")
    pre = model.mlm_features if c.head == "mlm" else None
    bias = model.mlm_bias[...] if c.head == "mlm" else None
    if model.decoder is not None:
        return LinearHead(model.decoder.kernel[...], bias, pre=pre, dtype=model.decoder.dtype)
    word = model.embed.word
    return LinearHead(word.embedding[...], bias, pre=pre, vocab_major=True, dtype=word.dtype)


def pairs_for(term: Term, student: ModelConfig, teacher: ModelConfig) -> tuple[tuple[int, int], ...]:
    space = registry.SOURCES[term.source].space
    if space is None:
        return ()
    return layer_pairs(term.layers, student.num_layers, teacher.num_layers, space)


def _term_taps(term: Term, student: ModelConfig, teacher: ModelConfig) -> tuple[dict, dict]:
    spec = registry.get(term.fn)
    if spec.taps is not None:
        return spec.taps(term, student, teacher)
    kinds = registry.SOURCES[term.source].taps
    if registry.SOURCES[term.source].space is None:  # embeddings: one tensor per model, no layers
        return {k: None for k in kinds}, {k: None for k in kinds}
    pairs = pairs_for(term, student, teacher)
    return ({k: tuple(sorted({s for s, _ in pairs})) for k in kinds},
            {k: tuple(sorted({t for _, t in pairs})) for k in kinds})


def _union(requests: Sequence[dict]) -> TapSpec:
    """One `TapSpec` from several `{kind: layers}` requests (`None` layers = every layer wins)."""
    merged: dict[str, Optional[set]] = {}
    for request in requests:
        for kind, layers in request.items():
            if kind in merged and merged[kind] is None:
                continue
            merged[kind] = None if layers is None else (merged.get(kind) or set()) | set(layers)
    return TapSpec.of({k: (tuple(sorted(v)) if v else None) for k, v in merged.items()})


def required_taps(terms: Sequence[Term], student: ModelConfig, teacher: ModelConfig) -> tuple[TapSpec, TapSpec]:
    """The student and teacher `TapSpec`s that the terms read (only the matched layers, unless a term
    asks for every layer)."""
    requests = [_term_taps(t, student, teacher) for t in terms]
    return _union([s for s, _ in requests]), _union([t for _, t in requests])


def student_taps(terms: Sequence[Term], student: ModelConfig, teachers: Sequence[ModelConfig]) -> TapSpec:
    """The student's taps for a stage with several teachers (the union of what each pairing reads)."""
    return _union([_term_taps(term, student, t)[0] for t in teachers for term in terms])


def needs_projection(term: Term, student: ModelConfig, teacher: ModelConfig) -> bool:
    if term.source not in ("hidden_states", "embeddings") or not registry.get(term.fn).projectable:
        return False
    if term.projection is not None:
        return bool(term.projection)
    return student.hidden_size != teacher.hidden_size


def _projection_module(index: int, term: Term) -> Module:
    def init(rng, student: ModelConfig, teachers: Mapping[str, ModelConfig]):
        teacher = next(iter(teachers.values()))
        key = jax.random.fold_in(rng, index)
        return {"kernel": 0.02 * jax.random.normal(key, (student.hidden_size, teacher.hidden_size), jnp.float32),
                "bias": jnp.zeros((teacher.hidden_size,), jnp.float32)}
    return Module(projection_module_name(term), init)


def module_specs(terms: Sequence[Term], modules: Sequence[Module], student: ModelConfig,
                 teachers: Mapping[str, ModelConfig]) -> tuple[Module, ...]:
    """The stage's learnable modules: a width projection per term that needs one, then the method's own."""
    first = next(iter(teachers.values()))
    specs = [_projection_module(i, t) for i, t in enumerate(terms) if needs_projection(t, student, first)]
    specs += list(modules)
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MethodError(f"module names must be unique within a stage; repeated: {', '.join(dup)}")
    return tuple(specs)


def init_modules(specs: Sequence[Module], student: ModelConfig, teachers: Mapping[str, ModelConfig],
                 rng: jax.Array) -> dict:
    """`{module name: params}` of the stage's modules (trained with the student, never exported)."""
    return {m.name: m.init(rng, student, dict(teachers)) for m in specs}


def validate_terms(terms: Sequence[Term], student: ModelConfig, teacher: ModelConfig, *,
                   vocab_map: bool = False) -> None:
    """Fail before compiling, with one line, on combinations that cannot work."""
    names = [t.name for t in terms]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MethodError(f"term names must be unique within a stage; repeated: {', '.join(sorted(dup))}")
    for term in terms:
        try:
            spec = registry.get(term.fn)
        except registry.KnowledgeError as e:
            raise MethodError(f"term {term.name!r}: {e}") from None
        if term.source not in spec.sources:
            raise MethodError(f"term {term.name!r}: {term.fn} reads {', '.join(spec.sources)}, not {term.source!r}")
        pairs_for(term, student, teacher)  # raises MatchingError when out of range
        if spec.head_sensitive and student.num_heads != teacher.num_heads:
            raise MethodError(f"term {term.name!r} ({term.fn}) needs equal head counts but the student has "
                              f"{student.num_heads} heads and the teacher {teacher.num_heads}; "
                              "use qkv_relation_kl (MiniLMv2 relation heads) instead")
        if term.source in ("logits", "labels"):
            headless = [who for who, c in (("student", student), ("teacher", teacher))
                        if c.head == "base" and (who == "student" or term.source == "logits")]
            if headless:
                raise MethodError(f"term {term.name!r} reads {term.source} but the {headless[0]} has no head "
                                  "(a bare encoder); set its head (e.g. teacher.head='mlm' or a classification "
                                  "teacher) or choose a method without logit terms")
        if term.source == "logits":
            if student.head != teacher.head:
                raise MethodError(f"term {term.name!r} compares logits of a '{student.head}' student with a "
                                  f"'{teacher.head}' teacher; give both the same head")
            if student.head in LM_HEADS and student.vocab_size != teacher.vocab_size and not vocab_map \
                    and not spec.cross_vocab:
                raise MethodError(f"term {term.name!r}: student vocabulary ({student.vocab_size}) differs from the "
                                  f"teacher's ({teacher.vocab_size}); use the same tokenizer or GLMD vocabulary "
                                  "compression")
            chunk = term.kwargs.get("chunk_size")
            if chunk is not None:
                if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
                    raise MethodError(f"term {term.name!r}: chunk_size must be a positive integer, got {chunk!r}")
                capped = [c.model_type for c in (student, teacher) if c.final_logit_softcap]
                if capped:
                    raise MethodError(f"term {term.name!r}: chunk_size recomputes a linear LM head, but the "
                                      f"{capped[0]} model soft-caps its logits; drop chunk_size for this term")
                if not spec.chunkable or student.head not in LM_HEADS:
                    raise MethodError(f"term {term.name!r}: chunk_size applies to 'divergence' terms of LM heads "
                                      f"(mlm, causal_lm), not {term.fn} on a '{student.head}' head; drop chunk_size")
            if student.head == "classification" and student.num_labels != teacher.num_labels:
                raise MethodError(f"term {term.name!r}: student has {student.num_labels} labels, teacher "
                                  f"{teacher.num_labels}")
        if spec.projectable and term.projection is False and student.hidden_size != teacher.hidden_size:
            raise MethodError(f"term {term.name!r} compares widths {student.hidden_size} and {teacher.hidden_size} "
                              "without a projection; set projection=True")


def terms_loss(ctx: TermContext, terms: Sequence[Term]) -> tuple[jax.Array, dict]:
    """Σ weight·term for one teacher, and metrics: each term's knowledge metrics plus `term/<name>`
    (its weighted value)."""
    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    for term in terms:
        loss, m = term_loss(term, ctx)
        weighted = ctx.schedule(term.weight) * loss
        total = total + weighted
        metrics = merge_metrics(metrics, m)
        metrics[f"term/{term.name}"] = (weighted, jnp.ones((), jnp.float32))
    return total, metrics


def term_loss(term: Term, ctx: TermContext) -> tuple[jax.Array, dict]:
    """(unweighted loss, metrics) of one term, under the named scope `term_<name>` (profiles and HLO
    metadata attribute its ops to it; `kdjax.profile`)."""
    with jax.named_scope(f"term_{term.name}"):
        return registry.get(term.fn).apply(ctx, term)
