"""Text generation from a causal kdjax model with a key/value cache.

`generate_fn` is the pure core: `(graphdef, params, input_ids, attention_mask, key)` in, a
`GenerateOutput` pytree out, every option static. It prefills the cache with the right-padded prompts
in one pass, then runs a `lax.while_loop` that feeds each row's last token back at that row's own next
position. A training step or a sharded run calls it inside its own `jax.jit` with a traced key;
`generate` is the eager-facing wrapper around a cached `jax.jit` of it.

Sampling at each step, in this order: `temperature` divides the float32 logits (0 means greedy
argmax); `top_k` keeps the tokens whose scaled logit is at least the k-th largest (ties at the boundary
are kept); `top_p` keeps the smallest set of most probable tokens whose probability reaches `top_p`
(a token is kept when the probability of all tokens ranked before it is below `top_p`, so the most
probable token always stays). The token is drawn from the softmax of what is left, and its reported
log-probability is under that renormalized distribution (greedy: the plain log-softmax).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import sharding
from kdjax.models.config import ModelConfig
from kdjax.models.transformer import KVCache, extend_cache, prefill_cache

Array = jax.Array

# Families whose every layer the cached decode path (`extend_cache`) reproduces; a family added to
# the transformer later must be checked against it (tests/test_generate.py) before joining this list.
GENERATE_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
    """New tokens of each row; positions after a row's EOS hold the pad id and log-probability 0."""

    tokens: Array  # [B, N] int32
    logprobs: Array  # [B, N] float32, log-probability of each token under the distribution it was drawn from
    lengths: Array  # [B] int32, new tokens up to and including the first EOS (N for a row without one)


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, numbers.Integral) else tuple(eos_token_id)
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"generate: eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}")
    return tuple(int(i) for i in ids)


def check_generate_args(config: ModelConfig, prompt_length: int, *, max_new_tokens, temperature, top_k, top_p,
                        eos_token_id) -> tuple[int, ...]:
    """One-line `ValueError`s for arguments `generate_fn` cannot honour; returns the EOS ids as a tuple."""
    if not config.causal or config.head != "causal_lm":
        raise ValueError(f"generate: model needs a causal LM head, got model_type={config.model_type!r} "
                         f"head={config.head!r}")
    if config.model_type not in GENERATE_MODEL_TYPES:
        raise ValueError(f"generate: model_type={config.model_type!r} has no cached decode path yet; "
                         f"supported: {', '.join(GENERATE_MODEL_TYPES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"generate: temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"generate: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
    eos = _eos_tuple(eos_token_id)
    if any(not 0 <= i < config.vocab_size for i in eos):
        raise ValueError(f"generate: eos_token_id {eos_token_id!r} is outside the vocabulary [0, {config.vocab_size})")
    if config.position_embedding == "learned" and prompt_length + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate: prompt length {prompt_length} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's {config.max_position_embeddings} learned positions")
    return eos


def sampling_logits(logits: Array, *, temperature: float, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Array:
    """The float32 logits a token is drawn from: scaled by 1/temperature, outside top-k/top-p set to -inf."""
    z = logits.astype(jnp.float32) / jnp.float32(temperature)
    vocab = z.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-z, axis=-1, stable=True)  # most probable first; equal logits by token id
        probs_sorted = jax.nn.softmax(jnp.take_along_axis(z, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
        keep_sorted = mass_before < top_p
        keep = jnp.put_along_axis(jnp.zeros(z.shape, bool), order, keep_sorted, axis=-1, inplace=False)
        z = jnp.where(keep, z, -jnp.inf)
    return z


def choose_tokens(logits: Array, key: Array, *, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> tuple[Array, Array]:
    """(token [B] int32, its log-probability [B] float32) from logits [B, V] (module docstring)."""
    if temperature == 0:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        z = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        logp = jax.nn.log_softmax(z, axis=-1)
        token = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _constrain_cache(cache: KVCache, mesh, rules) -> KVCache:
    def c(x, names):
        return sharding.constrain(x, names, rules, mesh)

    names = (None, "act_batch", None, "act_kv", None)
    return KVCache(c(cache.key, names), c(cache.value, names), c(cache.length, ("act_batch",)))


def generate_fn(graphdef, params, input_ids: Array, attention_mask: Optional[Array], key: Array, *,
                max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
                mesh=None, rules: Any = None) -> GenerateOutput:
    """Generate `max_new_tokens` tokens after each right-padded prompt; a pure, jittable function.

    Args:
      graphdef, params: a causal LM (`Model.graphdef`, `Model.params`), possibly sharded.
      input_ids: [B, S] prompts, right-padded; every row needs at least one token.
      attention_mask: [B, S], 1 on each prompt's tokens (a prefix of the row); None = all tokens.
      key: PRNG key (typed or raw), may be traced; step t draws with `fold_in(key, t)`.
      max_new_tokens, temperature, top_k, top_p, eos_token_id: static; see the module docstring.
        After a row's EOS its tokens are the (first) EOS id and its log-probabilities 0; the loop
        stops early once every row has finished.
      mesh, rules: optional; with both, the cache is constrained to batch over `act_batch` and kv
        heads over `act_kv` (`kdjax.sharding` activation rules). Parameters and inputs keep whatever
        sharding they come with.
    """
    model = nnx.merge(graphdef, params)
    config = model.config
    batch, prompt_len = input_ids.shape
    eos = check_generate_args(config, prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    pad_id = eos[0] if eos else 0
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    prompt_lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_eos(token):
        hit = jnp.zeros(token.shape, bool)
        for i in eos:
            hit = hit | (token == i)
        return hit

    def next_logits(hidden_bd):
        return nnx.merge(graphdef, params).lm_logits(hidden_bd)

    hidden, cache = prefill_cache(graphdef, params, ids, mask, prompt_len + max_new_tokens)
    if mesh is not None and rules is not None:
        cache = _constrain_cache(cache, mesh, rules)
    last = jnp.take_along_axis(hidden, jnp.maximum(prompt_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    token, logprob = choose(next_logits(last), jax.random.fold_in(key, 0))
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    done = is_eos(token)

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, cache, prev, done, tokens, logprobs = state
        hidden, cache = extend_cache(graphdef, params, cache, prev[:, None])
        token, logprob = choose(next_logits(hidden[:, 0]), jax.random.fold_in(key, t))
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, t))
        return t + 1, cache, token, done | is_eos(token), tokens, logprobs

    state = (jnp.int32(1), cache, token, done, tokens, logprobs)
    _, _, _, _, tokens, logprobs = jax.lax.while_loop(cond, body, state)
    hits = is_eos(tokens)
    lengths = jnp.where(jnp.any(hits, axis=1), jnp.argmax(hits, axis=1) + 1, max_new_tokens).astype(jnp.int32)
    return GenerateOutput(tokens=tokens, logprobs=logprobs, lengths=lengths)


_STATIC = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "mesh", "rules")
_generate_jit = jax.jit(generate_fn, static_argnums=(0,), static_argnames=_STATIC)


def _check_prompts(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: input_ids must be [batch, length] integers, got shape {ids.shape} {ids.dtype}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"generate: attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    valid = mask.astype(bool)
    lengths = valid.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"generate: attention_mask has rows without tokens (rows {np.flatnonzero(lengths == 0)})")
    if not np.array_equal(valid, np.arange(ids.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("generate: attention_mask must be right-padded (each row's tokens first, then padding)")
    return ids.astype(np.int32), valid.astype(np.int32)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, seed: int = 0, mesh=None,
             rules: Any = None) -> GenerateOutput:
    """Sample (or, at `temperature=0`, greedily pick) `max_new_tokens` tokens after each prompt.

    `model` is a causal-LM `kdjax.Model`. Prompts come right-padded, as kdjax's data pipeline makes
    them (`attention_mask` marks each row's tokens). With a `mesh`, parameters are laid out by
    `rules` (default `kdjax.sharding.DEFAULT_TEACHER_RULES`: fsdp over `embed`, tensor over heads,
    mlp and vocab) and the batch over the data axes; otherwise they stay where they are.
    Returns a `GenerateOutput` (tokens, logprobs, lengths); see `generate_fn` for the semantics.
    """
    if not hasattr(model, "graphdef") or not hasattr(model, "params"):
        raise ValueError(f"generate: model must be a kdjax.Model, got {type(model).__name__}")
    ids, mask = _check_prompts(input_ids, attention_mask)
    check_generate_args(model.config, ids.shape[1], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    eos = eos_token_id if eos_token_id is None or isinstance(eos_token_id, numbers.Integral) else tuple(eos_token_id)
    params = model.params
    if mesh is not None:
        rules = tuple(sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_TEACHER_RULES).items())
        params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
        placed = sharding.shard_batch({"input_ids": ids, "attention_mask": mask}, sharding.batch_sharding(mesh, rules))
        ids, mask = placed["input_ids"], placed["attention_mask"]
    elif rules is not None:
        raise ValueError("generate: rules need a mesh (pass mesh=... too, or drop rules)")
    return _generate_jit(model.graphdef, params, ids, mask, jax.random.key(seed), max_new_tokens=int(max_new_tokens),
                         temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                         top_p=None if top_p is None else float(top_p), eos_token_id=eos, mesh=mesh, rules=rules)
