"""The train state and the one jitted distillation step.

Teacher forwards, the student forward/backward and the optimizer update are one pure function
`step(state, teacher_params, batch) -> (state, metrics)`. Teacher parameters are a separate argument
that is never differentiated (their forward runs outside `value_and_grad`, under `stop_gradient`).
Gradient accumulation splits the batch into micro-batches inside the step with `lax.scan`, so the
host loop and the compiled program do not change with the accumulation factor.

Chunked logit terms (a logit `divergence` term with `chunk_size`, see `kdjax.distill.terms`): the
teacher pass built with the stage's `terms` runs each teacher without its LM head (`trunk_forward`) and
hands its parameters on with its outputs, `{name: (outputs, intermediates, params)}`; the student's
forward skips its head too, and the term recomputes both heads per sequence chunk from
`last_hidden_state`, so the step never holds `[B, S, V]` logits. A head that another term still reads
whole (an unchunked logit term, the hard-label cross-entropy) is computed as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax.distill import terms as terms_lib
from kdjax.methods.base import Term
from kdjax.models.config import ModelConfig
from kdjax.models.taps import TapSpec
from kdjax.models.transformer import forward, split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes. `params` is the student; `aux` holds learned projections."""

    step: jax.Array
    params: Any
    aux: Any
    opt_state: Any
    rng: jax.Array

    @property
    def trainable(self) -> dict:
        return {"student": self.params, "aux": self.aux}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    name: str
    graphdef: Any
    config: ModelConfig
    taps: TapSpec
    weight: float = 1.0


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "linear",
                                      weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, b1: float = 0.9,
                                      b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with linear warmup then linear/cosine/constant decay, global-norm clipping, and no weight
    decay on biases, norm scales and embeddings' norms (1-D parameters)."""
    warmup_steps = int(min(warmup_steps, max(total_steps - 1, 0)))
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use linear, cosine or constant")
    if warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    else:
        lr = decay

    def decay_mask(tree):
        return jax.tree.map(lambda x: x.ndim > 1, tree)

    chain = []
    if max_grad_norm:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def scope_mask(params, scope: str):
    """1/0 update mask for `train_scope`: "all", or "progressive:<l>" (only stacked layer l trains)."""
    if scope == "all":
        return None
    if not scope.startswith("progressive:"):
        raise ValueError(f"unknown train_scope {scope!r}; use 'all' or 'progressive:<layer>'")
    layer = int(scope.split(":", 1)[1])

    def leaf_mask(path, x):
        if getattr(path[0], "key", None) == "layers":
            return jnp.zeros(x.shape[:1], jnp.float32).at[layer].set(1.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.zeros((), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def student_view(batch: Mapping[str, Any]) -> dict:
    """The student's inputs: remapped ids under vocabulary compression, else the batch itself."""
    if "student_input_ids" not in batch:
        return dict(batch)
    view = dict(batch, input_ids=batch["student_input_ids"])
    if "student_labels" in batch:
        view["labels"] = batch["student_labels"]
    return view


def trunk_forward(graphdef, params, batch: Mapping[str, Any], taps: Any = None, dropout_key=None):
    """`forward` without the LM head: `outputs.logits` is None, `outputs.last_hidden_state` is set.

    The model is re-split with a `base` head config, so the head's parameters stay in `params` (same
    tree, same arrays: gradients flow to the trunk as before) but the head is not applied.
    """
    model = nnx.merge(graphdef, params)
    if model.config.head not in terms_lib.LM_HEADS:
        return forward(graphdef, params, batch, taps, dropout_key)
    model.config = model.config.replace(head="base")
    trunk_graphdef, trunk_params = split(model)
    return forward(trunk_graphdef, trunk_params, batch, taps, dropout_key)


def _chunking(terms: Sequence[Term]) -> bool:
    return any(terms_lib.logit_chunk_size(t) is not None for t in terms)


def build_teacher_pass(teachers: Sequence[TeacherSpec], terms: Sequence[Term] = ()) -> Callable:
    """`(teacher_params, batch) -> {name: (outputs, intermediates)}`, frozen (`stop_gradient`).

    With chunked logit terms among `terms`, each entry is `(outputs, intermediates, params)`: the
    teacher's parameters travel along for the per-chunk head, and its forward skips the LM head unless
    an unchunked term reads the teacher's logits.
    """
    chunking = _chunking(terms)
    full_logits = terms_lib.logits_needed(terms)[1] if chunking else True

    def teacher_pass(teacher_params: Mapping[str, Any], batch):
        results = {}
        for t in teachers:
            with jax.named_scope(f"teacher_{t.name}"):
                run = forward if full_logits else trunk_forward
                out, inter = run(t.graphdef, teacher_params[t.name], batch, t.taps)
            result = (out, inter, teacher_params[t.name]) if chunking else (out, inter)
            results[t.name] = jax.lax.stop_gradient(result)
        return results

    return teacher_pass


def build_loss_fn(*, student_graphdef, student_config: ModelConfig, student_taps: TapSpec,
                  teachers: Sequence[TeacherSpec], terms: Sequence[Term], vocab_map=None) -> Callable:
    """`(trainable, batch, teacher_results, progress) -> (loss, metrics)`: the student side of a step."""
    terms = tuple(terms)
    weight_sum = sum(t.weight for t in teachers) or 1.0
    student_full_logits = terms_lib.logits_needed(terms)[0]

    def loss_fn(trainable, batch, teacher_results, progress, dropout_key=None):
        # Chunked logit terms run only when every teacher result carries its parameters (a teacher pass
        # built with the terms); otherwise they fall back to full logits, which both passes then compute.
        chunking = _chunking(terms) and all(len(teacher_results[t.name]) == 3 for t in teachers)
        run = trunk_forward if chunking and not student_full_logits else forward
        with jax.named_scope("student"):
            s_out, s_inter = run(student_graphdef, trainable["student"], student_view(batch), student_taps,
                                 dropout_key)
        s_head = terms_lib.lm_head(student_graphdef, trainable["student"]) if chunking else None
        total = jnp.zeros((), jnp.float32)
        metrics: dict = {}
        for t in teachers:
            t_out, t_inter, *t_params = teacher_results[t.name]
            t_head = terms_lib.lm_head(t.graphdef, t_params[0]) if chunking else None
            loss, m = terms_lib.stage_loss(terms, trainable["aux"], s_out, s_inter, t_out, t_inter, batch,
                                           progress=progress, student=student_config, teacher=t.config,
                                           vocab_map=vocab_map, student_head=s_head, teacher_head=t_head)
            total = total + (t.weight / weight_sum) * loss
            if len(teachers) > 1:
                m = {f"{t.name}/{k}": v for k, v in m.items()}
            metrics = terms_lib.merge_metrics(metrics, m)
        return total, metrics

    return loss_fn


def apply_update(state: TrainState, grads, loss, metrics, *, tx: optax.GradientTransformation,
                 update_mask=None) -> tuple[TrainState, dict]:
    """Masked optimizer update of (student, aux) and the step's `loss`/`grad_norm` metrics."""
    trainable = state.trainable
    if update_mask is not None:
        grads = {"student": jax.tree.map(jnp.multiply, grads["student"], update_mask), "aux": grads["aux"]}
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    if update_mask is not None:
        updates = {"student": jax.tree.map(jnp.multiply, updates["student"], update_mask), "aux": updates["aux"]}
    new = optax.apply_updates(trainable, updates)
    metrics = dict(metrics)
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    metrics["grad_norm"] = (optax.tree.norm(grads), jnp.ones((), jnp.float32))
    new_state = TrainState(step=state.step + 1, params=new["student"], aux=new["aux"], opt_state=opt_state,
                           rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def dropout_key(state: TrainState, micro_batch) -> jax.Array:
    """The student's dropout key for one micro-batch of this step (the state's key advances every step)."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, 0x0D0), micro_batch)


def _progress(state: TrainState, total_steps: int):
    return jnp.minimum(state.step.astype(jnp.float32) / max(total_steps, 1), 1.0)


def build_student_step(*, tx: optax.GradientTransformation, total_steps: int, update_mask=None,
                       **loss_kwargs) -> Callable:
    """`(state, teacher_results, batch) -> (state, metrics)`: a step whose teacher outputs are inputs
    (the step minus the teacher forward; used to measure the two parts apart)."""
    grad_fn = jax.value_and_grad(build_loss_fn(**loss_kwargs), has_aux=True)

    def student_step(state: TrainState, teacher_results, batch):
        teacher_results = jax.lax.stop_gradient(teacher_results)
        (loss, metrics), grads = grad_fn(state.trainable, batch, teacher_results, _progress(state, total_steps),
                                         dropout_key(state, 0))
        return apply_update(state, grads, loss, metrics, tx=tx, update_mask=update_mask)

    return student_step


def build_step(*, student_graphdef, student_config: ModelConfig, student_taps: TapSpec,
               teachers: Sequence[TeacherSpec], terms: Sequence[Term], tx: optax.GradientTransformation,
               total_steps: int, grad_accum: int = 1, update_mask=None, vocab_map=None) -> Callable:
    """The pure step function for one stage (jit it with the shardings of the caller's choice)."""
    teacher_pass = build_teacher_pass(teachers, terms)
    grad_fn = jax.value_and_grad(build_loss_fn(
        student_graphdef=student_graphdef, student_config=student_config, student_taps=student_taps,
        teachers=teachers, terms=terms, vocab_map=vocab_map), has_aux=True)

    def micro_step(trainable, batch, teacher_params, progress, key):
        teacher_results = teacher_pass(teacher_params, batch)
        (loss, metrics), grads = grad_fn(trainable, batch, teacher_results, progress, key)
        return loss, metrics, grads

    def step(state: TrainState, teacher_params, batch):
        progress = _progress(state, total_steps)
        trainable = state.trainable
        if grad_accum == 1:
            loss, metrics, grads = micro_step(trainable, batch, teacher_params, progress, dropout_key(state, 0))
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def body(carry, xs):
                mb, index = xs
                loss_acc, metrics_acc, grads_acc = carry
                loss, metrics, grads = micro_step(trainable, mb, teacher_params, progress, dropout_key(state, index))
                metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (loss_acc + loss, metrics_acc, grads_acc), None

            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(
                lambda: micro_step(trainable, first, teacher_params, progress, dropout_key(state, 0))[1])
            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
                     jax.tree.map(jnp.zeros_like, trainable))
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
            loss = loss / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        return apply_update(state, grads, loss, metrics, tx=tx, update_mask=update_mask)

    return step


def metric_values(metrics: Mapping[str, tuple]) -> dict[str, float]:
    """`(sum, count)` pairs -> floats (host side)."""
    out = {}
    for k, (s, c) in jax.device_get(dict(metrics)).items():
        out[k] = float(s) / max(float(c), 1e-12)
    return out
