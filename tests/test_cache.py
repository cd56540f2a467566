"""Offline teacher cache: contents against an independent float64 teacher pass, N writers / M readers,
resume after a kill, fingerprints and one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from kdjax import cache
from kdjax.data import pipeline, sources
from tests.distill_fixtures import save_teacher, tiny_teacher, tokenizer

ROWS = 37  # not a multiple of the batch size, so the last batch is partial


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    words = "the a river stone quietly seven bright engine market violin across under".split()
    with open(root / "data.jsonl", "w") as f:
        for i in range(ROWS):
            text = " ".join(rng.choice(words, size=int(rng.integers(3, 25))))
            f.write(json.dumps({"text": text, "label": int(i % 3)}) + "\n")
    teacher = tiny_teacher(head="mlm", layers=2, hidden=32, heads=4)
    path = save_teacher(teacher, str(root / "teacher"))
    return {"root": root, "teacher_path": path, "data": str(root / "data.jsonl")}


def make_config(env, **cache_kw):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path=env["teacher_path"])
    c.data = dict(train=dict(path=env["data"], format="jsonl", text_fields=("text",), label_field="label",
                             max_length=24, batch_size=8))
    c.cache = dict(dict(k=8, rows_per_shard=16, logprob_format="uint16"), **cache_kw)
    return c


def _teachers(env):
    from kdjax.distill.run import load_teachers
    return load_teachers(make_config(env))


@pytest.fixture(scope="module")
def written(env):
    """One cache written by a single process, and the same data written by two (simulated) processes."""
    teachers = _teachers(env)
    one = str(env["root"] / "one")
    manifest = cache.write_cache(make_config(env), one, process_index=0, process_count=1, teachers=teachers,
                                 progress=False)
    two = str(env["root"] / "two")
    assert cache.write_cache(make_config(env), two, process_index=1, process_count=2, teachers=teachers,
                             progress=False) is None  # process 0 has not finished yet
    manifest2 = cache.write_cache(make_config(env), two, process_index=0, process_count=2, teachers=teachers,
                                  progress=False)
    return {"one": one, "two": two, "manifest": manifest, "manifest2": manifest2, "teachers": teachers}


def _all_rows(cache_dir, **kw):
    ds = cache.make_cache_loader(cache_dir, batch_size=1, shuffle=False, num_epochs=1, drop_remainder=False, **kw)
    return [{k: v[0] for k, v in b.items()} for b in ds]


def _key(row):
    return row["input_ids"].tobytes()


def test_cached_topk_matches_a_float64_teacher_pass(env, written):
    manifest = written["manifest"]
    assert manifest["rows"] == ROWS and manifest["k"] == 8 and manifest["process_count"] == 1
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 5]
    rows = _all_rows(written["one"])
    # The same data through kdjax's own pipeline, unshuffled.
    loader = pipeline.make_loader(sources.JsonlSource(env["data"]), tokenizer(), text_fields=("text",),
                                  label_field="label", max_length=24, batch_size=ROWS, shuffle=False, num_epochs=1,
                                  drop_remainder=False, shard_index=0, shard_count=1)
    batch = next(iter(loader))
    for field in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        np.testing.assert_array_equal(np.stack([r[field] for r in rows]), batch[field])
    model = written["teachers"]["teacher"][0]
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits,
                         np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    mask = batch["attention_mask"] == 1
    ids = np.stack([r["teacher_topk_ids"] for r in rows])
    lp = np.stack([r["teacher_topk_logprobs"] for r in rows])
    tail = np.stack([r["teacher_tail_logprob"] for r in rows])
    want_ids = np.argsort(-logp, axis=-1)[..., :8]
    np.testing.assert_array_equal(ids[mask], want_ids[mask])
    want_lp = np.take_along_axis(logp, want_ids, -1)
    span = want_lp.max(-1, keepdims=True) - want_lp.min(-1, keepdims=True)
    assert np.all(np.abs(lp - want_lp)[mask] <= (span / 65535 + 1e-4)[mask])
    rest = logp.copy()
    np.put_along_axis(rest, want_ids, -np.inf, -1)
    want_tail = np.log(np.exp(rest).sum(-1))
    np.testing.assert_allclose(tail[mask], want_tail[mask], atol=2e-4)
    assert np.all(ids[~mask] == 0) and np.all(lp[~mask] == 0)


@pytest.mark.parametrize("readers", [1, 3])
def test_two_writers_any_readers_cover_every_row_once(written, readers):
    reference = {_key(r): r for r in _all_rows(written["one"])}
    seen = []
    for i in range(readers):
        ds = cache.make_cache_loader(written["two"], batch_size=2, shuffle=True, seed=3, num_epochs=1,
                                     drop_remainder=False, shard_index=i, shard_count=readers)
        for b in ds:
            for j in range(len(b["input_ids"])):
                row = {k: v[j] for k, v in b.items()}
                seen.append(_key(row))
                for field, value in reference[_key(row)].items():
                    np.testing.assert_array_equal(row[field], value, err_msg=field)
    assert len(seen) == ROWS and set(seen) == set(reference)
    assert written["manifest2"]["process_count"] == 2 and written["manifest2"]["rows"] == ROWS


def test_resume_after_kill_rewrites_the_partial_shard(env, written):
    workdir = str(env["root"] / "resumed")
    teachers = written["teachers"]
    assert cache.write_cache(make_config(env), workdir, process_count=1, process_index=0, teachers=teachers,
                             max_shards=1, progress=False) is None
    assert not os.path.exists(os.path.join(workdir, cache.MANIFEST))
    # What a kill in the middle of shard 1 leaves: a half-written temporary file, and a stale final name.
    with open(os.path.join(workdir, ".shard-00000-of-00001-00001.arrayrecord"), "wb") as f:
        f.write(b"partial")
    with open(os.path.join(workdir, "shard-00000-of-00001-00001.arrayrecord"), "wb") as f:
        f.write(b"stale")
    manifest = cache.write_cache(make_config(env), workdir, process_count=1, process_index=0, teachers=teachers,
                                 progress=False)
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 5]
    assert not any(f.startswith(".shard") for f in os.listdir(workdir))
    got, want = _all_rows(workdir), _all_rows(written["one"])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for field in a:
            np.testing.assert_array_equal(a[field], b[field])
    # Finished: a rerun changes nothing.
    again = cache.write_cache(make_config(env), workdir, process_count=1, process_index=0, teachers=teachers,
                              progress=False)
    assert again["shards"] == manifest["shards"]


def test_iterator_state_resumes_exactly(written):
    ds = cache.make_cache_loader(written["one"], batch_size=4, shuffle=True, seed=1)
    it = iter(ds)
    next(it), next(it)
    state = it.get_state()
    want = next(it)
    it2 = iter(ds)
    it2.set_state(state)
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert got["teacher_topk_ids"].shape == (4, 24, 8) and got["teacher_topk_ids"].dtype == np.int32
    assert got["teacher_topk_logprobs"].dtype == np.float32 and got["teacher_tail_logprob"].shape == (4, 24)


def test_check_cache_names_what_differs(env, written):
    m = written["manifest"]
    teacher = written["teachers"]["teacher"][0]
    good = dict(teacher_fingerprint=cache.teacher_fingerprint(teacher),
                tokenizer_fingerprint=cache.tokenizer_fingerprint(tokenizer()),
                dataset_fingerprint=cache.dataset_fingerprint(make_config(env).data.train), max_length=24)
    assert good["teacher_fingerprint"] == m["teachers"][0]["fingerprint"]
    assert cache.check_cache(written["one"], **good)["rows"] == ROWS
    other = tiny_teacher(head="mlm", layers=2, hidden=32, heads=4, seed=1)
    cases = {"teacher": dict(teacher_fingerprint=cache.teacher_fingerprint(other)),
             "max_length": dict(max_length=32),
             "dataset": dict(dataset_fingerprint=cache.dataset_fingerprint(dict(path=env["data"], split="train",
                                                                                 pack=True)))}
    for name, change in cases.items():
        with pytest.raises(cache.CacheError) as info:
            cache.check_cache(written["one"], **dict(good, **change))
        msg = str(info.value)
        assert "\n" not in msg and f": {name} (" in msg and msg.count("expected") == 1
    from transformers import BertTokenizerFast
    vocab = os.path.join(env["root"], "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "river", "stone"]) + "\n")
    small = BertTokenizerFast(vocab_file=vocab)
    with pytest.raises(cache.CacheError, match=r"tokenizer \(cache .*max_length \(cache 24, expected 99\)"):
        cache.check_cache(written["one"], **dict(good, tokenizer_fingerprint=cache.tokenizer_fingerprint(small),
                                                  max_length=99))


def test_row_format_costs_under_300_bytes_per_token_at_k64(written):
    """k = 64, V = 30522 (15-bit ids), uint16 codes: the encoded size of rows of 5 to 64 valid tokens."""
    layout = dict(written["manifest"]["layout"], k=64, max_length=64)
    codec = cache.RowCodec(layout)
    rng = np.random.default_rng(0)
    total = tokens = 0
    for n in (5, 20, 64):
        row = {"input_ids": np.where(np.arange(64) < n, rng.integers(1, 30522, 64), 0).astype(np.int32),
               "attention_mask": (np.arange(64) < n).astype(np.int32), "token_type_ids": np.zeros(64, np.int32),
               "labels": np.int32(1)}
        ids = np.stack([rng.choice(30522, 64, replace=False) for _ in range(64)]).astype(np.int32)
        lp = -np.sort(rng.exponential(3.0, (64, 64)), axis=-1).astype(np.float32)
        record, valid = codec.encode(row, {"teacher": (ids, lp, np.full(64, -2.5, np.float32))})
        total, tokens = total + len(record), tokens + valid
        back = codec.decode(record, "test row")
        np.testing.assert_array_equal(back["teacher_topk_ids"][:n], ids[:n])
        assert np.abs(back["teacher_topk_logprobs"][:n] - lp[:n]).max() <= np.ptp(lp[:n], -1).max() / 65535 + 1e-6
    # 15-bit ids (120 B) + uint16 codes (128 B) + range (8 B) + tail (4 B) + the token itself (~3.5 B).
    assert 260 <= total / tokens <= 300, total / tokens


def test_bit_packing_against_integer_arithmetic():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**15, size=1001)
    packed = cache.pack_bits(values, 15)
    assert len(packed) == (1001 * 15 + 7) // 8
    np.testing.assert_array_equal(cache.unpack_bits(packed, 15, 1001), values)
    # Independent of the packer: bit j of value i is bit (15 i + j) of the little-endian stream.
    stream = int.from_bytes(packed, "little")
    assert all(((stream >> (15 * i)) & 0x7FFF) == v for i, v in enumerate(values))


def test_tied_head_is_layer_norm_of_activation_times_embeddings():
    base = tiny_teacher(head="base", layers=2, hidden=32, heads=4)
    headed = cache.tied_lm_head(base)
    enc = base.encode(["a quiet river"], max_length=16)
    h = np.asarray(base(enc["input_ids"], enc["attention_mask"]).last_hidden_state, np.float64)
    from scipy.special import erf
    act = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU (BERT's "gelu")
    norm = (act - act.mean(-1, keepdims=True)) / np.sqrt(act.var(-1, keepdims=True) + base.config.norm_eps)
    from kdjax.hub.api import flat_params
    emb = np.asarray(flat_params(base.params)["embed/word/embedding"], np.float64)
    got = np.asarray(headed(enc["input_ids"], enc["attention_mask"]).logits)
    np.testing.assert_allclose(got, norm @ emb.T, rtol=1e-3, atol=1e-3)


def test_one_line_errors(env, written, tmp_path):
    teachers = written["teachers"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (make_config(env), str(blocker / "sub"), teachers, "is not writable"),
        (make_config(env, k=40000), str(tmp_path / "k"), teachers, "config.cache.k=40000 exceeds"),
        (make_config(env, logprob_format="int4"), str(tmp_path / "f"), teachers, "config.cache.logprob_format='int4'"),
        (make_config(env), str(tmp_path / "b"), {"teacher": (tiny_teacher(head="base", layers=1), 1.0)},
         "has head 'base', which gives no token logits"),
    ]
    for config, workdir, t, message in cases:
        with pytest.raises(cache.CacheError, match=message) as info:
            cache.write_cache(config, workdir, process_index=0, process_count=1, teachers=t, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(cache.CacheError, match=f"no manifest at {tmp_path}"):
        cache.make_cache_loader(str(tmp_path), batch_size=2)


def test_damaged_shards_are_named(written, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(written["one"], broken)
    shard = broken / written["manifest"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(cache.CacheError, match=f"shard {shard} is truncated"):
        cache.make_cache_loader(str(broken), batch_size=2)
    # One flipped byte inside a record's payload: its CRC no longer matches.
    shutil.rmtree(broken)
    shutil.copytree(written["one"], broken)
    from array_record.python import array_record_module as arm
    reader = arm.ArrayRecordReader(str(shard))
    records = reader.read_all()
    reader.close()
    damaged = bytearray(records[3])
    damaged[-5] ^= 0xFF
    records[3] = bytes(damaged)
    writer = arm.ArrayRecordWriter(str(shard), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    source = cache.CacheSource(str(broken))
    source[2]
    with pytest.raises(cache.CacheError, match=f"row 3 of shard {shard} is corrupted"):
        source[3]


@pytest.mark.slow
def test_command_line(env, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        f"    c = ml_collections.ConfigDict()\n"
        f"    c.teacher = dict(path={env['teacher_path']!r})\n"
        f"    c.data = dict(train=dict(path={env['data']!r}, format='jsonl', text_fields=('text',), max_length=24, "
        "batch_size=8))\n"
        "    c.cache = dict(k=4, rows_per_shard=64)\n"
        "    return c\n")
    workdir = tmp_path / "cli"
    env_vars = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-m", "kdjax.cache", f"--config={config_file}", f"--workdir={workdir}"],
                         capture_output=True, text=True, env=env_vars, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"wrote {ROWS} rows" in out.stdout
    assert cache.read_manifest(str(workdir))["k"] == 4
    bad = subprocess.run([sys.executable, "-m", "kdjax.cache", f"--config={config_file}", f"--workdir={workdir}",
                          "--config.cache.k=99999"], capture_output=True, text=True, env=env_vars, timeout=600)
    assert bad.returncode == 2 and "kdjax.cache: error: config.cache.k=99999 exceeds" in bad.stderr


@pytest.mark.slow
def test_teacher_sharded_on_the_config_mesh_writes_the_same_rows(env, written, tmp_path):
    assert jax.device_count() == 8
    config = make_config(env)
    config.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 1), dcn=(1, 1, 1))
    manifest = cache.write_cache(config, str(tmp_path / "sharded"), process_index=0, process_count=1, progress=False)
    assert manifest["teachers"][0]["fingerprint"] == written["manifest"]["teachers"][0]["fingerprint"]
    got, want = _all_rows(str(tmp_path / "sharded")), _all_rows(written["one"])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a["teacher_topk_ids"], b["teacher_topk_ids"])
        np.testing.assert_allclose(a["teacher_topk_logprobs"], b["teacher_topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(a["teacher_tail_logprob"], b["teacher_tail_logprob"], atol=1e-4)
