"""DGKD: guides dropped per step, against NumPy float64 computations of GKD §18; the chain's resume."""

import zlib

import jax
import numpy as np
import pytest

from distill_fixtures import tiny_config, tiny_teacher
from gkd_reference import config, forwards, hard_ce, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.stage import stage_key
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.methods import MethodError, get_method
from kdjax.methods.dgkd import KEY, survivors

T = 10.0


def soft_ce(t_logits, s_logits, temperature):
    """Per-row −Σ p_T log q_T (no T²)."""
    p = np.exp(log_softmax(np.asarray(t_logits, np.float64) / temperature))
    return -np.sum(p * log_softmax(np.asarray(s_logits, np.float64) / temperature), -1)


def step_key(seed, stage, step):
    """The documented per-step key: fold the name's CRC-32, then the step, into the stage key."""
    return jax.random.fold_in(jax.random.fold_in(stage_key(seed, stage), zlib.crc32(KEY.encode()) & 0x7FFFFFFF), step)


def test_survival_draws_are_independent_bernoulli():
    p, n = 0.75, 4000
    keys = jax.vmap(lambda s: step_key(0, 0, s))(np.arange(n))
    m = np.asarray(jax.vmap(lambda k: survivors(k, p, 3))(keys))
    sigma = np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_less(np.abs(m.mean(0) - p), 4 * sigma)
    both = np.mean(m[:, 0] * m[:, 1])
    assert abs(both - p * p) < 4 * np.sqrt(p * p * (1 - p * p) / n)
    assert abs(np.mean(m.sum(1) == 0) - (1 - p) ** 3) < 4 * np.sqrt((1 - p) ** 3 / n)


def test_loss_sums_the_surviving_guides_plus_hard():
    teachers = {"small": (tiny_teacher(layers=2, hidden=32, seed=1), 1.0),
                "large": (tiny_teacher(layers=4, hidden=48, heads=4, seed=2), 1.0)}
    run = Distillation(config("dgkd", {"assistants": 0, "survival_p": 0.5}, seed=3), teachers=teachers)
    assert [s.name for s in run.method.stages] == ["student"]
    it = iter(make_stage_loader(run, 0, seed=0))
    state = run.init_state()
    seen = set()
    for step in range(4):
        batch = next(it)
        (s_out, _), t, b = forwards(run, state.params, batch)
        z = np.asarray(s_out.logits, np.float64)
        keep = np.asarray(survivors(step_key(3, 0, step), 0.5, 2))
        expected = sum(keep[k] * 0.5 * np.mean(soft_ce(t[n][0].logits, z, T)) for k, n in enumerate(["small", "large"]))
        expected += 0.5 * np.mean(hard_ce(z, np.asarray(b["labels"])))
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=2e-4, err_msg=f"step {step}")
        assert [values["dgkd/kept_small"], values["dgkd/kept_large"]] == list(keep)
        seen.add(tuple(keep))
    assert len(seen) > 1  # the draw changes from step to step


def test_chain_killed_in_the_student_stage_resumes_exactly(tmp_path):
    """Assistant stage, then the student stage guided by teacher + assistant: a run stopped inside the
    student stage and restarted (new process state) loads the assistant its first stage saved and ends
    with the uninterrupted run's student."""
    teacher = tiny_teacher(layers=4, hidden=32, seed=1)

    def new_run():
        c = tiny_config("unused", method="dgkd", method_args={"survival_p": 0.5}, steps=3, batch=4, max_length=16,
                        checkpoint_every=1)
        return Distillation(c, teachers={"teacher": (teacher, 1.0)})

    full = new_run().fit(str(tmp_path / "full"), progress=False, export=False)
    stopped = new_run().fit(str(tmp_path / "resumed"), progress=False, export=False, max_steps=5)
    assert stopped["interrupted_at"] == 5
    resumed_run = new_run()
    resumed = resumed_run.fit(str(tmp_path / "resumed"), progress=False, export=False)
    assert set(resumed_run.trained) == {"assistant"}
    assert (tmp_path / "resumed" / "models" / "assistant" / "config.json").exists()
    a, b = flat_params(full["state"].params), flat_params(resumed["state"].params)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert full["final_loss"] == resumed["final_loss"]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(MethodError, match="survival_p"):
        get_method("dgkd", survival_p=0.0)
    with pytest.raises(MethodError, match="assistant_layers"):
        get_method("dgkd", assistants=2, assistant_layers=(3,))
    assert [m.derive_from for m in get_method("dgkd", assistants=2).models] == [None, "assistant1"]
