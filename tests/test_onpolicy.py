"""On-policy recipes, the fast part: each loss against a float64 NumPy/PyTorch computation of its paper's
formula, the batch layout helpers, the replay buffer and the recipes' argument errors.

The sampler's distribution, a short run of every recipe and exact resume are in test_onpolicy_run.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdjax.methods.base import MethodError, get_method, known_methods
from kdjax.methods.onpolicy import (FROM_DATA, FROM_REPLAY, IGNORE, ReplayHook, data_rows, assemble_rows,
                                    minillm_pg_loss, prompt_lengths, scored_positions, token_divergence_loss)

B, S, V = 3, 7, 11


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(log_a, log_b):
    return np.sum(np.exp(log_a) * (log_a - log_b), -1)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(B, S, V)) * 2.0
    zt = rng.normal(size=(B, S, V)) * 2.0
    ids = rng.integers(0, V, (B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    mask[1, 5:] = 0                       # a padded row
    labels = np.where(mask == 1, ids, IGNORE)
    labels[:, :3] = IGNORE                # prompts of 3 tokens
    labels[2, :4] = IGNORE                # a longer prompt
    return zs, zt, ids, mask, labels


def test_scored_positions_are_the_positions_predicting_continuation_tokens(case):
    _, _, _, mask, labels = case
    scored = np.asarray(scored_positions(jnp.asarray(labels), jnp.asarray(mask)))
    expected = np.zeros((B, S))
    for b in range(B):
        for t in range(S - 1):
            expected[b, t] = float(labels[b, t + 1] != IGNORE and mask[b, t + 1] == 1)
    np.testing.assert_array_equal(scored, expected)
    assert expected[0].tolist() == [0, 0, 1, 1, 1, 1, 0] and expected[1].tolist() == [0, 0, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("kind,temperature,extra", [("jsd", 0.9, {"beta": 0.5}), ("jsd", 1.0, {"beta": 0.9}),
                                                    ("reverse_kl", 1.0, {}), ("skew_reverse_kl", 1.0, {"lam": 0.1}),
                                                    ("skew_kl", 1.0, {"lam": 0.1})])
def test_token_divergences_on_scored_positions_match_numpy(case, kind, temperature, extra):
    zs, zt, _, mask, labels = case
    scored = scored_positions(jnp.asarray(labels), jnp.asarray(mask))
    loss, metrics = token_divergence_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), scored,
                                          kind=kind, temperature=temperature, name="x", **extra)
    log_q, log_p = _np_log_softmax(zs / temperature), _np_log_softmax(zt / temperature)
    q, p = np.exp(log_q), np.exp(log_p)
    if kind == "jsd":        # GKD / TRL: M = βp + (1−β)q, β KL(p‖M) + (1−β) KL(q‖M)
        beta = extra["beta"]
        log_m = np.log(beta * p + (1 - beta) * q)
        per = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "reverse_kl":
        per = _kl(log_q, log_p)
    elif kind == "skew_reverse_kl":  # DistiLLM: KL(q ‖ (1−λ)p + λq)
        per = _kl(log_q, np.log((1 - extra["lam"]) * p + extra["lam"] * q))
    else:                            # KL(p ‖ λp + (1−λ)q)
        per = _kl(log_p, np.log(extra["lam"] * p + (1 - extra["lam"]) * q))
    m = np.asarray(scored, np.float64)
    expected = temperature ** 2 * np.sum(per * m) / m.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-6)
    (pair,) = metrics.values()
    assert float(pair[1]) == m.sum() == 9


def _torch_minillm(zs, zt, ids, scored, *, alpha, clip, length_norm, single_step):
    """MiniLLM's estimator written out token by token (Gu et al. 2024, Sec. 2.2), float64, autograd for ∇."""
    zs = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    log_q_all = torch.log_softmax(zs, -1)
    log_p_all = torch.log_softmax(torch.tensor(zt, dtype=torch.float64), -1)
    b_, s_ = scored.shape
    reward = np.zeros((b_, s_))
    for b in range(b_):
        for t in range(s_ - 1):
            if scored[b, t]:
                y = ids[b, t + 1]
                reward[b, t] = float((log_p_all[b, t, y] - log_q_all[b, t, y]).detach())
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in range(b_):
        for t in range(s_ - 1):
            if not scored[b, t]:
                continue
            count += 1
            y = ids[b, t + 1]
            future = [reward[b, u] for u in range(t + 1, s_) if scored[b, u]]
            if not single_step:
                future = [reward[b, t]] + future
            adv = sum(future)
            if length_norm:
                adv = adv / len(future) if future else 0.0
            lq, lp = log_q_all[b, t, y], log_p_all[b, t, y]
            mix = alpha * torch.exp(lp) + (1 - alpha) * torch.exp(lq.detach())   # teacher-mixed sampler p̃
            ratio = torch.exp(lq) / mix                                          # importance weight q/p̃
            surrogate = ratio * adv
            if clip is not None:
                surrogate = torch.minimum(surrogate, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
            term = -surrogate
            if single_step:   # ∇ of E_{y_t~q}[log q − log p] = the full-vocabulary reverse KL at step t
                rkl = torch.sum(torch.exp(log_q_all[b, t]) * (log_q_all[b, t] - log_p_all[b, t]))
                term = term + ratio.detach() * rkl
            total = total + term
    loss = total / count
    loss.backward()
    return float(loss), zs.grad.numpy()


@pytest.mark.parametrize("alpha,clip,length_norm,single_step", [(0.2, 0.2, True, True), (0.0, None, False, False),
                                                                 (0.5, 0.1, False, True)])
def test_minillm_policy_gradient_matches_torch(case, alpha, clip, length_norm, single_step):
    zs, zt, ids, mask, labels = case
    scored = scored_positions(jnp.asarray(labels), jnp.asarray(mask))

    def f(z):
        return minillm_pg_loss(z, jnp.asarray(zt, jnp.float32), jnp.asarray(ids), scored, alpha=alpha, clip=clip,
                               length_norm=length_norm, single_step=single_step)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(zs, jnp.float32))
    ref_loss, ref_grad = _torch_minillm(zs, zt, ids, np.asarray(scored), alpha=alpha, clip=clip,
                                        length_norm=length_norm, single_step=single_step)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-3, atol=1e-5)
    assert np.abs(ref_grad).sum() > 1e-3                 # the estimator has something to check
    weight = metrics["minillm/weight"]
    if alpha == 0:
        np.testing.assert_allclose(float(weight[0] / weight[1]), 1.0, rtol=1e-6)


def test_minillm_clipping_is_active_in_the_test_case(case):
    """The clipped and unclipped surrogates differ on this case, so the clip test above can fail."""
    zs, zt, ids, mask, labels = case
    scored = scored_positions(jnp.asarray(labels), jnp.asarray(mask))
    args = (jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(ids), scored)
    clipped = jax.grad(lambda z: minillm_pg_loss(z, *args[1:], alpha=0.5, clip=0.1)[0])(args[0])
    free = jax.grad(lambda z: minillm_pg_loss(z, *args[1:], alpha=0.5, clip=None)[0])(args[0])
    assert float(jnp.abs(clipped - free).max()) > 1e-4


def test_prompt_lengths_and_row_layout():
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)
    labels = np.array([[-100, -100, 3, 4, 5, 6], [7, 8, 9, -100, -100, -100]], np.int32)
    # Row 0: two unlabeled tokens are its prompt; row 1 is labeled from the start: prompt_length, capped by its tokens.
    assert prompt_lengths({"input_ids": ids, "attention_mask": mask, "labels": labels}, 4).tolist() == [2, 3]
    assert prompt_lengths({"input_ids": ids, "attention_mask": mask}, 9).tolist() == [5, 3]
    with pytest.raises(ValueError, match="have no tokens"):
        prompt_lengths({"input_ids": ids, "attention_mask": np.zeros_like(mask)}, 2)
    rows = assemble_rows(ids, np.array([2, 3]), np.array([[50, 51, 52, 53], [60, 61, 62, 63]]), np.array([4, 2]), 6)
    assert rows["input_ids"].tolist() == [[1, 2, 50, 51, 52, 53], [7, 8, 9, 60, 61, 0]]
    assert rows["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    assert rows["labels"].tolist() == [[-100, -100, 50, 51, 52, 53], [-100, -100, -100, 60, 61, -100]]
    data = data_rows({"input_ids": ids, "attention_mask": mask}, np.array([2, 1]))
    assert data["labels"].tolist() == [[-100, -100, 3, 4, 5, 6], [-100, 8, 9, -100, -100, -100]]


class _FakeSampling(ReplayHook):
    """A replay hook whose "student samples" are a counter, to observe the buffer alone."""

    def sample(self, run, state, batch, rng, *, stage, alpha):
        self.generated = getattr(self, "generated", 0) + 1
        n, s = np.shape(batch["input_ids"])
        ids = np.full((n, s), 1000 * self.generated, np.int32) + np.arange(n)[:, None]
        return {"input_ids": ids, "attention_mask": np.ones((n, s), np.int32), "labels": ids.copy()}


def _batch(n=4, s=5):
    ids = np.arange(n * s, dtype=np.int32).reshape(n, s)
    return {"input_ids": ids, "attention_mask": np.ones((n, s), np.int32), "labels": ids.copy()}


def test_replay_buffer_schedule_capacity_reuse_and_state():
    hook = _FakeSampling(steps=100, max_prob=0.5, ramp=0.5, capacity=10, prompt_length=2)
    assert [hook.probability(s, 100) for s in (0, 25, 50, 90)] == [0.0, 0.25, 0.5, 0.5]
    # At step 0 the probability is 0: always data, with the prompt unlabeled.
    out = hook(None, None, _batch(), np.random.default_rng(0), stage=0, step=0)
    assert (out["sampled"] == FROM_DATA).all() and (out["labels"][:, :2] == IGNORE).all() and hook.buffer == []
    # Probability 0.5 (steps 50..): the share of replay steps follows it.
    sources = []
    for step in range(50, 450):
        out = hook(None, None, _batch(), np.random.default_rng([step]), stage=0, step=step)
        sources.append(int(out["sampled"][0]))
        if out["sampled"][0] == FROM_REPLAY:
            stored = {tuple(row[0]) for row in hook.buffer}
            assert all(tuple(r) in stored for r in out["input_ids"].tolist())  # drawn from the buffer
    share = np.mean(np.asarray(sources) == FROM_REPLAY)
    assert abs(share - 0.5) < 0.08, share                  # 400 Bernoulli(0.5) draws: sd 0.025
    assert len(hook.buffer) == 10                          # FIFO at capacity: the newest 10 rows
    newest = hook.generated * 1000
    assert sorted(r[0][0] for r in hook.buffer)[-4:] == [newest + i for i in range(4)]
    # Older outputs are reused: some replay batch held rows generated at an earlier step.
    # The state survives JSON (checkpoint metadata) and gives the same next batch.
    restored = _FakeSampling(steps=100, max_prob=0.5, ramp=0.5, capacity=10, prompt_length=2)
    restored.load_state_dict(json.loads(json.dumps(hook.state_dict())))
    restored.generated = hook.generated
    a = hook(None, None, _batch(), np.random.default_rng([7]), stage=0, step=60)
    b = restored(None, None, _batch(), np.random.default_rng([7]), stage=0, step=60)
    assert all(np.array_equal(a[k], b[k]) for k in a) and hook.buffer == restored.buffer


def test_replay_batches_reuse_older_outputs():
    hook = _FakeSampling(steps=10, max_prob=1.0, ramp=0.0, capacity=64, prompt_length=2)
    generations = []
    for step in range(6):
        out = hook(None, None, _batch(), np.random.default_rng([step]), stage=0, step=step)
        generations.append(set(out["input_ids"][:, 0] // 1000))
    assert any(g - {i + 1} for i, g in enumerate(generations))  # a batch with rows from an earlier generation


def test_recipes_are_listed_and_reject_bad_arguments():
    names = known_methods()
    for name in ("gkd_onpolicy", "onpolicy_rkl", "minillm_pg", "distillm_adaptive", "gkd", "minillm", "distillm"):
        assert name in names
    stage = get_method("gkd_onpolicy", lmbda=1.0).stages[0]
    assert stage.data_hook.lmbda == 1.0 and stage.loss is not None
    assert get_method("minillm_pg").stages[0].data_hook.alpha == 0.2
    for name, args, match in [("gkd_onpolicy", {"lmbda": 1.5}, "lmbda"),
                              ("gkd_onpolicy", {"prompt_length": 0}, "prompt_length"),
                              ("minillm_pg", {"alpha": 1.0}, "alpha must be < 1"),
                              ("minillm_pg", {"clip": 2.0}, "clip"),
                              ("distillm_adaptive", {"kind": "jsd"}, "skew_kl"),
                              ("distillm_adaptive", {"capacity": 0}, "capacity"),
                              ("gkd", {"lmbda": 0.5}, "gkd_onpolicy"), ("distillm", {"student_on_policy": 0.5},
                                                                         "distillm_adaptive")]:
        with pytest.raises(MethodError, match=match):
            get_method(name, **args)
