"""RAIL-KD (kdjax/methods/rail_kd.py) against a float64 NumPy computation of the GKD spec §2 formula,
written here from plain forward passes; the random teacher layers for their distribution, their
period and their reproducibility from the step alone."""

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import assert_copy_resumes_bit_identically
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.knowledge import registry
from kdjax.methods import MethodError, get_method
from kdjax.models.transformer import forward

STEPS = 4
EVERY = 2


def _config(**method_args):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=3, init="uniform")
    c.method = "rail_kd"
    c.method_args = {"rail_kd": dict(dict(steps_per_epoch=EVERY, u=8), **method_args)}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=4, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=5)
    return c


@pytest.fixture(scope="module")
def teachers():
    return {"teacher": (tiny_teacher(layers=5, hidden=32, seed=11), 1.0)}


@pytest.fixture(scope="module")
def run(teachers):
    return Distillation(_config(), teachers=teachers)


@pytest.fixture(scope="module")
def batches(run):
    it = iter(make_stage_loader(run, 0, seed=0))
    return [next(it) for _ in range(STEPS)]


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _drawn(run, step, count=2, high=5, every=EVERY):
    """Sorted draw of `count` teacher layers from 1..high-1, from the stage key and step // every."""
    base = jax.random.fold_in(run.runner(0).stage_key, zlib.crc32(b"rail_kd/teacher/layers") & 0x7FFFFFFF)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(base, step // every), high - 1))
    return np.sort(perm[:count]) + 1


def _reference(run, state, batch, step):
    b = run.prepare_batch(batch)
    s_out, s_inter = forward(run.student.graphdef, state.params, b, {"hidden_states": None})
    teacher = run.teachers["teacher"][0]
    t_out, t_inter = forward(teacher.graphdef, teacher.params, b, {"hidden_states": None})
    zs, zt = np.asarray(s_out.logits, np.float64), np.asarray(t_out.logits, np.float64)
    labels = np.asarray(b["labels"])
    T = 10.0
    p = np.exp(_log_softmax(zt / T))
    soft = np.mean(-np.sum(p * _log_softmax(zs / T), -1))
    hard = np.mean(-_log_softmax(zs)[np.arange(len(labels)), labels])
    layers = _drawn(run, step)
    hs = np.asarray(s_inter.hidden_states, np.float64)       # [4, B, S, D]
    ht = np.asarray(t_inter.hidden_states, np.float64)       # [6, B, S, D]
    us = np.concatenate([hs[i].mean(1) for i in (1, 2)], -1)  # pads included
    ut = np.concatenate([ht[j].mean(1) for j in layers], -1)
    ws = {k: np.asarray(v, np.float64) for k, v in state.modules["rail_kd/student_proj"].items()}
    wt = {k: np.asarray(v, np.float64) for k, v in state.modules["rail_kd/teacher_proj"]["teacher"].items()}
    s = us @ ws["kernel"] + ws["bias"]
    t = ut @ wt["kernel"] + wt["bias"]
    s = s / np.linalg.norm(s, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    inter = np.sum((s - t) ** 2)
    return (soft + hard + inter) / 3.0, layers


def test_loss_equals_numpy_reference_and_layers_follow_the_period(run, batches):
    state = run.init_state()
    assert state.modules["rail_kd/student_proj"]["kernel"].shape == (2 * 32, 8)
    assert state.modules["rail_kd/teacher_proj"]["teacher"]["kernel"].shape == (2 * 32, 8)
    drawn = []
    for step, batch in enumerate(batches):
        expected, layers = _reference(run, state, batch, step)
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=1e-4, err_msg=f"step {step}")
        got = [int(round(values[f"rail_kd/teacher_layer{k}"])) for k in range(2)]
        assert got == list(layers)
        drawn.append(tuple(got))
    assert drawn[0] == drawn[1] and drawn[2] == drawn[3]  # one draw per period of EVERY steps


def test_draws_are_uniform_sorted_subsets_and_a_function_of_the_step(run, teachers):
    draws = [tuple(_drawn(run, s * EVERY)) for s in range(600)]
    assert all(a < b for a, b in draws) and min(map(min, draws)) >= 1 and max(map(max, draws)) <= 4
    subsets = [(a, b) for a in range(1, 5) for b in range(a + 1, 5)]
    counts = np.array([draws.count(s) for s in subsets])
    expected = len(draws) / len(subsets)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 20.5, (counts, chi2)  # 5 degrees of freedom, p = 0.001
    term = next(t for t in run.method.stages[0].terms if t.name == "rail_kd")
    for step in (0, 1, 2, 7, 9):
        ctx = registry.TermContext(step=jnp.asarray(step), progress=0.0, stage_key=run.runner(0).stage_key,
                                   batch={}, student=run.student.config, teacher=teachers["teacher"][0].config,
                                   teacher_name="teacher", s_out=None, s_inter=None, t_out=None, t_inter=None)
        np.testing.assert_array_equal(np.asarray(ctx.random_layers(term, "teacher", 2, every=EVERY, low=1, high=5)),
                                      _drawn(run, step))


def test_state_copied_after_k_steps_continues_bit_identically(run, batches):
    assert_copy_resumes_bit_identically(run, batches, k=3)


def test_recipe_structure_and_arguments():
    method = get_method("rail_kd")
    (stage,) = method.stages
    assert [(t.name, t.fn, t.weight) for t in stage.terms] == [
        ("soft_ce", "soft_cross_entropy", 1 / 3), ("hard_ce", "cross_entropy", 1 / 3), ("rail_kd", "rail_kd", 1 / 3)]
    soft = stage.terms[0].kwargs
    assert soft["temperature"] == 10.0 and soft["scale_by_t2"] is False
    assert stage.terms[2].kwargs["every"] == 3000 and stage.terms[2].kwargs["pooling"] == "all"
    assert {m.name for m in stage.modules} == {"rail_kd/student_proj", "rail_kd/teacher_proj"}
    assert get_method("rail_kd", steps_per_epoch=10, epochs_per_draw=3).stages[0].terms[2].kwargs["every"] == 30
    with pytest.raises(MethodError):
        get_method("rail_kd", pooling="max")
    with pytest.raises(MethodError):
        get_method("rail_kd", steps_per_epoch=0)
