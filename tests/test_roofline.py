"""`kdjax.roofline`: XLA's FLOPs against hand counts, collective bytes against the ring model by hand,
the loop correction, the chip table against docs/roofline.md, and the estimate in a plan."""

import dataclasses
import importlib.util
import math
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax import plan as P
from kdjax import roofline as R
from kdjax.hub.api import abstract_model
from kdjax.models.config import preset
from kdjax.models.transformer import forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))


# --------------------------------------------------------------------------------------------------
# FLOPs.


@pytest.mark.parametrize("scan", [True, False])
def test_forward_flops_match_the_analytic_count(scan):
    """A 4-layer Llama forward: XLA's FLOPs (loop-corrected) are 2 x matmul weights x tokens + attention.

    By hand: per layer q, o [64, 64], k, v [64, 32] (2 KV heads of 16), gate/up/down [64, 128]; the LM
    head [64, 256]. Attention: QK^T and AV are 2 x S x S x head_dim FLOPs each per head and sequence.
    XLA adds the element-wise work (norms, RoPE, softmax, SiLU) on top: within 5%.
    """
    cfg = preset("llama", vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, head="causal_lm", scan_layers=scan)
    b, s = 2, 32
    weights = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 256
    attention = 4 * 4 * 2 * (2 * b * s * s * 16)  # layers x heads x (QK^T, AV) x 2 x B x S x S x head_dim
    by_hand = 2 * weights * b * s + attention
    assert R.matmul_params(cfg) == weights and R.attention_flops(cfg, b, s) == attention

    graphdef, params = abstract_model(cfg)
    batch = {"input_ids": jax.ShapeDtypeStruct((b, s), jnp.int32)}
    compiled = jax.jit(lambda p, x: forward(graphdef, p, x)[0]).lower(params, batch).compile()
    cost = R.analyze(compiled)
    assert by_hand <= cost.flops <= 1.05 * by_hand, cost.flops / by_hand
    if scan:
        # XLA's own count has the scanned body once: about a quarter of the layers' work.
        assert cost.loops and cost.loops[0][1] == 4
        assert cost.xla_flops < 0.5 * by_hand
    else:
        assert cost.loops == () and cost.flops == cost.xla_flops


# --------------------------------------------------------------------------------------------------
# Collectives.


def test_contraction_sharded_matmul_is_one_all_reduce_of_the_output():
    """[64, 256] @ [256, 128] with the 256 split 8 ways: each device holds a partial [64, 128] f32 sum.

    Ring all-reduce over 8 devices: each sends 2 x 7/8 of 64 x 128 x 4 bytes = 57,344 bytes.
    """
    mesh = _mesh()
    a = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x")))
    w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x", None)))
    compiled = jax.jit(lambda a, w: a @ w, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(a, w).compile()
    cost = R.analyze(compiled)
    assert [(c.kind, c.group_size, c.executions) for c in cost.collectives] == [("all-reduce", 8, 1)]
    assert cost.collectives[0].buffer_bytes == 64 * 128 * 4
    assert cost.comm_bytes == 57344
    # XLA's FLOPs are per device: the local [64, 32] @ [32, 128] (plus the all-reduce's adds).
    assert 2 * 64 * 32 * 128 <= cost.flops <= 2 * 64 * 32 * 128 + 64 * 128


def test_fsdp_sharded_weight_is_all_gathered():
    """Rows of x and of the weight [256, 512] f32 split 8 ways: XLA gathers the weight.

    Ring all-gather of the 256 x 512 x 4 = 524,288-byte weight: each device sends 7/8 of it, 458,752.
    """
    mesh = _mesh()
    rows = NamedSharding(mesh, PartitionSpec("x", None))
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=rows)
    compiled = jax.jit(lambda x, w: x @ w, out_shardings=rows).lower(x, w).compile()
    cost = R.analyze(compiled)
    assert [(c.kind, c.group_size) for c in cost.collectives] == [("all-gather", 8)]
    assert cost.collectives[0].buffer_bytes == 524288
    assert cost.comm_bytes == 458752


def test_collectives_in_a_scanned_loop_count_once_per_layer():
    """10 scanned layers with weights split over 8 devices: one all-reduce of [64, 128] f32 per layer."""
    mesh = _mesh()
    w = jax.ShapeDtypeStruct((10, 128, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x")))
    h = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def layers(w, h):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), h, w)[0]

    cost = R.analyze(jax.jit(layers, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(w, h).compile())
    reduces = [c for c in cost.collectives if c.kind == "all-reduce"]
    assert [(c.executions, c.group_size, c.buffer_bytes) for c in reduces] == [(10, 8, 64 * 128 * 4)]
    assert sum(c.total_bytes for c in reduces) == 10 * 2 * 7 / 8 * 64 * 128 * 4


# A scanned program as the TPU compiler prints it: no known_trip_count, the bound in the condition.
LOOP_HLO = """HloModule jit_layers, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%fused_dot (param_0: f32[16,64], param_1: f32[12,64,64], param_2: s32[]) -> f32[16,64] {
  %param_0 = f32[16,64]{1,0:T(8,128)} parameter(0)
  %param_1 = f32[12,64,64]{2,1,0:T(8,128)} parameter(1)
  %param_2 = s32[]{:T(128)} parameter(2)
  %zero = s32[] constant(0)
  %dynamic-slice = f32[1,64,64]{2,1,0} dynamic-slice(%param_1, %param_2, %zero, %zero), dynamic_slice_sizes={1,64,64}
  %bitcast = f32[64,64]{1,0} bitcast(%dynamic-slice)
  ROOT %dot = f32[16,64]{1,0} dot(%param_0, %bitcast), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[16,64], f32[12,64,64])) -> (s32[], f32[16,64], f32[12,64,64]) {
  %p = (s32[]{:T(128)}, f32[16,64]{1,0}, /*index=2*/f32[12,64,64]{2,1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %h = f32[16,64]{1,0} get-tuple-element(%p), index=1
  %w = f32[12,64,64]{2,1,0} get-tuple-element(%p), index=2
  %all-gather = f32[64,64]{1,0} all-gather(%h), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %fusion = f32[16,64]{1,0} fusion(%h, %w, %i), kind=kOutput, calls=%fused_dot
  %all-reduce = f32[16,64]{1,0} all-reduce(%fusion), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[16,64]{1,0}, f32[12,64,64]{2,1,0}) tuple(%next, %all-reduce, %w)
}

%cond (p.1: (s32[], f32[16,64], f32[12,64,64])) -> pred[] {
  %p.1 = (s32[], f32[16,64]{1,0}, f32[12,64,64]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x: f32[16,64], w: f32[12,64,64]) -> f32[16,64] {
  %x.1 = f32[16,64]{1,0} parameter(0)
  %w.1 = f32[12,64,64]{2,1,0} parameter(1)
  %start = s32[] constant(0)
  %init = s32[] copy(%start)
  %tuple = (s32[], f32[16,64]{1,0}, f32[12,64,64]{2,1,0}) tuple(%init, %x.1, %w.1)
  %while = (s32[], f32[16,64]{1,0}, f32[12,64,64]{2,1,0}) while(%tuple), condition=%cond, body=%body
  ROOT %out = f32[16,64]{1,0} get-tuple-element(%while), index=1
  %ag.mesh = f32[32,64]{1,0} all-gather(%x.1), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
}
"""


def test_trip_count_from_the_loop_condition_scales_body_costs_and_collectives():
    xla_flops, xla_bytes = 1.0e6, 2.0e6  # what XLA would report: the body once
    cost = R.analyze_text(LOOP_HLO, xla_flops, xla_bytes)
    assert cost.loops == (("body", 12),)
    # The body's dot, [16, 64] @ [64, 64], and its counter add, 11 more times; the condition's compare
    # 12 more times (it runs 13 times).
    assert cost.flops == xla_flops + 11 * (2 * 16 * 64 * 64 + 1) + 12 * 1
    # The body's HBM traffic, 11 more times: the fusion reads h (4096 B), one [64, 64] slice of the
    # weight stack (16384 B, not the whole 196,608-byte stack) and i (4), writes 4096; the all-gather
    # reads 4096 and writes 16384; the all-reduce 4096 + 4096; the counter add 4 + 4 + 4. The
    # condition's compare (4 + 4 bytes in, a 1-byte pred out) runs 13 times, 12 more than XLA counts.
    body = (4096 + 16384 + 4 + 4096) + (4096 + 16384) + (4096 + 4096) + 12
    assert cost.bytes_accessed == xla_bytes + 11 * body + 12 * 9
    kinds = {(c.name, c.kind): c for c in cost.collectives}
    gather, reduce, mesh_gather = (kinds[("all-gather", "all-gather")], kinds[("all-reduce", "all-reduce")],
                                   kinds[("ag.mesh", "all-gather")])
    # Iota groups [2,4]<=[8]: groups of 4; the gathered buffer is 4 x 4096 B, 3/4 of it sent, 12 times.
    assert (gather.group_size, gather.executions, gather.buffer_bytes, gather.bytes_sent) == (4, 12, 16384, 12288)
    # Listed groups of 2: all-reduce sends 2 x 1/2 of 4096 B, 12 times.
    assert (reduce.group_size, reduce.executions, reduce.bytes_sent) == (2, 12, 4096)
    # Mesh groups over 'axis_1' of size 4, outside the loop.
    assert (mesh_gather.group_size, mesh_gather.executions, mesh_gather.bytes_sent) == (4, 1, 3 / 4 * 4 * 4096)
    assert cost.comm_bytes == 12 * 12288 + 12 * 4096 + 12288


# TPU-style matmuls: a plain one as a 1x1 convolution and a batched one whose batch is a spatial
# dimension with lhs_dilate = window size (each output meets one real input per window), in a loop the
# CPU compiler's way (known_trip_count).
CONV_HLO = """HloModule jit_convs, num_partitions=1

%body (p: (s32[], f32[4,16,64], f32[4,64,32])) -> (s32[], f32[4,16,64], f32[4,64,32]) {
  %p = (s32[], f32[4,16,64]{2,1,0}, f32[4,64,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %a = f32[4,16,64]{2,1,0} get-tuple-element(%p), index=1
  %b = f32[4,64,32]{2,1,0} get-tuple-element(%p), index=2
  %batched = f32[4,16,32]{2,1,0:T(8,128)} convolution(%a, %b), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0io->0bf
  %a0 = f32[16,64]{1,0} slice(%a), slice={[0:1], [0:16], [0:64]}
  %b0 = f32[64,32]{1,0} slice(%b), slice={[0:1], [0:64], [0:32]}
  %plain = f32[16,32]{1,0} convolution(%a0, %b0), window={size=1}, dim_labels=bf_io->bf
  ROOT %t = (s32[], f32[4,16,64]{2,1,0}, f32[4,64,32]{2,1,0}) tuple(%i, %a, %b)
}

%cond (q: (s32[], f32[4,16,64], f32[4,64,32])) -> pred[] {
  %q = (s32[], f32[4,16,64]{2,1,0}, f32[4,64,32]{2,1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a.1: f32[4,16,64], b.1: f32[4,64,32]) -> f32[4,16,64] {
  %a.1 = f32[4,16,64]{2,1,0} parameter(0)
  %b.1 = f32[4,64,32]{2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %tuple = (s32[], f32[4,16,64]{2,1,0}, f32[4,64,32]{2,1,0}) tuple(%zero, %a.1, %b.1)
  %while = (s32[], f32[4,16,64]{2,1,0}, f32[4,64,32]{2,1,0}) while(%tuple), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[4,16,64]{2,1,0} get-tuple-element(%while), index=1
}
"""


def test_tpu_style_convolutions_count_matmul_flops():
    cost = R.analyze_text(CONV_HLO, 0.0, 0.0)
    assert cost.loops == (("body", 3),)
    # Two more executions of: 4 batches of [16, 64] @ [64, 32], and one [16, 64] @ [64, 32].
    assert cost.flops == 2 * (4 * 2 * 16 * 64 * 32 + 2 * 16 * 64 * 32)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_compiled_scan_of_batched_matmuls_matches_the_hand_count():
    """3 scanned steps of [8, 32, 64] @ [8, 64, 128] compiled for a v5e chip: 3 x 2 x 8 x 32 x 64 x 128."""
    device = P.get_topology("v5e:2x2").devices[0]
    one = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    a = jax.ShapeDtypeStruct((8, 32, 64), jnp.bfloat16, sharding=one)
    w = jax.ShapeDtypeStruct((3, 8, 64, 128), jnp.bfloat16, sharding=one)

    def steps(a, w):
        return jax.lax.scan(lambda acc, wi: (acc + jnp.einsum("bmk,bkn->bmn", a, wi), None),
                            jnp.zeros((8, 32, 128), jnp.float32), w)[0]

    cost = R.analyze(jax.jit(steps, out_shardings=one).lower(a, w).compile())
    by_hand = 3 * 2 * 8 * 32 * 64 * 128
    assert [n for _, n in cost.loops] in ([3], [])  # the compiler may unroll so short a loop
    assert by_hand <= cost.flops <= 1.05 * by_hand, cost.flops / by_hand


def test_ring_model():
    assert R.ring_bytes_sent("all-reduce", 800, 8) == 1400
    assert R.ring_bytes_sent("all-gather", 800, 8) == 700
    assert R.ring_bytes_sent("reduce-scatter", 800, 4) == 600
    assert R.ring_bytes_sent("all-to-all", 800, 2) == 400
    assert R.ring_bytes_sent("collective-permute", 800, 8) == 800
    assert R.ring_bytes_sent("all-reduce", 800, 1) == 0


# --------------------------------------------------------------------------------------------------
# Chips.

# Published per-chip figures (Google Cloud TPU system-architecture pages): peak bf16 TFLOP/s, HBM GB/s,
# ICI GB/s per direction per chip (v5p 4800 Gbps, v5e 1600 Gbps, v6e 800 GB/s bidirectional, v4 2400 Gbps).
PUBLISHED = {"v4": (275, 1200, 300), "v5e": (197, 819, 200), "v5p": (459, 2765, 600), "v6e": (918, 1640, 400)}


def test_chip_table_is_the_published_figures_and_what_the_docs_state():
    for name, (tflops, hbm, ici) in PUBLISHED.items():
        chip = R.CHIPS[name]
        assert (chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth) == (tflops * 1e12, hbm * 1e9, ici * 1e9)
    with open(os.path.join(ROOT, "docs", "roofline.md")) as f:
        doc = f.read()
    rows = {m.group(1): m.groups()[1:] for m in
            re.finditer(r"^\| `(\w+)` \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \|", doc, re.M)}
    assert set(rows) == set(R.CHIPS)
    for name, chip in R.CHIPS.items():
        tflops, hbm, link, links, ring = rows[name]
        assert float(tflops) * 1e12 == chip.peak_flops and float(hbm) * 1e9 == chip.hbm_bandwidth
        assert float(link) * 1e9 == chip.ici_link_bandwidth
        assert (int(links), int(ring)) == (chip.ici_links, chip.ring_links)


# --------------------------------------------------------------------------------------------------
# In a plan.


@pytest.fixture(scope="module")
def cpu8_result():
    from test_plan import tiny_config

    return P.plan_step(tiny_config(), P.get_topology("cpu:8", device_memory_gb=1.0))


def test_cpu8_plan_carries_a_finite_positive_estimate(cpu8_result):
    r = cpu8_result.roofline
    assert r is not None and r.chip is R.CHIPS["h100"] and r.num_chips == 8 and r.tokens == 4 * 16
    for key, value in r.as_dict().items():
        assert math.isfinite(value) and value > 0, key
    assert r.step_seconds == max(r.compute_seconds, r.memory_seconds, r.comm_seconds)
    assert r.serial_seconds == pytest.approx(r.compute_seconds + r.memory_seconds + r.comm_seconds)
    assert r.mfu == pytest.approx(r.model.total / (r.step_seconds * 8 * 989e12))
    text = P.format_result(cpu8_result)
    for field in ("compute time:", "memory time:", "comm time:", "step time:", "throughput:", "MFU:", "model FLOPs:"):
        assert field in text
    assert text.count("ESTIMATE") >= 3


def test_model_flops_split_by_hand(cpu8_result):
    """test_plan's tiny models on 4 x 16 tokens (vocab 128, MiniLLM's reverse KL on the logits).

    Teacher: q, o [32, 32], k, v [32, 16], gate/up/down [32, 64], LM head [32, 128]; 4 heads of 8.
    Student: q, o [16, 16], k, v [16, 8], gate/up/down [16, 32], LM head [16, 128]; 4 heads of 4.
    """
    m, tokens = cpu8_result.roofline.model, 64
    teacher_w = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 32 * 128
    student_w = 2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 32 + 16 * 128
    assert m.teacher_forward == 2 * teacher_w * tokens + 4 * 4 * 16 * 16 * 4 * 8
    assert m.student_forward_backward == 3 * (2 * student_w * tokens + 4 * 4 * 16 * 16 * 4 * 4)
    assert m.loss == R.LOSS_FLOPS_PER_LOGIT * tokens * 128
    assert m.optimizer == R.OPTIMIZER_FLOPS_PER_PARAM * cpu8_result.student_params


def test_search_ranks_fitting_candidates_by_predicted_step_time(cpu8_result, monkeypatch):
    """The fastest predicted step wins among those that fit, even with a larger footprint."""
    big, small = dataclasses.replace(cpu8_result.memory, temp=10 ** 6), cpu8_result.memory
    outcomes = iter([(small, 0.030), (big, 0.010), (big, 0.001)])

    def fake_plan_step(config, topology, *, mesh_config=None, student_remat=None, strict=None):
        memory, seconds = next(outcomes)
        fits = memory if seconds != 0.001 else dataclasses.replace(memory, temp=2 ** 40)  # the fastest: too big
        return dataclasses.replace(cpu8_result, memory=fits, roofline=types.SimpleNamespace(step_seconds=seconds))

    monkeypatch.setattr(P, "plan_step", fake_plan_step)
    monkeypatch.setattr(P, "search_candidates", lambda n, axes, remats: [
        (P.sharding_lib.MeshConfig(axes=("data", "fsdp", "tensor"), ici=(1, 8 // t, t)), "none") for t in (1, 2, 4)])
    from test_plan import tiny_config

    best, rows = P.search(tiny_config(), P.get_topology("cpu:8", device_memory_gb=1.0), print_fn=lambda _: None)
    assert len(rows) == 3 and best.roofline.step_seconds == 0.010 and best.memory.temp == 10 ** 6
