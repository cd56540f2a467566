"""DIITO (kdjax/methods/diito.py): the loss against float64 NumPy KL/CE/cosine of plain forward passes and
of intervened forward passes whose interchanged states are assembled here, element by element, from the
span formula of GKD spec §4; the layer and span draws for their distribution; exact resume."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_fixtures import tiny_teacher, tokenizer
from gkd_reference import assert_copy_resumes_bit_identically, config, kl, log_softmax
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader, mlm_mask
from kdjax.methods import MethodError, get_method
from kdjax.methods.diito import draw_layer, draw_spans
from kdjax.models.transformer import ForwardHooks, forward

B, S, T = 4, 16, 2.0


@pytest.fixture(scope="module")
def run():
    c = config("diito", steps=3, batch=B, max_length=S, student_layers=2, seed=7)
    c.data.train.task = "kdjax_corpus"
    c.student.init = "random"                    # outputs far from the teacher's, so every term is non-trivial
    return Distillation(c, teachers={"teacher": (tiny_teacher(head="mlm", layers=4, hidden=32, seed=5), 1.0)})


@pytest.fixture(scope="module")
def batches(run):
    tok = tokenizer()
    it = iter(make_stage_loader(run, 0, seed=0))
    return [mlm_mask(next(it), probability=0.3, mask_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                     special_ids=tok.all_special_ids, seed=i) for i in range(3)]


def _key(run, name, step):
    base = jax.random.fold_in(run.runner(0).stage_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(base, step)


def _plan(run, step, mask):
    """(l, k, start, dual start) from the step's keys, with the span formula evaluated in NumPy."""
    l = int(jax.random.randint(_key(run, "diito/layer", step), (), 1, 3))
    u = np.asarray(jax.random.uniform(_key(run, "diito/span", step), (2, B)), np.float64)
    lengths = mask.sum(1)
    dual = np.roll(lengths, -1)
    k = np.floor(0.3 * np.minimum(lengths, dual)).astype(int)
    return l, k, np.floor(u[0] * (lengths - k + 1)).astype(int), np.floor(u[1] * (dual - k + 1)).astype(int)


def _interchanged(states, k, start, dual_start):
    """Example b's states with positions start..start+k-1 replaced by example b+1's from dual_start on."""
    out = np.array(states)
    for b in range(B):
        for p in range(k[b]):
            out[b, start[b] + p] = states[(b + 1) % B, dual_start[b] + p]
    return out


def _masked_kl(zt, zs, labeled):
    return kl(zt, zs, T)[labeled].mean()


def _cos(hs, ht, m):
    c = np.sum(hs * ht, -1) / (np.linalg.norm(hs, axis=-1) * np.linalg.norm(ht, axis=-1))
    return (1 - c)[m].mean()


def _reference(run, state, batch, step):
    b = run.prepare_batch(batch)
    teacher = run.teachers["teacher"][0]
    student = run.student_model(state)
    taps = {"hidden_states": None}
    s_out, s_inter = forward(student.graphdef, state.params, b, taps)
    t_out, t_inter = forward(teacher.graphdef, teacher.params, b, taps)
    m = np.asarray(b["attention_mask"]) == 1
    labels = np.asarray(b["labels"])
    labeled = (labels != -100) & m
    zs, zt = np.asarray(s_out.logits, np.float64), np.asarray(t_out.logits, np.float64)
    kd = _masked_kl(zt, zs, labeled)
    logq = log_softmax(zs)
    mlm = -np.take_along_axis(logq, np.where(labeled, labels, 0)[..., None], -1)[..., 0][labeled].mean()
    hs, ht = np.asarray(s_inter.hidden_states, np.float64), np.asarray(t_inter.hidden_states, np.float64)
    cos = _cos(hs[-1], ht[-1], m)
    l, k, start, dual_start = _plan(run, step, m.astype(int))
    s_new = jnp.asarray(_interchanged(np.asarray(s_inter.hidden_states[l]), k, start, dual_start))
    t_new = {j: jnp.asarray(_interchanged(np.asarray(t_inter.hidden_states[j]), k, start, dual_start))
             for j in (2 * l - 1, 2 * l)}                                  # teacher block of student layer l (4 <- 2)

    def s_hook(i, h_in, h_out, ctx):
        return jnp.where(i == l - 1, s_new.astype(h_out.dtype), h_out)

    def t_hook(j, h_in, h_out, ctx):
        out = h_out
        for layer, new in t_new.items():
            out = jnp.where(j == layer - 1, new.astype(h_out.dtype), out)
        return out

    s_int, _ = forward(student.graphdef, state.params, b, None, hooks=ForwardHooks(block=s_hook))
    t_int, _ = forward(teacher.graphdef, teacher.params, b, None, hooks=ForwardHooks(block=t_hook))
    causal = _masked_kl(np.asarray(t_int.logits, np.float64), np.asarray(s_int.logits, np.float64), labeled)
    return dict(kd=kd, mlm=mlm, cosine=cos, causal_kd=causal, layer=l, k=k)


def test_loss_equals_numpy_reference(run, batches):
    state = run.init_state()
    for step, batch in enumerate(batches[:2]):
        ref = _reference(run, state, batch, step)
        assert ref["k"].min() >= 1
        state, metrics = run.train_step(state, batch)
        v = metric_values(metrics)
        assert int(v["diito/layer"]) == ref["layer"]
        for name, key in (("kd", "kd/forward_kl"), ("mlm", "mlm"), ("cosine", "cosine"),
                          ("causal_kd", "causal_kd/forward_kl")):
            np.testing.assert_allclose(v[key], ref[name], rtol=1e-4, atol=1e-7, err_msg=f"{name} step {step}")
        assert abs(ref["causal_kd"] - ref["kd"]) > 1e-6, "the intervention must change the outputs"
        np.testing.assert_allclose(v["loss"], 0.25 * (ref["kd"] + ref["mlm"] + ref["cosine"] + ref["causal_kd"]),
                                   rtol=1e-4, err_msg=f"step {step}")


def test_layer_and_span_draws_are_uniform():
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    layers = np.asarray(jax.vmap(lambda k: draw_layer(k, 3, "full"))(keys))
    counts = np.bincount(layers, minlength=4)[1:]
    assert counts.sum() == 2000 and np.sum((counts - 2000 / 3) ** 2 / (2000 / 3)) < 13.8   # 2 dof, p=0.001
    assert int(draw_layer(keys[0], 6, "middle")) == 3 and int(draw_layer(keys[0], 6, "late")) == 6
    mask = np.zeros((2, 16), np.int32)
    mask[0, :10], mask[1, :16] = 1, 1
    k, start, dual_start = jax.vmap(lambda key: draw_spans(key, jnp.asarray(mask), 0.3, -1))(keys)
    k, start, dual_start = map(np.asarray, (k, start, dual_start))
    assert (k == 3).all()                                                 # floor(0.3 · min(10, 16)) for both
    for starts, high in ((start[:, 0], 10 - 3), (dual_start[:, 0], 16 - 3), (start[:, 1], 16 - 3)):
        counts = np.bincount(starts, minlength=high + 1)
        assert starts.min() == 0 and starts.max() == high and len(counts) == high + 1
        expected = len(starts) / (high + 1)
        assert np.sum((counts - expected) ** 2 / expected) < 35.0            # ≤ 13 dof, p ≈ 0.001
    capped = np.asarray(draw_spans(keys[0], jnp.asarray(mask), 0.3, 2)[0])
    assert (capped == 2).all()


def test_state_copied_after_k_steps_continues_bit_identically(run, batches):
    assert_copy_resumes_bit_identically(run, batches, k=2)


def test_recipe_structure_and_arguments():
    (stage,) = get_method("diito").stages
    assert [(t.name, t.fn, t.weight) for t in stage.terms] == [
        ("kd", "divergence", 0.25), ("mlm", "cross_entropy", 0.25), ("cosine", "diito_cos", 0.25)]
    assert stage.loss is not None
    with pytest.raises(MethodError, match="alignment"):
        get_method("diito", alignment="early")
    with pytest.raises(MethodError, match="way"):
        get_method("diito", way="masked")
