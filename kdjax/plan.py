"""Ahead-of-time plan: compile the real distillation step for a target topology and report its memory.

Before renting a pod, compile the step you will run there and read XLA's own per-device memory
accounting::

    python -m kdjax.plan --config=configs/scale_100b.py --topology=v5p:4x4x4
    python -m kdjax.plan --config=configs/scale_100b.py --topology=cpu:8 --device_memory_gb=80
    python -m kdjax.plan --config=configs/scale_100b.py --topology=v5e:4x4 --search

The program lowered is the same one training runs (`kdjax.distill.sharded.sharded_step` around
`kdjax.distill.step.build_step`): teacher forward(s), student forward/backward, the loss terms of
the method and the AdamW update, with the train state donated. Every input is a
``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``, so no weight is ever allocated: a 100B
teacher plans on a laptop.

Topologies:

* ``v4:AxBxC``, ``v5p:AxBxC``, ``v5e:AxB``, ``v6e:AxB`` -- a real TPU slice described by libtpu
  (`jax.experimental.topologies.get_topology_desc`), compiled by the real TPU compiler
  (``pip install libtpu``; no TPU needed). The shape counts chips; per-chip HBM is known.
* ``cpu:N`` -- N virtual CPU devices (``--xla_force_host_platform_device_count``; the CLI sets it
  before JAX starts), standing in for an N-accelerator box whose memory ``--device_memory_gb``
  gives, e.g. ``cpu:8 --device_memory_gb=40`` for 8 x A100-40GB. The CPU compiler's buffer
  assignment is not a GPU's, so treat the numbers as an estimate of the sharded footprint (compiled
  with `CPU_COMPILER_OPTIONS`, so bf16 layer stacks are not counted again as float32 copies).

The report gives XLA's per-device argument / output / alias / temp / generated-code bytes and their
total ``argument + output - alias + temp + code`` (donated state outputs alias their inputs), the
device memory and FITS / DOES NOT FIT; the CLI exits 0 when it fits, 1 when it does not, 2 on bad
input. ``--search`` compiles every fsdp x tensor factorization of the device count with the remat
policies ``none``, ``dots_no_batch`` and ``full`` and reports, among those that fit, the one with the
fastest predicted step. Every plan also prints a roofline ESTIMATE of the step time, tokens/s and MFU
from the compiled program and the chip's published peaks (`kdjax.roofline`, docs/roofline.md).

Configs describe models by `ModelConfig` fields -- no checkpoint is read::

    config.teacher.model = dict(model_type="llama", num_layers=80, hidden_size=10240, ...)
    config.student.model = dict(model_type="llama", num_layers=16, hidden_size=2048, ...)
    config.teacher.rules = dict(vocab="tensor")   # optional overrides of DEFAULT_TEACHER_RULES
    config.student.rules = dict(vocab="tensor")   # optional overrides of DEFAULT_STUDENT_RULES

with the batch from ``config.data.train`` (``batch_size`` x ``max_length``), the mesh from
``config.mesh``, the optimizer from ``config.train`` and ``config.plan`` (``stage``, ``strict``).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections

from kdjax import roofline as roofline_lib
from kdjax import config as config_lib
from kdjax import sharding as sharding_lib
from kdjax.distill import run as run_lib
from kdjax.distill import stage as stage_lib
from kdjax.distill.sharded import ShardedStep, sharded_step
from kdjax.methods.base import build_method
from kdjax.models.config import ConfigError, ModelConfig, preset
from kdjax.students import student_config

__all__ = ["CPU_COMPILER_OPTIONS", "GIB", "MemoryUse", "PlanError", "PlanResult", "TPU_GENERATIONS",
           "TOPOLOGY_FORMS", "Topology", "compiler_options", "format_result", "get_topology", "models_from_config",
           "parse_topology", "plan", "plan_step", "search", "search_candidates"]

GIB = 1024 ** 3
REMAT_SEARCH = ("none", "dots_no_batch", "full")
# XLA's CPU compiler has no 16-bit float dynamic-slice: its float normalization converts a scanned
# bf16 layer stack to float32 inside the loop body, and loop-invariant code motion then hoists that
# convert out of the loop, so a cpu:N plan held every bf16 stack a second time at twice the size
# (2x a bf16 teacher's shard of temporaries). GPUs and TPUs slice bf16 in place. Without the hoisting,
# the convert fuses into each layer's slice and the plan counts one layer's float32 copy, as an
# accelerator would hold one layer's slice. Plans never execute, so the slower loop costs nothing.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
TOPOLOGY_FORMS = "cpu:N (with --device_memory_gb), v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB"


class PlanError(ValueError):
    """A plan request that cannot be carried out (bad topology, missing config field, ...)."""


# --------------------------------------------------------------------------------------------------
# Topologies.


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What libtpu needs to describe a slice of one TPU generation, and its per-chip memory."""

    name: str
    dims: int  # torus rank of the topology string
    hbm_gib: float
    chip_config: str  # "megacore": one JAX device per chip (v4, v5p); "default": one core per chip
    accelerator_prefix: str  # TPU_ACCELERATOR_TYPE spelling, e.g. "v5p" -> "v5p-128"
    cores_per_chip: int  # the accelerator-type suffix counts TensorCores

    def accelerator_type(self, chips: int) -> str:
        return f"{self.accelerator_prefix}-{chips * self.cores_per_chip}"


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 3, 32.0, "megacore", "v4", 2),
    "v5p": TpuGeneration("v5p", 3, 95.0, "megacore", "v5p", 2),
    "v5e": TpuGeneration("v5e", 2, 16.0, "default", "v5litepod", 1),
    "v6e": TpuGeneration("v6e", 2, 32.0, "default", "v6e", 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """A parsed topology name: ``platform`` "cpu" (``shape=(N,)``) or "tpu" (chip grid)."""

    name: str
    platform: str
    generation: Optional[str]
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class Topology:
    """Devices to compile for, and how much memory each has."""

    spec: TopologySpec
    devices: list
    device_memory_bytes: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device_kind(self) -> str:
        return str(getattr(self.devices[0], "device_kind", self.spec.platform))


def parse_topology(name: str) -> TopologySpec:
    """``"v5p:4x4x4"`` -> TopologySpec; one-line `PlanError` listing the accepted forms otherwise."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):([0-9x]+)", text)
    if not m:
        raise PlanError(f"unknown topology {name!r}; accepted forms: {TOPOLOGY_FORMS}")
    kind, dims = m.group(1), m.group(2)
    if kind == "cpu":
        if not dims.isdigit() or int(dims) < 1:
            raise PlanError(f"topology {name!r}: cpu takes a device count, e.g. cpu:8")
        return TopologySpec(text, "cpu", None, (int(dims),))
    kind = _ALIASES.get(kind, kind)
    if kind not in TPU_GENERATIONS:
        raise PlanError(f"unknown topology {name!r} (TPU generation {m.group(1)!r} is not one of "
                        f"{', '.join(TPU_GENERATIONS)}); accepted forms: {TOPOLOGY_FORMS}")
    gen = TPU_GENERATIONS[kind]
    parts = dims.split("x")
    if len(parts) != gen.dims or not all(p.isdigit() and int(p) > 0 for p in parts):
        example = "x".join(["4"] * gen.dims)
        raise PlanError(f"topology {name!r}: {kind} takes {gen.dims} chip dimensions like {kind}:{example}; "
                        f"accepted forms: {TOPOLOGY_FORMS}")
    shape = tuple(int(p) for p in parts)
    return TopologySpec(f"{kind}:{'x'.join(map(str, shape))}", "tpu", kind, shape)


def _cpu_device_flag() -> Optional[int]:
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None


def _tpu_devices(spec: TopologySpec) -> list:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"topology {spec.name!r} needs libtpu to describe the TPU (no TPU is used): "
                        "pip install libtpu; or plan on cpu:N with --device_memory_gb")
    gen = TPU_GENERATIONS[spec.generation]
    # libtpu reads these when it first loads: a single local "host", and an accelerator type so it
    # does not probe cloud metadata (and stays quiet). Multiple loads must be allowed because a
    # test process or a notebook may already hold the lock file.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", gen.accelerator_type(spec.num_chips))
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.name,
                                            chip_config_name=gen.chip_config)
    except Exception as e:  # libtpu errors are long status strings
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"libtpu could not describe topology {spec.name!r}: {first}") from None
    return list(desc.devices)


def get_topology(name: str, device_memory_gb: Optional[float] = None) -> Topology:
    """Compile-only devices for ``name`` and their memory (``device_memory_gb`` GiB overrides the HBM)."""
    spec = parse_topology(name)
    if device_memory_gb is not None and not device_memory_gb > 0:
        raise PlanError(f"--device_memory_gb={device_memory_gb} must be positive")
    if spec.platform == "cpu":
        if device_memory_gb is None:
            raise PlanError(f"topology {spec.name!r} has no known device memory; give --device_memory_gb "
                            "(e.g. 40 for A100-40GB, 80 for H100-80GB)")
        n = spec.shape[0]
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise PlanError(f"topology {spec.name!r} needs {n} CPU devices but this process has {len(devices)}; "
                            f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                            "(python -m kdjax.plan does this)")
        return Topology(spec, list(devices[:n]), int(device_memory_gb * GIB))
    devices = _tpu_devices(spec)
    hbm = device_memory_gb if device_memory_gb is not None else TPU_GENERATIONS[spec.generation].hbm_gib
    return Topology(spec, devices, int(hbm * GIB))


def compiler_options(topology: Topology) -> dict[str, str]:
    """XLA options a plan compiles with on ``topology`` (`CPU_COMPILER_OPTIONS` for cpu:N, none for TPUs)."""
    return dict(CPU_COMPILER_OPTIONS) if topology.spec.platform == "cpu" else {}


# --------------------------------------------------------------------------------------------------
# Models, rules and the step from a config.


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except AttributeError:
        return default
    return default if value is None else value


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return dict(value)


def model_config(spec: Mapping[str, Any], what: str) -> ModelConfig:
    """A `ModelConfig` from ``{"model_type": family, **fields}`` (family presets fill the rest)."""
    fields = _as_dict(spec)
    if not fields:
        raise PlanError(f"{what} is not set; describe the model by ModelConfig fields, e.g. {what} = "
                        "dict(model_type='llama', num_layers=80, hidden_size=10240, ...)")
    family = fields.pop("model_type", None)
    if family is None:
        raise PlanError(f"{what} has no model_type; add model_type='llama' (or any family in "
                        "kdjax.hub.families, e.g. qwen3, gemma2, mixtral)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PlanError(f"{what} has unknown ModelConfig field(s) {', '.join(unknown)}")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    try:
        return preset(family, **fields)
    except ConfigError as e:
        raise PlanError(f"{what}: {e}") from None


def _teacher_config(name: str, spec: Mapping[str, Any], where: str) -> ModelConfig:
    if spec.get("model"):
        return model_config(spec.get("model"), f"{where}.model")
    if spec.get("path"):
        try:
            return run_lib.checkpoint_model_config(spec)
        except (ConfigError, ValueError, OSError) as e:
            raise PlanError(f"{where}.path: {e}") from None
    raise PlanError(f"{where} has neither `model` (ModelConfig fields) nor `path` (a checkpoint directory)")


def models_from_config(config: Any, method=None, *, teacher_configs: Optional[Mapping[str, ModelConfig]] = None
                       ) -> tuple[ModelConfig, dict[str, ModelConfig], dict[str, float]]:
    """``(student, {teacher name: config}, {teacher name: weight})`` of a run config, without weights.

    Teachers come from ``*.model`` (ModelConfig fields, for models too big to load here) or from the
    checkpoint at ``*.path`` (its config.json only); the student from ``student.model``, ``student.path``
    or derived from the first teacher exactly as a run derives it (``config.student`` fields).
    """
    try:
        specs = run_lib.teacher_specs(config)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    single = not _as_dict(_get(config, "teachers"))
    teachers, weights = {}, {}
    for name, spec in specs.items():
        where = "config.teacher" if single else f"config.teachers.{name}"
        if teacher_configs is not None:  # given (a teacher cache's manifest): no checkpoint is read
            if name not in teacher_configs:
                raise PlanError(f"{where}: the teacher cache holds {', '.join(teacher_configs)}, not {name!r}")
            teachers[name] = teacher_configs[name]
        else:
            teachers[name] = _teacher_config(name, spec, where)
        weights[name] = run_lib.teacher_weight(spec)
    s_spec = _as_dict(_get(config, "student"))
    if s_spec.get("model"):
        student = model_config(s_spec.get("model"), "config.student.model")
    elif s_spec.get("path"):
        student = _teacher_config("student", s_spec, "config.student")
    else:
        if method is None:
            method = build_method(config_lib.get(config, "method"), config_lib.method_args(config))
        init, kw = run_lib.student_kwargs(config, method)
        kw.setdefault("num_layers", len(init) if not isinstance(init, str) else next(iter(teachers.values())).num_layers)
        source = next(iter(teachers.values()))
        if method.student_from:  # a chain: the student is derived from a teacher or a model trained before it
            source = {**teachers, **chain_configs(method, teachers, kw["num_layers"])}[method.student_from]
        student = student_config(source, **kw)
    return student, teachers, weights


def chain_configs(method, teachers: Mapping[str, ModelConfig], student_layers: int) -> dict[str, ModelConfig]:
    """`{name: ModelConfig}` of the method's chain models (`Method.models`), derived as a run derives them."""
    stage_lib.validate_chain(method, list(teachers))
    first = {m.name: min(i for i, s in enumerate(method.stages) if s.trains == m.name) for m in method.models}
    out: dict[str, ModelConfig] = {}
    for m in sorted(method.models, key=lambda m: first[m.name]):
        source = {**teachers, **out}[m.derive_from] if m.derive_from else next(iter(teachers.values()))
        out[m.name] = stage_lib.chain_model_config(m, source, student_layers)
    return out


def _rules(base: Sequence, overrides: Any) -> dict:
    return sharding_lib.merge_rules(base, _as_dict(overrides))


def _stage_index(config: Any, method) -> int:
    stage = _get(_get(config, "plan"), "stage", 0)
    if isinstance(stage, str) and not stage.isdigit():
        names = [s.name for s in method.stages]
        if stage not in names:
            raise PlanError(f"config.plan.stage={stage!r} is not a stage of {method.name!r}; stages: {', '.join(names)}")
        return names.index(stage)
    index = int(stage)
    if not 0 <= index < len(method.stages):
        raise PlanError(f"config.plan.stage={index} is out of range; {method.name!r} has {len(method.stages)} stage(s)")
    return index


def build_planned_step(config: Any, mesh, *, student_remat: Optional[str] = None,
                       strict: Optional[bool] = None) -> ShardedStep:
    """The `ShardedStep` a run config describes, on ``mesh`` (abstract; nothing allocated).

    Models, per-teacher weights and rules, steps and optimizer are read by the same functions a run
    uses (`kdjax.distill.run`), and the stage is assembled by the same `assemble_stage`.
    """
    method = build_method(config_lib.get(config, "method"), config_lib.method_args(config))
    stage = _stage_index(config, method)
    cached = _stage_cache(config, method, stage)
    if cached is not None:  # the teachers are the cache's: their configs from its manifest, no checkpoint read
        configs, cached_refs = cached
        student, teachers, weights = models_from_config(config, method, teacher_configs=configs)
    else:
        cached_refs = None
        student, teachers, weights = models_from_config(config, method)
    if student_remat is not None:
        student = student.replace(remat_policy=student_remat)
    stage = _stage_index(config, method)
    if method.models:  # a chain: stage `stage` may train a chain model, and distill from those trained before it
        chain = chain_configs(method, teachers, student.num_layers)
        trains = method.stages[stage].trains
        student = student if trains == "student" else chain[trains]
        names = stage_lib.stage_teachers(method.stages[stage], stage_lib.chain_teachers(method, stage, list(teachers)))
        weights = {n: w for n, w in {**weights, **{m.name: m.weight for m in method.models}}.items() if n in names}
        teachers = {n: teachers[n] if n in teachers else chain[n] for n in names}
    data = _get(_get(config, "data"), "train")
    batch_shape = (int(_get(data, "batch_size", 8)), int(_get(data, "max_length", 128)))
    train = _get(config, "train")
    plan_cfg = _get(config, "plan")
    strict = bool(_get(plan_cfg, "strict", True)) if strict is None else strict
    settings = run_lib.optimizer_settings(config)
    steps = run_lib.stage_steps(config, method.stages[stage])
    return sharded_step(
        student, teachers, method, mesh,
        student_rules=run_lib.model_rules(config, "student"),
        teacher_rules={name: run_lib.model_rules(config, "teacher", name) for name in teachers},
        batch_shape=batch_shape, total_steps=steps, grad_accum=int(_get(train, "grad_accum", 1)), stage=stage,
        teacher_weights=weights, strict=strict, seed=int(config_lib.get(config, "train.seed")),
        cached_teachers=cached_refs, **dataclasses.asdict(settings))


def _stage_cache(config: Any, method, stage: int):
    """``({name: ModelConfig}, {name: CachedTeacherRef})`` of a stage whose data source sets
    ``teacher_cache`` (read from the cache's manifest; no teacher checkpoint is opened), else None."""
    from kdjax import cache as cache_lib
    data = _get(config, "data")
    section = method.stages[stage].data
    spec = _get(data, section) if _get(data, section) is not None else _get(data, "train")
    cache_dir = _get(spec, "teacher_cache")
    if not cache_dir:
        return None
    try:
        manifest = cache_lib.read_manifest(cache_dir)
    except cache_lib.CacheError as e:
        raise PlanError(str(e)) from None
    opened = cache_lib.TeacherCache(cache_dir, manifest, section, int(_get(spec, "batch_size", 8)), None, {})
    return dict(opened.configs), dict(opened.refs)


# --------------------------------------------------------------------------------------------------
# Plans.


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """XLA's per-device buffer accounting of one compiled program (`Compiled.memory_analysis`)."""

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int

    @property
    def total(self) -> int:
        # Outputs that alias donated arguments occupy the arguments' buffers: count them once.
        return self.argument + self.output - self.alias + self.temp + self.generated_code

    @classmethod
    def from_compiled(cls, compiled) -> "MemoryUse":
        stats = compiled.memory_analysis()
        if stats is None:
            raise PlanError("this backend's compiler reports no memory analysis; plan on a TPU topology or cpu:N")
        return cls(argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
                   alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
                   generated_code=int(getattr(stats, "generated_code_size_in_bytes", 0) or 0))


@dataclasses.dataclass
class PlanResult:
    """One compiled step: where it ran, how it was laid out, what it needs per device.

    ``memory`` is None when the compiler itself refused the program for lack of memory (the TPU
    compiler does this); ``compiler_oom`` then holds its message and ``oom_temp_bytes`` the
    temporaries it asked for, when the message says.
    """

    topology: str
    device_kind: str
    num_devices: int
    mesh_shape: dict[str, int]
    student_remat: str
    batch_shape: tuple[int, int]
    teacher_params: int
    student_params: int
    teacher_param_bytes_per_device: int
    state_bytes_per_device: int
    input_bytes_per_device: int
    memory: Optional[MemoryUse]
    device_memory: int
    lower_seconds: float
    compile_seconds: float
    compiler_oom: Optional[str] = None
    oom_temp_bytes: Optional[int] = None
    roofline: Optional[roofline_lib.Roofline] = None  # predicted step time (None after a compiler OOM)
    roofline_note: Optional[str] = None  # why there is no estimate although the step compiled

    @property
    def total_bytes(self) -> Optional[int]:
        """XLA's total, or (after a compiler OOM) inputs + the temporaries it asked for, if known."""
        if self.memory is not None:
            return self.memory.total
        if self.oom_temp_bytes is not None:
            return self.input_bytes_per_device + self.oom_temp_bytes
        return None

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.device_memory

    @property
    def exit_code(self) -> int:
        return 0 if self.fits else 1


_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "CompileTimeHbmOom")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}


def _compiler_oom(error: Exception) -> Optional[tuple[str, Optional[int]]]:
    """``(message, temporaries bytes or None)`` if ``error`` is a compile-time out-of-memory."""
    text = str(error)
    if not any(marker in text for marker in _OOM_MARKERS):
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    message = next((ln for ln in lines if "memory" in ln.lower()), lines[0] if lines else type(error).__name__)
    message = re.sub(r"^(jax\.errors\.)?JaxRuntimeError:\s*", "", message)
    m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", text)
    temp = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)]) if m else None
    return message, temp


def _per_device_bytes(abstract_tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def _num_params(abstract_tree: Any) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_tree)))


def plan_step(config: Any, topology: Topology, *, mesh_config: Optional[sharding_lib.MeshConfig] = None,
              student_remat: Optional[str] = None, strict: Optional[bool] = None) -> PlanResult:
    """Lower and compile the config's step for ``topology``; XLA's per-device memory and timings."""
    if mesh_config is None:
        mesh_config = sharding_lib.MeshConfig.from_config(_as_dict(_get(config, "mesh")) or {})
    mesh = sharding_lib.make_mesh(mesh_config, topology.devices)
    step = build_planned_step(config, mesh, student_remat=student_remat, strict=strict)
    t0 = time.perf_counter()
    lowered = step.lower()
    t1 = time.perf_counter()
    memory, oom, compiled, hlo_text = None, None, None, None
    with tempfile.TemporaryDirectory(prefix="kdjax-plan-hlo-") as dump_dir:
        options = compiler_options(topology)
        if topology.spec.platform != "cpu":
            # The roofline reads the optimized HLO. jaxlib cannot parse back some modules libtpu emits
            # (Compiled.as_text() fails on async-update instructions with several operands), so the
            # TPU compiler writes its text out as it compiles.
            options.update({"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True})
        try:
            compiled = lowered.compile(compiler_options=options or None)
            memory = MemoryUse.from_compiled(compiled)
        except Exception as e:  # noqa: BLE001 -- only a compile-time OOM is a plan outcome; the rest re-raise
            oom = _compiler_oom(e)
            if oom is None:
                raise
        dumped = sorted(glob.glob(os.path.join(dump_dir, "*.after_optimizations.txt")))
        if dumped:
            with open(dumped[-1]) as f:
                hlo_text = f.read()
    t2 = time.perf_counter()
    roofline, roofline_note = None, None
    if compiled is not None:
        try:
            roofline = roofline_lib.estimate_step(compiled, step, topology.spec.generation, len(topology.devices),
                                                  hlo_text=hlo_text)
        except RuntimeError as e:  # the memory plan stands without the estimate
            roofline_note = f"no estimate: the optimized HLO could not be read ({str(e).strip().splitlines()[0][:160]})"
    teacher_abstract = step.abstract_teacher_params
    batch = next(iter(step.abstract_batch.values())).shape
    return PlanResult(
        topology=topology.name, device_kind=topology.device_kind, num_devices=len(topology.devices),
        mesh_shape=dict(mesh.shape), student_remat=step.student_config.remat_policy,
        batch_shape=(int(batch[0]), int(batch[1])), teacher_params=_num_params(teacher_abstract),
        student_params=_num_params(step.abstract_state.params),
        teacher_param_bytes_per_device=_per_device_bytes(teacher_abstract),
        state_bytes_per_device=_per_device_bytes(step.abstract_state),
        input_bytes_per_device=_per_device_bytes((step.abstract_state, teacher_abstract, step.abstract_batch)),
        memory=memory, device_memory=topology.device_memory_bytes, lower_seconds=t1 - t0, compile_seconds=t2 - t1,
        compiler_oom=None if oom is None else oom[0], oom_temp_bytes=None if oom is None else oom[1],
        roofline=roofline, roofline_note=roofline_note)


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _gib(n: int) -> str:
    """Right-aligned GiB for large sizes, MiB/KiB below a GiB so small plans stay readable."""
    for scale, unit in ((GIB, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:9.2f} {unit}"
    return f"{n:9d} B  "


def format_result(r: PlanResult) -> str:
    """The human-readable report of one plan (every byte field on its own line)."""
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
    lines = [
        f"topology:        {r.topology} ({r.num_devices} x {r.device_kind})",
        f"mesh:            {mesh}",
        f"batch:           {r.batch_shape[0]} x {r.batch_shape[1]} tokens, student remat={r.student_remat}",
        f"params:          teacher {_count(r.teacher_params)}, student {_count(r.student_params)}",
        f"sharded inputs:  teacher params {_gib(r.teacher_param_bytes_per_device).strip()}, "
        f"train state {_gib(r.state_bytes_per_device).strip()} per device",
    ]
    m = r.memory
    if m is not None:
        lines += [
            f"argument bytes:  {_gib(m.argument)}  ({m.argument:,})",
            f"output bytes:    {_gib(m.output)}  ({m.output:,})",
            f"alias bytes:     {_gib(m.alias)}  ({m.alias:,})",
            f"temp bytes:      {_gib(m.temp)}  ({m.temp:,})",
            f"code bytes:      {_gib(m.generated_code)}  ({m.generated_code:,})",
            f"total per device:{_gib(m.total)}  ({m.total:,}) = argument + output - alias + temp + code",
        ]
    else:
        arg = r.input_bytes_per_device
        lines.append(f"argument bytes:  {_gib(arg)}  ({arg:,}) from the input shardings")
        if r.oom_temp_bytes is not None:
            lines.append(f"temp bytes:      {_gib(r.oom_temp_bytes)}  ({r.oom_temp_bytes:,}) asked for by the compiler")
            lines.append(f"total per device:{_gib(r.total_bytes)}  ({r.total_bytes:,}) = argument + temp (at least)")
        lines.append(f"compiler:        out of memory: {r.compiler_oom}")
    lines += [
        f"device memory:   {_gib(r.device_memory)}  ({r.device_memory:,})",
        f"compile time:    {r.compile_seconds:.1f} s (lowering {r.lower_seconds:.1f} s)",
    ]
    if r.roofline is not None:
        lines += roofline_lib.format_estimate(r.roofline)
    elif r.roofline_note:
        lines.append(f"estimate:        {r.roofline_note}")
    share = "" if r.total_bytes is None else f" ({100.0 * r.total_bytes / r.device_memory:.1f}% of device memory)"
    lines.append(f"result:          {'FITS' if r.fits else 'DOES NOT FIT'}{share}")
    return "\n".join(lines)


def search_candidates(num_devices: int, axes: Sequence[str] = ("data", "fsdp", "tensor"),
                      remats: Sequence[str] = REMAT_SEARCH) -> list[tuple[sharding_lib.MeshConfig, str]]:
    """Every ``fsdp x tensor = num_devices`` mesh (other axes 1) with every remat policy."""
    for needed in ("fsdp", "tensor"):
        if needed not in axes:
            raise PlanError(f"--search needs mesh axes fsdp and tensor; config.mesh.axes is {tuple(axes)}")
    out = []
    for tensor in (d for d in range(1, num_devices + 1) if num_devices % d == 0):
        ici = tuple(num_devices // tensor if a == "fsdp" else tensor if a == "tensor" else 1 for a in axes)
        mesh_config = sharding_lib.MeshConfig(axes=tuple(axes), ici=ici, allow_split_physical_axes=True)
        out.extend((mesh_config, remat) for remat in remats)
    return out


def search(config: Any, topology: Topology, *, remats: Sequence[str] = REMAT_SEARCH,
           print_fn: Callable[[str], Any] = print) -> tuple[Optional[PlanResult], list]:
    """Compile every candidate; ``(fastest predicted fitting PlanResult or None, [(mesh, remat, result or error)])``."""
    axes = tuple(_get(_get(config, "mesh"), "axes", ("data", "fsdp", "tensor")))
    rows = []
    for mesh_config, remat in search_candidates(len(topology.devices), axes, remats):
        label = f"fsdp={mesh_config.ici[axes.index('fsdp')]:<3} tensor={mesh_config.ici[axes.index('tensor')]:<3} " \
                f"remat={remat:<13}"
        try:
            result = plan_step(config, topology, mesh_config=mesh_config, student_remat=remat)
        except (ValueError, ConfigError) as e:  # mesh/rule/divisibility problems: this candidate is out
            rows.append((mesh_config, remat, str(e).splitlines()[0]))
            print_fn(f"  {label} skipped: {str(e).splitlines()[0]}")
            continue
        rows.append((mesh_config, remat, result))
        verdict = "fits" if result.fits else "does not fit"
        total = "       ?    " if result.total_bytes is None else f"{result.total_bytes / GIB:8.2f} GiB"
        if result.memory is None:
            total = ">" + total.lstrip()  # the compiler stopped at an out-of-memory
        step = "" if result.roofline is None else f"step {result.roofline.step_seconds * 1e3:9.1f} ms (estimate)  "
        print_fn(f"  {label} {total:>12}  {verdict:<12} {step}(compile {result.compile_seconds:.1f} s)")
    fitting = [r for _, _, r in rows if isinstance(r, PlanResult) and r.fits]
    # Fastest predicted step among those that fit; the smaller footprint breaks ties.
    best = min(fitting, key=lambda r: (r.roofline.step_seconds if r.roofline else math.inf, r.memory.total)) \
        if fitting else None
    return best, rows


def plan(config: Any, topology: str, *, device_memory_gb: Optional[float] = None, do_search: bool = False,
         student_remat: Optional[str] = None, print_fn: Callable[[str], Any] = print) -> int:
    """Plan ``config`` on ``topology`` and print the report; the exit code (0 fits, 1 does not fit)."""
    topo = get_topology(topology, device_memory_gb)
    if not do_search:
        result = plan_step(config, topo, student_remat=student_remat)
        print_fn(format_result(result))
        return result.exit_code
    print_fn(f"searching fsdp x tensor meshes and remat policies on {topo.name} ({len(topo.devices)} devices):")
    remats = (student_remat,) if student_remat else REMAT_SEARCH
    best, _ = search(config, topo, remats=remats, print_fn=print_fn)
    if best is None:
        print_fn(f"result:          DOES NOT FIT (no candidate fits in {topo.device_memory_bytes / GIB:.2f} GiB)")
        return 1
    print_fn("fastest predicted step that fits:")
    print_fn(format_result(best))
    return 0


# --------------------------------------------------------------------------------------------------
# Command line.


def _ensure_cpu_devices(topology: str) -> None:
    """For ``cpu:N``, make this process have N CPU devices: set XLA_FLAGS, or re-exec with it set."""
    try:
        spec = parse_topology(topology)
    except PlanError:
        return  # reported later, as one line
    if spec.platform != "cpu":
        return
    n = spec.shape[0]
    have = _cpu_device_flag()
    if have is not None and have >= n:
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():  # too late for this process: start again with the flag
        os.execv(sys.executable, [sys.executable, "-m", "kdjax.plan", *sys.argv[1:]])


def main(argv: Sequence[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/scale_100b.py")
    _ensure_cpu_devices(_TOPOLOGY.value)
    if not os.environ.get("JAX_PLATFORMS"):
        # A plan never executes anything: keep JAX on the CPU backend (a machine with libtpu but no
        # TPU would otherwise try to open one). TPU topologies are described by libtpu directly.
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_threefry_partitionable", True)
    try:
        code = plan(config, _TOPOLOGY.value, device_memory_gb=_MEMORY.value, do_search=_SEARCH.value,
                    student_remat=_REMAT.value)
    except (ValueError, ConfigError) as e:  # PlanError, MeshError, ShardingError, MethodError, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kdjax.plan: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<recipe>.py file, optionally ':arg'.",
                                              lock_config=False)
    _TOPOLOGY = flags.DEFINE_string("topology", None, f"Target devices: {TOPOLOGY_FORMS}.")
    _MEMORY = flags.DEFINE_float("device_memory_gb", None, "Memory per device in GiB (required for cpu:N; "
                                 "overrides the TPU HBM).")
    _SEARCH = flags.DEFINE_bool("search", False, "Try fsdp x tensor meshes and remat policies; report the "
                                "fastest predicted step that fits.")
    _REMAT = flags.DEFINE_enum("remat", None, list(REMAT_SEARCH) + ["dots", "minimal"],
                               "Override the student's remat policy.")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
