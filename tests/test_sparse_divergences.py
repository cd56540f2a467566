"""Sparse (top-k + tail) divergences against a float64 NumPy reference and the dense terms at k = V."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.knowledge import divergences as dense
from kdjax.knowledge import sparse

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_kl(a, b):
    """Σ a log(a/b) over the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)
    return terms.sum(-1)


def _np_reference(student_logits, teacher_logits, k, kind, temperature, beta=0.5, lam=0.1):
    """Per-position sparse divergence, built in float64 from full teacher logits, one position at a time."""
    s = np.asarray(student_logits, np.float64).reshape(-1, student_logits.shape[-1])
    t = np.asarray(teacher_logits, np.float64).reshape(-1, teacher_logits.shape[-1])
    out = []
    for srow, trow in zip(s, t):
        p_full = np.exp(_np_log_softmax(trow / temperature))
        q_full = np.exp(_np_log_softmax(srow / temperature))
        top = np.argsort(-p_full, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(p_full)), top)
        p = np.append(p_full[top], p_full[rest].sum())
        q = np.append(q_full[top], q_full[rest].sum())
        if kind == "forward_kl":
            val = _np_kl(p, q)
        elif kind == "reverse_kl":
            val = _np_kl(q, p)
        elif kind == "jsd":
            m = beta * p + (1 - beta) * q
            val = beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)
        elif kind == "skew_kl":
            val = _np_kl(p, lam * p + (1 - lam) * q)
        elif kind == "skew_reverse_kl":
            val = _np_kl(q, (1 - lam) * p + lam * q)
        else:
            val = 0.5 * np.abs(p - q).sum()
        out.append(val)
    return np.asarray(out).reshape(student_logits.shape[:-1])


def _logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (5, 2.0), (17, 0.7)])
def test_matches_float64_reference(kind, k, temperature):
    s, t = _logits(0, (2, 5, 40)), _logits(1, (2, 5, 40), scale=4.0)
    ids, lp, tail = sparse.dense_to_sparse(t, k, temperature)
    got = sparse.per_token_sparse_divergence(s, ids, lp, tail, kind=kind, temperature=temperature, beta=0.3, lam=0.2)
    want = _np_reference(s, t, k, kind, temperature, beta=0.3, lam=0.2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6)


def test_masked_mean_and_t2_against_reference():
    s, t = _logits(2, (3, 6, 30)), _logits(3, (3, 6, 30))
    mask = np.ones((3, 6), np.int32)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    ids, lp, tail = sparse.dense_to_sparse(t, 8, 2.0)
    # Garbage at invalid positions (repeated ids, NaN log-probs) must not leak into value or gradient.
    ids = jnp.where(mask[..., None] == 1, ids, 0)
    lp = jnp.where(mask[..., None] == 1, lp, jnp.nan)
    loss, metrics = sparse.sparse_divergence(s, ids, lp, tail, mask, kind="forward_kl", temperature=2.0)
    per = _np_reference(s, t, 8, "forward_kl", 2.0)
    want = 4.0 * per[mask == 1].sum() / mask.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    total, count = metrics["kd/forward_kl"]
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-5)
    grad = jax.grad(lambda x: sparse.sparse_divergence(x, ids, lp, tail, mask, temperature=2.0)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[mask == 0] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_equals_dense_divergence_when_k_is_vocab(kind):
    s, t = _logits(4, (2, 7, 24)), _logits(5, (2, 7, 24))
    mask = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int32)
    ids, lp, tail = sparse.dense_to_sparse(t, 24, 1.5)
    assert np.all(np.isneginf(np.asarray(tail)))
    got, got_m = sparse.sparse_divergence(s, ids, lp, tail, mask, kind=kind, temperature=1.5, beta=0.4)
    want, want_m = dense.divergence(s, t, mask, kind=kind, temperature=1.5, beta=0.4)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(got_m[f"kd/{kind}"][1]), float(want_m[f"kd/{kind}"][1]))
    g_sparse = jax.grad(lambda x: sparse.sparse_divergence(x, ids, lp, tail, mask, kind=kind, temperature=1.5,
                                                           beta=0.4)[0])(jnp.asarray(s))
    g_dense = jax.grad(lambda x: dense.divergence(x, t, mask, kind=kind, temperature=1.5, beta=0.4)[0])(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g_sparse), np.asarray(g_dense), rtol=1e-4, atol=1e-6)


def test_forward_kl_is_a_lower_bound_that_tightens_with_k():
    s, t = _logits(6, (4, 8, 64)), _logits(7, (4, 8, 64))
    full = float(dense.divergence(s, t, kind="forward_kl")[0])
    values = [float(sparse.sparse_divergence(s, *sparse.dense_to_sparse(t, k), kind="forward_kl")[0])
              for k in (1, 4, 16, 63, 64)]
    assert all(v <= full + 1e-6 for v in values)
    # A tail holding one token loses nothing, so k = V - 1 ties with k = V up to rounding.
    assert all(a <= b + 1e-5 for a, b in zip(values, values[1:]))
    assert values[0] < values[2] - 0.1
    np.testing.assert_allclose(values[-1], full, rtol=1e-5)


def test_jsd_beta_endpoints_follow_trl():
    s, t = _logits(8, (2, 3, 20)), _logits(9, (2, 3, 20))
    ids, lp, tail = sparse.dense_to_sparse(t, 6)
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = sparse.per_token_sparse_divergence(s, ids, lp, tail, kind="jsd", beta=beta)
        want = sparse.per_token_sparse_divergence(s, ids, lp, tail, kind=other)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_zero_when_student_matches_teacher_on_buckets():
    t = _logits(10, (2, 4, 30))
    ids, lp, tail = sparse.dense_to_sparse(t, 5)
    for kind in KINDS:
        val = sparse.per_token_sparse_divergence(t, ids, lp, tail, kind=kind)
        np.testing.assert_allclose(np.asarray(val), 0.0, atol=1e-5)


def test_bad_inputs_are_one_line_errors():
    s, t = _logits(11, (2, 3, 10)), _logits(12, (2, 3, 10))
    ids, lp, tail = sparse.dense_to_sparse(t, 4)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl2'"):
        sparse.sparse_divergence(s, ids, lp, tail, kind="kl2")
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, V=10\]"):
        sparse.dense_to_sparse(t, 11)
    wide = jnp.zeros((2, 3, 11), jnp.int32)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, V=10\]"):
        sparse.sparse_divergence(s, wide, wide.astype(jnp.float32), tail)
    with pytest.raises(ValueError, match="teacher_tail_logprob shape"):
        sparse.sparse_divergence(s, ids, lp, tail[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        sparse.sparse_divergence(s, ids, lp, tail, jnp.ones((2, 4)))
    for err in (ValueError,):
        with pytest.raises(err) as info:
            sparse.sparse_divergence(s, ids, lp, tail, kind="nope")
        assert "\n" not in str(info.value)


def test_tail_counts_ties_left_out_of_the_top_k():
    t = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    ids, lp, tail = sparse.dense_to_sparse(t, 2)
    ids = np.asarray(ids)
    assert all(len(set(row)) == 2 for row in ids)
    logp = _np_log_softmax(t)
    for row in range(2):
        rest = np.setdiff1d(np.arange(6), ids[row])
        np.testing.assert_allclose(float(tail[row]), np.log(np.exp(logp[row, rest]).sum()), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(lp[row]), logp[row, ids[row]], rtol=1e-6)
