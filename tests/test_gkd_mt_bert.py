"""MT-BERT and TMKD: multi-teacher losses against NumPy float64 computations of GKD §13/§14."""

import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import config, forwards, hard_ce, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader


@pytest.fixture(scope="module")
def teachers():
    return {"small": (tiny_teacher(layers=2, hidden=32, seed=1), 1.0),
            "large": (tiny_teacher(layers=4, hidden=48, heads=4, seed=2), 1.0)}


@pytest.fixture(scope="module")
def batches(teachers):
    run = Distillation(config("tmkd"), teachers=teachers)
    it = iter(make_stage_loader(run, 0, seed=0))
    return [next(it) for _ in range(2)]


def mt_bert_reference(run, state, batch, layers="uniform"):
    (s_out, s_inter), t, b = forwards(run, state.params, batch, {"hidden_states": None})
    z = np.asarray(s_out.logits, np.float64)
    y = np.asarray(b["labels"])
    mask = np.asarray(b["attention_mask"], np.float64)
    hs = np.asarray(s_inter.hidden_states, np.float64)
    total = np.mean(hard_ce(z, y))
    for name, (t_out, t_inter) in t.items():
        zt = np.asarray(t_out.logits, np.float64)
        w = 1.0 / (1.0 + hard_ce(zt, y))
        soft = -np.sum(np.exp(log_softmax(zt)) * log_softmax(z), -1)
        total += np.mean(w * soft)
        ht = np.asarray(t_inter.hidden_states, np.float64)
        fit = {k: np.asarray(v, np.float64) for k, v in state.modules["mt_bert_fit"][name].items()}
        stride = (ht.shape[0] - 1) // (hs.shape[0] - 1)
        offset = ht.shape[0] - hs.shape[0]
        for i in range(1, hs.shape[0]):
            j = i * stride if layers == "uniform" else i + offset  # "last": the teacher's top L_S layers
            diff = hs[i] - (ht[j] @ fit["kernel"] + fit["bias"])
            total += np.sum(np.mean(diff ** 2, -1) * mask) / mask.sum()
    return total


def test_mt_bert_loss_equals_numpy_reference(teachers, batches):
    run = Distillation(config("mt_bert"), teachers=teachers)
    state = run.init_state()
    assert state.modules["mt_bert_fit"]["large"]["kernel"].shape == (48, 32)
    fit_before = np.array(state.modules["mt_bert_fit"]["large"]["kernel"])
    for step, batch in enumerate(batches):
        expected = mt_bert_reference(run, state, batch)
        state, metrics = run.train_step(state, batch)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4, err_msg=f"step {step}")
    assert not np.allclose(fit_before, state.modules["mt_bert_fit"]["large"]["kernel"]), "F_k was not trained"


def test_mt_bert_last_layers_match_the_teachers_top_layers(teachers, batches):
    """`layers="last"` (teachers whose depths are not multiples of the student's): student layer i against
    each teacher's layer L_T - L_S + i."""
    run = Distillation(config("mt_bert", {"layers": "last"}), teachers=teachers)
    state = run.init_state()
    expected = mt_bert_reference(run, state, batches[0], layers="last")
    assert not np.isclose(expected, mt_bert_reference(run, state, batches[0]))  # the maps differ for the 4-layer teacher
    _, metrics = run.train_step(state, batches[0])
    np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4)


def test_tmkd_loss_equals_numpy_reference(teachers, batches):
    run = Distillation(config("tmkd"), teachers=teachers)
    state = run.init_state()
    for step, batch in enumerate(batches):
        (s_out, _), t, b = forwards(run, state.params, batch)
        z = np.asarray(s_out.logits, np.float64)
        mse = np.mean([np.mean((z - np.asarray(o.logits, np.float64)) ** 2) for o, _ in t.values()])
        expected = mse + 0.5 * np.mean(hard_ce(z, b["labels"]))
        state, metrics = run.train_step(state, batch)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4, err_msg=f"step {step}")
