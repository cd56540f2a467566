"""Chunked large-vocabulary logit KD against the unchunked term, a float64 reference and the compiler.

``divergence`` on full logits is the reference for values *and* gradients (it is itself checked
against float64 formulas in ``test_knowledge_divergences.py``); the values are also compared with an
independent vectorized float64 numpy reference here. Shapes are chosen so that ``S`` is not a
multiple of ``chunk_size`` and some positions are masked, which exercises both kinds of padding.
"""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.knowledge import divergence
from kdjax.knowledge.chunked import LinearHead, chunked_divergence, num_chunks
from kdjax.models import preset, split
from kdjax.models.transformer import init_model
from kdjax.sharding import MeshConfig, make_mesh

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
B, S, DS, DT, V = 2, 13, 8, 12, 48
TEMPERATURE = 2.0
TOL = 1e-5


def make_inputs(seed=0, d_s=DS, d_t=DT, v=V, b=B, s=S):
    rng = np.random.default_rng(seed)  # numpy, not jax.random: no per-op compiles in eager mode
    hs = jnp.asarray(rng.standard_normal((b, s, d_s)), jnp.float32)
    ht = jnp.asarray(rng.standard_normal((b, s, d_t)), jnp.float32)
    ws = jnp.asarray(0.7 * rng.standard_normal((d_s, v)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((d_t, v)), jnp.float32)
    mask = np.ones((b, s), np.int32)
    mask[1, s - 5:] = 0  # right padding
    mask[0, 2] = 0  # a hole in the middle
    return hs, ht, ws, wt, jnp.asarray(mask)


def loss_pair(kind, mask, chunk_size, **kw):
    """(chunked, unchunked) losses as functions of (student hidden, student W, teacher hidden, teacher W)."""

    def chunked(hs, ws, ht, wt):
        return chunked_divergence(hs, ht, lambda h: h @ ws, lambda h: h @ wt, mask, kind=kind,
                                  temperature=TEMPERATURE, chunk_size=chunk_size, **kw)

    def full(hs, ws, ht, wt):
        return divergence(hs @ ws, ht @ wt, mask, kind=kind, temperature=TEMPERATURE, **kw)

    return chunked, full


def ref_value_f64(hs, ws, ht, wt, mask, kind, temperature, beta=0.5, lam=0.1):
    """Vectorized float64 numpy reference of the masked, T²-scaled mean (probability-space mixtures)."""
    zs = np.asarray(hs, np.float64) @ np.asarray(ws, np.float64) / temperature
    zt = np.asarray(ht, np.float64) @ np.asarray(wt, np.float64) / temperature
    q = np.exp(zs - zs.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.exp(zt - zt.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)

    def kl(a, b):
        return np.sum(a * (np.log(a) - np.log(b)), axis=-1)

    per = {
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
        "tvd": lambda: 0.5 * np.abs(p - q).sum(-1),
        "skew_kl": lambda: kl(p, lam * p + (1 - lam) * q),
        "skew_reverse_kl": lambda: kl(q, (1 - lam) * p + lam * q),
    }[kind]() * temperature ** 2
    m = np.asarray(mask, bool)
    return per[m].sum() / m.sum(), per[m].sum(), m.sum()


# ---------------------------------------------------------------------------------------------
# Value and gradients equal the unchunked term.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_value_and_grads_match_unchunked(kind):
    hs, ht, ws, wt, mask = make_inputs()
    chunked, full = loss_pair(kind, mask, chunk_size=4)  # 13 = 3·4 + 1: the last chunk is mostly padding
    (loss_c, met_c), grads_c = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hs, ws, ht, wt)
    (loss_f, met_f), grads_f = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(hs, ws, ht, wt)

    ref, ref_sum, ref_count = ref_value_f64(hs, ws, ht, wt, mask, kind, TEMPERATURE)
    np.testing.assert_allclose(loss_c, ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(loss_c, loss_f, rtol=TOL, atol=TOL)
    key = f"kd/{kind}"
    assert set(met_c) == {key}
    np.testing.assert_allclose(met_c[key][0], ref_sum, rtol=TOL)
    assert float(met_c[key][1]) == float(met_f[key][1]) == ref_count == 20
    assert float(loss_f) > 1e-3  # a non-trivial term, so equal gradients mean something
    for g_c, g_f in zip(grads_c, grads_f):
        assert g_c.shape == g_f.shape
        assert float(jnp.abs(g_f).max()) > 1e-4
        np.testing.assert_allclose(g_c, g_f, rtol=TOL, atol=TOL)
    # Padded positions get exactly no gradient.
    assert float(jnp.abs(grads_c[0][1, S - 5:]).max()) == 0.0
    assert float(jnp.abs(grads_c[0][0, 2]).max()) == 0.0


@pytest.mark.parametrize("chunk_size", [1, 13, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    """Any chunk size (1, not dividing S, equal to S, larger than S) gives the unchunked value and grads."""
    hs, ht, ws, wt, mask = make_inputs(seed=1)
    chunked, full = loss_pair("jsd", mask, chunk_size=chunk_size, beta=0.3)
    (loss_c, _), g_c = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hs, ws, ht, wt)
    (loss_f, _), g_f = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(hs, ws, ht, wt)
    np.testing.assert_allclose(loss_c, loss_f, rtol=TOL, atol=TOL)
    for a, b in zip(g_c, g_f):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)
    assert num_chunks(S, chunk_size) == -(-S // min(chunk_size, S))


def test_no_mask_t2_off_and_traced_temperature():
    hs, ht, ws, wt, _ = make_inputs(seed=2)

    @jax.jit
    def both(hs, ws, temperature):
        c = chunked_divergence(hs, ht, lambda h: h @ ws, lambda h: h @ wt, kind="forward_kl",
                               temperature=temperature, scale_by_t2=False, chunk_size=6, name="lm")
        f = divergence(hs @ ws, ht @ wt, kind="forward_kl", temperature=temperature, scale_by_t2=False, name="lm")
        return c, f

    (loss_c, met_c), (loss_f, met_f) = both(hs, ws, jnp.float32(3.0))
    np.testing.assert_allclose(loss_c, loss_f, rtol=TOL)
    assert float(met_c["lm/forward_kl"][1]) == B * S
    ref, _, _ = ref_value_f64(hs, ws, ht, wt, np.ones((B, S)), "forward_kl", 3.0)
    np.testing.assert_allclose(loss_c, ref / 9.0, rtol=TOL)


def test_teacher_gets_no_gradient():
    hs, ht, ws, wt, mask = make_inputs(seed=3)
    chunked, _ = loss_pair("reverse_kl", mask, chunk_size=4)
    g_ht, g_wt = jax.jit(jax.grad(lambda ht, wt: chunked(hs, ws, ht, wt)[0], (0, 1)))(ht, wt)
    assert float(jnp.abs(g_ht).max()) == 0.0
    assert float(jnp.abs(g_wt).max()) == 0.0


def test_garbage_in_masked_positions_stays_out_of_value_and_grads():
    """inf/nan hidden states at padded positions must not reach the loss or the head's weight gradient."""
    hs, ht, ws, wt, mask = make_inputs(seed=4)
    chunked, _ = loss_pair("forward_kl", mask, chunk_size=4)
    dirty_hs = hs.at[1, S - 5:].set(jnp.nan).at[0, 2].set(jnp.inf)
    dirty_ht = ht.at[1, S - 5:].set(-jnp.inf)
    step = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))
    clean = step(hs, ws, ht, wt)
    dirty = step(dirty_hs, ws, dirty_ht, wt)
    np.testing.assert_allclose(dirty[0][0], clean[0][0], rtol=TOL)
    np.testing.assert_allclose(dirty[1][1], clean[1][1], rtol=TOL, atol=TOL)
    assert bool(jnp.all(jnp.isfinite(dirty[1][0])))


def test_fully_masked_batch_is_zero_not_nan():
    hs, ht, ws, wt, _ = make_inputs(seed=5)
    chunked, _ = loss_pair("tvd", jnp.zeros((B, S), jnp.int32), chunk_size=4)
    (loss, met), grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hs, ws, ht, wt)
    assert float(loss) == 0.0 and float(met["kd/tvd"][1]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def random_model(config, seed):
    """(graphdef, params) with every parameter drawn at random in numpy.

    The model is built abstractly, so no initializer is compiled; random norm scales and biases also
    make every head parameter matter, which the plain init (scale 1, bias 0) would not.
    """
    graphdef, abstract = split(nnx.eval_shape(lambda: init_model(config, seed)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), abstract)
    return graphdef, params


@pytest.mark.parametrize("linear", [False, True])
def test_nnx_lm_heads_match_unchunked(linear):
    """Real heads: an MLM student (transform + norm + tied decoder + bias) and an untied causal-LM teacher.

    ``linear``: the student head is ``terms.lm_head`` (a `LinearHead`, custom_vjp path) instead of a
    closure over ``lm_logits``; the gradients of the transform, norm, embedding and bias must still match.
    """
    from kdjax.distill.terms import lm_head
    vocab = 40
    small = dict(vocab_size=vocab, num_layers=1, num_heads=2, intermediate_size=32)
    s_graph, s_params = random_model(preset("bert", hidden_size=16, head="mlm", **small), seed=0)
    t_graph, t_params = random_model(preset("llama", hidden_size=24, num_kv_heads=1, head="causal_lm",
                                            tie_word_embeddings=False, **small), seed=1)
    hs, ht, _, _, mask = make_inputs(seed=6, d_s=16, d_t=24, v=vocab)

    def chunked(params, hs):
        head = lm_head(s_graph, params) if linear else (lambda h: nnx.merge(s_graph, params).lm_logits(h))
        return chunked_divergence(hs, ht, head,
                                  lambda h: nnx.merge(t_graph, t_params).lm_logits(h), mask,
                                  kind="skew_kl", chunk_size=4)[0]

    def full(params, hs):
        s_logits = nnx.merge(s_graph, params).lm_logits(hs)
        t_logits = nnx.merge(t_graph, t_params).lm_logits(ht)
        return divergence(s_logits, t_logits, mask, kind="skew_kl")[0]

    loss_c, (gp_c, gh_c) = jax.jit(jax.value_and_grad(chunked, (0, 1)))(s_params, hs)
    loss_f, (gp_f, gh_f) = jax.jit(jax.value_and_grad(full, (0, 1)))(s_params, hs)
    np.testing.assert_allclose(loss_c, loss_f, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(gh_c, gh_f, rtol=TOL, atol=TOL)
    leaves_c, leaves_f = jax.tree.leaves(gp_c), jax.tree.leaves(gp_f)
    assert len(leaves_c) == len(leaves_f)
    touched = 0
    for a, b in zip(leaves_c, leaves_f):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)
        touched += float(jnp.abs(b).max()) > 0
    assert touched == 6  # mlm transform kernel + bias, mlm norm scale + bias, tied word embedding, mlm bias


# ---------------------------------------------------------------------------------------------
# Sharded vocabulary.
# ---------------------------------------------------------------------------------------------


def _collectives(hlo_text):
    """(op, result shape text) of every cross-device collective in compiled HLO."""
    found = []
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(.*?)\s+(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                      r"(?:-start)?\(", line)
        if m:
            found.append((m.group(2), m.group(1)))
    return found


def test_sharded_vocab_matches_unsharded_and_never_gathers_logits():
    hs, ht, ws, wt, mask = make_inputs(seed=7)
    mesh = make_mesh(MeshConfig(axes=("fsdp", "tensor"), ici=(2, 4)))
    assert mesh.shape["tensor"] == 4 and V % 4 == 0

    def sharded(*spec):
        return NamedSharding(mesh, P(*spec))

    def grad_fn(hs, ws, ht, wt):
        def loss(hs, ws):
            return chunked_divergence(hs, ht, lambda h: h @ ws, lambda h: h @ wt, mask, kind="jsd",
                                      temperature=TEMPERATURE, chunk_size=4)[0]
        return jax.value_and_grad(loss, (0, 1))(hs, ws)

    step = jax.jit(grad_fn)
    ref_loss, (ref_ghs, ref_gws) = step(hs, ws, ht, wt)
    args = (jax.device_put(hs, sharded("fsdp")), jax.device_put(ws, sharded(None, "tensor")),
            jax.device_put(ht, sharded("fsdp")), jax.device_put(wt, sharded(None, "tensor")))
    loss, (ghs, gws) = step(*args)
    np.testing.assert_allclose(loss, ref_loss, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(ghs, ref_ghs, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(gws, ref_gws, rtol=TOL, atol=TOL)
    _, full = loss_pair("jsd", mask, chunk_size=4)
    np.testing.assert_allclose(loss, jax.jit(full)(hs, ws, ht, wt)[0], rtol=TOL, atol=TOL)
    assert gws.sharding.spec == P(None, "tensor")  # the head gradient stays vocab-sharded

    colls = _collectives(step.lower(*args).compile().as_text())
    assert any(op == "all-reduce" for op, _ in colls)  # the V reductions are partial sums + all-reduce
    assert not [c for c in colls if c[0] in ("all-gather", "all-to-all")], colls
    # No collective moves anything vocabulary-sized: the biggest is the [D, V/4] head-gradient shard.
    for _, shape in colls:
        assert not re.search(rf"\b{V}\b", shape), shape

    # The detector itself: forcing each chunk's logits to be replicated does show an all-gather.
    def gathering(hs, ws, ht, wt):
        replicate = lambda x: jax.lax.with_sharding_constraint(x, sharded())  # noqa: E731
        return chunked_divergence(hs, ht, lambda h: replicate(h @ ws), lambda h: h @ wt, mask, kind="jsd",
                                  chunk_size=4)[0]

    bad = _collectives(jax.jit(gathering).lower(*args).compile().as_text())
    assert any(op == "all-gather" for op, _ in bad), bad


def test_sharded_vocab_linear_head_vjp_matches_and_never_gathers():
    """The custom_vjp path with strided vocabulary blocks (48 = 4 blocks of 12) on a V-sharded head."""
    hs, ht, ws, wt, mask = make_inputs(seed=8)
    bias = jnp.asarray(np.random.default_rng(8).standard_normal((V,)), jnp.float32)
    mesh = make_mesh(MeshConfig(axes=("fsdp", "tensor"), ici=(2, 4)))

    def grad_fn(hs, ws, bias, ht, wt):
        def loss(hs, ws, bias):
            return chunked_divergence(hs, ht, LinearHead(ws, bias), lambda h: h @ wt, mask, kind="reverse_kl",
                                      temperature=TEMPERATURE, chunk_size=4, vocab_block_size=12)[0]
        return jax.value_and_grad(loss, (0, 1, 2))(hs, ws, bias)

    def full(hs, ws, bias):
        return divergence(hs @ ws + bias, ht @ wt, mask, kind="reverse_kl", temperature=TEMPERATURE)[0]

    step = jax.jit(grad_fn)
    args = (jax.device_put(hs, NamedSharding(mesh, P("fsdp"))), jax.device_put(ws, NamedSharding(mesh, P(None, "tensor"))),
            jax.device_put(bias, NamedSharding(mesh, P("tensor"))), jax.device_put(ht, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(wt, NamedSharding(mesh, P(None, "tensor"))))
    loss, grads = step(*args)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(full, (0, 1, 2)))(hs, ws, bias)
    np.testing.assert_allclose(loss, ref_loss, rtol=TOL, atol=TOL)
    for got, ref in zip(grads, ref_grads):
        assert float(jnp.abs(ref).max()) > 1e-4
        np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)
    colls = _collectives(step.lower(*args).compile().as_text())
    assert not [c for c in colls if c[0] in ("all-gather", "all-to-all")], colls
    for _, shape in colls:
        assert not re.search(rf"\b{V}\b", shape), shape


# ---------------------------------------------------------------------------------------------
# Compiled memory: the point of chunking.
# ---------------------------------------------------------------------------------------------


def test_compiled_temp_memory_is_a_fraction_of_unchunked():
    """At V=32k, S=512, B=2 the unchunked loss+grad needs several [B, S, V] float32 buffers (128 MiB each);
    the chunked one only [B, 32, V] ones, so its compiled scratch memory is ≤ 10% of the unchunked."""
    b, s, d, v, chunk = 2, 512, 64, 32_000, 32
    abstract = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((b, s, d), (d, v), (b, s, d), (d, v))]

    def grad_fn(chunked):
        def loss(hs, ws, ht, wt):
            if chunked:
                return chunked_divergence(hs, ht, lambda h: h @ ws, lambda h: h @ wt, chunk_size=chunk)[0]
            return divergence(hs @ ws, ht @ wt)[0]
        return jax.grad(loss, (0, 1))

    full = jax.jit(grad_fn(False)).lower(*abstract).compile().memory_analysis()
    chunked = jax.jit(grad_fn(True)).lower(*abstract).compile().memory_analysis()
    logits_bytes = b * s * v * 4
    assert full.temp_size_in_bytes >= 2 * logits_bytes  # the reference really holds full logits
    assert chunked.temp_size_in_bytes <= 0.10 * full.temp_size_in_bytes, (
        chunked.temp_size_in_bytes, full.temp_size_in_bytes)
    assert chunked.temp_size_in_bytes < logits_bytes / 2  # not even half of one [B, S, V] tensor
    assert chunked.output_size_in_bytes == full.output_size_in_bytes  # same gradients out


def test_linear_head_vjp_removes_the_weight_gradient_floor():
    """With a wide head (D=512) the autodiff path keeps one [D, V] buffer per chunk (25% of the unchunked
    temp here); the LinearHead custom_vjp forms the weight gradient in [D, V/8] blocks and stays <= 10%."""
    b, s, d, v, chunk = 1, 512, 512, 32_000, 16
    abstract = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((b, s, d), (d, v), (b, s, d), (d, v))]

    def temp(kind):
        def loss(hs, ws, ht, wt):
            if kind == "full":
                return divergence(hs @ ws, ht @ wt)[0]
            head = LinearHead(ws) if kind == "linear" else (lambda h: h @ ws)
            return chunked_divergence(hs, ht, head, lambda h: h @ wt, chunk_size=chunk, vocab_block_size=4000)[0]
        return jax.jit(jax.grad(loss, (0, 1))).lower(*abstract).compile().memory_analysis().temp_size_in_bytes

    full, autodiff, linear = temp("full"), temp("autodiff"), temp("linear")
    weight_grad_bytes = d * v * 4
    assert autodiff >= weight_grad_bytes  # the floor this path cannot get under
    assert autodiff > 0.10 * full, (autodiff, full)
    assert linear <= 0.10 * full, (linear, full)
    assert linear < weight_grad_bytes / 2


def test_benchmark_runs_in_a_tiny_setting(tmp_path, capsys):
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "chunked_logits.py")
    spec = importlib.util.spec_from_file_location("bench_chunked_logits", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from absl import flags
    out = tmp_path / "cl.json"
    flags.FLAGS(["chunked_logits.py", "--vocab=96", "--seq_len=16", "--dim=8", "--chunk_sizes=4",
                 "--vocab_block_size=32", f"--output={out}"])
    bench.main([])
    saved = json.loads(out.read_text())
    variants = [r["variant"] for r in saved["results"]]
    assert variants == ["unchunked", "autodiff (4)", "linear vjp (4)"]
    assert saved["config"]["vocab_blocks"] == 3
    assert all(r["temp_bytes"] >= 0 for r in saved["results"]) and saved["results"][0]["temp_ratio"] == 1.0
    assert "| linear vjp (4) |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(chunk_size=0), "chunk_size must be a positive"),
    (dict(chunk_size=2.5), "chunk_size must be a positive"),
    (dict(kind="kl"), "unknown divergence kind"),
    (dict(kind="jsd", beta=1.5), "outside"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(mask=jnp.ones((B, S + 1))), "mask shape"),
    (dict(ht=jnp.ones((B, S - 1, DT))), "differ in \\[B, S\\]"),
    (dict(hs=jnp.ones((B * S, DS))), "must be \\[B, S, D\\]"),
    (dict(wt=jnp.ones((DT, V + 1))), "vocab size"),
    (dict(student_head=lambda h: jnp.sum(h, -1)), "must return logits of shape"),
])
def test_bad_input_raises_one_line_value_error(change, match):
    hs, ht, ws, wt, mask = make_inputs()
    hs, ht, wt = change.pop("hs", hs), change.pop("ht", ht), change.pop("wt", wt)
    student_head = change.pop("student_head", lambda h: h @ ws)
    kwargs = {"mask": mask, **change}
    with pytest.raises(ValueError, match=match) as err:
        chunked_divergence(hs, ht, student_head, lambda h: h @ wt, **kwargs)
    assert "\n" not in str(err.value)
