"""`kdjax.generate`: cached decoding against `transformers` generate, a full no-cache forward, NumPy
sampling references and a device mesh.

Every model is a tiny random Hugging Face PyTorch model (all parameters perturbed) loaded into kdjax,
so `transformers` is the reference for both the greedy tokens and the per-step logits. Prompts in one
batch have different lengths and are right-padded, as kdjax's data pipeline makes them; `transformers`
runs each prompt alone, unpadded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh
from scipy import stats

import kdjax
from kdjax import sharding as S
from kdjax.generation import GENERATE_MODEL_TYPES, generate_fn, sampling_logits
from kdjax.hub.api import abstract_model, flat_params
from kdjax.models.config import SUPPORTED_MODEL_TYPES, preset
from kdjax.models.transformer import extend_cache, init_cache, prefill_cache
from hf_fixtures import VOCAB, make_hf_model, save_hf_model

NEW = 8
LENGTHS = (9, 5, 3, 7)  # one batch, right-padded to 9


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_model(case: str):
    """A tiny random HF causal LM: a `hf_fixtures` family, or a variant with a sliding window / RoPE scaling."""
    if case == "mistral-window":
        config = transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=48, max_position_embeddings=64, pad_token_id=0, sliding_window=3,
            tie_word_embeddings=False)
    elif case == "llama-rope-llama3":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    else:
        return make_hf_model(case, "causal_lm")
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    return _perturb(model)


def load(ref, tmp_path, **kw):
    return kdjax.load_pretrained(save_hf_model(ref, str(tmp_path)), **kw)


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    ids = rng.integers(3, VOCAB, size=(len(lengths), seq))
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def hf_generate(ref, ids, mask, new=NEW, eos=None):
    """Greedy `transformers` generate of each prompt alone: (tokens, per-step logits) per row."""
    out = []
    for row, m in zip(ids, mask):
        n = int(m.sum())
        with torch.no_grad():
            prompt = torch.tensor(row[None, :n], dtype=torch.long)
            g = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        out.append((g.sequences[0, n:].numpy(), torch.cat(g.logits).numpy().astype(np.float64)))
    return out


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _continued(ids, mask, tokens):
    """Right-padded [B, S + N] rows holding each prompt followed by its generated tokens."""
    b, s = ids.shape
    full = np.zeros((b, s + tokens.shape[1]), np.int32)
    for i in range(b):
        n = int(mask[i].sum())
        full[i, :n] = ids[i, :n]
        full[i, n:n + tokens.shape[1]] = tokens[i]
    return full


# --------------------------------------------------------------------------------------------------
# Greedy decoding equals transformers, and the cached steps equal a full forward pass.


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    ref = hf_model("llama")
    return ref, load(ref, tmp_path_factory.mktemp("llama"))


CASES = ["gpt2", "llama", "qwen2", "mistral", pytest.param("mistral-window", marks=pytest.mark.slow),
         pytest.param("llama-rope-llama3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers_and_full_forward(case, tmp_path, llama):
    ref, model = llama if case == "llama" else (lambda r: (r, load(r, tmp_path)))(hf_model(case))
    if case == "mistral-window":
        assert model.config.sliding_window == 3
    ids, mask = prompts()
    out = jax.device_get(kdjax.generate(model, ids, mask, max_new_tokens=NEW, temperature=0))
    assert out.tokens.shape == out.logprobs.shape == (len(LENGTHS), NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, NEW)
    for b, (tokens, logits) in enumerate(hf_generate(ref, ids, mask)):
        np.testing.assert_array_equal(out.tokens[b], tokens, err_msg=f"row {b} (prompt length {LENGTHS[b]})")
        # Greedy log-probabilities are the log-softmax of transformers' own step logits.
        want = log_softmax(logits)[np.arange(NEW), tokens]
        np.testing.assert_allclose(out.logprobs[b], want, atol=1e-4, err_msg=f"row {b}")
    # No cache: one forward pass over prompt + generated tokens gives every step's distribution.
    full = _continued(ids, mask, out.tokens)
    lengths = np.asarray(LENGTHS)
    full_mask = (np.arange(full.shape[1])[None] < (lengths + NEW)[:, None]).astype(np.int32)
    logits = np.asarray(model(full, full_mask).logits)
    for t in range(NEW):
        at = logits[np.arange(len(LENGTHS)), lengths - 1 + t]
        np.testing.assert_array_equal(np.argmax(at, -1), out.tokens[:, t], err_msg=f"step {t}")
        np.testing.assert_allclose(log_softmax(at)[np.arange(len(LENGTHS)), out.tokens[:, t]], out.logprobs[:, t],
                                   atol=1e-4, err_msg=f"step {t}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mistral-window"])
def test_cached_logits_equal_full_forward(case, tmp_path):
    """Every logit of every cached step (prefill, then one token at a time) equals the no-cache forward."""
    model = load(hf_model(case), tmp_path)
    ids, mask = prompts()
    rng = np.random.default_rng(5)
    forced = rng.integers(3, VOCAB, size=(len(LENGTHS), NEW)).astype(np.int32)
    full = _continued(ids, mask, forced)
    lengths = np.asarray(LENGTHS)
    full_mask = (np.arange(full.shape[1])[None] < (lengths + NEW)[:, None]).astype(np.int32)
    want = np.asarray(model(full, full_mask).logits)

    gd, params = model.graphdef, model.params
    head = jax.jit(lambda h: nnx.merge(gd, params).lm_logits(h))
    step = jax.jit(lambda c, x, v: extend_cache(gd, params, c, x, v))
    hidden, cache = jax.jit(lambda x, v: prefill_cache(gd, params, x, v, full.shape[1]))(ids, mask)
    np.testing.assert_array_equal(cache.length, lengths)
    # The prefill equals the general step on an empty cache.
    hidden_ext, cache_ext = step(init_cache(model.config, len(LENGTHS), full.shape[1]), ids, mask)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(hidden_ext[b, :n], hidden[b, :n], atol=1e-5)
        np.testing.assert_allclose(cache_ext.key[:, b, :n], cache.key[:, b, :n], atol=1e-5)
    got = np.asarray(head(hidden))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=1e-4, err_msg=f"prefill row {b}")
    for t in range(NEW):
        hidden, cache = step(cache, forced[:, t:t + 1], np.ones((len(LENGTHS), 1), np.int32))
        got = np.asarray(head(hidden[:, 0]))
        np.testing.assert_allclose(got, want[np.arange(len(LENGTHS)), lengths + t], atol=1e-4, err_msg=f"step {t}")
    np.testing.assert_array_equal(cache.length, lengths + NEW)


# --------------------------------------------------------------------------------------------------
# EOS, bf16, a mesh.


def test_eos_stops_a_row_and_pads_it(llama):
    ref, model = llama
    ids, mask = prompts()
    free = jax.device_get(kdjax.generate(model, ids, mask, max_new_tokens=NEW, temperature=0)).tokens
    # An EOS id that row 0 produces at step 2 (and not before), plus one that no row produces.
    eos_hit = int(free[0, 2])
    assert eos_hit not in free[0, :2]
    eos_never = next(i for i in range(3, VOCAB) if i not in free)
    out = jax.device_get(kdjax.generate(model, ids, mask, max_new_tokens=NEW, temperature=0,
                                        eos_token_id=[eos_hit, eos_never]))
    for b, (tokens, _) in enumerate(hf_generate(ref, ids, mask, eos=[eos_hit, eos_never])):
        n = len(tokens)  # transformers stops the row at its EOS
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], tokens)
        np.testing.assert_array_equal(out.tokens[b, n:], eos_hit)  # padded with the first EOS id
        np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
        assert (out.logprobs[b, :n] < 0).all()
    assert out.lengths[0] == 3


@pytest.mark.slow
def test_bf16_generation_follows_its_own_forward(tmp_path):
    model = load(hf_model("llama"), tmp_path, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    ids, mask = prompts()
    out = jax.device_get(kdjax.generate(model, ids, mask, max_new_tokens=NEW, temperature=0))
    assert out.logprobs.dtype == np.float32 and np.isfinite(out.logprobs).all()
    full = _continued(ids, mask, out.tokens)
    lengths = np.asarray(LENGTHS)
    full_mask = (np.arange(full.shape[1])[None] < (lengths + NEW)[:, None]).astype(np.int32)
    logp = log_softmax(np.asarray(model(full, full_mask).logits, np.float32))
    for t in range(NEW):
        at = logp[np.arange(len(LENGTHS)), lengths - 1 + t]
        chosen = at[np.arange(len(LENGTHS)), out.tokens[:, t]]
        # bf16 rounding differs between the cached and the full pass; the pick must still be a top token
        # (random tokens sit ~1 nat below it) and its log-probability the same to bf16 precision.
        assert (chosen >= at.max(-1) - 0.05).all(), f"step {t}"
        np.testing.assert_allclose(out.logprobs[:, t], chosen, atol=0.05, err_msg=f"step {t}")


def test_mesh_generation_equals_one_device(llama):
    """fsdp=2 x tensor=4 with the teacher rules (params over fsdp and tensor, batch over fsdp)."""
    _, model = llama
    ids, mask = prompts()
    single = jax.device_get(kdjax.generate(model, ids, mask, max_new_tokens=NEW, temperature=0))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    rules = S.DEFAULT_TEACHER_RULES
    params = jax.device_put(model.params, S.param_shardings(model.params, mesh, rules))
    q = flat_params(params)["layers/attn/q/kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor")
    sharded = kdjax.Model(model.config, model.graphdef, params)
    out = kdjax.generate(sharded, ids, mask, max_new_tokens=NEW, temperature=0, mesh=mesh, rules=rules)
    assert len(out.tokens.sharding.device_set) == 8 and out.tokens.sharding.spec[0] is not None  # rows split
    np.testing.assert_array_equal(np.asarray(out.tokens), single.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), single.logprobs, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sampling: the drawn tokens follow the documented distribution.


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny Llama whose LM head is scaled up, so next-token distributions are far from uniform."""
    ref = hf_model("llama")
    with torch.no_grad():
        ref.lm_head.weight.mul_(5.0)
    model = load(ref, tmp_path_factory.mktemp("peaked"))
    ids, mask = prompts(lengths=(6,), seed=2)
    with torch.no_grad():
        logits = ref(torch.tensor(ids, dtype=torch.long)).logits[0, -1].numpy().astype(np.float64)
    return model, ids, mask, logits


SAMPLES = 4000


def _sample_first_tokens(model, ids, mask, seeds=(1,), **kw):
    """First new token of SAMPLES copies of one prompt per seed, from one jit of `generate_fn` whose key is traced."""
    many_ids, many_mask = np.repeat(ids, SAMPLES, 0), np.repeat(mask, SAMPLES, 0)
    run = jax.jit(lambda key: generate_fn(model.graphdef, model.params, many_ids, many_mask, key, max_new_tokens=1,
                                          **kw))
    outs = [jax.device_get(run(jax.random.key(seed))) for seed in seeds]
    return [(o.tokens[:, 0], o.logprobs[:, 0]) for o in outs]


def _chi_square_p(tokens, probs):
    """p-value of the counts of `tokens` under `probs`, bins with expected count < 5 pooled."""
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    expected = probs * len(tokens)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert obs.sum() == len(tokens)
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sampling_follows_softmax_of_logits_over_temperature(peaked):
    model, ids, mask, logits = peaked
    temperature = 0.7
    probs = np.exp(log_softmax(logits / temperature))
    assert probs.max() < 0.6 and (probs > 0.01).sum() >= 5, "the reference distribution should be spread out"
    (tokens, logprobs), (again, _), (other, _) = _sample_first_tokens(model, ids, mask, seeds=(1, 1, 2),
                                                                       temperature=temperature)
    assert _chi_square_p(tokens, probs) > 1e-3
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), atol=1e-4)
    # The test has power: the same draws are far from the untempered softmax.
    assert _chi_square_p(tokens, np.exp(log_softmax(logits))) < 1e-6
    # A traced key: another key gives other draws, the same key the same ones.
    np.testing.assert_array_equal(again, tokens)
    assert (other != tokens).mean() > 0.3


def _truncated_reference(logits, temperature, top_k, top_p):
    """NumPy float64 version of the documented rule: top-k by scaled logit, then the top-p nucleus."""
    z = logits / temperature
    keep = z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[before < top_p]] = True
    q = np.where(nucleus, p, 0.0)
    return q / q.sum()


def test_top_k_and_top_p_truncate_and_renormalize(peaked):
    model, ids, mask, logits = peaked
    temperature, top_k, top_p = 1.3, 6, 0.8
    probs = _truncated_reference(logits, temperature, top_k, top_p)
    untruncated = np.exp(log_softmax(logits / temperature))
    # Both truncations bite: top-p removes some of the top-k tokens, and alone it would keep more than k.
    assert 3 <= (probs > 0).sum() < top_k < (_truncated_reference(logits, temperature, VOCAB, top_p) > 0).sum()
    ((tokens, logprobs),) = _sample_first_tokens(model, ids, mask, temperature=temperature, top_k=top_k, top_p=top_p)
    assert (probs[tokens] > 0).all(), "a token outside the nucleus was drawn"
    assert set(np.flatnonzero(probs > 0.02)) <= set(tokens)
    assert _chi_square_p(tokens, probs) > 1e-3
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), atol=1e-4)  # renormalized, not the untruncated
    assert np.abs(np.log(untruncated[tokens]) - logprobs).min() > 0.1


def test_truncation_boundaries():
    """The documented edge cases on hand-made logits: top-p keeps a token while the mass before it is
    below p; top-k keeps ties with the k-th logit; the top token always survives."""
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)

    def kept(**kw):
        return set(np.flatnonzero(np.isfinite(np.asarray(sampling_logits(logits, temperature=1.0, **kw))[0])))

    assert kept(top_p=0.8) == {1, 3}  # mass before token 2 is 0.8, not below 0.8
    assert kept(top_p=0.81) == {1, 3, 2}
    assert kept(top_p=0.01) == {1}
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=2) == {1, 3}
    tied = jnp.asarray([[1.0, 3.0, 2.0, 2.0]], jnp.float32)
    assert set(np.flatnonzero(np.isfinite(np.asarray(sampling_logits(tied, temperature=1.0, top_k=2))[0]))) == {1, 2, 3}


# --------------------------------------------------------------------------------------------------
# Errors.


def _abstract(config):
    """A `Model` with shape-only parameters: argument checks run before any parameter is read."""
    return kdjax.Model(config, *abstract_model(config))


def test_bad_arguments_are_one_line_value_errors():
    ids, mask = prompts()
    small = dict(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16)
    model = _abstract(preset("llama", head="causal_lm", **small))
    bert = _abstract(preset("bert", head="mlm", **small))
    cases = [
        (dict(model=bert), "causal LM head"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(temperature=-1.0), "temperature"),
        (dict(eos_token_id=VOCAB), "eos_token_id"),
        (dict(attention_mask=mask[:, ::-1]), "right-padded"),
        (dict(attention_mask=np.zeros_like(mask)), "without tokens"),
        (dict(rules=S.DEFAULT_TEACHER_RULES), "mesh"),
    ]
    for kw, match in cases:
        args = dict(model=model, input_ids=ids, attention_mask=mask, max_new_tokens=2, temperature=0.0)
        args.update(kw)
        with pytest.raises(ValueError, match=match) as err:
            kdjax.generate(**args)
        assert "\n" not in str(err.value)
    gpt2 = _abstract(preset("gpt2", head="causal_lm", max_position_embeddings=64, **small))
    with pytest.raises(ValueError, match="max_new_tokens 60 exceeds"):
        kdjax.generate(gpt2, ids, mask, max_new_tokens=60)


def test_every_causal_family_is_covered_or_refused():
    """A causal family without a verified cached path is refused rather than decoded wrongly, and every
    family the cached path accepts has a parity case against transformers above."""
    cases = {(c.values[0] if hasattr(c, "values") else c).split("-")[0] for c in CASES}
    assert set(GENERATE_MODEL_TYPES) <= cases
    for model_type in set(SUPPORTED_MODEL_TYPES) - set(GENERATE_MODEL_TYPES):
        try:
            config = preset(model_type, vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=16, head="causal_lm")
        except Exception:  # a family whose preset needs more arguments than these
            continue
        with pytest.raises(ValueError, match="generate: "):
            kdjax.generate(_abstract(config), np.ones((1, 2), np.int32), max_new_tokens=1)
