"""Logit-knowledge terms against float64 references written straight from the formulas.

The references below loop over positions and work in probability space (``m = βp + (1−β)q`` is
formed from probabilities, not with ``logaddexp``), so they share no code path with kdjax.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from kdjax import knowledge
from kdjax.knowledge import divergences

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------


def ref_log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def ref_kl(a, b):
    """KL(a ‖ b) for probability vectors, with 0 log 0 = 0."""
    out = 0.0
    for ai, bi in zip(a, b):
        if ai > 0:
            out += ai * (np.log(ai) - np.log(bi))
    return out


def ref_kl_log(log_a, log_b):
    """KL from log-probabilities (needed when probabilities underflow at extreme logits)."""
    out = 0.0
    for la, lb in zip(log_a, log_b):
        a = np.exp(la)
        if a > 0:
            out += a * (la - lb)
    return out


def ref_log_mix(w, log_a, log_b):
    """log(w a + (1 − w) b) in float64, in log space (probabilities underflow at |z| = 1e4)."""
    return np.logaddexp(np.log(w) + log_a, np.log(1 - w) + log_b)


def ref_row(s_row, t_row, kind, temperature, beta=0.5, lam=0.1, prob_space=True):
    """One position. ``prob_space`` forms mixtures from probabilities (moderate logits only)."""
    log_q = ref_log_softmax(np.asarray(s_row, np.float64) / temperature)
    log_p = ref_log_softmax(np.asarray(t_row, np.float64) / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "forward_kl":
        return ref_kl_log(log_p, log_q)
    if kind == "reverse_kl":
        return ref_kl_log(log_q, log_p)
    if kind == "jsd":
        if beta == 0:
            return ref_kl_log(log_p, log_q)
        if beta == 1:
            return ref_kl_log(log_q, log_p)
        if prob_space:
            m = beta * p + (1 - beta) * q
            return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
        log_m = ref_log_mix(beta, log_p, log_q)
        return beta * ref_kl_log(log_p, log_m) + (1 - beta) * ref_kl_log(log_q, log_m)
    if kind == "skew_kl":
        if prob_space:
            return ref_kl(p, lam * p + (1 - lam) * q)
        return ref_kl_log(log_p, ref_log_mix(lam, log_p, log_q))
    if kind == "skew_reverse_kl":
        if prob_space:
            return ref_kl(q, (1 - lam) * p + lam * q)
        return ref_kl_log(log_q, ref_log_mix(lam, log_q, log_p))
    if kind == "tvd":
        return 0.5 * np.sum(np.abs(p - q))
    raise AssertionError(kind)


def ref_loss(student, teacher, mask, kind, temperature, t2=True, **kw):
    student = np.asarray(student, np.float64)
    teacher = np.asarray(teacher, np.float64)
    total, count = 0.0, 0
    for idx in np.ndindex(student.shape[:-1]):
        if mask is not None and not mask[idx]:
            continue
        total += ref_row(student[idx], teacher[idx], kind, temperature, **kw)
        count += 1
    scale = temperature**2 if t2 else 1.0
    return scale * total / max(count, 1), scale * total, count


def make_logits(seed, shape=(3, 5, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = (rng.standard_normal(shape) * scale).astype(np.float32)
    return s, t


def padding_mask(batch=3, seq=5):
    mask = np.ones((batch, seq), np.int32)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return mask


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ---------------------------------------------------------------------------------------------
# values against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_reference_with_padding(kind, temperature):
    s, t = make_logits(0)
    mask = padding_mask()
    loss, metrics = knowledge.divergence(s, t, mask, kind=kind, temperature=temperature)
    want, want_sum, want_count = ref_loss(s, t, mask, kind, temperature)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    total, count = metrics[f"kd/{kind}"]
    assert float(count) == want_count == mask.sum()
    np.testing.assert_allclose(float(total), want_sum, rtol=1e-5, atol=1e-6)
    assert loss.dtype == jnp.float32 and loss.shape == ()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_values_match_reference(beta):
    s, t = make_logits(1)
    mask = padding_mask()
    loss, _ = knowledge.divergence(s, t, mask, kind="jsd", beta=beta, temperature=1.5)
    want, _, _ = ref_loss(s, t, mask, "jsd", 1.5, beta=beta)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_skew_lambda_values_match_reference(kind, lam):
    s, t = make_logits(2)
    loss, _ = knowledge.divergence(s, t, kind=kind, lam=lam)
    want, _, _ = ref_loss(s, t, None, kind, 1.0, lam=lam)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


def test_per_token_divergence_is_unreduced_and_unscaled():
    s, t = make_logits(3)
    out = knowledge.per_token_divergence(s, t, kind="reverse_kl", temperature=4.0)
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    want = np.array([[ref_row(s[b, i], t[b, i], "reverse_kl", 4.0) for i in range(5)] for b in range(3)])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-7)


def test_forward_kl_matches_torch_kl_div():
    s, t = make_logits(4)
    temperature = 2.0
    log_q = torch.log_softmax(torch.tensor(s, dtype=torch.float64) / temperature, -1)
    log_p = torch.log_softmax(torch.tensor(t, dtype=torch.float64) / temperature, -1)
    per_pos = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    want = float(per_pos.mean()) * temperature**2
    loss, _ = knowledge.divergence(s, t, kind="forward_kl", temperature=temperature)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# numerics: extreme logits, large T, bf16, gradients
# ---------------------------------------------------------------------------------------------


def extreme_logits(seed, shape=(2, 3, 17)):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1e4, 1e4, shape).astype(np.float32)
    t = rng.uniform(-1e4, 1e4, shape).astype(np.float32)
    # make a few rows nearly agree so not every value is dominated by one huge log-ratio
    t[0, 0] = s[0, 0] + rng.uniform(-5, 5, shape[-1]).astype(np.float32)
    return s, t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_extreme_logits_are_finite_and_correct(kind, temperature):
    s, t = extreme_logits(5)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    loss, _ = knowledge.divergence(s, t, mask, kind=kind, temperature=temperature)
    assert np.isfinite(float(loss))
    want, _, _ = ref_loss(s, t, mask, kind, temperature, prob_space=False)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_match_reference_on_rounded_values(kind):
    s, t = make_logits(6)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    mask = padding_mask()
    loss, metrics = knowledge.divergence(s16, t16, mask, kind=kind, temperature=2.0)
    assert loss.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for pair in metrics.values() for v in pair)
    want, _, _ = ref_loss(f64(s16), f64(t16), mask, kind, 2.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_gradients_finite_at_extremes(kind, temperature):
    s, t = extreme_logits(7)
    # include rows where p has exact zeros (probabilities underflow at |z| = 1e4)
    mask = np.array([[1, 1, 1], [1, 0, 1]])
    # one moderate row, so every kind has a non-vanishing gradient somewhere (at |z| = 1e4 both
    # distributions are one-hot and e.g. the reverse-KL gradient is exactly 0 mathematically)
    rng = np.random.default_rng(70)
    s[1, 2] = rng.standard_normal(s.shape[-1]) * 3
    t[1, 2] = rng.standard_normal(s.shape[-1]) * 3

    def f(s_, t_):
        return knowledge.divergence(s_, t_, mask, kind=kind, temperature=temperature)[0]

    g_s, g_t = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.all(np.isfinite(np.asarray(g_s))) and np.all(np.isfinite(np.asarray(g_t)))
    assert np.all(np.asarray(g_s)[1, 1] == 0)  # padded position gets no gradient
    assert np.abs(np.asarray(g_s)[1, 2]).sum() > 1e-6


def test_gradient_matches_finite_differences():
    s, t = make_logits(8, shape=(2, 7))
    f = lambda x: knowledge.divergence(x, t, kind="jsd", beta=0.3, temperature=2.0)[0]
    g = np.asarray(jax.grad(f)(jnp.asarray(s)))
    # central differences on the float64 reference
    eps = 1e-5
    ref = lambda x: ref_loss(x, t, None, "jsd", 2.0, beta=0.3)[0]
    num = np.zeros_like(g, dtype=np.float64)
    for idx in np.ndindex(s.shape):
        up, down = s.astype(np.float64), s.astype(np.float64)
        up[idx] += eps
        down[idx] -= eps
        num[idx] = (ref(up) - ref(down)) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_identical_distributions_is_zero(kind):
    s, _ = make_logits(9)
    loss, _ = knowledge.divergence(s, s, kind=kind, temperature=3.0)
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-5)
    ext, _ = extreme_logits(9)
    loss, _ = knowledge.divergence(ext, ext, kind=kind, temperature=1.0)
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-4)
    # shift invariance: adding a constant per row does not change the distribution
    loss, _ = knowledge.divergence(s + 7.0, s, kind=kind)
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-5)


def test_forward_and_reverse_kl_differ_and_match_their_own_reference():
    s, t = make_logits(10)
    fwd, _ = knowledge.divergence(s, t, kind="forward_kl")
    rev, _ = knowledge.divergence(s, t, kind="reverse_kl")
    assert abs(float(fwd) - float(rev)) > 1e-2
    np.testing.assert_allclose(float(fwd), ref_loss(s, t, None, "forward_kl", 1.0)[0], rtol=1e-5)
    np.testing.assert_allclose(float(rev), ref_loss(s, t, None, "reverse_kl", 1.0)[0], rtol=1e-5)
    # reverse KL is forward KL with the roles of the two models swapped
    swapped, _ = knowledge.divergence(t, s, kind="forward_kl")
    np.testing.assert_allclose(float(rev), float(swapped), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_t2_scaling(kind):
    s, t = make_logits(11)
    mask = padding_mask()
    scaled, m1 = knowledge.divergence(s, t, mask, kind=kind, temperature=4.0, scale_by_t2=True)
    plain, m2 = knowledge.divergence(s, t, mask, kind=kind, temperature=4.0, scale_by_t2=False)
    np.testing.assert_allclose(float(scaled), 16.0 * float(plain), rtol=1e-6)
    assert float(m1[f"kd/{kind}"][1]) == float(m2[f"kd/{kind}"][1])


def test_jsd_endpoints_equal_forward_and_reverse_kl():
    s, t = make_logits(12)
    mask = padding_mask()
    fwd, _ = knowledge.divergence(s, t, mask, kind="forward_kl", temperature=2.0)
    rev, _ = knowledge.divergence(s, t, mask, kind="reverse_kl", temperature=2.0)
    j0, _ = knowledge.divergence(s, t, mask, kind="jsd", beta=0.0, temperature=2.0)
    j1, _ = knowledge.divergence(s, t, mask, kind="jsd", beta=1.0, temperature=2.0)
    assert float(j0) == float(fwd)
    assert float(j1) == float(rev)
    # inside (0, 1) JSD is bounded by log 2 per position (times T^2) and below both KLs here
    jh, _ = knowledge.divergence(s, t, mask, kind="jsd", beta=0.5, temperature=2.0, scale_by_t2=False)
    assert 0 < float(jh) <= np.log(2)


def test_skew_endpoints():
    s, t = make_logits(13)
    fwd, _ = knowledge.divergence(s, t, kind="forward_kl")
    rev, _ = knowledge.divergence(s, t, kind="reverse_kl")
    np.testing.assert_allclose(float(knowledge.divergence(s, t, kind="skew_kl", lam=0.0)[0]), float(fwd))
    np.testing.assert_allclose(
        float(knowledge.divergence(s, t, kind="skew_reverse_kl", lam=0.0)[0]), float(rev))
    assert float(knowledge.divergence(s, t, kind="skew_kl", lam=1.0)[0]) == 0.0
    # skewing toward the target shrinks the divergence
    assert float(knowledge.divergence(s, t, kind="skew_kl", lam=0.1)[0]) < float(fwd)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_in_padded_positions_changes_nothing(kind):
    s, t = make_logits(14)
    mask = padding_mask()
    clean_loss, clean_metrics = knowledge.divergence(s, t, mask, kind=kind, temperature=2.0)
    pad = mask == 0
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[pad] = np.nan
    t_bad[pad] = 1e30
    s_bad[0, 4, :3] = np.inf
    bad_loss, bad_metrics = knowledge.divergence(s_bad, t_bad, mask, kind=kind, temperature=2.0)
    assert float(bad_loss) == float(clean_loss)
    assert [float(v) for v in bad_metrics[f"kd/{kind}"]] == [float(v) for v in clean_metrics[f"kd/{kind}"]]

    f = lambda x, y: knowledge.divergence(x, y, mask, kind=kind, temperature=2.0)[0]
    g_clean = np.asarray(jax.grad(f)(jnp.asarray(s), jnp.asarray(t)))
    g_bad = np.asarray(jax.grad(f)(jnp.asarray(s_bad), jnp.asarray(t_bad)))
    assert np.all(g_bad[pad] == 0)
    np.testing.assert_array_equal(g_bad, g_clean)


def test_all_padded_batch_gives_zero_not_nan():
    s, t = make_logits(15)
    loss, metrics = knowledge.divergence(s, t, np.zeros((3, 5)), kind="forward_kl")
    assert float(loss) == 0.0
    assert float(metrics["kd/forward_kl"][1]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_sum_count_consistent_with_loss(kind):
    s, t = make_logits(16)
    mask = padding_mask()
    loss, metrics = knowledge.divergence(s, t, mask, kind=kind, temperature=3.0, name="teacher0")
    assert list(metrics) == [f"teacher0/{kind}"]
    total, count = metrics[f"teacher0/{kind}"]
    assert total.shape == () and count.shape == () and total.dtype == count.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(total) / max(float(count), 1.0), rtol=1e-6)
    # sums over two halves of a batch recombine into the full-batch mean exactly
    _, m_a = knowledge.divergence(s[:1], t[:1], mask[:1], kind=kind, temperature=3.0, name="teacher0")
    _, m_b = knowledge.divergence(s[1:], t[1:], mask[1:], kind=kind, temperature=3.0, name="teacher0")
    merged = (float(m_a[f"teacher0/{kind}"][0]) + float(m_b[f"teacher0/{kind}"][0])) / (
        float(m_a[f"teacher0/{kind}"][1]) + float(m_b[f"teacher0/{kind}"][1]))
    np.testing.assert_allclose(merged, float(loss), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_under_jit_with_traced_temperature(kind):
    s, t = make_logits(17)
    mask = padding_mask()
    fn = jax.jit(lambda a, b, m, temp: knowledge.divergence(a, b, m, kind=kind, temperature=temp))
    loss, _ = fn(s, t, mask, 2.5)
    want, _, _ = ref_loss(s, t, mask, kind, 2.5)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# soft / hard cross-entropy and regression MSE
# ---------------------------------------------------------------------------------------------


def test_soft_cross_entropy_matches_reference():
    s, t = make_logits(18)
    mask = padding_mask()
    for temperature, t2 in [(1.0, False), (3.0, True)]:
        loss, metrics = knowledge.soft_cross_entropy(s, t, mask, temperature=temperature,
                                                     scale_by_t2=t2)
        total, count = 0.0, 0
        for idx in np.ndindex(mask.shape):
            if mask[idx]:
                p = np.exp(ref_log_softmax(t[idx] / temperature))
                total += -np.sum(p * ref_log_softmax(s[idx] / temperature))
                count += 1
        want = total / count * (temperature**2 if t2 else 1.0)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert float(metrics["soft_ce"][1]) == count
    # soft CE = forward KL + teacher entropy; it is not zero when the distributions agree
    loss_same, _ = knowledge.soft_cross_entropy(t, t)
    entropy = np.mean([-np.sum(np.exp(ref_log_softmax(r)) * ref_log_softmax(r))
                       for r in t.reshape(-1, t.shape[-1])])
    np.testing.assert_allclose(float(loss_same), entropy, rtol=1e-5)


def test_soft_cross_entropy_extreme_and_jit():
    s, t = extreme_logits(19)
    loss, _ = jax.jit(lambda a, b: knowledge.soft_cross_entropy(a, b, temperature=20.0))(s, t)
    want = np.mean([-np.sum(np.exp(ref_log_softmax(t[i] / 20.0)) * ref_log_softmax(s[i] / 20.0))
                    for i in np.ndindex(s.shape[:-1])])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    g = jax.grad(lambda a: knowledge.soft_cross_entropy(a, t)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(g)))


def test_cross_entropy_matches_torch_with_ignore_index_and_mask():
    rng = np.random.default_rng(20)
    logits = (rng.standard_normal((3, 5, 13)) * 4).astype(np.float32)
    labels = rng.integers(0, 13, (3, 5)).astype(np.int32)
    labels[1, 0] = -100
    labels[2, 2] = -100
    mask = padding_mask()
    logits_bad = logits.copy()
    logits_bad[mask == 0] = np.nan  # padded positions hold garbage
    loss, metrics = jax.jit(lambda z, y, m: knowledge.cross_entropy(z, y, m))(logits_bad, labels, mask)
    torch_labels = torch.tensor(np.where(mask == 1, labels, -100), dtype=torch.long)
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits, dtype=torch.float64).reshape(-1, 13), torch_labels.reshape(-1),
        ignore_index=-100)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert float(metrics["ce"][1]) == int((torch_labels != -100).sum())
    # extreme logits: still finite and equal to the float64 value
    big = logits * 2500.0
    loss_big, _ = knowledge.cross_entropy(big, labels)
    want_big = torch.nn.functional.cross_entropy(
        torch.tensor(big, dtype=torch.float64).reshape(-1, 13),
        torch.tensor(labels, dtype=torch.long).reshape(-1), ignore_index=-100)
    np.testing.assert_allclose(float(loss_big), float(want_big), rtol=1e-5)


def test_logit_mse_matches_reference():
    rng = np.random.default_rng(21)
    s = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 3)).astype(np.float32)
    mask = np.array([1, 0, 1, 1])
    s_bad = s.copy()
    s_bad[1] = 1e30
    loss, metrics = knowledge.logit_mse(s_bad, t, mask)
    want = np.mean([np.mean((s[i].astype(np.float64) - t[i]) ** 2) for i in range(4) if mask[i]])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["logit_mse"][1]) == 3
    # a regression head given as [B]
    loss1, _ = jax.jit(knowledge.logit_mse)(s[:, 0], t[:, 0])
    np.testing.assert_allclose(float(loss1), np.mean((s[:, 0].astype(np.float64) - t[:, 0]) ** 2),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unknown_kind_lists_known_kinds():
    s, t = make_logits(22)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'.*forward_kl.*tvd"):
        knowledge.divergence(s, t, kind="kl")
    with pytest.raises(ValueError, match="unknown divergence kind"):
        knowledge.per_token_divergence(s, t, kind="jensen")


def test_vocab_mismatch_names_both_sizes():
    s, _ = make_logits(23, shape=(2, 3, 11))
    _, t = make_logits(23, shape=(2, 3, 12))
    with pytest.raises(ValueError, match="student vocab size 11 != teacher vocab size 12"):
        knowledge.divergence(s, t)
    with pytest.raises(ValueError, match="11 != teacher vocab size 12"):
        knowledge.soft_cross_entropy(s, t)


def test_bad_arguments_raise_clear_errors():
    s, t = make_logits(24)
    with pytest.raises(ValueError, match="beta=1.5 is outside"):
        knowledge.divergence(s, t, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="lam=-0.1 is outside"):
        knowledge.divergence(s, t, kind="skew_kl", lam=-0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knowledge.divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"mask shape \(3,\) does not match the expected \(3, 5\)"):
        knowledge.divergence(s, t, np.ones(3))
    with pytest.raises(ValueError, match="labels shape"):
        knowledge.cross_entropy(s, np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="student shape"):
        knowledge.logit_mse(s, t[:, :4])
    with pytest.raises(ValueError, match="leading"):
        knowledge.divergence(s, t[:, :4])


def test_kinds_constant_matches_module():
    assert tuple(knowledge.DIVERGENCE_KINDS) == KINDS == divergences.KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_vocabulary_columns_are_handled(kind):
    """Padded vocabulary columns set to -inf in both models (a common export convention) have
    p = q = 0: the value equals the divergence over the real columns and gradients stay finite."""
    s, t = make_logits(25)
    s_inf, t_inf = s.copy(), t.copy()
    s_inf[..., -3:] = -np.inf
    t_inf[..., -3:] = -np.inf
    mask = padding_mask()
    loss, _ = knowledge.divergence(s_inf, t_inf, mask, kind=kind, temperature=2.0)
    want, _, _ = ref_loss(s[..., :-3], t[..., :-3], mask, kind, 2.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    g_s, g_t = jax.grad(
        lambda a, b: knowledge.divergence(a, b, mask, kind=kind, temperature=2.0)[0], argnums=(0, 1))(
            jnp.asarray(s_inf), jnp.asarray(t_inf))
    assert np.all(np.isfinite(np.asarray(g_s))) and np.all(np.isfinite(np.asarray(g_t)))
