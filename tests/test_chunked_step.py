"""Chunked logit KD inside the distillation step, and the linear-head ``custom_vjp`` against float64 numpy.

The step tests build a tiny causal-LM teacher (untied decoder) and student (tied word embeddings) with
random numpy parameters, and compare one step of the ``kd`` recipe with ``chunk_size`` against the same
step without it. The optimizer is plain SGD with learning rate 1, so the updated parameters are
``params - grads``: equal updates mean equal gradients (Adam's sign-like first step would hide errors).
"""

import dataclasses
import functools

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax import sharding as S
from kdjax.distill import step as step_lib
from kdjax.distill import terms as terms_lib
from kdjax.distill.sharded import sharded_step
from kdjax.knowledge.chunked import LinearHead, chunked_divergence, vocab_blocks
from kdjax.methods import build_method
from kdjax.methods.base import MethodError
from kdjax.models import preset, split
from kdjax.models.transformer import init_model

B, SEQ, V = 2, 11, 72  # distinct sizes, so a [B, S, V] shape cannot be mistaken for another array
CHUNK = 4  # 11 = 2·4 + 3: the last chunk is padded
TOL = 1e-5
SMALL = dict(vocab_size=V, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, head="causal_lm")
TEACHER = preset("llama", hidden_size=24, tie_word_embeddings=False, **SMALL)
STUDENT = preset("llama", hidden_size=16, tie_word_embeddings=True, **SMALL)


def random_params(config, seed):
    """(graphdef, params) drawn in numpy (no init compile); 1 + noise for vectors so norms matter."""
    graphdef, abstract = split(nnx.eval_shape(lambda: init_model(config, seed)))
    rng = np.random.default_rng(seed)

    def draw(x):
        value = rng.normal(0.0, 0.5, x.shape)
        return jnp.asarray(value + 1.0 if len(x.shape) == 1 else value, x.dtype)

    return graphdef, jax.tree.map(draw, abstract)


S_GRAPH, S_PARAMS = random_params(STUDENT, 0)
T_GRAPH, T_PARAMS = random_params(TEACHER, 1)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, SEQ)).astype(np.int32)
    mask = np.ones((B, SEQ), np.int32)
    mask[1, SEQ - 4:] = 0  # right padding in one row
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


def kd_step(chunk_size=None, alpha=1.0, kind="forward_kl"):
    args = dict(alpha=alpha, temperature=2.0, kind=kind)
    if chunk_size:
        args["chunk_size"] = chunk_size
    terms = build_method("kd", dict(kd=args)).stages[0].terms
    s_taps, t_taps = terms_lib.required_taps(terms, STUDENT, TEACHER)
    teacher = step_lib.TeacherSpec(name="teacher", graphdef=T_GRAPH, config=TEACHER, taps=t_taps)
    tx = optax.sgd(1.0)
    step = step_lib.build_step(student_graphdef=S_GRAPH, student_config=STUDENT, student_taps=s_taps,
                               teachers=[teacher], terms=terms, tx=tx, total_steps=10)
    trainable = {"student": S_PARAMS, "modules": {}}
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=S_PARAMS, modules={},
                                opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(0)))
    return step, state


@functools.lru_cache(maxsize=None)
def run_step(chunk_size=None, alpha=1.0, kind="forward_kl"):
    """(updated params, metrics) of one jitted step; cached, the unchunked reference is used twice."""
    step, state = kd_step(chunk_size, alpha=alpha, kind=kind)
    new_state, metrics = jax.jit(step)(state, {"teacher": T_PARAMS}, make_batch())
    return new_state.params, step_lib.metric_values(metrics)


# ---------------------------------------------------------------------------------------------
# The step: same loss, same update; no [B, S, V] array.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, kind", [(1.0, "forward_kl"), (0.5, "jsd")])
def test_chunked_step_equals_unchunked_step(alpha, kind):
    """α = 1: only the chunked term; α = 0.5: with the hard-label CE, which still reads the student logits."""
    full_params, full_metrics = run_step(None, alpha=alpha, kind=kind)
    chunk_params, chunk_metrics = run_step(CHUNK, alpha=alpha, kind=kind)
    assert set(full_metrics) == set(chunk_metrics)
    assert full_metrics["term/kd"] > 1e-2
    for key, value in full_metrics.items():
        np.testing.assert_allclose(chunk_metrics[key], value, rtol=TOL, atol=TOL, err_msg=key)
    moved = 0
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(S_PARAMS),
                            zip(jax.tree.leaves(chunk_params), jax.tree.leaves(full_params))):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path[0]))
        moved += float(jnp.abs(b - path[1]).max()) > 1e-6
    assert moved == len(jax.tree.leaves(S_PARAMS))  # every student parameter got a gradient


def _shapes(jaxpr, found):
    """Every shape produced by an equation of ``jaxpr`` or of any jaxpr nested in its parameters."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            found.add(tuple(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes(inner, found)
    return found


def test_chunked_step_never_forms_full_logits():
    batch = make_batch()
    shapes = {}
    for chunk in (None, CHUNK):
        step, state = kd_step(chunk)
        closed = jax.make_jaxpr(step)(state, {"teacher": T_PARAMS}, batch)
        shapes[chunk] = _shapes(closed.jaxpr, set())
    assert (B, SEQ, V) in shapes[None]  # the detector sees the unchunked step's logits
    assert (B, SEQ, V) not in shapes[CHUNK]
    assert (B, CHUNK, V) in shapes[CHUNK]  # the per-chunk logits instead
    # The hidden states the chunked term starts from are still there.
    assert (B, SEQ, STUDENT.hidden_size) in shapes[CHUNK]


def test_teacher_pass_skips_the_head_only_when_chunked():
    batch = make_batch()
    terms = build_method("kd", dict(kd=dict(alpha=1.0, chunk_size=CHUNK))).stages[0].terms
    teacher = step_lib.TeacherSpec(name="teacher", graphdef=T_GRAPH, config=TEACHER, taps=step_lib.TapSpec())
    out, _, params = step_lib.build_teacher_pass([teacher], terms)({"teacher": T_PARAMS}, batch)["teacher"]
    assert out.logits is None and out.last_hidden_state.shape == (B, SEQ, TEACHER.hidden_size)
    assert jax.tree.structure(params) == jax.tree.structure(T_PARAMS)
    full_out, _ = step_lib.build_teacher_pass([teacher])({"teacher": T_PARAMS}, batch)["teacher"]
    np.testing.assert_allclose(out.last_hidden_state, full_out.last_hidden_state, rtol=1e-6, atol=1e-6)
    assert full_out.logits.shape == (B, SEQ, V)


def test_vocab_sharded_over_tensor_matches_single_device():
    """8 fake devices, (data=1, fsdp=2, tensor=4): student and teacher heads split along V over `tensor`."""
    mesh = S.make_mesh(S.MeshConfig(axes=("data", "fsdp", "tensor"), ici=(1, 2, 4)))
    method = build_method("kd", dict(kd=dict(alpha=1.0, temperature=2.0, chunk_size=CHUNK)))
    sharded = sharded_step(STUDENT, {"teacher": TEACHER}, method, mesh, student_rules=S.DEFAULT_TEACHER_RULES,
                           teacher_rules=S.DEFAULT_TEACHER_RULES, batch_shape=(B, SEQ), learning_rate=1.0,
                           total_steps=10, optimizer=optax.sgd(1.0))
    assert sharded.state_shardings.params["embed"]["word"]["embedding"].spec == P("tensor", "fsdp")
    assert sharded.teacher_param_shardings["teacher"]["decoder"]["kernel"].spec == P("fsdp", "tensor")
    state = sharded.init_state(seed=0, student_params=S_PARAMS)
    teacher = sharded.put_teacher_params({"teacher": T_PARAMS})
    batch = make_batch()
    new_state, metrics = sharded(state, teacher, sharded.shard_batch(batch))
    assert new_state.params["embed"]["word"]["embedding"].sharding.spec == P("tensor", "fsdp")
    ref_params, ref_metrics = run_step(None, alpha=1.0)  # unchunked, unsharded
    got = step_lib.metric_values(metrics)
    np.testing.assert_allclose(got["term/kd"], ref_metrics["term/kd"], rtol=TOL, atol=TOL)
    for a, b in zip(jax.tree.leaves(jax.device_get(new_state.params)), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


def test_bad_chunk_size_is_a_one_line_error():
    with pytest.raises(MethodError, match="chunk_size must be a positive integer") as err:
        build_method("kd", dict(kd=dict(chunk_size=0)))
    assert "\n" not in str(err.value)
    term = build_method("kd", dict(kd=dict(alpha=1.0))).stages[0].terms[0].replace(fn="logit_mse").with_args(chunk_size=4)
    with pytest.raises(MethodError, match="chunk_size applies to 'divergence' terms"):
        terms_lib.validate_terms([term], STUDENT, TEACHER)


# ---------------------------------------------------------------------------------------------
# The linear-head custom_vjp against a float64 numpy reference of the unchunked formula.
# ---------------------------------------------------------------------------------------------

D, DT, N_PRE, TEMP = 6, 5, 36, 2.0


def reference_f64(kind, hs, ht, pre_k, pre_b, w, b, wt, mask):
    """Value and gradients (h, pre kernel, pre bias, W, b) of the masked mean T²·D(p_T, q_T), by hand.

    Student logits ``z = tanh(h K + c) W + b``; teacher logits ``ht Wt``. With ``s = z / T`` and
    ``q = softmax(s)``: forward KL ``KL(p‖q)`` has ``∂/∂s = q − p``; reverse KL ``KL(q‖p)`` has
    ``∂/∂s = q ⊙ (log q − log p − KL(q‖p))``; the chain rule through ``1/T`` and ``T²`` gives a factor T.
    """
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    hs, ht, pre_k, pre_b, w, b, wt = map(f, (hs, ht, pre_k, pre_b, w, b, wt))
    m = np.asarray(mask, bool)
    n = m.sum()
    x = np.tanh(hs @ pre_k + pre_b)
    s = (x @ w + b) / TEMP
    t = (ht @ wt) / TEMP
    log_q = s - s.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    log_p = t - t.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    q, p = np.exp(log_q), np.exp(log_p)
    if kind == "forward_kl":
        per = np.sum(p * (log_p - log_q), -1)
        ds = q - p
    else:
        per = np.sum(q * (log_q - log_p), -1)
        ds = q * (log_q - log_p - per[..., None])
    value = (per * m).sum() * TEMP ** 2 / n
    dz = ds * TEMP * m[..., None] / n
    dx = dz @ w.T
    da = dx * (1 - x ** 2)
    grads = dict(h=da @ pre_k.T, pre_k=np.einsum("bsi,bsj->ij", hs, da), pre_b=da.sum((0, 1)),
                 w=np.einsum("bsd,bsv->dv", x, dz), b=dz.sum((0, 1)))
    return value, grads


@pytest.mark.parametrize("kind, vocab_major, block", [("forward_kl", False, 8), ("reverse_kl", True, 12),
                                                      ("forward_kl", True, 1000)])
def test_linear_head_vjp_matches_float64_reference(kind, vocab_major, block):
    rng = np.random.default_rng(11)
    hs = jnp.asarray(rng.standard_normal((B, SEQ, N_PRE)), jnp.float32)
    ht = jnp.asarray(rng.standard_normal((B, SEQ, DT)), jnp.float32)
    pre_k = jnp.asarray(0.3 * rng.standard_normal((N_PRE, D)), jnp.float32)
    pre_b = jnp.asarray(0.3 * rng.standard_normal((D,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((V,)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((DT, V)), jnp.float32)
    mask = np.ones((B, SEQ), np.int32)
    mask[0, 3] = 0
    mask[1, SEQ - 3:] = 0
    assert vocab_blocks(V, block) == {8: 9, 12: 6, 1000: 1}[block]  # strided blocks, and the one-block case

    def loss(hs, pre_k, pre_b, w, b):
        head = LinearHead(w.T if vocab_major else w, b, pre=lambda h: jnp.tanh(h @ pre_k + pre_b),
                          vocab_major=vocab_major)
        return chunked_divergence(hs, ht, head, lambda h: h @ wt, jnp.asarray(mask), kind=kind,
                                  temperature=TEMP, chunk_size=CHUNK, vocab_block_size=block)[0]

    value, grads = jax.jit(jax.value_and_grad(loss, tuple(range(5))))(hs, pre_k, pre_b, w, b)
    ref_value, ref = reference_f64(kind, hs, ht, pre_k, pre_b, w, b, wt, mask)
    assert ref_value > 1e-2
    np.testing.assert_allclose(value, ref_value, rtol=TOL, atol=TOL)
    for name, got in zip(("h", "pre_k", "pre_b", "w", "b"), grads):
        assert np.abs(ref[name]).max() > 1e-3, name
        np.testing.assert_allclose(got, ref[name], rtol=TOL, atol=TOL, err_msg=name)
    # Teacher inputs get nothing.
    g_ht = jax.jit(jax.grad(lambda ht: chunked_divergence(
        hs, ht, LinearHead(w, b, pre=lambda h: jnp.tanh(h @ pre_k)), lambda h: h @ wt, kind=kind,
        chunk_size=CHUNK)[0]))(ht)
    assert float(jnp.abs(g_ht).max()) == 0.0


def test_vocab_blocks_divide_the_vocabulary():
    assert vocab_blocks(151_936, 4096) == 64  # 151936 = 2^7 · 1187: 64 blocks of 2374 columns
    assert vocab_blocks(50_257, 4096) == 29  # 29 · 1733
    assert vocab_blocks(32_000, 4096) == 8
    assert vocab_blocks(65_521, 4096) == 1  # a prime: one block
    for v in (72, 30_522, 128_256):
        n = vocab_blocks(v, 4096)
        assert v % n == 0 and (v // n <= 4096 or n <= -(-v // 4096))


def test_vocab_map_applies_to_each_teacher_chunk():
    """GLMD vocabulary compression: the teacher's per-chunk logits are sliced to the student's vocabulary."""
    small = preset("llama", hidden_size=16, tie_word_embeddings=True, **dict(SMALL, vocab_size=40))
    graph, params = random_params(small, 2)
    kept = jnp.asarray(np.random.default_rng(3).permutation(V)[:40])

    def vocab_map(logits):
        return jnp.take(logits, kept, axis=-1)

    term = build_method("kd", dict(kd=dict(alpha=1.0, temperature=2.0, chunk_size=CHUNK))).stages[0].terms[0]
    terms_lib.validate_terms([term], small, TEACHER, vocab_map=True)
    batch = make_batch()
    batch["input_ids"] = batch["input_ids"] % 40  # ids both vocabularies have

    @jax.jit
    def both(params):
        s_out, s_inter = step_lib.forward(graph, params, batch)
        t_out, t_inter = step_lib.forward(T_GRAPH, T_PARAMS, batch)
        ctx = terms_lib.TermContext(step=0, progress=0.0, stage_key=jax.random.PRNGKey(0), batch=batch, student=small,
                                    teacher=TEACHER, teacher_name="teacher", s_out=s_out, s_inter=s_inter, t_out=t_out,
                                    t_inter=t_inter, vocab_map=vocab_map)
        heads = dict(student_head=terms_lib.lm_head(graph, params), teacher_head=terms_lib.lm_head(T_GRAPH, T_PARAMS))
        chunked = terms_lib.term_loss(term, dataclasses.replace(ctx, **heads))[0]
        full = terms_lib.term_loss(term, ctx)[0]
        return chunked, full

    chunked, full = both(params)
    assert float(full) > 1e-2
    np.testing.assert_allclose(chunked, full, rtol=TOL, atol=TOL)


def test_chunking_a_soft_capped_head_is_refused():
    """Gemma 2 soft-caps its final logits; the chunked head is linear, so chunking it would drop the cap."""
    capped = preset("gemma2", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                          intermediate_size=32, head="causal_lm", final_logit_softcap=30.0)
    term = build_method("kd", dict(kd=dict(alpha=1.0, temperature=2.0, chunk_size=4))).stages[0].terms[0]
    with pytest.raises(MethodError, match="soft-caps"):
        terms_lib.validate_terms([term], capped, capped)
