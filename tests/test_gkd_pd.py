"""PD (kdjax/methods/pd.py): the teacher-free MLM stage and the soft-CE stage against float64 NumPy
computations written here from plain forward passes; the BERT masking for its rates and for being a
function of (seed, stage, step) only; the MLM head handed over to the task head between stages."""

import numpy as np
import pytest

from distill_fixtures import tiny_config, tiny_teacher
from gkd_reference import log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.hooks import hook_rng
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.methods import MethodError, get_method
from kdjax.methods.pd import LABELS, mask_tokens
from kdjax.models.transformer import forward

SEED = 4


@pytest.fixture(scope="module")
def run():
    config = tiny_config("unused", method="pd", batch=4, max_length=16, steps=2, seed=SEED)
    return Distillation(config, teachers={"teacher": (tiny_teacher(layers=2, hidden=32, seed=2), 1.0)})


def test_both_stages_equal_numpy_references_and_the_trunk_is_carried(run):
    assert [s.name for s in run.method.stages] == ["pretrain", "distill"]
    state = run.init_state(0)
    hook = run.method.stages[0].data_hook
    student0 = run.student_model(state, stage=0)
    assert student0.config.head == "mlm"
    for step, batch in zip(range(2), make_stage_loader(run, 0, seed=0)):
        hooked = hook(run, state, batch, hook_rng(SEED, 0, step), stage=0, step=step)
        b = run.prepare_batch(hooked, (LABELS,))
        out, _ = forward(student0.graphdef, state.params, b)
        logq = log_softmax(np.asarray(out.logits, np.float64))
        labels = np.asarray(hooked[LABELS])
        valid = (labels != -100) & (np.asarray(batch["attention_mask"]) == 1)
        assert valid.sum() > 0
        expected = -np.take_along_axis(logq, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid].mean()
        state, metrics = run.train_step(state, batch, stage=0)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=1e-4, err_msg=f"step {step}")
    trunk = flat_params(state.params)
    state1 = run.init_state(1, params=state.params)
    carried = flat_params(state1.params)
    assert run.student_model(state1, stage=1).config.head == "classification"
    shared = [k for k in carried if k in trunk and trunk[k].shape == carried[k].shape]
    assert any(k.startswith("layers") for k in shared)
    for k in shared:
        np.testing.assert_array_equal(np.asarray(carried[k]), np.asarray(trunk[k]))
    teacher = run.teachers["teacher"][0]
    student1 = run.student_model(state1, stage=1)
    for step, batch in zip(range(2), make_stage_loader(run, 1, seed=1)):
        b = run.prepare_batch(batch)
        zs = np.asarray(forward(student1.graphdef, state1.params, b)[0].logits, np.float64)
        zt = np.asarray(forward(teacher.graphdef, teacher.params, b)[0].logits, np.float64)
        expected = np.mean(-np.sum(np.exp(log_softmax(zt)) * log_softmax(zs), -1))   # T = 1, no T²
        state1, metrics = run.train_step(state1, batch, stage=1)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=1e-5, err_msg=f"step {step}")


def test_masking_rates_and_it_is_a_function_of_the_step():
    ids = np.full((64, 128), 1000, np.int32)
    ids[:, 0], ids[:, -1] = 101, 102                         # specials are never chosen
    attention = np.ones_like(ids)
    attention[:, 100:] = 0                                   # nor pads
    batch = {"input_ids": ids, "attention_mask": attention}
    out = mask_tokens(batch, hook_rng(1, 0, 7), probability=0.15, mask_id=103, vocab_size=500,
                      special_ids=[0, 101, 102, 103])
    chosen = out[LABELS] != -100
    assert not chosen[:, 0].any() and not chosen[:, 100:].any()
    rate = chosen[:, 1:100].mean()
    n = chosen.sum()
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / chosen[:, 1:100].size), rate
    masked = (out["input_ids"] == 103) & chosen
    kept = (out["input_ids"] == 1000) & chosen
    assert abs(masked.sum() / n - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
    assert abs(kept.sum() / n - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n) + 0.01   # 10% kept (+ random hits of 1000)
    np.testing.assert_array_equal(out[LABELS][chosen], 1000)
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()
    again = mask_tokens(batch, hook_rng(1, 0, 7), probability=0.15, mask_id=103, vocab_size=500,
                        special_ids=[0, 101, 102, 103])
    other = mask_tokens(batch, hook_rng(1, 0, 8), probability=0.15, mask_id=103, vocab_size=500,
                        special_ids=[0, 101, 102, 103])
    np.testing.assert_array_equal(again["input_ids"], out["input_ids"])
    assert not np.array_equal(other[LABELS], out[LABELS])


def test_recipe_structure_and_arguments():
    method = get_method("pd")
    pre, dist = method.stages
    assert (pre.data, pre.student_head, [t.fn for t in pre.terms]) == ("corpus", "mlm", ["masked_lm"])
    assert [(t.name, t.fn, t.weight) for t in dist.terms] == [("soft_ce", "soft_cross_entropy", 1.0)]
    assert dist.terms[0].kwargs == {"temperature": 1.0, "scale_by_t2": False}
    assert [s.name for s in get_method("pd", pretrain=False).stages] == ["distill"]
    assert [t.name for t in get_method("pd", hard_weight=0.5).stages[1].terms] == ["soft_ce", "hard_ce"]
    with pytest.raises(MethodError, match="mlm_probability"):
        get_method("pd", mlm_probability=1.5)
