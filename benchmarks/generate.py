"""New tokens per second of `kdjax.generate` against `transformers` PyTorch `generate`, side by side.

    python benchmarks/generate.py                          # Llama-style 4 layers x 256, batch 8, 64 new tokens
    python benchmarks/generate.py --batch=32 --new_tokens=128 --vocab=32000 --output=workdir/bench/generate.json

One random `LlamaForCausalLM` is built in PyTorch, written to a temporary directory and loaded into
kdjax, so both libraries run the same weights in float32. Both decode greedily, with a key/value
cache and without EOS, exactly `--new_tokens` tokens after the same prompts: random ids whose lengths
are spread over `[prompt/2, prompt]`. kdjax gets them right-padded (its data layout), `transformers`
left-padded (what its batched `generate` needs).

The first call of each is a warm-up and is not timed (for kdjax it includes compilation). Then
`--repeats` rounds each time one call of both, alternating which goes first, and the report gives the
median seconds per call, `batch * new_tokens / median` new tokens per second and the ratio
kdjax / transformers. The share of new tokens on which both choose the same greedy token is printed as
a sanity check (left padding moves positions by nothing but rounding, so it should be close to 1).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads (GQA).")
_FFN = flags.DEFINE_integer("ffn", 1024, "MLP intermediate size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per call.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Longest prompt (the padded length).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: torch's own choice).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch model ('cuda' on a GPU machine; "
                                    "kdjax uses JAX's default device).")


def build_models(directory: str):
    import torch
    import transformers

    import kdjax

    torch.manual_seed(_SEED.value)
    config = transformers.LlamaConfig(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
        num_attention_heads=_HEADS.value, num_key_value_heads=_KV_HEADS.value, intermediate_size=_FFN.value,
        max_position_embeddings=max(2048, _PROMPT.value + _NEW.value), pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(directory)
    return ref, kdjax.load_pretrained(directory)


def prompts():
    import numpy as np

    rng = np.random.default_rng(_SEED.value)
    b, s = _BATCH.value, _PROMPT.value
    lengths = rng.integers(max(1, s // 2), s + 1, size=b)
    lengths[0] = s
    ids = rng.integers(3, _VOCAB.value, size=(b, s)).astype(np.int32)
    right_mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)
    right = np.where(right_mask == 1, ids, 0)
    left = np.zeros_like(right)
    left_mask = np.zeros_like(right_mask)
    for i, n in enumerate(lengths):
        left[i, s - n:] = right[i, :n]
        left_mask[i, s - n:] = 1
    return right, right_mask, left, left_mask


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch

    import kdjax

    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    with tempfile.TemporaryDirectory() as tmp:
        ref, model = build_models(tmp)
    right, right_mask, left, left_mask = prompts()
    b, new = _BATCH.value, _NEW.value
    device = torch.device(_TORCH_DEVICE.value)
    ref = ref.to(device)
    left_t = torch.tensor(left, dtype=torch.long, device=device)
    left_mask_t = torch.tensor(left_mask, dtype=torch.long, device=device)

    def run_kdjax():
        out = kdjax.generate(model, right, right_mask, max_new_tokens=new, temperature=0)
        return np.asarray(jax.block_until_ready(out.tokens))

    def run_torch():
        with torch.inference_mode():
            seq = ref.generate(left_t, attention_mask=left_mask_t, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False)
        return seq[:, left.shape[1]:].cpu().numpy()

    start = time.perf_counter()
    ours = run_kdjax()
    warm_kdjax = time.perf_counter() - start
    start = time.perf_counter()
    theirs = run_torch()
    warm_torch = time.perf_counter() - start
    agree = float(np.mean(ours == theirs))

    times = {"kdjax": [], "transformers": []}
    runners = {"kdjax": run_kdjax, "transformers": run_torch}
    for r in range(_REPEATS.value):
        order = ("kdjax", "transformers") if r % 2 == 0 else ("transformers", "kdjax")
        for name in order:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: b * new / v for k, v in med.items()}
    result = {
        "model": f"llama {_LAYERS.value}x{_HIDDEN.value}, heads {_HEADS.value}/{_KV_HEADS.value}, "
                 f"ffn {_FFN.value}, vocab {_VOCAB.value}, float32, {model.num_params:,} params",
        "batch": b, "prompt": _PROMPT.value, "new_tokens": new, "repeats": _REPEATS.value,
        "platform": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind),
        "torch_device": _TORCH_DEVICE.value, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "warmup_s": {"kdjax": round(warm_kdjax, 3), "transformers": round(warm_torch, 3)},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratio_kdjax_over_transformers": round(tps["kdjax"] / tps["transformers"], 3),
        "greedy_token_agreement": round(agree, 4),
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    print(f"{result['model']}; batch {b}, prompts up to {_PROMPT.value}, {new} new tokens, "
          f"{result['platform']} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    print(f"warm-up (not timed): kdjax {warm_kdjax:.2f}s (includes compile), transformers {warm_torch:.2f}s")
    for name in ("kdjax", "transformers"):
        print(f"{name:>13}: median {med[name]:.3f}s per call, {tps[name]:,.0f} new tokens/s")
    print(f"ratio kdjax / transformers: {result['ratio_kdjax_over_transformers']:.2f}x; "
          f"same greedy token on {agree:.1%} of new tokens")
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    app.run(main)
