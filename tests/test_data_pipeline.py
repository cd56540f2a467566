"""grain pipeline: tokenization vs the HF tokenizer, sharding, packing, exact resume, sources."""

import json
import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdjax.data import embedded, pipeline, sources
from distill_fixtures import MINILM

WORDS = "alpha beta gamma delta river mountain ocean forest window table garden music".split()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MINILM)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "id": i,
            "text": " ".join(rng.choice(WORDS, rng.integers(2, 30))),
            "other": f"second segment {i}",
            "label": ["negative", "neutral", "positive"][i % 3],
            "score": float(i) / 7,
        }
        for i in range(n)
    ]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_fixed_shape_batches_match_the_tokenizer(tok):
    recs = _records(10)
    ds = pipeline.make_loader(
        sources.InMemorySource(recs), tok, text_fields=("text", "other"), label_field="label",
        label_names=embedded.REVIEW_LABELS, max_length=24, batch_size=4, shuffle=False,
        num_epochs=1, shard_index=0, shard_count=1,
    )
    batches = list(ds)
    assert len(batches) == 2  # 10 // 4, remainder dropped
    ref = tok([r["text"] for r in recs[:4]], [r["other"] for r in recs[:4]], truncation=True,
              max_length=24, padding="max_length")
    b = batches[0]
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].dtype == np.int32 and b[k].shape == (4, 24)
        np.testing.assert_array_equal(b[k], np.asarray(ref[k]))
    np.testing.assert_array_equal(b["labels"], [0, 1, 2, 0])
    assert b["labels"].dtype == np.int32


def test_regression_labels_dynamic_padding_and_final_batch(tok):
    recs = _records(7)
    ds = pipeline.make_loader(
        sources.InMemorySource(recs), tok, text_fields=("text",), label_field="score", is_regression=True,
        max_length=64, batch_size=3, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
        pad_to_multiple_of=8, drop_remainder=False,
    )
    batches = list(ds)
    assert [len(b["labels"]) for b in batches] == [3, 3, 1]
    for i, b in enumerate(batches):
        assert b["labels"].dtype == np.float32
        np.testing.assert_allclose(b["labels"], [r["score"] for r in recs[3 * i : 3 * i + 3]], rtol=1e-6)
        longest = max(len(tok(r["text"])["input_ids"]) for r in recs[3 * i : 3 * i + 3])
        assert b["input_ids"].shape[1] == -(-longest // 8) * 8 <= 64
        assert b["attention_mask"].sum(1).max() == longest


def test_two_shards_are_disjoint_and_cover_the_data(tok):
    src = sources.InMemorySource(_records(23))
    seen = []
    for shard in range(2):
        ds = pipeline.make_loader(src, tok, text_fields=("text",), label_field="id", batch_size=4,
                                  num_epochs=1, shard_index=shard, shard_count=2, drop_remainder=False, seed=3)
        seen.append([int(i) for b in ds for i in b["labels"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(23))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_default_sharding_is_per_jax_process(tok):
    import jax

    src = sources.InMemorySource(_records(9))
    ds = pipeline.make_loader(src, tok, text_fields=("text",), label_field="id", batch_size=9, num_epochs=1, shuffle=False)
    assert jax.process_count() == 1
    np.testing.assert_array_equal(next(iter(ds))["labels"], np.arange(9))
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        pipeline.make_loader(src, tok, text_fields=("text",), batch_size=2, shard_index=0)


def test_shuffle_is_seeded_and_reshuffled_each_epoch(tok):
    src = sources.InMemorySource(_records(16))

    def ids(seed):
        ds = pipeline.make_loader(src, tok, text_fields=("text",), label_field="id", batch_size=16, num_epochs=2,
                                  seed=seed, shard_index=0, shard_count=1)
        return [b["labels"].tolist() for b in ds]

    a, b, c = ids(0), ids(0), ids(1)
    assert a == b and a != c
    assert sorted(a[0]) == sorted(a[1]) == list(range(16)) and a[0] != a[1]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_iterator_state_round_trip_resumes_exactly(tok, tmp_path, pack):
    src = sources.InMemorySource(_records(40))
    kwargs = dict(text_fields=("text",), batch_size=3, max_length=16, seed=7, shard_index=0, shard_count=1, pack=pack)
    if not pack:
        kwargs.update(label_field="label", label_names=embedded.REVIEW_LABELS)
    ds = pipeline.make_loader(src, tok, **kwargs)
    reference = _take(iter(ds), 30)  # crosses epoch boundaries (40 records, 3 per batch)

    path = tmp_path / "state" / "data.0.json"
    # Resume from many points: packing keeps a partly consumed text between windows at some of
    # them, and that remainder must survive the file round trip too.
    for k in [*range(1, 16), 22]:
        it = iter(ds)
        _take(it, k)
        pipeline.save_iterator_state(it, path)
        json.loads(path.read_text())  # a plain JSON file
        _take(it, 3)  # the interrupted run moves on; the restore must not care
        resumed = iter(pipeline.make_loader(src, tok, **kwargs))
        pipeline.restore_iterator_state(resumed, path)
        stop = 30 if k == 22 else k + 4
        _assert_batches_equal(_take(resumed, stop - k), reference[k:stop])


def test_worker_processes_give_the_same_batches(tok):
    src = sources.InMemorySource(_records(24))
    kwargs = dict(text_fields=("text",), label_field="id", batch_size=4, max_length=16, seed=1, num_epochs=1,
                  shard_index=0, shard_count=1)
    in_process = list(pipeline.make_loader(src, tok, **kwargs))
    _assert_batches_equal(list(pipeline.make_loader(src, tok, worker_count=1, **kwargs)), in_process)


def test_packing_cuts_the_concatenated_token_stream(tok):
    recs = _records(30)
    ds = pipeline.make_loader(sources.InMemorySource(recs), tok, text_fields=("text",), batch_size=2, max_length=32,
                              pack=True, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    batches = list(ds)
    stream = np.concatenate([tok(r["text"])["input_ids"] for r in recs])  # [CLS] .. [SEP] per text, nothing more
    n_full = len(stream) // 32
    windows = np.concatenate([b["input_ids"] for b in batches])
    assert all(b["input_ids"].shape == (2, 32) and b["input_ids"].dtype == np.int32 for b in batches)
    np.testing.assert_array_equal(windows[:n_full].reshape(-1), stream[: n_full * 32])
    full = np.concatenate([b["attention_mask"] for b in batches])[:n_full]
    assert full.min() == 1
    labels = np.concatenate([b["labels"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    np.testing.assert_array_equal(labels, np.where(mask == 1, windows, pipeline.IGNORE_INDEX))


def test_local_file_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  second line  \nthird ünïcode line\n")
    ts = sources.TextFileSource(txt)
    assert len(ts) == 3 and ts[1] == {"text": "  second line  "} and ts[-1]["text"] == "third ünïcode line"
    ts2 = pickle.loads(pickle.dumps(ts))  # grain workers receive a pickled source
    assert [ts2[i] for i in range(3)] == [ts[i] for i in range(3)]
    with pytest.raises(IndexError):
        ts[3]

    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "x", "label": "positive"}\n\n{"text": "y", "label": "negative"}\n[1, 2]\n')
    js = sources.JsonlSource(jl)
    assert len(js) == 3 and js[1] == {"text": "y", "label": "negative"}
    with pytest.raises(ValueError, match="expected a JSON object"):
        js[2]

    csv_path = tmp_path / "c.csv"
    csv_path.write_text('sentence,label\n"hello, world",1\n"two\nlines",0\n')
    cs = sources.CsvSource(csv_path)
    assert cs.columns == ("sentence", "label") and len(cs) == 2
    assert cs[0] == {"sentence": "hello, world", "label": "1"} and cs[1]["sentence"] == "two\nlines"

    for cls in (sources.TextFileSource, sources.JsonlSource, sources.CsvSource):
        with pytest.raises(FileNotFoundError) as e:
            cls(tmp_path / "missing.file")
        assert "missing.file" in str(e.value) and "\n" not in str(e.value)


def test_csv_source_through_the_loader(tok, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nthe movie was great,1\nthe movie was awful,0\n")
    ds = pipeline.make_loader(sources.CsvSource(path), tok, text_fields=("sentence",), label_field="label",
                              label_names=("negative", "positive"), batch_size=2, shuffle=False, num_epochs=1,
                              shard_index=0, shard_count=1, max_length=12)
    np.testing.assert_array_equal(next(iter(ds))["labels"], [1, 0])


def test_not_prepared_error_is_one_line_with_build_command(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as e:
        sources.tfds_source("glue/cola", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"tfds build glue/cola --data_dir {tmp_path}" in msg and "TFDS_DATA_DIR=gs://" in msg
    (tmp_path / "glue" / "cola" / "incomplete.X_2.0.0").mkdir(parents=True)  # half-written prep
    with pytest.raises(sources.DatasetNotPreparedError):
        sources.tfds_source("glue/cola", "train", data_dir=tmp_path)


def test_prepared_tfds_dir_read_via_task_loader(tok, tmp_path):
    src = embedded.load_split("kdjax_reviews", "validation", data_dir=tmp_path)
    direct = sources.tfds_source("kdjax_reviews", "validation", data_dir=tmp_path)  # read-only path
    assert len(direct) == len(src) and direct[0] == src[0]
    ds = pipeline.make_task_loader("kdjax_reviews", "validation", tok, data_dir=tmp_path, batch_size=2,
                                   shuffle=False, num_epochs=1, max_length=20, shard_index=0, shard_count=1)
    b = next(iter(ds))
    rows = embedded.review_examples("validation")
    want = [embedded.REVIEW_LABELS.index(r["label"]) for r in rows[:2]]
    np.testing.assert_array_equal(b["labels"], want)
    np.testing.assert_array_equal(b["input_ids"][0], tok(rows[0]["text"], truncation=True, max_length=20,
                                                         padding="max_length")["input_ids"])


def test_bad_arguments_raise_clear_errors(tok):
    src = sources.InMemorySource(_records(4))
    with pytest.raises(ValueError, match="text_fields"):
        pipeline.make_loader(src, tok, text_fields=(), batch_size=2)
    with pytest.raises(ValueError, match="pack=True"):
        pipeline.make_loader(src, tok, text_fields=("text",), label_field="label", pack=True, batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_loader(sources.InMemorySource([]), tok, text_fields=("text",), batch_size=2)
    ds = pipeline.make_loader(src, tok, text_fields=("text",), label_field="label", batch_size=2,
                              shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="label_names"):
        next(iter(ds))
