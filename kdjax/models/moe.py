"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) and the router's load-balancing loss.

Routing: the router is a bias-free linear map to `E` logits per token; probabilities are a float32
softmax over all experts, each token keeps its `k` most probable experts and, with `norm_topk_prob`,
renormalizes their probabilities to sum to one. (Mixtral's "softmax over the top-k logits" is the same
number: renormalizing a softmax's top-k entries is the softmax of those logits.) Qwen3-MoE may keep
the raw probabilities (`norm_topk_prob=False`).

Experts are gated MLPs stored stacked, `gate`/`up` `[E, D, F]` and `down` `[E, F, D]` (`[L, E, ...]`
across layers), so there is no per-expert module and no Python loop over experts.

Two dispatches, both without a Python loop over experts (`ModelConfig.moe_dispatch`):

`dense` (the default): every expert runs on every token and the outputs are summed with the sparse
gate weights (zero for experts a token did not pick). It is exact -- no capacity, no dropped tokens,
so it matches the reference implementations to float rounding -- and it is three einsums with the
expert axis as a plain batch dimension, which XLA shards over an `expert` mesh axis without any
all-to-all: each device computes its experts for all tokens and one reduction sums the expert
contributions. The price is `E / k` times the FLOPs of a routed dispatch (4x for Mixtral's 8/2, 16x
for 128/8), which is why it suits small expert counts and correctness checks; the activation
`[B, S, E, F]` is the memory cost that an expert-sharded mesh divides by the expert-axis size.

`routed`: each expert gets a buffer of `C = ceil(capacity_factor * T * k / E)` token slots (T tokens
in the batch). A token's slot in an expert is its rank among the tokens routed there (a cumulative
sum over a one-hot of the assignments, in token order); assignments past `C` are dropped, as in
GShard/Switch. Tokens are scattered into `[E, C, D]`, the experts run as one batched einsum, and the
results are gathered back and summed with the gate weights. FLOPs are `capacity_factor` times those of
the routed computation instead of `E / k` times, at the price of dropped assignments when an expert
is over-subscribed (none when `C >= T`, which is what the tests use to compare it with `dense`).
Padding tokens are routed too, as in the reference implementations.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kdjax.models.config import ModelConfig

Array = jax.Array


class MoE(nnx.Module):
    """Top-k routed experts; returns `(output [B, S, D], router_logits [B, S, E])`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        from kdjax.models.transformer import _dense, _init

        c = config
        e, d, f = c.num_experts, c.hidden_size, c.expert_size
        init = _init(c)
        self.router = _dense(c, d, e, False, rngs)
        self.gate = nnx.Param(init(rngs.params(), (e, d, f), c.params_dtype))
        self.up = nnx.Param(init(rngs.params(), (e, d, f), c.params_dtype))
        self.down = nnx.Param(init(rngs.params(), (e, f, d), c.params_dtype))
        self.config = c

    def __call__(self, x: Array) -> tuple[Array, Array]:
        from kdjax.models.transformer import _act

        c = self.config
        dt = c.compute_dtype
        router_logits = self.router(x)
        if c.moe_dispatch == "routed":
            return self._routed(x, router_logits), router_logits
        gates = routing_weights(router_logits, c.num_experts_per_tok, c.norm_topk_prob).astype(dt)
        gate_h = jnp.einsum("bsd,edf->bsef", x, self.gate[...].astype(dt))
        up_h = jnp.einsum("bsd,edf->bsef", x, self.up[...].astype(dt))
        hidden = _act(c.activation, gate_h) * up_h * gates[..., None]
        out = jnp.einsum("bsef,efd->bsd", hidden, self.down[...].astype(dt))
        return checkpoint_name(out, "mlp_out"), router_logits

    def _routed(self, x: Array, router_logits: Array) -> Array:
        from kdjax.models.transformer import _act

        c = self.config
        dt = c.compute_dtype
        b, s, d = x.shape
        e, k, t = c.num_experts, c.num_experts_per_tok, b * s
        capacity = expert_capacity(t, k, e, c.moe_capacity_factor)
        top_values, top_index = top_k_routing(router_logits.reshape(t, e), k, c.norm_topk_prob)
        expert = top_index.reshape(t * k)  # assignment a = token * k + j
        token = jnp.repeat(jnp.arange(t), k)
        one_hot = jax.nn.one_hot(expert, e, dtype=jnp.int32)
        slot = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1  # rank within the expert
        keep = slot < capacity
        flat_slot = jnp.where(keep, expert * capacity + slot, e * capacity)  # e*C = out of bounds: dropped
        x_flat = x.reshape(t, d)
        buffer = jnp.zeros((e * capacity, d), dt).at[flat_slot].set(x_flat[token].astype(dt), mode="drop")
        buffer = buffer.reshape(e, capacity, d)
        hidden = _act(c.activation, jnp.einsum("ecd,edf->ecf", buffer, self.gate[...].astype(dt)))
        hidden = hidden * jnp.einsum("ecd,edf->ecf", buffer, self.up[...].astype(dt))
        y = jnp.einsum("ecf,efd->ecd", hidden, self.down[...].astype(dt)).reshape(e * capacity, d)
        picked = jnp.take(y, jnp.minimum(flat_slot, e * capacity - 1), axis=0)
        weight = jnp.where(keep, top_values.reshape(t * k), 0.0).astype(dt)
        out = jnp.zeros((t, d), dt).at[token].add(picked * weight[:, None])
        return checkpoint_name(out.reshape(b, s, d), "mlp_out")


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Token slots per expert for the routed dispatch: ceil(factor * tokens * k / E), at most `tokens`."""
    import math

    return max(1, min(tokens, math.ceil(factor * tokens * top_k / num_experts)))


def top_k_routing(router_logits: Array, top_k: int, normalize: bool = True) -> tuple[Array, Array]:
    """`(weights, expert ids)`, each `[..., k]`: the top-k softmax probabilities, renormalized if asked."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_values, top_index = jax.lax.top_k(probs, top_k)
    if normalize:
        top_values = top_values / jnp.sum(top_values, axis=-1, keepdims=True)
    return top_values, top_index


def routing_weights(router_logits: Array, top_k: int, normalize: bool = True) -> Array:
    """Dense `[..., E]` gate weights: the (renormalized) top-k softmax probabilities, zero elsewhere."""
    top_values, top_index = top_k_routing(router_logits, top_k, normalize)
    one_hot = jax.nn.one_hot(top_index, router_logits.shape[-1], dtype=jnp.float32)  # [..., k, E]
    return jnp.einsum("...k,...ke->...e", top_values, one_hot)


def load_balancing_loss(router_logits: Array, top_k: int, attention_mask: Optional[Array] = None) -> Array:
    """Switch/Mixtral load-balancing loss over all layers' router logits.

    `router_logits` is `[L, B, S, E]` (the `router_logits` tap) or `[B, S, E]`. With `f_e` the share of
    top-k assignments that go to expert `e` and `P_e` the mean router probability of `e`, both over the
    valid tokens of every layer, the loss is `E * sum_e f_e * P_e`; `f_e` sums to `top_k`, so a uniform
    router scores `top_k`. Padding (mask 0) counts for nothing. This is the quantity transformers
    reports as `aux_loss`; the training loss adds `router_aux_loss_coef` times it (`router_aux_loss`).
    """
    logits = router_logits.astype(jnp.float32)
    if logits.ndim == 3:
        logits = logits[None]
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, top_index = jax.lax.top_k(probs, top_k)
    chosen = jnp.sum(jax.nn.one_hot(top_index, num_experts, dtype=jnp.float32), axis=-2)  # [L, B, S, E]
    if attention_mask is None:
        weight = jnp.ones(logits.shape[1:3], jnp.float32)
    else:
        weight = attention_mask.astype(jnp.float32)
    weight = jnp.broadcast_to(weight[None, ..., None], logits.shape[:-1] + (1,))
    rows = jnp.sum(weight)
    tokens_per_expert = jnp.sum(chosen * weight, axis=(0, 1, 2)) / rows
    prob_per_expert = jnp.sum(probs * weight, axis=(0, 1, 2)) / rows
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_aux_loss(config: ModelConfig, router_logits: Array, attention_mask: Optional[Array] = None) -> Array:
    """`router_aux_loss_coef * load_balancing_loss`, the term an MoE model's training loss adds."""
    return config.router_aux_loss_coef * load_balancing_loss(router_logits, config.num_experts_per_tok,
                                                             attention_mask)
