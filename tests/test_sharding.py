"""Meshes, logical axis rules and sharded init on 8 fake CPU devices (see conftest)."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kdjax.models as M
from kdjax import sharding as S

LLAMA = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _flat(tree):
    return {"/".join(str(k) for k in path): (v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(tree)}


def _abstract(config):
    return nnx.split(nnx.eval_shape(lambda: M.Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)[1]


def _one_line(excinfo):
    return "\n" not in str(excinfo.value)


# --------------------------------------------------------------------------------------------------
# Meshes.


@pytest.mark.parametrize("ici, expected", [((2, 2, 2), (2, 2, 2)), ((-1, 2, 1), (4, 2, 1)), ((1, 8, 1), (1, 8, 1)),
                                           ((1, -1, 1), (1, 8, 1))])
def test_make_mesh_shapes(ici, expected):
    mesh = S.make_mesh(S.MeshConfig(ici=ici))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.devices.shape) == expected
    assert sorted(d.id for d in mesh.devices.ravel()) == list(range(8))


def test_mesh_with_extra_unused_axis():
    mesh = S.make_mesh(S.MeshConfig(axes=("data", "stage", "fsdp", "tensor"), ici=(1, 1, -1, 2)))
    assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 4, "tensor": 2}


def test_mesh_config_from_configdict():
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(mesh_axes=["data", "fsdp", "tensor"], ici_parallelism=[1, -1, 2],
                                         dcn_parallelism=[1, 1, 1]))
    mc = S.MeshConfig.from_config(cfg)
    assert mc.ici == (1, -1, 2) and mc.dcn == (1, 1, 1)
    assert dict(S.make_mesh(cfg).shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_dcn_axes_multiply_ici_axes_on_emulated_slices():
    # Two emulated slices of 4 CPU devices: slice 0 = ids 0..3, slice 1 = ids 4..7, DCN outermost.
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 1), dcn=(2, 1, 1)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
    np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def test_hybrid_mesh_groups_devices_by_slice():
    # Devices listed out of slice order: the grid must still keep each slice on its own DCN block.
    devices = [_FakeDevice(id=i, slice_index=(i % 2)) for i in range(8)]
    grid = S.create_device_grid(S.MeshConfig(ici=(2, 2, 1), dcn=(-1, 1, 1)), devices)
    assert grid.shape == (4, 2, 1)
    for s in range(2):
        block = grid[2 * s:2 * s + 2].ravel()
        assert {d.slice_index for d in block} == {s}
    # Same layout as the emulation used for devices without slice information.
    ordered = sorted(devices, key=lambda d: (d.slice_index, d.id))
    emulated = S._hybrid_by_reshape(ordered, (2, 2, 1), (2, 1, 1))
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(grid), np.vectorize(lambda d: d.id)(emulated))
    with pytest.raises(S.MeshError, match="2 slices") as e:
        S.create_device_grid(S.MeshConfig(ici=(1, 4, 1), dcn=(4, 1, 1)), devices)
    assert _one_line(e)


def test_mesh_errors_are_one_line():
    with pytest.raises(S.MeshError) as e:
        S.make_mesh(S.MeshConfig(ici=(3, 1, 1)))
    assert "(3, 1, 1)" in str(e.value) and "multiplies to 3" in str(e.value) and "8 devices" in str(e.value)
    assert _one_line(e)
    with pytest.raises(S.MeshError) as e:
        S.make_mesh(S.MeshConfig(ici=(3, -1, 1)))
    assert "(3, -1, 1)" in str(e.value) and "does not divide the 8 devices" in str(e.value) and _one_line(e)
    with pytest.raises(S.MeshError, match="2 entries of -1") as e:
        S.MeshConfig(ici=(-1, -1, 1))
    assert _one_line(e)
    with pytest.raises(S.MeshError, match="'tensr'") as e:
        S.MeshConfig(axes=("data", "fsdp", "tensr"))
    assert _one_line(e)
    with pytest.raises(S.MeshError, match="one size per axis"):
        S.MeshConfig(ici=(2, 4))


# --------------------------------------------------------------------------------------------------
# Logical axes and rules.


def test_param_logical_axes_table():
    assert S.param_logical_axes("layers/attn/q/kernel", 3) == ("layers", "embed", "heads")
    assert S.param_logical_axes("layers/attn/k/kernel", 3) == ("layers", "embed", "kv")
    assert S.param_logical_axes("layers/mlp/down/kernel", 3) == ("layers", "mlp", "embed")
    assert S.param_logical_axes("embed/word/embedding", 2) == ("vocab", "embed")
    assert S.param_logical_axes("decoder/kernel", 2) == ("embed", "vocab")
    assert S.param_logical_axes("embed/norm/scale", 1) == ("norm",)
    assert S.param_logical_axes("layers/mlp_norm/bias", 2) == ("layers", "norm")
    with pytest.raises(S.ShardingError, match="'adapter/kernel'") as e:
        S.param_logical_axes("adapter/kernel", 2)
    assert _one_line(e)
    with pytest.raises(S.ShardingError, match="has 2 dims"):
        S.param_logical_axes("layers/attn/q/kernel", 2)


@pytest.mark.parametrize("family, overrides", [
    ("bert", dict(head="mlm")), ("bert", dict(head="classification")), ("roberta", dict(head="base")),
    ("gpt2", dict(head="causal_lm")), ("llama", dict(head="causal_lm")), ("qwen2", dict(head="classification"))])
def test_every_family_param_gets_a_spec(family, overrides):
    config = M.preset(family, **{**LLAMA, "num_kv_heads": 2 if family in ("llama", "qwen2") else None, **overrides})
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    abstract = _abstract(config)
    specs = _flat(S.param_specs(abstract, mesh, S.DEFAULT_TEACHER_RULES))
    assert set(specs) == set(_flat(abstract))
    for name, spec in specs.items():
        assert len(spec) == len(_flat(abstract)[name].shape), name


def test_teacher_and_student_rules_differ_on_the_same_mesh():
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    q = S.param_logical_axes("layers/attn/q/kernel", 3)
    assert S.logical_to_spec(q, S.DEFAULT_TEACHER_RULES, mesh) == P(None, "fsdp", "tensor")
    assert S.logical_to_spec(q, S.DEFAULT_STUDENT_RULES, mesh) == P(None, "fsdp", None)
    # Activation rules are shared: both models lay out a batch identically.
    for rules in (S.DEFAULT_TEACHER_RULES, S.DEFAULT_STUDENT_RULES, S.ACTIVATION_RULES):
        assert S.batch_sharding(mesh, rules).spec == P(("data", "fsdp"), None)


def test_mesh_axis_used_once_per_spec_and_overrides():
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    assert S.logical_to_spec(("embed", "embed"), S.DEFAULT_TEACHER_RULES, mesh) == P("fsdp", None)
    rules = {"a": ("fsdp", "tensor"), "b": ("tensor", "data")}
    assert S.logical_to_spec(("a", "b"), rules, mesh) == P(("fsdp", "tensor"), "data")
    merged = S.merge_rules(S.DEFAULT_TEACHER_RULES, {"vocab": None})
    assert S.logical_to_spec(("vocab", "embed"), merged, mesh) == P(None, "fsdp")
    with pytest.raises(S.ShardingError, match="twice"):
        S.normalize_rules([("vocab", "tensor"), ("vocab", None)])


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    mesh = S.make_mesh(S.MeshConfig(axes=("data", "fsdp"), ici=(1, -1)))
    with pytest.raises(S.ShardingError) as e:
        S.logical_to_spec(("vocab", "embed"), S.DEFAULT_TEACHER_RULES, mesh)
    msg = str(e.value)
    assert "'vocab'" in msg and "'tensor'" in msg and "('data', 'fsdp')" in msg and _one_line(e)


def test_divisibility_strict_error_and_fallback():
    config = M.preset("gpt2", **{**LLAMA, "num_kv_heads": None, "vocab_size": 100, "head": "causal_lm"})
    mesh = S.make_mesh(S.MeshConfig(ici=(1, 1, 8)))
    abstract = _abstract(config)
    with pytest.raises(S.ShardingError) as e:
        S.param_shardings(abstract, mesh, S.DEFAULT_TEACHER_RULES, strict=True)
    msg = str(e.value)
    assert "'embed/word/embedding'" in msg and "size 100" in msg and "8 shards" in msg and _one_line(e)
    specs = _flat(S.param_specs(abstract, mesh, S.DEFAULT_TEACHER_RULES))
    assert specs["embed/word/embedding"] == P(None, "fsdp")  # vocab 100 on 8 shards -> replicated
    assert specs["layers/attn/q/kernel"] == P(None, "fsdp", "tensor")  # 64 / 8 divides
    # Partial fallback keeps the longest prefix of mesh axes that divides: 6 rows over data*fsdp=4 -> data.
    mesh222 = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    assert S.logical_to_spec(("act_batch",), S.ACTIVATION_RULES, mesh222, shape=(6,)) == P("data")
    assert S.logical_to_spec(("act_batch",), S.ACTIVATION_RULES, mesh222, shape=(3,)) == P(None)


# --------------------------------------------------------------------------------------------------
# Sharded init and forward.


@pytest.fixture(scope="module")
def llama_setup():
    config = M.preset("llama", **LLAMA, head="causal_lm")
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    graphdef, params = S.sharded_init(config, mesh, S.DEFAULT_TEACHER_RULES, seed=7)
    return config, mesh, graphdef, params


def test_sharded_init_per_device_bytes_follow_the_spec(llama_setup):
    config, mesh, _, params = llama_setup
    expected = {"layers/attn/q/kernel": P(None, "fsdp", "tensor"), "layers/attn/k/kernel": P(None, "fsdp", "tensor"),
                "layers/attn/o/kernel": P(None, "tensor", "fsdp"), "layers/mlp/down/kernel": P(None, "tensor", "fsdp"),
                "embed/word/embedding": P("tensor", "fsdp"), "decoder/kernel": P("fsdp", "tensor"),
                "layers/attn_norm/scale": P(None, None), "final_norm/scale": P(None)}
    flat = _flat(params)
    assert set(expected) <= set(flat)
    for name, arr in flat.items():
        spec = arr.sharding.spec
        if name in expected:
            assert spec == expected[name], name
        shards = math.prod(math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e))
                           for e in spec if e is not None)
        assert arr.addressable_shards[0].data.nbytes * shards == arr.nbytes, name
        assert len(arr.addressable_shards) == 8
    # The big matrices really are split 4 ways (fsdp x tensor), not replicated.
    assert flat["layers/mlp/up/kernel"].addressable_shards[0].data.nbytes * 4 == flat["layers/mlp/up/kernel"].nbytes


def test_sharded_init_equals_unsharded_init(llama_setup):
    config, _, _, params = llama_setup
    sharded = {k: np.asarray(v) for k, v in _flat(params).items()}
    # Bit-exact against the same jitted initializer on one device: sharding does not change the bits.
    one_device = jax.jit(lambda: nnx.split(M.Transformer(config, rngs=nnx.Rngs(7)), nnx.Param)[1])()
    single = {k: np.asarray(v) for k, v in _flat(one_device).items()}
    assert set(single) == set(sharded)
    for name in single:
        np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)
    # Against the eager constructor: XLA may fuse `normal * stddev` differently (<= 1 ulp).
    eager = {k: np.asarray(v) for k, v in _flat(M.split(M.Transformer(config, rngs=nnx.Rngs(7)))[1]).items()}
    for name in eager:
        np.testing.assert_allclose(sharded[name], eager[name], rtol=3e-7, atol=0, err_msg=name)
    other_seed = _flat(M.split(M.Transformer(config, rngs=nnx.Rngs(8)))[1])
    assert not np.allclose(sharded["layers/attn/q/kernel"], np.asarray(other_seed["layers/attn/q/kernel"]))


def test_sharded_forward_matches_single_device(llama_setup):
    config, mesh, graphdef, params = llama_setup
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(4, 8)).astype(np.int32)
    mask = np.ones((4, 8), np.int32)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    fwd = jax.jit(M.forward, static_argnums=(0, 3))
    out, _ = fwd(graphdef, params, S.shard_batch(batch, S.batch_sharding(mesh)))
    host_params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
    ref, _ = fwd(graphdef, host_params, {k: jax.device_put(v, jax.devices()[0]) for k, v in batch.items()})
    assert len(out.logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), np.asarray(ref.last_hidden_state), atol=1e-5)


def test_param_overview_lists_every_param_and_totals(llama_setup):
    config, _, _, params = llama_setup
    text = S.param_overview(params)
    flat = _flat(params)
    for name in flat:
        assert name in text
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    assert total == config.num_params()
    assert f"{total:,} params" in text
    q_row = next(line for line in text.splitlines() if line.startswith("layers/attn/q/kernel"))
    assert "(., fsdp, tensor)" in q_row and "(2, 64, 64)" in q_row and "8.00 KiB" in q_row  # 2*64*64*4 / 4
    printed = []
    assert S.log_param_overview(params, print_fn=printed.append) == text and printed == [text]
    # Abstract params with separately computed shardings give the same per-device numbers.
    abstract = _abstract(config)
    assert S.param_overview(abstract, S.param_shardings(abstract, llama_setup[1], S.DEFAULT_TEACHER_RULES)) == text


# --------------------------------------------------------------------------------------------------
# Batches and multi-host start-up.


def test_shard_batch_lays_out_rows_and_checks_divisibility():
    mesh = S.make_mesh(S.MeshConfig(ici=(2, 2, 2)))
    sharding = S.batch_sharding(mesh)
    ids = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    labels = np.arange(8, dtype=np.int32)
    out = S.shard_batch({"input_ids": ids, "labels": labels}, sharding)
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), ids)
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    assert out["labels"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out["input_ids"].addressable_shards} == {(2, 5)}
    with pytest.raises(S.ShardingError, match="'input_ids'") as e:
        S.shard_batch({"input_ids": ids[:6]}, sharding)
    assert _one_line(e)


def test_detect_multihost_from_environment():
    assert S.detect_multihost({}) is None
    assert S.detect_multihost({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert S.detect_multihost({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}) is not None
    assert S.detect_multihost({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}) is not None
    assert S.detect_multihost({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert S.detect_multihost({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is not None
    assert S.detect_multihost({"JAX_COORDINATOR_ADDRESS": "h:1234"}) is not None
    assert S.detect_multihost({"JAX_COORDINATOR_ADDRESS": "h:1234", "KDJAX_DISTRIBUTED": "0"}) is None


def test_maybe_initialize_distributed_is_guarded(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(S, "_DISTRIBUTED_STARTED", False)
    assert S.maybe_initialize_distributed({"TPU_WORKER_HOSTNAMES": "localhost"}) is False
    assert calls == []
    env = {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}
    assert S.maybe_initialize_distributed(env, initialization_timeout=5) is True
    assert S.maybe_initialize_distributed(env) is False
    assert calls == [{"initialization_timeout": 5}]


def test_plain_multinode_gpu_env_is_passed_to_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(S, "_DISTRIBUTED_STARTED", False)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert S.maybe_initialize_distributed(env) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
