"""`kdjax.plan`: AOT compile of the real KD step for a topology, its memory report and its errors."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import pytest

from configs import common
from kdjax import plan as P
from kdjax import sharding as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = dict(model_type="llama", vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=64, head="causal_lm", dtype="bfloat16", param_dtype="bfloat16")
STUDENT = dict(model_type="llama", vocab_size=128, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=32, head="causal_lm")
BYTE_FIELDS = ("argument bytes:", "output bytes:", "alias bytes:", "temp bytes:", "code bytes:",
               "total per device:", "device memory:", "compile time:")

CONFIG_FILE = '''
from configs import common


def get_config(arg=None):
    c = common.base_config()
    c.teacher.model = {teacher!r}
    c.student.model = {student!r}
    c.method = "minillm"
    c.data.train.batch_size = 4
    c.data.train.max_length = 16
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 2), dcn=(1, 1, 1))
    return c
'''


def tiny_config(**mesh):
    c = common.base_config()
    c.teacher.model = dict(TEACHER)
    c.student.model = dict(STUDENT)
    c.method = "minillm"
    c.data.train.batch_size = 4
    c.data.train.max_length = 16
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=mesh.get("ici", (1, -1, 2)), dcn=(1, 1, 1))
    return c


@pytest.fixture(scope="module")
def cpu8_result():
    return P.plan_step(tiny_config(), P.get_topology("cpu:8", device_memory_gb=1.0))


def test_cpu8_plan_fits_and_reports_every_byte_field(cpu8_result):
    r = cpu8_result
    assert r.fits and r.exit_code == 0
    assert r.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 2} and r.num_devices == 8
    text = P.format_result(r)
    for field in BYTE_FIELDS:
        assert field in text
    assert "FITS" in text and "DOES NOT FIT" not in text
    assert r.memory.total == r.memory.argument + r.memory.output - r.memory.alias + r.memory.temp + \
        r.memory.generated_code
    assert r.memory.temp > 0 and r.compile_seconds > 0


def test_memory_matches_shardings_computed_by_hand(cpu8_result):
    r = cpu8_result
    # Teacher params by hand under DEFAULT_TEACHER_RULES on fsdp=4 x tensor=2 (bf16, 2 bytes):
    # embed [128, 32] and decoder [32, 128] split 8 ways; q/o [1, 32, 32] 8 ways; k/v [1, 32, 16] 8 ways;
    # gate/up/down [1, 32, 64] 8 ways; the three [32] norm scales are replicated.
    by_hand = 2 * (2 * 128 * 32 // 8 + 2 * 32 * 32 // 8 + 2 * 32 * 16 // 8 + 3 * 32 * 64 // 8 + 3 * 32)
    assert r.teacher_param_bytes_per_device == by_hand
    assert r.teacher_params == P.models_from_config(tiny_config())[1]["teacher"].num_params()
    # XLA's own accounting agrees: the arguments are exactly the sharded inputs, and the donated
    # train state comes back in the same buffers.
    assert r.memory.argument == r.input_bytes_per_device
    assert r.memory.alias == r.state_bytes_per_device
    assert r.memory.output >= r.memory.alias


def test_tiny_memory_does_not_fit(cpu8_result):
    small = dataclasses.replace(cpu8_result, device_memory=1024)
    assert not small.fits and small.exit_code == 1
    assert "DOES NOT FIT" in P.format_result(small)


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    cfg = tmp_path / "tiny_plan.py"
    cfg.write_text(CONFIG_FILE.format(teacher=TEACHER, student=STUDENT))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the CLI must set up its own virtual devices for cpu:N

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kdjax.plan", f"--config={cfg}", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    out = cli("--topology=cpu:2", "--device_memory_gb=0.0001")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "DOES NOT FIT" in out.stdout and "fsdp=1 x tensor=2" in out.stdout
    for field in BYTE_FIELDS:
        assert field in out.stdout

    bad = cli("--topology=v9:2x2")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "accepted forms" in bad.stderr


@pytest.mark.parametrize("name", ["v9:2x2", "tpu", "cpu:x", "v5p:4x4", "v5e:4x4x4", "gpu:8"])
def test_bad_topology_is_one_line_with_accepted_forms(name):
    with pytest.raises(P.PlanError) as e:
        P.parse_topology(name)
    assert "\n" not in str(e.value) and name in str(e.value)
    assert "cpu:N" in str(e.value) or "cpu takes a device count" in str(e.value)


def test_topology_parsing_and_memory():
    assert P.parse_topology("v5p:4x4x4").num_chips == 64
    assert P.parse_topology("V5LITEPOD:4x4").generation == "v5e"
    assert P.TPU_GENERATIONS["v5p"].accelerator_type(64) == "v5p-128"
    with pytest.raises(P.PlanError, match="--device_memory_gb"):
        P.get_topology("cpu:8")
    with pytest.raises(P.PlanError, match="needs 64 CPU devices but this process has 8"):
        P.get_topology("cpu:64", device_memory_gb=1)


def test_bad_mesh_rule_and_divisibility_are_one_line():
    topo = P.get_topology("cpu:8", device_memory_gb=1)
    with pytest.raises(S.MeshError) as e:  # 3 does not divide 8
        P.plan_step(tiny_config(ici=(1, 3, 1)), topo)
    assert "\n" not in str(e.value) and "multiplies to 3 but there are 8 devices" in str(e.value)

    c = tiny_config()
    c.teacher.rules = dict(mlp="model")
    with pytest.raises(S.ShardingError) as e:
        P.plan_step(c, topo)
    assert "\n" not in str(e.value) and "'model'" in str(e.value)

    c = tiny_config()
    c.teacher.model.vocab_size = 127  # not divisible by tensor=2; strict plans refuse to replicate it
    c.student.model.vocab_size = 127
    with pytest.raises(S.ShardingError) as e:
        P.plan_step(c, topo)
    assert "\n" not in str(e.value) and "not divisible" in str(e.value)

    c = common.base_config()  # the bare MiniLM encoder by path, with Hinton KD: no logits to distill
    with pytest.raises(ValueError, match="has no head") as e:
        P.plan_step(c, topo)
    assert "\n" not in str(e.value)


def test_search_candidates_cover_every_factorization():
    cands = P.search_candidates(8)
    meshes = sorted({(m.ici[1], m.ici[2]) for m, _ in cands})
    assert meshes == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert {r for _, r in cands} == set(P.REMAT_SEARCH)
    assert all(math.prod(m.ici) == 8 for m, _ in cands)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_compiles_for_a_v5e_topology_without_a_tpu():
    topo = P.get_topology("v5e:2x2")
    assert len(topo.devices) == 4 and "TPU" in topo.device_kind
    assert topo.device_memory_bytes == 16 * P.GIB
    r = P.plan_step(tiny_config(), topo)
    assert r.fits and r.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r.memory.generated_code > 0  # real TPU code was generated
    # TPU buffers are padded to the chip's tiled layouts, so they hold at least the logical bytes.
    assert r.memory.alias >= r.state_bytes_per_device and r.memory.argument >= r.input_bytes_per_device


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_plan_reads_the_hlo_the_compiler_wrote_and_survives_without_it(monkeypatch):
    """jaxlib cannot parse back some modules libtpu emits (`as_text()` fails on async-updates with several
    operands, as the 70B plan on v5p does): a TPU plan analyzes the text the compiler wrote while compiling,
    which gives what `as_text()` gives where both work; with no readable HLO the memory plan still stands."""
    from kdjax import roofline as R

    seen = {}
    estimate_step = R.estimate_step

    def spying(compiled, step, generation, num_chips, hlo_text=None):
        seen.update(compiled=compiled, hlo_text=hlo_text)
        return estimate_step(compiled, step, generation, num_chips, hlo_text=hlo_text)

    monkeypatch.setattr(R, "estimate_step", spying)
    topo = P.get_topology("v5e:2x2")
    r = P.plan_step(tiny_config(), topo)
    assert seen["hlo_text"] and "ENTRY" in seen["hlo_text"] and r.roofline is not None
    dumped, printed = R.analyze(seen["compiled"], seen["hlo_text"]), R.analyze(seen["compiled"])
    assert dumped.flops == printed.flops > 0 and dumped.loops == printed.loops
    assert sorted((c.kind, c.bytes_sent, c.executions) for c in dumped.collectives) == \
        sorted((c.kind, c.bytes_sent, c.executions) for c in printed.collectives)

    def unreadable(*args, **kwargs):
        raise RuntimeError("INTERNAL: RET_CHECK failure async-update instruction should have 1 operands but sees 3")

    monkeypatch.setattr(R, "estimate_step", unreadable)
    r = P.plan_step(tiny_config(), topo)
    assert r.roofline is None and r.fits and "RET_CHECK" in r.roofline_note
    text = P.format_result(r)
    assert "estimate:        no estimate: the optimized HLO could not be read" in text and "result:          FITS" in text


def test_cpu_plans_do_not_count_bf16_layer_stacks_twice():
    """A deeper bf16 teacher adds its sharded weights to the arguments and nothing to the temporaries.

    XLA:CPU would otherwise hoist a float32 copy of every scanned bf16 stack out of the layer loop
    (see `CPU_COMPILER_OPTIONS`), which no accelerator holds.
    """
    topo = P.get_topology("cpu:8", device_memory_gb=1.0)
    results = {}
    for layers in (2, 8):
        c = tiny_config()
        c.teacher.model.update(hidden_size=256, intermediate_size=1024, num_layers=layers, scan_layers=True,
                               remat_policy="full")
        results[layers] = P.plan_step(c, topo)
    per_layer = (results[8].teacher_param_bytes_per_device - results[2].teacher_param_bytes_per_device) // 6
    # By hand: q, o [256, 256], k, v [256, 128], gate/up/down [256, 1024] split 8 ways, two [256] norms whole.
    assert per_layer == 2 * ((2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024) // 8 + 2 * 256)
    growth = results[8].memory.temp - results[2].memory.temp
    assert growth < per_layer, f"6 more teacher layers added {growth / per_layer:.2f} layers of temporaries"
    assert P.compiler_options(topo) == P.CPU_COMPILER_OPTIONS
    assert P.compiler_options(P.Topology(P.parse_topology("v5e:2x2"), [], 1)) == {}


def test_bert_large_tinybert_config_distills_attention_across_head_counts():
    """BERT-large (16 heads) -> TinyBERT-4 (12 heads) keeps attention knowledge as a relation term."""
    import importlib

    from kdjax.methods.base import build_method

    config = importlib.import_module("configs.bert_large_tinybert").get_config()
    method = build_method(config.method, config.method_args.to_dict())
    general = method.stages[0]
    assert [s.name for s in method.stages] == ["general", "task_intermediate", "task_prediction"]
    fns = {t.fn: t for t in general.terms}
    assert "attention_score_mse" not in fns and "hidden_mse" in fns
    relation = fns["qkv_relation_kl"]
    assert relation.layers == "uniform" and relation.kwargs["num_relation_heads"] == 8
    # The same recipe on shrunken models with the real head counts (16 vs 12) compiles and fits.
    config.teacher.model.update(vocab_size=128, hidden_size=64, num_layers=4, intermediate_size=128,
                                max_position_embeddings=32)
    config.student.model.update(vocab_size=128, hidden_size=24, num_layers=2, intermediate_size=48,
                                max_position_embeddings=32)
    config.data.train.update(batch_size=8, max_length=16)
    config.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(-1, 4, 1), dcn=(1, 1, 1))
    r = P.plan_step(config, P.get_topology("cpu:8", device_memory_gb=1.0))
    assert r.fits and r.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 1}


# ------------------------------------------------------------------------------------------------
# Run configs plan as they run: one reading of the config, one stage assembly.


def test_a_run_config_with_a_checkpoint_teacher_plans_like_it_runs(tmp_path):
    """A run config (teacher by path, student derived from it) plans on cpu:8; the planned step's
    models, student layers and taps are those `Distillation` builds for the same config."""
    from distill_fixtures import save_teacher, tiny_config as run_config, tiny_teacher
    from kdjax.distill import Distillation
    path = save_teacher(tiny_teacher(head="classification"), str(tmp_path / "teacher"))
    c = run_config(path, method="tinybert", batch=8, max_length=16)
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 2), dcn=(1, 1, 1))
    c.plan = dict(stage=1, strict=False)
    r = P.plan_step(c, P.get_topology("cpu:8", device_memory_gb=1.0))
    assert r.fits
    planned = P.build_planned_step(c, S.make_mesh(S.MeshConfig.from_config(dict(c.mesh))))
    run = Distillation(c)
    runner = run.runner(1)
    assert planned.student_config == runner.student_config
    assert planned.student_taps == runner.student_taps
    assert [t.taps for t in planned.teachers] == [t.taps for t in runner.teachers]


def test_plan_keeps_zero_teacher_weights_and_per_teacher_rules():
    c = tiny_config()
    c.teachers = dict(big=dict(model=dict(TEACHER), weight=1.0, rules=dict(mlp="fsdp")),
                      off=dict(model=dict(TEACHER), weight=0.0))
    _, _, weights = P.models_from_config(c)
    assert weights == {"big": 1.0, "off": 0.0}
    step = P.build_planned_step(c, S.make_mesh(S.MeshConfig.from_config(dict(c.mesh))))
    assert [t.weight for t in step.teachers] == [1.0, 0.0]
    assert tuple(dict(step.teacher_rules["big"])["mlp"]) == ("fsdp",)
    assert tuple(dict(step.teacher_rules["off"])["mlp"]) != ("fsdp",)
