"""RL-KD: the policy, its actions, the loss and the policy gradient against NumPy float64 (GKD §16)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_fixtures import tiny_config, tiny_teacher
from gkd_reference import config, forwards, hard_ce, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.stage import stage_key
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.methods import MethodError, get_method
from kdjax.methods.rl_kd import KEY, MODULE, draw_actions, policy_loss, policy_probs

T = 10.0


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def soft_ce(t_logits, s_logits, temperature):
    p = np.exp(log_softmax(np.asarray(t_logits, np.float64) / temperature))
    return -np.sum(p * log_softmax(np.asarray(s_logits, np.float64) / temperature), -1)


def action_key(seed, stage, step):
    return jax.random.fold_in(jax.random.fold_in(stage_key(seed, stage), zlib.crc32(KEY.encode()) & 0x7FFFFFFF), step)


@pytest.fixture(scope="module")
def teachers():
    return {"small": (tiny_teacher(layers=2, hidden=32, seed=1), 1.0),
            "large": (tiny_teacher(layers=4, hidden=48, heads=4, seed=2), 1.0)}


@pytest.mark.parametrize("reward", [1, 2])
def test_loss_equals_numpy_reference(teachers, reward):
    run = Distillation(config("rl_kd", {"reward": reward}, seed=3), teachers=teachers)
    it = iter(make_stage_loader(run, 0, seed=0))
    state = run.init_state()
    for step in range(2 if reward == 1 else 1):
        batch = next(it)
        (s_out, _), t, b = forwards(run, state.params, batch)
        z = np.asarray(s_out.logits, np.float64)
        y = np.asarray(b["labels"])
        names = ["small", "large"]
        ell = np.stack([hard_ce(t[n][0].logits, y) for n in names], -1)
        e = np.asarray(s_out.last_hidden_state, np.float64)[:, 0]
        pol = {k: np.asarray(v, np.float64) for k, v in state.modules[MODULE].items()}
        x1 = np.concatenate([e, ell], -1)
        x2 = np.concatenate([np.asarray(t[n][0].logits, np.float64) for n in names], -1)
        pi = sigmoid(x1 @ pol["w1"] + pol["b1"] + x2 @ pol["w2"] + pol["b2"])
        u = np.asarray(jax.random.uniform(action_key(3, 0, step), pi.shape), np.float64)
        a = (u < pi).astype(np.float64)
        ce = np.mean(hard_ce(z, y))
        kd = np.mean(a * np.stack([soft_ce(t[n][0].logits, z, T) for n in names], -1))
        r = -ce if reward == 1 else -(ce + ell[:, -1].mean())
        rl = -np.sum(np.log(pi * a + (1 - pi) * (1 - a))) * r
        expected = 0.5 * (kd + rl) + 0.5 * ce
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=2e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(values["rl_kd/pick_small"], a[:, 0].mean(), rtol=1e-6)
        np.testing.assert_allclose(values["rl_kd/reward"], r, rtol=2e-4)


@pytest.mark.parametrize("objective", ["log_prob", "prob"])
def test_policy_gradient_equals_numpy(objective):
    rng = np.random.default_rng(0)
    B, K, D, C = 6, 3, 5, 2
    pol = {"w1": rng.normal(size=(D + K, K)), "b1": rng.normal(size=K), "w2": rng.normal(size=(C * K, K)),
           "b2": rng.normal(size=K)}
    s, x = rng.normal(size=(B, D + K)), rng.normal(size=(B, C * K))
    a = (rng.random((B, K)) < 0.5).astype(np.float64)
    reward = -0.7
    pol, s, x = {k: v.astype(np.float32).astype(np.float64) for k, v in pol.items()}, s.astype(np.float32), \
        x.astype(np.float32)
    f = lambda p: policy_loss(policy_probs(p, jnp.asarray(s), jnp.asarray(x)), jnp.asarray(a), reward, objective)
    grads = jax.grad(f)({k: jnp.asarray(v, jnp.float32) for k, v in pol.items()})
    s, x = s.astype(np.float64), x.astype(np.float64)
    pi = sigmoid(s @ pol["w1"] + pol["b1"] + x @ pol["w2"] + pol["b2"])
    # d/d logit of −R·log p is −R(a − π); of −R·p it is −R·(2a − 1)·π(1 − π).
    dlogit = -reward * (a - pi) if objective == "log_prob" else -reward * (2 * a - 1) * pi * (1 - pi)
    expected = {"w1": s.T @ dlogit, "b1": dlogit.sum(0), "w2": x.T @ dlogit, "b2": dlogit.sum(0)}
    for k in expected:
        np.testing.assert_allclose(np.asarray(grads[k]), expected[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_actions_are_bernoulli_with_the_policy_probabilities():
    pi = jnp.asarray([[0.1, 0.5], [0.9, 0.3]])
    n = 4000
    keys = jax.vmap(lambda s: action_key(0, 0, s))(np.arange(n))
    a = np.asarray(jax.vmap(lambda k: draw_actions(k, pi))(keys))
    sigma = np.sqrt(np.asarray(pi) * (1 - np.asarray(pi)) / n)
    np.testing.assert_array_less(np.abs(a.mean(0) - np.asarray(pi)), 4 * sigma)
    # independent across examples and teachers
    assert abs(np.mean(a[:, 0, 1] * a[:, 1, 0]) - 0.45) < 4 * np.sqrt(0.45 * 0.55 / n)


def test_resume_is_exact(tmp_path):
    teacher_a, teacher_b = tiny_teacher(layers=2, hidden=32, seed=1), tiny_teacher(layers=2, hidden=32, seed=2)

    def new_run():
        c = tiny_config("unused", method="rl_kd", steps=4, batch=4, max_length=16, checkpoint_every=1)
        return Distillation(c, teachers={"a": (teacher_a, 1.0), "b": (teacher_b, 1.0)})

    full = new_run().fit(str(tmp_path / "full"), progress=False, export=False)
    new_run().fit(str(tmp_path / "resumed"), progress=False, export=False, max_steps=2)
    resumed = new_run().fit(str(tmp_path / "resumed"), progress=False, export=False)
    for tree in ("params", "modules"):
        a = jax.tree.leaves(getattr(full["state"], tree))
        b = jax.tree.leaves(getattr(resumed["state"], tree))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert full["final_loss"] == resumed["final_loss"]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(MethodError, match="reward"):
        get_method("rl_kd", reward=3)
    with pytest.raises(MethodError, match="policy_objective"):
        get_method("rl_kd", policy_objective="ppo")
