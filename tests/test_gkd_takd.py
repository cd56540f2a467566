"""TAKD: teacher → assistant → student in one config, against NumPy float64 computations of GKD §17."""

import numpy as np
import pytest

from distill_fixtures import save_teacher, tiny_config as run_config, tiny_teacher
from gkd_reference import config, hard_ce, kl
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.methods import MethodError, get_method
from kdjax.models.transformer import forward

T = 10.0


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(layers=4, hidden=32, seed=1)


def logits(model, params, batch):
    return np.asarray(forward(model.graphdef, params, batch)[0].logits, np.float64)


def test_chain_losses_and_the_assistant_handed_over(teacher):
    run = Distillation(config("takd", steps=2, student_layers=2), teachers={"teacher": (teacher, 1.0)})
    assistant = run.chain["assistant"]
    # Halfway between the 4-layer teacher and the 2-layer student; uniform picks teacher layers 0, 2, 3.
    assert assistant.config.num_layers == 3 and run.student.config.num_layers == 2
    t_flat, a0 = flat_params(teacher.params), flat_params(assistant.params)
    for key in (k for k in a0 if k.startswith("layers/")):
        np.testing.assert_array_equal(np.asarray(a0[key]), np.asarray(t_flat[key])[[0, 2, 3]])
    it = iter(make_stage_loader(run, 0, seed=0))
    batches = [next(it) for _ in range(2)]

    state = run.init_state(0, params=run.stage_start_params(0))
    assert [t.name for t in run.runner(0).teachers] == ["teacher"]
    for batch in batches:
        b = run.prepare_batch(batch)
        zt, za = logits(teacher, teacher.params, b), logits(assistant, state.params, b)
        expected = np.mean(kl(zt, za, T)) + np.mean(hard_ce(za, np.asarray(b["labels"])))
        state, metrics = run.train_step(state, batch, stage=0)
        np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4)
    with pytest.raises(ValueError, match="set_trained"):
        run.teacher_params(1)                   # the assistant is not trained yet

    run.end_stage(0, state)
    trained = flat_params(state.params)
    start = run.stage_start_params(1, state)    # the student derived from the trained assistant
    s_flat = flat_params(start)
    for key, value in s_flat.items():
        expected = np.asarray(trained[key])[[1, 2]] if key.startswith("layers/") else np.asarray(trained[key])
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=key)
    student_state = run.init_state(1, params=start)
    assert [t.name for t in run.runner(1).teachers] == ["assistant"]
    b = run.prepare_batch(batches[0])
    za, zs = logits(assistant, state.params, b), logits(run.student, student_state.params, b)
    expected = np.mean(kl(za, zs, T)) + np.mean(hard_ce(zs, np.asarray(b["labels"])))
    student_state, metrics = run.train_step(student_state, batches[0], stage=1)
    np.testing.assert_allclose(metric_values(metrics)["loss"], expected, rtol=2e-4)


def test_plan_assembles_each_chain_stage_like_the_run(tmp_path, teacher):
    """`kdjax.plan` plans the assistant's stage with the assistant as trainee and the student's with the
    assistant as teacher, the same models and taps `Distillation` builds."""
    from kdjax import plan as P
    from kdjax import sharding as S
    path = save_teacher(teacher, str(tmp_path / "teacher"))
    c = run_config(path, method="takd", batch=8, max_length=16)
    run = Distillation(c)
    mesh = S.make_mesh(S.MeshConfig.from_config(dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 1),
                                                     dcn=(1, 1, 1))))
    for stage in (0, 1):
        c.plan = dict(stage=stage, strict=False)
        planned = P.build_planned_step(c, mesh)
        runner = run.runner(stage)
        assert planned.student_config == runner.student_config
        assert [(t.name, t.config, t.taps) for t in planned.teachers] == [(t.name, t.config, t.taps)
                                                                         for t in runner.teachers]
    assert planned.teacher_configs["assistant"].num_layers == 3


def test_bad_chains_are_one_line_errors(teacher):
    with pytest.raises(MethodError, match="assistant_shape"):
        get_method("takd", assistant_shape={"depth": 3})
    c = config("takd")
    c.teachers = {"assistant": {"path": "unused"}}
    with pytest.raises(Exception, match="also a config teacher"):
        Distillation(c, teachers={"assistant": (teacher, 1.0)})
