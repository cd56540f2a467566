"""Continuation-KD (kdjax/methods/continuation_kd.py) against a float64 NumPy computation of GKD spec
§12: the per-example hinge-gated annealed MSE blended with the hard CE by ψ, from plain forward passes
through the engine's step, and on synthetic logits where the margin gate splits the batch."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_fixtures import tiny_config, tiny_teacher
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.knowledge import registry
from kdjax.methods import MethodError, get_method
from kdjax.models.transformer import forward

STEPS = 6


def phi_reference(step, steps, max_t=10):
    ceil = -(-max_t * (steps - step) // steps)
    return 1.0 - (max(1, ceil) - 1) / max_t


def psi_reference(step, steps, sep=0.666, denominator=1.333):
    p = step / steps
    return p / denominator if p <= sep else 1.0


def reference(zs, zt, labels, step, steps, margin=1.0):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    phi, psi = phi_reference(step, steps), psi_reference(step, steps)
    z = zs - zs.max(-1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -logq[np.arange(len(labels)), labels].mean()
    mse = ((zs - phi * zt) ** 2).mean(-1)
    gate = mse > margin * phi
    return np.mean(psi * ce + (1 - psi) * mse * gate), gate


class _Out:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("step", [0, 1, 3, 4, 5])
def test_gate_and_schedules_on_synthetic_logits(step):
    rng = np.random.default_rng(step)
    zs = rng.normal(size=(16, 3)) * 2.0
    noise = rng.normal(size=(16, 3)) * np.linspace(0.05, 3.0, 16)[:, None]
    zt = (zs + noise) / phi_reference(step, STEPS)  # some examples within the margin, some not
    labels = rng.integers(0, 3, 16)
    term = get_method("continuation_kd").stages[0].terms[0]
    cfg = tiny_teacher(layers=2).config
    ctx = registry.TermContext(step=jnp.asarray(step), progress=jnp.asarray(step / STEPS, jnp.float32),
                               stage_key=None, batch={"labels": jnp.asarray(labels)}, student=cfg, teacher=cfg,
                               teacher_name="t", s_out=_Out(jnp.asarray(zs, jnp.float32)), s_inter=None,
                               t_out=_Out(jnp.asarray(zt, jnp.float32)), t_inter=None)
    loss, metrics = registry.get("continuation_kd").apply(ctx, term)
    want, gate = reference(zs, zt, labels, step, STEPS)
    assert 0 < gate.sum() < len(gate)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["continuation/active"][0]), gate.sum())


def test_engine_step_equals_numpy_reference():
    teacher = tiny_teacher(layers=4, hidden=32, seed=4)
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=2, init="uniform")
    c.method = "continuation_kd"
    c.method_args = {"continuation_kd": {"margin": 0.0}}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=4, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=2)
    run = Distillation(c, teachers={"teacher": (teacher, 1.0)})
    it = iter(make_stage_loader(run, 0, seed=0))
    state = run.init_state()
    for step in range(STEPS):
        batch = next(it)
        b = run.prepare_batch(batch)
        s_out, _ = forward(run.student.graphdef, state.params, b)
        t_out, _ = forward(teacher.graphdef, teacher.params, b)
        want, _ = reference(s_out.logits, t_out.logits, np.asarray(b["labels"]), step, STEPS, margin=0.0)
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], want, rtol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(values["continuation/psi"], psi_reference(step, STEPS), rtol=1e-5)
        np.testing.assert_allclose(values["continuation/phi"], phi_reference(step, STEPS), rtol=1e-6)


def test_recipe_arguments():
    (term,) = get_method("continuation_kd").stages[0].terms
    assert term.kwargs == {"max_t": 10.0, "margin": 1.0, "psi_sep": 0.666, "psi_denominator": 1.333}
    with pytest.raises(MethodError):
        get_method("continuation_kd", psi_sep=2.0)
    with pytest.raises(MethodError):
        get_method("continuation_kd", psi_denominator=0)
