"""ALP-KD (kdjax/methods/alp_kd.py) against a float64 NumPy computation of GKD spec §6 from plain
forward passes: attention of each student [CLS] state over every teacher layer's [CLS] state."""

import ml_collections
import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.methods import get_method
from kdjax.models.transformer import forward

STEPS = 2


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _config():
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=2, init="first")
    c.method = "alp_kd"
    c.method_args = {"alp_kd": {}}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=4, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=1)
    return c


def test_loss_equals_numpy_reference():
    teacher = tiny_teacher(layers=4, hidden=32, seed=8)
    run = Distillation(_config(), teachers={"teacher": (teacher, 1.0)})
    state = run.init_state()
    assert not state.modules, "equal widths: ALP-KD has no trainable parameters"
    it = iter(make_stage_loader(run, 0, seed=0))
    for step in range(STEPS):
        batch = next(it)
        b = run.prepare_batch(batch)
        s_out, s_inter = forward(run.student.graphdef, state.params, b, {"hidden_states": None})
        t_out, t_inter = forward(teacher.graphdef, teacher.params, b, {"hidden_states": None})
        s = np.asarray(s_inter.hidden_states, np.float64)[1:, :, 0]      # [Ls, B, D]
        t = np.asarray(t_inter.hidden_states, np.float64)[1:, :, 0]      # [Lt, B, D]
        alp = 0.0
        for i in range(s.shape[0]):
            for b_ in range(s.shape[1]):
                scores = t[:, b_] @ s[i, b_]
                a = np.exp(scores - scores.max())
                a /= a.sum()
                c = a @ t[:, b_]
                alp += np.mean((s[i, b_] - c) ** 2) / s.shape[1]
        zs, zt = np.asarray(s_out.logits, np.float64), np.asarray(t_out.logits, np.float64)
        soft = np.mean(-np.sum(np.exp(_log_softmax(zt / 20)) * _log_softmax(zs / 20), -1))
        labels = np.asarray(b["labels"])
        hard = np.mean(-_log_softmax(zs)[np.arange(len(labels)), labels])
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["alp"], alp, rtol=1e-4)
        np.testing.assert_allclose(values["loss"], alp + 0.7 * soft + 0.1 * hard, rtol=1e-4, err_msg=f"step {step}")


def test_recipe_structure():
    method = get_method("alp_kd")
    assert method.student_init == "first"
    assert [(t.name, t.fn, t.weight) for t in method.stages[0].terms] == [
        ("alp", "alp_kd", 1.0), ("soft_ce", "soft_cross_entropy", 0.7), ("hard_ce", "cross_entropy", 0.1)]
    assert method.stages[0].terms[1].kwargs == {"temperature": 20.0, "scale_by_t2": False}
