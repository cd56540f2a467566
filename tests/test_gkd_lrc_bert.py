"""LRC-BERT: the in-batch COS-NCE loss against a NumPy float64 computation of GKD §10."""

import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import config, forwards
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader


@pytest.fixture(scope="module")
def teacher():
    return {"teacher": (tiny_teacher(layers=4, hidden=32, seed=1), 1.0)}


@pytest.fixture(scope="module")
def batches(teacher):
    run = Distillation(config("lrc_bert"), teachers=teacher)
    it = iter(make_stage_loader(run, 0, seed=0))
    return [next(it) for _ in range(2)]


def cos_nce(run, state, batch):
    (_, s_inter), t, _ = forwards(run, state.params, batch, {"hidden_states": None})
    hs = np.asarray(s_inter.hidden_states, np.float64)
    ht = np.asarray(t["teacher"][1].hidden_states, np.float64)
    w = np.asarray(state.modules["lrc_fit"]["teacher"]["kernel"], np.float64)
    layers = hs.shape[0] - 1
    stride = (ht.shape[0] - 1) // layers
    B = hs.shape[1]
    g = np.zeros((B, B))
    for i in range(1, layers + 1):
        s = hs[i] @ w
        t_ = ht[i * stride]
        for a in range(B):
            for c in range(B):
                cos = np.sum(s[a] * t_[c], -1) / (np.linalg.norm(s[a], axis=-1) * np.linalg.norm(t_[c], axis=-1))
                g[a, c] += cos.mean() / layers
    g = 1.0 - g
    per = [1 + g[a, a] - (np.sum(g[a]) - B * g[a, a]) / (2 * (B - 1)) for a in range(B)]  # GLMKD's code form
    return layers * np.mean(per)


def test_contrastive_stage_loss_equals_numpy_reference(teacher, batches):
    run = Distillation(config("lrc_bert", {"stages": ["contrastive"]}), teachers=teacher)
    state = run.init_state()
    for step, batch in enumerate(batches):
        expected = cos_nce(run, state, batch)
        state, metrics = run.train_step(state, batch)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4, err_msg=f"step {step}")


def test_gradient_perturbation_runs_and_changes_the_loss(teacher, batches):
    run = Distillation(config("lrc_bert", {"stages": ["contrastive"], "perturb": True}), teachers=teacher)
    state = run.init_state()
    plain = cos_nce(run, state, batches[0])
    state, metrics = run.train_step(state, batches[0])
    values = metric_values(metrics)
    assert np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])
    assert abs(values["loss"] - plain) > 1e-6, "the perturbed pass gave the unperturbed loss"
