"""Dynamic KD (`uncertainty`): the routed loss against a NumPy float64 computation of GKD §15."""

import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import config, forwards, hard_ce, kl, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader


@pytest.fixture(scope="module")
def teachers():
    return {"small": (tiny_teacher(layers=2, hidden=32, seed=1), 1.0),
            "large": (tiny_teacher(layers=4, hidden=48, heads=4, seed=2), 1.0)}


@pytest.fixture(scope="module")
def batches(teachers):
    run = Distillation(config("uncertainty"), teachers=teachers)
    it = iter(make_stage_loader(run, 0, seed=0))
    return [next(it) for _ in range(2)]


def reference(run, params, batch, selection, one_over_k=False):
    (s_out, _), t, b = forwards(run, params, batch)
    z = np.asarray(s_out.logits, np.float64)
    logq = log_softmax(z)
    u = -np.sum(np.exp(logq) * logq, -1) / np.log(z.shape[-1])
    B, K = len(u), 2
    names = ["small", "large"]
    if selection == "hard":
        order = sorted(range(B), key=lambda i: (-u[i], i))          # most uncertain first
        rank = np.empty(B, int)
        rank[order] = np.arange(1, B + 1)
        bucket = np.ceil(rank * K / B).astype(int) - 1
        r = np.stack([(bucket == k).astype(float) for k in range(K)])
        scale = 1.0 / K if one_over_k else 1.0
    else:
        r = np.stack([2 * u, 2 * (1 - u)])
        scale = 1.0 / K
    kd = sum(np.mean(r[k] * kl(t[n][0].logits, z)) for k, n in enumerate(names))
    ce = np.mean(hard_ce(z, b["labels"]))
    return scale * kd + ce, r


@pytest.mark.parametrize("selection,one_over_k,steps", [("hard", False, 2), ("soft", False, 1), ("hard", True, 1)])
def test_loss_equals_numpy_reference(teachers, batches, selection, one_over_k, steps):
    run = Distillation(config("uncertainty", {"selection": selection, "one_over_k": one_over_k}), teachers=teachers)
    state = run.init_state()
    for step, batch in enumerate(batches[:steps]):
        expected, r = reference(run, state.params, batch, selection, one_over_k)
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=2e-4, err_msg=f"{selection} step {step}")
        if selection == "hard":
            # Two teachers: the most uncertain half of the batch learns from the small one.
            assert values["uncertainty/share_small"] == pytest.approx(0.5)
            assert r[0].sum() == r[1].sum() == 4
        assert np.isfinite(values["grad_norm"])


def test_hard_buckets_for_three_teachers_follow_the_rank_formula():
    from kdjax.methods.uncertainty import teacher_weights
    import jax.numpy as jnp
    u = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8])
    w = np.asarray(teacher_weights(jnp.asarray(u), 3, "hard"))
    rank = np.argsort(np.argsort(-u)) + 1
    expected = np.ceil(rank * 3 / 7).astype(int) - 1
    np.testing.assert_array_equal(w.argmax(0), expected)
    assert np.all(w.sum(0) == 1)
    soft = np.asarray(teacher_weights(jnp.asarray(u), 3, "soft"))
    raw = np.stack([u + (1 - 2 * u) * k / 2 for k in range(3)])
    np.testing.assert_allclose(soft, 3 * raw / raw.sum(0), rtol=1e-6)
