"""CKD (kdjax/methods/ckd.py) against float64 NumPy loops of the four relation losses written here from
plain forward passes (GKD spec §7), with a narrower student than the teacher (relations are width-free)."""

import numpy as np
import pytest

from distill_fixtures import tiny_teacher
from gkd_reference import config, forwards, hard_ce, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.methods import MethodError, get_method

WINDOW = 5


def _n(x):
    norm = np.linalg.norm(x)
    return x / max(norm, 1e-8)


def _kl(t_logits, s_logits, keep):
    lt, ls = log_softmax(t_logits[keep]), log_softmax(s_logits[keep])
    return float(np.sum(np.exp(lt) * (lt - ls)))


def _relations(es, et, m):
    """(WR-Dist, WR-Angle, LTR-Dist, LTR-Angle) of stacks [L, B, N, D] (student, teacher), mask [B, N]."""
    L, B, N = es.shape[:3]
    wrd = wra = ltrd = ltra = 0.0
    half = WINDOW // 2
    cos = lambda a, b: float(_n(a) @ _n(b))  # noqa: E731
    for b in range(B):
        for i in range(N):
            if not m[b, i]:
                continue
            for l in range(L):
                keep = np.array([j != i and bool(m[b, j]) for j in range(N)])
                if keep.any():
                    wrd += _kl(np.array([cos(et[l, b, i], et[l, b, j]) for j in range(N)]),
                               np.array([cos(es[l, b, i], es[l, b, j]) for j in range(N)]), keep)
                win = [min(max(i + w, 0), N - 1) for w in range(-half, WINDOW - half)]
                for j in win:
                    for k in win:
                        if m[b, j] and m[b, k]:
                            ang = lambda e: _n(e[l, b, j] - e[l, b, i]) @ _n(e[l, b, k] - e[l, b, i])  # noqa: E731
                            wra += (ang(es) - ang(et)) ** 2
            for a in range(L):
                keep = np.arange(L) != a
                ltrd += _kl(np.array([cos(et[a, b, i], et[c, b, i]) for c in range(L)]),
                            np.array([cos(es[a, b, i], es[c, b, i]) for c in range(L)]), keep)
                for c in range(L):
                    for d in range(L):
                        ang = lambda e: _n(e[c, b, i] - e[a, b, i]) @ _n(e[d, b, i] - e[a, b, i])  # noqa: E731
                        ltra += (ang(es) - ang(et)) ** 2
    count = m.sum()
    return wrd / count, wra / count, ltrd / count, ltra / count


def test_loss_equals_numpy_reference(student_hidden=24):
    teacher = tiny_teacher(layers=4, hidden=32, seed=6)
    c = config("ckd", {"window": WINDOW}, steps=2, batch=2, max_length=12)
    c.student.init = "random"
    c.student.hidden_size = student_hidden
    c.student.intermediate_size = 2 * student_hidden
    run = Distillation(c, teachers={"teacher": (teacher, 1.0)})
    state = run.init_state()
    assert not state.modules, "CKD learns no projection"
    for step, batch in zip(range(2), make_stage_loader(run, 0, seed=0)):
        batch = dict(batch, attention_mask=np.array(batch["attention_mask"]))
        batch["attention_mask"][1, -4:] = 0                                  # pads in example 1
        (s_out, s_inter), t, b = forwards(run, state.params, batch, {"hidden_states": None})
        t_out, t_inter = t["teacher"]
        hs = np.asarray(s_inter.hidden_states, np.float64)                   # [3, B, N, 24]
        ht = np.asarray(t_inter.hidden_states, np.float64)[[0, 2, 4]]       # uniform map 2 <- 4
        m = np.asarray(b["attention_mask"])
        assert (m == 0).any(), "the batch should hold pads"
        wrd, wra, ltrd, ltra = _relations(hs, ht, m)
        zs, zt = np.asarray(s_out.logits, np.float64), np.asarray(t_out.logits, np.float64)
        soft = np.mean(-np.sum(np.exp(log_softmax(zt / 3)) * log_softmax(zs / 3), -1))
        hard = hard_ce(zs, np.asarray(b["labels"])).mean()
        state, metrics = run.train_step(state, batch)
        v = metric_values(metrics)
        for name, ref in (("wr_dist", wrd), ("wr_angle", wra), ("ltr_dist", ltrd), ("ltr_angle", ltra)):
            np.testing.assert_allclose(v[name], ref, rtol=2e-4, atol=1e-6, err_msg=f"{name} step {step}")
        np.testing.assert_allclose(v["loss"], 0.9 * soft + 0.1 * hard + wrd + 10 * wra + ltrd + 10 * ltra,
                                   rtol=2e-4, err_msg=f"step {step}")
        assert np.isfinite(v["grad_norm"]) and min(wrd, wra, ltra) > 1e-3


def test_recipe_structure():
    (stage,) = get_method("ckd").stages
    assert [(t.name, t.fn, t.weight) for t in stage.terms] == [
        ("soft_ce", "soft_cross_entropy", 0.9), ("hard_ce", "cross_entropy", 0.1), ("wr_dist", "ckd_wr_dist", 1.0),
        ("wr_angle", "ckd_wr_angle", 10.0), ("ltr_dist", "ckd_ltr_dist", 1.0), ("ltr_angle", "ckd_ltr_angle", 10.0)]
    assert stage.terms[0].kwargs == {"temperature": 3.0, "scale_by_t2": False}
    assert stage.terms[3].kwargs["window"] == 21 and stage.terms[3].layers == "uniform"
    with pytest.raises(MethodError, match="window"):
        get_method("ckd", window=1)
