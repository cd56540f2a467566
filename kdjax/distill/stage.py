"""One place where a stage becomes a program: taps, modules, optimizer, the pure step and eval.

The one-device run (`kdjax.distill.run.Distillation`), the explicitly sharded step
(`kdjax.distill.sharded.sharded_step`) and the planner (`kdjax.plan`) all call `assemble_stage`; they
differ only in where the parameters come from (a checkpoint, a mesh layout, abstract shapes) and how
the step is jitted. So a stage planned for a pod is the stage that runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax.distill import step as step_lib
from kdjax.distill import terms as terms_lib
from kdjax.knowledge import sparse as sparse_lib
from kdjax.methods.base import Method, MethodError, Module, Stage
from kdjax.models.config import ConfigError, ModelConfig
from kdjax.models.taps import TapSpec
from kdjax.models.transformer import forward

log = logging.getLogger("kdjax")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer of a stage; `kdjax.distill.step.make_optimizer` builds it."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0

    def build(self, steps: int, *, learning_rate: Optional[float] = None,
              module_rates: Optional[Mapping[str, float]] = None) -> optax.GradientTransformation:
        warmup = self.warmup_steps or round(self.warmup_ratio * steps)
        return step_lib.make_optimizer(learning_rate=float(learning_rate or self.learning_rate), total_steps=steps,
                                       warmup_steps=int(warmup), schedule=self.schedule,
                                       weight_decay=float(self.weight_decay), max_grad_norm=self.max_grad_norm,
                                       module_rates=module_rates)


@dataclasses.dataclass(frozen=True)
class TeacherEntry:
    """A teacher as a stage needs it: graphdef, config and ensemble weight (parameters come separately)."""

    graphdef: Any
    config: ModelConfig
    weight: float = 1.0


@dataclasses.dataclass
class StageProgram:
    """The compiled-to-be pieces of one stage.

    step_fn: pure `(state, teacher_params, batch) -> (state, metrics)`; eval_fn: pure
    `(params, modules, teacher_params, batch) -> (metrics, student logits)`.
    """

    index: int
    stage: Stage
    steps: int
    teachers: list[step_lib.TeacherSpec]
    student_config: ModelConfig
    student_graphdef: Any
    student_taps: TapSpec
    modules: tuple[Module, ...]
    tx: optax.GradientTransformation
    step_fn: Callable
    eval_fn: Callable
    update_mask: Any
    stage_key: jax.Array

    def init_modules(self, rng: jax.Array) -> dict:
        return terms_lib.init_modules(self.modules, self.student_config, {t.name: t.config for t in self.teachers},
                                      rng)

    def abstract_modules(self) -> Any:
        return jax.eval_shape(self.init_modules, jax.ShapeDtypeStruct((2,), jnp.uint32))


def stage_teachers(stage: Stage, names: Sequence[str]) -> list[str]:
    """The teachers a stage distills from: `stage.teacher`, or every teacher (an ensemble)."""
    names = list(names)
    if not names:
        raise ConfigError("the config names no teacher: set config.teacher.path (a HF directory or hub id)")
    if stage.teacher is None:
        return names
    if stage.teacher in names:
        return [stage.teacher]
    if len(names) == 1:
        log.warning("stage %r asks for teacher %r; using the only teacher %r", stage.name, stage.teacher, names[0])
        return names
    raise ConfigError(f"stage {stage.name!r} needs teacher {stage.teacher!r}; config.teachers has {', '.join(names)}")


def check_cached_stage(method: Method, stage: Stage, ref: "sparse_lib.CachedTeacherRef") -> None:
    """One line when a stage cannot run from a teacher cache (see `kdjax.knowledge.sparse.check_cached_terms`):
    a stage loss or data hook of its own may run the teacher again or change the inputs the cache was
    written for."""
    where = f"the teacher cache of {ref.name!r}"
    if stage.loss is not None or stage.data_hook is not None:
        what = "computes its own loss" if stage.loss is not None else "rewrites its batches (a data hook)"
        raise MethodError(f"stage {stage.name!r} of {method.name!r} {what}, which needs a live teacher; drop "
                          "data.<source>.teacher_cache for it")
    try:
        sparse_lib.check_cached_terms(stage.terms, temperature=ref.temperature, where=where)
    except ValueError as e:
        raise MethodError(f"stage {stage.name!r} of {method.name!r}: {e}") from None


def chain_teachers(method: Method, index: int, names: Sequence[str]) -> list[str]:
    """The teachers stage `index` may use: the config's `names`, then the chain models (`Method.models`)
    whose training stages all come before it (a model becomes a teacher once it is trained)."""
    out = list(names)
    for model in method.models:
        trained_by = [i for i, s in enumerate(method.stages) if s.trains == model.name]
        if trained_by and max(trained_by) < index and model.name not in out:
            out.append(model.name)
    return out


def validate_chain(method: Method, names: Sequence[str]) -> None:
    """One line for a chain that cannot run: an unknown trained model, a name clash, a teacher used
    before it is trained, a chain model derived from one that is not there yet."""
    models = {m.name: m for m in method.models}
    clash = sorted(set(models) & set(names))
    if clash:
        raise ConfigError(f"method {method.name!r} trains {clash[0]!r}, which is also a config teacher; rename the "
                          "teacher in config.teachers")
    order = [s.trains for s in method.stages]
    for name in set(order):
        runs = [i for i, t in enumerate(order) if t == name]
        if runs != list(range(runs[0], runs[-1] + 1)):
            raise MethodError(f"method {method.name!r}: the stages that train {name!r} must be consecutive, got "
                              f"stages {runs}")
    for i, stage in enumerate(method.stages):
        if stage.trains != "student" and stage.trains not in models:
            raise MethodError(f"stage {stage.name!r} trains {stage.trains!r}, which is not in the method's models "
                              f"({', '.join(models) or 'none'}); add ChainModel.make({stage.trains!r}, ...)")
        available = chain_teachers(method, i, names)
        if stage.teacher in models and stage.teacher not in available:
            raise MethodError(f"stage {stage.name!r} distills from {stage.teacher!r} before the stages that train it "
                              "have run; put those stages first")
        if stage.trains != "student" and stage.student_head:
            raise MethodError(f"stage {stage.name!r} trains {stage.trains!r} and switches its head; chain models "
                              "keep the head of the model they are derived from")
    for m in method.models:
        first = [i for i, s in enumerate(method.stages) if s.trains == m.name]
        if not first:
            raise MethodError(f"method {method.name!r} declares model {m.name!r} but no stage trains it")
        source = m.derive_from
        if source is not None and source not in chain_teachers(method, first[0], names):
            raise MethodError(f"model {m.name!r} is derived from {source!r}, which is neither a config teacher "
                              f"({', '.join(names)}) nor a model trained before stage {method.stages[first[0]].name!r}")
    if method.student_from is not None:
        first = [i for i, s in enumerate(method.stages) if s.trains == "student"]
        if first and method.student_from not in chain_teachers(method, first[0], names):
            raise MethodError(f"the student is derived from {method.student_from!r}, which is neither a config "
                              f"teacher ({', '.join(names)}) nor a model trained before the student's first stage")


def chain_layers(model, source_layers: int, student_layers: int) -> int:
    """A chain model's depth: `num_layers`, the length of an explicit layer list, or else halfway
    (rounded up) between its source and the student -- a teacher assistant's size by default."""
    if model.num_layers:
        return int(model.num_layers)
    if not isinstance(model.init, str):
        return len(model.init)
    return max(1, -(-(int(source_layers) + int(student_layers)) // 2))


def chain_model_config(model, source: ModelConfig, student_layers: int) -> ModelConfig:
    """The `ModelConfig` of a `ChainModel` derived from a model of config `source` (no weights)."""
    from kdjax.students import student_config
    return student_config(source, num_layers=chain_layers(model, source.num_layers, student_layers),
                          **dict(model.shape))


def stage_student_config(stage: Stage, student: ModelConfig) -> ModelConfig:
    """The student's config in a stage (a stage may switch the head, e.g. to classification)."""
    if stage.student_head and stage.student_head != student.head:
        return student.replace(head=stage.student_head)
    return student


def stage_key(seed: int, index: int) -> jax.Array:
    """The stage's fixed key for per-step randomness of terms and losses (`TermContext.key`)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x57A6E + index)


def assemble_stage(method: Method, index: int, *, student_graphdef: Any, student_config: ModelConfig,
                   student_params: Any, teachers: Mapping[str, TeacherEntry], steps: int,
                   optimizer: OptimizerSettings, grad_accum: int = 1, vocab_map: Optional[Callable] = None,
                   seed: int = 0, tx: Optional[optax.GradientTransformation] = None) -> StageProgram:
    """Stage `index` of `method` for these models: validated, with its taps, modules, optimizer and step.

    `student_graphdef`/`student_config` already carry the stage's head (`stage_student_config`);
    `student_params` may be abstract (only its structure is read, for a progressive update mask);
    `teachers` are the stage's teachers (`stage_teachers`). `tx` overrides the optimizer.
    """
    if not 0 <= index < len(method.stages):
        raise MethodError(f"method {method.name!r} has {len(method.stages)} stage(s); stage={index} is out of range")
    stage = method.stages[index]
    terms = tuple(stage.terms)
    for name, entry in teachers.items():
        if sparse_lib.is_cached(entry.graphdef):
            check_cached_stage(method, stage, entry.graphdef)
    for entry in teachers.values():
        terms_lib.validate_terms(terms, student_config, entry.config, vocab_map=vocab_map is not None)
    teacher_specs = []
    for name, entry in teachers.items():
        _, t_taps = terms_lib.required_taps(terms, student_config, entry.config)
        teacher_specs.append(step_lib.TeacherSpec(name=name, graphdef=entry.graphdef, config=entry.config,
                                                  taps=t_taps, weight=float(entry.weight)))
    student_taps = terms_lib.student_taps(terms, student_config, [e.config for e in teachers.values()])
    modules = terms_lib.module_specs(terms, stage.modules, student_config,
                                     {n: e.config for n, e in teachers.items()})
    if tx is None:
        rates = {m.name: m.learning_rate for m in modules if m.learning_rate is not None}
        tx = optimizer.build(steps, learning_rate=stage.learning_rate, module_rates=rates)
    update_mask = step_lib.scope_mask(student_params, stage.train_scope)
    key = stage_key(seed, index)
    step_fn = step_lib.build_step(student_graphdef=student_graphdef, student_config=student_config,
                                  student_taps=student_taps, teachers=teacher_specs, terms=terms, tx=tx,
                                  total_steps=steps, grad_accum=grad_accum, update_mask=update_mask,
                                  vocab_map=vocab_map, stage_loss=stage.loss, stage_key=key)
    eval_fn = _build_eval(student_graphdef, student_config, student_taps, teacher_specs, terms, stage.loss,
                          vocab_map, key, steps)
    return StageProgram(index=index, stage=stage, steps=steps, teachers=teacher_specs, student_config=student_config,
                        student_graphdef=student_graphdef, student_taps=student_taps, modules=modules, tx=tx,
                        step_fn=step_fn, eval_fn=eval_fn, update_mask=update_mask, stage_key=key)


def _build_eval(student_graphdef, student_config, student_taps, teachers, terms, stage_loss, vocab_map, key, steps):
    """`(params, modules, teacher_params, batch) -> (metrics, student logits)`: the stage's loss at the end
    of the stage (full logits, no dropout), per teacher when there are several."""
    teacher_pass = step_lib.build_teacher_pass(teachers)

    def eval_fn(params, modules, teacher_params, batch):
        results = teacher_pass(teacher_params, batch)
        ctx = step_lib.StageContext(
            step=jnp.asarray(steps, jnp.int32), progress=jnp.ones((), jnp.float32), stage_key=key, batch=batch,
            params=params, modules=modules, student_graphdef=student_graphdef, student_config=student_config,
            student_taps=student_taps, teachers=teachers, teacher_results=results, teacher_params=teacher_params,
            terms=tuple(terms), vocab_map=vocab_map)
        s_out, s_inter = forward(student_graphdef, params, step_lib.student_view(batch), student_taps)
        ctx._student = (s_out, s_inter)
        if stage_loss is not None:
            loss, metrics = stage_loss(ctx)
            metrics = dict(metrics)
            metrics["loss"] = (loss, jnp.ones((), jnp.float32))
            return metrics, s_out.logits
        metrics: dict = {}
        for t in teachers:
            loss, m = ctx.teacher_loss(t.name)
            m = dict(m)
            m["loss"] = (loss, jnp.ones((), jnp.float32))
            if len(teachers) > 1:
                m = {f"{t.name}/{k}": v for k, v in m.items()}
            metrics = terms_lib.merge_metrics(metrics, m)
        return metrics, s_out.logits

    return eval_fn
