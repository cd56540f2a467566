"""Device meshes, logical axis rules and per-model parameter shardings.

kdjax never names mesh axes inside a model. Every parameter dimension gets a *logical* name from
its path (``layers/attn/q/kernel`` is ``("layers", "embed", "heads")``), and a per-model table of
*rules* maps logical names to mesh axes. The teacher and the student share one mesh but keep their
own rules: a 100B teacher splits ``embed`` over ``fsdp`` and ``heads``/``kv``/``mlp``/``vocab`` over
``tensor``, a small student may use ``fsdp`` alone. Activations have names of their own
(``act_batch``, ``act_len``, ...) with rules shared by both models, so teacher and student
intermediates meet in a loss with the same layout and nothing is resharded between them.

The path from a config to sharded weights never holds a full model on one device::

    mesh = make_mesh(MeshConfig(ici=(1, -1, 1)))            # all devices on 'fsdp'
    graphdef, params = sharded_init(config, mesh, DEFAULT_TEACHER_RULES)
    log_param_overview(params)

``sharded_init`` traces the model constructor abstractly (``nnx.eval_shape``), turns the shapes
into ``NamedSharding``s and runs the real initializer under ``jax.jit(..., out_shardings=...)``, so
each device only ever materializes its own shards.

Mesh layout follows MaxText: ``ici`` is the shape within a slice (fast interconnect), ``dcn`` the
shape across slices (data-center network); each mesh axis has size ``dcn[i] * ici[i]`` and the DCN
part is the outer (slower-varying) one. One ``-1`` per shape is filled in from the device count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.models.config import ModelConfig
from kdjax.models.transformer import Transformer

__all__ = [
    "ACTIVATION_AXES",
    "ACTIVATION_RULES",
    "DEFAULT_PARAM_AXES",
    "DEFAULT_STUDENT_RULES",
    "DEFAULT_TEACHER_RULES",
    "EXPERT_RULES",
    "KNOWN_MESH_AXES",
    "MeshConfig",
    "MeshError",
    "ShardingError",
    "WEIGHT_AXES",
    "batch_sharding",
    "constrain",
    "create_device_grid",
    "detect_multihost",
    "log_param_overview",
    "logical_to_spec",
    "make_mesh",
    "maybe_initialize_distributed",
    "merge_rules",
    "normalize_rules",
    "param_logical_axes",
    "param_overview",
    "param_shardings",
    "param_specs",
    "shard_batch",
    "sharded_init",
    "validate_rules",
]

logger = logging.getLogger(__name__)

MeshAxes = Union[None, str, Sequence[str]]
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]


class MeshError(ValueError):
    """A mesh description that cannot be laid out on the available devices."""


class ShardingError(ValueError):
    """A sharding rule or parameter that cannot be turned into a valid partition spec."""


# --------------------------------------------------------------------------------------------------
# Meshes.

# Mesh axes kdjax knows about, in the conventional order (outermost / least communication first).
# `data` is pure data parallelism (params replicated), `fsdp` shards params and batch, `tensor`
# splits heads/mlp/vocab (Megatron style), `expert` holds a share of each MoE layer's experts (rule
# `expert -> expert`, see `EXPERT_RULES`). `stage` and `sequence` are reserved names so a config may
# carry them (size 1) before anything uses them.
KNOWN_MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")


def _as_int_tuple(value: Any, field: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise MeshError(f"MeshConfig.{field}={value!r} must be a sequence of ints (one per mesh axis)") from None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis names and their sizes within (``ici``) and across (``dcn``) slices.

    ``ici`` and ``dcn`` have one entry per axis; at most one entry of each may be ``-1``, filled in
    so that the product matches the devices per slice (``ici``) or the number of slices (``dcn``).
    ``dcn=None`` means a single slice. ``allow_split_physical_axes`` lets a TPU mesh split a physical
    torus axis across logical axes (needed for some shapes, slower collectives).
    """

    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    ici: tuple[int, ...] = (1, -1, 1)
    dcn: Optional[tuple[int, ...]] = None
    allow_split_physical_axes: bool = False

    def __post_init__(self):
        if isinstance(self.axes, str):
            raise MeshError(f"MeshConfig.axes={self.axes!r} must be a sequence of axis names, "
                            "e.g. ('data', 'fsdp', 'tensor')")
        axes = tuple(str(a) for a in self.axes)
        for name in axes:
            if name not in KNOWN_MESH_AXES:
                raise MeshError(f"unknown mesh axis {name!r} in MeshConfig.axes={axes}; "
                                f"known axes: {', '.join(KNOWN_MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise MeshError(f"MeshConfig.axes={axes} names an axis twice; each mesh axis must appear once")
        ici = _as_int_tuple(self.ici, "ici")
        dcn = (1,) * len(axes) if self.dcn is None else _as_int_tuple(self.dcn, "dcn")
        for field, shape in (("ici", ici), ("dcn", dcn)):
            if len(shape) != len(axes):
                raise MeshError(f"MeshConfig.{field}={shape} has {len(shape)} entries but there are {len(axes)} "
                                f"mesh axes {axes}; give one size per axis")
            if shape.count(-1) > 1:
                raise MeshError(f"MeshConfig.{field}={shape} has {shape.count(-1)} entries of -1; at most one axis "
                                "per shape can be auto-filled")
            if any(s == 0 or s < -1 for s in shape):
                raise MeshError(f"MeshConfig.{field}={shape} has a size that is neither positive nor -1")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "ici", ici)
        object.__setattr__(self, "dcn", dcn)
        object.__setattr__(self, "allow_split_physical_axes", bool(self.allow_split_physical_axes))

    @classmethod
    def from_config(cls, cfg: Any) -> "MeshConfig":
        """Reads a mapping or `ml_collections.ConfigDict` with MaxText-style or short keys.

        Accepted keys: ``mesh_axes``/``axes``, ``ici_parallelism``/``ici``,
        ``dcn_parallelism``/``dcn``, ``allow_split_physical_axes``.
        """
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        aliases = {"mesh_axes": "axes", "axes": "axes", "ici_parallelism": "ici", "ici": "ici",
                   "dcn_parallelism": "dcn", "dcn": "dcn", "allow_split_physical_axes": "allow_split_physical_axes"}
        kwargs = {}
        for key, value in dict(cfg).items():
            if key not in aliases:
                raise MeshError(f"unknown mesh config key {key!r}; expected one of {', '.join(aliases)}")
            kwargs[aliases[key]] = value
        return cls(**kwargs)

    def resolve(self, num_devices: int, num_slices: Optional[int] = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Concrete ``(ici, dcn)`` shapes for ``num_devices`` devices in ``num_slices`` slices.

        ``num_slices=None`` means the devices do not say which slice they are in (CPU, one GPU
        host): the ``dcn`` product is then taken as the slice count, a ``-1`` in ``dcn`` becomes 1.
        """
        if num_slices is None:
            dcn = tuple(1 if s == -1 else s for s in self.dcn)
            num_slices = math.prod(dcn)
            if num_devices % num_slices:
                raise MeshError(f"mesh dcn shape {dcn} multiplies to {num_slices} slices, which does not divide the "
                                f"{num_devices} devices; choose a dcn shape whose product divides {num_devices}")
        else:
            dcn = _fill_shape(self.dcn, num_slices, "dcn", "slices")
        per_slice = num_devices // num_slices
        ici = _fill_shape(self.ici, per_slice, "ici", "devices per slice" if num_slices > 1 else "devices")
        return ici, dcn


def _fill_shape(shape: tuple[int, ...], total: int, field: str, what: str) -> tuple[int, ...]:
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise MeshError(f"mesh {field} shape {shape}: the fixed sizes multiply to {known}, which does not divide "
                            f"the {total} {what}; change the fixed sizes so their product divides {total}")
        return tuple(total // known if s == -1 else s for s in shape)
    if known != total:
        raise MeshError(f"mesh {field} shape {shape} multiplies to {known} but there are {total} {what}; make the "
                        f"product {total} or put -1 on one axis")
    return shape


def _hybrid_by_reshape(devices: Sequence[Any], ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    """The `create_hybrid_device_mesh` layout with contiguous runs of devices standing in for slices.

    Used for devices that carry no slice information (fake CPU devices), so multi-slice layouts can
    be built and tested on one machine. Axis ``i`` has size ``dcn[i] * ici[i]``, DCN outermost.
    """
    n = len(ici)
    grid = np.empty(len(devices), dtype=object)
    grid[:] = list(devices)
    grid = grid.reshape(tuple(dcn) + tuple(ici))
    interleave = [ax for i in range(n) for ax in (i, n + i)]
    return grid.transpose(interleave).reshape(tuple(d * i for d, i in zip(dcn, ici)))


def create_device_grid(mesh_config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> np.ndarray:
    """An ``ndarray`` of devices with one dimension per mesh axis, laid out for fast collectives.

    One slice: `mesh_utils.create_device_mesh` (topology-aware on TPU), falling back to a plain
    reshape on CPU/fake devices where no topology exists. Several slices (``prod(dcn) > 1``):
    `mesh_utils.create_hybrid_device_mesh` over slices (``slice_index``) or, on hosts without slice
    information, over processes; on single-process CPU the slices are emulated by contiguous runs
    of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise MeshError("no devices to build a mesh from; pass devices=... or check JAX_PLATFORMS")
    platform = getattr(devices[0], "platform", "cpu")
    has_slices = all(hasattr(d, "slice_index") for d in devices)
    ici, dcn = mesh_config.resolve(len(devices), len({d.slice_index for d in devices}) if has_slices else None)
    split = mesh_config.allow_split_physical_axes
    if math.prod(dcn) == 1:
        try:
            return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=split)
        except (NotImplementedError, AssertionError, ValueError) as e:
            if platform == "tpu":
                raise MeshError(f"cannot map ici shape {ici} onto the TPU topology ({e}); try "
                                "allow_split_physical_axes=True or a shape that follows the physical axes") from None
            logger.info("create_device_mesh failed (%s); laying out %d devices by reshape", e, len(devices))
            grid = np.empty(len(devices), dtype=object)
            grid[:] = devices
            return grid.reshape(ici)
    if has_slices:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=split)
    processes = {getattr(d, "process_index", 0) for d in devices}
    if len(processes) == math.prod(dcn):
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=split)
    if platform == "cpu" and len(processes) == 1:
        return _hybrid_by_reshape(devices, ici, dcn)
    raise MeshError(f"dcn shape {dcn} asks for {math.prod(dcn)} slices but the {platform} devices carry no slice "
                    f"information and come from {len(processes)} processes; use dcn=None on a single slice")


def make_mesh(mesh_config: Optional[MeshConfig] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `jax.sharding.Mesh` over ``devices`` (default: all devices) shaped by ``mesh_config``."""
    mesh_config = MeshConfig() if mesh_config is None else mesh_config
    if not isinstance(mesh_config, MeshConfig):
        mesh_config = MeshConfig.from_config(mesh_config)
    return Mesh(create_device_grid(mesh_config, devices), mesh_config.axes)


# --------------------------------------------------------------------------------------------------
# Logical axes.

# Weight dimensions. `heads` is the fused H*d query/output width, `kv` the fused K*d key/value width
# (different under GQA), `norm` the feature dim of a norm scale/bias (kept apart from `embed` so
# tiny vectors can stay replicated while the matrices along `embed` are sharded).
# `expert` is the stacked expert axis of mixture-of-experts weights ([L, E, D, F]).
WEIGHT_AXES = ("vocab", "embed", "heads", "kv", "mlp", "layers", "norm", "labels", "position", "token_type",
               "expert")
# Activation dimensions, shared by teacher and student rules.
ACTIVATION_AXES = ("act_batch", "act_len", "act_embed", "act_heads", "act_kv", "act_mlp", "act_vocab")

# (regex matched against the full "/"-joined parameter path, logical names per dimension); first
# match wins. Layer parameters carry the stacked leading `layers` axis.
DEFAULT_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed/word/embedding", ("vocab", "embed")),
    (r"embed/position/embedding", ("position", "embed")),
    (r"embed/token_type/embedding", ("token_type", "embed")),
    (r"(embed/norm|final_norm|mlm_norm)/(scale|bias)", ("norm",)),
    (r"layers/(attn_norm|mlp_norm|attn_post_norm|mlp_post_norm|attn/q_norm|attn/k_norm)/(scale|bias)",
     ("layers", "norm")),
    (r"layers/attn/q/kernel", ("layers", "embed", "heads")),
    (r"layers/attn/[kv]/kernel", ("layers", "embed", "kv")),
    (r"layers/attn/q/bias", ("layers", "heads")),
    (r"layers/attn/[kv]/bias", ("layers", "kv")),
    (r"layers/attn/o/kernel", ("layers", "heads", "embed")),
    (r"layers/attn/o/bias", ("layers", "embed")),
    (r"layers/mlp/(up|gate)/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/(up|gate)/bias", ("layers", "mlp")),
    (r"layers/mlp/down/kernel", ("layers", "mlp", "embed")),
    (r"layers/mlp/down/bias", ("layers", "embed")),
    # Mixture of experts: the router is small (E columns) and stays whole along experts; each expert's
    # matrices are split like a dense MLP's, and the expert axis over the `expert` mesh axis.
    (r"layers/moe/router/kernel", ("layers", "embed", None)),
    (r"layers/moe/(gate|up)", ("layers", "expert", "embed", "mlp")),
    (r"layers/moe/down", ("layers", "expert", "mlp", "embed")),
    (r"decoder/kernel", ("embed", "vocab")),
    (r"mlm_bias", ("vocab",)),
    # [D, D] matrices: both dims are `embed`; the mesh axis goes to the input dim only (see
    # `logical_to_spec`: a mesh axis is used once per spec).
    (r"(mlm_transform|pooler)/kernel", ("embed", "embed")),
    (r"(mlm_transform|pooler)/bias", ("embed",)),
    (r"classifier/kernel", ("embed", "labels")),
    (r"classifier/bias", ("labels",)),
)

_COMPILED_TABLES: dict[int, list] = {}


def _compiled(table: Sequence[tuple[str, tuple[str, ...]]]) -> list:
    key = id(table)
    if key not in _COMPILED_TABLES or _COMPILED_TABLES[key][0] is not table:
        _COMPILED_TABLES[key] = [table, [(re.compile(p), tuple(n)) for p, n in table]]
    return _COMPILED_TABLES[key][1]


def param_logical_axes(path: str, ndim: int,
                       table: Sequence[tuple[str, tuple[str, ...]]] = DEFAULT_PARAM_AXES) -> tuple[str, ...]:
    """Logical axis names of the parameter at ``path`` (e.g. ``"layers/mlp/down/kernel"``)."""
    for pattern, names in _compiled(table):
        if pattern.fullmatch(path):
            if len(names) != ndim:
                raise ShardingError(f"param {path!r} has {ndim} dims but the axis table gives {len(names)} names "
                                    f"{names} (pattern {pattern.pattern!r}); fix the table entry")
            return names
    raise ShardingError(f"no logical-axis entry matches param {path!r} ({ndim} dims); add a (regex, names) entry "
                        "to the table passed as table=... (default DEFAULT_PARAM_AXES)")


# --------------------------------------------------------------------------------------------------
# Rules: logical name -> mesh axes (a name, a tuple of names, or None to replicate). A logical name
# with no rule is replicated.

ACTIVATION_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Large models: ZeRO-3 style fsdp over `embed` plus Megatron tensor parallelism over the fused head,
# kv, mlp and vocab widths. The layer axis stays whole so a scan slices it locally.
DEFAULT_TEACHER_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("labels", None),
    ("position", None),
    ("token_type", None),
    ("expert", None),
) + ACTIVATION_RULES

# Expert parallelism on top of either rule set, for a mesh with an `expert` axis:
# ``merge_rules(DEFAULT_TEACHER_RULES, EXPERT_RULES)``.
EXPERT_RULES: tuple[tuple[str, MeshAxes], ...] = (("expert", "expert"),)

# Small models: fsdp only; every weight is replicated across `tensor` (and `data`).
DEFAULT_STUDENT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("vocab", None),
    ("embed", "fsdp"),
    ("heads", None),
    ("kv", None),
    ("mlp", None),
    ("layers", None),
    ("norm", None),
    ("labels", None),
    ("position", None),
    ("token_type", None),
    ("expert", None),
) + ACTIVATION_RULES


def _mesh_axes_tuple(logical: str, value: MeshAxes) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        axes = tuple(value)
    except TypeError:
        raise ShardingError(f"rule {logical!r} -> {value!r}: mesh axes must be a name, a tuple of names "
                            "or None") from None
    if not all(isinstance(a, str) for a in axes):
        raise ShardingError(f"rule {logical!r} -> {value!r}: mesh axes must be strings")
    if len(set(axes)) != len(axes):
        raise ShardingError(f"rule {logical!r} -> {axes} names a mesh axis twice")
    return axes


def normalize_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """``{logical name: tuple of mesh axes}`` from a mapping or a sequence of pairs (as configs hold)."""
    if hasattr(rules, "to_dict"):
        rules = rules.to_dict()
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    out: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        try:
            logical, value = pair
        except (TypeError, ValueError):
            raise ShardingError(f"sharding rule {pair!r} is not a (logical name, mesh axes) pair") from None
        if logical in out:
            raise ShardingError(f"sharding rules give logical axis {logical!r} twice; use merge_rules(base, overrides) "
                                "to override a rule")
        out[str(logical)] = _mesh_axes_tuple(logical, value)
    return out


def merge_rules(*rule_sets: Rules) -> dict[str, tuple[str, ...]]:
    """Rules of later sets override earlier ones, e.g. ``merge_rules(DEFAULT_TEACHER_RULES, {"vocab": None})``."""
    merged: dict[str, tuple[str, ...]] = {}
    for rules in rule_sets:
        merged.update(normalize_rules(rules))
    return merged


def validate_rules(rules: Rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """Normalized rules, after checking that every mesh axis they name exists in ``mesh``."""
    normalized = normalize_rules(rules)
    for logical, axes in normalized.items():
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ShardingError(f"sharding rule {logical!r} -> {axes} names mesh axis {axis!r}, but the mesh "
                                    f"axes are {tuple(mesh.axis_names)}; fix the rule or add the axis to "
                                    "MeshConfig.axes")
    return normalized


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: Rules, mesh: Mesh, *,
                    shape: Optional[Sequence[int]] = None, name: str = "array", strict: bool = False) -> PartitionSpec:
    """The `PartitionSpec` for dimensions named ``logical_axes`` under ``rules``.

    A mesh axis is used at most once per spec: a later dimension drops a mesh axis an earlier one
    already took (so a ``("embed", "embed")`` matrix shards its input dim only).

    With ``shape`` given, each sharded dimension must be divisible by its shard count (the product
    of its mesh axis sizes). ``strict=True`` raises a one-line `ShardingError` naming ``name``, the
    dim, its size and the shard count; this is what an AOT plan for a large model wants, where a
    silently replicated matrix would blow the memory budget. ``strict=False`` (the default) keeps
    the longest prefix of the dim's mesh axes that divides it -- fully replicating it if none does --
    and logs a warning; this lets one rule set serve odd sizes (a 2-label classifier, 3 kv heads).
    """
    normalized = validate_rules(rules, mesh)
    if shape is not None and len(shape) != len(logical_axes):
        raise ShardingError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for a {len(shape)}-dim "
                            f"shape {tuple(shape)}; give one logical name (or None) per dim")
    used: set[str] = set()
    entries = []
    for dim, logical in enumerate(logical_axes):
        axes = tuple(a for a in normalized.get(logical, ()) if a not in used) if logical is not None else ()
        if shape is not None and axes:
            size = int(shape[dim])
            shards = math.prod(mesh.shape[a] for a in axes)
            if size % shards:
                if strict:
                    raise ShardingError(f"param {name!r} dim {dim} ({logical}) has size {size}, not divisible by its "
                                        f"{shards} shards over mesh axes {axes}; change the rule for {logical!r} or "
                                        "use strict=False to replicate it")
                kept = axes
                while kept and size % math.prod(mesh.shape[a] for a in kept):
                    kept = kept[:-1]
                logger.warning("%s dim %d (%s) of size %d is not divisible by %d shards over %s; sharding it over %s",
                               name, dim, logical, size, shards, axes, kept or "nothing (replicated)")
                axes = kept
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]], rules: Rules, mesh: Mesh) -> jax.Array:
    """`with_sharding_constraint` by logical names, for activations: ``("act_batch", "act_len", "act_embed")``."""
    spec = logical_to_spec(logical_axes, rules, mesh, shape=x.shape, name="activation", strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def activation_constrainer(mesh: Mesh, rules: Rules) -> Callable:
    """`fn(x, logical_axes)` for `kdjax.models.activations.constraints`: activations by these rules."""
    rules = normalize_rules(rules)

    def fn(x, logical_axes):
        return constrain(x, logical_axes, rules, mesh)

    return fn


def with_activation_constraints(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`fn` traced with the models' block-boundary activations constrained by `rules` on `mesh`."""
    from kdjax.models import activations
    constrainer = activation_constrainer(mesh, rules)

    def wrapped(*args, **kwargs):
        with activations.constraints(constrainer):
            return fn(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------------------------------
# Parameter trees.


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(keypath: Sequence[Any]) -> str:
    """"embed/word/embedding" from a pytree key path; the trailing `.value` of an `nnx.Variable` is dropped."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name in ("value", "raw_value"):
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def _flat_leaves(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_name(kp), leaf) for kp, leaf in leaves]


def param_specs(abstract_params: Any, mesh: Mesh, rules: Rules, *, strict: bool = False,
                table: Sequence[tuple[str, tuple[str, ...]]] = DEFAULT_PARAM_AXES) -> Any:
    """A tree of `PartitionSpec` with the structure of ``abstract_params`` (arrays or ShapeDtypeStructs)."""
    validate_rules(rules, mesh)

    def spec(keypath, leaf):
        name = _path_name(keypath)
        logical = param_logical_axes(name, len(leaf.shape), table)
        return logical_to_spec(logical, rules, mesh, shape=leaf.shape, name=name, strict=strict)

    return jax.tree_util.tree_map_with_path(spec, abstract_params)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules, *, strict: bool = False,
                    table: Sequence[tuple[str, tuple[str, ...]]] = DEFAULT_PARAM_AXES) -> Any:
    """A tree of `NamedSharding` with the structure of ``abstract_params``, usable as jit shardings.

    ``abstract_params`` is an `nnx.State` (or any pytree) whose leaves have ``.shape``: the
    ``jax.ShapeDtypeStruct``s of `nnx.eval_shape`, or real arrays. See `logical_to_spec` for
    ``strict``.
    """
    specs = param_specs(abstract_params, mesh, rules, strict=strict, table=table)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules = ACTIVATION_RULES) -> NamedSharding:
    """Sharding of ``[B, S]`` token batches: ``act_batch`` (data+fsdp by default) by ``act_len``."""
    return NamedSharding(mesh, logical_to_spec(("act_batch", "act_len"), rules, mesh))


def sharded_init(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_TEACHER_RULES, seed: int = 0, *,
                 strict: bool = False) -> tuple[Any, nnx.State]:
    """``(graphdef, params)`` of ``Transformer(config, rngs=nnx.Rngs(seed))``, created already sharded.

    The constructor runs once abstractly for shapes and once under ``jax.jit`` with
    ``out_shardings``, so XLA computes each shard on its own device and no device ever holds more
    than its part. With ``jax_threefry_partitionable`` on, the values equal an unsharded init.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(model, nnx.Param)
    shardings = param_shardings(abstract_params, mesh, rules, strict=strict)

    def init_fn(key):
        # `nnx.Rngs(seed)` with an int seed is `nnx.Rngs(jax.random.key(seed))`; taking the key as an
        # argument keeps the seed out of the compiled program, so a new seed does not recompile.
        return nnx.split(Transformer(config, rngs=nnx.Rngs(key)), nnx.Param)[1]

    params = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, params


# --------------------------------------------------------------------------------------------------
# Overview table.


def _fmt_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.2f} {unit}"


def _fmt_spec(sharding: Any) -> str:
    if sharding is None:
        return "-"
    if isinstance(sharding, NamedSharding):
        entries = list(sharding.spec)
        if not any(e is not None for e in entries):
            return "replicated"
        parts = ["+".join(e) if isinstance(e, tuple) else ("." if e is None else str(e)) for e in entries]
        return "(" + ", ".join(parts) + ")"
    if getattr(sharding, "is_fully_replicated", False):
        return "replicated"
    return type(sharding).__name__


def param_overview(params: Any, shardings: Any = None) -> str:
    """A table of every parameter (name, shape, dtype, spec, per-device bytes) with totals.

    Shardings come from ``shardings`` (a matching tree) or else from the arrays themselves;
    without either a parameter counts as unsharded.
    """
    leaves = _flat_leaves(params)
    given = dict(_flat_leaves(shardings)) if shardings is not None else {}
    rows = []
    total_params = total_bytes = device_bytes = 0
    for name, leaf in sorted(leaves):
        shape = tuple(leaf.shape)
        dtype = np.dtype(leaf.dtype)
        sharding = given.get(name, getattr(leaf, "sharding", None))
        nbytes = math.prod(shape) * dtype.itemsize
        per_device = math.prod(sharding.shard_shape(shape)) * dtype.itemsize if sharding is not None else nbytes
        total_params += math.prod(shape)
        total_bytes += nbytes
        device_bytes += per_device
        rows.append((name, str(shape), dtype.name, _fmt_spec(sharding), _fmt_bytes(per_device)))
    header = ("param", "shape", "dtype", "sharding", "per device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(row):  # left-aligned text columns, right-aligned byte counts
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"total: {len(rows)} arrays, {total_params:,} params, {_fmt_bytes(total_bytes)} in all, "
               f"{_fmt_bytes(device_bytes)} per device")
    return "\n".join(out)


def log_param_overview(params: Any, shardings: Any = None, print_fn: Callable[[str], Any] = print) -> Optional[str]:
    """Prints `param_overview` on process 0 (other hosts print nothing) and returns the table there."""
    if jax.process_index() != 0:
        return None
    text = param_overview(params, shardings)
    print_fn(text)
    return text


# --------------------------------------------------------------------------------------------------
# Multi-host start-up and batches.

_DISTRIBUTED_STARTED = False


def detect_multihost(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why this process looks like one of several hosts (a short reason), or None on one host.

    Reads only environment variables, because anything that touches a JAX backend before
    `jax.distributed.initialize` would pin the process to single-host mode. ``KDJAX_DISTRIBUTED``
    (``1``/``0``) overrides detection, e.g. on a TPU pod whose VMs do not export host lists.
    """
    env = os.environ if environ is None else environ

    def count(value: Optional[str]) -> int:
        return len([h for h in (value or "").split(",") if h.strip()])

    def as_int(key: str) -> int:
        try:
            return int(env.get(key, "0") or 0)
        except ValueError:
            return 0

    force = env.get("KDJAX_DISTRIBUTED", "").strip().lower()
    if force in ("0", "false", "no", "off"):
        return None
    if force in ("1", "true", "yes", "on"):
        return "KDJAX_DISTRIBUTED is set"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    for key in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if count(env.get(key)) > 1:
            return f"{key} lists {count(env.get(key))} hosts"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or as_int("MEGASCALE_NUM_SLICES") > 1:
        return "MEGASCALE_* (multislice) is set"
    if "SLURM_JOB_ID" in env and as_int("SLURM_NTASKS") > 1:
        return f"SLURM job with {as_int('SLURM_NTASKS')} tasks"
    return None


def maybe_initialize_distributed(environ: Optional[Mapping[str, str]] = None, **initialize_kwargs: Any) -> bool:
    """Calls `jax.distributed.initialize()` once, and only when several hosts are detected.

    Call it first thing in a program, before any other JAX call. On one host (a laptop, a single
    TPU VM, Colab) it does nothing, so the same entry point runs everywhere. A second call, or a
    call after something else initialized the distributed runtime, is a no-op. Returns whether this
    call initialized it. ``initialize_kwargs`` go to `jax.distributed.initialize` (coordinator
    address, process count, ...) for clusters JAX does not auto-detect.
    """
    global _DISTRIBUTED_STARTED
    if _DISTRIBUTED_STARTED or jax.distributed.is_initialized():
        return False
    reason = detect_multihost(environ)
    if reason is None:
        return False
    env = os.environ if environ is None else environ
    # Plain multi-node GPU hosts (no SLURM/MPI/TPU metadata): JAX_COORDINATOR_ADDRESS plus the process
    # count and id, read here because jax.distributed.initialize() does not read the latter two itself.
    if "JAX_NUM_PROCESSES" in env and "num_processes" not in initialize_kwargs:
        initialize_kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env and "process_id" not in initialize_kwargs:
        initialize_kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    if "JAX_COORDINATOR_ADDRESS" in env and "coordinator_address" not in initialize_kwargs:
        initialize_kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    logger.info("initializing jax.distributed (%s)", reason)
    jax.distributed.initialize(**initialize_kwargs)
    _DISTRIBUTED_STARTED = True
    return True


def _fit_to_rank(sharding: Any, ndim: int) -> Any:
    """A NamedSharding trimmed (or padded with None) to ``ndim`` dims, so one sharding serves [B] and [B, S]."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)[:ndim]
    spec += (None,) * (ndim - len(spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _check_divisible(name: str, shape: tuple[int, ...], sharding: Any) -> None:
    if not isinstance(sharding, NamedSharding):
        return
    for dim, entry in enumerate(sharding.spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        shards = math.prod(sharding.mesh.shape[a] for a in axes)
        if shape[dim] % shards:
            raise ShardingError(f"batch field {name!r} dim {dim} has size {shape[dim]}, not divisible by its {shards} "
                                f"shards over mesh axes {axes}; use a global batch size that is a multiple of {shards}")


def shard_batch(batch: Mapping[str, Any], sharding: Any) -> dict[str, jax.Array]:
    """Host numpy batch -> global `jax.Array`s laid out by ``sharding``.

    ``sharding`` is one sharding for every field (its spec is trimmed to each field's rank, so
    ``[B]`` labels and ``[B, S]`` ids share it) or a mapping with one per field. In one process the
    batch is the global batch (`jax.device_put`); with several processes each host passes its own
    rows and `jax.make_array_from_process_local_data` assembles the global array.
    """
    multi_process = jax.process_count() > 1
    out = {}
    for name, value in batch.items():
        local = np.asarray(value)
        field_sharding = sharding[name] if isinstance(sharding, Mapping) else sharding
        field_sharding = _fit_to_rank(field_sharding, local.ndim)
        if multi_process:
            out[name] = jax.make_array_from_process_local_data(field_sharding, local)
        else:
            _check_divisible(name, local.shape, field_sharding)
            out[name] = jax.device_put(local, field_sharding)
    return out
