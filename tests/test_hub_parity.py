"""kdjax models match Hugging Face PyTorch models of every family and head, and round-trip through export."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import kdjax
from kdjax.hub.api import abstract_model
from kdjax.models.config import ConfigError
from hf_fixtures import CASES, HEAD_CLASSES, VOCAB, make_hf_model, padded_batch, save_hf_model, torch_outputs

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


@pytest.mark.parametrize("family,head", CASES)
def test_parity_with_transformers(tmp_path, family, head):
    ref = make_hf_model(family, head)
    path = save_hf_model(ref, str(tmp_path / "hf"))
    model = kdjax.load_pretrained(path)
    assert model.config.head == head and model.config.model_type == family
    ids, mask = padded_batch(family)
    out = model(ids, mask, taps=("hidden_states", "attention_probs"))
    r = torch_outputs(ref, ids, mask)

    hidden_ref = r.hidden_states
    assert len(out.hidden_states) == len(hidden_ref) == model.config.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, hidden_ref)):
        _assert_close(a, b.numpy(), f"hidden_states[{i}]", mask)
    assert len(out.attentions) == len(r.attentions)
    for i, (a, b) in enumerate(zip(out.attentions, r.attentions)):
        # Probabilities of valid query rows (padded rows attend arbitrarily in HF decoders).
        a = np.asarray(a).transpose(0, 2, 1, 3)
        b = b.numpy().transpose(0, 2, 1, 3)
        _assert_close(a, b, f"attentions[{i}]", mask)
    if head == "base":
        _assert_close(out.last_hidden_state, r.last_hidden_state.numpy(), "last_hidden_state", mask)
    else:
        logits_ref = r.logits.numpy()
        _assert_close(out.logits, logits_ref, "logits", mask if logits_ref.ndim == 3 else None)


@pytest.mark.parametrize("family,head", [c for c in CASES if c[1] != "base"] + [("bert", "base")])
def test_export_round_trip(tmp_path, family, head):
    """kdjax -> HF directory -> transformers: same outputs."""
    original_model = make_hf_model(family, head, seed=1)
    model = kdjax.load_pretrained(save_hf_model(original_model, str(tmp_path / "hf")))
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    loaded = getattr(transformers, HEAD_CLASSES[family][head]).from_pretrained(out_dir, attn_implementation="eager")
    loaded.eval()
    ids, mask = padded_batch(family, seed=3)
    ours = model(ids, mask)
    theirs = torch_outputs(loaded, ids, mask)
    if head == "base":
        _assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), "last_hidden_state", mask)
    else:
        ref = theirs.logits.numpy()
        _assert_close(ours.logits, ref, "logits", mask if ref.ndim == 3 else None)
    # Every tensor transformers loaded equals the original model's.
    original = original_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), original[name].numpy(), atol=1e-6, err_msg=name)


def test_export_loads_with_automodel(tmp_path):
    ref = make_hf_model("llama", "causal_lm")
    model = kdjax.load_pretrained(save_hf_model(ref, str(tmp_path / "hf")))
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    auto = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(auto).__name__ == "LlamaForCausalLM"


def test_scanned_and_unrolled_agree(tmp_path):
    ref = make_hf_model("llama", "causal_lm")
    path = save_hf_model(ref, str(tmp_path / "hf"))
    scanned = kdjax.load_pretrained(path, scan_layers=True)
    unrolled = kdjax.load_pretrained(path, scan_layers=False)
    ids, mask = padded_batch("llama")
    taps = {"hidden_states": (0, 2), "attention_scores": (1,), "value": None}
    a = scanned(ids, mask, taps=taps)
    b = unrolled(ids, mask, taps=taps)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    for kind in ("hidden_states", "attention_scores", "value"):
        np.testing.assert_allclose(getattr(a.intermediates, kind), getattr(b.intermediates, kind), atol=1e-5)
    assert a.intermediates.layer_index("hidden_states") == (0, 2)


def test_remat_policies_do_not_change_outputs(tmp_path):
    ref = make_hf_model("bert", "mlm")
    path = save_hf_model(ref, str(tmp_path / "hf"))
    ids, mask = padded_batch("bert")
    base = kdjax.load_pretrained(path)(ids, mask).logits
    for policy in ("full", "dots", "minimal"):
        out = kdjax.load_pretrained(path, remat_policy=policy)(ids, mask).logits
        np.testing.assert_allclose(out, base, atol=1e-6)


def test_bf16_compute_close_to_fp32(tmp_path):
    ref = make_hf_model("llama", "causal_lm")
    path = save_hf_model(ref, str(tmp_path / "hf"))
    ids, mask = padded_batch("llama")
    fp32 = kdjax.load_pretrained(path)(ids, mask).logits
    bf16_model = kdjax.load_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert bf16_model.config.compute_dtype == np.dtype("bfloat16")
    out = np.asarray(bf16_model(ids, mask).logits, np.float32)
    assert np.max(np.abs(out - np.asarray(fp32))) < 0.1


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0},
], ids=["llama3", "linear"])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Llama 3.1-style and linear RoPE scaling: logits equal transformers' past the original context."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False,
        rope_parameters={"rope_theta": 500000.0, **rope})
    config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_hf_model(ref, str(tmp_path / "hf"))
    model = kdjax.load_pretrained(path)
    assert dict(model.config.rope_scaling)["rope_type"] == rope["rope_type"]
    ids, mask = padded_batch("llama", seq=48)  # three times the llama3 case's original context
    theirs = torch_outputs(ref, ids, mask).logits.numpy()
    _assert_close(model(ids, mask).logits, theirs, "logits", mask)
    # Without the scaling the model is measurably different, so the check above can fail.
    plain_config = model.config.replace(rope_scaling=())
    plain = kdjax.Model(plain_config, abstract_model(plain_config)[0], model.params)
    assert np.max(np.abs(np.asarray(plain(ids, mask).logits) - theirs)) > 1e-3
    # The export carries the scaling, and transformers reads it back.
    out_dir = kdjax.save_pretrained(model, str(tmp_path / "export"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    np.testing.assert_allclose(torch_outputs(again, ids, mask).logits.numpy(), theirs, atol=1e-5)


def test_unsupported_rope_scaling_is_one_line(tmp_path):
    ref = make_hf_model("llama", "causal_lm")
    path = save_hf_model(ref, str(tmp_path / "hf"))
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with open(cfg_path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported; supported: default, linear, llama3"):
        kdjax.load_pretrained(path)
