"""Evaluation of teachers and students: task metrics, teacher agreement, embeddings, latency.

A distilled student is judged on three axes, and this module measures each of them the same way
for every recipe:

* **task quality** — :func:`evaluate_classifier` runs a classifier over labeled batches and scores
  it with the task's own metrics (:func:`kdjax.data.metrics.compute_metrics`); with a teacher it also
  reports how closely the student follows it (mean ``KL(p_T ‖ q_S)`` and top-1 agreement), which
  is what logit distillation optimizes and often moves before accuracy does;
* **representation fidelity** — :func:`embedding_agreement` compares mean-pooled sentence
  embeddings (the sentence-transformers convention of the all-MiniLM teacher). Cosine between the
  two embeddings needs equal widths; the Spearman correlation of the two pairwise-similarity
  matrices does not, so it also ranks students narrower than their teacher;
  :func:`evaluate_lm_agreement` is the token-level analogue for MLM / causal-LM heads;
* **cost** — :func:`measure_latency` times the jitted forward pass.

Every forward pass runs with fixed shapes: a short final batch is padded to the batch size by
repeating its last row and the extra outputs are dropped, so an evaluation compiles once per
shape instead of once more for the remainder.

Command line (absl flags; prints one JSON dict)::

    python -m kdjax.evaluate --model=DIR [--teacher=DIR] --task=kdjax_reviews --split=validation
    python -m kdjax.evaluate --model=STUDENT_DIR --teacher=TEACHER_DIR --sentences=embedded

Errors (a missing directory, an unknown task, a model without the right head) print one line
``error: ...`` on stderr and exit with status 2, as bad flags do (`kdjax.cli`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.knowledge.divergences import FORWARD_KL, per_token_divergence
from kdjax.models.transformer import forward

__all__ = [
    "embedding_agreement",
    "evaluate_classifier",
    "evaluate_lm_agreement",
    "main",
    "masked_mean_pool",
    "mean_pooled_embeddings",
    "measure_latency",
    "tokenize_fixed",
]

IGNORE_INDEX = -100  # LM label value excluded from token-level agreement (HF convention)
LM_HEADS = ("mlm", "causal_lm")
Texts = Union[Sequence[str], Mapping[str, Any]]


# --- shared helpers ------------------------------------------------------------------------------

def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _model_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `Model.__call__` present in `batch` (labels and extra fields dropped)."""
    return {k: batch[k] for k in ("token_type_ids", "position_ids") if k in batch and batch[k] is not None}


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad every array in `batch` to `rows` rows by repeating the last row (outputs are dropped later).

    Repeating a real row rather than appending an all-padding row keeps every padded example
    well defined (an all-zero attention mask would divide by zero in pooling and softmax).
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        extra = rows - value.shape[0]
        out[key] = value if extra <= 0 else np.concatenate([value, np.repeat(value[-1:], extra, axis=0)], axis=0)
    return out


def _as_numpy_batch(batch: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"{where}: each batch must be a dict with 'input_ids' [B, L] (and attention_mask); got {got}")
    out = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, (str, bytes))}
    ids = out["input_ids"]
    if ids.ndim != 2:
        raise ValueError(f"{where}: input_ids must be [batch, length], got shape {ids.shape}")
    if "attention_mask" not in out:
        out["attention_mask"] = np.ones_like(ids, dtype=np.int32)
    if out["attention_mask"].shape != ids.shape:
        raise ValueError(f"{where}: attention_mask {out['attention_mask'].shape} must match input_ids {ids.shape}")
    return out


def _forward(model, batch: Mapping[str, np.ndarray]):
    return model(batch["input_ids"], batch["attention_mask"], **_model_kwargs(batch))


# --- sentence embeddings -------------------------------------------------------------------------

@jax.jit
def masked_mean_pool(hidden_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
    """Mean of the valid token vectors of each sequence, ``[B, L, D], [B, L] -> [B, D]`` (float32).

    This is sentence-transformers' ``Pooling(mode="mean")``: padded positions are excluded and the
    count is clamped at 1e-9 so an all-padding row gives zeros, not NaN.
    """
    m_bl1 = mask_bl.astype(jnp.float32)[..., None]
    total_bd = jnp.sum(hidden_bld.astype(jnp.float32) * m_bl1, axis=1)
    return total_bd / jnp.maximum(jnp.sum(m_bl1, axis=1), 1e-9)


def tokenize_fixed(tokenizer, texts: Sequence[str], *, max_length: int = 128, pad_id: Optional[int] = None,
                   multiple: int = 8) -> dict[str, np.ndarray]:
    """Tokenize `texts` into right-padded int32 ``[N, L]`` arrays with one length for all rows.

    ``L`` is the longest (truncated) text rounded up to ``multiple``, capped at ``max_length``: one
    compiled shape for the whole set, without paying for ``max_length`` on short sentences.
    Padding is done here rather than by the tokenizer so that tokenizers without a pad token
    (GPT-2, Llama) work too; padded positions are masked out and never read.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize; pass at least one sentence")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    ids = enc["input_ids"]
    longest = max(len(x) for x in ids)
    seq_len = max(longest, min(_round_up(longest, multiple), max_length))
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    out = {"input_ids": np.full((len(ids), seq_len), pad_id, np.int32),
           "attention_mask": np.zeros((len(ids), seq_len), np.int32)}
    if "token_type_ids" in enc:
        out["token_type_ids"] = np.zeros((len(ids), seq_len), np.int32)
    for i, row in enumerate(ids):
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, : len(row)] = enc["token_type_ids"][i]
    return out


def _encoded_inputs(model, texts: Texts, *, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    if isinstance(texts, Mapping):
        return _as_numpy_batch(texts, "mean_pooled_embeddings")
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; pass tokenizer=... or already tokenized "
                         "{'input_ids', 'attention_mask'} arrays instead of texts")
    # Prefer the tokenizer's pad id (RoBERTa derives positions from it); decoders often have none.
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = model.config.pad_token_id
    return tokenize_fixed(tok, texts, max_length=max_length, pad_id=pad_id)


def mean_pooled_embeddings(model, texts: Texts, *, batch_size: int = 64, max_length: int = 128,
                           tokenizer=None, normalize: bool = False) -> np.ndarray:
    """Sentence embeddings ``[N, D]`` (float32): masked mean of the last hidden state.

    Args:
      model: a :class:`kdjax.Model` (any head; only ``last_hidden_state`` is read).
      texts: sentences, or an already tokenized dict of ``[N, L]`` arrays (``input_ids``,
        ``attention_mask`` and optionally ``token_type_ids``).
      batch_size: rows per forward pass; every pass has exactly ``min(batch_size, N)`` rows (the
        last one is padded and its extra rows dropped), so the forward compiles once.
      max_length: truncation length for texts.
      tokenizer: overrides ``model.tokenizer``.
      normalize: L2-normalize each embedding (what sentence-transformers' ``Normalize`` adds).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    enc = _encoded_inputs(model, texts, tokenizer=tokenizer, max_length=max_length)
    n = enc["input_ids"].shape[0]
    if n == 0:
        raise ValueError("no texts to embed; pass at least one sentence")
    rows = min(batch_size, n)
    chunks = []
    for start in range(0, n, rows):
        part = {k: v[start : start + rows] for k, v in enc.items()}
        real = part["input_ids"].shape[0]
        part = _pad_rows(part, rows)
        out = _forward(model, part)
        pooled_bd = masked_mean_pool(out.last_hidden_state, jnp.asarray(part["attention_mask"]))
        chunks.append(np.asarray(jax.device_get(pooled_bd))[:real])
    emb_nd = np.concatenate(chunks, axis=0)
    if normalize:
        emb_nd = emb_nd / np.maximum(np.linalg.norm(emb_nd, axis=-1, keepdims=True), 1e-12)
    return emb_nd


def _cosine_matrix(emb_nd: np.ndarray) -> np.ndarray:
    unit = emb_nd.astype(np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
    return unit @ unit.T


def embedding_agreement(student, teacher, texts: Texts, *, tokenizer=None, **kw) -> dict[str, Any]:
    """How closely the student's sentence embeddings follow the teacher's.

    Returns a dict with

    * ``mean_cosine``: mean over texts of ``cos(e_S, e_T)``; ``None`` when the widths differ
      (vectors of different spaces have no meaningful cosine without a learned projection);
    * ``similarity_spearman``: Spearman correlation between the upper triangles (pairs i < j) of
      the two ``N×N`` cosine-similarity matrices — whether the student ranks sentence pairs as
      the teacher does, independent of width. Needs N >= 3. Costs O(N²) memory;
    * ``num_texts``, ``student_dim``, ``teacher_dim``.

    Both models see the same token ids when ``texts`` is pre-tokenized or ``tokenizer`` is given;
    otherwise each uses its own tokenizer (the student falls back to the teacher's).
    ``**kw`` goes to :func:`mean_pooled_embeddings` (``batch_size``, ``max_length``).
    """
    from scipy import stats

    t_tok = tokenizer if tokenizer is not None else teacher.tokenizer
    s_tok = tokenizer if tokenizer is not None else (student.tokenizer or t_tok)
    emb_t = mean_pooled_embeddings(teacher, texts, tokenizer=t_tok, **kw)
    emb_s = mean_pooled_embeddings(student, texts, tokenizer=s_tok, **kw)
    n = emb_t.shape[0]
    if n < 3:
        raise ValueError(f"embedding_agreement needs at least 3 texts for a similarity correlation, got {n}")
    mean_cosine = None
    if emb_s.shape[1] == emb_t.shape[1]:
        s = emb_s.astype(np.float64)
        t = emb_t.astype(np.float64)
        cos_n = np.sum(s * t, -1) / np.maximum(np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1), 1e-12)
        mean_cosine = float(np.mean(cos_n))
    iu = np.triu_indices(n, k=1)
    rho = stats.spearmanr(_cosine_matrix(emb_s)[iu], _cosine_matrix(emb_t)[iu]).statistic
    return {"mean_cosine": mean_cosine,
            "similarity_spearman": None if not np.isfinite(rho) else float(rho),
            "num_texts": int(n), "student_dim": int(emb_s.shape[1]), "teacher_dim": int(emb_t.shape[1])}


# --- latency -------------------------------------------------------------------------------------

def latency_inputs(model, *, batch_size: int, seq_len: int, seed: int = 0,
                   vocab_size: Optional[int] = None) -> dict[str, jax.Array]:
    """A device-resident ``[batch_size, seq_len]`` batch of random non-padding ids with a full mask.

    `vocab_size` (default: the model's) bounds the ids, so two models with different vocabularies
    can be timed on the same ids (draw below the smaller one). A learned position table shorter
    than `seq_len` is a one-line error rather than an out-of-range gather.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"need batch_size and seq_len >= 1; got batch_size={batch_size}, seq_len={seq_len}")
    config = model.config
    if config.position_embedding == "learned" and seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; pass a shorter seq_len")
    vocab_size = int(vocab_size or config.vocab_size)
    rng = np.random.default_rng(seed)
    ids_bl = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    if config.pad_token_id is not None and vocab_size > 1:
        ids_bl = np.where(ids_bl == config.pad_token_id, (config.pad_token_id + 1) % vocab_size, ids_bl)
    batch = {"input_ids": ids_bl, "attention_mask": np.ones_like(ids_bl)}
    if config.type_vocab_size:
        batch["token_type_ids"] = np.zeros_like(ids_bl)
    return jax.device_put({k: jnp.asarray(v, jnp.int32) for k, v in batch.items()})


def jitted_forward(model):
    """``f(params, batch) -> logits`` (or the last hidden state for a base model), jitted: what is timed."""
    graphdef = model.graphdef

    def run(params, inputs):
        outputs, _ = forward(graphdef, params, inputs)
        return outputs.logits if outputs.logits is not None else outputs.last_hidden_state

    return jax.jit(run)


def time_call(fn, *args) -> float:
    """Seconds for one call of `fn(*args)` including the device work (``jax.block_until_ready``)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def latency_stats(times: Sequence[float], *, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Median, p90 (linear interpolation), mean and min seconds per batch of `times`, with the
    throughput at the median: ``examples_per_s = batch_size / median_s`` and ``tokens_per_s =
    batch_size * seq_len / median_s``. The median rather than the mean, so that a stray slow call
    (another process taking the CPU, a page fault) does not move the result."""
    if not times:
        raise ValueError("no timings to summarize; run at least one repeat")
    median = statistics.median(times)
    return {"batch_size": batch_size, "seq_len": seq_len, "repeats": len(times),
            "median_s": median, "p90_s": float(np.percentile(np.asarray(times, np.float64), 90)),
            "mean_s": statistics.fmean(times), "min_s": min(times),
            "tokens_per_s": batch_size * seq_len / median, "examples_per_s": batch_size / median}


def measure_latency(model, *, batch_size: int = 32, seq_len: int = 128, repeats: int = 10,
                    warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Wall-clock time of one jitted forward pass on a ``[batch_size, seq_len]`` batch.

    The batch (random non-padding ids, full attention mask) is placed on the device once; each
    timed call ends with ``jax.block_until_ready`` so asynchronous dispatch is not mistaken for
    speed. The first call (compilation) is reported apart as ``compile_s``; then ``warmup`` more
    untimed calls, then ``repeats`` timed ones. To compare two models side by side (interleaved
    timings) use ``python -m kdjax.benchmark_latency``.

    Returns ``median_s``, ``p90_s``, ``mean_s``, ``min_s`` (seconds per batch), ``tokens_per_s`` and
    ``examples_per_s`` (from the median), ``compile_s`` and the settings.
    """
    if batch_size < 1 or seq_len < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size, seq_len, repeats >= 1 and warmup >= 0; got batch_size={batch_size}, "
                         f"seq_len={seq_len}, repeats={repeats}, warmup={warmup}")
    batch = latency_inputs(model, batch_size=batch_size, seq_len=seq_len, seed=seed)
    fwd = jitted_forward(model)
    compile_s = time_call(fwd, model.params, batch)
    for _ in range(warmup):
        jax.block_until_ready(fwd(model.params, batch))
    times = [time_call(fwd, model.params, batch) for _ in range(repeats)]
    return {**latency_stats(times, batch_size=batch_size, seq_len=seq_len), "compile_s": compile_s,
            "platform": jax.devices()[0].platform}


# --- classifiers ---------------------------------------------------------------------------------

@jax.jit
def _example_kl_n(student_logits_nc, teacher_logits_nc, temperature):
    return per_token_divergence(student_logits_nc, teacher_logits_nc, kind=FORWARD_KL, temperature=temperature)


def _check_classifier(model, spec, role: str) -> None:
    if model.config.head != "classification":
        raise ValueError(f"the {role} has a {model.config.head!r} head; task evaluation needs head='classification'")
    if model.config.num_labels != spec.num_labels:
        raise ValueError(f"the {role} predicts {model.config.num_labels} labels but task {spec.name!r} has "
                         f"{spec.num_labels}; load it with num_labels={spec.num_labels}")


def _fixed_size_batches(batches: Iterable[Mapping[str, Any]], where: str) -> Iterator[tuple[dict, int]]:
    """Yield ``(batch padded to the first batch's size, number of real rows)``."""
    rows = None
    for raw in batches:
        batch = _as_numpy_batch(raw, where)
        real = batch["input_ids"].shape[0]
        if real == 0:
            continue
        rows = real if rows is None else rows
        if real > rows:  # a larger batch later on: take it as is (one more compile)
            yield batch, real
        else:
            yield _pad_rows(batch, rows), real


def evaluate_classifier(model, batches: Iterable[Mapping[str, Any]], *, task, teacher=None,
                        temperature: float = 1.0) -> dict[str, Any]:
    """Task metrics of a sequence classifier, and its agreement with a teacher when one is given.

    Args:
      model: a :class:`kdjax.Model` with ``head="classification"`` (``num_labels`` of the task).
      batches: iterable of dicts with ``input_ids``, ``attention_mask``, optional
        ``token_type_ids``, and ``labels`` [B] (class ids, or floats for regression tasks). A
        short final batch is padded to the first batch's size and its extra rows dropped.
      task: a :class:`~kdjax.data.tasks.TaskSpec` or registered name (its metrics are reported).
      teacher: optional classifier over the same label set, fed the same token ids.
      temperature: softmax temperature of the agreement KL (1 = the models' own distributions).

    Returns:
      The task metrics (e.g. ``accuracy``, ``macro_f1``, ``score``) and ``num_examples``; with a
      teacher also ``teacher/<metric>``, ``agreement/kl`` (mean over examples of
      ``KL(p_T ‖ q_S)``, no T² factor) and ``agreement/top1`` (fraction of examples whose argmax
      classes agree). For regression tasks the agreement is ``agreement/mse`` instead.
    """
    from kdjax.data import tasks as tasks_lib
    from kdjax.data.metrics import compute_metrics

    spec = tasks_lib.get_task(task) if isinstance(task, str) else task
    _check_classifier(model, spec, "model")
    if teacher is not None:
        _check_classifier(teacher, spec, "teacher")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logits, teacher_logits, labels, kls = [], [], [], []
    for batch, real in _fixed_size_batches(batches, "evaluate_classifier"):
        if "labels" not in batch:
            raise ValueError(f"evaluate_classifier: batch has no 'labels'; its keys are {sorted(batch)}")
        s_logits = _forward(model, batch).logits
        student_logits.append(np.asarray(jax.device_get(s_logits), np.float32)[:real])
        labels.append(batch["labels"][:real])
        if teacher is not None:
            t_logits = _forward(teacher, batch).logits
            teacher_logits.append(np.asarray(jax.device_get(t_logits), np.float32)[:real])
            if not spec.is_regression:
                kls.append(np.asarray(_example_kl_n(s_logits, t_logits, jnp.float32(temperature)))[:real])
    if not student_logits:
        raise ValueError("evaluate_classifier got no batches; check the split and the loader's num_epochs")
    s_nc = np.concatenate(student_logits)
    labels_n = np.concatenate(labels)
    preds = s_nc[:, 0] if spec.is_regression else s_nc
    results: dict[str, Any] = dict(compute_metrics(spec, preds, labels_n))
    results["num_examples"] = int(labels_n.shape[0])
    if teacher is not None:
        t_nc = np.concatenate(teacher_logits)
        t_preds = t_nc[:, 0] if spec.is_regression else t_nc
        results.update({f"teacher/{k}": v for k, v in compute_metrics(spec, t_preds, labels_n).items()})
        if spec.is_regression:
            results["agreement/mse"] = float(np.mean((s_nc[:, 0].astype(np.float64) - t_nc[:, 0]) ** 2))
        else:
            results["agreement/kl"] = float(np.mean(np.concatenate(kls).astype(np.float64)))
            results["agreement/top1"] = float(np.mean(s_nc.argmax(-1) == t_nc.argmax(-1)))
    return results


# --- language-model heads ------------------------------------------------------------------------

@jax.jit
def _lm_agreement_sums(student_logits_blv, teacher_logits_blv, valid_bl, temperature):
    """(KL sum, top-1 match count, valid count) over the valid tokens of one batch."""
    kl_bl = per_token_divergence(student_logits_blv, teacher_logits_blv, kind=FORWARD_KL, temperature=temperature)
    valid = valid_bl.astype(jnp.float32)
    same_bl = jnp.argmax(student_logits_blv, -1) == jnp.argmax(teacher_logits_blv, -1)
    return jnp.sum(jnp.where(valid_bl, kl_bl, 0.0)), jnp.sum(same_bl * valid), jnp.sum(valid)


def evaluate_lm_agreement(student, teacher, batches: Iterable[Mapping[str, Any]], *,
                          temperature: float = 1.0) -> dict[str, Any]:
    """Token-level agreement of two LM heads (``mlm`` or ``causal_lm``) over valid tokens.

    A token is valid where ``attention_mask == 1`` and, if the batch has ``labels``, where the
    label is not ``-100`` (so MLM batches are scored on their masked positions only and packed
    LM batches skip padding). Both models predict the same target at each position, so no shift
    is applied. Sums are accumulated per batch, so the result is an exact mean over all valid
    tokens however they are spread over batches.

    Returns ``agreement/kl`` (mean ``KL(p_T ‖ q_S)`` per token at ``temperature``, no T²),
    ``agreement/top1`` (fraction of tokens with the same argmax) and ``num_tokens``.
    """
    for model, role in ((student, "student"), (teacher, "teacher")):
        if model.config.head not in LM_HEADS:
            raise ValueError(f"the {role} has a {model.config.head!r} head; LM agreement needs one of {LM_HEADS}")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab {student.config.vocab_size} != teacher vocab {teacher.config.vocab_size}; "
                         "slice the teacher logits to the student's vocabulary (GLMD-vc) before comparing")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kl_sum = top1_sum = count = 0.0
    seen = False
    for batch, real in _fixed_size_batches(batches, "evaluate_lm_agreement"):
        seen = True
        valid_bl = batch["attention_mask"] == 1
        if "labels" in batch:
            if batch["labels"].shape != valid_bl.shape:
                raise ValueError(f"evaluate_lm_agreement: labels {batch['labels'].shape} must be per token "
                                 f"like input_ids {valid_bl.shape}")
            valid_bl &= batch["labels"] != IGNORE_INDEX
        valid_bl[real:] = False  # padded rows
        s_logits = _forward(student, batch).logits
        t_logits = _forward(teacher, batch).logits
        sums = jax.device_get(_lm_agreement_sums(s_logits, t_logits, jnp.asarray(valid_bl), jnp.float32(temperature)))
        kl_sum += float(sums[0])
        top1_sum += float(sums[1])
        count += float(sums[2])
    if not seen:
        raise ValueError("evaluate_lm_agreement got no batches; check the split and the loader's num_epochs")
    if count == 0:
        raise ValueError("no valid tokens to compare (every position is padding or labeled -100)")
    return {"agreement/kl": kl_sum / count, "agreement/top1": top1_sum / count, "num_tokens": int(count)}


# --- command line --------------------------------------------------------------------------------

def _flag_values():
    """Flags on a private `FlagValues`, so importing this module never touches global absl flags."""
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("model", None, "Model directory (Hugging Face layout) to evaluate.", flag_values=fv)
    flags.DEFINE_string("teacher", None, "Optional teacher directory: adds agreement metrics.", flag_values=fv)
    flags.DEFINE_string("task", "kdjax_reviews", "Registered task name (kdjax.data.tasks).", flag_values=fv)
    flags.DEFINE_string("split", "validation", "Split role of the task (train, validation, test).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Examples per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_length", 128, "Tokens per example (truncation / padding length).", lower_bound=2,
                         flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data directory (default: $KDJAX_DATA_DIR or ~/.cache/kdjax).",
                        flag_values=fv)
    flags.DEFINE_string("sentences", None, "'embedded' (kdjax corpus validation split) or a text file with one "
                        "sentence per line: report embedding agreement of --model with --teacher instead of "
                        "task metrics.", flag_values=fv)
    flags.DEFINE_integer("max_examples", 0, "Evaluate at most this many examples or sentences (0 = all).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("latency", False, "Also time the jitted forward at [batch_size, max_length].", flag_values=fv)
    flags.DEFINE_string("output", None, "Also write the JSON result to this path.", flag_values=fv)
    flags.DEFINE_string("config", None, "A configs/<recipe>.py[:arg] file: evaluate that run's student (restored "
                        "from --checkpoint) against the run's teacher, instead of --model/--teacher.", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "With --config: the run's workdir (or its checkpoints/ folder); the "
                        "latest checkpoint is restored.", flag_values=fv)
    return fv


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns (as the CLI loads it)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if root not in sys.path:
            sys.path.insert(0, root)  # configs import `configs.common`, as under `python -m kdjax.main`
    module_spec = importlib.util.spec_from_file_location("_kdjax_eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def restore_run_student(config, checkpoint: str):
    """(student Model, teacher Model) of a run restored from the latest checkpoint under `checkpoint`."""
    from kdjax.distill import Distillation
    from kdjax.distill.checkpoints import Checkpointer

    directory = checkpoint if os.path.basename(os.path.normpath(checkpoint)) == "checkpoints" else os.path.join(
        checkpoint, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {checkpoint}; pass the run's --workdir")
    run = Distillation(config)
    ckpt = Checkpointer(directory, async_save=False)
    try:
        restored = ckpt.restore_latest(run)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint yet")
    _, meta, state = restored
    stage = int(meta["stage"])
    return run.student_model(state, stage), next(iter(run.teachers.values()))[0]


def _take(batches: Iterable[Mapping[str, Any]], limit: int) -> Iterator[dict]:
    """The first `limit` examples of `batches` (all of them when limit is 0)."""
    left = limit
    for batch in batches:
        if limit and left <= 0:
            return
        n = len(batch["input_ids"])
        if limit and n > left:
            batch = {k: v[:left] for k, v in batch.items()}
            n = left
        left -= n
        yield batch


def _read_sentences(source: str, limit: int) -> list[str]:
    if source == "embedded":
        from kdjax.data import embedded

        sentences = embedded.corpus_sentences("validation")
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--sentences={source} is neither 'embedded' nor an existing text file")
        with open(source, encoding="utf-8") as f:
            sentences = [line.strip() for line in f if line.strip()]
    return sentences[:limit] if limit else sentences


def _run(fv) -> dict[str, Any]:
    import kdjax
    from kdjax.data import tasks as tasks_lib

    if fv.config:
        if not fv.checkpoint:
            raise ValueError("--config needs --checkpoint=WORKDIR (the run to evaluate)")
        config = load_config_file(fv.config)
    elif not fv.model:
        raise ValueError("--model is required: pass the model directory to evaluate (or --config and --checkpoint)")
    spec = None
    if fv.sentences is None:
        spec = tasks_lib.get_task(fv.task)  # fail on a bad task name before loading any weights
        spec.split(fv.split)
    elif not fv.teacher and not fv.config:
        raise ValueError("--sentences compares two models; pass --teacher=DIR as the reference")
    if fv.config:
        model, teacher = restore_run_student(config, fv.checkpoint)
        fv.model = f"{fv.checkpoint} (latest checkpoint)"
    else:
        model = kdjax.load_pretrained(fv.model)
        teacher = kdjax.load_pretrained(fv.teacher) if fv.teacher else None
    if spec is not None and model.config.head != "classification":
        raise ValueError(f"{fv.model} has a {model.config.head!r} head, not a classifier; evaluate a fine-tuned "
                         "classifier on --task, or compare embeddings with --sentences=embedded --teacher=DIR")
    result: dict[str, Any] = {"model": fv.model, "model_params": model.num_params}
    if teacher is not None:
        result.update(teacher=fv.teacher or teacher.source, teacher_params=teacher.num_params)

    if spec is None:
        sentences = _read_sentences(fv.sentences, fv.max_examples)
        result["sentences"] = fv.sentences
        result.update(embedding_agreement(model, teacher, sentences, batch_size=fv.batch_size,
                                          max_length=fv.max_length))
    else:
        from kdjax.data.pipeline import make_task_loader

        tokenizer = model.tokenizer or (teacher.tokenizer if teacher is not None else None)
        if tokenizer is None:
            raise ValueError(f"{fv.model} has no tokenizer files; copy the teacher's tokenizer into it")
        if spec.is_corpus or spec.label_field is None:
            raise ValueError(f"task {spec.name!r} has no class labels to score; use --sentences for corpora")
        loader = make_task_loader(spec, fv.split, tokenizer, data_dir=fv.data_dir, batch_size=fv.batch_size,
                                  max_length=fv.max_length, shuffle=False, num_epochs=1, drop_remainder=False,
                                  shard_index=0, shard_count=1)
        result.update(task=spec.name, split=fv.split)
        result.update(evaluate_classifier(model, _take(loader, fv.max_examples), task=spec, teacher=teacher))
    if fv.latency:
        result["latency"] = measure_latency(model, batch_size=fv.batch_size, seq_len=fv.max_length)
        if teacher is not None:
            result["teacher_latency"] = measure_latency(teacher, batch_size=fv.batch_size, seq_len=fv.max_length)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad flags or input, see `kdjax.cli`)."""
    from kdjax.cli import run_cli

    # Libraries (tfds preparing the embedded data, progress bars) print to stdout; run_cli keeps stdout
    # for the JSON result alone so it can be piped into other tools.
    fv = _flag_values()
    status, result = run_cli(argv, fv, "usage: python -m kdjax.evaluate --model=DIR [--teacher=DIR] "
                             "[--task=NAME --split=ROLE | --sentences=embedded|FILE] [flags]", _run)
    if result is None:
        return status
    if fv.output:
        from kdjax.report import write_json

        write_json(fv.output, result)
    from kdjax.report import to_jsonable

    print(json.dumps(to_jsonable(result), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
