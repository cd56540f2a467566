"""BERT-of-Theseus: the mixed forward's loss against a hand-built model, the replacement draw's
distribution, and reproducibility of the per-step draw."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import assert_copy_resumes_bit_identically, config, hard_ce
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import abstract_model, flat_params, params_from_flat
from kdjax.models.transformer import forward

STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    return {"teacher": (tiny_teacher(layers=4, hidden=32, seed=1), 1.0)}


@pytest.fixture(scope="module")
def run_and_batches(teacher):
    run = Distillation(config("theseus", steps=STEPS), teachers=teacher)
    it = iter(make_stage_loader(run, 0, seed=0))
    return run, [next(it) for _ in range(STEPS)]


def expected_keep(run, step):
    """The documented draw: bernoulli(fold_in(fold_in(stage key, crc32(name)), step), p(t), [L_S])."""
    p = min(1.0, 0.3 + (step / STEPS) / 0.66 * 0.7)
    base = jax.random.fold_in(run.runner(0).stage_key, zlib.crc32(b"theseus/replace") & 0x7FFFFFFF)
    return np.asarray(jax.random.bernoulli(jax.random.fold_in(base, step), p, (2,))), p


def mixed_reference(run, params, batch, keep):
    """CE of a model built by hand: student embeddings/head, student block i or teacher blocks 2i, 2i+1."""
    teacher = run.teachers["teacher"][0]
    s_flat = {k: np.asarray(v) for k, v in flat_params(params).items()}
    t_flat = {k: np.asarray(v) for k, v in flat_params(teacher.params).items()}
    flat = {k: v for k, v in s_flat.items() if not k.startswith("layers/")}
    for k in s_flat:
        if k.startswith("layers/"):
            parts = [s_flat[k][i:i + 1] if keep[i] else t_flat[k][2 * i:2 * i + 2] for i in range(2)]
            flat[k] = np.concatenate(parts)
    depth = sum(1 if kp else 2 for kp in keep)
    cfg = run.student.config.replace(num_layers=depth)
    graphdef, abstract = abstract_model(cfg)
    mixed = params_from_flat(abstract, flat, jnp.float32)
    b = run.prepare_batch(batch)
    out, _ = forward(graphdef, mixed, b)
    return np.mean(hard_ce(np.asarray(out.logits, np.float64), b["labels"]))


def test_mixed_forward_loss_equals_hand_built_model(run_and_batches):
    run, batches = run_and_batches
    state = run.init_state()
    seen = set()
    for step, batch in enumerate(batches):
        keep, p = expected_keep(run, step)
        expected = mixed_reference(run, state.params, batch, keep)
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        assert [bool(values[f"theseus/keep{i}"]) for i in range(2)] == list(keep), f"step {step}"
        assert values["theseus/p"] == pytest.approx(p, rel=1e-6)
        np.testing.assert_allclose(values["loss"], expected, rtol=2e-4, err_msg=f"step {step} keep {keep}")
        seen.add(tuple(keep))
    assert any(not all(k) for k in seen), "no step replaced a module"


def test_replacement_draw_follows_the_schedule():
    from kdjax.methods.theseus import replacement_mask, replacement_probability
    base = jax.random.PRNGKey(11)
    for progress, p in ((0.0, 0.3), (0.33, 0.65), (0.66, 1.0), (0.9, 1.0)):
        assert float(replacement_probability(progress, 0.3, 0.66)) == pytest.approx(p, abs=1e-6)
        draws = np.stack([np.asarray(replacement_mask(jax.random.fold_in(base, s), p, 6)) for s in range(400)])
        mean = draws.mean()
        assert abs(mean - p) <= 4 * np.sqrt(max(p * (1 - p), 1e-12) / draws.size) + 1e-9, (p, mean)
        if 0 < p < 1:  # modules are drawn independently: all-teacher steps occur at rate (1 - p)^6
            col = draws.mean(0)
            assert np.all(np.abs(col - p) < 0.1)


def test_state_copied_after_steps_continues_bit_identically(run_and_batches):
    assert_copy_resumes_bit_identically(*run_and_batches, k=2)