"""The engine: one jitted step, stages, ensembles, accumulation, resume, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from distill_fixtures import save_teacher, tiny_config, tiny_teacher
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import NonFiniteLossError, make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.matching import MatchingError, layer_pairs
from kdjax.methods import MethodError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tiny_teacher(), str(tmp_path_factory.mktemp("teacher")))


def _batches(run, n, stage=0):
    it = iter(make_stage_loader(run, stage, seed=0))
    return [next(it) for _ in range(n)]


def test_step_trains_student_not_teacher_and_compiles_once(teacher_dir):
    run = Distillation(tiny_config(teacher_dir, method="kd"))
    teacher_before = jax.tree.map(np.array, flat_params(run.teacher_params()["teacher"]))
    state = run.init_state()
    before = jax.tree.map(np.array, flat_params(state.params))
    batches = _batches(run, 3)
    step = chex.assert_max_traces(run.runner(0).step_fn.__wrapped__, n=1)
    jitted = jax.jit(step, donate_argnums=0)
    losses = []
    for b in batches:
        state, m = jitted(state, run.teacher_params(), run.prepare_batch(b))
        losses.append(metric_values(m)["loss"])
    assert all(np.isfinite(losses))
    after = flat_params(state.params)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    teacher_after = flat_params(run.teacher_params()["teacher"])
    for k, v in teacher_before.items():
        np.testing.assert_array_equal(v, teacher_after[k])
    assert int(state.step) == 3


def test_grad_accumulation_matches_full_batch(teacher_dir):
    """Two micro-batches of 4 give the update of one batch of 8 (equal token counts per micro-batch)."""
    config = tiny_config(teacher_dir, method="kd", method_args={"alpha": 1.0}, batch=8)
    run1 = Distillation(config)
    batch = _batches(run1, 1)[0]
    batch = dict(batch, attention_mask=np.ones_like(batch["attention_mask"]))
    s1, m1 = run1.train_step(run1.init_state(), batch)
    config.unlock()
    config.train.grad_accum = 2
    run2 = Distillation(config)
    s2, m2 = run2.train_step(run2.init_state(), batch)
    np.testing.assert_allclose(metric_values(m1)["loss"], metric_values(m2)["loss"], rtol=1e-5)
    f1, f2 = flat_params(s1.params), flat_params(s2.params)
    for k in f1:
        np.testing.assert_allclose(f1[k], f2[k], atol=1e-5, err_msg=k)


def test_layer_matching_maps():
    assert layer_pairs("uniform", 3, 6, "hidden") == ((0, 0), (1, 2), (2, 4), (3, 6))
    assert layer_pairs("uniform", 4, 12, "attention") == ((0, 2), (1, 5), (2, 8), (3, 11))
    assert layer_pairs("last", 3, 6, "hidden") == ((1, 4), (2, 5), (3, 6))
    assert layer_pairs("skip", 6, 12, "hidden") == ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10))
    assert layer_pairs("pkd_last", 6, 12, "hidden") == ((1, 7), (2, 8), (3, 9), (4, 10), (5, 11))
    assert layer_pairs("first", 2, 6, "attention") == ((0, 0), (1, 1))
    assert layer_pairs("final", 3, 6, "attention") == ((2, 5),)
    assert layer_pairs(((1, 3), (2, 6)), 2, 6, "hidden") == ((1, 3), (2, 6))
    with pytest.raises(MatchingError, match=r"layer map out of range: pair \(student 1, teacher 9\)"):
        layer_pairs(((1, 9),), 2, 6, "hidden")


def test_projection_is_trained_and_not_exported(teacher_dir, tmp_path):
    config = tiny_config(teacher_dir, method="unified", method_args={"knowledge": ("hidden",), "matching": "uniform"},
                         steps=2)
    config.student.hidden_size = 16
    config.student.num_heads = 2
    config.student.intermediate_size = 32
    config.student.init = "random"
    run = Distillation(config)
    state = run.init_state()
    assert state.modules and all(v["kernel"].shape == (16, 32) for v in state.modules.values())
    aux_before = jax.tree.map(np.array, state.modules)
    for batch in _batches(run, 2):  # step 0 has learning rate 0 (warmup)
        state, _ = run.train_step(state, batch)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(aux_before), jax.tree.leaves(state.modules)))
    out = kdjax.save_pretrained(run.student_model(state), str(tmp_path / "student"))
    from safetensors.numpy import load_file
    names = load_file(os.path.join(out, "model.safetensors"))
    assert not any("kernel" in n or "proj" in n for n in names)


def test_multi_teacher_ensemble_weights(teacher_dir, tmp_path):
    other = save_teacher(tiny_teacher(seed=5), str(tmp_path / "t2"))
    config = tiny_config(teacher_dir, method="kd", method_args={"alpha": 1.0})
    config.teachers = dict(a=dict(path=teacher_dir, weight=3.0), b=dict(path=other, weight=1.0))
    run = Distillation(config)
    batch = _batches(run, 1)[0]
    state = run.init_state()
    m, _ = run.evaluate_batch(state, batch)
    values = metric_values(m)
    ensemble_state, train_m = run.train_step(run.init_state(), batch)
    tv = metric_values(train_m)
    expected = 0.75 * tv["a/term/kd"] + 0.25 * tv["b/term/kd"]
    np.testing.assert_allclose(tv["loss"], expected, rtol=1e-5)
    assert values["a/loss"] != values["b/loss"]


def test_errors_are_one_line(teacher_dir, tmp_path):
    with pytest.raises(MethodError, match="unknown method 'nope'; known methods: .*kd"):
        Distillation(tiny_config(teacher_dir, method="nope"))
    # A term that needs equal head counts, with a 2-head student of a 4-head teacher.
    config = tiny_config(teacher_dir, method="unified", method_args={"knowledge": ("attention",)})
    config.student.num_heads = 2
    with pytest.raises(MethodError, match="equal head counts.*qkv_relation_kl"):
        Distillation(config)
    config = tiny_config(teacher_dir, method="unified",
                         method_args={"knowledge": ("hidden",), "matching": ((1, 9),)})
    with pytest.raises(MatchingError, match="layer map out of range"):
        Distillation(config)
    lm = save_teacher(tiny_teacher(head="mlm"), str(tmp_path / "mlm"))
    config = tiny_config(lm, method="kd", task="kdjax_corpus")
    config.student.vocab_size = 1000
    with pytest.raises(MethodError, match=r"vocabulary \(1000\) differs from the teacher's \(30522\)"):
        Distillation(config)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(teacher_dir, tmp_path):
    config = tiny_config(teacher_dir, method="kd", steps=8, learning_rate=1e30, max_grad_norm=None,
                         warmup_steps=0, schedule="constant")
    run = Distillation(config)
    with pytest.raises(NonFiniteLossError, match=r"non-finite: .*term/kd.*last good checkpoint"):
        run.fit(str(tmp_path / "wd"), progress=False)


def _cli(workdir, teacher_dir, *extra, wait=True):
    cmd = [sys.executable, "-m", "kdjax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
           f"--config.teacher.path={teacher_dir}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_record(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss" in r][-1], records


def test_sigkill_then_rerun_resumes_to_identical_metrics(teacher_dir, tmp_path):
    """Kill the CLI with SIGKILL after a checkpoint lands, rerun the same command: same final metrics."""
    full = str(tmp_path / "full")
    r = _cli(full, teacher_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = str(tmp_path / "killed")
    proc = _cli(killed, teacher_dir, wait=False)
    ckpt_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if any(int(s) >= 4 for s in steps):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; lengthen tests/configs/tiny.py"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _cli(killed, teacher_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    a, records_full = _final_record(full)
    b, records_killed = _final_record(killed)
    assert a["global_step"] == b["global_step"]
    for key in ("loss", "term/kd", "term/hard_ce", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    with open(os.path.join(killed, "summary.json")) as f:
        summary = json.load(f)
    assert summary["final_loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert os.path.exists(os.path.join(killed, "student", "model.safetensors"))


def test_cli_reports_user_errors_in_one_line(teacher_dir, tmp_path):
    r = _cli(str(tmp_path / "x"), teacher_dir, "--config.method=nope")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdjax: error: unknown method 'nope'; known methods:")


def test_bf16_teacher_runs_in_the_step(teacher_dir):
    """A teacher computing in bfloat16 (params bf16 too) feeds float32 student terms."""
    config = tiny_config(teacher_dir, method="unified", method_args={"knowledge": ("hidden", "logits")})
    config.teacher.dtype = "bfloat16"
    run = Distillation(config)
    teacher = run.teachers["teacher"][0]
    assert teacher.config.compute_dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher.params))
    state = run.init_state()
    for batch in _batches(run, 2):
        state, metrics = run.train_step(state, batch)
    values = metric_values(metrics)
    assert np.isfinite(values["loss"]) and values["loss"] > 0
