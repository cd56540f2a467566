"""Distillation across tokenizers: aligned positions, shared vocabulary, and the losses over them.

A teacher and a student with different tokenizers cut the same text into different tokens, so their
position ``i`` and their vocabulary id ``v`` mean different things. Two remedies live here:

* **ULD** (Boizard et al. 2024): compare the *sorted* probability vectors of the two models, which needs
  no vocabulary mapping, at the k-th answer position of each side (:func:`uld_loss`).
* **Offset alignment**: tokenize the same text with both tokenizers, keep character offsets, and pair a
  teacher token with a student token when both end at the same character (:func:`align_offsets`). At
  such a pair both models have read exactly the same text, so their hidden states can be compared and
  their next-token distributions can be compared over the tokens whose strings exist in both
  vocabularies (:func:`matched_vocabulary`, :func:`aligned_logit_kl`).

The host side (:class:`CrossTokenizerHook`) runs as a stage data hook: it decodes the teacher's batch
to text, re-encodes it with both tokenizers and writes the student's ids, mask and labels and the
alignment index arrays into the batch; the losses run in the jitted step. ``docs/cross_tokenizer.md``
describes the conventions.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.knowledge import _util
from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge import features as features_lib

__all__ = [
    "CrossTokenizerHook",
    "VocabPairs",
    "align_offsets",
    "aligned_logit_kl",
    "aligned_positions",
    "gather_positions",
    "matched_vocabulary",
    "ranked_positions",
    "token_surface",
    "uld_loss",
]


# --------------------------------------------------------------------------------------------------
# Alignment of two tokenizations of one text (host side, NumPy)
# --------------------------------------------------------------------------------------------------


def align_offsets(teacher_offsets: Sequence[Sequence[int]], student_offsets: Sequence[Sequence[int]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of positions whose tokens end at the same character.

    Tokens with an empty span (special tokens, offsets ``(0, 0)``) are skipped. Each pair closes a
    segment of the text that both tokenizations cover with whole tokens: a single token on both sides
    (the spans coincide, ``exact``) or several tokens merged on either side (only the last token of
    each side's group is paired, the position that has read the whole segment).

    Args:
      teacher_offsets / student_offsets: ``[(start, end)]`` character spans per token, in order.

    Returns:
      ``(teacher_index int32[A], student_index int32[A], exact bool[A])`` in text order.
    """
    t_spans = [(i, int(a), int(b)) for i, (a, b) in enumerate(teacher_offsets) if int(b) > int(a)]
    s_spans = [(j, int(a), int(b)) for j, (a, b) in enumerate(student_offsets) if int(b) > int(a)]
    t_idx, s_idx, exact = [], [], []
    i = j = 0
    t_start = s_start = None  # start of the current (possibly merged) segment on each side
    while i < len(t_spans) and j < len(s_spans):
        ti, ta, tb = t_spans[i]
        sj, sa, sb = s_spans[j]
        t_start = ta if t_start is None else t_start
        s_start = sa if s_start is None else s_start
        if tb == sb:
            t_idx.append(ti)
            s_idx.append(sj)
            exact.append(t_start == s_start and ta == t_start and sa == s_start)
            i, j = i + 1, j + 1
            t_start = s_start = None
        elif tb < sb:
            i += 1
        else:
            j += 1
    return (np.asarray(t_idx, np.int32), np.asarray(s_idx, np.int32), np.asarray(exact, bool))


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 style) tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _backend_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    model = type(backend.model).__name__
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else ""
    if model == "WordPiece":
        return "wordpiece"
    decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
    if "ByteLevel" in pre or "ByteLevel" in decoder:
        return "bytelevel"
    return "other"


def token_surface(token: str, kind: str) -> Optional[str]:
    """The text a vocabulary entry stands for, with a leading space when it starts a word.

    ``kind``: ``"wordpiece"`` (``##x`` continues a word, anything else starts one), ``"bytelevel"``
    (GPT-2 byte characters, ``Ġ`` is a space), or ``"other"`` (SentencePiece ``▁`` is a space).
    ``None`` when a byte-level token is not valid UTF-8 on its own.
    """
    if kind == "wordpiece":
        return token[2:] if token.startswith("##") else " " + token
    if kind == "bytelevel":
        try:
            return bytes(_BYTE_DECODER[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    return token.replace("\u2581", " ")


@dataclasses.dataclass(frozen=True, eq=False)
class VocabPairs:
    """Teacher and student ids of the tokens whose surfaces coincide (``teacher[k]`` ~ ``student[k]``).

    Hashable by content so that it can be a term argument (a constant of the compiled step)."""

    teacher: np.ndarray
    student: np.ndarray

    def __post_init__(self):
        t = np.asarray(self.teacher, np.int32)
        s = np.asarray(self.student, np.int32)
        if t.shape != s.shape or t.ndim != 1 or t.size == 0:
            raise ValueError(f"vocabulary pairs need two equal non-empty 1-D id arrays, got {t.shape} and {s.shape}")
        object.__setattr__(self, "teacher", t)
        object.__setattr__(self, "student", s)

    def _digest(self) -> str:
        return hashlib.sha1(self.teacher.tobytes() + b"|" + self.student.tobytes()).hexdigest()

    def __hash__(self) -> int:
        return hash(self._digest())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VocabPairs) and self._digest() == other._digest()

    def __len__(self) -> int:
        return int(self.teacher.size)

    def __repr__(self) -> str:
        return f"VocabPairs({len(self)} shared tokens)"


def matched_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> VocabPairs:
    """The exact-string matches between two vocabularies (special tokens excluded).

    Surfaces come from :func:`token_surface`; when several ids of one side share a surface the lowest
    id is used.
    """
    def surfaces(tok) -> dict[str, int]:
        kind = _backend_kind(tok)
        special = set(int(i) for i in tok.all_special_ids)
        out: dict[str, int] = {}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx in special:
                continue
            surface = token_surface(token, kind)
            if surface and surface not in out:
                out[surface] = int(idx)
        return out

    t_map, s_map = surfaces(teacher_tokenizer), surfaces(student_tokenizer)
    shared = sorted(set(t_map) & set(s_map), key=lambda w: t_map[w])
    if not shared:
        raise ValueError("the two tokenizers share no token strings; use the ULD recipe (uld), which needs no "
                         "vocabulary mapping")
    return VocabPairs(np.asarray([t_map[w] for w in shared]), np.asarray([s_map[w] for w in shared]))


# --------------------------------------------------------------------------------------------------
# The data hook: both tokenizations and the alignment arrays
# --------------------------------------------------------------------------------------------------


class CrossTokenizerHook:
    """Re-tokenizes each batch for the student and writes the alignment arrays (a stage data hook).

    For each row, the teacher's valid ids are decoded to text (special tokens dropped), split at the
    first labeled position into a prompt and an answer. Both tokenizers encode ``prompt + answer`` with
    character offsets; a token is labeled when it starts in the answer. The batch gets

    * ``input_ids``, ``attention_mask``, ``labels``: the teacher's re-encoding (width of the batch;
      without labels in the batch every valid token is a label, as for language modeling);
    * ``student_input_ids``, ``student_attention_mask``, ``student_labels``: the student's;
    * ``xtok_teacher_index``, ``xtok_student_index``, ``xtok_mask`` ``[B, A]``: the pairs of
      :func:`align_offsets` whose segment ends in the answer (when the row has labels) and after which
      both sides still have a token (so both next-token predictions exist).

    When the teacher's and the student's tokenizers are the same the batch passes through with the
    identity alignment (:func:`identity_alignment`).
    """

    evaluation = True  # a pure re-encoding: `Distillation.evaluate_batch` applies it too

    def __init__(self, student_length: Optional[int] = None):
        self.student_length = student_length
        self._same: dict = {}

    def tokenizers(self, run: Any):
        toks = getattr(run, "tokenizers", None) or {}
        teacher = next((v for k, v in toks.items() if k != "student" and v is not None), None)
        student = toks.get("student")
        if teacher is None or student is None:
            raise ValueError("cross-tokenizer distillation needs both tokenizers; load the models from "
                             "directories with tokenizer files or set teacher.tokenizer and student.tokenizer")
        return teacher, student

    def __call__(self, run, state, batch, rng, *, stage, step):
        del state, rng, stage, step
        teacher, student = self.tokenizers(run)
        key = (id(teacher), id(student))
        if key not in self._same:
            from kdjax.vocab import same_tokenizer
            self._same[key] = same_tokenizer(teacher, student)
        if self._same[key]:
            return identity_alignment(batch)
        return retokenize(batch, teacher, student, student_length=self.student_length)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def identity_alignment(batch: Mapping[str, Any]) -> dict:
    """The batch unchanged plus the alignment of one tokenization with itself: position ``i`` with ``i``
    wherever token ``i`` and the next one are valid (and token ``i`` is labeled, when there are labels)."""
    out = dict(batch)
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))) == 1
    pair = mask & np.pad(mask[:, 1:], ((0, 0), (0, 1)))
    labels = batch.get("labels")
    if labels is not None and np.shape(labels) == ids.shape:
        pair &= np.asarray(labels) != -100
    else:  # a plain corpus batch: every valid token is a language-modeling label
        out["labels"] = np.where(mask, ids, -100).astype(np.int32)
    index = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()
    out.update(xtok_teacher_index=index, xtok_student_index=index.copy(), xtok_mask=pair.astype(np.int32))
    return out


def _encode(tokenizer, text: str, length: int):
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=length)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def retokenize(batch: Mapping[str, Any], teacher_tokenizer, student_tokenizer, *,
               student_length: Optional[int] = None) -> dict:
    """The body of :class:`CrossTokenizerHook` (a pure function of the batch and the tokenizers)."""
    ids_bs = np.asarray(batch["input_ids"])
    b, length = ids_bs.shape
    s_length = int(student_length or length)
    mask_bs = np.asarray(batch.get("attention_mask", np.ones_like(ids_bs)))
    labels_bs = batch.get("labels")
    labels_bs = None if labels_bs is None or np.shape(labels_bs) != ids_bs.shape else np.asarray(labels_bs)
    t_pad = teacher_tokenizer.pad_token_id or 0
    s_pad = student_tokenizer.pad_token_id or 0
    out = {k: np.asarray(v) for k, v in batch.items()}
    t_ids = np.full((b, length), t_pad, np.int32)
    s_ids = np.full((b, s_length), s_pad, np.int32)
    t_mask = np.zeros((b, length), np.int32)
    s_mask = np.zeros((b, s_length), np.int32)
    t_lab = np.full((b, length), -100, np.int32)
    s_lab = np.full((b, s_length), -100, np.int32)
    width = min(length, s_length)
    t_index = np.zeros((b, width), np.int32)
    s_index = np.zeros((b, width), np.int32)
    pair_mask = np.zeros((b, width), np.int32)
    for r in range(b):
        valid = mask_bs[r] == 1
        row = ids_bs[r][valid]
        if labels_bs is not None and (labels_bs[r][valid] != -100).any():
            first = int(np.argmax(labels_bs[r][valid] != -100))
        else:
            first = 0
        prompt = teacher_tokenizer.decode(row[:first].tolist(), skip_special_tokens=True) if first else ""
        answer = teacher_tokenizer.decode(row[first:].tolist(), skip_special_tokens=True)
        text = prompt + answer
        boundary = len(prompt)
        has_labels = labels_bs is not None
        sides = []
        for tok, n, ids_out, mask_out, lab_out in ((teacher_tokenizer, length, t_ids, t_mask, t_lab),
                                                   (student_tokenizer, s_length, s_ids, s_mask, s_lab)):
            ids, offsets = _encode(tok, text, n)
            ids_out[r, : len(ids)] = ids
            mask_out[r, : len(ids)] = 1
            special = set(int(i) for i in tok.all_special_ids)
            for k, (tid, (a, e)) in enumerate(zip(ids, offsets)):
                if e > a and int(tid) not in special and (not has_labels or a >= boundary):
                    lab_out[r, k] = tid
            sides.append((ids, offsets))
        (tids, toffs), (sids, soffs) = sides
        ti, sj, _ = align_offsets(toffs, soffs)
        keep = [(a, c) for a, c in zip(ti, sj)
                if a + 1 < len(tids) and c + 1 < len(sids) and (not has_labels or toffs[a][1] >= boundary)]
        keep = keep[:width]
        for k, (a, c) in enumerate(keep):
            t_index[r, k], s_index[r, k], pair_mask[r, k] = a, c, 1
    out.update(input_ids=t_ids, attention_mask=t_mask, student_input_ids=s_ids, student_attention_mask=s_mask,
               xtok_teacher_index=t_index, xtok_student_index=s_index, xtok_mask=pair_mask)
    out.update(labels=t_lab, student_labels=s_lab)
    out.pop("token_type_ids", None)
    return out


# --------------------------------------------------------------------------------------------------
# Losses (jitted)
# --------------------------------------------------------------------------------------------------


def gather_positions(x_bsd: jax.Array, index_ba: jax.Array) -> jax.Array:
    """``x[b, index[b, a]]``: ``[B, S, ...]`` rows at per-example positions → ``[B, A, ...]``."""
    return jax.vmap(lambda x, i: jnp.take(x, i, axis=0))(x_bsd, index_ba)


def ranked_positions(mask_bs: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """The positions of each row's valid entries in order, ``([B, width] index, [B] count)``."""
    mask_bs = mask_bs.astype(bool)
    s = mask_bs.shape[1]
    pos = jnp.arange(s)
    order = jnp.argsort(jnp.where(mask_bs, pos, s + pos), axis=-1)
    if width > s:
        order = jnp.pad(order, ((0, 0), (0, width - s)))
    return order[:, :width].astype(jnp.int32), jnp.sum(mask_bs, axis=-1)


def aligned_positions(student_mask_bs: jax.Array, teacher_mask_bs: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ULD's alignment: the k-th valid student position with the k-th valid teacher position, for
    ``k < min(n_student, n_teacher)`` (the longer answer is truncated). Returns ``(s_idx, t_idx, mask)``
    of shape ``[B, K]``, ``K = min(S_student, S_teacher)``."""
    width = min(student_mask_bs.shape[1], teacher_mask_bs.shape[1])
    s_idx, s_n = ranked_positions(student_mask_bs, width)
    t_idx, t_n = ranked_positions(teacher_mask_bs, width)
    mask = jnp.arange(width)[None, :] < jnp.minimum(s_n, t_n)[:, None]
    return s_idx, t_idx, mask.astype(jnp.int32)


def uld_loss(student_logits, teacher_logits, student_mask, teacher_mask, *, student_temperature=1.0,
             teacher_temperature=1.0, name: str = "uld"):
    """The Universal Logit Distillation loss over aligned positions.

    At each pair of :func:`aligned_positions`, both probability vectors ``softmax(z / T)`` are sorted in
    decreasing order, the shorter is padded with zeros to the longer vocabulary, and the loss is
    ``Σ_i |p_(i) − q_(i)|`` (the closed form of the Wasserstein-1 distance the paper uses); averaged over
    valid pairs.

    Args:
      student_logits ``[B, Ss, Vs]``, teacher_logits ``[B, St, Vt]``: any vocabularies and lengths.
      student_mask ``[B, Ss]``, teacher_mask ``[B, St]``: the positions to compare (answer tokens).
    """
    _util.check_mask(student_mask, student_logits.shape[:2], "uld")
    _util.check_mask(teacher_mask, teacher_logits.shape[:2], "uld")
    s_idx, t_idx, mask = aligned_positions(student_mask, teacher_mask)
    s = gather_positions(student_logits, s_idx).astype(jnp.float32)
    t = gather_positions(teacher_logits, t_idx).astype(jnp.float32)
    q = jax.nn.softmax(s / student_temperature, axis=-1)
    p = jax.nn.softmax(t / teacher_temperature, axis=-1)
    q = -jnp.sort(-q, axis=-1)
    p = -jnp.sort(-p, axis=-1)
    width = max(p.shape[-1], q.shape[-1])
    q = jnp.pad(q, ((0, 0), (0, 0), (0, width - q.shape[-1])))
    p = jnp.pad(p, ((0, 0), (0, 0), (0, width - p.shape[-1])))
    dist_ba = jnp.sum(jnp.abs(p - q), axis=-1)
    dist_ba = jnp.where(mask == 1, dist_ba, 0.0)
    loss, pair = _util.masked_mean(dist_ba, mask)
    return loss, {name: pair}


def aligned_logit_kl(student_logits, teacher_logits, student_index, teacher_index, mask, pairs: VocabPairs, *,
                     temperature=1.0, name: str = "xtok_kl"):
    """Forward KL ``Σ p log(p / q)`` at aligned positions over the shared vocabulary.

    The teacher's logits of ``pairs.teacher`` and the student's of ``pairs.student`` are each
    renormalized with a softmax at temperature ``T`` (a distribution over the shared tokens in the same
    order), compared with the divergence convention (× T²), and averaged over valid pairs.
    """
    s = gather_positions(student_logits, student_index)
    t = gather_positions(teacher_logits, teacher_index)
    s = jnp.take(s, jnp.asarray(pairs.student), axis=-1)
    t = jnp.take(t, jnp.asarray(pairs.teacher), axis=-1)
    return divergences_lib.divergence(s, t, mask, kind="forward_kl", temperature=temperature, name=name)


def aligned_hidden_mse(student_h, teacher_h, student_index, teacher_index, mask, *, name: str = "xtok_mse"):
    """``MSE(h_S[j] W, h_T[i])`` at aligned pairs (features already projected to the teacher width)."""
    s = gather_positions(student_h, student_index)
    t = gather_positions(teacher_h, teacher_index)
    return features_lib.hidden_mse(s, t, mask, name=name)
