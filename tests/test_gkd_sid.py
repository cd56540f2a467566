"""SID (kdjax/methods/sid.py) against a float64 NumPy computation of GKD spec §5 from plain forward
passes, through all L_S + 1 phases of a stage (including steps exactly on a phase boundary)."""

import ml_collections
import numpy as np

from distill_fixtures import tiny_teacher
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.models.transformer import forward

STEPS = 6  # student of 2 layers: 3 phases of 2 steps, κ = 1, 1, 2, 2, 3, 3


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_phases_and_loss_equal_numpy_reference():
    teacher = tiny_teacher(layers=4, hidden=32, seed=9)
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=2, init="random")  # a student far from the teacher: losses well above float32 noise
    c.method = "sid"
    c.method_args = {"sid": {}}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=4, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=1)
    run = Distillation(c, teachers={"teacher": (teacher, 1.0)})
    it = iter(make_stage_loader(run, 0, seed=0))
    state = run.init_state()
    taps = {"attention_scores": None, "hidden_states": None}
    for step in range(STEPS):
        kappa = 1 + (step * 3) // STEPS
        batch = next(it)
        b = run.prepare_batch(batch)
        mask = np.asarray(b["attention_mask"]) == 1
        s_out, si = forward(run.student.graphdef, state.params, b, taps)
        t_out, ti = forward(teacher.graphdef, teacher.params, b, taps)
        expected = 0.0
        if kappa <= 2:
            for i in range(1, kappa + 1):
                j = 2 * i
                ls_ = _log_softmax(np.asarray(si.attention_scores[i - 1], np.float64))
                lt_ = _log_softmax(np.asarray(ti.attention_scores[j - 1], np.float64))
                p = np.exp(lt_)
                kl = np.sum(np.where(p > 0, p * (lt_ - ls_), 0.0), -1)          # [B, H, S]
                rows = np.broadcast_to(mask[:, None, :], kl.shape)
                expected += kl[rows].mean()
                s = np.asarray(si.hidden_states[i], np.float64)[:, 0]
                t = np.asarray(ti.hidden_states[j], np.float64)[:, 0]
                cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
                expected += np.mean(1 - cos)
        else:
            zs, zt = np.asarray(s_out.logits, np.float64), np.asarray(t_out.logits, np.float64)
            expected = np.mean(-np.sum(np.exp(_log_softmax(zt)) * _log_softmax(zs), -1))
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        assert values["sid/phase"] == kappa, step
        np.testing.assert_allclose(values["loss"], expected, rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
