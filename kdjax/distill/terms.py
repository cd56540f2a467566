"""Executing `Term`s: from two forward passes' outputs and intermediates to a weighted loss.

This is the only place that knows how a term's `source` maps onto taps; knowledge functions stay pure
array functions and models stay ignorant of losses.

Chunked logit distillation: a `divergence` term on `logits` whose args hold `chunk_size` (e.g. the `kd`
recipe's `chunk_size=256`, or `Term.with_args(chunk_size=256)`) is computed by
`kdjax.knowledge.chunked_divergence` from the two models' final hidden states, recomputing both LM heads
per sequence chunk, when the step passes the heads (`stage_loss(..., student_head=, teacher_head=)`,
built by `lm_head`). The step then runs the forward passes without their LM heads (`logits_needed`),
so no `[B, S, V]` logits exist. Without heads (e.g. an evaluation that wants the logits anyway) the same
term falls back to the full logits: the value is the same either way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import knowledge
from kdjax.knowledge.chunked import LinearHead, chunked_divergence
from kdjax.matching import layer_pairs
from kdjax.methods.base import MethodError, Term
from kdjax.models.config import ModelConfig
from kdjax.models.taps import TapSpec

HEAD_SENSITIVE = ("attention_score_mse", "attention_kl")
LOGIT_FNS = ("divergence", "soft_cross_entropy", "logit_mse")
PROJECTABLE = ("hidden_mse", "cosine")
_SOURCE_TAPS = {
        "hidden_states": ("hidden_states",),
        "cls": ("hidden_states",),
        "embeddings": ("embeddings",),
        "attention_scores": ("attention_scores",),
        "attention_probs": ("attention_probs",),
        "qkv": ("query", "key", "value"),
        "value": ("value",),
        "attention_context": ("attention_context",),
}


def schedule_value(value: Any, progress) -> Any:
    """A constant, or ("linear"|"cosine", start, end) evaluated at `progress` in [0, 1]."""
    if not isinstance(value, (tuple, list)):
        return value
    kind, start, end = value
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    raise MethodError(f"unknown schedule {kind!r}; use 'linear' or 'cosine'")


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
    pre = model.mlm_features if c.head == "mlm" else None
    bias = model.mlm_bias[...] if c.head == "mlm" else None
    if model.decoder is not None:
        return LinearHead(model.decoder.kernel[...], bias, pre=pre, dtype=model.decoder.dtype)
    word = model.embed.word
    return LinearHead(word.embedding[...], bias, pre=pre, vocab_major=True, dtype=word.dtype)


def pairs_for(term: Term, student: ModelConfig, teacher: ModelConfig) -> tuple[tuple[int, int], ...]:
    if term.space is None:
        return ()
    return layer_pairs(term.layers, student.num_layers, teacher.num_layers, term.space)


def required_taps(terms: Sequence[Term], student: ModelConfig, teacher: ModelConfig) -> tuple[TapSpec, TapSpec]:
    """The student and teacher `TapSpec`s that the terms read (only the matched layers)."""
    s_req: dict[str, set] = {}
    t_req: dict[str, set] = {}
    for term in terms:
        kinds = _SOURCE_TAPS.get(term.source, ())
        pairs = pairs_for(term, student, teacher)
        for kind in kinds:
            if kind == "embeddings":
                s_req.setdefault(kind, set())
                t_req.setdefault(kind, set())
                continue
            s_req.setdefault(kind, set()).update(s for s, _ in pairs)
            t_req.setdefault(kind, set()).update(t for _, t in pairs)
    return (TapSpec.of({k: (tuple(sorted(v)) if v else None) for k, v in s_req.items()}),
                    TapSpec.of({k: (tuple(sorted(v)) if v else None) for k, v in t_req.items()}))


def needs_projection(term: Term, student: ModelConfig, teacher: ModelConfig) -> bool:
    if term.source not in ("hidden_states", "embeddings") or term.fn not in PROJECTABLE:
        return False
    if term.projection is not None:
        return bool(term.projection)
    return student.hidden_size != teacher.hidden_size


def init_aux(terms: Sequence[Term], student: ModelConfig, teacher: ModelConfig, rng: jax.Array) -> dict:
    """Learned projections (student width -> teacher width), one per term; trained, never exported."""
    aux = {}
    for i, term in enumerate(terms):
        if needs_projection(term, student, teacher):
            key = jax.random.fold_in(rng, i)
            aux[term.name] = {
                    "kernel": 0.02 * jax.random.normal(key, (student.hidden_size, teacher.hidden_size), jnp.float32),
                    "bias": jnp.zeros((teacher.hidden_size,), jnp.float32),
            }
    return aux


def validate_terms(terms: Sequence[Term], student: ModelConfig, teacher: ModelConfig, *,
                                      vocab_map: bool = False) -> None:
    """Fail before compiling, with one line, on combinations that cannot work."""
    names = [t.name for t in terms]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MethodError(f"term names must be unique within a stage; repeated: {', '.join(sorted(dup))}")
    for term in terms:
        if term.fn not in knowledge.TERMS:
            raise MethodError(f"term {term.name!r} uses unknown knowledge function {term.fn!r}; "
                                                f"known: {', '.join(knowledge.TERMS)}")
        pairs_for(term, student, teacher)  # raises MatchingError when out of range
        if term.fn in HEAD_SENSITIVE and student.num_heads != teacher.num_heads:
            raise MethodError(f"term {term.name!r} ({term.fn}) needs equal head counts but the student has "
                                                f"{student.num_heads} heads and the teacher {teacher.num_heads}; "
                                                "use qkv_relation_kl (MiniLMv2 relation heads) instead")
        if term.source == "logits":
            if student.head != teacher.head:
                raise MethodError(f"term {term.name!r} compares logits of a '{student.head}' student with a "
                                                    f"'{teacher.head}' teacher; give both the same head")
            if student.head in ("mlm", "causal_lm") and student.vocab_size != teacher.vocab_size and not vocab_map:
                raise MethodError(f"term {term.name!r}: student vocabulary ({student.vocab_size}) differs from the "
                                                    f"teacher's ({teacher.vocab_size}); use the same tokenizer or GLMD vocabulary compression")
            chunk = term.kwargs.get("chunk_size")
            if chunk is not None:
                if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
                    raise MethodError(f"term {term.name!r}: chunk_size must be a positive integer, got {chunk!r}")
                if term.fn != "divergence" or student.head not in LM_HEADS:
                    raise MethodError(f"term {term.name!r}: chunk_size applies to 'divergence' terms of LM heads "
                                      f"(mlm, causal_lm), not {term.fn} on a '{student.head}' head; drop chunk_size")
            if student.head == "classification" and student.num_labels != teacher.num_labels:
                raise MethodError(f"term {term.name!r}: student has {student.num_labels} labels, teacher "
                                                    f"{teacher.num_labels}")
        if term.source in ("hidden_states", "embeddings") and term.fn in PROJECTABLE and term.projection is False \
                and student.hidden_size != teacher.hidden_size:
            raise MethodError(f"term {term.name!r} compares widths {student.hidden_size} and {teacher.hidden_size} "
                                                "without a projection; set projection=True")


def _flat_heads(x_bshd):
    b, s, h, d = x_bshd.shape
    return x_bshd.reshape(b, s, h * d)


def token_mask(batch: Mapping[str, jax.Array], term: Term) -> jax.Array:
    mask = batch.get("attention_mask")
    if mask is None:
        mask = jnp.ones(batch["input_ids"].shape, jnp.int32)
    if term.positions == "labeled" and "labels" in batch and batch["labels"].shape == mask.shape:
        mask = mask * (batch["labels"] != -100).astype(mask.dtype)
    return mask


def _project(h, proj):
    if proj is None:
        return h
    return h.astype(jnp.float32) @ proj["kernel"] + proj["bias"]


def _chunked_logit_term(term: Term, kw: dict, chunk: int, s_out, t_out, mask, *, student_head, teacher_head,
                        vocab_map):
    """A `divergence` term from the final hidden states, both heads recomputed per sequence chunk."""
    if vocab_map is not None:
        base_teacher_head = teacher_head

        def teacher_head(h):
            return vocab_map(base_teacher_head(h))
    return chunked_divergence(s_out.last_hidden_state, t_out.last_hidden_state, student_head, teacher_head, mask,
                              chunk_size=chunk, name=term.name, **kw)


def term_loss(term: Term, aux: Mapping[str, Any], s_out, s_inter, t_out, t_inter, batch, *, progress,
              student: ModelConfig, teacher: ModelConfig, vocab_map=None,
              student_head: Optional[Callable] = None, teacher_head: Optional[Callable] = None):
    """(unweighted loss, metrics) of one term.

    `student_head` / `teacher_head` (`lm_head` of each model) let a term with `chunk_size` compute its
    divergence chunk by chunk from `last_hidden_state`; without them it uses the full logits.
    """
    fn = knowledge.TERMS[term.fn]
    kw = term.kwargs
    if "temperature" in kw:
        kw["temperature"] = schedule_value(kw["temperature"], progress)
    name = term.name
    mask = token_mask(batch, term)
    pairs = pairs_for(term, student, teacher)
    src = term.source

    if src == "logits":
        chunk = kw.pop("chunk_size", None)
        if chunk is not None and student_head is not None and teacher_head is not None:
            return _chunked_logit_term(term, kw, chunk, s_out, t_out, mask, student_head=student_head,
                                       teacher_head=teacher_head, vocab_map=vocab_map)
        s_logits, t_logits = s_out.logits, t_out.logits
        if s_logits is None or t_logits is None:
            raise MethodError(f"term {term.name!r}: the forward pass computed no logits; pass student_head and "
                              "teacher_head (terms.lm_head) for a chunked term, or run the full forward")
        if vocab_map is not None and s_logits.ndim == 3:
            t_logits = vocab_map(t_logits)
        if s_logits.ndim == 3:
            return fn(s_logits, t_logits, mask, name=name, **kw)
        return fn(s_logits, t_logits, None, name=name, **kw)
    if src == "labels":
        logits, labels = s_out.logits, batch.get("student_labels", batch["labels"])
        if logits.ndim == 3:
            if student.causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
                valid = mask[:, 1:]
            else:
                valid = mask
            return fn(logits, labels, valid, name=name, **kw)
        return fn(logits, labels, None, name=name, **kw)
    if src == "embeddings":
        proj = aux.get(term.name)
        return fn(_project(s_inter.embeddings, proj), t_inter.embeddings, mask, name=name, **kw)

    if src == "cls" and term.fn == "pkd":
        s = jnp.stack([s_inter.at("hidden_states", i)[:, 0] for i, _ in pairs], axis=1)
        t = jnp.stack([t_inter.at("hidden_states", j)[:, 0] for _, j in pairs], axis=1)
        return fn(s, t, name=name, **kw)

    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    for i, j in pairs:
        if src == "hidden_states":
            s = _project(s_inter.at("hidden_states", i), aux.get(term.name))
            loss, m = fn(s, t_inter.at("hidden_states", j), mask, name=name, **kw)
        elif src == "cls":
            s, t = s_inter.at("hidden_states", i)[:, 0], t_inter.at("hidden_states", j)[:, 0]
            if term.fn == "supervised_contrastive":
                loss, m = fn(s, jax.lax.stop_gradient(t), batch["labels"], name=name, **kw)
            else:
                loss, m = fn(s, t, name=name, **kw)
        elif src in ("attention_scores", "attention_probs"):
            loss, m = fn(s_inter.at(src, i), t_inter.at(src, j), mask, name=name, **kw)
        elif src == "qkv":
            s_qkv = tuple(_flat_heads(s_inter.at(k, i)) for k in ("query", "key", "value"))
            t_qkv = tuple(_flat_heads(t_inter.at(k, j)) for k in ("query", "key", "value"))
            loss, m = fn(s_qkv, t_qkv, mask, name=name, **kw)
        elif src == "value":
            kw.setdefault("num_heads", student.kv_heads)
            loss, m = fn(_flat_heads(s_inter.at("value", i)), _flat_heads(t_inter.at("value", j)), mask, name=name, **kw)
        elif src == "attention_context":
            kw.setdefault("num_groups", student.num_heads)
            loss, m = fn(_flat_heads(s_inter.at("attention_context", i)), _flat_heads(t_inter.at("attention_context", j)),
                                      mask, name=name, **kw)
        else:
            raise MethodError(f"term {term.name!r}: source {src!r} is not supported for {term.fn}")
        total = total + loss
        metrics = merge_metrics(metrics, m)
    return total, metrics


def merge_metrics(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> dict:
    out = dict(a)
    for k, (s, c) in b.items():
        if k in out:
            out[k] = (out[k][0] + s, out[k][1] + c)
        else:
            out[k] = (s, c)
    return out


def stage_loss(terms: Sequence[Term], aux, s_out, s_inter, t_out, t_inter, batch, *, progress,
               student: ModelConfig, teacher: ModelConfig, vocab_map=None,
               student_head: Optional[Callable] = None, teacher_head: Optional[Callable] = None):
    """Σ weight·term and metrics: each term's knowledge metrics plus `term/<name>` (its weighted value).

    `student_head` / `teacher_head`: see `term_loss` (chunked logit terms)."""
    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    for term in terms:
        loss, m = term_loss(term, aux, s_out, s_inter, t_out, t_inter, batch, progress=progress, student=student,
                            teacher=teacher, vocab_map=vocab_map, student_head=student_head,
                            teacher_head=teacher_head)
        weight = schedule_value(term.weight, progress)
        weighted = weight * loss
        total = total + weighted
        metrics = merge_metrics(metrics, m)
        metrics[f"term/{term.name}"] = (weighted, jnp.ones((), jnp.float32))
    return total, metrics
