"""The one table of knowledge terms: what each reads and how it is applied inside the step.

A *source* says what a term reads from the two forward passes: the tap kinds, and in which layer-index
space its `layers` live (`SOURCES`). A *knowledge kind* is a pure loss from `kdjax.knowledge`
registered once with the sources it accepts and an `apply(ctx, term)` that turns a `TermContext`
(the step's view of both models, the batch, the step counter, an RNG key, the method's modules) into
`(loss, metrics)`. The engine asks this table for everything: which taps a model must record, which
terms may learn a width projection, which need equal head counts, which read the logits.

A recipe that needs a term the table does not have registers it in its own file::

    @knowledge("pooled_mse", sources=("hidden_states",), taps=all_layers)
    def pooled_mse(ctx, term):
        layers = ctx.random_layers(term, "teacher", count=2)      # traced indices, new draw per step
        ...
        return loss, metrics

Everything a term needs arrives through the context; the engine never special-cases a term.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from kdjax.knowledge import attention as attention_lib
from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge import features as features_lib
from kdjax.knowledge import relations as relations_lib
from kdjax.knowledge import sparse as sparse_lib
from kdjax.knowledge.chunked import chunked_divergence


class KnowledgeError(ValueError):
    """A term that names an unknown knowledge kind or a source it cannot read."""


@dataclasses.dataclass(frozen=True)
class Source:
    """What a term reads: tap kinds on each model, and the layer-index space of its `layers`.

    `space` is "hidden" (0 = embeddings, L = last layer), "attention" (0..L-1) or None (no layers).
    """

    name: str
    taps: tuple[str, ...]
    space: Optional[str]
    doc: str


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("logits", (), None, "head outputs ([B,S,V] token-level or [B,C] sample-level)"),
    Source("labels", (), None, "hard labels; the term reads the student alone"),
    Source("hidden_states", ("hidden_states",), "hidden", "hidden states of the matched layers"),
    Source("embeddings", ("embeddings",), None, "embedding-layer outputs"),
    Source("cls", ("hidden_states",), "hidden", "hidden state of token 0 at the matched layers"),
    Source("attention_scores", ("attention_scores",), "attention", "pre-softmax attention scores"),
    Source("attention_probs", ("attention_probs",), "attention", "attention probabilities"),
    Source("qkv", ("query", "key", "value"), "attention", "(query, key, value), heads concatenated"),
    Source("value", ("value",), "attention", "attention values, heads concatenated"),
    Source("attention_context", ("attention_context",), "attention", "attention outputs before the output projection"),
    Source("none", (), None, "nothing from the models' taps (a term that reads the batch or modules)"),
)}


@dataclasses.dataclass
class TermContext:
    """Everything a term may read inside the jitted step (one teacher at a time).

    Attributes:
      step: the stage's step counter (int32 scalar, traced); progress: step / stage steps in [0, 1].
      stage_key: a key fixed for the stage (seed and stage index); `key` derives per-term, per-step keys.
      batch: the batch as the student sees it (remapped ids under vocabulary compression); `teacher_batch`
        as the teacher sees it.
      student / teacher: `ModelConfig`s; teacher_name: the key in `config.teachers`.
      s_out, s_inter, t_out, t_inter: `ModelOutputs` and `Intermediates` of both passes.
      modules: the trainable parameters of the stage's method modules (`{module name: params}`).
      student_head / teacher_head: `LinearHead`s for chunked logit terms (None when logits are whole).
      vocab_map: GLMD's teacher-logit slice under vocabulary compression, else None.
    """

    step: Any
    progress: Any
    stage_key: Any
    batch: Mapping[str, Any]
    student: Any
    teacher: Any
    teacher_name: str
    s_out: Any
    s_inter: Any
    t_out: Any
    t_inter: Any
    modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    student_head: Any = None
    teacher_head: Any = None
    vocab_map: Optional[Callable] = None
    teacher_batch: Optional[Mapping[str, Any]] = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # -- randomness and schedules ---------------------------------------------------------------
    def key(self, name: str, every: int = 1) -> jax.Array:
        """A key for `name` that changes every `every` steps: reproducible from the step count alone,
        so a resumed run draws exactly what the uninterrupted run drew."""
        base = jax.random.fold_in(self.stage_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        return jax.random.fold_in(base, self.step // max(int(every), 1))

    def args(self, term) -> dict:
        """The term's keyword arguments, a scheduled temperature evaluated at this step."""
        kw = term.kwargs
        if "temperature" in kw:
            kw["temperature"] = self.schedule(kw["temperature"])
        return kw

    def schedule(self, value: Any) -> Any:
        """A constant, or ("linear"|"cosine", start, end) at the stage's progress."""
        return schedule_value(value, self.progress)

    # -- reading the models ---------------------------------------------------------------------
    def pairs(self, term) -> tuple[tuple[int, int], ...]:
        from kdjax.matching import layer_pairs
        space = SOURCES[term.source].space
        if space is None:
            return ()
        return layer_pairs(term.layers, self.student.num_layers, self.teacher.num_layers, space)

    def mask(self, term) -> jax.Array:
        """Valid tokens `[B, S]`: the attention mask, restricted to labeled positions when the term says so."""
        mask = self.batch.get("attention_mask")
        if mask is None:
            mask = jnp.ones(self.batch["input_ids"].shape, jnp.int32)
        if term.positions == "labeled" and "labels" in self.batch and self.batch["labels"].shape == mask.shape:
            mask = mask * (self.batch["labels"] != -100).astype(mask.dtype)
        return mask

    def student_at(self, kind: str, layer) -> jax.Array:
        return _tap(self.s_inter, kind, layer)

    def teacher_at(self, kind: str, layer) -> jax.Array:
        return _tap(self.t_inter, kind, layer)

    def random_layers(self, term, side: str, count: int, *, every: int = 1, low: int = 1,
                      high: Optional[int] = None) -> jax.Array:
        """`count` distinct sorted layer indices in [low, high) of `side`'s model, drawn per `every` steps.

        Traced indices: read them with `student_at`/`teacher_at`, whose taps must cover the range
        (register the term with `taps=all_layers`).
        """
        cfg = self.teacher if side == "teacher" else self.student
        high = cfg.num_layers if high is None else high
        if not 0 < count <= high - low:
            raise KnowledgeError(f"term {term.name!r}: cannot draw {count} distinct layers from [{low}, {high})")
        perm = jax.random.permutation(self.key(f"{term.name}/{side}/layers", every), high - low)
        return jnp.sort(perm[:count]) + low

    def projection(self, term, h: jax.Array) -> jax.Array:
        """`h` through the term's learned width projection when the stage created one, else `h`."""
        proj = self.modules.get(projection_module_name(term))
        if proj is None:
            return h
        return h.astype(jnp.float32) @ proj["kernel"] + proj["bias"]


def _tap(inter, kind: str, layer) -> jax.Array:
    if isinstance(layer, int):
        return inter.at(kind, layer)
    return inter.take(kind, layer)


def schedule_value(value: Any, progress) -> Any:
    """A constant, or ("linear"|"cosine", start, end) evaluated at `progress` in [0, 1]."""
    if not isinstance(value, (tuple, list)):
        return value
    kind, start, end = value
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    raise KnowledgeError(f"unknown schedule {kind!r}; use 'linear' or 'cosine'")


def projection_module_name(term) -> str:
    return f"proj/{term.name}"


# --------------------------------------------------------------------------------------------------
# The registry.

Apply = Callable[[TermContext, Any], tuple]
TapsFn = Callable[[Any, Any, Any], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Knowledge:
    """A registered knowledge kind.

    fn: the pure loss (what `kdjax.knowledge.TERMS` lists); apply: how the step calls it.
    sources: the sources a term of this kind may read (the first is the default).
    taps: `(term, student_cfg, teacher_cfg) -> (student {kind: layers}, teacher {kind: layers})`; the
      default reads the source's tap kinds at the term's matched layers (`None` layers = all).
    projectable: learns a student->teacher width projection when the widths differ.
    head_sensitive: needs equal head counts. logits: reads the full head outputs (chunkable when
    `chunkable`).
    """

    name: str
    fn: Optional[Callable]
    apply: Apply
    sources: tuple[str, ...]
    taps: Optional[TapsFn] = None
    projectable: bool = False
    head_sensitive: bool = False
    chunkable: bool = False
    per_token: bool = True  # the loss is a mean over examples/tokens (per-example losses are well defined)
    cross_vocab: bool = False  # compares distributions over different vocabularies (cross-tokenizer terms)


KNOWLEDGE: dict[str, Knowledge] = {}


def knowledge(name: str, *, sources: Sequence[str], fn: Optional[Callable] = None, taps: Optional[TapsFn] = None,
              projectable: bool = False, head_sensitive: bool = False, chunkable: bool = False,
              per_token: bool = True, cross_vocab: bool = False) -> Callable[[Apply], Apply]:
    """Register `apply(ctx, term) -> (loss, metrics)` as the knowledge kind `name`."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise KnowledgeError(f"knowledge {name!r} reads unknown sources {unknown}; known: {', '.join(SOURCES)}")

    def wrap(apply: Apply) -> Apply:
        if name in KNOWLEDGE and KNOWLEDGE[name].apply is not apply:
            raise KnowledgeError(f"knowledge kind {name!r} is registered twice")
        KNOWLEDGE[name] = Knowledge(name=name, fn=fn, apply=apply, sources=tuple(sources), taps=taps,
                                    projectable=projectable, head_sensitive=head_sensitive, chunkable=chunkable,
                                    per_token=per_token, cross_vocab=cross_vocab)
        return apply

    return wrap


def get(name: str) -> Knowledge:
    if name not in KNOWLEDGE:
        raise KnowledgeError(f"unknown knowledge function {name!r}; known: {', '.join(KNOWLEDGE)}")
    return KNOWLEDGE[name]


def all_layers(term, student, teacher) -> tuple[dict, dict]:
    """Taps of every layer of the term's source on both models (for terms that pick layers per step)."""
    kinds = SOURCES[term.source].taps
    return {k: None for k in kinds}, {k: None for k in kinds}


# --------------------------------------------------------------------------------------------------
# Built-in kinds.


def _flat_heads(x_bshd):
    b, s, h, d = x_bshd.shape
    return x_bshd.reshape(b, s, h * d)


def _logits_apply(ctx: TermContext, term):
    if isinstance(ctx.t_out, sparse_lib.CachedLogits):  # a cache-backed teacher: its top-k + tail
        return sparse_lib.cached_logits_apply(ctx, term)
    spec = KNOWLEDGE[term.fn]
    kw = ctx.args(term)
    chunk = kw.pop("chunk_size", None)
    mask = ctx.mask(term)
    if chunk is not None and ctx.student_head is not None and ctx.teacher_head is not None:
        teacher_head = ctx.teacher_head
        if ctx.vocab_map is not None:
            base, vmap_fn = ctx.teacher_head, ctx.vocab_map

            def teacher_head(h):
                return vmap_fn(base(h))
        return chunked_divergence(ctx.s_out.last_hidden_state, ctx.t_out.last_hidden_state, ctx.student_head,
                                  teacher_head, mask, chunk_size=chunk, name=term.name, **kw)
    s_logits, t_logits = ctx.s_out.logits, ctx.t_out.logits
    if s_logits is None or t_logits is None:
        raise KnowledgeError(f"term {term.name!r}: the forward pass computed no logits; a chunked term needs "
                             "both LM heads, otherwise run the full forward")
    if s_logits.ndim == 3:
        if ctx.vocab_map is not None:
            t_logits = ctx.vocab_map(t_logits)
        return spec.fn(s_logits, t_logits, mask, name=term.name, **kw)
    return spec.fn(s_logits, t_logits, None, name=term.name, **kw)


for _name, _fn, _chunkable in (("divergence", divergences_lib.divergence, True),
                               ("soft_cross_entropy", divergences_lib.soft_cross_entropy, False),
                               ("logit_mse", divergences_lib.logit_mse, False)):
    knowledge(_name, sources=("logits",), fn=_fn, chunkable=_chunkable)(_logits_apply)


@knowledge("cross_entropy", sources=("labels",), fn=divergences_lib.cross_entropy)
def _cross_entropy(ctx: TermContext, term):
    logits, labels = ctx.s_out.logits, ctx.batch["labels"]
    if logits.ndim == 3:
        mask = ctx.mask(term)
        if ctx.student.causal:
            logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]
        return divergences_lib.cross_entropy(logits, labels, mask, name=term.name, **ctx.args(term))
    return divergences_lib.cross_entropy(logits, labels, None, name=term.name, **ctx.args(term))


def _pairwise(ctx: TermContext, term, one_pair: Callable) -> tuple:
    """Σ over the matched layer pairs of `one_pair(i, j)`, and metrics that report that same sum.

    Each pair's metric is a `(sum, count)` whose ratio is the pair's mean; the pairs share one mask,
    hence one count, so `(Σ sums, Σ counts / n_pairs)` reads as the sum of the pairs' means, i.e. the
    term's loss (merging the pairs' counts as they are would report the mean over pairs instead).
    """
    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    pairs = ctx.pairs(term)
    for i, j in pairs:
        loss, m = one_pair(i, j)
        total = total + loss
        metrics = merge_metrics(metrics, m)
    if len(pairs) > 1:
        metrics = {k: (s, c / len(pairs)) for k, (s, c) in metrics.items()}
    return total, metrics


def _feature_apply(fn: Callable):
    def apply(ctx: TermContext, term):
        mask = ctx.mask(term)
        if term.source == "embeddings":
            return fn(ctx.projection(term, ctx.s_inter.embeddings), ctx.t_inter.embeddings, mask, name=term.name,
                      **ctx.args(term))
        return _pairwise(ctx, term, lambda i, j: fn(ctx.projection(term, ctx.student_at("hidden_states", i)),
                                                     ctx.teacher_at("hidden_states", j), mask, name=term.name,
                                                     **ctx.args(term)))
    return apply


knowledge("hidden_mse", sources=("hidden_states", "embeddings"), fn=features_lib.hidden_mse,
          projectable=True)(_feature_apply(features_lib.hidden_mse))
knowledge("cosine", sources=("hidden_states", "embeddings"), fn=features_lib.cosine,
          projectable=True)(_feature_apply(features_lib.cosine))


@knowledge("pkd", sources=("cls",), fn=features_lib.pkd)
def _pkd(ctx: TermContext, term):
    pairs = ctx.pairs(term)
    s = jnp.stack([ctx.student_at("hidden_states", i)[:, 0] for i, _ in pairs], axis=1)
    t = jnp.stack([ctx.teacher_at("hidden_states", j)[:, 0] for _, j in pairs], axis=1)
    return features_lib.pkd(s, t, name=term.name, **ctx.args(term))


@knowledge("sample_relation_kl", sources=("cls",), fn=relations_lib.sample_relation_kl, per_token=False)
def _sample_relation(ctx: TermContext, term):
    return _pairwise(ctx, term, lambda i, j: relations_lib.sample_relation_kl(
        ctx.student_at("hidden_states", i)[:, 0], ctx.teacher_at("hidden_states", j)[:, 0], name=term.name,
        **ctx.args(term)))


@knowledge("supervised_contrastive", sources=("cls",), fn=relations_lib.supervised_contrastive, per_token=False)
def _supervised_contrastive(ctx: TermContext, term):
    return _pairwise(ctx, term, lambda i, j: relations_lib.supervised_contrastive(
        ctx.student_at("hidden_states", i)[:, 0], jax.lax.stop_gradient(ctx.teacher_at("hidden_states", j)[:, 0]),
        ctx.batch["labels"], name=term.name, **ctx.args(term)))


def _attention_map_apply(fn: Callable):
    def apply(ctx: TermContext, term):
        mask = ctx.mask(term)
        src = term.source
        return _pairwise(ctx, term, lambda i, j: fn(ctx.student_at(src, i), ctx.teacher_at(src, j), mask,
                                                     name=term.name, **ctx.args(term)))
    return apply


for _name, _fn in (("attention_score_mse", attention_lib.attention_score_mse),
                   ("attention_kl", attention_lib.attention_kl)):
    knowledge(_name, sources=("attention_scores", "attention_probs"), fn=_fn,
              head_sensitive=True)(_attention_map_apply(_fn))


def _features(ctx: TermContext, side: str, source: str, layer) -> jax.Array:
    """`[B, S, D]` features of a layer: a hidden state, or a per-head tap with its heads concatenated."""
    read = ctx.teacher_at if side == "teacher" else ctx.student_at
    if source == "hidden_states":
        return read("hidden_states", layer)
    return _flat_heads(read(source, layer))


@knowledge("relation_kl", sources=("hidden_states", "value", "attention_context"), fn=attention_lib.relation_kl)
def _relation(ctx: TermContext, term):
    mask = ctx.mask(term)
    return _pairwise(ctx, term, lambda i, j: attention_lib.relation_kl(
        _features(ctx, "student", term.source, i), _features(ctx, "teacher", term.source, j), mask, name=term.name,
        **ctx.args(term)))


@knowledge("qkv_relation_kl", sources=("qkv",), fn=attention_lib.qkv_relation_kl)
def _qkv_relation(ctx: TermContext, term):
    mask = ctx.mask(term)

    def one(i, j):
        s = tuple(_flat_heads(ctx.student_at(k, i)) for k in ("query", "key", "value"))
        t = tuple(_flat_heads(ctx.teacher_at(k, j)) for k in ("query", "key", "value"))
        return attention_lib.qkv_relation_kl(s, t, mask, name=term.name, **ctx.args(term))
    return _pairwise(ctx, term, one)


@knowledge("value_relation_kl", sources=("value",), fn=attention_lib.value_relation_kl)
def _value_relation(ctx: TermContext, term):
    mask = ctx.mask(term)
    kw = {"num_heads": ctx.student.kv_heads, **ctx.args(term)}
    return _pairwise(ctx, term, lambda i, j: attention_lib.value_relation_kl(
        _flat_heads(ctx.student_at("value", i)), _flat_heads(ctx.teacher_at("value", j)), mask, name=term.name, **kw))


@knowledge("head_split_relation_kl", sources=("attention_context",), fn=attention_lib.head_split_relation_kl)
def _head_split_relation(ctx: TermContext, term):
    mask = ctx.mask(term)
    kw = {"num_groups": ctx.student.num_heads, **ctx.args(term)}
    return _pairwise(ctx, term, lambda i, j: attention_lib.head_split_relation_kl(
        _flat_heads(ctx.student_at("attention_context", i)), _flat_heads(ctx.teacher_at("attention_context", j)),
        mask, name=term.name, **kw))


@knowledge("embedding_relation_kl", sources=("embeddings",), fn=attention_lib.embedding_relation_kl)
def _embedding_relation(ctx: TermContext, term):
    return attention_lib.embedding_relation_kl(ctx.s_inter.embeddings, ctx.t_inter.embeddings, ctx.mask(term),
                                               name=term.name, **ctx.args(term))


def merge_metrics(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> dict:
    """Metric dicts of `(sum, count)` pairs added key by key."""
    out = dict(a)
    for k, (s, c) in b.items():
        if k in out:
            out[k] = (out[k][0] + s, out[k][1] + c)
        else:
            out[k] = (s, c)
    return out
