"""Streaming sharded loading: same params as `load_pretrained`, and each process reads only its devices' blocks."""

import math
import os
import shutil

import numpy as np
import pytest
import torch

import kdjax
from hf_fixtures import make_hf_model, padded_batch, save_hf_model
from kdjax.hub import streaming
from kdjax.hub.api import flat_params
from kdjax.hub.checkpoint import SAFETENSORS_INDEX, CheckpointError
from kdjax.hub.streaming import ReadStats, checkpoint_index, load_sharded
from kdjax.sharding import MeshConfig, make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(axes=("data", "fsdp", "tensor"), ici=(1, 4, 2)))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("bert", "mlm"), str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def llama_sharded_dir(tmp_path_factory):
    """A GQA llama written as a sharded `model.safetensors.index.json` checkpoint."""
    directory = str(tmp_path_factory.mktemp("llama"))
    make_hf_model("llama", "causal_lm").save_pretrained(directory, max_shard_size="40KB")
    return directory


def _shards(sharding) -> int:
    """How many ways a NamedSharding splits its array, from the spec and the mesh shape."""
    count = 1
    for entry in sharding.spec:
        for axis in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
            count *= sharding.mesh.shape[axis]
    return count


def _assert_same_params(model, reference):
    ours, ref = flat_params(model.params), flat_params(reference.params)
    assert set(ours) == set(ref)
    for path, value in ref.items():
        a, b = np.asarray(ours[path]), np.asarray(value)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{path} differs from load_pretrained"


def _assert_forward_close(model, reference, family):
    ids, mask = padded_batch(family)
    a = np.asarray(model(ids, mask).logits)
    b = np.asarray(reference(ids, mask).logits)
    assert np.max(np.abs(a - b)) <= 1e-5


def _assert_byte_counts(model, reference, stats, mesh, expected_ways):
    """Per device: its share of each param; per process: each checkpoint byte once; no read above a block."""
    ref = {k: np.asarray(v) for k, v in flat_params(reference.params).items()}
    arrays = flat_params(model.params)
    devices = list(mesh.devices.flat)
    for path, want in expected_ways.items():
        assert _shards(arrays[path].sharding) == want, path
    for path, value in ref.items():
        ways = _shards(arrays[path].sharding)
        share = value.nbytes // ways  # float32 in the checkpoint and in the params
        per_device = stats.param_device_bytes[path]
        assert sorted(per_device, key=lambda d: d.id) == devices
        assert set(per_device.values()) == {share}, f"{path}: {per_device} != {share} per device"
        # The blocks really are on the devices: each addressable shard has exactly that many bytes.
        assert {s.data.nbytes for s in arrays[path].addressable_shards} == {share}
        # No single read is larger than what one device holds (one layer of it for stacked params).
        layers = value.shape[0] if path.startswith("layers/") else 1
        reads = [r.nbytes for r in stats.reads if r.param == path]
        assert reads and max(reads) <= share // layers, path
        # Each distinct block once per process: the param's bytes are read exactly once in total.
        assert stats.param_process_bytes[path] == value.nbytes, path
    total = sum(v.nbytes for v in ref.values())
    assert stats.process_bytes == total < len(devices) * total
    assert stats.full_reads == []
    assert stats.max_read_bytes <= max(s.data.nbytes for v in arrays.values() for s in v.addressable_shards)
    assert sum(stats.device_bytes.values()) == sum(
        len(devices) * v.nbytes // _shards(arrays[k].sharding) for k, v in ref.items())


def test_bert_single_file_matches_load_pretrained(bert_dir, mesh):
    stats = ReadStats()
    model = load_sharded(bert_dir, mesh, stats=stats)
    reference = kdjax.load_pretrained(bert_dir)
    assert model.config == reference.config and model.tokenizer is None
    _assert_same_params(model, reference)
    arrays = flat_params(model.params)
    assert tuple(arrays["layers/attn/q/kernel"].sharding.spec) == (None, "fsdp", "tensor")
    _assert_byte_counts(model, reference, stats, mesh, {
        "layers/attn/q/kernel": 8, "layers/mlp/down/kernel": 8, "layers/attn/q/bias": 2,
        "layers/attn_norm/scale": 1, "embed/word/embedding": 4})  # vocab 97 does not split over tensor=2
    # Blocks replicated over `fsdp` (biases over `tensor` only) are requested by several devices but read once.
    assert stats.cache_hits > 0
    _assert_forward_close(model, reference, "bert")


def test_llama_gqa_sharded_index_matches_load_pretrained(llama_sharded_dir, mesh):
    index = os.path.join(llama_sharded_dir, SAFETENSORS_INDEX)
    assert os.path.isfile(index) and not os.path.isfile(os.path.join(llama_sharded_dir, "model.safetensors"))
    assert len([f for f in os.listdir(llama_sharded_dir) if f.endswith(".safetensors")]) > 1
    stats = ReadStats()
    model = load_sharded(llama_sharded_dir, mesh, stats=stats, progress=True)
    reference = kdjax.load_pretrained(llama_sharded_dir)
    assert model.config.kv_heads == 2 and model.config.num_heads == 4
    _assert_same_params(model, reference)
    _assert_byte_counts(model, reference, stats, mesh, {
        "layers/attn/k/kernel": 8, "layers/attn/o/kernel": 8, "layers/mlp/gate/kernel": 8,
        "decoder/kernel": 4, "final_norm/scale": 1})
    _assert_forward_close(model, reference, "llama")
    # A lower parameter dtype: the same bits as load_pretrained's cast.
    _assert_same_params(load_sharded(llama_sharded_dir, mesh, param_dtype="bfloat16"),
                        kdjax.load_pretrained(llama_sharded_dir, param_dtype="bfloat16"))


def test_bf16_gpt2_checkpoint_with_fused_qkv(tmp_path, mesh):
    """bf16 tensors (which numpy cannot slice) and GPT-2's fused c_attn thirds."""
    ref = make_hf_model("gpt2", "causal_lm").to(torch.bfloat16)
    path = save_hf_model(ref, str(tmp_path / "gpt2"))
    stats = ReadStats()
    model = load_sharded(path, mesh, stats=stats, param_dtype="float32")
    reference = kdjax.load_pretrained(path, param_dtype="float32")
    _assert_same_params(model, reference)
    k = np.asarray(flat_params(model.params)["layers/attn/k/kernel"])
    fused = ref.transformer.h[1].attn.c_attn.weight.detach().float().numpy()
    np.testing.assert_array_equal(k[1], fused[:, 32:64])
    # Each bf16 byte of the used tensors once per process (2 bytes per element).
    assert stats.process_bytes == sum(np.asarray(v).size * 2 for v in flat_params(reference.params).values())


@pytest.mark.parametrize("transform,hf_shape,kd_block", [
    ("copy", (6, 8), (slice(2, 4, 1), slice(0, 8, 1))),
    ("linear", (8, 6), (slice(3, 6, 1), slice(4, 8, 1))),
    ("qkv:2", (6, 12), (slice(0, 3, 1), slice(1, 3, 1))),
    ("qkv:1", (12,), (slice(2, 4, 1),)),
])
def test_checkpoint_index_matches_numpy(transform, hf_shape, kd_block):
    hf = np.arange(math.prod(hf_shape), dtype=np.float32).reshape(hf_shape)
    if transform == "linear":
        want = hf.T[kd_block]
    elif transform.startswith("qkv:"):
        n, third = int(transform[4:]), hf_shape[-1] // 3
        want = hf[..., n * third:(n + 1) * third][kd_block]
    else:
        want = hf[kd_block]
    hf_index, post = checkpoint_index(transform, kd_block, hf_shape)
    np.testing.assert_array_equal(post(hf[hf_index]), want)
    assert hf[hf_index].size == want.size  # only the block is read
    assert checkpoint_index("reshape", kd_block, hf_shape) is None


def test_unsliceable_transform_reads_whole_tensors(bert_dir, mesh, monkeypatch):
    """The full-read fallback gives the same params, and the counter shows what it costs."""
    monkeypatch.setattr(streaming, "checkpoint_index", lambda *a: None)
    stats = ReadStats()
    model = load_sharded(bert_dir, mesh, stats=stats)
    reference = kdjax.load_pretrained(bert_dir)
    _assert_same_params(model, reference)
    assert stats.full_reads and all(r.full for r in stats.reads)
    total = sum(np.asarray(v).nbytes for v in flat_params(reference.params).values())
    assert stats.process_bytes > total


def test_one_line_errors(tmp_path, bert_dir, mesh):
    stats = ReadStats()
    with pytest.raises(CheckpointError, match=r"^shape mismatch for .*intermediate.dense.weight.*expects") as e:
        load_sharded(bert_dir, mesh, intermediate_size=40, stats=stats)
    assert "\n" not in str(e.value) and stats.process_bytes == 0  # checked from headers before any read
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(bert_dir, "config.json"), bin_dir / "config.json")
    torch.save(make_hf_model("bert", "mlm").state_dict(), bin_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"\.bin checkpoint.*convert it to safetensors") as e:
        load_sharded(str(bin_dir), mesh)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_sharded(bert_dir, mesh, head="base")


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
def test_fused_rows_and_stacked_experts_stream_from_a_sharded_index(tmp_path, mesh, family):
    """Phi-3's fused qkv/gate_up rows and Mixtral's per-expert tensors: sliced reads, same params."""
    directory = str(tmp_path / family)
    make_hf_model(family, "causal_lm").save_pretrained(directory, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(directory, SAFETENSORS_INDEX))
    stats = ReadStats()
    model = load_sharded(directory, mesh, stats=stats)
    reference = kdjax.load_pretrained(directory)
    _assert_same_params(model, reference)
    expected = {"layers/attn/q/kernel": 8, "layers/mlp/gate/kernel": 8} if family == "phi3" else {
        "layers/moe/gate": 8, "layers/moe/down": 8}
    _assert_byte_counts(model, reference, stats, mesh, expected)
    _assert_forward_close(model, reference, family)


def test_expert_mesh_axis_shards_experts_and_matches_one_device(tmp_path):
    """Experts split over an `expert` mesh axis: each device reads only its experts; outputs equal one device's."""
    from kdjax.sharding import DEFAULT_TEACHER_RULES, EXPERT_RULES, merge_rules

    directory = save_hf_model(make_hf_model("mixtral", "causal_lm"), str(tmp_path / "mixtral"))
    expert_mesh = make_mesh(MeshConfig(axes=("data", "fsdp", "tensor", "expert"), ici=(1, 2, 1, 4)))
    rules = merge_rules(DEFAULT_TEACHER_RULES, EXPERT_RULES)
    stats = ReadStats()
    model = load_sharded(directory, expert_mesh, rules, stats=stats)
    reference = kdjax.load_pretrained(directory)
    arrays = flat_params(model.params)
    assert tuple(arrays["layers/moe/up"].sharding.spec) == (None, "expert", "fsdp", "tensor")
    assert tuple(arrays["layers/moe/down"].sharding.spec) == (None, "expert", "tensor", "fsdp")
    _assert_same_params(model, reference)
    _assert_byte_counts(model, reference, stats, expert_mesh, {"layers/moe/up": 8, "layers/moe/down": 8})
    # 4 experts over expert=4: each device's block of an expert stack holds one expert.
    up = arrays["layers/moe/up"]
    assert {s.data.shape[1] for s in up.addressable_shards} == {1}
    ids, mask = padded_batch("mixtral")
    ours = model(ids, mask, taps="router_logits")
    ref = reference(ids, mask, taps="router_logits")
    np.testing.assert_allclose(np.asarray(ours.logits), np.asarray(ref.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.intermediates.router_logits),
                               np.asarray(ref.intermediates.router_logits), atol=1e-5)


@pytest.mark.parametrize("transform,hf_shape,kd_block", [
    ("rows:4:10", (12, 6), (slice(1, 5, 1), slice(2, 6, 1))),  # kdjax [in=6, out=6] from rows 4..10
    ("slice:3:9", (12,), (slice(2, 5, 1),)),
])
def test_fused_row_transforms_map_to_contiguous_blocks(transform, hf_shape, kd_block):
    from kdjax.hub.checkpoint import _apply

    hf = np.arange(math.prod(hf_shape), dtype=np.float32).reshape(hf_shape)
    want = _apply(transform, hf)[kd_block]
    hf_index, post = checkpoint_index(transform, kd_block, hf_shape)
    np.testing.assert_array_equal(post(hf[hf_index]), want)
    assert hf[hf_index].size == want.size
