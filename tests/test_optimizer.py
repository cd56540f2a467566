"""The optimizer: weight decay on matrices only (stacked layers included), module learning rates,
and `max_grad_norm=None` meaning no clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_fixtures import tiny_teacher
from kdjax.distill import step as step_lib
from kdjax.hub.api import flat_params


def _trainable():
    model = tiny_teacher(layers=2, hidden=16, heads=2)
    modules = {"proj/hidden": {"kernel": jnp.ones((16, 24)), "bias": jnp.ones((24,))}}
    return {"student": model.params, "modules": modules}


def test_decay_mask_decays_matrices_and_spares_biases_and_norm_scales_of_stacked_layers():
    trainable = _trainable()
    mask = step_lib.decay_mask(trainable)
    names = {k: bool(v) for k, v in flat_params(mask["student"]).items()}
    for name, decayed in names.items():
        leaf = name.rsplit("/", 1)[-1]
        matrix = leaf in ("kernel", "embedding")  # by name, independent of shapes
        assert decayed == matrix, (name, decayed)
    # The stacked layers' biases and norm scales are 2-D ([L, D]) and must not be decayed.
    assert any(name.startswith("layers/") and name.endswith("scale") for name in names)
    assert mask["modules"]["proj/hidden"] == {"kernel": True, "bias": False}


def test_decay_shrinks_only_masked_parameters():
    trainable = _trainable()
    tx = step_lib.make_optimizer(learning_rate=0.1, total_steps=10, weight_decay=0.5, max_grad_norm=None)
    state = tx.init(trainable)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zeros, state, trainable)
    flat_u = flat_params(updates["student"])
    flat_p = flat_params(trainable["student"])
    for name, u in flat_u.items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf in ("kernel", "embedding"):
            np.testing.assert_allclose(u, -0.1 * 0.5 * np.asarray(flat_p[name]), rtol=1e-5, atol=1e-7)
        else:
            assert not np.any(np.asarray(u)), name


def test_max_grad_norm_none_means_no_clipping_and_module_rates_apply():
    trainable = _trainable()
    big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), trainable)
    clipped = step_lib.make_optimizer(learning_rate=1.0, total_steps=10, weight_decay=0.0, max_grad_norm=1.0,
                                      schedule="constant")
    free = step_lib.make_optimizer(learning_rate=1.0, total_steps=10, weight_decay=0.0, max_grad_norm=None,
                                   schedule="constant")
    sgd_like = [tx.update(big, tx.init(trainable), trainable)[0] for tx in (clipped, free)]
    # Adam normalizes the step size, so compare the first moments the two optimizers stored instead.
    m_clipped = optax.tree_utils.tree_get(clipped.update(big, clipped.init(trainable), trainable)[1], "mu")
    m_free = optax.tree_utils.tree_get(free.update(big, free.init(trainable), trainable)[1], "mu")
    assert float(optax.tree.norm(m_free)) > 10 * float(optax.tree.norm(m_clipped))
    assert all(np.all(np.isfinite(np.asarray(x))) for u in sgd_like for x in jax.tree.leaves(u))
    rated = step_lib.make_optimizer(learning_rate=1.0, total_steps=10, weight_decay=0.0, schedule="constant",
                                    module_rates={"proj/hidden": 0.0})
    updates, _ = rated.update(big, rated.init(trainable), trainable)
    assert not np.any(np.asarray(updates["modules"]["proj/hidden"]["kernel"]))
    assert np.all(np.asarray(flat_params(updates["student"])["embed/word/embedding"]) != 0)
