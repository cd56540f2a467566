"""No wasted teacher work, the layer-loop rule, a student's own precision and pairwise metrics that equal the loss.

Tiny models (hidden 32, 4 layers, vocab 97, 2 x 8 tokens): each test compiles a few forwards, no training step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax.distill import terms as terms_lib
from kdjax.knowledge import registry
from kdjax.methods.base import Term
from kdjax.models import transformer as T
from kdjax.models.config import ModelConfig
from kdjax.models.taps import Intermediates

VOCAB, B, S = 97, 2, 8


def _config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    m = T.init_model(_config())
    return T.split(m)


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(0, VOCAB, (B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


# A middle-layer recipe: hidden states 0 and 2, Q/K/V of layer 1 (0-based), attention probabilities of layer 0.
MIDDLE = {"hidden_states": (0, 2), "query": (1,), "key": (1,), "value": (1,), "attention_probs": (0,)}


@pytest.mark.parametrize("scan", [True, False])
def test_truncated_pass_reads_what_the_full_pass_reads(model, batch, scan):
    graphdef, params = model
    graphdef, _ = T.split(T.init_model(_config(scan_layers=scan)))
    full_out, full = jax.jit(lambda p, b: T.forward(graphdef, p, b, MIDDLE))(params, batch)
    cut_out, cut = jax.jit(lambda p, b: T.forward(graphdef, p, b, MIDDLE, outputs=False))(params, batch)
    assert full_out.last_hidden_state is not None and full_out.pooler_output is not None
    assert cut_out.last_hidden_state is None and cut_out.pooler_output is None and cut_out.logits is None
    assert cut.requested() == full.requested() and cut.layers == full.layers
    for kind in full.requested():
        np.testing.assert_array_equal(np.asarray(getattr(cut, kind)), np.asarray(getattr(full, kind)))
    # Independent check of one tap: layer 1's queries are its input (hidden state 1) through the query projection.
    h1 = jax.jit(lambda p, b: T.forward(graphdef, p, b, {"hidden_states": (1,)}, outputs=False)[1])(params, batch)
    h1 = np.asarray(h1.hidden_states[0], np.float64)
    wq = np.asarray(params["layers"]["attn"]["q"]["kernel"][1], np.float64)
    bq = np.asarray(params["layers"]["attn"]["q"]["bias"][1], np.float64)
    np.testing.assert_allclose(np.asarray(cut.query[0]).reshape(B, S, -1), h1 @ wq + bq, rtol=1e-5, atol=1e-5)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_truncated_teacher_does_less_work(model, batch):
    graphdef, params = model
    graphdef, _ = T.split(T.init_model(_config(scan_layers=False)))  # XLA counts a while body once
    full = _flops(lambda p, b: T.forward(graphdef, p, b, MIDDLE), params, batch)
    cut = _flops(lambda p, b: T.forward(graphdef, p, b, MIDDLE, outputs=False), params, batch)
    embed_only = _flops(lambda p, b: T.forward(graphdef, p, b, {"hidden_states": (0,)}, outputs=False), params, batch)
    # Layer 2's input is hidden state 2, so two of four layers run; the pooler and the rest are skipped.
    assert cut < 0.6 * full, (cut, full)
    assert embed_only < 0.1 * full, (embed_only, full)


def test_scanned_segments_stack_only_recorded_layers(model, batch):
    """Under scan, an untapped run of layers is a scan with no stacked outputs (nothing zero-filled)."""
    graphdef, params = model
    graphdef, _ = T.split(T.init_model(_config(scan_layers=True, num_layers=6)))
    params6 = T.split(T.init_model(_config(num_layers=6)))[1]
    jaxpr = jax.make_jaxpr(lambda p, b: T.forward(graphdef, p, b, {"query": (1,)}))(params6, batch)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1  # layers 2..5: one scan; layers 0 and 1 are applied on their own
    scan = scans[0]
    assert scan.params["length"] == 4
    assert len(scan.outvars) == scan.params["num_carry"], "the untapped scan must stack no per-layer outputs"
    every = jax.make_jaxpr(lambda p, b: T.forward(graphdef, p, b, {"query": None}))(params6, batch)
    scans = [e for e in every.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 6
    assert [v.aval.shape[0] for v in scans[0].outvars[scans[0].params["num_carry"]:]] == [6]


def test_layer_loop_rule():
    assert jax.default_backend() == "cpu"
    assert not T.scans_layers(_config(num_layers=6))
    assert not T.scans_layers(_config(num_layers=T.AUTO_UNROLL_MAX_LAYERS))
    assert T.scans_layers(_config(num_layers=T.AUTO_UNROLL_MAX_LAYERS + 1))
    assert T.scans_layers(_config(num_layers=2, scan_layers=True))
    assert not T.scans_layers(_config(num_layers=48, scan_layers=False))


def test_teacher_outputs_needed_only_for_outputs():
    hidden = Term.make("hidden_mse", "hidden_states", layers="uniform")
    qkv = Term.make("qkv_relation_kl", "qkv", layers="final")
    logits = Term.make("divergence", "logits")
    assert not terms_lib.teacher_outputs_needed([hidden, qkv])
    assert terms_lib.teacher_outputs_needed([hidden, logits])
    assert terms_lib.teacher_outputs_needed([hidden], stage_loss=lambda ctx: None)


def test_student_of_a_bf16_teacher_keeps_float32_master_weights():
    teacher = kdjax.Model.init(_config(dtype="bfloat16", param_dtype="bfloat16"))
    student = kdjax.student_from(teacher, num_layers=2, layers=(1, 3))
    assert student.config.dtype == "float32" and student.config.param_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(student.params)} == {jnp.dtype(jnp.float32)}
    # The copied layers hold the teacher's (bf16) values exactly, widened.
    np.testing.assert_array_equal(np.asarray(student.params["layers"]["attn"]["q"]["kernel"][1]),
                                  np.asarray(teacher.params["layers"]["attn"]["q"]["kernel"][3], np.float32))
    low = kdjax.student_from(teacher, num_layers=2, dtype="bfloat16", param_dtype="bfloat16")
    assert low.config.dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(low.params)} == {jnp.dtype(jnp.bfloat16)}


def test_pairwise_metric_reports_the_loss():
    """A term over several layer pairs: its metric reads as the sum over pairs, like its loss (NumPy reference)."""
    rng = np.random.default_rng(1)
    s_cfg, t_cfg = _config(num_layers=2), _config(num_layers=4)
    s_h = rng.standard_normal((3, B, S, 32)).astype(np.float32)
    t_h = rng.standard_normal((5, B, S, 32)).astype(np.float32)
    mask = np.ones((B, S), np.int32)
    mask[0, 6:] = 0
    term = Term.make("hidden_mse", "hidden_states", layers="uniform", name="hidden")
    pairs = terms_lib.pairs_for(term, s_cfg, t_cfg)
    assert len(pairs) == 3
    ctx = registry.TermContext(
        step=0, progress=0.0, stage_key=jax.random.key(0), batch={"input_ids": np.zeros((B, S), np.int32),
                                                                  "attention_mask": mask},
        student=s_cfg, teacher=t_cfg, teacher_name="teacher", s_out=None, t_out=None,
        s_inter=Intermediates(hidden_states=jnp.asarray(s_h), layers=(("hidden_states", (0, 1, 2)),)),
        t_inter=Intermediates(hidden_states=jnp.asarray(t_h), layers=(("hidden_states", (0, 1, 2, 3, 4)),)))
    loss, metrics = registry.get("hidden_mse").apply(ctx, term)
    m = mask.astype(np.float64)
    want = sum((np.square(s_h[i].astype(np.float64) - t_h[j]).mean(-1) * m).sum() / m.sum() for i, j in pairs)
    total, count = metrics["hidden"]
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-6)


PROBE = """
import resource
import kdjax  # noqa: F401  (configures the host allocator on import)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # a 64 MiB output per call, above glibc's mmap threshold
counts = []
for _ in range(48):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()  # the previous output is freed when the result is dropped
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(counts)
"""


@pytest.mark.parametrize("choice", ["reuse", "system"])
def test_repeated_steps_stop_page_faulting(choice):
    """A program run repeatedly maps no new host memory after warm-up (KDJAX_HOST_MALLOC=system: it does)."""
    import ast
    import os
    import subprocess
    import sys

    env = dict(os.environ, KDJAX_HOST_MALLOC=choice, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    pages = 64 * 1024 * 1024 // 4096
    if choice == "reuse":
        # The heap grows for the first calls (glibc's aligned blocks need a little more than a freed one
        # offers until neighbours coalesce), then the freed blocks are handed out again. Under load a
        # stray call still lands on a fresh block now and then (seen: up to 2 of the last 24).
        faulting = sum(c >= pages // 2 for c in counts[-24:])
        assert faulting <= 4, counts
    else:  # every call maps and touches a fresh 64 MiB
        assert min(counts[-24:]) >= pages // 2, counts


def test_host_malloc_choice_is_checked(monkeypatch):
    from kdjax import host_memory
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv(host_memory.ENV, "tcmalloc")
    with pytest.raises(ValueError, match="KDJAX_HOST_MALLOC"):
        host_memory.reuse_host_memory()
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv(host_memory.ENV, "system")
    assert host_memory.reuse_host_memory() is False
