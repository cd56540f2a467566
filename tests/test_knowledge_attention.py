"""Attention-map and self-relation terms against float64 loop references (TinyBERT, MiniLM,
MiniLMv2, MLKD-BERT formulas), with padded tokens in every batch."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from kdjax import knowledge

B, S = 3, 6


def token_mask():
    mask = np.ones((B, S), np.int32)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return mask


def ref_log_softmax_row(scores, key_valid):
    """float64 log-softmax over the valid keys only; padded keys get log-probability -inf."""
    z = np.asarray(scores, np.float64)[key_valid]
    z = z - z.max()
    out = np.full(len(scores), -np.inf)
    out[key_valid] = z - np.log(np.exp(z).sum())
    return out


def ref_kl(log_p, log_q):
    """KL(p ‖ q) from float64 log-probabilities, skipping p == 0 terms."""
    return sum(np.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q) if np.exp(lp) > 0)


# ---------------------------------------------------------------------------------------------
# attention maps
# ---------------------------------------------------------------------------------------------


def ref_attention_score_mse(s, t, mask):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    s = np.where(s <= -100, 0.0, s)
    t = np.where(t <= -100, 0.0, t)
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            for i in range(s.shape[2]):
                for j in range(s.shape[3]):
                    if mask[b, i] and mask[b, j]:
                        total += (s[b, h, i, j] - t[b, h, i, j]) ** 2
                        count += 1
    return total / count, count


def ref_attention_kl(s, t, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        valid = mask[b].astype(bool)
        for h in range(s.shape[1]):
            for i in range(s.shape[2]):
                if not valid[i]:
                    continue
                log_t = ref_log_softmax_row(t[b, h, i], valid)
                total += ref_kl(log_t, ref_log_softmax_row(s[b, h, i], valid))
                count += 1
    return total / count, count


def random_scores(seed, heads=4, scale=2.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((B, heads, S, S)) * scale).astype(np.float32)
    t = (rng.standard_normal((B, heads, S, S)) * scale).astype(np.float32)
    return s, t


def test_attention_score_mse_matches_reference():
    s, t = random_scores(0)
    mask = token_mask()
    # a causal-style additive mask inside valid pairs: both maps at <= -100 -> zeroed, no error
    s[1, :, 0, 3] = -1e4
    t[1, :, 0, 3] = -150.0
    # only the student masked: its entry becomes 0 and is compared with the teacher's value
    s[1, 0, 2, 1] = -1e9
    loss, metrics = knowledge.attention_score_mse(s, t, mask)
    want, count = ref_attention_score_mse(s, t, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["att_mse"][1]) == count == 4 * (16 + 36 + 4)


def test_attention_score_mse_reproduces_tinybert_with_hf_style_mask():
    """Scores with an additive −10000 key mask: TinyBERT zeroes them, so only valid keys matter."""
    s, t = random_scores(1)
    mask = token_mask()
    key_bias = (1 - mask[:, None, None, :]) * -10000.0
    loss_masked, _ = knowledge.attention_score_mse(s + key_bias, t + key_bias, mask)
    loss_plain, _ = knowledge.attention_score_mse(s, t, mask)
    np.testing.assert_allclose(float(loss_masked), float(loss_plain), rtol=1e-6)
    # with no padding it is exactly torch's mse_loss over all entries
    want = torch.nn.functional.mse_loss(torch.tensor(s, dtype=torch.float64),
                                        torch.tensor(t, dtype=torch.float64))
    np.testing.assert_allclose(float(knowledge.attention_score_mse(s, t)[0]), float(want), rtol=1e-5)


def test_attention_kl_matches_reference_and_torch():
    s, t = random_scores(2)
    mask = token_mask()
    loss, metrics = knowledge.attention_kl(s, t, mask)
    want, count = ref_attention_kl(s, t, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["att_kl"][1]) == count == 4 * mask.sum()
    # unpadded: identical to torch's KLDivLoss(sum over keys) averaged over B·H·S rows
    log_s = torch.log_softmax(torch.tensor(s, dtype=torch.float64), -1)
    log_t = torch.log_softmax(torch.tensor(t, dtype=torch.float64), -1)
    want_t = torch.nn.functional.kl_div(log_s, log_t, reduction="sum", log_target=True) / (B * 4 * S)
    np.testing.assert_allclose(float(knowledge.attention_kl(s, t)[0]), float(want_t), rtol=1e-5)


def test_attention_terms_ignore_garbage_in_padding_value_and_gradient():
    s, t = random_scores(3)
    mask = token_mask()
    pad_key = np.broadcast_to((mask == 0)[:, None, None, :], s.shape)
    pad_row = np.broadcast_to((mask == 0)[:, None, :, None], s.shape)
    garbage = pad_key | pad_row
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[pad_key] = 1e30
    t_bad[pad_key] = np.nan
    s_bad[pad_row] = np.inf
    for term in (knowledge.attention_kl, knowledge.attention_score_mse):
        clean = term(s, t, mask)[0]
        bad = term(s_bad, t_bad, mask)[0]
        assert float(bad) == float(clean), term.__name__
        grad = lambda x, y: jax.grad(lambda a: term(a, y, mask)[0])(jnp.asarray(x))
        g_clean, g_bad = np.asarray(grad(s, t)), np.asarray(grad(s_bad, t_bad))
        assert np.all(g_bad[garbage] == 0) and np.all(np.isfinite(g_bad)), term.__name__
        np.testing.assert_array_equal(g_bad, g_clean)


def test_attention_kl_extreme_scores_and_bf16():
    s, t = random_scores(4, scale=3e3)
    mask = token_mask()
    loss, _ = knowledge.attention_kl(s, t, mask)
    want, _ = ref_attention_kl(s, t, mask)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    g = jax.grad(lambda a: knowledge.attention_kl(a, t, mask)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(g)))
    s16, t16 = jnp.asarray(random_scores(5)[0], jnp.bfloat16), jnp.asarray(random_scores(5)[1], jnp.bfloat16)
    loss16, _ = knowledge.attention_kl(s16, t16, mask)
    assert loss16.dtype == jnp.float32
    want16, _ = ref_attention_kl(np.asarray(s16.astype(jnp.float32)),
                                 np.asarray(t16.astype(jnp.float32)), mask)
    np.testing.assert_allclose(float(loss16), want16, rtol=1e-4)


def test_attention_kl_zero_for_identical_maps():
    s, _ = random_scores(6)
    np.testing.assert_allclose(float(knowledge.attention_kl(s, s, token_mask())[0]), 0.0, atol=1e-6)


def test_attention_head_mismatch_suggests_relations():
    s, _ = random_scores(7, heads=4)
    _, t = random_scores(7, heads=6)
    for term in (knowledge.attention_kl, knowledge.attention_score_mse):
        with pytest.raises(ValueError, match="student has 4 heads but teacher has 6.*qkv_relation_kl"):
            term(s, t)
    with pytest.raises(ValueError, match="mask shape"):
        knowledge.attention_kl(s, s, np.ones((B, S + 1)))


# ---------------------------------------------------------------------------------------------
# relations
# ---------------------------------------------------------------------------------------------


def ref_relation_kl(x_s, x_t, mask, num_heads):
    """MiniLMv2 formula, built head by head from explicit column slices."""
    x_s, x_t = np.asarray(x_s, np.float64), np.asarray(x_t, np.float64)
    total, count = 0.0, 0
    for b in range(x_s.shape[0]):
        valid = mask[b].astype(bool)
        for a in range(num_heads):
            rel = []
            for x in (x_s, x_t):
                d_r = x.shape[-1] // num_heads
                xa = x[b, :, a * d_r:(a + 1) * d_r]
                rel.append(xa @ xa.T / np.sqrt(d_r))
            for i in range(x_s.shape[1]):
                if valid[i]:
                    log_t = ref_log_softmax_row(rel[1][i], valid)
                    total += ref_kl(log_t, ref_log_softmax_row(rel[0][i], valid))
                    count += 1
    return total / count, total, count


def features(seed, d_student=12, d_teacher=24, scale=1.0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((B, S, d_student)) * scale).astype(np.float32),
            (rng.standard_normal((B, S, d_teacher)) * scale).astype(np.float32))


@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_relation_kl_matches_reference_with_different_widths(num_heads):
    x_s, x_t = features(10)
    mask = token_mask()
    loss, metrics = knowledge.relation_kl(x_s, x_t, mask, num_relation_heads=num_heads)
    want, want_sum, count = ref_relation_kl(x_s, x_t, mask, num_heads)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["relation"][0]), want_sum, rtol=1e-5)
    assert float(metrics["relation"][1]) == count == num_heads * mask.sum()


def test_value_relation_and_embedding_relation():
    v_s, v_t = features(11)
    mask = token_mask()
    loss, m = knowledge.value_relation_kl(v_s, v_t, mask, num_heads=4)
    np.testing.assert_allclose(float(loss), ref_relation_kl(v_s, v_t, mask, 4)[0], rtol=1e-5)
    assert set(m) == {"value_relation"}
    loss, m = knowledge.embedding_relation_kl(v_s, v_t, mask)
    np.testing.assert_allclose(float(loss), ref_relation_kl(v_s, v_t, mask, 1)[0], rtol=1e-5)
    assert set(m) == {"emb_relation"}


def test_qkv_relation_kl_sums_three_relations():
    mask = token_mask()
    student = features(12)[0], features(13)[0], features(14)[0]
    teacher = features(12)[1], features(13)[1], features(14)[1]
    term = jax.jit(lambda s_, t_, m_: knowledge.qkv_relation_kl(s_, t_, m_, num_relation_heads=6))
    loss, metrics = term(student, teacher, mask)
    parts = [ref_relation_kl(xs, xt, mask, 6) for xs, xt in zip(student, teacher)]
    np.testing.assert_allclose(float(loss), sum(p[0] for p in parts), rtol=1e-5)
    assert set(metrics) == {"qkv_relation", "qkv_relation/q", "qkv_relation/k", "qkv_relation/v"}
    for part, ref in zip("qkv", parts):
        total, count = metrics[f"qkv_relation/{part}"]
        np.testing.assert_allclose(float(total) / float(count), ref[0], rtol=1e-5)
    total, count = metrics["qkv_relation"]
    np.testing.assert_allclose(float(total) / float(count), float(loss), rtol=1e-6)


def test_head_split_relation_groups_teacher_heads():
    """MLKD-BERT: 8 teacher heads of width 3 grouped 2 at a time against 4 student heads of width 5."""
    rng = np.random.default_rng(15)
    heads_t = [rng.standard_normal((B, S, 3)).astype(np.float32) for _ in range(8)]
    heads_s = [rng.standard_normal((B, S, 5)).astype(np.float32) for _ in range(4)]
    mask = token_mask()
    ctx_t = np.concatenate(heads_t, axis=-1)
    ctx_s = np.concatenate(heads_s, axis=-1)
    loss, metrics = knowledge.head_split_relation_kl(ctx_s, ctx_t, mask, num_groups=4)
    # independent reference: build each group's relation from its own list of per-head outputs
    total, count = 0.0, 0
    for b in range(B):
        valid = mask[b].astype(bool)
        for g in range(4):
            o_t = np.concatenate([heads_t[2 * g][b], heads_t[2 * g + 1][b]], -1).astype(np.float64)
            o_s = heads_s[g][b].astype(np.float64)
            r_t, r_s = o_t @ o_t.T / np.sqrt(6), o_s @ o_s.T / np.sqrt(5)
            for i in range(S):
                if valid[i]:
                    total += ref_kl(ref_log_softmax_row(r_t[i], valid), ref_log_softmax_row(r_s[i], valid))
                    count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    assert float(metrics["mha_relation"][1]) == count


def test_relation_terms_ignore_garbage_in_padding_value_and_gradient():
    x_s, x_t = features(16)
    mask = token_mask()
    pad = mask == 0
    xs_bad, xt_bad = x_s.copy(), x_t.copy()
    xs_bad[pad] = np.nan
    xt_bad[pad] = 1e30
    f = lambda a, b: knowledge.relation_kl(a, b, mask, num_relation_heads=3)[0]
    assert float(f(xs_bad, xt_bad)) == float(f(x_s, x_t))
    g_clean = np.asarray(jax.grad(f)(jnp.asarray(x_s), jnp.asarray(x_t)))
    g_bad = np.asarray(jax.grad(f)(jnp.asarray(xs_bad), jnp.asarray(xt_bad)))
    assert np.all(g_bad[pad] == 0)
    np.testing.assert_array_equal(g_bad, g_clean)


def test_relation_kl_large_features_bf16_and_identity():
    x_s, x_t = features(17, scale=30.0)
    mask = token_mask()
    loss, _ = knowledge.relation_kl(x_s, x_t, mask, num_relation_heads=4)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), ref_relation_kl(x_s, x_t, mask, 4)[0], rtol=1e-5)
    g = jax.grad(lambda a: knowledge.relation_kl(a, x_t, mask, num_relation_heads=4)[0])(jnp.asarray(x_s))
    assert np.all(np.isfinite(np.asarray(g)))
    xs16, xt16 = (jnp.asarray(x, jnp.bfloat16) for x in features(18))
    loss16, _ = knowledge.relation_kl(xs16, xt16, mask, num_relation_heads=4)
    want16 = ref_relation_kl(np.asarray(xs16.astype(jnp.float32)), np.asarray(xt16.astype(jnp.float32)),
                             mask, 4)[0]
    np.testing.assert_allclose(float(loss16), want16, rtol=1e-4)
    # a relation depends only on X Xᵀ, so an orthogonal rotation of the features keeps it at 0
    q, _ = np.linalg.qr(np.random.default_rng(19).standard_normal((24, 24)))
    rotated = (x_t @ q).astype(np.float32)
    np.testing.assert_allclose(
        float(knowledge.relation_kl(rotated, x_t, mask, num_relation_heads=1)[0]), 0.0, atol=1e-5)


def test_relation_errors():
    x_s, x_t = features(20, d_student=10, d_teacher=24)
    with pytest.raises(ValueError, match="student width D=10 is not divisible by A_r=4"):
        knowledge.relation_kl(x_s, x_t, num_relation_heads=4)
    with pytest.raises(ValueError, match="teacher width D=24 is not divisible by A_r=5"):
        knowledge.qkv_relation_kl((x_s,) * 3, (x_t,) * 3, num_relation_heads=5)
    with pytest.raises(ValueError, match=r"\(q, k, v\) tuple"):
        knowledge.qkv_relation_kl((x_s, x_s), (x_t,) * 3, num_relation_heads=2)
    with pytest.raises(ValueError, match="must share"):
        knowledge.relation_kl(x_s[:, :4], x_t, num_relation_heads=2)


def test_all_attention_terms_jit():
    s, t = random_scores(21)
    x_s, x_t = features(21)
    mask = token_mask()
    cases = [
        (knowledge.attention_score_mse, (s, t), {}),
        (knowledge.attention_kl, (s, t), {}),
        (knowledge.relation_kl, (x_s, x_t), {"num_relation_heads": 4}),
        (knowledge.value_relation_kl, (x_s, x_t), {"num_heads": 2}),
        (knowledge.head_split_relation_kl, (x_s, x_t), {"num_groups": 3}),
        (knowledge.embedding_relation_kl, (x_s, x_t), {}),
    ]
    for term, args, kw in cases:
        eager, _ = term(*args, mask, **kw)
        jitted, _ = jax.jit(lambda a, b, m: term(a, b, m, **kw))(*args, mask)
        np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6, err_msg=term.__name__)


def test_attention_kl_with_minus_inf_causal_mask():
    """Decoder scores often carry -inf above the diagonal; those keys have p = q = 0."""
    s, t = random_scores(22)
    causal = np.triu(np.ones((S, S), bool), k=1)
    s_c, t_c = s.copy(), t.copy()
    s_c[..., causal] = -np.inf
    t_c[..., causal] = -np.inf
    mask = token_mask()
    loss, _ = knowledge.attention_kl(s_c, t_c, mask)
    total, count = 0.0, 0
    for b in range(B):
        for h in range(s.shape[1]):
            for i in range(S):
                if mask[b, i]:
                    keys = mask[b].astype(bool) & ~causal[i]
                    log_t = ref_log_softmax_row(t[b, h, i], keys)
                    total += ref_kl(log_t, ref_log_softmax_row(s[b, h, i], keys))
                    count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    g = jax.grad(lambda a: knowledge.attention_kl(a, t_c, mask)[0])(jnp.asarray(s_c))
    assert np.all(np.isfinite(np.asarray(g)))
