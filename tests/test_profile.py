"""kdjax.profile: a traced step's time attributed to teacher, student forward/backward, loss terms and optimizer."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import profile as profile_lib
from tests.distill_fixtures import save_teacher, tiny_config, tiny_teacher

M, K, N = 64, 48, 40
TRACING = {"test_profile_calls_traces_and_attributes_a_real_run", "test_kd_step_profile_counts_the_teacher_flops_of_its_architecture",
           "test_training_traces_the_configured_steps_into_the_workdir", "test_benchmark_step_profile_reports_the_split"}
CHILD = "KDJAX_PROFILE_TEST_CHILD"


@pytest.fixture(autouse=True)
def _trace_in_a_process_without_libtpu(request):
    """A test that traces runs in a fresh process when this one has libtpu loaded (a test file before it
    in this worker compiled a TPU plan): tracing here would crash the worker (`check_tracer`)."""
    if request.node.originalname not in TRACING or os.environ.get(CHILD) or not profile_lib.libtpu_loaded():
        yield
        return
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                          cwd=str(request.config.rootpath), env={**os.environ, CHILD: "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    pytest.skip("passed in a fresh process (this one has libtpu loaded)")  # the result is the child's


def _scoped_step(x, w_teacher, w_student):
    """A teacher matmul, a student matmul with its gradient, and a loss term, under the step's scopes."""
    with jax.named_scope("teacher_t"):
        target = jax.lax.stop_gradient(jnp.tanh(x @ w_teacher))

    def loss(w):
        h = x @ w
        with jax.named_scope("term_mse"):
            return jnp.mean((jnp.tanh(h) - target) ** 2)

    value, grad = jax.value_and_grad(loss)(w_student)
    return value, w_student - 0.1 * grad


def _args():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((M, K)), jnp.float32), jnp.asarray(rng.standard_normal((K, N)), jnp.float32),
            jnp.asarray(rng.standard_normal((K, N)), jnp.float32))


def test_instructions_know_each_dot_its_flops_and_part():
    hlo = jax.jit(_scoped_step).lower(*_args()).compile().as_text()
    table = profile_lib.instructions(hlo)
    matmuls = [i for i in table.values() if i.kind == "matmul"]
    by_part = {}
    for ins in matmuls:
        by_part[ins.part] = by_part.get(ins.part, 0.0) + ins.flops
    # teacher x @ Wt, student forward x @ Ws, and the weight gradient x^T @ dh: 2·M·K·N each (no dx: x is data).
    assert by_part == {"teacher": 2 * M * K * N, "student forward": 2 * M * K * N, "student backward": 2 * M * K * N}
    # The update w - 0.1·g is the optimizer's; the loss term's ops fuse into fusions named after their root op.
    assert "optimizer and other" in {i.part for i in table.values() if i.kind == "other"}


@pytest.mark.parametrize("op_name,part", [
    ("jit(step)/teacher_teacher/dot_general", "teacher"),
    ("jit(step)/jvp(student)/term_kd/log_softmax", "loss terms"),
    ("jit(step)/transpose(jvp(student))/term_kd/mul", "loss terms"),
    ("jit(step)/transpose(jvp(student))/dot_general", "student backward"),
    ("jit(step)/jvp(student)/dot_general", "student forward"),
    ("jit(step)/add", "optimizer and other"),
])
def test_part_of_reads_the_step_scopes(op_name, part):
    assert profile_lib.part_of(op_name) == part


def test_wall_time_is_split_between_ops_running_together_and_given_to_the_innermost():
    # Two threads: a runs alone for 50 ns, a and b together for 50, b alone for 50.
    shares, busy = profile_lib._wall_shares([[(0, 100, "a")], [(50, 150, "b")]])
    assert shares == {"a": 75, "b": 75} and busy == 150
    # A loop op's event contains its body's: the body is charged for its own span, the loop for the rest.
    shares, busy = profile_lib._wall_shares([[(0, 100, "while"), (10, 60, "body"), (200, 210, "after")]])
    assert shares == {"while": 50, "body": 50, "after": 10} and busy == 110
    # A plain dot returns after handing its work to the thread pool: the untraced stretch after it, inside
    # the call's window, is its work; a stretch after the window closed (between calls) is nobody's.
    lines = [[(0, 1, "dot"), (20, 30, "add"), (60, 70, "dot")]]
    shares, busy = profile_lib._wall_shares(lines, windows=[(0, 40), (60, 75)], asynchronous=lambda n: n == "dot")
    assert shares == {"dot": 1 + 19 + 10, "add": 10} and busy == 40


def test_profile_calls_traces_and_attributes_a_real_run(tmp_path):
    args = _args()
    fn = jax.jit(_scoped_step)
    jax.block_until_ready(fn(*args))
    seen = []

    def thread(prev, out):  # the updated student weights feed the next call, as a donated state would
        seen.append(out[1])
        return prev[0], prev[1], out[1]

    b = profile_lib.profile_calls(fn, *args, calls=3, directory=str(tmp_path / "trace"), thread=thread)
    assert len(seen) == 3 and b.last_args[2] is seen[-1]
    rows = {(r.part, r.kind): r for r in b.rows}
    assert rows[("teacher", "matmul")].flops == 2 * M * K * N  # per call, from the trace's op runs
    assert 0 < b.busy_s and b.wall_s > 0
    assert sum(r.seconds for r in b.rows) == pytest.approx(b.busy_s, rel=1e-6)
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # kept for TensorBoard / XProf
    text = profile_lib.format_breakdown(b)
    assert "| teacher |" in text and "| student backward |" in text and "slowest ops" in text


def test_kd_step_profile_counts_the_teacher_flops_of_its_architecture(tmp_path):
    from kdjax.distill.run import Distillation

    layers, d, heads, inter, labels = 2, 32, 4, 64, 3
    teacher_dir = save_teacher(tiny_teacher(layers=layers, hidden=d, heads=heads, num_labels=labels), str(tmp_path / "t"))
    run = Distillation(tiny_config(teacher_dir, method="kd", student_layers=1))
    runner = run.runner(0)
    b_size, s_len = 4, 16
    batch = run.prepare_batch({"input_ids": np.full((b_size, s_len), 1000, np.int32),
                               "attention_mask": np.ones((b_size, s_len), np.int32),
                               "labels": np.zeros((b_size,), np.int32)})
    state, teacher_params = run.init_state(0), run.teacher_params(0)
    state, _ = jax.block_until_ready(runner.step_fn(state, teacher_params, batch))
    b = profile_lib.profile_calls(runner.step_fn, state, teacher_params, batch, calls=2,
                                  directory=str(tmp_path / "trace"), thread=lambda a, out: (out[0],) + tuple(a[1:]))
    parts = {r.part for r in b.rows}
    assert {"teacher", "student forward", "student backward", "loss terms", "optimizer and other"} <= parts
    tokens = b_size * s_len
    per_layer = 2 * tokens * (4 * d * d + 2 * d * inter) + 2 * 2 * b_size * s_len * s_len * d  # projections, MLP, QK^T, PV
    heads_flops = 2 * b_size * d * d + 2 * b_size * d * labels  # pooler and classifier: KD reads the teacher's logits
    teacher = next(r for r in b.rows if r.part == "teacher" and r.kind == "matmul")
    assert teacher.flops == layers * per_layer + heads_flops


def test_check_tracer_refuses_where_libtpu_would_crash_a_cpu_trace(monkeypatch):
    from jax._src import xla_bridge

    if not profile_lib.libtpu_loaded():  # a TPU plan compiled earlier in this worker loads it
        profile_lib.check_tracer()  # the suite runs with JAX_PLATFORMS=cpu: tracing is safe
    # As without JAX_PLATFORMS on a machine with libtpu and no TPU: the TPU plugin was tried, only the CPU came up.
    monkeypatch.setitem(xla_bridge._backend_factories, "tpu", object())
    platforms = jax.config.jax_platforms
    jax.config.update("jax_platforms", "")
    try:
        with pytest.raises(profile_lib.ProfileError, match="JAX_PLATFORMS=cpu") as refused:
            profile_lib.check_tracer()
    finally:
        jax.config.update("jax_platforms", platforms)
    from kdjax.cli import is_user_error
    assert is_user_error(refused.value)  # the CLIs print it as one line, no traceback


def test_breakdown_rejects_text_that_is_no_hlo_module():
    with pytest.raises(profile_lib.ProfileError, match="no HLO computations"):
        profile_lib.instructions("not an HLO module")


def test_training_traces_the_configured_steps_into_the_workdir(tmp_path, caplog):
    import logging

    from kdjax.distill.run import Distillation

    teacher_dir = save_teacher(tiny_teacher(layers=2, hidden=32), str(tmp_path / "t"))
    config = tiny_config(teacher_dir, method="kd", student_layers=1, steps=4, profile_steps=2, profile_start=1)
    with caplog.at_level(logging.INFO, logger="kdjax"):
        Distillation(config).fit(str(tmp_path / "run"))
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1
    # The traced steps ran the step program: its ops are in the trace.
    names = {e.name for p in jax.profiler.ProfileData.from_file(str(traces[0])).planes for line in p.lines
             for e in line.events}
    assert any(n.startswith(("fusion", "dot", "ynn_fusion", "loop_")) for n in names)
    assert "profile of steps 2-3 written under" in caplog.text


def test_benchmark_step_profile_reports_the_split(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kdjax_bench_step_profile", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "step.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    teacher = save_teacher(tiny_teacher(head="base", layers=6, hidden=48, heads=12), str(tmp_path / "t"))
    out = tmp_path / "step.json"
    bench.main(["step.py", f"--config={bench.DEFAULT_CONFIG}:steps=10", f"--config.teacher.path={teacher}",
                "--batch=4", "--seq=16", "--repeats=1", "--warmup=0", "--torch=false", f"--output={out}",
                "--profile=2", f"--profile_dir={tmp_path / 'profile'}"])
    import json
    prof = json.loads(out.read_text())["profile"]
    assert prof["calls"] == 2 and 0 < prof["busy_s"] <= prof["wall_s"] * 1.01
    parts = {r["part"] for r in prof["rows"]}
    assert {"teacher", "student forward", "student backward", "loss terms", "optimizer and other"} <= parts
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    printed = capsys.readouterr().out
    assert "where the full step's time goes" in printed and "| student backward |" in printed


def test_check_tracer_refuses_once_a_tpu_plan_loaded_libtpu():
    # In a fresh process restricted to the CPU: tracing is allowed until a TPU topology loads libtpu.
    code = ("from kdjax.profile import check_tracer, ProfileError\n"
            "check_tracer()\n"
            "from jax.experimental import topologies\n"
            "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')\n"
            "try:\n    check_tracer()\nexcept ProfileError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: cannot trace: libtpu is loaded in this process" in done.stdout
