"""A test-only method written against the engine's extension points alone (no engine edit).

`routed_random_layers` combines four dynamic ingredients that the built-in recipes never needed:

* a knowledge kind registered here, `pooled_random_layers`, whose teacher layers are re-drawn every
  `every` steps inside the jitted step (traced indices into the stacked taps, RAIL-KD style);
* a method module, `teacher_proj` (teacher width -> student width), trained with the student at a
  learning rate of its own, checkpointed with the state and never exported;
* a step schedule: the feature term's weight decays linearly from 1 to 0 over the stage;
* per-example routing between two teachers (Dynamic-KD style): each example's soft-label KD comes
  from the `small` teacher when the student is among the most uncertain half of the batch on it,
  otherwise from the `large` teacher.

docs/writing_a_method.md walks through this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.knowledge.registry import all_layers, knowledge
from kdjax.methods.base import Method, Module, Stage, Term, register


@knowledge("pooled_random_layers", sources=("hidden_states",), taps=all_layers)
def pooled_random_layers(ctx, term):
    """Mean squared distance of sequence-mean-pooled hidden states: student layers 1..L_S against
    L_S distinct, sorted teacher layers drawn from 1..L_T every `every` steps."""
    count = ctx.student.num_layers
    drawn = ctx.random_layers(term, "teacher", count, every=term.kwargs.get("every", 1), low=1,
                              high=ctx.teacher.num_layers + 1)
    mask = ctx.mask(term).astype(jnp.float32)                                   # [B, S]
    s = jnp.stack([ctx.student_at("hidden_states", i) for i in range(1, count + 1)])  # [n, B, S, Ds]
    t = ctx.teacher_at("hidden_states", drawn)                                   # [n, B, S, Dt]

    def pool(h):
        return jnp.einsum("nbsd,bs->nbd", h.astype(jnp.float32), mask) / mask.sum(1)[None, :, None]

    proj = ctx.modules["teacher_proj"]
    t_pooled = pool(t) @ proj["kernel"]
    per_example = jnp.sum(jnp.square(pool(s) - t_pooled), axis=-1).mean(0)      # [B]
    loss = per_example.mean()
    one = jnp.ones((), jnp.float32)
    metrics = {term.name: (per_example.sum(), jnp.asarray(per_example.shape[0], jnp.float32))}
    for k in range(count):
        metrics[f"{term.name}/layer{k}"] = (drawn[k].astype(jnp.float32), one)
    return loss, metrics


def normalized_entropy(logits):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1) / jnp.log(logits.shape[-1])


def routed_loss(sctx):
    """KD routed per example by the student's uncertainty, plus the feature term against `large`."""
    s_out, s_inter = sctx.student()
    kd_terms = [t for t in sctx.terms if t.fn == "divergence"]
    feature_terms = [t for t in sctx.terms if t.fn != "divergence"]
    uncertainty = jax.lax.stop_gradient(normalized_entropy(s_out.logits))        # [B]
    rank = jnp.argsort(jnp.argsort(-uncertainty))                                # 0 = most uncertain
    to_small = (rank < uncertainty.shape[0] // 2).astype(jnp.float32)
    kd_small = sctx.per_example("small", terms=kd_terms)
    kd_large = sctx.per_example("large", terms=kd_terms)
    kd = jnp.mean(to_small * kd_small + (1.0 - to_small) * kd_large)
    features, metrics = sctx.teacher_loss("large", terms=feature_terms)
    one = jnp.ones((), jnp.float32)
    metrics = dict(metrics)
    metrics["routed/kd"] = (kd, one)
    metrics["routed/share_small"] = (to_small.sum(), jnp.asarray(to_small.shape[0], jnp.float32))
    return kd + features, metrics


def init_teacher_proj(rng, student, teachers):
    large = teachers["large"]
    key = jax.random.fold_in(rng, 0x7E)
    return {"kernel": 0.02 * jax.random.normal(key, (large.hidden_size, student.hidden_size), jnp.float32)}


@register("routed_random_layers", "Test-only: random teacher layers + a teacher projection + routing by uncertainty")
def routed_random_layers(temperature: float = 2.0, every: int = 1, proj_learning_rate=5e-3) -> Method:
    terms = (
        Term.make("divergence", "logits", name="kd", temperature=temperature),
        Term.make("pooled_random_layers", "hidden_states", name="pooled", weight=("linear", 1.0, 0.0), every=every),
    )
    stage = Stage(name="routed", terms=terms, loss=routed_loss,
                  modules=(Module("teacher_proj", init_teacher_proj, learning_rate=proj_learning_rate),))
    return Method(name="routed_random_layers", stages=(stage,), description="test-only dynamic method")
