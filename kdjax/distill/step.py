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
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax.distill import terms as terms_lib
from kdjax.knowledge import registry
from kdjax.knowledge import sparse as sparse_lib
from kdjax.knowledge.registry import TermContext
from kdjax.methods.base import MethodError, Term
from kdjax.models.config import ModelConfig
from kdjax.models.taps import Intermediates, TapSpec
from kdjax.models.transformer import forward, split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes. `params` is the student; `modules` the method's learnable modules
    (`{module name: params}`, width projections included), trained with it and never exported."""

    step: jax.Array
    params: Any
    modules: Any
    opt_state: Any
    rng: jax.Array

    @property
    def trainable(self) -> dict:
        return {"student": self.params, "modules": self.modules}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    name: str
    graphdef: Any
    config: ModelConfig
    taps: TapSpec
    weight: float = 1.0


def _learning_rate(learning_rate: float, total_steps: int, warmup_steps: int, schedule: str):
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
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    return decay


def decay_mask(trainable):
    """True for the parameters that get weight decay: matrices (kernels, embeddings), not biases or norm
    scales. Stacked layers carry a leading layer axis, so there a matrix has three dimensions."""
    def leaf(path, x):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        stacked = len(keys) > 1 and keys[0] == "student" and keys[1] == "layers"
        return x.ndim > (2 if stacked else 1)
    return jax.tree_util.tree_map_with_path(leaf, trainable)


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "linear",
                   weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8,
                   module_rates: Optional[Mapping[str, float]] = None) -> optax.GradientTransformation:
    """AdamW with linear warmup then linear/cosine/constant decay, global-norm clipping (off with
    `max_grad_norm=None`), and weight decay on matrices only (`decay_mask`).

    `module_rates` gives method modules (`{"modules": {name: ...}}` in the trainable tree) a peak learning
    rate of their own, with the same warmup and decay shape; everything else trains at `learning_rate`.
    """
    def adamw(rate):
        return optax.adamw(_learning_rate(rate, total_steps, warmup_steps, schedule), b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=decay_mask)

    chain = []
    if max_grad_norm:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    rates = dict(module_rates or {})
    if not rates:
        chain.append(adamw(learning_rate))
        return optax.chain(*chain)

    def labels(trainable):
        out = {k: jax.tree.map(lambda _: "default", v) for k, v in trainable.items()}
        out["modules"] = {name: jax.tree.map(lambda _, n=name: f"module:{n}" if n in rates else "default", tree)
                          for name, tree in trainable.get("modules", {}).items()}
        return out

    transforms = {"default": adamw(learning_rate), **{f"module:{n}": adamw(r) for n, r in rates.items()}}
    chain.append(optax.multi_transform(transforms, labels))
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
    if "student_attention_mask" in batch:  # another tokenization of the same text (cross-tokenizer methods)
        view["attention_mask"] = batch["student_attention_mask"]
    return view


def trunk_forward(graphdef, params, batch: Mapping[str, Any], taps: Any = None, dropout_key=None, hooks=None):
    """`forward` without the LM head: `outputs.logits` is None, `outputs.last_hidden_state` is set.

    The model is re-split with a `base` head config, so the head's parameters stay in `params` (same
    tree, same arrays: gradients flow to the trunk as before) but the head is not applied.
    """
    model = nnx.merge(graphdef, params)
    if model.config.head not in terms_lib.LM_HEADS:
        return forward(graphdef, params, batch, taps, dropout_key, hooks=hooks)
    model.config = model.config.replace(head="base")
    trunk_graphdef, trunk_params = split(model)
    return forward(trunk_graphdef, trunk_params, batch, taps, dropout_key, hooks=hooks)


def _chunking(terms: Sequence[Term]) -> bool:
    return any(terms_lib.logit_chunk_size(t) is not None for t in terms)


def build_teacher_pass(teachers: Sequence[TeacherSpec], terms: Sequence[Term] = (), *,
                       truncate: bool = False) -> Callable:
    """`(teacher_params, batch) -> {name: (outputs, intermediates)}`, frozen (`stop_gradient`).

    With chunked logit terms among `terms`, each entry is `(outputs, intermediates, params)`: the
    teacher's parameters travel along for the per-chunk head, and its forward skips the LM head unless
    an unchunked term reads the teacher's logits. `truncate`: the caller reads only the teachers' taps
    (`terms.teacher_outputs_needed` is False), so each teacher stops after its last tapped layer and
    returns empty outputs.

    A cache-backed teacher (its graphdef a `kdjax.knowledge.sparse.CachedTeacherRef`) runs nothing: its
    entry is `(CachedLogits, empty Intermediates)` read from the batch's `teacher_topk_*` fields
    (docs/cache.md, "Training from a cache").
    """
    chunking = _chunking(terms)
    full_logits = terms_lib.logits_needed(terms)[1] if chunking else True

    def teacher_pass(teacher_params: Mapping[str, Any], batch):
        results = {}
        for t in teachers:
            if sparse_lib.is_cached(t.graphdef):  # a cache-backed teacher: its top-k rows ride in the batch
                results[t.name] = jax.lax.stop_gradient((t.graphdef.outputs(batch), Intermediates()))
                continue
            with jax.named_scope(f"teacher_{t.name}"):
                if truncate:
                    out, inter = forward(t.graphdef, teacher_params[t.name], batch, t.taps, outputs=False)
                else:
                    run = forward if full_logits else trunk_forward
                    out, inter = run(t.graphdef, teacher_params[t.name], batch, t.taps)
            result = (out, inter, teacher_params[t.name]) if chunking else (out, inter)
            results[t.name] = jax.lax.stop_gradient(result)
        return results

    return teacher_pass


def _batch_axes(tree: Any) -> Any:
    """vmap axes of the batch dimension: 1 for per-layer taps (stacked on a layer axis), else 0."""
    if isinstance(tree, Intermediates):
        return dataclasses.replace(tree, **{k: (0 if k in ("embeddings", "logits") else 1)
                                            for k in tree.requested()})
    return jax.tree.map(lambda _: 0, tree)


@dataclasses.dataclass
class StageContext:
    """The student side of one step, as a stage's `loss` sees it (inside `jit` and `value_and_grad`).

    The default loss is `default_loss()`: Σ_teachers w_t/Σw · Σ_terms weight·term on one student
    forward. A method's `Stage.loss` may instead run the student again with forward hooks
    (`student_forward(hooks=...)`), read its modules (`modules`), compute per-example losses of each
    teacher (`per_example`) to weight or route examples, and draw per-step randomness (`key`).
    """

    step: jax.Array
    progress: jax.Array
    stage_key: jax.Array
    batch: Mapping[str, Any]
    params: Any
    modules: Mapping[str, Any]
    student_graphdef: Any
    student_config: ModelConfig
    student_taps: TapSpec
    teachers: Sequence[TeacherSpec]
    teacher_results: Mapping[str, tuple]
    teacher_params: Mapping[str, Any]
    terms: tuple
    vocab_map: Optional[Callable] = None
    dropout_key: Optional[jax.Array] = None
    _student: Optional[tuple] = None

    # -- helpers -------------------------------------------------------------------------------------
    def key(self, name: str, every: int = 1) -> jax.Array:
        """A key for `name` that changes every `every` steps (a function of the step count: resumable)."""
        base = jax.random.fold_in(self.stage_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        return jax.random.fold_in(base, self.step // max(int(every), 1))

    @property
    def chunking(self) -> bool:
        return _chunking(self.terms) and all(len(self.teacher_results[t.name]) == 3 for t in self.teachers)

    @property
    def teacher_weights(self) -> dict[str, float]:
        total = sum(t.weight for t in self.teachers) or 1.0
        return {t.name: t.weight / total for t in self.teachers}

    # -- forwards ------------------------------------------------------------------------------------
    def student_forward(self, batch: Optional[Mapping[str, Any]] = None, *, hooks: Any = None, taps: Any = None,
                        params: Any = None, dropout: bool = True):
        """`(outputs, intermediates)` of the student (differentiated) on `batch` (default: the step's), with
        optional forward hooks (`kdjax.models.transformer.ForwardHooks`) and taps (default: the stage's)."""
        view = student_view(self.batch if batch is None else batch)
        run = trunk_forward if self.chunking and not terms_lib.logits_needed(self.terms)[0] else forward
        return run(self.student_graphdef, self.params if params is None else params, view,
                   self.student_taps if taps is None else taps, self.dropout_key if dropout else None, hooks=hooks)

    def student(self):
        """The stage's student forward on the step's batch, computed once."""
        if self._student is None:
            self._student = self.student_forward()
        return self._student

    def teacher_forward(self, name: str, batch: Optional[Mapping[str, Any]] = None, *, hooks: Any = None,
                        taps: Any = None):
        """A frozen extra forward of teacher `name` (e.g. on an intervened batch)."""
        spec = next(t for t in self.teachers if t.name == name)
        out = forward(spec.graphdef, self.teacher_params[name], self.batch if batch is None else batch,
                      spec.taps if taps is None else taps, hooks=hooks)
        return jax.lax.stop_gradient(out)

    # -- losses --------------------------------------------------------------------------------------
    def term_context(self, name: str, s_out=None, s_inter=None, *, batch=None) -> TermContext:
        """The `TermContext` of teacher `name` against a student forward (default: `student()`)."""
        if s_out is None:
            s_out, s_inter = self.student()
        spec = next(t for t in self.teachers if t.name == name)
        t_out, t_inter, *t_params = self.teacher_results[name]
        chunking = self.chunking
        batch = self.batch if batch is None else batch
        return TermContext(
            step=self.step, progress=self.progress, stage_key=self.stage_key, batch=student_view(batch),
            student=self.student_config, teacher=spec.config, teacher_name=name, s_out=s_out, s_inter=s_inter,
            t_out=t_out, t_inter=t_inter, modules=self.modules,
            student_head=terms_lib.lm_head(self.student_graphdef, self.params) if chunking else None,
            teacher_head=terms_lib.lm_head(spec.graphdef, t_params[0]) if chunking else None,
            vocab_map=self.vocab_map, teacher_batch=batch)

    def teacher_loss(self, name: str, s_out=None, s_inter=None, terms: Optional[Sequence[Term]] = None):
        """(Σ weight·term, metrics) of the stage's terms (or `terms`) against teacher `name`."""
        return terms_lib.terms_loss(self.term_context(name, s_out, s_inter), self.terms if terms is None else terms)

    def per_example(self, name: str, s_out=None, s_inter=None, terms: Optional[Sequence[Term]] = None) -> jax.Array:
        """`[B]`: the weighted term sum against teacher `name`, computed for each example on its own.

        Token-level terms average over that example's valid tokens (so the batch mean of these values
        weights examples equally, not by token count). Terms that couple the batch (sample relations,
        contrastive) have no per-example value and are refused.
        """
        terms = tuple(self.terms if terms is None else terms)
        coupled = [t.name for t in terms if not registry.get(t.fn).per_token]
        if coupled:
            raise MethodError(f"per-example losses are undefined for batch-coupled terms: {', '.join(coupled)}")
        if s_out is None:
            s_out, s_inter = self.student()
        t_out, t_inter = self.teacher_results[name][:2]

        def one(s_out, s_inter, t_out, t_inter, batch):
            expand = lambda tree: jax.tree.map(lambda x, a: jnp.expand_dims(x, a), tree, _batch_axes(tree))  # noqa: E731
            ctx = dataclasses.replace(self, teacher_results={**self.teacher_results,
                                                             name: (expand(t_out), expand(t_inter),
                                                                    *self.teacher_results[name][2:])})
            return terms_lib.terms_loss(ctx.term_context(name, expand(s_out), expand(s_inter),
                                                         batch=expand(batch)), terms)[0]

        return jax.vmap(one, in_axes=(_batch_axes(s_out), _batch_axes(s_inter), _batch_axes(t_out),
                                      _batch_axes(t_inter), 0))(s_out, s_inter, t_out, t_inter, dict(self.batch))

    def default_loss(self):
        """Σ_teachers (w_t / Σw) · Σ_terms weight·term; metrics prefixed by teacher when there are several."""
        total = jnp.zeros((), jnp.float32)
        metrics: dict = {}
        for name, weight in self.teacher_weights.items():
            loss, m = self.teacher_loss(name)
            total = total + weight * loss
            if len(self.teachers) > 1:
                m = {f"{name}/{k}": v for k, v in m.items()}
            metrics = terms_lib.merge_metrics(metrics, m)
        return total, metrics


def build_loss_fn(*, student_graphdef, student_config: ModelConfig, student_taps: TapSpec,
                  teachers: Sequence[TeacherSpec], terms: Sequence[Term], vocab_map=None,
                  stage_loss: Optional[Callable] = None, stage_key: Optional[jax.Array] = None) -> Callable:
    """`(trainable, batch, teacher_results, step, progress, dropout_key, teacher_params) -> (loss, metrics)`:
    the student side of a step; `stage_loss(StageContext)` replaces the default weighted sum."""
    terms = tuple(terms)
    key0 = jax.random.PRNGKey(0) if stage_key is None else stage_key

    def loss_fn(trainable, batch, teacher_results, step, progress, dropout_key=None, teacher_params=None):
        ctx = StageContext(step=step, progress=progress, stage_key=key0, batch=batch, params=trainable["student"],
                           modules=trainable["modules"], student_graphdef=student_graphdef,
                           student_config=student_config, student_taps=student_taps, teachers=teachers,
                           teacher_results=teacher_results, teacher_params=teacher_params or {}, terms=terms,
                           vocab_map=vocab_map, dropout_key=dropout_key)
        with jax.named_scope("student"):
            return stage_loss(ctx) if stage_loss is not None else ctx.default_loss()

    return loss_fn


def apply_update(state: TrainState, grads, loss, metrics, *, tx: optax.GradientTransformation,
                 update_mask=None) -> tuple[TrainState, dict]:
    """Masked optimizer update of (student, modules) and the step's `loss`/`grad_norm` metrics."""
    trainable = state.trainable
    if update_mask is not None:
        grads = {**grads, "student": jax.tree.map(jnp.multiply, grads["student"], update_mask)}
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    if update_mask is not None:
        updates = {**updates, "student": jax.tree.map(jnp.multiply, updates["student"], update_mask)}
    new = optax.apply_updates(trainable, updates)
    metrics = dict(metrics)
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    metrics["grad_norm"] = (optax.tree.norm(grads), jnp.ones((), jnp.float32))
    new_state = TrainState(step=state.step + 1, params=new["student"], modules=new["modules"], opt_state=opt_state,
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
        (loss, metrics), grads = grad_fn(state.trainable, batch, teacher_results, state.step,
                                         _progress(state, total_steps), dropout_key(state, 0))
        return apply_update(state, grads, loss, metrics, tx=tx, update_mask=update_mask)

    return student_step


def build_step(*, student_graphdef, student_config: ModelConfig, student_taps: TapSpec,
               teachers: Sequence[TeacherSpec], terms: Sequence[Term], tx: optax.GradientTransformation,
               total_steps: int, grad_accum: int = 1, update_mask=None, vocab_map=None,
               stage_loss: Optional[Callable] = None, stage_key: Optional[jax.Array] = None) -> Callable:
    """The pure step function for one stage (jit it with the shardings of the caller's choice)."""
    teacher_pass = build_teacher_pass(teachers, terms,
                                      truncate=not terms_lib.teacher_outputs_needed(terms, stage_loss))
    grad_fn = jax.value_and_grad(build_loss_fn(
        student_graphdef=student_graphdef, student_config=student_config, student_taps=student_taps,
        teachers=teachers, terms=terms, vocab_map=vocab_map, stage_loss=stage_loss, stage_key=stage_key),
        has_aux=True)

    def micro_step(trainable, batch, teacher_params, step, progress, key):
        teacher_results = teacher_pass(teacher_params, batch)
        (loss, metrics), grads = grad_fn(trainable, batch, teacher_results, step, progress, key, teacher_params)
        return loss, metrics, grads

    def step(state: TrainState, teacher_params, batch):
        progress = _progress(state, total_steps)
        trainable = state.trainable
        if grad_accum == 1:
            loss, metrics, grads = micro_step(trainable, batch, teacher_params, state.step, progress,
                                              dropout_key(state, 0))
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def body(carry, xs):
                mb, index = xs
                loss_acc, metrics_acc, grads_acc = carry
                loss, metrics, grads = micro_step(trainable, mb, teacher_params, state.step, progress,
                                                  dropout_key(state, index))
                metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (loss_acc + loss, metrics_acc, grads_acc), None

            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(
                lambda: micro_step(trainable, first, teacher_params, state.step, progress, dropout_key(state, 0))[1])
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
