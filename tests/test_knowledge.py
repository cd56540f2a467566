"""Feature terms (TinyBERT, DistilBERT, PKD), sample relations (MLKD-BERT), supervised contrastive
(Khosla et al.), the shared masked mean and the ``TERMS`` registry, against float64 references."""

import inspect

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from kdjax import knowledge
from kdjax.knowledge import _util

B, S, D = 3, 5, 8


def token_mask():
    mask = np.ones((B, S), np.int32)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return mask


def hidden(seed, d_student=D, d_teacher=D, scale=1.0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((B, S, d_student)) * scale).astype(np.float32),
            (rng.standard_normal((B, S, d_teacher)) * scale).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# masked mean
# ---------------------------------------------------------------------------------------------


def test_masked_mean_sum_count_and_garbage():
    values = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 1]])
    mean, (total, count) = _util.masked_mean(values, mask)
    assert float(total) == 13.0 and float(count) == 4.0 and float(mean) == 3.25
    mean, (total, count) = knowledge.masked_mean(np.arange(6.0).reshape(2, 3), None)
    assert float(mean) == 2.5 and float(count) == 6.0
    mean, (total, count) = _util.masked_mean(values, np.zeros((2, 3)))
    assert float(mean) == 0.0 and float(count) == 0.0
    mean, _ = jax.jit(_util.masked_mean)(jnp.asarray(values, jnp.bfloat16), mask)
    assert mean.dtype == jnp.float32 and float(mean) == 3.25


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def test_hidden_mse_matches_reference_and_ignores_padding():
    h_s, h_t = hidden(0)
    mask = token_mask()
    bad = h_s.copy()
    bad[mask == 0] = np.nan
    loss, metrics = knowledge.hidden_mse(bad, h_t, mask)
    per_tok = [np.mean((h_s[b, i].astype(np.float64) - h_t[b, i]) ** 2)
               for b in range(B) for i in range(S) if mask[b, i]]
    np.testing.assert_allclose(float(loss), np.mean(per_tok), rtol=1e-5)
    assert float(metrics["hidden_mse"][1]) == len(per_tok)
    np.testing.assert_allclose(float(metrics["hidden_mse"][0]), np.sum(per_tok), rtol=1e-5)
    # unpadded: torch's mse_loss
    want = torch.nn.functional.mse_loss(torch.tensor(h_s, dtype=torch.float64),
                                        torch.tensor(h_t, dtype=torch.float64))
    np.testing.assert_allclose(float(knowledge.hidden_mse(h_s, h_t)[0]), float(want), rtol=1e-5)
    g = jax.grad(lambda a: knowledge.hidden_mse(a, h_t, mask)[0])(jnp.asarray(bad))
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.all(np.isfinite(np.asarray(g)))


def test_hidden_mse_width_mismatch_asks_for_projection():
    h_s, h_t = hidden(1, d_student=4, d_teacher=8)
    with pytest.raises(ValueError, match="student width 4 != teacher width 8; project"):
        knowledge.hidden_mse(h_s, h_t)
    with pytest.raises(ValueError, match="project"):
        knowledge.cosine(h_s, h_t)


def test_cosine_matches_torch_and_ignores_padding():
    h_s, h_t = hidden(2)
    mask = token_mask()
    bad = h_t.copy()
    bad[mask == 0] = 1e30
    loss, metrics = knowledge.cosine(h_s, bad, mask)
    cos = torch.nn.functional.cosine_similarity(torch.tensor(h_s, dtype=torch.float64),
                                                torch.tensor(h_t, dtype=torch.float64), dim=-1)
    valid = torch.tensor(mask, dtype=torch.bool)
    np.testing.assert_allclose(float(loss), float((1 - cos)[valid].mean()), rtol=1e-5)
    assert float(metrics["cosine"][1]) == mask.sum()
    # scale invariance and the zero point
    np.testing.assert_allclose(float(knowledge.cosine(3.0 * h_t, h_t, mask)[0]), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(knowledge.cosine(-h_t, h_t, mask)[0]), 2.0, rtol=1e-6)
    # a zero vector has a finite gradient
    zero = np.zeros_like(h_s)
    g = jax.grad(lambda a: knowledge.cosine(a, h_t)[0])(jnp.asarray(zero))
    assert np.all(np.isfinite(np.asarray(g)))


def test_pkd_matches_reference():
    rng = np.random.default_rng(3)
    layers = 4
    s = (rng.standard_normal((B, layers, D)) * 5).astype(np.float32)
    t = (rng.standard_normal((B, layers, D)) * 5).astype(np.float32)
    loss, metrics = knowledge.pkd(s, t)
    # Σ over layers of mean over batch and D of the squared difference of unit vectors
    want = 0.0
    for layer in range(layers):
        diffs = []
        for b in range(B):
            u = s[b, layer].astype(np.float64) / np.linalg.norm(s[b, layer])
            v = t[b, layer].astype(np.float64) / np.linalg.norm(t[b, layer])
            diffs.append((u - v) ** 2)
        want += np.mean(diffs)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["pkd"][1]) == B
    # the PKD reference code's single mean over [B, L, D] is this value divided by L
    s_n = torch.nn.functional.normalize(torch.tensor(s, dtype=torch.float64), dim=2)
    t_n = torch.nn.functional.normalize(torch.tensor(t, dtype=torch.float64), dim=2)
    np.testing.assert_allclose(float(loss) / layers, float(torch.nn.functional.mse_loss(s_n, t_n)),
                               rtol=1e-5)
    # masked examples are dropped
    mask = np.array([1, 0, 1])
    s_bad = s.copy()
    s_bad[1] = np.nan
    loss_m, metrics_m = knowledge.pkd(s_bad, t, mask)
    keep = [0, 2]
    want_m = knowledge.pkd(s[keep], t[keep])[0]
    np.testing.assert_allclose(float(loss_m), float(want_m), rtol=1e-6)
    assert float(metrics_m["pkd"][1]) == 2
    with pytest.raises(ValueError, match="same number of student and teacher layers"):
        knowledge.pkd(s[:, :3], t)


# ---------------------------------------------------------------------------------------------
# sample relations and supervised contrastive
# ---------------------------------------------------------------------------------------------


def ref_sample_relation(x_s, x_t, mask, temperature, similarity):
    valid = np.asarray(mask, bool)
    rel = []
    for x in (x_s, x_t):
        x = np.asarray(x, np.float64)[valid]
        if similarity == "cosine":
            x = x / np.linalg.norm(x, axis=-1, keepdims=True)
            sim = x @ x.T
        else:
            sim = x @ x.T / np.sqrt(x.shape[-1])
        z = sim / temperature
        z = z - z.max(-1, keepdims=True)
        rel.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    log_rs, log_rt = rel
    per_row = [np.sum(np.exp(log_rt[i]) * (log_rt[i] - log_rs[i])) for i in range(valid.sum())]
    return np.mean(per_row), len(per_row)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_relation_kl_matches_reference(similarity, temperature):
    rng = np.random.default_rng(4)
    x_s = rng.standard_normal((6, 8)).astype(np.float32)
    x_t = rng.standard_normal((6, 12)).astype(np.float32)  # different widths are fine
    mask = np.array([1, 1, 0, 1, 1, 0])
    xs_bad = x_s.copy()
    xs_bad[2] = np.nan
    loss, metrics = knowledge.sample_relation_kl(xs_bad, x_t, mask, temperature=temperature,
                                                 similarity=similarity)
    want, count = ref_sample_relation(x_s, x_t, mask, temperature, similarity)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["sample_relation"][1]) == count == 4
    g = jax.grad(lambda a: knowledge.sample_relation_kl(a, x_t, mask, similarity=similarity)[0])(
        jnp.asarray(xs_bad))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[mask == 0] == 0)


def test_sample_relation_errors_and_identity():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(float(knowledge.sample_relation_kl(x, x)[0]), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown similarity 'l2'"):
        knowledge.sample_relation_kl(x, x, similarity="l2")
    with pytest.raises(ValueError, match="student batch 3 != teacher batch 4"):
        knowledge.sample_relation_kl(x[:3], x)


def ref_supcon(x_s, x_t, labels, mask, temperature):
    """Khosla et al. L_out, written as loops over anchors and positives."""
    z = np.concatenate([x_s, x_t]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    lab = np.concatenate([labels, labels])
    valid = np.concatenate([mask, mask]).astype(bool)
    n = len(z)
    losses = []
    for i in range(n):
        if not valid[i]:
            continue
        others = [a for a in range(n) if a != i and valid[a]]
        positives = [p for p in others if lab[p] == lab[i]]
        if not positives:
            continue
        denom = np.sum([np.exp(z[i] @ z[a] / temperature) for a in others])
        losses.append(-np.mean([np.log(np.exp(z[i] @ z[p] / temperature) / denom) for p in positives]))
    return np.mean(losses), len(losses)


def test_supervised_contrastive_matches_reference():
    rng = np.random.default_rng(6)
    x_s = rng.standard_normal((6, 8)).astype(np.float32)
    x_t = rng.standard_normal((6, 8)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1, 0], np.int32)
    mask = np.array([1, 1, 1, 1, 0, 1])
    xt_bad = x_t.copy()
    xt_bad[4] = np.inf
    for temperature in (0.1, 0.5):
        loss, metrics = knowledge.supervised_contrastive(x_s, xt_bad, labels, mask, temperature=temperature)
        want, count = ref_supcon(x_s, x_t, labels, mask, temperature)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert float(metrics["supcon"][1]) == count == 10
    g = jax.grad(lambda a: knowledge.supervised_contrastive(a, xt_bad, labels, mask)[0])(jnp.asarray(x_s))
    assert np.all(np.isfinite(np.asarray(g)))


def test_supervised_contrastive_with_pytorch_reference_formulation():
    """Cross-check against the usual masked-matrix formulation, written in torch float64."""
    rng = np.random.default_rng(7)
    x_s = torch.tensor(rng.standard_normal((5, 4)))
    x_t = torch.tensor(rng.standard_normal((5, 4)))
    labels = torch.tensor([0, 0, 1, 1, 2])
    tau = 0.1
    z = torch.nn.functional.normalize(torch.cat([x_s, x_t]), dim=-1)
    lab = torch.cat([labels, labels])
    logits = z @ z.T / tau
    self_mask = torch.eye(10, dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    want = -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()
    loss, _ = jax.jit(lambda a, b, y: knowledge.supervised_contrastive(a, b, y, temperature=tau))(
        x_s.numpy().astype(np.float32), x_t.numpy().astype(np.float32), labels.numpy().astype(np.int32))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_supervised_contrastive_errors():
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="student width 8 != teacher width 6"):
        knowledge.supervised_contrastive(x, np.ones((4, 6), np.float32), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="labels must be integer"):
        knowledge.supervised_contrastive(x, x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knowledge.supervised_contrastive(x, x, np.zeros(4, np.int32), temperature=0.0)


# ---------------------------------------------------------------------------------------------
# registry and common contract
# ---------------------------------------------------------------------------------------------


def test_terms_registry_is_complete_and_uniform():
    expected = {
        "divergence", "soft_cross_entropy", "cross_entropy", "logit_mse", "hidden_mse", "cosine", "pkd",
        "attention_score_mse", "attention_kl", "relation_kl", "value_relation_kl", "qkv_relation_kl",
        "head_split_relation_kl", "embedding_relation_kl", "sample_relation_kl", "supervised_contrastive",
    }
    import kdjax.methods  # noqa: F401  (recipes register their own kinds: the view then holds those too)
    from kdjax.knowledge import registry
    assert expected <= set(knowledge.TERMS)
    for key, fn in knowledge.TERMS.items():
        if key in expected:  # the built-in kinds are exported by kdjax.knowledge itself
            assert fn is getattr(knowledge, key)
        else:  # a recipe's kind with a loss function: registered like the built-ins
            assert registry.KNOWLEDGE[key].fn is fn, key
            continue
        params = inspect.signature(fn).parameters
        assert params["name"].kind is inspect.Parameter.KEYWORD_ONLY, key
        assert fn.__doc__, key


def test_feature_and_relation_terms_jit_and_bf16():
    h_s, h_t = hidden(8)
    mask = token_mask()
    rng = np.random.default_rng(8)
    cls_s, cls_t = rng.standard_normal((2, B, 3, D)).astype(np.float32)
    pooled_s, pooled_t = rng.standard_normal((2, B, D)).astype(np.float32)
    labels = np.array([0, 1, 0], np.int32)
    cases = [
        (knowledge.hidden_mse, (h_s, h_t, mask), {}),
        (knowledge.cosine, (h_s, h_t, mask), {}),
        (knowledge.pkd, (cls_s, cls_t), {}),
        (knowledge.sample_relation_kl, (pooled_s, pooled_t, np.array([1, 1, 0])), {}),
        (knowledge.supervised_contrastive, (pooled_s, pooled_t, labels), {}),
    ]
    for term, args, kw in cases:
        eager, metrics = term(*args, **kw)
        jitted, _ = jax.jit(lambda *a: term(*a, **kw))(*args)
        np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6, err_msg=term.__name__)
        (total, count), = metrics.values()
        np.testing.assert_allclose(float(eager), float(total) / max(float(count), 1.0), rtol=1e-6)
        # bf16 features: computed in float32, close to the float32 value on the rounded inputs
        cast = [jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 else a for a in args]
        rounded = [np.asarray(jnp.asarray(c, jnp.float32)) if c.dtype == jnp.bfloat16 else c for c in cast]
        loss16, _ = term(*cast, **kw)
        assert loss16.dtype == jnp.float32
        np.testing.assert_allclose(float(loss16), float(term(*rounded, **kw)[0]), rtol=1e-5,
                                   err_msg=term.__name__)
