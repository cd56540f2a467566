"""Universal-KD (kdjax/methods/universal_kd.py) against a float64 NumPy computation of GKD spec §9 written
here from plain forward passes and the trained projection maps."""

import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import config, forwards, kl, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.methods import MethodError, get_method


def test_loss_equals_numpy_reference_and_the_maps_train():
    teacher = tiny_teacher(layers=4, hidden=32, seed=9)
    run = Distillation(config("universal_kd", {"size": 8}, steps=2, batch=4, student_layers=3),
                       teachers={"teacher": (teacher, 1.0)})
    state = run.init_state()
    ps0 = np.array(state.modules["universal_kd/student_proj"]["kernel"])
    assert ps0.shape == (2, 32, 8)
    assert state.modules["universal_kd/teacher_proj"]["teacher"]["kernel"].shape == (3, 32, 8)
    for step, batch in zip(range(2), make_stage_loader(run, 0, seed=0)):
        (s_out, s_inter), t, b = forwards(run, state.params, batch, {"hidden_states": None})
        t_out, t_inter = t["teacher"]
        xs = np.asarray(s_inter.hidden_states, np.float64)[1:3, :, 0]        # layers 1..L_S-1, [CLS]
        xt = np.asarray(t_inter.hidden_states, np.float64)[1:4, :, 0]        # layers 1..L_T-1
        ps = np.asarray(state.modules["universal_kd/student_proj"]["kernel"], np.float64)
        pt = np.asarray(state.modules["universal_kd/teacher_proj"]["teacher"]["kernel"], np.float64)
        inter = 0.0
        for bi in range(xs.shape[1]):
            s = np.stack([xs[i, bi] @ ps[i] for i in range(2)])
            tt = np.stack([xt[j, bi] @ pt[j] for j in range(3)])
            for i in range(2):
                a = np.exp(log_softmax(tt @ s[i]))
                c = a @ tt
                inter += kl(c, s[i]) / xs.shape[1]
        logit = kl(np.asarray(t_out.logits), np.asarray(s_out.logits)).mean()
        state, metrics = run.train_step(state, batch)
        v = metric_values(metrics)
        np.testing.assert_allclose(v["universal_kd"], inter, rtol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(v["loss"], 0.5 * logit + 0.5 * inter, rtol=1e-4, err_msg=f"step {step}")
    assert not np.allclose(ps0, np.asarray(state.modules["universal_kd/student_proj"]["kernel"]))


def test_recipe_structure_and_arguments():
    method = get_method("universal_kd")
    assert method.student_init == "first"
    (stage,) = method.stages
    assert [(t.name, t.fn, t.weight) for t in stage.terms] == [("kd", "divergence", 0.5),
                                                                ("universal_kd", "universal_kd", 0.5)]
    assert {m.name for m in stage.modules} == {"universal_kd/student_proj", "universal_kd/teacher_proj"}
    assert [s.name for s in get_method("universal_kd", finetune_stage=True).stages] == ["distill", "finetune"]
    with pytest.raises(MethodError, match="pooling"):
        get_method("universal_kd", pooling="max")
    with pytest.raises(MethodError, match="size"):
        get_method("universal_kd", size=-1)
