"""Bad input gets one clear line, and no fault loses or corrupts a run.

The table runs the real command line (`python -m kdjax.main`, a few through `kdjax.evaluate`) and
asserts for every row: exit status 2, exactly one line on stderr holding the expected words, no
Python traceback, and a workdir whose files are byte-for-byte what they were. Most rows are refused
before jax is imported (about a second each); rows marked `model` are refused after the teacher is
loaded but before anything compiles.
"""

import datetime
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distill_fixtures import save_teacher, tiny_config, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tests/configs/tiny.py"


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return env


def _cli(*args, module="kdjax.main", wait=True, timeout=600):
    cmd = [sys.executable, "-m", module, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _tree_hash(path):
    """{relative path: sha256} of every file under `path` ({} when it does not exist)."""
    out = {}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


class _Evil:
    """Unpickling this would run a shell command; a safe loader must refuse it without running it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


#: config.json of a 4-layer BERT classifier with 3 labels and 128 positions (as `tiny_teacher()` writes).
FAKE_CONFIG = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "vocab_size": 30522,
               "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": 128, "type_vocab_size": 2, "id2label": {str(i): f"L{i}" for i in range(3)}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Model directories and data files, good and bad, written without jax: every row refused before
    the weights are read needs only a directory that passes the header checks."""
    from safetensors.numpy import save_file
    root = tmp_path_factory.mktemp("inputs")
    d = {"teacher": str(root / "teacher")}
    os.makedirs(d["teacher"])
    with open(os.path.join(d["teacher"], "config.json"), "w") as f:
        json.dump(FAKE_CONFIG, f)
    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((8, 4), np.float32)},
              os.path.join(d["teacher"], "model.safetensors"), metadata={"format": "pt"})
    d["empty_dir"] = str(root / "empty_dir")
    os.makedirs(d["empty_dir"])
    d["a_file"] = str(root / "a_file.txt")
    with open(d["a_file"], "w") as f:
        f.write("not a model\n")
    d["truncated"] = shutil.copytree(d["teacher"], str(root / "truncated"))
    weights = os.path.join(d["truncated"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 40)
    d["pickle"] = str(root / "pickle")
    os.makedirs(d["pickle"])
    shutil.copy(os.path.join(d["teacher"], "config.json"), d["pickle"])
    with open(os.path.join(d["pickle"], "pytorch_model.bin"), "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Evil(), "when": datetime.date(2020, 1, 1)}, f,
                    protocol=2)
    files = {"unlabeled.txt": "a sentence\nanother sentence\n" * 20, "empty.txt": "",
             "nolabel.csv": "text,other\nhello,1\nworld,2\n", "label7.csv": "text,label\nhello,1\nworld,7\n",
             "bad.jsonl": '{"text": "ok", "label": 1}\n{"text": broken\n'}
    for fname, text in files.items():
        key = fname.replace(".", "_")
        d[key] = str(root / fname)
        with open(d[key], "w") as f:
            f.write(text)
    return d


@pytest.fixture(scope="module")
def real(inputs, tmp_path_factory):
    """A real tiny teacher (with the MiniLM tokenizer) and a copy holding one NaN weight."""
    from safetensors.numpy import load_file, save_file
    root = tmp_path_factory.mktemp("real")
    d = dict(inputs)
    d["teacher"] = save_teacher(tiny_teacher(), str(root / "teacher"))
    d["nan"] = shutil.copytree(d["teacher"], str(root / "nan"))
    tensors = load_file(os.path.join(d["nan"], "model.safetensors"))
    name = sorted(k for k in tensors if k.endswith("attention.self.query.weight"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.nan
    save_file(tensors, os.path.join(d["nan"], "model.safetensors"), metadata={"format": "pt"})
    d["nan_param"] = name
    return d


def _path_source(path, *extra):
    return ["--config.data.train.task=None", f"--config.data.train.path={path}", *extra]


# (id, arguments after --config/--workdir (with {teacher}-style placeholders), words expected in the line, kind)
# kind: "fast" is refused before jax is imported; "model" after the teacher loads, before compiling.
CASES = [
    # the config: unknown fields, typos, types, ranges
    ("unknown_field", ["--config.train.stepz=3"], ["config.train.stepz", "did you mean 'steps'"], "fast"),
    ("unknown_section", ["--config.trainer.steps=3"], ["unknown config field config.trainer"], "fast"),
    ("unknown_data_field", ["--config.data.mlm_probabilty=0.1"], ["config.data.mlm_probabilty", "mlm_probability"],
     "fast"),
    ("typo_after_colon", ["--config=" + TINY + ":stepz=3"], ["unknown option 'stepz' after ':'", "steps"], "fast"),
    ("bad_type_after_colon", ["--config=" + TINY + ":steps=many"], ["steps='many'", "int"], "fast"),
    ("steps_not_int", ["--config.train.steps=abc"], ["config.train.steps", "int"], "fast"),
    ("steps_float", ["--config.train.steps=2.5"], ["config.train.steps", "int"], "fast"),
    ("steps_zero", ["--config.train.steps=0"], ["config.train.steps", ">= 1"], "fast"),
    ("steps_negative", ["--config.train.steps=-5"], ["config.train.steps", ">= 1"], "fast"),
    ("steps_none", ["--config.train.steps=None"], ["config.train.steps=None", "not allowed"], "fast"),
    ("lr_negative", ["--config.train.learning_rate=-0.001"], ["config.train.learning_rate", ">= 0"], "fast"),
    ("lr_nan", ["--config.train.learning_rate=nan"], ["config.train.learning_rate", "finite"], "fast"),
    ("lr_inf", ["--config.train.learning_rate=inf"], ["config.train.learning_rate", "finite"], "fast"),
    ("lr_text", ["--config.train.learning_rate=fast"], ["config.train.learning_rate", "number"], "fast"),
    ("mlm_two", ["--config.data.mlm_probability=2.0"], ["config.data.mlm_probability", "1.0"], "fast"),
    ("mlm_negative", ["--config.data.mlm_probability=-0.1"], ["config.data.mlm_probability"], "fast"),
    ("keep_checkpoints_zero", ["--config.train.keep_checkpoints=0"], ["config.train.keep_checkpoints", ">= 1"], "fast"),
    ("checkpoint_every_zero", ["--config.train.checkpoint_every=0"], ["config.train.checkpoint_every", ">= 1"], "fast"),
    ("log_every_zero", ["--config.train.log_every=0"], ["config.train.log_every", ">= 1"], "fast"),
    ("eval_every_negative", ["--config.train.eval_every=-1"], ["config.train.eval_every", ">= 0"], "fast"),
    ("grad_accum_zero", ["--config.train.grad_accum=0"], ["config.train.grad_accum"], "fast"),
    ("warmup_ratio_big", ["--config.train.warmup_ratio=1.5"], ["config.train.warmup_ratio"], "fast"),
    ("max_grad_norm_negative", ["--config.train.max_grad_norm=-1"], ["config.train.max_grad_norm", "> 0"], "fast"),
    ("schedule_unknown", ["--config.train.schedule=exp"], ["config.train.schedule", "linear"], "fast"),
    ("batch_size_zero", ["--config.data.train.batch_size=0"], ["config.data.train.batch_size", ">= 1"], "fast"),
    ("max_length_one", ["--config.data.train.max_length=1"], ["config.data.train.max_length", ">= 2"], "fast"),
    ("teacher_dtype", ["--config.teacher.dtype=float64"], ["config.teacher.dtype", "bfloat16"], "fast"),
    ("bool_field", ["--config.train.async_checkpointing=maybe"], ["config.train.async_checkpointing"], "fast"),
    ("method_args_flat", ["--config.method_args.alpha=0.5"], ["keyed by method name", "method_args.kd.alpha"], "fast"),
    ("method_args_other_method", ["--config.method_args.tinybert.general=False"],
     ["config.method_args.tinybert", "not a method"], "fast"),
    ("task_and_path", ["--config.data.train.path={unlabeled_txt}"], ["config.data.train", "both task and path"], "fast"),
    ("resume_mismatch_value", ["--config.resume_mismatch=yes"], ["config.resume_mismatch", "continue"], "fast"),
    ("unknown_task", ["--config.data.train.task=no_such_task"], ["config.data.train.task", "unknown task"], "fast"),
    ("config_file_missing", ["--config=configs/no_such_recipe.py"], ["configs/no_such_recipe.py", "does not exist"],
     "fast"),
    ("config_missing", ["--config="], ["--config is required"], "fast"),
    ("unknown_flag", ["--stepz=3"], ["stepz"], "fast"),
    ("max_steps_zero", ["--max_steps=0"], ["max_steps"], "fast"),
    # models
    ("teacher_missing", ["--config.teacher.path=/no/such/teacher"], ["config.teacher.path", "no such directory"],
     "fast"),
    ("teacher_not_model_dir", ["--config.teacher.path={empty_dir}"], ["not a model directory", "config.json"], "fast"),
    ("teacher_is_file", ["--config.teacher.path={a_file}"], ["is a file"], "fast"),
    ("teacher_truncated", ["--config.teacher.path={truncated}"], ["model.safetensors", "truncated"], "fast"),
    ("teacher_pickle_only", ["--config.teacher.path={pickle}"], ["pytorch_model.bin", "weights_only", "safetensors"],
     "fast"),
    ("teacher_unset", ["--config.teacher.path="], ["config.teacher.path is not set"], "fast"),
    ("teacher_hub_offline", ["--config.teacher.path=someone/some-model"], ["offline"], "fast"),
    ("package_not_installed", ["--config.teacher.path=package:no-such-kdjax-model"], ["not installed", "pip install"],
     "fast"),
    ("package_is_a_module", ["--config.teacher.path=package:os"], ["'os'", "not a package"], "fast"),
    ("package_without_model", ["--config.teacher.path=package:json"], ["'json'", "no model directory"], "fast"),
    ("package_not_a_name", ["--config.teacher.path=package:os.path"], ["not a package name"], "fast"),
    ("max_length_over_positions", ["--config.data.train.max_length=512"],
     ["config.data.train.max_length=512", "max_position_embeddings (128)"], "fast"),
    ("teacher_nan_weight", ["--config.teacher.path={nan}"], ["{nan_param}", "non-finite"], "model"),
    # data
    ("data_file_missing", _path_source("/no/such/data.txt"), ["config.data.train.path", "does not exist"], "fast"),
    ("csv_without_label_column", _path_source("{nolabel_csv}", "--config.data.train.label_field=label"),
     ["nolabel.csv", "no column", "'label'"], "fast"),
    ("empty_data_file", _path_source("{empty_txt}"), ["empty.txt", "empty"], "fast"),
    ("label_beyond_num_labels", _path_source("{label7_csv}", "--config.data.train.label_field=label"),
     ["label id 7", "[0, 3)"], "fast"),
    ("jsonl_bad_line", _path_source("{bad_jsonl}", "--config.data.train.label_field=label"),
     ["bad.jsonl line 2", "not valid JSON"], "fast"),
    ("kd_on_unlabeled_data", _path_source("{unlabeled_txt}"), ["trains on labels", "config.data.train"], "model"),
    ("unknown_method", ["--config.method=nope"], ["unknown method 'nope'"], "model"),
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c[3] == "model" else [])
                                  for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, request, tmp_path):
    name, args, words, kind = case
    inputs = request.getfixturevalue("real" if kind == "model" else "inputs")
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept as is\n")
    args = [a.format(**inputs) for a in args]
    words = [w.format(**inputs) for w in words]
    base = [f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}"]
    if any(a.startswith("--config=") for a in args):
        base = base[1:]
    before = _tree_hash(str(workdir))
    r = _cli(*base, *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("kdjax: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    if kind == "fast":
        assert lines == errors, r.stderr[-2000:]  # nothing else printed: refused before any loading
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _tree_hash(str(workdir)) == before


WORKDIR_CASES = [
    ("workdir_is_a_file", ["is a file"]),
    ("workdir_read_only", ["not writable"]),
    ("workdir_gs_without_gcsfs", ["gcsfs", "pip install gcsfs"]),
]


@pytest.mark.parametrize("case", WORKDIR_CASES, ids=[c[0] for c in WORKDIR_CASES])
def test_bad_workdir_is_one_line(case, inputs, tmp_path):
    name, words = case
    if name == "workdir_is_a_file":
        workdir = tmp_path / "file"
        workdir.write_text("x")
    elif name == "workdir_read_only":
        if os.geteuid() == 0:
            workdir = "/sys/kdjax-workdir"  # permission bits do not stop root; sysfs does
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o500)
            workdir = ro / "wd"
    else:
        import importlib.util
        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed")
        workdir = "gs://kdjax-no-bucket/run"
    before = _tree_hash(str(workdir))
    r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdjax: error:") and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0]
    assert _tree_hash(str(workdir)) == before


EVALUATE_CASES = [
    ("model_missing", ["--model=/no/such/model"], ["does not exist"]),
    ("model_truncated", ["--model={truncated}"], ["truncated"]),
    pytest.param(("batch_size_zero", ["--model={teacher}", "--batch_size=0"], ["batch_size"]), marks=pytest.mark.slow),
    pytest.param(("unknown_task", ["--model={teacher}", "--task=no_such_task"], ["unknown task 'no_such_task'"]),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=["model_missing", "model_truncated", "batch_size_zero",
                                                      "unknown_task"])
def test_evaluate_bad_input_is_one_line(case, inputs):
    name, args, words = case
    r = _cli(*[a.format(**inputs) for a in args], module="kdjax.evaluate")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in words:
        assert word in lines[0]


# ------------------------------------------------------------------------------------------------
# The workdir: finished runs, other configs, locks (all refused or answered before jax loads)


def _fabricate_finished(workdir, config):
    from kdjax import config as config_lib
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config_fingerprint.json"), "w") as f:
        json.dump(config_lib.fingerprint(config), f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"method": "kd", "steps": 16, "final_loss": 0.5, "compression": 2.0}, f)


def _tiny(teacher, *overrides):
    from kdjax import config as config_lib
    return config_lib.load(TINY, [("teacher.path", teacher), *overrides])


def test_finished_workdir_reruns_as_a_noop(inputs, tmp_path):
    workdir = str(tmp_path / "done")
    _fabricate_finished(workdir, _tiny(inputs["teacher"]))
    before = _tree_hash(workdir)
    mtime = os.path.getmtime(os.path.join(workdir, "summary.json"))
    r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}")
    assert r.returncode == 0, r.stderr
    assert "holds a finished run" in r.stdout and "summary.json" in r.stdout and "final loss 0.5" in r.stdout
    assert _tree_hash(workdir) == before and os.path.getmtime(os.path.join(workdir, "summary.json")) == mtime


def test_resume_with_another_config_is_refused_unless_asked(inputs, tmp_path):
    workdir = str(tmp_path / "other")
    _fabricate_finished(workdir, _tiny(inputs["teacher"]))
    before = _tree_hash(workdir)
    r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}",
             "--config.student.num_layers=1", "--config.method_args.kd.alpha=1.0")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "different student, method_args" in line and "resume_mismatch=continue" in line
    assert _tree_hash(workdir) == before
    r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}",
             "--config.student.num_layers=1", "--config.resume_mismatch=continue")
    assert r.returncode == 0 and "holds a finished run" in r.stdout, r.stderr
    # Steps, logging and checkpoint cadence do not change what a run computes: no refusal.
    r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}",
             "--config.train.log_every=4")
    assert r.returncode == 0, r.stderr


def test_a_live_run_holds_the_workdir(inputs, tmp_path):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket
        (workdir / "run.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00"}))
        before = _tree_hash(str(workdir))
        r = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and f"in use by a running kdjax (pid {sleeper.pid}" in line
    assert _tree_hash(str(workdir)) == before


# ------------------------------------------------------------------------------------------------
# Config accessors


def test_config_accessors_keep_none_and_key_method_args():
    import ml_collections
    from kdjax import config as config_lib
    c = config_lib.load("configs/quickstart.py", [("train.max_grad_norm", "None"), ("student.hidden_size", "64")])
    assert config_lib.get(c, "train.max_grad_norm") is None  # clipping off, not the default 1.0
    assert config_lib.get(c, "student.hidden_size") == 64
    assert config_lib.method_args(c) == {"minilmv2": {"num_relation_heads": 12},
                                         "unified": {"knowledge": ("hidden",), "matching": "uniform"}}
    bare = ml_collections.ConfigDict({"method": "kd", "train": {"steps": 5}})
    assert config_lib.get(bare, "train.steps") == 5 and config_lib.get(bare, "train.max_grad_norm") == 1.0
    assert config_lib.method_args(bare) == {"kd": {}}
    with pytest.raises(config_lib.ConfigFieldError, match="keyed by method name"):
        config_lib.method_args(ml_collections.ConfigDict({"method": "kd", "method_args": {"alpha": 0.5}}))
    with pytest.raises(AttributeError):
        c.train.stepz = 3  # loaded configs are locked
    a = config_lib.fingerprint(config_lib.load("configs/quickstart.py"))
    b = config_lib.fingerprint(config_lib.load("configs/quickstart.py", [("train.log_every", "5")]))
    d = config_lib.fingerprint(config_lib.load("configs/quickstart.py", [("student.num_layers", "2")]))
    assert a["sha256"] == b["sha256"] != d["sha256"]


def test_every_recipe_is_valid_under_the_schema():
    from kdjax import config as config_lib
    for spec in ("configs/quickstart.py", "configs/bert_large_tinybert.py", "configs/finetune_teacher.py",
                 "configs/glue_tinybert.py", "configs/glue_tinybert.py:stage=teacher", "configs/scale_100b.py",
                 "configs/scale_100b.py:method=kd,chunk=64", "configs/scale_70b_to_8b.py:chunk=64",
                 "configs/task_distill.py", "configs/task_distill.py:method=tinybert", TINY):
        config_lib.load(spec)


# ------------------------------------------------------------------------------------------------
# Faults in checkpoints and logs (in process, tiny states: no model compiles)


class _FakeRun:
    def __init__(self):
        import jax.numpy as jnp
        self.template = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}

    def init_state(self, stage=0, params=None):
        return self.template


def _state(value):
    import jax.numpy as jnp
    return {"w": jnp.full((4, 3), value), "b": jnp.full((3,), value)}


def test_non_finite_state_is_never_saved(tmp_path):
    from kdjax.distill.checkpoints import Checkpointer, NonFiniteStateError
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, _state(1.0), {"stage": 0, "step": 1})
    with pytest.raises(NonFiniteStateError, match=r"global step 2 has non-finite values in \['w'\]"):
        ckpt.save(2, {"w": _state(1.0)["w"].at[0, 0].set(np.nan), "b": _state(1.0)["b"]}, {"stage": 0, "step": 2})
    assert ckpt.latest() == 1
    step, _, state = ckpt.restore_latest(_FakeRun())
    assert step == 1 and np.isfinite(np.asarray(state["w"])).all()
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    from kdjax.distill.checkpoints import Checkpointer
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(2, _state(2.0), {"stage": 0, "step": 2})
    ckpt.save(4, _state(4.0), {"stage": 0, "step": 4})
    ckpt.close()
    data = os.path.join(directory, "4", "state", "d")  # the arrays (ocdbt data files)
    victim = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 3)
    else:
        os.unlink(victim)
    ckpt = Checkpointer(directory, async_save=False)
    with caplog.at_level(logging.WARNING, logger="kdjax"):
        step, meta, state = ckpt.restore_latest(_FakeRun())
    assert step == 2 and meta["step"] == 2 and float(np.asarray(state["w"])[0, 0]) == 2.0
    assert any("checkpoint step 4" in r.getMessage() and "falling back to step 2" in r.getMessage()
               for r in caplog.records)
    assert ckpt.latest() == 2 and any(n.startswith("corrupt-4-") for n in os.listdir(directory))
    ckpt.save(4, _state(5.0), {"stage": 0, "step": 4})  # the resumed run saves step 4 again
    ckpt.close()


def test_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from kdjax.distill.trainer import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_step": 2, "loss": 1.0}\n{"global_step": 4, "loss": 0.9}\n{"global_step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="kdjax"):
        MetricsLog(str(tmp_path), resume_from_global_step=4).close()
    assert [json.loads(x)["global_step"] for x in path.read_text().splitlines()] == [2, 4]
    assert any("partial line" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Faults during real runs (compile a tiny model: slow)


@pytest.mark.slow
def test_nan_loss_leaves_only_finite_checkpoints(real, tmp_path):
    inputs = real
    from kdjax.distill import Distillation
    from kdjax.distill.checkpoints import Checkpointer, non_finite_leaves
    from kdjax.distill.trainer import NonFiniteLossError
    config = tiny_config(inputs["teacher"], method="kd", steps=6, learning_rate=1e30, max_grad_norm=None,
                         warmup_steps=0, schedule="constant", checkpoint_every=1, log_every=1)
    run = Distillation(config)
    workdir = str(tmp_path / "wd")
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run.fit(workdir, progress=False)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    for step in ckpt.manager.all_steps():
        meta = ckpt.restore_meta(step)
        assert not non_finite_leaves(ckpt.restore_state(step, run.init_state(int(meta["stage"])))), step
    ckpt.close()


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_130(real, tmp_path):
    inputs = real
    workdir = str(tmp_path / "wd")
    proc = _cli(f"--config={TINY}:steps=400", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}",
                "--config.train.checkpoint_every=1000", "--config.train.log_every=1", wait=False)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdjax: interrupted at global step ") and "checkpoint saved" in last
    step = int(last.split("global step ")[1].split(";")[0])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    assert not os.path.exists(os.path.join(workdir, "run.lock"))


@pytest.mark.slow
def test_resume_survives_stale_lock_partial_log_and_corrupt_checkpoint(real, tmp_path):
    """A killed run leaves a lock, a half-written metrics line and a damaged newest checkpoint: the
    rerun takes the lock over, drops the line, falls back one checkpoint and finishes."""
    inputs = real
    workdir = str(tmp_path / "wd")
    args = [f"--config={TINY}:steps=6", f"--workdir={workdir}", f"--config.teacher.path={inputs['teacher']}",
            "--config.train.async_checkpointing=False"]
    r = _cli(*args, "--max_steps=4")
    assert r.returncode == 0 and "stopped at global step 4" in r.stdout, r.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    with open(os.path.join(workdir, "run.lock"), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"stage": 0, "global_step": 6, "lo')
    data = os.path.join(workdir, "checkpoints", "4", "state", "d")  # the arrays (ocdbt data files)
    os.unlink(max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize))
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"stale lock {os.path.join(workdir, 'run.lock')} of pid {dead.pid}" in r.stderr
    assert "dropping a partial line of" in r.stderr and "metrics.jsonl" in r.stderr
    assert "checkpoint step 4" in r.stderr and "falling back to step 2" in r.stderr
    assert "resuming from" in r.stderr
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["global_step"] for line in f]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert os.path.exists(os.path.join(workdir, "summary.json")) and not os.path.exists(os.path.join(workdir, "run.lock"))
