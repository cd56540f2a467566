"""Annealing-KD (kdjax/methods/annealing_kd.py) against float64 NumPy formulas of GKD spec §11: the
annealed MSE of stage 1 from plain forward passes, the Φ staircase (exact integer arithmetic) and the
hard-label stage 2."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.methods import MethodError, get_method
from kdjax.methods.annealing_kd import annealing_factor
from kdjax.models.transformer import forward

STEPS = 4


def phi_reference(step, steps, max_t):
    """Φ = 1 − (max(1, ⌈τ⌉) − 1)/τ_max with τ = (1 − step/steps)·τ_max, ⌈·⌉ in integers (integer τ_max)."""
    ceil = -(-max_t * (steps - step) // steps)
    return 1.0 - (max(1, ceil) - 1) / max_t


def _config():
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=2, init="uniform")
    c.method = "annealing_kd"
    c.method_args = {"annealing_kd": {}}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=4, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=2)
    return c


@pytest.mark.parametrize("steps", [4, 7, 10, 70, 999, 30000])
def test_staircase_is_exact_at_every_step(steps):
    step = np.arange(steps + 1)
    progress = np.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)  # as the engine computes it
    got = np.asarray(annealing_factor(progress, 7.0))
    want = np.array([phi_reference(int(s), steps, 7) for s in step])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert set(np.round(want * 7).astype(int)) == set(range(1, 8)) or steps < 7


def test_two_stages_equal_numpy_reference():
    teacher = tiny_teacher(layers=4, hidden=32, seed=3)
    run = Distillation(_config(), teachers={"teacher": (teacher, 1.0)})
    assert [s.name for s in run.method.stages] == ["annealing", "hard"]
    it = iter(make_stage_loader(run, 0, seed=0))
    state = run.init_state(0)
    for step in range(STEPS):
        batch = next(it)
        b = run.prepare_batch(batch)
        s_out, _ = forward(run.student.graphdef, state.params, b)
        t_out, _ = forward(teacher.graphdef, teacher.params, b)
        phi = phi_reference(step, STEPS, 7)
        expected = np.mean((np.asarray(s_out.logits, np.float64) - phi * np.asarray(t_out.logits, np.float64)) ** 2)
        state, metrics = run.train_step(state, batch, stage=0)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(values["annealed_mse/phi"], phi, rtol=1e-6)
    state = run.init_state(1, params=state.params)
    batch = next(iter(make_stage_loader(run, 1, seed=1)))
    b = run.prepare_batch(batch)
    s_out, _ = forward(run.student.graphdef, state.params, b)
    z = np.asarray(s_out.logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
    labels = np.asarray(b["labels"])
    _, metrics = run.train_step(state, batch, stage=1)
    np.testing.assert_allclose(metric_values(metrics)["loss"], -logq[np.arange(len(labels)), labels].mean(),
                               rtol=1e-4)


def test_recipe_arguments():
    m = get_method("annealing_kd", max_t=5, steps={"annealing": 10, "hard": 3})
    assert [(s.name, s.steps) for s in m.stages] == [("annealing", 10), ("hard", 3)]
    assert m.stages[0].terms[0].kwargs == {"max_t": 5.0}
    assert len(get_method("annealing_kd", hard_stage=False).stages) == 1
    with pytest.raises(MethodError):
        get_method("annealing_kd", max_t=0.5)
