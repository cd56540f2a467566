"""The explicitly sharded KD step on a (2, 2, 2) mesh of 8 fake CPU devices equals the one-device step.

One mixed method carries all three kinds of knowledge at once -- MiniLLM's token-level reverse KL on
the logits, hidden-state MSE and attention-score MSE (`unified`) -- so a single compile covers the
logit, feature and attention paths. Parameters are drawn on the host with numpy (no init compile),
placed once on the mesh and once on a single device, and both programs take three steps.
"""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import sharding as S
from kdjax.distill.sharded import sharded_step
from kdjax.methods import build_method
from kdjax.models.config import preset

VOCAB, BATCH, SEQ, STEPS = 128, 8, 8, 3
TEACHER = preset("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, head="causal_lm")
STUDENT = preset("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                 intermediate_size=32, head="causal_lm")
METHOD = build_method("minillm+unified", {"minillm": {}, "unified": dict(knowledge=("hidden", "attention"))})


def _host_params(abstract, seed):
    """Numpy parameters with the abstract tree's shapes: N(0, 0.05) matrices, 1 + N(0, 0.05) vectors."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        x = rng.normal(0.0, 0.05, leaf.shape).astype(leaf.dtype)
        return x + 1 if len(leaf.shape) == 1 else x

    return jax.tree.map(draw, abstract)


def _batches():
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
        mask = np.ones((BATCH, SEQ), np.int32)
        mask[::3, SEQ - 2:] = 0  # some padded rows, so masked means matter
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        labels[:, : SEQ // 2] = -100  # a "prompt" half without labels (minillm reads labeled positions)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture(scope="module")
def run():
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    sharded = sharded_step(STUDENT, {"teacher": TEACHER}, METHOD, mesh, student_rules=S.DEFAULT_STUDENT_RULES,
                           teacher_rules=S.DEFAULT_TEACHER_RULES, batch_shape=(BATCH, SEQ), learning_rate=1e-3,
                           total_steps=10, max_traces=1)
    student = _host_params(sharded.abstract_state.params, 0)
    teacher = {"teacher": _host_params(sharded.abstract_teacher_params["teacher"], 1)}
    return sharded, student, teacher


def test_step_reads_logits_hidden_and_attention(run):
    sharded, _, _ = run
    kinds = {t.fn for t in sharded.terms}
    assert {"divergence", "hidden_mse", "attention_score_mse"} <= kinds
    assert set(sharded.abstract_batch) == {"input_ids", "attention_mask", "labels"}
    # Abstract inputs carry their shardings, so `lower` needs no arrays at all.
    assert sharded.abstract_batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)


def test_sharded_step_equals_single_device_step(run):
    sharded, student, teacher = run
    batches = _batches()
    device = jax.devices()[0]

    # Single-device reference: the same pure step, jitted with no shardings, on one device.
    state0 = sharded.init_state(seed=0, student_params=student)
    ref_state = jax.device_put(jax.device_get(state0), device)
    ref_teacher = jax.device_put(teacher, device)
    ref_step = jax.jit(sharded.step)
    ref_losses = []
    for batch in batches:
        ref_state, metrics = ref_step(ref_state, ref_teacher, jax.device_put(batch, device))
        ref_losses.append(float(metrics["loss"][0]))

    state = state0
    teacher_on_mesh = sharded.put_teacher_params(teacher)
    losses = []
    for batch in batches:  # max_traces=1: a second trace would raise here
        state, metrics = sharded(state, teacher_on_mesh, sharded.shard_batch(batch))
        losses.append(float(metrics["loss"][0]))
    assert sharded.jitted._cache_size() == 1

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(losses, 6))) == STEPS  # the student actually changed between steps
    got, want = jax.device_get(state.params), jax.device_get(ref_state.params)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.max(np.abs(g - s))) for g, s in zip(jax.tree.leaves(got), jax.tree.leaves(student)))
    assert moved > 1e-4
    # The updated state stays where the shardings put it (donated in, same layout out).
    for leaf, want_sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(sharded.state_shardings.params)):
        assert leaf.sharding.spec == want_sharding.spec


def test_teacher_params_take_total_over_shards_per_device(run):
    sharded, _, teacher = run
    placed = sharded.put_teacher_params(teacher)["teacher"]
    mesh = sharded.mesh
    # Independent expectations from the teacher rules: embed->fsdp, heads/kv/mlp/vocab->tensor.
    expected = {"embed/word/embedding": P("tensor", "fsdp"), "layers/attn/q/kernel": P(None, "fsdp", "tensor"),
                "layers/attn/k/kernel": P(None, "fsdp", "tensor"), "layers/attn/o/kernel": P(None, "tensor", "fsdp"),
                "layers/mlp/down/kernel": P(None, "tensor", "fsdp"), "decoder/kernel": P("fsdp", "tensor"),
                "final_norm/scale": P(None)}
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(placed)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None)
                        not in ("value", "raw_value"))
        spec = leaf.sharding.spec
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        shards = math.prod(mesh.shape[a] for a in axes)
        per_device = {s.data.nbytes for s in leaf.addressable_shards}
        assert per_device == {leaf.nbytes // shards}, name
        if name in expected:
            assert spec == expected[name], (name, spec)
            seen.add(name)
    assert seen == set(expected)
    assert sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(placed)) < \
        sum(leaf.nbytes for leaf in jax.tree.leaves(placed)) / 3


def test_optimizer_moments_mirror_param_shardings(run):
    sharded, _, _ = run
    param_specs = {leaf.spec for leaf in jax.tree.leaves(sharded.state_shardings.params)}
    opt_specs = [s.spec for s in jax.tree.leaves(sharded.state_shardings.opt_state)]
    assert P(None, "fsdp", None) in opt_specs  # a [L, D, F] moment follows its fsdp-sharded kernel
    assert set(opt_specs) <= param_specs | {P()}


def test_bad_batch_and_rules_are_one_line_errors():
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    kw = dict(student_rules=S.DEFAULT_STUDENT_RULES, teacher_rules=S.DEFAULT_TEACHER_RULES, learning_rate=1e-3,
              total_steps=10)
    with pytest.raises(ValueError, match="not divisible by its 4 shards") as e:
        sharded_step(STUDENT, {"teacher": TEACHER}, METHOD, mesh, batch_shape=(6, SEQ), **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="grad_accum") as e:
        sharded_step(STUDENT, {"teacher": TEACHER}, METHOD, mesh, batch_shape=(8, SEQ), grad_accum=3, **kw)
    bad_rules = S.merge_rules(S.DEFAULT_TEACHER_RULES, {"mlp": "model"})
    with pytest.raises(S.ShardingError, match="names mesh axis 'model'") as e:
        sharded_step(STUDENT, {"teacher": TEACHER}, METHOD, mesh, batch_shape=(8, SEQ),
                     **dict(kw, teacher_rules=bad_rules))
    assert "\n" not in str(e.value)
