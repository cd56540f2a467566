"""Embedded data sets: deterministic splits, tfds ArrayRecord preparation without TF, read-back."""

import json
import math
import shutil

import pytest
import tensorflow_datasets as tfds

from kdjax.data import embedded
from kdjax.data.embedded import builders

LABELS = embedded.REVIEW_LABELS


def _write_source(root, n_corpus=(130, 95), n_reviews=(37, 44, 29)):
    """Synthetic corpus/ and task/ folders with blank lines and a duplicate to exercise dedupe."""
    (root / "corpus").mkdir(parents=True)
    (root / "task").mkdir()
    for t, n in enumerate(n_corpus):
        lines = [f"Topic {t} sentence number {i}." for i in range(n)]
        lines.insert(3, "")
        lines.append("A sentence that appears in two topics.")
        (root / "corpus" / f"topic{t}.txt").write_text("\n".join(lines) + "\n")
    rows = []
    for c, n in enumerate(n_reviews):
        rows += [{"text": f"Review {c}-{i} of class {LABELS[c]}.", "label": LABELS[c]} for i in range(n)]
    half = len(rows) // 2
    (root / "task" / "alpha.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:half]) + "\n\n")
    (root / "task" / "beta.jsonl").write_text("\n".join(json.dumps(r) for r in rows[half:]) + "\n")
    return root


def _unique_lines(paths, parse=lambda s: s):
    seen = []
    for p in sorted(paths):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = parse(line)
                if item not in seen:
                    seen.append(item)
    return seen


@pytest.fixture
def source_dir(tmp_path):
    return _write_source(tmp_path / "src")


def test_corpus_splits_deterministic_disjoint_and_complete(source_dir):
    expected = set(_unique_lines((source_dir / "corpus").glob("*.txt"), str.strip))
    train, val = embedded.corpus_sentences("train", source_dir), embedded.corpus_sentences("validation", source_dir)
    assert len(expected) == 130 + 95 + 1  # the shared sentence counts once
    assert set(train) | set(val) == expected
    assert not set(train) & set(val)
    assert len(val) == min(max(math.ceil(0.05 * len(expected)), 200), len(expected) // 2)
    assert embedded.corpus_sentences("validation", source_dir) == val  # same order every call


def test_review_splits_stratified_80_10_10(source_dir):
    splits = {s: embedded.review_examples(s, source_dir) for s in ("train", "validation", "test")}
    all_texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(all_texts) == len(set(all_texts)) == 37 + 44 + 29
    for c, n in enumerate((37, 44, 29)):
        count = {s: sum(r["label"] == LABELS[c] for r in rows) for s, rows in splits.items()}
        assert count["validation"] == round(0.1 * n) and count["test"] == round(0.1 * n)
        assert count["train"] == n - 2 * round(0.1 * n)
    assert {r["domain"] for r in splits["train"]} == {"alpha", "beta"}


def test_builders_prepare_offline_and_match_plain_lists(source_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    for split in ("train", "validation", "test"):
        src = embedded.load_split("kdjax_reviews", split, data_dir=data_dir, source_dir=source_dir)
        rows = embedded.review_examples(split, source_dir)
        assert len(src) == len(rows)
        for i in (0, len(rows) // 2, len(rows) - 1):
            assert src[i]["text"].decode() == rows[i]["text"]
            assert LABELS[src[i]["label"]] == rows[i]["label"]
            assert src[i]["domain"].decode() == rows[i]["domain"]
    for split in ("train", "validation"):
        src = embedded.load_split("kdjax_corpus", split, data_dir=data_dir, source_dir=source_dir)
        assert [src[i]["text"].decode() for i in range(len(src))] == embedded.corpus_sentences(split, source_dir)
    # Stored on disk as ArrayRecord, readable through the ordinary tfds entry point.
    assert list((data_dir / "kdjax_corpus" / "1.0.0").glob("*.array_record-*"))
    via_tfds = tfds.data_source("kdjax_corpus", split="validation", data_dir=str(data_dir))
    assert len(via_tfds) == len(embedded.corpus_sentences("validation", source_dir))
    info = builders.get_builder("kdjax_reviews", data_dir, source_dir).info
    assert info.features["label"].names == list(LABELS) and str(info.version) == "1.0.0"


def test_changed_source_files_trigger_rebuild(source_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    before = len(embedded.load_split("kdjax_corpus", "train", data_dir=data_dir, source_dir=source_dir))
    with open(source_dir / "corpus" / "topic0.txt", "a") as f:
        f.write("".join(f"An appended sentence {i}.\n" for i in range(40)))
    after = embedded.load_split("kdjax_corpus", "train", data_dir=data_dir, source_dir=source_dir)
    val = embedded.corpus_sentences("validation", source_dir)
    assert len(after) + len(val) == 130 + 95 + 1 + 40
    assert len(after) != before


def test_package_files_build_with_counts_matching_the_files(tmp_path):
    pkg = embedded.default_source_dir()
    if not list((pkg / "corpus").glob("*.txt")) or not list((pkg / "task").glob("*.jsonl")):
        pytest.skip("package data files not present yet")
    snap = tmp_path / "snap"  # other writers may append to the package files while this runs
    shutil.copytree(pkg / "corpus", snap / "corpus")
    shutil.copytree(pkg / "task", snap / "task")
    sentences = _unique_lines((snap / "corpus").glob("*.txt"), str.strip)
    reviews = _unique_lines((snap / "task").glob("*.jsonl"), lambda s: json.loads(s)["text"].strip())
    data_dir = tmp_path / "tfds"
    corpus = {s: embedded.load_split("kdjax_corpus", s, data_dir, snap) for s in ("train", "validation")}
    assert sum(len(v) for v in corpus.values()) == len(sentences)
    assert len(corpus["validation"]) >= min(200, len(sentences) // 2)
    task = {s: embedded.load_split("kdjax_reviews", s, data_dir, snap) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in task.values()) == len(reviews)
    labels = {task["train"][i]["label"] for i in range(len(task["train"]))}
    assert labels <= {0, 1, 2}


def test_bad_inputs_give_one_line_errors(tmp_path, source_dir):
    with pytest.raises(embedded.EmbeddedDataError, match="no corpus/\\*.txt files"):
        embedded.corpus_sentences("train", tmp_path / "nowhere")
    (source_dir / "task" / "alpha.jsonl").write_text('{"text": "ok", "label": "positive"}\n{"text": broken\n')
    with pytest.raises(embedded.EmbeddedDataError) as e:
        embedded.review_examples("train", source_dir)
    assert "alpha.jsonl:2" in str(e.value) and "\n" not in str(e.value)
    (source_dir / "task" / "alpha.jsonl").write_text('{"text": "ok", "label": "great"}\n')
    with pytest.raises(embedded.EmbeddedDataError, match="label='great'"):
        embedded.review_examples("train", source_dir)
    with pytest.raises(ValueError, match="unknown split 'test' for kdjax_corpus"):
        embedded.corpus_sentences("test", source_dir)
