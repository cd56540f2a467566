"""Methods as data: a method is named stages, a stage is weighted knowledge terms.

A `Term` says which knowledge function to apply (`kdjax.knowledge.TERMS`), what it reads from the two
forward passes (`source`), how layers are matched, its weight and arguments. A `Stage` groups terms
with their own step budget, learning rate, data and teacher; a `Method` is a sequence of stages.
Recipes register a builder under a name; `build_method` turns a config entry (a name, or a list of
`(name, weight)` pairs for a GKD-style mix) into a `Method`. Adding a recipe touches only its file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from kdjax.knowledge import registry as _registry

# What a term reads (tap kinds, layer-index space): the one table lives with the knowledge registry.
SOURCES = {name: source.space for name, source in _registry.SOURCES.items()}

Schedule = Union[float, tuple]  # a constant, or ("linear"|"cosine", start, end) over the stage


class MethodError(ValueError):
    """A method name or recipe definition that cannot be built."""


def _freeze(mapping: Optional[Mapping[str, Any]]) -> tuple:
    if not mapping:
        return ()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(mapping).items()))


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted knowledge term: `weight * fn(student_view, teacher_view, mask, **args)`."""

    fn: str
    source: str
    weight: Schedule = 1.0
    layers: Union[str, tuple] = "final"
    args: tuple = ()
    name: Optional[str] = None
    projection: Optional[bool] = None  # None: learn W only when widths differ and the term needs equal widths
    positions: str = "all"  # token-level logit terms: "all" valid tokens or only "labeled" ones (MLM/LM labels)

    @staticmethod
    def make(fn: str, source: str, *, weight: Schedule = 1.0, layers: Union[str, Sequence] = "final",
                      name: Optional[str] = None, projection: Optional[bool] = None, positions: str = "all",
                      **args: Any) -> "Term":
        if source not in SOURCES:
            raise MethodError(f"unknown term source {source!r}; known: {', '.join(SOURCES)}")
        if positions not in ("all", "labeled"):
            raise MethodError(f"positions must be 'all' or 'labeled', got {positions!r}")
        if not isinstance(layers, str):
            layers = tuple(tuple(int(x) for x in p) for p in layers)
        return Term(fn=fn, source=source, weight=weight, layers=layers, args=_freeze(args), name=name or fn,
                                projection=projection, positions=positions)

    @property
    def kwargs(self) -> dict:
        return dict(self.args)

    @property
    def space(self) -> Optional[str]:
        return _registry.SOURCES[self.source].space

    def replace(self, **changes: Any) -> "Term":
        if "args" in changes and isinstance(changes["args"], Mapping):
            changes["args"] = _freeze(changes["args"])
        return dataclasses.replace(self, **changes)

    def with_args(self, **args: Any) -> "Term":
        return self.replace(args=_freeze({**self.kwargs, **args}))


@dataclasses.dataclass(frozen=True)
class Module:
    """Learnable parameters owned by a method: trained with the student, checkpointed, never exported.

    `init(key, student_config, {teacher name: teacher_config}) -> params` (a pytree of float arrays).
    Terms and the stage's `loss` read them as `ctx.modules[name]`. `learning_rate`: None trains the
    module at the stage's rate and schedule; a number gives it its own (same warmup and decay shape).
    They are replicated on a mesh (small by design).
    """

    name: str
    init: Callable[..., Any]
    learning_rate: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """Terms trained together, with an optional step budget, learning rate, data and teacher of their own.

    Dynamic methods add, each optional:
      modules: learnable `Module`s of the method (besides the automatic width projections).
      loss: `loss(sctx: kdjax.distill.step.StageContext) -> (loss, metrics)` replaces the default
        weighted sum over teachers and terms, inside the jitted step: it may run the student more than
        once (with forward hooks), weight or route examples between teachers with per-example losses,
        and read the step, progress and per-step keys. See docs/writing_a_method.md.
      data_hook: a `kdjax.distill.hooks.DataHook` that rewrites each batch on the host before the step
        (e.g. student or teacher sampling), with its own RNG stream and checkpointed state.
    """

    name: str
    terms: tuple[Term, ...]
    steps: Optional[int] = None  # None: config.train.steps
    learning_rate: Optional[float] = None  # None: config.train.learning_rate
    data: str = "train"  # which config.data entry feeds the stage ("train", or e.g. "corpus" / "task")
    teacher: Optional[str] = None  # a key of config.teachers; None: every teacher, weighted
    student_head: Optional[str] = None  # switch the student head for this stage (e.g. "classification")
    train_scope: str = "all"  # "all" parameters, or "progressive:<layer>" (MobileBERT) freezes others
    modules: tuple = ()
    loss: Optional[Callable[..., Any]] = None
    data_hook: Any = None
    trains: str = "student"  # the model this stage trains: the student, or a `Method.models` entry by name


@dataclasses.dataclass(frozen=True)
class ChainModel:
    """A model a method trains besides the student (a teacher assistant), then distills from.

    Stages with `trains=name` train it; from the end of the last such stage on, its parameters are a
    frozen teacher called `name` of every later stage. It is derived like a student
    (`kdjax.students.student_from`) from `derive_from` -- a config teacher or an earlier chain model;
    None: the first teacher -- when its first stage starts. `shape` holds further `student_from` fields
    (hidden_size, num_heads, intermediate_size, ...). `weight` is its ensemble weight as a teacher.
    """

    name: str
    num_layers: Optional[int] = None
    init: Union[str, tuple] = "uniform"
    derive_from: Optional[str] = None
    shape: tuple = ()
    weight: float = 1.0
    seed: int = 0

    @staticmethod
    def make(name: str, *, num_layers: Optional[int] = None, init: Union[str, Sequence[int]] = "uniform",
             derive_from: Optional[str] = None, weight: float = 1.0, seed: int = 0, **shape: Any) -> "ChainModel":
        if name == "student":
            raise MethodError("a chain model cannot be called 'student' (that is the run's student)")
        return ChainModel(name=name, num_layers=None if num_layers is None else int(num_layers),
                          init=init if isinstance(init, str) else tuple(int(i) for i in init),
                          derive_from=derive_from, shape=_freeze(shape), weight=float(weight), seed=int(seed))


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    student_init: Union[str, tuple] = "uniform"
    models: tuple = ()  # `ChainModel`s trained by stages with `trains=<name>` (e.g. a teacher assistant)
    student_from: Optional[str] = None  # derive the student from this teacher or chain model (None: first teacher)

    def stage(self, index: int) -> Stage:
        return self.stages[index]


Builder = Callable[..., Method]
_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Register a recipe builder `fn(**args) -> Method` under `name`."""

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name][0] is not fn:
            raise MethodError(f"method {name!r} is registered twice")
        _REGISTRY[name] = (fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def _load_recipes() -> None:
    import kdjax.methods as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base",):
            importlib.import_module(f"kdjax.methods.{info.name}")


def known_methods(shipped_only: bool = False) -> dict[str, str]:
    """Registered recipe names -> one-line descriptions (`shipped_only`: those defined inside kdjax)."""
    _load_recipes()
    return {k: v[1] for k, v in sorted(_REGISTRY.items())
            if not shipped_only or v[0].__module__.startswith("kdjax.")}


def get_method(name: str, **args: Any) -> Method:
    _load_recipes()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name][0](**args)
    except TypeError as e:
        raise MethodError(f"method {name!r}: {e}") from None


def combine(parts: Sequence[tuple[Method, float]], name: Optional[str] = None) -> Method:
    """GKD's mix: stage i of the result sums stage i of every part, each term scaled by its part's weight.

    Single-stage parts join every stage of a multi-stage part.
    """
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    depth = max(len(m.stages) for m, _ in parts)
    for m, _ in parts:
        if len(m.stages) not in (1, depth):
            raise MethodError(f"cannot mix {m.name!r} ({len(m.stages)} stages) with a {depth}-stage method")
    stages = []
    for i in range(depth):
        terms = []
        base = None
        for m, w in parts:
            st = m.stages[i if len(m.stages) > 1 else 0]
            if len(m.stages) == depth and base is None:
                base = st
            for t in st.terms:
                weight = t.weight * w if isinstance(t.weight, (int, float)) else (t.weight[0], t.weight[1] * w,
                                                                                                                                                      t.weight[2] * w)
                terms.append(t.replace(weight=weight, name=f"{m.name}/{t.name}"))
        stages.append(dataclasses.replace(base, terms=tuple(terms)))
    return Method(name=name or "+".join(m.name for m, _ in parts), stages=tuple(stages),
                                description="mix of " + ", ".join(f"{w}×{m.name}" for m, w in parts),
                                student_init=parts[0][0].student_init, models=parts[0][0].models,
                                student_from=parts[0][0].student_from)


def build_method(spec: Any, args: Optional[Mapping[str, Any]] = None) -> Method:
    """A `Method` from a config entry: `"tinybert"`, `"minilmv2+kd*0.5"` or `[("minilmv2", 1.0), ("kd", 0.5)]`.

    `args` maps method name -> keyword arguments for its builder (always keyed by name, so that no
    argument is mistaken for a method's arguments or silently dropped).
    """
    args = dict(args or {})
    if isinstance(spec, str) and "+" in spec:
        # "minilmv2+unified" or "kd*0.5+minilmv2": a mix written as one string (config-flag friendly).
        spec = [(p.split("*")[0].strip(), float(p.split("*")[1]) if "*" in p else 1.0) for p in spec.split("+")]
    names = [spec] if isinstance(spec, str) else [item if isinstance(item, str) else item[0] for item in spec]
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise MethodError(f"method_args is keyed by method name ({', '.join(names)}), got key(s) "
                          f"{', '.join(map(repr, unknown))}; write e.g. method_args={{{names[0]!r}: {{...}}}}")
    if isinstance(spec, str):
        return get_method(spec, **dict(args.get(spec, {})))
    parts = []
    for item in spec:
        if isinstance(item, str):
            name, weight = item, 1.0
        else:
            name, weight = item[0], float(item[1])
        parts.append((get_method(name, **dict(args.get(name, {}))), weight))
    return combine(parts)
