"""Cross-tokenizer distillation: padded heads, tokenizer mismatch, ULD, offset alignment.

Two small tokenizers are trained here on the embedded corpus (a lower-cased WordPiece and a byte-level
BPE); every loss is compared with a float64 NumPy computation of its formula written in this file.
"""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kdjax
from kdjax import vocab as vocab_lib
from kdjax.distill import Distillation, metric_values
from kdjax.knowledge import cross_tokenizer as xtok
from kdjax.models.config import ConfigError
from kdjax.models.transformer import forward

CORPUS = os.path.join(os.path.dirname(kdjax.__file__), "data", "embedded", "corpus")


def _sentences(n=300):
    lines = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            lines += [ln.strip() for ln in f if ln.strip()]
        if len(lines) >= n:
            break
    return lines[:n]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    text = _sentences()
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]"]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for name, tok, pad, unk in (("wordpiece", wp, "[PAD]", "[UNK]"), ("bpe", bpe, "<pad>", None)):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk)
        fast.save_pretrained(str(root / name))
        out[name] = fast
        out[name + "_dir"] = str(root / name)
    return out


# --------------------------------------------------------------------------------------------------
# NumPy references
# --------------------------------------------------------------------------------------------------


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _uld_reference(s_logits, t_logits, s_mask, t_mask, ts=1.0, tt=1.0):
    total, count = 0.0, 0
    for b in range(s_logits.shape[0]):
        s_pos = np.flatnonzero(s_mask[b])
        t_pos = np.flatnonzero(t_mask[b])
        for k in range(min(len(s_pos), len(t_pos))):
            q = np.sort(_softmax(s_logits[b, s_pos[k]] / ts))[::-1]
            p = np.sort(_softmax(t_logits[b, t_pos[k]] / tt))[::-1]
            v = max(len(p), len(q))
            q = np.concatenate([q, np.zeros(v - len(q))])
            p = np.concatenate([p, np.zeros(v - len(p))])
            total += np.abs(p - q).sum()
            count += 1
    return total / max(count, 1), count


def _end_pairs(t_offsets, s_offsets):
    """Reference alignment: positions (non-empty spans) whose end characters are equal."""
    t_ends = {e: i for i, (a, e) in enumerate(t_offsets) if e > a}
    s_ends = {e: j for j, (a, e) in enumerate(s_offsets) if e > a}
    return [(t_ends[e], s_ends[e]) for e in sorted(set(t_ends) & set(s_ends))]


# --------------------------------------------------------------------------------------------------
# Padding-only mismatch and real tokenizer mismatch
# --------------------------------------------------------------------------------------------------


def test_align_vocabularies_padding_and_mismatch(tokenizers):
    wp, bpe = tokenizers["wordpiece"], tokenizers["bpe"]
    n = len(wp)
    fn = vocab_lib.align_vocabularies(n + 56, n + 8, wp, wp)
    assert fn == vocab_lib.LogitSlice(n + 8)
    z = np.arange(2 * (n + 56)).reshape(2, n + 56)
    np.testing.assert_array_equal(fn(z), z[:, : n + 8])
    assert vocab_lib.align_vocabularies(n, n, wp, wp) is None
    with pytest.raises(ValueError, match="tokenizer.*differ.*cross-tokenizer method"):
        vocab_lib.align_vocabularies(len(wp), len(bpe), wp, bpe)
    assert vocab_lib.align_vocabularies(len(wp), len(bpe), wp, bpe, cross_tokenizer=True) is None
    # Not a padding difference (student wider than the teacher, or narrower than the tokenizer): no slice,
    # so the term check refuses logit terms over different widths.
    assert vocab_lib.align_vocabularies(n + 8, n + 56, wp, wp) is None
    assert vocab_lib.align_vocabularies(n + 56, n - 1, wp, wp) is None
    assert vocab_lib.align_vocabularies(n + 56, n + 8, wp, None) is None


def _causal(vocab, hidden=32, layers=1, seed=0, tokenizer=None):
    cfg = kdjax.preset("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=2,
                       intermediate_size=2 * hidden, head="causal_lm", max_position_embeddings=64)
    return kdjax.Model.init(cfg, seed=seed, tokenizer=tokenizer)


def _config(method, **args):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=1)
    c.method = method
    c.method_args = {method: args} if args else {}
    c.train = dict(steps=4, learning_rate=1e-3, warmup_steps=1, seed=0)
    return c


def _text_batch(tok, length=16, rows=2):
    texts = _sentences(40)[10: 10 + rows]
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    labels = np.where(enc["attention_mask"] == 1, enc["input_ids"], -100)
    labels[:, :3] = -100  # a prompt: the first three tokens are not part of the answer
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "labels": labels.astype(np.int32)}


def test_padded_teacher_head_is_sliced_and_real_mismatch_refused(tokenizers, caplog):
    wp, bpe = tokenizers["wordpiece"], tokenizers["bpe"]
    teacher = _causal(len(wp) + 20, tokenizer=wp)
    student = _causal(len(wp) + 4, seed=1, tokenizer=wp)
    with caplog.at_level(logging.INFO, logger="kdjax"):
        run = Distillation(_config("kd", temperature=2.0), teachers={"teacher": (teacher, 1.0)}, student=student)
    assert run.vocab_map == vocab_lib.LogitSlice(len(wp) + 4)
    assert [r.message for r in caplog.records if "logits sliced" in r.message] == [
        f"teacher 'teacher': logits sliced from {len(wp) + 20} to {len(wp) + 4} rows (padded head, same "
        f"{len(wp)}-token tokenizer)"]
    # The KD term compares the student with the teacher's first V_s logits, renormalized.
    batch = _text_batch(wp)
    state = run.init_state(0)
    metrics, _ = run.evaluate_batch(state, batch, 0)
    feed = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    t = np.asarray(forward(teacher.graphdef, teacher.params, feed)[0].logits, np.float64)[..., : len(wp) + 4] / 2.0
    s = np.asarray(forward(student.graphdef, student.params, feed)[0].logits, np.float64) / 2.0
    p, q = _softmax(t), _softmax(s)
    kl = (p * (np.log(p) - np.log(q))).sum(-1) * 4.0
    values = metric_values(metrics)
    np.testing.assert_allclose(values["kd/forward_kl"], kl[batch["attention_mask"] == 1].mean(), rtol=1e-4, atol=1e-6)

    other = _causal(len(bpe), seed=2, tokenizer=bpe)
    with pytest.raises(ConfigError, match="teacher 'teacher': the teacher's tokenizer .* differ"):
        Distillation(_config("kd"), teachers={"teacher": (teacher, 1.0)}, student=other)


# --------------------------------------------------------------------------------------------------
# ULD
# --------------------------------------------------------------------------------------------------


def test_uld_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    s_logits = rng.normal(size=(3, 7, 11)) * 2
    t_logits = rng.normal(size=(3, 9, 17)) * 2
    s_mask = (rng.random((3, 7)) < 0.7).astype(np.int32)
    t_mask = (rng.random((3, 9)) < 0.6).astype(np.int32)
    t_mask[2] = 0  # an example without teacher positions contributes nothing
    loss, metrics = xtok.uld_loss(jnp.asarray(s_logits, jnp.float32), jnp.asarray(t_logits, jnp.float32),
                                  jnp.asarray(s_mask), jnp.asarray(t_mask), student_temperature=1.5,
                                  teacher_temperature=0.7)
    expected, count = _uld_reference(s_logits, t_logits, s_mask, t_mask, 1.5, 0.7)
    assert count > 5
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(metrics["uld"][1]) == count
    grad = jax.grad(lambda s: xtok.uld_loss(s, jnp.asarray(t_logits, jnp.float32), jnp.asarray(s_mask),
                                            jnp.asarray(t_mask))[0])(jnp.asarray(s_logits, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    # Positions outside the student mask get no gradient.
    assert np.abs(np.asarray(grad)[s_mask == 0]).max() == 0


# --------------------------------------------------------------------------------------------------
# Offset alignment
# --------------------------------------------------------------------------------------------------


def test_align_offsets_exact_and_merged_spans():
    # "unhappy cats": teacher un|happy| cats, student unhappy| c|ats, plus a special token (0, 0).
    teacher = [(0, 0), (0, 2), (2, 7), (7, 12)]
    student = [(0, 7), (7, 9), (9, 12)]
    t_idx, s_idx, exact = xtok.align_offsets(teacher, student)
    assert t_idx.tolist() == [2, 3] and s_idx.tolist() == [0, 2]
    assert exact.tolist() == [False, False]
    t_idx, s_idx, exact = xtok.align_offsets([(0, 3), (3, 5)], [(0, 3), (3, 4), (4, 5)])
    assert t_idx.tolist() == [0, 1] and s_idx.tolist() == [0, 2] and exact.tolist() == [True, False]


def test_retokenize_alignment_and_matched_vocabulary(tokenizers):
    wp, bpe = tokenizers["wordpiece"], tokenizers["bpe"]
    batch = _text_batch(bpe, length=16)
    out = xtok.retokenize(batch, bpe, wp, student_length=14)
    assert out["student_input_ids"].shape == (2, 14) and out["xtok_mask"].shape == (2, 14)
    for r in range(2):
        valid = batch["attention_mask"][r] == 1
        prompt = bpe.decode(batch["input_ids"][r][valid][:3].tolist(), skip_special_tokens=True)
        text = prompt + bpe.decode(batch["input_ids"][r][valid][3:].tolist(), skip_special_tokens=True)
        t_enc = bpe(text, return_offsets_mapping=True, truncation=True, max_length=16)
        s_enc = wp(text, return_offsets_mapping=True, truncation=True, max_length=14)
        assert out["student_input_ids"][r][: len(s_enc["input_ids"])].tolist() == s_enc["input_ids"]
        want = [(a, c) for a, c in _end_pairs(t_enc["offset_mapping"], s_enc["offset_mapping"])
                if a + 1 < len(t_enc["input_ids"]) and c + 1 < len(s_enc["input_ids"])
                and t_enc["offset_mapping"][a][1] >= len(prompt)]
        n = int(out["xtok_mask"][r].sum())
        assert n == len(want) > 2
        got = list(zip(out["xtok_teacher_index"][r][:n].tolist(), out["xtok_student_index"][r][:n].tolist()))
        assert got == want
        # Labels: student tokens that start in the answer.
        s_lab = [tid if o[0] >= len(prompt) and o[1] > o[0] else -100
                 for tid, o in zip(s_enc["input_ids"], s_enc["offset_mapping"])]
        assert out["student_labels"][r][: len(s_lab)].tolist() == s_lab

    pairs = xtok.matched_vocabulary(bpe, wp)
    # Reference: the byte-level token's decoded text equals the WordPiece token's text ("##" = no space).
    assert len(pairs) > 50
    for t_id, s_id in zip(pairs.teacher[:200], pairs.student[:200]):
        s_tok = wp.convert_ids_to_tokens(int(s_id))
        s_text = s_tok[2:] if s_tok.startswith("##") else " " + s_tok
        assert bpe.decode([int(t_id)]) == s_text


def test_aligned_logit_kl_and_hidden_mse_match_numpy():
    rng = np.random.default_rng(1)
    s_logits, t_logits = rng.normal(size=(2, 6, 13)), rng.normal(size=(2, 8, 19))
    s_idx = np.array([[0, 2, 5, 0], [1, 3, 0, 0]], np.int32)
    t_idx = np.array([[1, 4, 7, 0], [0, 6, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
    pairs = xtok.VocabPairs(np.array([3, 0, 18, 7, 9]), np.array([12, 1, 4, 0, 6]))
    loss, _ = xtok.aligned_logit_kl(jnp.asarray(s_logits, jnp.float32), jnp.asarray(t_logits, jnp.float32),
                                    jnp.asarray(s_idx), jnp.asarray(t_idx), jnp.asarray(mask), pairs, temperature=2.0)
    vals = []
    for b in range(2):
        for a in range(4):
            if mask[b, a]:
                p = _softmax(t_logits[b, t_idx[b, a], pairs.teacher] / 2.0)
                q = _softmax(s_logits[b, s_idx[b, a], pairs.student] / 2.0)
                vals.append(4.0 * (p * np.log(p / q)).sum())
    np.testing.assert_allclose(float(loss), np.mean(vals), rtol=1e-5)
    s_h, t_h = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 8, 4))
    loss, _ = xtok.aligned_hidden_mse(jnp.asarray(s_h, jnp.float32), jnp.asarray(t_h, jnp.float32),
                                      jnp.asarray(s_idx), jnp.asarray(t_idx), jnp.asarray(mask))
    ref = np.mean([np.mean((s_h[b, s_idx[b, a]] - t_h[b, t_idx[b, a]]) ** 2)
                   for b in range(2) for a in range(4) if mask[b, a]])
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert hash(pairs) == hash(xtok.VocabPairs(pairs.teacher.copy(), pairs.student.copy()))


def test_cross_tokenizer_recipes_train_step(tokenizers):
    """ULD and xtok_align across a byte-level BPE teacher and a WordPiece student: the step's term values
    equal the NumPy formulas on the models' logits at the hook's positions."""
    wp, bpe = tokenizers["wordpiece"], tokenizers["bpe"]
    teacher = _causal(len(bpe), hidden=32, tokenizer=bpe)
    student = _causal(len(wp), hidden=16, seed=3, tokenizer=wp)
    batch = _text_batch(bpe)
    cfg = _config("uld+xtok_align")
    cfg.method_args = {"xtok_align": dict(teacher_tokenizer=tokenizers["bpe_dir"],
                                          student_tokenizer=tokenizers["wordpiece_dir"])}
    run = Distillation(cfg, teachers={"teacher": (teacher, 1.0)}, student=student)
    assert run.vocab_map is None
    state = run.init_state(0)
    hooked = run.method.stages[0].data_hook(run, state, batch, None, stage=0, step=0)
    evaluated = metric_values(run.evaluate_batch(state, batch, 0)[0])  # the hook re-encodes for evaluation too
    _, metrics = run.train_step(state, batch, 0)
    values = metric_values(metrics)
    for name in ("term/uld/uld", "term/xtok_align/xtok_logits", "term/xtok_align/xtok_hidden"):
        np.testing.assert_allclose(evaluated[name], values[name], rtol=1e-5)
    t_feed = {"input_ids": jnp.asarray(hooked["input_ids"]), "attention_mask": jnp.asarray(hooked["attention_mask"])}
    s_feed = {"input_ids": jnp.asarray(hooked["student_input_ids"]),
              "attention_mask": jnp.asarray(hooked["student_attention_mask"])}
    t = np.asarray(forward(teacher.graphdef, teacher.params, t_feed)[0].logits, np.float64)
    s = np.asarray(forward(student.graphdef, student.params, s_feed)[0].logits, np.float64)

    def answer_mask(labels):  # logits at i predict label i + 1
        m = (labels != -100).astype(np.int32)
        return np.pad(m[:, 1:], ((0, 0), (0, 1)))

    uld_ref, count = _uld_reference(s, t, answer_mask(hooked["student_labels"]), answer_mask(hooked["labels"]))
    assert count > 10
    np.testing.assert_allclose(values["term/uld/uld"], uld_ref, rtol=1e-4)
    pairs = xtok.matched_vocabulary(bpe, wp)
    kls = []
    for b in range(2):
        for a in np.flatnonzero(hooked["xtok_mask"][b]):
            p = _softmax(t[b, hooked["xtok_teacher_index"][b, a], pairs.teacher])
            q = _softmax(s[b, hooked["xtok_student_index"][b, a], pairs.student])
            kls.append((p * np.log(p / q)).sum())
    np.testing.assert_allclose(values["term/xtok_align/xtok_logits"], np.mean(kls), rtol=1e-4)
    assert np.isfinite(values["term/xtok_align/xtok_hidden"])


def test_config_tokenizer_paths_replace_the_checkpoints(tokenizers, tmp_path):
    """`student.tokenizer` / `teacher.tokenizer` name the tokenizers a run compares (no compile here)."""
    wp = tokenizers["wordpiece"]
    teacher = _causal(len(wp), tokenizer=wp)
    student = _causal(len(wp), seed=1, tokenizer=wp)
    config = _config("kd")
    config.student.tokenizer = tokenizers["bpe_dir"]
    with pytest.raises(ConfigError, match="teacher 'teacher': the teacher's tokenizer .* differ"):
        Distillation(config, teachers={"teacher": (teacher, 1.0)}, student=student)
    config.teacher.tokenizer = tokenizers["bpe_dir"]  # both BPE now: the same tokenizer, nothing to align
    run = Distillation(config, teachers={"teacher": (teacher, 1.0)}, student=student)
    assert run.vocab_map is None and len(run.tokenizers["teacher"]) == len(tokenizers["bpe"])
    config.student.tokenizer = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot load the tokenizer at .*missing"):
        Distillation(config, teachers={"teacher": (teacher, 1.0)}, student=student)
