"""A config-driven `Distillation` on a mesh of 8 fake CPU devices trains like the one-device run.

The same tiny BERT teacher and student, the same batches: once with `config.mesh` (fsdp=4 x tensor=2,
teacher and student with their own rules) and once without a mesh. Losses, per-term metrics and the
updated student parameters agree within 1e-5, every array sits in the layout its rules ask for, and
the trainer's checkpoints restore into that layout.
"""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from kdjax import sharding as S
from kdjax.distill import Distillation
from kdjax.hub.api import flat_params
from kdjax.models.config import ConfigError
from tests.distill_fixtures import save_teacher, tiny_config, tiny_teacher

BATCH, SEQ, STEPS = 8, 16, 2
MESH = dict(axes=("data", "fsdp", "tensor"), ici=(1, 4, 2))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    teacher = tiny_teacher(head="mlm", layers=2, hidden=32, heads=4)
    return save_teacher(teacher, str(tmp_path_factory.mktemp("teacher") / "t"))


def _config(teacher_dir, mesh=None, **kw):
    c = tiny_config(teacher_dir, method="kd+unified", steps=4, batch=BATCH, max_length=SEQ,
                    method_args={"kd": dict(positions="all"), "unified": dict(knowledge=("hidden", "attention"))}, **kw)
    c.student.hidden_size = 16
    c.student.num_heads = 4
    c.student.intermediate_size = 32
    c.student.init = "random"
    if mesh is not None:
        c.mesh = mesh
        c.teacher.rules = dict(embed="fsdp", heads="tensor", kv="tensor", mlp="tensor", vocab="tensor")
        c.student.rules = dict(embed="fsdp", mlp="tensor")
    return c


def _batches(vocab):
    rng = np.random.default_rng(3)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(1000, vocab, (BATCH, SEQ)).astype(np.int32)
        mask = np.ones((BATCH, SEQ), np.int32)
        mask[::3, SEQ - 5:] = 0
        labels = np.where((rng.random((BATCH, SEQ)) < 0.3) & (mask == 1), ids, -100).astype(np.int32)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels})
    return out


def _train(run):
    state = run.init_state()
    history = []
    for batch in _batches(run.student.config.vocab_size):
        state, metrics = run.train_step(state, batch)
        history.append({k: float(s) / max(float(c), 1e-12) for k, (s, c) in jax.device_get(metrics).items()})
    return state, history


@pytest.fixture(scope="module")
def runs(teacher_dir):
    sharded = Distillation(_config(teacher_dir, MESH))
    single = Distillation(_config(teacher_dir))
    return sharded, _train(sharded), single, _train(single)


def test_mesh_run_matches_single_device(runs):
    sharded, (s_state, s_hist), single, (u_state, u_hist) = runs
    assert sharded.sharded and not single.sharded
    assert dict(sharded.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    for a, b in zip(s_hist, u_hist):
        assert set(a) == set(b) and {"loss", "grad_norm"} <= set(a) and len(a) > 3
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    got, want = flat_params(s_state.params), flat_params(u_state.params)
    assert set(got) == set(want)
    moved = 0
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-5, err_msg=name)
        start = flat_params(single.student.params)[name]
        moved += not np.allclose(np.asarray(start), np.asarray(want[name]))
    assert moved > len(want) // 2, "most student parameters should change in two steps"


def _shards(sharding, mesh):
    spec = tuple(sharding.spec)
    return math.prod(mesh.shape[a] for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e))


def test_arrays_follow_their_rules(runs):
    sharded, (state, _), _, _ = runs
    mesh = sharded.mesh
    teacher = sharded.teachers["teacher"][0]
    t_flat = flat_params(teacher.params)
    # The teacher's rules split the q kernel [L, D, H*d] over fsdp (embed) and tensor (heads): 8 shards.
    q = t_flat["layers/attn/q/kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor")
    for name, x in t_flat.items():
        per_device = x.addressable_shards[0].data.nbytes
        assert per_device * _shards(x.sharding, mesh) == x.nbytes, name
    # The student has its own rules: heads stay whole (no heads rule), mlp over tensor.
    s_flat = flat_params(state.params)
    assert tuple(s_flat["layers/attn/q/kernel"].sharding.spec) == (None, "fsdp", None)
    assert tuple(s_flat["layers/mlp/up/kernel"].sharding.spec) == (None, "fsdp", "tensor")
    # Adam moments mirror their parameter; the step counter is replicated.
    mu = state.opt_state[1][0].mu["student"]
    assert flat_params(mu)["layers/mlp/up/kernel"].sharding == s_flat["layers/mlp/up/kernel"].sharding
    assert state.step.sharding.is_fully_replicated


def test_one_compile_over_steps(teacher_dir):
    run = Distillation(_config(teacher_dir, MESH))
    runner = run.runner(0)
    state = run.init_state()
    for batch in _batches(run.student.config.vocab_size):
        state, _ = run.train_step(state, batch)
    assert len(runner.step_fn._compiled) == 1
    (fn,) = runner.step_fn._compiled.values()
    assert fn._cache_size() == 1


def test_fit_checkpoints_restore_in_layout(teacher_dir, tmp_path):
    config = _config(teacher_dir, MESH, task="kdjax_corpus")
    config.data.mlm_probability = 0.15  # MLM labels for the hard-label term
    config.train.steps = 4
    run = Distillation(config)
    first = run.fit(str(tmp_path), max_steps=2, export=False)
    assert first["interrupted_at"] == 2
    again = Distillation(config)
    restored = again.fit(str(tmp_path), export=False)
    assert restored["steps"] == 4 and math.isfinite(restored["final_loss"])
    kernel = flat_params(restored["state"].params)["layers/mlp/up/kernel"]
    assert isinstance(kernel.sharding, NamedSharding) and tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")


def test_bad_mesh_and_rules_are_one_line_errors(teacher_dir):
    with pytest.raises(S.MeshError, match="does not divide|multiplies to"):
        Distillation(_config(teacher_dir, dict(axes=("data", "fsdp", "tensor"), ici=(1, 3, 1))))
    bad = _config(teacher_dir, MESH)
    bad.teacher.rules = dict(embed="model")
    with pytest.raises((S.ShardingError, S.MeshError, ConfigError, ValueError), match="model"):
        Distillation(bad)
    odd = _config(teacher_dir, MESH)
    odd.data.train.batch_size = 6
    run = Distillation(odd)
    batch = {k: v[:6] for k, v in _batches(run.student.config.vocab_size)[0].items()}
    with pytest.raises(S.ShardingError, match="multiple of 4"):
        run.train_step(run.init_state(), batch)


def test_teacher_is_streamed_into_its_layout(teacher_dir, monkeypatch):
    from kdjax.hub import streaming
    calls = []
    real = streaming.load_sharded

    def spy(path, mesh, rules, **kw):
        stats = streaming.ReadStats()
        model = real(path, mesh, rules, stats=stats, **kw)
        calls.append((dict(mesh.shape), stats))
        return model

    monkeypatch.setattr(streaming, "load_sharded", spy)
    run = Distillation(_config(teacher_dir, MESH))
    assert len(calls) == 1 and calls[0][0] == {"data": 1, "fsdp": 4, "tensor": 2}
    teacher = run.teachers["teacher"][0]
    total = sum(x.nbytes for x in flat_params(teacher.params).values())
    # Each byte of the checkpoint is read once by this (single) process, not once per device.
    assert calls[0][1].process_bytes == total
