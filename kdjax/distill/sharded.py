"""The distillation step with every input and output placed explicitly on a mesh.

`kdjax.distill.step.build_step` gives a pure ``step(state, teacher_params, batch)``; this module
wraps it in ``jax.jit`` with ``in_shardings`` / ``out_shardings`` for the state, the frozen teacher
parameters and the batch, and donates the state. The same object also carries the *abstract*
inputs (``jax.ShapeDtypeStruct`` with ``sharding=``), so a step can be lowered and compiled for a
mesh of devices that do not exist here (a TPU topology, 64 virtual CPU devices) without a single
weight being allocated -- that is what `kdjax.plan` does -- and it can create real sharded states
for small models, which is what the sharded-vs-single-device tests do::

    sharded = sharded_step(student_cfg, {"teacher": teacher_cfg}, build_method("kd"), mesh,
                           student_rules=DEFAULT_STUDENT_RULES, teacher_rules=DEFAULT_TEACHER_RULES,
                           batch_shape=(8, 128), learning_rate=1e-4, total_steps=1000)
    compiled = sharded.lower().compile()            # abstract inputs only
    state = sharded.init_state(seed=0)              # real, sharded
    teachers = sharded.init_teacher_params(seed=1)
    state, metrics = sharded(state, teachers, sharded.shard_batch(batch))

Placement:

* student parameters and the teacher parameters follow their own logical-axis rules
  (`kdjax.sharding.param_shardings`);
* the optimizer state mirrors the parameters: every AdamW moment takes the sharding of the
  parameter it belongs to (`optax.tree_map_params`); counters and schedule state are replicated;
* the method's modules (learned projections and others), the step counter and the RNG key are replicated (they are small);
* the batch is split over the ``act_batch`` mesh axes; metrics come back replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax import sharding as sharding_lib
from kdjax.distill import stage as stage_lib
from kdjax.distill import step as step_lib
from kdjax.hub.api import abstract_model
from kdjax.methods.base import Method, MethodError, build_method
from kdjax.models.config import ModelConfig
from kdjax.models.taps import TapSpec

__all__ = ["ShardedStep", "batch_fields", "sharded_step", "train_state_layout"]

Rules = sharding_lib.Rules


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _abstract_with(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` carrying the matching leaf of ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _reads_labels(terms: Sequence[Any]) -> bool:
    return any(t.source == "labels" or t.positions == "labeled" for t in terms)


def batch_fields(student: ModelConfig, teachers: Mapping[str, ModelConfig], terms: Sequence[Any],
                 batch_shape: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch a stage reads, as ``{field: ShapeDtypeStruct}`` (int32, no sharding yet).

    ``input_ids`` and ``attention_mask`` always; ``token_type_ids`` when a model has token types
    (BERT); ``labels`` when a term reads them (hard-label CE, or logit terms restricted to labeled
    positions): ``[B, S]`` for token heads, ``[B]`` for a classifier.
    """
    b, s = batch_shape
    fields = {"input_ids": jax.ShapeDtypeStruct((b, s), jnp.int32),
              "attention_mask": jax.ShapeDtypeStruct((b, s), jnp.int32)}
    if student.type_vocab_size or any(t.type_vocab_size for t in teachers.values()):
        fields["token_type_ids"] = jax.ShapeDtypeStruct((b, s), jnp.int32)
    if _reads_labels(terms):
        shape = (b,) if student.head == "classification" else (b, s)
        fields["labels"] = jax.ShapeDtypeStruct(shape, jnp.int32)
    return fields


@dataclasses.dataclass
class ShardedStep:
    """A jitted, explicitly sharded distillation step and everything needed to feed or plan it.

    Attributes:
      jitted: ``jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=0)``.
      step: the pure step function (for an unsharded reference, or another jit).
      mesh: the mesh every sharding lives on.
      student_config / teacher_configs: the models, by `ModelConfig`.
      student_graphdef / teachers: graphdefs and `TeacherSpec`s (with the taps the terms need).
      student_taps, terms, tx: what `build_step` was built from.
      state_shardings: a `TrainState` of shardings; teacher_param_shardings: ``{name: State}``;
      batch_shardings: ``{field: NamedSharding}``; metrics_sharding: replicated.
      abstract_state / abstract_teacher_params / abstract_batch: ``ShapeDtypeStruct``s with
        ``sharding=``, the arguments of `lower`.
    """

    jitted: Callable
    step: Callable
    mesh: Mesh
    student_config: ModelConfig
    teacher_configs: dict[str, ModelConfig]
    student_graphdef: Any
    teachers: list[step_lib.TeacherSpec]
    student_taps: TapSpec
    terms: tuple
    tx: optax.GradientTransformation
    student_rules: Any
    teacher_rules: dict[str, Any]
    strict: bool
    state_shardings: step_lib.TrainState
    teacher_param_shardings: dict[str, Any]
    batch_shardings: dict[str, NamedSharding]
    metrics_sharding: NamedSharding
    abstract_state: step_lib.TrainState
    abstract_teacher_params: dict[str, Any]
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    modules_init: Callable[[jax.Array], Any]

    # ----------------------------------------------------------------------------------------------
    # Compilation.

    def __call__(self, state: step_lib.TrainState, teacher_params: Mapping[str, Any], batch: Mapping[str, Any]):
        return self.jitted(state, dict(teacher_params), dict(batch))

    def lower(self):
        """``jitted.lower`` on the abstract inputs: nothing is allocated, devices may be compile-only."""
        return self.jitted.lower(self.abstract_state, self.abstract_teacher_params, self.abstract_batch)

    # ----------------------------------------------------------------------------------------------
    # Real sharded values (small models; large ones are loaded from checkpoints into these shardings).

    def init_student_params(self, seed: int = 0) -> Any:
        """Freshly initialized student parameters, created already sharded."""
        _, params = sharding_lib.sharded_init(self.student_config, self.mesh, self.student_rules, seed,
                                              strict=self.strict)
        return params

    def init_teacher_params(self, seed: int = 0) -> dict[str, Any]:
        """Randomly initialized teachers (for tests and benchmarks), created already sharded.

        Teacher ``i`` (in `teacher_configs` order) uses seed ``seed + i``.
        """
        out = {}
        for i, (name, config) in enumerate(self.teacher_configs.items()):
            _, out[name] = sharding_lib.sharded_init(config, self.mesh, self.teacher_rules[name], seed + i,
                                                     strict=self.strict)
        return out

    def put_teacher_params(self, teacher_params: Mapping[str, Any]) -> dict[str, Any]:
        """Places existing teacher parameters (``{name: State}``) on the mesh by their rules."""
        missing = sorted(set(self.teacher_configs) - set(teacher_params))
        if missing:
            raise ValueError(f"teacher parameters for {', '.join(map(repr, missing))} are missing; pass one State per "
                             f"teacher in {tuple(self.teacher_configs)}")
        return {name: jax.device_put(teacher_params[name], self.teacher_param_shardings[name])
                for name in self.teacher_configs}

    def init_state(self, seed: int = 0, student_params: Any = None) -> step_lib.TrainState:
        """A fresh sharded `TrainState`: new (or given) student params, the method's modules, optimizer state.

        The RNG key and the projection initialization follow `Distillation.init_state` for stage 0
        (``PRNGKey(seed)``), so a single-device run started from the same parameters matches.
        """
        if student_params is None:
            student_params = self.init_student_params(seed)
        else:
            # A copy on the mesh, so donating the state never invalidates the caller's arrays.
            student_params = jax.tree.map(jnp.copy, jax.device_put(student_params, self.state_shardings.params))
        rng = jax.device_put(jax.random.PRNGKey(seed), self.state_shardings.rng)
        modules = jax.jit(self.modules_init, out_shardings=self.state_shardings.modules)(rng)
        trainable = {"student": student_params, "modules": modules}
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(trainable)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return step_lib.TrainState(step=step, params=student_params, modules=modules, opt_state=opt_state, rng=rng)

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A host batch laid out like `abstract_batch` (fields the step does not read are dropped)."""
        missing = sorted(set(self.abstract_batch) - set(batch))
        if missing:
            raise ValueError(f"batch is missing field(s) {', '.join(missing)} that this step reads; "
                             f"expected {', '.join(self.abstract_batch)}")
        for name, spec in self.abstract_batch.items():
            shape = tuple(np.shape(batch[name]))
            if shape != tuple(spec.shape):
                raise ValueError(f"batch field {name!r} has shape {shape} but the step was built for "
                                 f"{tuple(spec.shape)}; rebuild it with batch_shape={tuple(spec.shape[:2])}")
        host = {name: np.asarray(batch[name], np.int32) for name in self.abstract_batch}
        return sharding_lib.shard_batch(host, self.batch_shardings)


def train_state_layout(tx: optax.GradientTransformation, student_abstract: Any, student_shardings: Any,
                       modules_abstract: Any, mesh: Mesh) -> tuple[step_lib.TrainState, step_lib.TrainState]:
    """``(abstract TrainState, TrainState of shardings)`` for a student laid out by ``student_shardings``.

    Every AdamW moment takes the sharding of the parameter it belongs to (`optax.tree_map_params`);
    the method's modules (projections included), the step counter, the RNG key and the optimizer's counters are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    modules_shardings = jax.tree.map(lambda _: replicated, modules_abstract)
    trainable_abstract = {"student": student_abstract, "modules": modules_abstract}
    trainable_shardings = {"student": student_shardings, "modules": modules_shardings}
    opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_shardings,
                                          transform_non_params=lambda _: replicated, is_leaf=_is_sharding)
    shardings = step_lib.TrainState(step=replicated, params=student_shardings, modules=modules_shardings,
                                    opt_state=opt_shardings, rng=replicated)
    abstract = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=student_abstract,
                                   modules=modules_abstract, opt_state=opt_abstract, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract, shardings


def _per_teacher_rules(teacher_rules: Union[Rules, Mapping[str, Rules]], names: Sequence[str]) -> dict[str, Any]:
    """One rule set for all teachers, or ``{teacher name: rules}``."""
    if isinstance(teacher_rules, Mapping) and teacher_rules and set(teacher_rules) <= set(names) \
            and all(not isinstance(v, (str, type(None))) for v in teacher_rules.values()):
        missing = sorted(set(names) - set(teacher_rules))
        if missing:
            raise ValueError(f"teacher_rules gives rules per teacher but none for {', '.join(map(repr, missing))}; "
                             "give every teacher its rules or pass one rule set for all")
        return {n: teacher_rules[n] for n in names}
    return {n: teacher_rules for n in names}


def _check_batch(batch_shape: Any, grad_accum: int, batch_sharding: NamedSharding) -> tuple[int, int]:
    try:
        b, s = (int(x) for x in batch_shape)
    except (TypeError, ValueError):
        raise ValueError(f"batch_shape={batch_shape!r} must be (global batch size, sequence length)") from None
    if b < 1 or s < 1:
        raise ValueError(f"batch_shape={batch_shape!r} must be positive")
    if grad_accum < 1 or b % grad_accum:
        raise ValueError(f"global batch {b} is not divisible by grad_accum={grad_accum}; use a batch that is a "
                         "multiple of the accumulation factor")
    entry = tuple(batch_sharding.spec)[0] if len(batch_sharding.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
    if b % shards:
        raise ValueError(f"global batch {b} is not divisible by its {shards} shards over mesh axes {axes}; use a "
                         f"batch size that is a multiple of {shards} or a smaller data/fsdp mesh")
    return b, s


def sharded_step(student_config: ModelConfig, teacher_configs: Mapping[str, ModelConfig],
                 method: Union[Method, str, Sequence], mesh: Mesh, *, student_rules: Rules,
                 teacher_rules: Union[Rules, Mapping[str, Rules]], batch_shape: tuple[int, int],
                 learning_rate: float, total_steps: int, grad_accum: int = 1, stage: int = 0,
                 teacher_weights: Optional[Mapping[str, float]] = None, method_args: Optional[Mapping] = None,
                 strict: bool = False, optimizer: Optional[optax.GradientTransformation] = None,
                 max_traces: Optional[int] = None, seed: int = 0, cached_teachers: Optional[Mapping[str, Any]] = None,
                 **optimizer_kwargs: Any) -> ShardedStep:
    """The jitted step of stage ``stage`` of ``method`` for these models on ``mesh``.

    Args:
      student_config: the student architecture (its ``remat_policy`` is the one compiled).
      teacher_configs: ``{name: ModelConfig}``, one entry per teacher (an ensemble is weighted by
        ``teacher_weights``, default equal).
      method: a `Method`, or anything `build_method` accepts (with ``method_args``).
      mesh: the device mesh; teachers and student share it.
      student_rules / teacher_rules: logical-axis rules (`kdjax.sharding`); ``teacher_rules`` may be
        one rule set or ``{teacher name: rules}``. The student's activation rules place the batch.
      batch_shape: ``(global batch, sequence length)`` of one step.
      learning_rate, total_steps, optimizer_kwargs: `make_optimizer` (ignored with ``optimizer``).
      grad_accum: micro-batches per step (the batch is split inside the step).
      strict: a parameter dim that its mesh axes do not divide raises instead of being replicated.
      max_traces: if set, tracing the jitted step more often than this raises
        (`chex.assert_max_traces`): a guard against silent recompiles when shapes or dtypes drift.
      cached_teachers: ``{name: kdjax.knowledge.sparse.CachedTeacherRef}`` for a stage that trains from
        a teacher cache: those teachers have no parameters (``None``) and no forward; the batch carries
        their top-k fields instead.
    """
    if not isinstance(method, Method):
        method = build_method(method, method_args)
    if not 0 <= stage < len(method.stages):
        raise MethodError(f"method {method.name!r} has {len(method.stages)} stage(s); stage={stage} is out of range")
    st = method.stages[stage]
    teacher_configs = dict(teacher_configs)
    if not teacher_configs:
        raise ValueError("teacher_configs is empty; pass {name: ModelConfig} with at least one teacher")
    teacher_configs = {n: teacher_configs[n] for n in stage_lib.stage_teachers(st, list(teacher_configs))}
    student_config = stage_lib.stage_student_config(st, student_config)
    weights = dict(teacher_weights or {})

    t_rules = _per_teacher_rules(teacher_rules, list(teacher_configs))
    sharding_lib.validate_rules(student_rules, mesh)
    for rules in t_rules.values():
        sharding_lib.validate_rules(rules, mesh)

    # Models: graphdefs and abstract parameters only; nothing is allocated.
    student_graphdef, student_abstract = abstract_model(student_config)
    teacher_abstract: dict[str, Any] = {}
    entries = {}
    cached_teachers = dict(cached_teachers or {})
    for name, t_cfg in teacher_configs.items():
        if name in cached_teachers:  # no parameters, no forward: the top-k rows ride in the batch
            graphdef, teacher_abstract[name] = cached_teachers[name], None
        else:
            graphdef, teacher_abstract[name] = abstract_model(t_cfg)
        entries[name] = stage_lib.TeacherEntry(graphdef, t_cfg, float(weights.get(name, 1.0)))
    program = stage_lib.assemble_stage(
        method, stage, student_graphdef=student_graphdef, student_config=student_config,
        student_params=student_abstract, teachers=entries, steps=total_steps,
        optimizer=stage_lib.OptimizerSettings(learning_rate=learning_rate, **optimizer_kwargs),
        grad_accum=grad_accum, seed=seed, tx=optimizer)
    tx, step_fn, teachers, student_taps, terms = (program.tx, program.step_fn, program.teachers, program.student_taps,
                                                  tuple(st.terms))

    # Shardings.
    replicated = NamedSharding(mesh, PartitionSpec())
    student_shardings = sharding_lib.param_shardings(student_abstract, mesh, student_rules, strict=strict)
    teacher_shardings = {name: None if teacher_abstract[name] is None else sharding_lib.param_shardings(
                             teacher_abstract[name], mesh, t_rules[name], strict=strict)
                         for name in teacher_configs}

    modules_init = program.init_modules
    modules_abstract = program.abstract_modules()
    state_abstract, state_shardings = train_state_layout(tx, student_abstract, student_shardings, modules_abstract,
                                                         mesh)

    token_sharding = sharding_lib.batch_sharding(mesh, student_rules)
    b, s = _check_batch(batch_shape, grad_accum, token_sharding)
    fields = batch_fields(student_config, teacher_configs, terms, (b, s))
    for ref in cached_teachers.values():
        ids, lp, tail = ref.fields()
        fields.update({ids: jax.ShapeDtypeStruct((b, s, ref.k), jnp.int32),
                       lp: jax.ShapeDtypeStruct((b, s, ref.k), jnp.float32),
                       tail: jax.ShapeDtypeStruct((b, s), jnp.float32)})
    batch_shardings = {name: sharding_lib._fit_to_rank(token_sharding, len(spec.shape))
                       for name, spec in fields.items()}

    # Both models' residual streams take the shared activation layout (batch over data/fsdp).
    traced_fn = sharding_lib.with_activation_constraints(step_fn, mesh, student_rules)
    if max_traces is not None:
        import chex  # test-and-debug dependency; only needed when the guard is asked for
        traced_fn = chex.assert_max_traces(traced_fn, n=int(max_traces))
    jitted = jax.jit(traced_fn, in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return ShardedStep(
        jitted=jitted, step=step_fn, mesh=mesh, student_config=student_config, teacher_configs=teacher_configs,
        student_graphdef=student_graphdef, teachers=teachers, student_taps=student_taps, terms=terms, tx=tx,
        student_rules=student_rules, teacher_rules=t_rules, strict=strict, state_shardings=state_shardings,
        teacher_param_shardings=teacher_shardings, batch_shardings=batch_shardings, metrics_sharding=replicated,
        abstract_state=_abstract_with(state_abstract, state_shardings),
        abstract_teacher_params={n: None if teacher_abstract[n] is None else
                                 _abstract_with(teacher_abstract[n], teacher_shardings[n]) for n in teacher_configs},
        abstract_batch=_abstract_with(fields, batch_shardings), modules_init=modules_init)
