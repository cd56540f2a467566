"""Tests for kdjax.vocab (GLMD vocabulary compression) against independent numpy references."""
import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import vocab
from kdjax.vocab import (
    CompressedTokenizer,
    VocabCompression,
    build_remap,
    count_token_frequencies,
    load_tokenizer,
    select_kept_tokens,
    special_token_ids,
)

from distill_fixtures import MINILM as MINILM_DIR


def _softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _brute_force_remap(kept, emb, rule):
    """Per-id python loop: the nearest kept token by dot product or cosine."""
    emb = np.asarray(emb, np.float64)
    kept = [int(k) for k in kept]
    position = {k: i for i, k in enumerate(kept)}
    out = []
    for v in range(emb.shape[0]):
        if v in position:
            out.append(position[v])
            continue
        scores = []
        for k in kept:
            s = float(emb[v] @ emb[k])
            if rule == "cosine":
                s /= np.linalg.norm(emb[v]) * np.linalg.norm(emb[k])
            scores.append(s)
        out.append(int(np.argmax(scores)))
    return np.asarray(out)


def _random_compression(vocab_size=300, dim=16, num_kept=70, seed=0, rule="dot"):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(vocab_size, dim)).astype(np.float32)
    kept = rng.permutation(vocab_size)[:num_kept].astype(np.int32)
    table = build_remap(kept, emb, rule=rule)
    return VocabCompression(kept_ids=kept, old_to_new=table, original_vocab_size=vocab_size, rule=rule), emb


# ------------------------------------------------------------------------------------------------
# count_token_frequencies
# ------------------------------------------------------------------------------------------------


def test_count_matches_counter_and_skips_ignored_ids():
    rng = np.random.default_rng(1)
    batches = [
        rng.integers(0, 50, size=(4, 9)),  # 2-D array
        rng.integers(0, 50, size=(13,)).tolist(),  # flat list
        [[3, 3, 0, 0], [7, -100, 1]],  # ragged nested list with padding and an ignored label
        np.zeros((0,), np.int32),  # empty batch
    ]
    def leaves(x):
        if isinstance(x, (list, np.ndarray)):
            for item in x:
                yield from leaves(item)
        else:
            yield int(x)

    expected = collections.Counter(i for i in leaves(batches) if i not in (0, -100))
    counts = count_token_frequencies(iter(batches), 50, ignore_ids=(0, -100), progress=True)
    assert counts.dtype == np.int64 and counts.shape == (50,)
    assert counts[0] == 0
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def test_count_rejects_out_of_range_id_with_message():
    with pytest.raises(ValueError, match=r"token id 50 .*\[0, 50\)"):
        count_token_frequencies([[1, 2, 50]], 50)
    with pytest.raises(ValueError, match=r"token id -100"):
        count_token_frequencies([np.array([1, -100])], 50)
    with pytest.raises(ValueError, match="integers"):
        count_token_frequencies([np.array([1.0, 2.0])], 50)


# ------------------------------------------------------------------------------------------------
# select_kept_tokens
# ------------------------------------------------------------------------------------------------


def test_select_small_hand_example():
    # V=10, rate 0.5, multiple 4 -> K = ceil(5 / 4) * 4 = 8.
    freq = np.array([0, 5, 5, 1, 9, 0, 3, 3, 2, 7])
    kept = select_kept_tokens(freq, rate=0.5, special_ids=[0], required_ids=[5], multiple=4)
    # special 0, required 5, then by count: 4(9) 9(7) 1(5) 2(5) 6(3) 7(3); ties -> lower id first.
    np.testing.assert_array_equal(kept, [0, 5, 4, 9, 1, 2, 6, 7])
    assert kept.dtype == np.int32


def test_select_order_and_membership_against_sorted_reference():
    vocab_size = 1000
    freq = (np.arange(vocab_size) * 7919) % 613  # many ties
    specials = [0, 103, 100, 101, 102]
    required = [999, 500, 101, 500]  # 101 already special, 500 duplicated
    kept = select_kept_tokens(freq, rate=0.3, special_ids=specials, required_ids=required, multiple=128)
    assert kept.shape == (384,)  # ceil(300 / 128) * 128
    forced = [0, 103, 100, 101, 102, 999, 500]
    rest = sorted((i for i in range(vocab_size) if i not in forced), key=lambda i: (-freq[i], i))
    np.testing.assert_array_equal(kept, forced + rest[: 384 - len(forced)])
    assert len(set(kept.tolist())) == 384


def test_select_rate_one_and_cap_at_vocab():
    freq = np.arange(1000)[::-1]
    kept = select_kept_tokens(freq, rate=1.0, special_ids=[5])
    assert kept.shape == (1000,) and sorted(kept.tolist()) == list(range(1000))  # 1024 capped to V
    kept = select_kept_tokens(np.ones(200), rate=0.9, special_ids=[])
    assert kept.shape == (200,)  # ceil(180 / 128) * 128 = 256 > V
    assert vocab.kept_vocab_size(30522, 0.5) == 15360  # GLMD's BERT setting: 15261 -> 15360


def test_select_errors():
    freq = np.ones(1000)
    for bad_rate in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
            select_kept_tokens(freq, rate=bad_rate, special_ids=[0])
    with pytest.raises(ValueError, match=r"200 special \+ 0 required .* 128 .*rate of at least 0\.2"):
        select_kept_tokens(freq, rate=0.01, special_ids=range(200))
    with pytest.raises(ValueError, match="special id 1000 is outside"):
        select_kept_tokens(freq, rate=0.5, special_ids=[1000])


# ------------------------------------------------------------------------------------------------
# build_remap
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["dot", "cosine"])
def test_remap_matches_brute_force(rule, monkeypatch):
    # Small row batches and tiny score blocks exercise both loops of the batched search.
    monkeypatch.setattr(vocab, "_MAX_SCORE_BLOCK_ELEMENTS", 7 * 9)
    rng = np.random.default_rng(2)
    emb = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 5.0, size=(300, 1))).astype(np.float32)
    kept = rng.permutation(300)[:70]
    table = build_remap(kept, emb, rule=rule, batch_size=7)
    assert table.dtype == np.int32 and table.shape == (300,)
    np.testing.assert_array_equal(table, _brute_force_remap(kept, emb, rule))
    np.testing.assert_array_equal(table[kept], np.arange(70))  # kept ids map to their positions


def test_remap_rules_differ_where_norms_matter():
    emb = np.array([[1.0, 0.0], [10.0, 10.0], [1.0, 0.01]], np.float32)
    kept = [0, 1]
    assert build_remap(kept, emb, rule="dot")[2] == 1  # 10.1 > 1.0
    assert build_remap(kept, emb, rule="cosine")[2] == 0  # ~1.0 > ~0.71
    # jax / bf16 input is accepted and gives the same answer.
    assert build_remap(kept, jnp.asarray(emb, jnp.bfloat16), rule="dot")[2] == 1


def test_remap_unk_rule_and_errors():
    emb = np.random.default_rng(3).normal(size=(20, 4))
    kept = np.array([4, 1, 7])
    table = build_remap(kept, emb, rule="unk", unk_id=1)
    expected = np.full(20, 1)
    expected[[4, 1, 7]] = [0, 1, 2]
    np.testing.assert_array_equal(table, expected)
    with pytest.raises(ValueError, match="unk_id 3 is not among the kept ids"):
        build_remap(kept, emb, rule="unk", unk_id=3)
    with pytest.raises(ValueError, match="needs unk_id"):
        build_remap(kept, emb, rule="unk")
    with pytest.raises(ValueError, match="rule must be one of"):
        build_remap(kept, emb, rule="l2")
    with pytest.raises(ValueError, match="duplicates"):
        build_remap([1, 1], emb)
    bad = emb.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_remap(kept, bad)


# ------------------------------------------------------------------------------------------------
# VocabCompression transforms
# ------------------------------------------------------------------------------------------------


def test_sliced_teacher_logits_give_renormalized_distribution():
    comp, _ = _random_compression()
    logits = np.random.default_rng(4).normal(size=(2, 5, 300)) * 3.0
    p_full = _softmax(logits)
    p_kept = p_full[..., comp.kept_ids]
    expected = p_kept / p_kept.sum(-1, keepdims=True)

    got = _softmax(comp.slice_teacher_logits(logits))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)

    jitted = jax.jit(lambda z: jax.nn.softmax(comp.slice_teacher_logits(z), axis=-1))
    got_jax = jitted(jnp.asarray(logits, jnp.float32))
    assert got_jax.shape == (2, 5, comp.size)
    np.testing.assert_allclose(np.asarray(got_jax), expected, rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="must end in the teacher vocabulary"):
        comp.slice_teacher_logits(np.zeros((2, 299)))


def test_remap_ids_inputs_and_labels_numpy_and_jit():
    comp, _ = _random_compression()
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 300, size=(4, 11)).astype(np.int32)
    labels = ids.copy()
    labels[:, :3] = -100

    new_ids = comp.remap_ids(ids)
    np.testing.assert_array_equal(new_ids, [[comp.old_to_new[i] for i in row] for row in ids])
    assert new_ids.dtype == np.int32 and new_ids.max() < comp.size and new_ids.min() >= 0

    new_labels = comp.remap_ids(labels)
    assert (new_labels[:, :3] == -100).all()
    np.testing.assert_array_equal(new_labels[:, 3:], new_ids[:, 3:])
    # A kept label comes back as the teacher id after new -> old.
    kept_mask = np.isin(ids, comp.kept_ids)
    np.testing.assert_array_equal(comp.kept_ids[new_ids][kept_mask], ids[kept_mask])

    jit_labels = jax.jit(comp.remap_ids)(jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(jit_labels), new_labels)
    assert jit_labels.dtype == jnp.int32

    # A different ignore index, and no ignore index at all.
    pad_labels = np.where(labels == -100, -1, labels)
    np.testing.assert_array_equal(comp.remap_ids(pad_labels, ignore_index=-1)[:, :3], -1)
    with pytest.raises(ValueError, match=r"id -100 is outside the teacher vocabulary"):
        comp.remap_ids(labels, ignore_index=None)
    with pytest.raises(ValueError, match=r"id 300 is outside"):
        comp.remap_ids(np.array([300]))


def test_compress_rows_numpy_and_jax():
    comp, emb = _random_compression()
    np.testing.assert_array_equal(comp.compress_rows(emb), emb[comp.kept_ids])
    head = jnp.asarray(emb)
    out = jax.jit(comp.compress_rows)(head)
    np.testing.assert_array_equal(np.asarray(out), emb[comp.kept_ids])
    with pytest.raises(ValueError, match="transpose a \\[D, V\\] LM head"):
        comp.compress_rows(emb.T)


def test_build_classmethod_and_invariants():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(500, 8))
    freq = rng.integers(0, 100, size=500)
    comp = VocabCompression.build(freq, emb, rate=0.5, special_ids=[0, 1], required_ids=[499], multiple=64)
    assert comp.size == 256 and comp.original_vocab_size == 500
    np.testing.assert_array_equal(comp.kept_ids[:3], [0, 1, 499])
    np.testing.assert_array_equal(comp.old_to_new, _brute_force_remap(comp.kept_ids, emb, "dot"))
    with pytest.raises(ValueError, match="disagree on V"):
        VocabCompression.build(freq[:400], emb, special_ids=[0])
    with pytest.raises(ValueError, match="must send kept_ids"):
        VocabCompression(kept_ids=np.array([2, 0]), old_to_new=np.array([0, 0, 1]), original_vocab_size=3)


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    comp, _ = _random_compression(rule="cosine")
    comp = dataclasses.replace(comp, rate=0.25)
    path = comp.save(tmp_path / "c")
    assert os.path.basename(path) == "vocab_compression.json"
    loaded = VocabCompression.load(tmp_path / "c")
    assert loaded == comp
    assert loaded.rule == "cosine" and loaded.rate == 0.25 and loaded.size == 70
    assert VocabCompression.load(path) == comp  # the file itself works too


@pytest.mark.parametrize(
    "content",
    ["not json at all", json.dumps({"kept_ids": [0]}), json.dumps([1, 2, 3])],
)
def test_load_rejects_a_file_that_is_not_a_compression(tmp_path, content):
    (tmp_path / "vocab_compression.json").write_text(content)
    with pytest.raises(ValueError, match="is not a vocabulary compression file") as info:
        VocabCompression.load(tmp_path)
    assert "\n" not in str(info.value)


def test_load_rejects_inconsistent_arrays(tmp_path):
    comp, _ = _random_compression()
    path = comp.save(tmp_path)
    payload = json.loads(open(path).read())
    payload["old_to_new"][int(comp.kept_ids[0])] = 5
    open(path, "w").write(json.dumps(payload))
    with pytest.raises(ValueError, match="corrupt vocabulary compression file") as info:
        VocabCompression.load(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        VocabCompression.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------
# CompressedTokenizer on the real MiniLM tokenizer
# ------------------------------------------------------------------------------------------------

SENTENCES = [
    "The cat sat on the mat.",
    "A dog ran across the park in the morning.",
    "She reads a book every night before sleep.",
    "The weather today is sunny and warm.",
    "We walked to the store to buy some bread.",
    "He plays the guitar with his friends.",
    "The children laughed at the funny clown.",
    "My brother lives in a small house near the river.",
    "They watched a movie about space travel.",
    "The teacher asked the students a difficult question.",
    "Rain fell softly on the roof all evening.",
    "I drink coffee with milk in the morning.",
    "The train arrived late at the station.",
    "Birds sing loudly in the green trees.",
    "She painted the wall a bright blue color.",
    "The old man told a long story about the war.",
    "We cooked dinner together on Sunday.",
    "The city lights shine brightly at night.",
    "He forgot his keys at the office.",
    "The museum opens at nine in the morning.",
    "A small boat sailed across the quiet lake.",
    "The phone rang while she was cooking.",
    "Students study hard before the final exam.",
    "The garden is full of red and yellow flowers.",
    "He runs five miles every day to stay healthy.",
    "The baby slept through the whole night.",
    "We visited our grandmother in the summer.",
    "The computer stopped working after the update.",
    "She wrote a letter to her best friend.",
    "The sun sets slowly behind the mountains.",
]


@pytest.fixture(scope="module")
def minilm():
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    emb = load_file(os.path.join(MINILM_DIR, "model.safetensors"))["embeddings.word_embeddings.weight"]
    ids = tokenizer(SENTENCES)["input_ids"]  # ragged python lists
    freq = count_token_frequencies([ids], emb.shape[0], ignore_ids=[tokenizer.pad_token_id])
    specials = special_token_ids(tokenizer)
    comp = VocabCompression.build(freq, emb, rate=0.01, special_ids=specials, unk_id=tokenizer.unk_token_id)
    return tokenizer, emb, comp, freq


def test_special_token_ids(minilm):
    tokenizer, *_ = minilm
    assert special_token_ids(tokenizer) == [0, 100, 101, 102, 103]


def test_compressed_tokenizer_ids_and_decode(minilm):
    tokenizer, _, comp, freq = minilm
    assert comp.size == 384  # ceil(305.22 / 128) * 128
    used = np.flatnonzero(freq)
    assert used.size + 5 <= comp.size  # every corpus token fits, so every corpus token is kept
    assert np.isin(used, comp.kept_ids).all()

    ct = CompressedTokenizer(tokenizer, comp)
    enc = ct(SENTENCES, padding=True)
    plain = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids = enc["input_ids"]
    assert isinstance(ids, np.ndarray) and ids.shape == plain["input_ids"].shape
    assert ids.min() >= 0 and ids.max() < comp.size
    np.testing.assert_array_equal(ids, comp.old_to_new[plain["input_ids"]])
    np.testing.assert_array_equal(enc["attention_mask"], plain["attention_mask"])
    assert (ids[plain["attention_mask"] == 0] == ct.pad_token_id).all()
    assert len(ct) == ct.vocab_size == 384

    for row, plain_row in zip(ids, plain["input_ids"]):
        expected = tokenizer.decode(plain_row, skip_special_tokens=True)
        assert ct.decode(row, skip_special_tokens=True) == expected
    cat_ids = ct("the cat sat on the mat")["input_ids"][0]
    assert ct.decode(cat_ids, skip_special_tokens=True) == "the cat sat on the mat"
    second = ct.batch_decode(ids[:2], skip_special_tokens=True)[1]
    assert second == "a dog ran across the park in the morning."

    with pytest.raises(ValueError, match="returns numpy arrays"):
        ct(SENTENCES, return_tensors="pt")
    with pytest.raises(ValueError, match=r"student ids must be integers in \[0, 384\)"):
        ct.decode([384])


def test_compressed_tokenizer_maps_unseen_words_to_nearest_kept(minilm):
    tokenizer, emb, comp, _ = minilm
    ct = CompressedTokenizer(tokenizer, comp)
    text = "xylophone quantum"
    original = tokenizer(text)["input_ids"][1:-1]
    dropped = [i for i in original if i not in set(comp.kept_ids.tolist())]
    assert dropped, "the test words must not occur in the corpus"
    got = ct(text)["input_ids"][0][1:-1]
    scores = emb[dropped].astype(np.float64) @ emb[comp.kept_ids].astype(np.float64).T
    expected = dict(zip(dropped, scores.argmax(-1)))
    for old, new in zip(original, got):
        if old in expected:
            assert new == expected[old]


def test_compressed_tokenizer_save_load(minilm, tmp_path):
    tokenizer, _, comp, _ = minilm
    ct = CompressedTokenizer(tokenizer, comp)
    ct.save_pretrained(tmp_path / "student_tok")
    assert (tmp_path / "student_tok" / "vocab_compression.json").is_file()

    loaded = CompressedTokenizer.from_pretrained(tmp_path / "student_tok")
    assert loaded.compression == comp
    np.testing.assert_array_equal(
        loaded(SENTENCES, padding=True)["input_ids"], ct(SENTENCES, padding=True)["input_ids"]
    )
    auto = load_tokenizer(tmp_path / "student_tok")
    assert isinstance(auto, CompressedTokenizer) and auto.compression == comp
    plain = load_tokenizer(MINILM_DIR)
    assert not isinstance(plain, CompressedTokenizer) and len(plain) == 30522
