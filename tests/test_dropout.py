"""Training-time dropout of the student: inverted-dropout statistics, determinism, and the step.

Dropout only acts when a forward pass is given a key, so teachers, evaluation and every existing
deterministic comparison are untouched; the KD step gives the student a fresh key per step and per
micro-batch, derived from the train state, so a resumed run draws the same masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax.distill import step as step_lib
from kdjax.hub.api import abstract_model
from kdjax.methods import build_method
from kdjax.models.config import ConfigError
from kdjax.models.transformer import forward

B, S, V = 4, 16, 101


def _model(dropout=0.0, attention_dropout=0.0, family="bert"):
    config = kdjax.preset(family, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=64, head="base", dropout=dropout,
                          attention_dropout=attention_dropout)
    return kdjax.Model.init(config, seed=0)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": jnp.asarray(rng.integers(1, V, (B, S)), jnp.int32),
            "attention_mask": jnp.ones((B, S), jnp.int32)}


def test_embedding_dropout_zeroes_at_the_rate_and_rescales_the_rest():
    rate = 0.25
    model = _model(dropout=rate)
    taps = ("embeddings",)
    _, inter = forward(model.graphdef, model.params, _batch(), taps)
    clean = np.asarray(inter.embeddings, np.float64)
    _, dropped = forward(model.graphdef, model.params, _batch(), taps, dropout_key=jax.random.PRNGKey(3))
    got = np.asarray(dropped.embeddings, np.float64)
    zero = got == 0.0
    # Every kept element is the clean value scaled by 1 / (1 - rate); the dropped fraction is near the rate.
    np.testing.assert_allclose(got[~zero], clean[~zero] / (1 - rate), rtol=1e-6)
    assert abs(zero.mean() - rate) < 0.03, zero.mean()


def test_no_key_is_the_deterministic_model_and_keys_are_reproducible():
    with_dropout = _model(dropout=0.1, attention_dropout=0.1)
    without = _model()
    batch = _batch()
    base, _ = forward(without.graphdef, without.params, batch)
    same, _ = forward(with_dropout.graphdef, with_dropout.params, batch)  # no key: no dropout
    np.testing.assert_array_equal(np.asarray(same.last_hidden_state), np.asarray(base.last_hidden_state))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, _ = forward(with_dropout.graphdef, with_dropout.params, batch, dropout_key=k1)
    b, _ = forward(with_dropout.graphdef, with_dropout.params, batch, dropout_key=k1)
    c, _ = forward(with_dropout.graphdef, with_dropout.params, batch, dropout_key=k2)
    np.testing.assert_array_equal(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))
    assert np.max(np.abs(np.asarray(a.last_hidden_state) - np.asarray(c.last_hidden_state))) > 1e-3
    assert np.max(np.abs(np.asarray(a.last_hidden_state) - np.asarray(base.last_hidden_state))) > 1e-3
    # A key on a model without dropout changes nothing.
    d, _ = forward(without.graphdef, without.params, batch, dropout_key=k1)
    np.testing.assert_array_equal(np.asarray(d.last_hidden_state), np.asarray(base.last_hidden_state))


def test_attention_dropout_keeps_the_tapped_probabilities():
    model = _model(attention_dropout=0.3, family="llama")
    batch = _batch()
    clean_out, clean = forward(model.graphdef, model.params, batch, ("attention_probs",))
    out, inter = forward(model.graphdef, model.params, batch, ("attention_probs",), dropout_key=jax.random.PRNGKey(0))
    # The first layer's probabilities do not depend on any dropout; they are tapped before it.
    np.testing.assert_allclose(np.asarray(inter.attention_probs[0]), np.asarray(clean.attention_probs[0]), atol=1e-6)
    assert np.max(np.abs(np.asarray(out.last_hidden_state) - np.asarray(clean_out.last_hidden_state))) > 1e-3


def test_rates_are_validated():
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\)"):
        _model(dropout=1.0)
    with pytest.raises(ConfigError, match="attention_dropout"):
        _model(attention_dropout=-0.1)


def _step(dropout, grad_accum=1):
    teacher = kdjax.preset("llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, head="causal_lm")
    student = teacher.replace(num_layers=1, dropout=dropout)
    method = build_method("kd", {"kd": {"alpha": 1.0, "temperature": 1.0}})
    terms = method.stages[0].terms
    s_graphdef, s_abstract = abstract_model(student)
    t_graphdef, t_abstract = abstract_model(teacher)
    rng = np.random.default_rng(0)
    draw = lambda a: jnp.asarray(rng.normal(0, 0.05, a.shape) + (1 if len(a.shape) == 1 else 0), a.dtype)  # noqa: E731
    s_params, t_params = jax.tree.map(draw, s_abstract), jax.tree.map(draw, t_abstract)
    from kdjax.distill import terms as terms_lib
    s_taps, t_taps = terms_lib.required_taps(terms, student, teacher)
    tx = step_lib.make_optimizer(learning_rate=1e-2, total_steps=10)
    fn = step_lib.build_step(student_graphdef=s_graphdef, student_config=student, student_taps=s_taps,
                             teachers=[step_lib.TeacherSpec("teacher", t_graphdef, teacher, t_taps)], terms=terms,
                             tx=tx, total_steps=10, grad_accum=grad_accum)
    modules = terms_lib.init_modules(terms_lib.module_specs(terms, (), student, {"teacher": teacher}), student,
                                     {"teacher": teacher}, jax.random.PRNGKey(0))
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=s_params, modules=modules,
                                opt_state=tx.init({"student": s_params, "modules": modules}), rng=jax.random.PRNGKey(0))
    return jax.jit(fn), state, {"teacher": t_params}


def test_step_uses_dropout_reproducibly():
    batch = {**_batch(), "labels": _batch()["input_ids"]}
    fn, state, teachers = _step(0.2)
    plain_fn, plain_state, _ = _step(0.0)
    _, m1 = fn(state, teachers, batch)
    _, m2 = fn(state, teachers, batch)
    _, m0 = plain_fn(plain_state, teachers, batch)
    loss = lambda m: float(m["loss"][0])  # noqa: E731
    assert loss(m1) == loss(m2), "the same state draws the same masks"
    assert abs(loss(m1) - loss(m0)) > 1e-4, "dropout changes the student's loss"
    new_state, m3 = fn(state, teachers, batch)
    _, m4 = fn(new_state, teachers, batch)
    assert loss(m3) != loss(m4)
    acc_fn, acc_state, _ = _step(0.2, grad_accum=2)
    _, m5 = acc_fn(acc_state, teachers, batch)
    assert np.isfinite(loss(m5))
