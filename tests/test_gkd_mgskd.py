"""MGSKD (kdjax/methods/mgskd.py) against float64 NumPy loops of GKD spec §3 written here from plain forward
passes (token, span and sample relations); the random span segmentation for its law and for being a
function of the step; exact resume."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import assert_copy_resumes_bit_identically, config, forwards
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.methods import MethodError, get_method
from kdjax.methods.mgskd import span_lengths, token_phrase

R, K1, K2, N = 4, 5, 4, 12
ARGS = dict(relation_heads=R, k1=K1, k2=K2, sample_level=1, stages=("structural",))


def _n(x):
    return x / max(np.linalg.norm(x), 1e-8)


def _sl1(d):
    d = abs(d)
    return 0.5 * d * d if d < 1 else d - 0.5


def _softmax(z):
    z = np.exp(z - z.max())
    return z / z.sum()


def _tp(xs, xt, m):
    """pair + triplet of [B, n, d] states, NumPy loops."""
    B, n, d = xs.shape
    e = d // R
    pair_sum = pair_count = 0.0
    trip_sum = trip_count = 0.0
    for b in range(B):
        valid = [i for i in range(n) if m[b, i]]
        attn = np.zeros((R, n, n))
        for r in range(R):
            sl = slice(r * e, (r + 1) * e)
            ps = xs[b, :, sl] @ xs[b, :, sl].T / np.sqrt(e)
            pt = xt[b, :, sl] @ xt[b, :, sl].T / np.sqrt(e)
            for i in valid:
                for j in valid:
                    pair_sum += (ps[i, j] - pt[i, j]) ** 2
                    pair_count += 1
                row = np.full(n, -np.inf)
                row[valid] = pt[i, valid]
                attn[r, i] = _softmax(row)
        importance = attn.sum((0, 1))
        anchors = sorted(valid, key=lambda j: -importance[j])[:min(K1, n)]
        for a in anchors:
            local = attn[:, a].sum(0)
            neighbours = sorted([j for j in valid if j != a], key=lambda j: -local[j])[:min(K2, n - 1)]
            for j in neighbours:
                for k in neighbours:
                    ang = lambda x: _n(x[b, j] - x[b, a]) @ _n(x[b, k] - x[b, a])  # noqa: E731
                    trip_sum += _sl1(ang(xs) - ang(xt))
                    trip_count += 1
    return pair_sum / pair_count + trip_sum / max(trip_count, 1)


def _lengths(n_tokens, eps):
    n = len(eps)
    a = np.abs(eps)
    lengths = np.floor(a / a.sum() * (n_tokens - n)).astype(int) + 1
    deficit = n_tokens - lengths.sum()
    lengths[n - deficit:] += 1
    return lengths


def _spans(x, m, lengths):
    ends = np.cumsum(lengths)
    starts = ends - lengths
    pooled = np.stack([x[:, s:e].mean(1) for s, e in zip(starts, ends)], 1)
    mask = np.stack([m[:, s:e].any(1) for s, e in zip(starts, ends)], 1)
    return pooled, mask


def _sample(xs, xt, m):
    B, _, d = xs.shape
    e = d // R
    pool = lambda x: np.stack([x[b][m[b]].mean(0) for b in range(B)])  # noqa: E731
    ps, pt = pool(xs), pool(xt)
    total = []
    for r in range(R):
        sl = slice(r * e, (r + 1) * e)
        for a in range(B):
            for b in range(B):
                for c in range(B):
                    ang = lambda p: _n(p[b, sl] - p[a, sl]) @ _n(p[c, sl] - p[a, sl])  # noqa: E731
                    total.append(_sl1(ang(ps) - ang(pt)))
    return np.mean(total)


def _span_eps(run, step):
    base = jax.random.fold_in(run.runner(0).stage_key, zlib.crc32(b"mgskd/spans") & 0x7FFFFFFF)
    return np.asarray(jax.random.normal(jax.random.fold_in(base, step), (int(N * 0.4),)), np.float64)


@pytest.fixture(scope="module")
def run():
    c = config("mgskd", ARGS, steps=3, batch=3, max_length=N, seed=2)
    c.student.init = "random"                    # relations far from the teacher's, so the terms are not ~0
    return Distillation(c, teachers={"teacher": (tiny_teacher(layers=4, hidden=32, seed=4), 1.0)})


@pytest.fixture(scope="module")
def batches(run):
    out = []
    for batch, _ in zip(make_stage_loader(run, 0, seed=0), range(3)):
        batch = dict(batch, attention_mask=np.array(batch["attention_mask"]))
        batch["attention_mask"][1, -4:] = 0
        out.append(batch)
    return out


def test_loss_equals_numpy_reference(run, batches):
    state = run.init_state()
    for step, batch in enumerate(batches[:2]):
        _, t, b = forwards(run, state.params, batch, {"hidden_states": None})
        (_, s_inter) = forwards(run, state.params, batch, {"hidden_states": None})[0]
        hs = np.asarray(s_inter.hidden_states, np.float64)                 # [3, B, N, D]
        ht = np.asarray(t["teacher"][1].hidden_states, np.float64)[[0, 2, 4]]
        m = np.asarray(b["attention_mask"]) == 1
        token = _tp(hs[0], ht[0], m)
        lengths = _lengths(N, _span_eps(run, step))
        (ss, sm), (ts, _) = _spans(hs[0], m, lengths), _spans(ht[0], m, lengths)
        span = _tp(ss, ts, sm)
        sample = _sample(hs[1], ht[1], m) + _sample(hs[2], ht[2], m)
        state, metrics = run.train_step(state, batch)
        v = metric_values(metrics)
        for name, ref in (("token", token), ("span", span), ("sample", sample)):
            np.testing.assert_allclose(v[name], ref, rtol=2e-4, atol=1e-7, err_msg=f"{name} step {step}")
        np.testing.assert_allclose(v["loss"], v["token"] + v["span"] + 4 * v["sample"], rtol=1e-5)
        assert min(token, span, sample) > 1e-3 and np.isfinite(v["grad_norm"])


def test_span_term_matches_exactly(run, batches):
    # Row 1's padded tail leaves fewer valid spans than k2 + 1, so some anchors have fewer than k2 neighbours: the
    # top-k's filler slots (which can be the anchor itself) must not enter the triplet count.
    state = run.init_state()
    for step, batch in enumerate(batches[:2]):
        _, t, b = forwards(run, state.params, batch, {"hidden_states": None})
        (_, s_inter) = forwards(run, state.params, batch, {"hidden_states": None})[0]
        hs = np.asarray(s_inter.hidden_states, np.float64)
        ht = np.asarray(t["teacher"][1].hidden_states, np.float64)
        m = np.asarray(b["attention_mask"]) == 1
        lengths = _lengths(N, _span_eps(run, step))
        (ss, sm), (ts, _) = _spans(hs[0], m, lengths), _spans(ht[0], m, lengths)
        span = _tp(ss, ts, sm)
        state, metrics = run.train_step(state, batch)
        np.testing.assert_allclose(metric_values(metrics)["span"], span, rtol=2e-4, err_msg=f"span step {step}")


def test_token_phrase_with_fewer_valid_tokens_than_neighbours():
    """k2 = 4 neighbours wanted, but row 1 has 3 valid tokens (2 per anchor) and row 2 one (no triplet)."""
    rng = np.random.default_rng(7)
    xs, xt = rng.normal(size=(2, 3, 6, 8))
    m = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
    got = token_phrase(jnp.asarray(xs, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(m), R, K1, K2)
    np.testing.assert_allclose(float(got), _tp(xs, xt, m), rtol=1e-5)


def test_span_lengths_law_and_determinism():
    keys = jax.random.split(jax.random.PRNGKey(1), 500)
    draws = np.asarray(jax.vmap(lambda k: span_lengths(k, 30, 0.4))(keys))
    assert draws.shape == (500, 12) and (draws.sum(1) == 30).all() and draws.min() >= 1
    for key, got in zip(keys[:20], draws[:20]):
        eps = np.asarray(jax.random.normal(key, (12,)), np.float64)
        np.testing.assert_array_equal(got, _lengths(30, eps))
    # exchangeable spans: every slot has the same mean length N/n = 2.5 (up to the deficit rule's +1).
    assert abs(draws.mean() - 2.5) < 1e-9 and np.all(np.abs(draws[:, :6].mean(0) - draws[:, :6].mean()) < 0.35)


def test_state_copied_after_k_steps_continues_bit_identically(run, batches):
    assert_copy_resumes_bit_identically(run, batches, k=2)


def test_recipe_structure_and_arguments():
    structural, prediction = get_method("mgskd").stages
    assert [(t.name, t.fn, t.weight) for t in structural.terms] == [
        ("token", "mgskd_token", 1.0), ("span", "mgskd_span", 1.0), ("sample", "mgskd_sample", 4.0)]
    kw = structural.terms[0].kwargs
    assert (kw["heads"], kw["k1"], kw["k2"], kw["sample_level"], kw["span_rate"]) == (64, 20, 20, 2, 0.4)
    assert [(t.fn, t.kwargs["temperature"]) for t in prediction.terms] == [("divergence", 1.0)]
    with pytest.raises(MethodError, match="stages"):
        get_method("mgskd", stages=("general",))
    with pytest.raises(MethodError, match="span_rate"):
        get_method("mgskd", span_rate=0)
