"""LM-head logits are accumulated in float32 when the model computes in bfloat16.

The references are float64 NumPy products of the very bf16 values the head reads (inputs and weights
rounded to bf16 first), so the only error left to a float32-accumulating head is float32 summation
order (~1e-7 relative). A head that returns bf16 logits rounds each of them to 8 mantissa bits and
lands near 3e-3 relative, which the bounds below reject.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax.knowledge.chunked import LinearHead, chunked_divergence

REL_TOL = 1e-5  # float32 accumulation: ~1e-7; bf16 output rounding: ~3e-3


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _rel_err(got, want):
    return float(np.max(np.abs(_f64(got) - want)) / np.max(np.abs(want)))


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_linear_head_accumulates_in_float32(vocab_major):
    rng = np.random.default_rng(0)
    h = _bf16(rng, (2, 5, 64))
    w = _bf16(rng, (300, 64) if vocab_major else (64, 300), 0.1)
    b = _bf16(rng, (300,), 0.1)
    logits = LinearHead(w, b, vocab_major=vocab_major, dtype=jnp.bfloat16)(h)
    ref = _f64(h) @ (_f64(w).T if vocab_major else _f64(w)) + _f64(b)
    assert logits.dtype == jnp.float32
    assert _rel_err(logits, ref) < REL_TOL


@pytest.mark.parametrize("head,tied", [("causal_lm", False), ("causal_lm", True), ("mlm", True)])
def test_transformer_lm_logits_accumulate_in_float32(head, tied):
    family = "bert" if head == "mlm" else "llama"
    config = kdjax.preset(family, vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=64,
                          head=head, tie_word_embeddings=tied, dtype="bfloat16", param_dtype="bfloat16")
    model = kdjax.Model.init(config, seed=1)
    module = model.module()
    h = _bf16(np.random.default_rng(1), (2, 5, 64))
    # Eager, so the MLM transform rounds to bf16 exactly as the reference's eager call does (a jitted
    # fusion may keep it in float32, XLA's excess precision); the projection is what is under test.
    logits = module.lm_logits(h)
    x = _f64(module.mlm_features(h)) if head == "mlm" else _f64(h)
    w = _f64(module.embed.word.embedding[...]).T if tied else _f64(module.decoder.kernel[...])
    ref = x @ w + (_f64(module.mlm_bias[...]) if head == "mlm" else 0.0)
    assert logits.dtype == jnp.float32
    assert _rel_err(logits, ref) < REL_TOL
    # The jitted forward pass returns float32 logits too; for a causal head they are the projection
    # of its final hidden states.
    out = model(np.random.default_rng(2).integers(1, 300, (2, 5)))
    assert out.logits.dtype == jnp.float32
    if head == "causal_lm":
        assert _rel_err(out.logits, _f64(out.last_hidden_state) @ w) < REL_TOL


def _kl_reference(s_logits, t_logits, mask):
    """Mean forward KL(teacher || student) over valid positions, float64."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(s_logits), log_softmax(t_logits)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def test_chunked_divergence_at_bf16_matches_float64():
    """The chunked KD term with bf16 heads equals the float64 KL of the exact bf16 products."""
    rng = np.random.default_rng(3)
    hs, ht = _bf16(rng, (2, 7, 32)), _bf16(rng, (2, 7, 48))
    ws, wt = _bf16(rng, (32, 500), 0.3), _bf16(rng, (500, 48), 0.3)
    mask = np.ones((2, 7), np.int32)
    mask[1, 5:] = 0
    student = LinearHead(ws, dtype=jnp.bfloat16)
    teacher = LinearHead(wt, vocab_major=True, dtype=jnp.bfloat16)
    loss, _ = jax.jit(lambda a, b: chunked_divergence(a, b, student, teacher, mask, kind="forward_kl",
                                                      scale_by_t2=False, chunk_size=3))(hs, ht)
    ref = _kl_reference(_f64(hs) @ _f64(ws), _f64(ht) @ _f64(wt).T, mask)
    assert abs(float(loss) - ref) / ref < REL_TOL  # bf16 logits: ~3e-4 here
