"""Qwen3, Gemma 2/3, Phi-3, Mixtral and Qwen3-MoE against transformers PyTorch, and the family table itself."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import kdjax
from hf_fixtures import HEAD_CLASSES, NEW_CASES, VOCAB, make_hf_model, padded_batch, save_hf_model, torch_outputs
from kdjax.hub import families
from kdjax.models.config import SUPPORTED_MODEL_TYPES, ConfigError
from kdjax.models.moe import load_balancing_loss, router_aux_loss

TOL = 1e-4


def _assert_close(a, b, what, mask=None):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    if mask is not None:
        sel = mask.astype(bool)
        a, b = a[sel], b[sel]
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert err <= TOL, f"{what}: max abs diff {err:.2e} > {TOL}"


def _router_logits_torch(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    return out.router_logits


@pytest.mark.parametrize("family,head", NEW_CASES)
def test_parity_with_transformers(tmp_path, family, head):
    ref = make_hf_model(family, head)
    path = save_hf_model(ref, str(tmp_path / "hf"))
    model = kdjax.load_pretrained(path)
    assert model.config.head == head and model.config.model_type == family
    ids, mask = padded_batch(family)
    taps = ("hidden_states", "attention_probs") + (("router_logits",) if model.config.num_experts else ())
    out = model(ids, mask, taps=taps)
    r = torch_outputs(ref, ids, mask)
    assert len(out.hidden_states) == len(r.hidden_states) == model.config.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states)):
        _assert_close(a, b.numpy(), f"hidden_states[{i}]", mask)
    assert len(out.attentions) == len(r.attentions)
    for i, (a, b) in enumerate(zip(out.attentions, r.attentions)):
        _assert_close(np.asarray(a).transpose(0, 2, 1, 3), b.numpy().transpose(0, 2, 1, 3), f"attentions[{i}]", mask)
    if head == "base":
        _assert_close(out.last_hidden_state, r.last_hidden_state.numpy(), "last_hidden_state", mask)
    else:
        logits_ref = r.logits.numpy()
        _assert_close(out.logits, logits_ref, "logits", mask if logits_ref.ndim == 3 else None)
    if model.config.num_experts:
        theirs = _router_logits_torch(ref, ids, mask)
        ours = np.asarray(out.intermediates.router_logits)  # [L, B, S, E]
        for i, b in enumerate(theirs):
            _assert_close(ours[i].reshape(-1, ours.shape[-1]), b.numpy(), f"router_logits[{i}]",
                          mask.reshape(-1))


@pytest.mark.parametrize("family", sorted({f for f, _ in NEW_CASES}))
def test_export_round_trip(tmp_path, family):
    """kdjax -> HF directory -> transformers: same logits, same tensors."""
    original_model = make_hf_model(family, "causal_lm", seed=1)
    model = kdjax.load_pretrained(save_hf_model(original_model, str(tmp_path / "hf")))
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    loaded = getattr(transformers, HEAD_CLASSES[family]["causal_lm"]).from_pretrained(
        out_dir, attn_implementation="eager").eval()
    ids, mask = padded_batch(family, seed=3)
    _assert_close(model(ids, mask).logits, torch_outputs(loaded, ids, mask).logits.numpy(), "logits", mask)
    original = original_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), original[name].numpy(), atol=1e-6, err_msg=name)
    # The exported config reads back as the same kdjax config.
    again = kdjax.load_pretrained(out_dir)
    assert again.config == model.config


@pytest.mark.slow
def test_gemma_local_layers_and_softcaps_matter(tmp_path):
    """The per-layer windows, local RoPE base and soft-caps each change the output (so parity tests them)."""
    ref = make_hf_model("gemma3_text", "causal_lm")
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")))
    c = model.config
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert c.rope_local_theta == 10000.0 and c.rope_theta == 1e6 and dict(c.rope_scaling)["factor"] == 2.0
    ids, mask = padded_batch("gemma3_text")
    base = np.asarray(model(ids, mask).logits)
    for change in (dict(layer_types=("full_attention",) * 3), dict(rope_local_theta=None), dict(qk_norm=False)):
        other = c.replace(**change)
        graphdef = kdjax.hub.abstract_model(other)[0]
        params = model.params
        if not other.qk_norm:
            params = kdjax.hub.abstract_model(other)[1]
            flat = {k: v for k, v in kdjax.hub.flat_params(model.params).items()
                    if "q_norm" not in k and "k_norm" not in k}
            params = kdjax.hub.params_from_flat(params, flat, np.float32)
        out = np.asarray(kdjax.Model(other, graphdef, params)(ids, mask).logits)
        assert np.max(np.abs(out - base)[mask.astype(bool)]) > 1e-3, change


def test_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 7, 6)).astype(np.float32)  # [L, B, S, E]
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0
    as_tuple = tuple(torch.tensor(x.reshape(-1, 6)) for x in logits)
    for top_k in (1, 2):
        for m in (None, mask):
            theirs = load_balancing_loss_func(as_tuple, 6, top_k, None if m is None else torch.tensor(m)).item()
            ours = float(load_balancing_loss(logits, top_k, m))
            assert abs(ours - theirs) < 1e-5, (top_k, m is not None, ours, theirs)


def test_router_aux_loss_equals_transformers_aux_loss(tmp_path):
    """`router_aux_loss` on the router_logits tap is what transformers adds to its LM loss."""
    ref = make_hf_model("mixtral", "causal_lm")
    ref.config.router_aux_loss_coef = 0.02
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")))
    ids, mask = padded_batch("mixtral")
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    out = model(ids, mask, taps="router_logits")
    aux = float(load_balancing_loss(out.intermediates.router_logits, model.config.num_experts_per_tok, mask))
    assert abs(aux - theirs.aux_loss.item()) < 1e-5
    assert abs(float(router_aux_loss(model.config, out.intermediates.router_logits, mask)) - 0.02 * aux) < 1e-7


def test_router_logits_tap_is_none_for_dense_models():
    from kdjax.models import preset
    from kdjax.hub.api import Model

    model = Model.init(preset("llama", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16))
    out = model(np.ones((1, 4), np.int32), taps=("router_logits", "hidden_states"))
    assert out.intermediates.router_logits is None and out.intermediates.hidden_states is not None


def test_family_table_is_the_single_list():
    assert set(families.FAMILIES) == set(SUPPORTED_MODEL_TYPES)
    for name, fam in families.FAMILIES.items():
        assert fam.model_type == name
        assert families.family(name) is fam
        for head in ("base", "causal_lm"):
            if fam.weights != "encoder":
                assert hasattr(transformers, fam.class_name(head)), fam.class_name(head)


def _config_json(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown model_type 'gemma7'; supported: .*qwen3_moe") as e:
        families.config_from_hf({"model_type": "gemma7"})
    assert "\n" not in str(e.value)
    hf = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=5, num_attention_heads=2,
                                     num_key_value_heads=2, num_experts_per_tok=2,
                                     num_experts=4, decoder_sparse_step=2, mlp_only_layers=[3]).to_dict()
    # transformers' rule: layer i is sparse iff i is not MLP-only and (i + 1) % decoder_sparse_step == 0.
    assert families.config_from_hf(hf).dense_layers == (0, 2, 3, 4)
    hf["mlp_only_layers"] = [7]
    with pytest.raises(ConfigError, match=r"^qwen3_moe mlp_only_layers \[7\] lie outside the model's 5 layers$"):
        families.config_from_hf(hf)
    hf = transformers.Phi3Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict()
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4}
    with pytest.raises(ConfigError, match=r"rope scaling 'longrope' in config.json lacks long_factor$"):
        families.config_from_hf(hf)
    hf["rope_parameters"]["long_factor"] = [1.0] * 3
    with pytest.raises(ConfigError, match=r"longrope long_factor has 3 entries; it needs head_dim / 2 = 4"):
        families.config_from_hf(hf)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match=r"^partial_rotary_factor=0.5 is not supported"):
        families.config_from_hf(hf)


@pytest.mark.slow
def test_routed_dispatch_equals_dense_without_drops_and_drops_over_capacity(tmp_path):
    ref = make_hf_model("qwen3_moe", "causal_lm")
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")))
    ids, mask = padded_batch("qwen3_moe")
    dense = np.asarray(model(ids, mask).logits)
    c = model.config
    graphdef = kdjax.hub.abstract_model(c.replace(moe_dispatch="routed", moe_capacity_factor=100.0))[0]
    routed = kdjax.Model(c.replace(moe_dispatch="routed", moe_capacity_factor=100.0), graphdef, model.params)
    np.testing.assert_allclose(np.asarray(routed(ids, mask).logits), dense, atol=1e-5)
    tight_config = c.replace(moe_dispatch="routed", moe_capacity_factor=0.25)
    tight = kdjax.Model(tight_config, kdjax.hub.abstract_model(tight_config)[0], model.params)
    assert np.max(np.abs(np.asarray(tight(ids, mask).logits) - dense)) > 1e-3


@pytest.mark.slow
def test_gemma_scanned_and_unrolled_agree(tmp_path):
    path = save_hf_model(make_hf_model("gemma2", "causal_lm"), str(tmp_path / "hf"))
    ids, mask = padded_batch("gemma2")
    scanned = kdjax.load_pretrained(path, scan_layers=True)(ids, mask, taps={"attention_probs": (0, 1)})
    unrolled = kdjax.load_pretrained(path, scan_layers=False)(ids, mask, taps={"attention_probs": (0, 1)})
    np.testing.assert_allclose(np.asarray(scanned.logits), np.asarray(unrolled.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(scanned.intermediates.attention_probs),
                               np.asarray(unrolled.intermediates.attention_probs), atol=1e-5)


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_every_family_param_gets_a_logical_axis(name):
    """The sharding table names every parameter of every family (norms, q/k norms, experts)."""
    from kdjax import sharding as S
    from kdjax.models import preset

    extra = {"gemma2": dict(layer_types=("sliding_attention", "full_attention"), sliding_window=4),
             "mixtral": dict(num_experts=4), "qwen3_moe": dict(num_experts=4)}.get(name, {})
    config = preset(name, vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                    head="causal_lm" if name not in ("bert", "roberta") else "mlm", **extra)
    abstract = kdjax.hub.abstract_model(config)[1]
    mesh = S.make_mesh(S.MeshConfig(axes=("data", "fsdp", "tensor", "expert"), ici=(1, 2, 2, 2)))
    specs = kdjax.hub.flat_params(S.param_specs(abstract, mesh, S.merge_rules(S.DEFAULT_TEACHER_RULES,
                                                                               S.EXPERT_RULES)))
    assert set(specs) == set(kdjax.hub.flat_params(abstract))


def _longrope_phi3(seed=0):
    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, original_max_position_embeddings=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.5], "long_factor": [1.1, 2.0, 5.0, 9.0]})
    config._attn_implementation = "eager"
    model = transformers.Phi3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_phi3_longrope_parity_short_and_long_context_and_export(tmp_path):
    """LongRoPE: short factors up to original_max_position_embeddings (8), long ones beyond, cos/sin scaled
    by sqrt(1 + ln(64/8) / ln 8) = sqrt(2); logits equal transformers' on both sides and after export."""
    ref = _longrope_phi3()
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")))
    scaling = dict(model.config.rope_scaling)
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 8
    np.testing.assert_allclose(scaling["attention_factor"], np.sqrt(2.0), rtol=1e-12)
    rng = np.random.default_rng(0)
    outputs = {}
    for seq in (6, 13):  # 6 <= 8: short factors; 13 > 8: long factors
        ids = rng.integers(3, 64, size=(2, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        ours = np.asarray(model(ids, mask).logits)
        _assert_close(ours, torch_outputs(ref, ids, mask).logits.numpy(), f"logits (seq {seq})")
        outputs[seq] = (ids, mask, ours)
    # The long factors matter: the first 6 positions of the long batch differ from a short pass on them.
    ids, mask, long_logits = outputs[13]
    short_logits = np.asarray(model(ids[:, :6], mask[:, :6]).logits)
    assert np.abs(short_logits - long_logits[:, :6]).max() > 1e-3
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    loaded = transformers.Phi3ForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    _assert_close(long_logits, torch_outputs(loaded, ids, mask).logits.numpy(), "exported logits")
    assert kdjax.load_pretrained(out_dir).config == model.config


def _mixed_qwen3_moe(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=40, moe_intermediate_size=20, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False, mlp_only_layers=[0, 2])
    config._attn_implementation = "eager"
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_qwen3_moe_dense_layers_parity_and_export(tmp_path, scan_layers):
    """Qwen3-MoE with MLP-only layers 0 and 2: scanned (a per-layer flag picks the FFN) and unrolled (each
    layer runs its own FFN) both match transformers, router logits of the MoE layers included, and the
    export reproduces every tensor."""
    ref = _mixed_qwen3_moe()
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")), scan_layers=scan_layers)
    assert model.config.dense_layers == (0, 2)
    ids, mask = padded_batch("qwen3_moe")
    out = model(ids, mask, taps=("hidden_states", "router_logits"))
    r = torch_outputs(ref, ids, mask)
    for i, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states)):
        _assert_close(a, b.numpy(), f"hidden_states[{i}]", mask)
    _assert_close(out.logits, r.logits.numpy(), "logits", mask)
    theirs = _router_logits_torch(ref, ids, mask)
    ours = np.asarray(out.intermediates.router_logits)
    assert len(theirs) == ours.shape[0] == 2
    for i, b in enumerate(theirs):
        _assert_close(ours[i].reshape(-1, ours.shape[-1]), b.numpy(), f"router_logits[{i}]", mask.reshape(-1))
    if not scan_layers:
        return
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    loaded = transformers.Qwen3MoeForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    original = ref.state_dict()
    exported = loaded.state_dict()
    assert set(exported) == set(original)
    for name, tensor in exported.items():
        np.testing.assert_allclose(tensor.numpy(), original[name].numpy(), atol=1e-6, err_msg=name)
    assert kdjax.load_pretrained(out_dir, scan_layers=scan_layers).config == model.config


def test_student_of_a_mixed_moe_teacher_keeps_each_copied_layers_kind():
    from kdjax.students import student_from
    cfg = kdjax.preset("qwen3_moe", vocab_size=VOCAB, hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=2,
                       head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=4,
                       num_experts_per_tok=2, dense_layers=(0, 2), head="causal_lm")
    teacher = kdjax.Model.init(cfg, seed=0)
    student = student_from(teacher, layers=(1, 2))
    assert student.config.dense_layers == (1,)
    t = kdjax.hub.api.flat_params(teacher.params)
    s = kdjax.hub.api.flat_params(student.params)
    np.testing.assert_array_equal(np.asarray(s["layers/mlp/up/kernel"][1]), np.asarray(t["layers/mlp/up/kernel"][2]))
    np.testing.assert_array_equal(np.asarray(s["layers/moe/up"][0]), np.asarray(t["layers/moe/up"][1]))
