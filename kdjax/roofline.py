"""Roofline estimate of a compiled step: how long it should take on a chip, and its MFU.

`kdjax.plan` compiles the real distillation step for a target; this module reads the compiled
program and predicts its step time without running it::

    compiled = jitted.lower(*abstract_args).compile()
    cost = analyze(compiled)                         # per-device FLOPs, HBM bytes, collectives
    est = estimate(cost, CHIPS["v5p"], num_chips=64, tokens=16 * 2048,
                   model=model_flops(student, {"teacher": teacher}, (16, 2048), terms))
    print("\\n".join(format_estimate(est)))

Three lower bounds on the step time, each per device (an SPMD program is one per-device program):

* compute: XLA's FLOPs / the chip's peak bf16 FLOP/s;
* memory: XLA's bytes accessed / HBM bandwidth;
* communication: bytes each device sends in collectives / the ICI bandwidth one ring collective
  drives (ring cost model: all-gather and reduce-scatter send (n-1)/n of the full buffer,
  all-reduce 2(n-1)/n, all-to-all (n-1)/n, collective-permute its operand).

The roofline estimate is their maximum (perfect overlap); their sum is the pessimistic bound (no
overlap). MFU = analytic model FLOPs / (estimate x chips x peak), with the model FLOPs computed from
the model configs (`model_flops`), not from what XLA runs (remat recomputation is not model work).

Loops. XLA's `cost_analysis()` (CPU and TPU alike) counts a while loop's body once, whatever its trip
count: a scanned 80-layer teacher would be costed as one layer. `analyze` parses the optimized HLO
(`compiled.as_text()`, or the text `kdjax.plan` has the TPU compiler write), finds every loop's trip count (``known_trip_count`` in the loop's backend
config, else the bound its condition compares the induction variable with) and adds the missing
``trip_count - 1`` executions of each body's FLOPs (matmuls exactly, element-wise ops and reductions
at one per element, as XLA counts them) and HBM traffic; collectives are counted per execution from
the start. docs/roofline.md states the model and its limits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["CHIPS", "Chip", "Collective", "HloCost", "ModelFlops", "Roofline", "analyze", "analyze_text",
           "chip_for", "estimate", "estimate_step", "format_estimate", "model_flops", "ring_bytes_sent"]

GB = 1e9

# --------------------------------------------------------------------------------------------------
# Chips.


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peak figures of one chip (one JAX device on these targets).

    ``ici_link_bandwidth`` is bytes/s per link per direction; ``ici_links`` the links of a chip;
    ``ring_links`` how many of them one ring collective drives at once: a bidirectional ring along
    one torus axis sends half its data each way, over two links.
    """

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_link_bandwidth: float  # bytes/s per link per direction
    ici_links: int
    ring_links: int
    source: str

    @property
    def ici_bandwidth(self) -> float:
        """Bytes/s a chip can send over all its links (one direction each)."""
        return self.ici_link_bandwidth * self.ici_links

    @property
    def collective_bandwidth(self) -> float:
        """Bytes/s one ring collective sends from a chip (the communication-bound denominator)."""
        return self.ici_link_bandwidth * self.ring_links


# Published per-chip figures (Google Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/<v>):
#   v5p: 459 TFLOP/s bf16, HBM2e 2765 GB/s, ICI 4800 Gbps = 600 GB/s per direction
#        (the page's "bidirectional ICI bandwidth per chip: 1200 GBps"), 3D torus: 6 links of 100 GB/s.
#   v5e: 197 TFLOP/s bf16, HBM2 819 GB/s, ICI 1600 Gbps = 200 GB/s per direction ("400 GBps
#        bidirectional"), 4 ICI ports: 50 GB/s each.
#   v6e: 918 TFLOP/s bf16, HBM 1640 GB/s (the current page rounds it to 1638), "800 GBps bidirectional"
#        ICI = 400 GB/s per direction, 4 ICI ports: 100 GB/s each. (An earlier page gave 3584 Gbps.)
#   v4:  275 TFLOP/s bf16, HBM2 1200 GB/s (the Cloud page; 1228 GB/s is sometimes quoted). The Cloud page
#        gives no per-chip ICI figure; 6 links of 50 GB/s per direction (2400 Gbps per chip) follow the
#        TPU v4 paper (Jouppi et al., ISCA 2023) and are the least certain entry here.
#   h100: cpu:N stand-in (an 8-GPU box): H100 SXM dense bf16 989 TFLOP/s, HBM3 3350 GB/s, NVLink 4
#        900 GB/s bidirectional = 18 links of 25 GB/s per direction; NVSwitch lets a ring use them all.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1200 * GB, 50 * GB, 6, 2, "cloud.google.com/tpu/docs/v4; ICI: TPU v4 paper"),
    "v5e": Chip("TPU v5e", 197e12, 819 * GB, 50 * GB, 4, 2, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765 * GB, 100 * GB, 6, 2, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 1640 * GB, 100 * GB, 4, 2, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("H100 SXM (cpu:N stand-in)", 989e12, 3350 * GB, 25 * GB, 18, 18, "NVIDIA H100 datasheet"),
}


def chip_for(generation: Optional[str]) -> Chip:
    """The chip of a TPU generation (``"v5p"``); cpu:N plans (``None``) use the H100 figures."""
    return CHIPS[generation] if generation else CHIPS["h100"]


# --------------------------------------------------------------------------------------------------
# HLO text.

_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
             "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=?]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no HBM data of their own (views, control flow whose bodies are costed apart).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-start",
               "async-update", "async-done", "copy-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "send-done", "recv-done"}


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _ITEMSIZE:
            out.append((dtype, tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.replace("<=", "").isdigit())))
    return out


def _nbytes(shape: str) -> float:
    return sum(math.prod(dims) * _ITEMSIZE[dtype] for dtype, dims in _arrays(shape))


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class _Module:
    computations: dict[str, list[_Instr]]
    entry: str
    num_partitions: int

    def by_name(self, computation: str) -> dict[str, _Instr]:
        return {i.name: i for i in self.computations[computation]}


def _split_call(rest: str, start: int) -> tuple[str, str]:
    """``(operands text, attributes text)`` from the ``(`` at ``start``."""
    depth = 0
    for k in range(start, len(rest)):
        if rest[k] == "(":
            depth += 1
        elif rest[k] == ")":
            depth -= 1
            if depth == 0:
                return rest[start + 1:k], rest[k + 1:]
    return rest[start + 1:], ""


def parse_hlo(text: str) -> _Module:
    """The computations of an HLO module's text, each a list of instructions."""
    computations: dict[str, list[_Instr]] = {}
    entry, current = "", None
    m = re.search(r"num_partitions=(\d+)", text)
    num_partitions = int(m.group(1)) if m else 1
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = h.group(2)
                computations[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        im = _INSTR.match(line)
        if not im:
            continue
        name, rest = im.group(1), im.group(2)
        om = _OPCODE.search(rest)
        if not om:
            continue
        operands, attrs = _split_call(rest, om.end() - 1)
        computations[current].append(_Instr(name=name, shape=rest[:om.start()], opcode=om.group(1),
                                            operands=re.findall(r"%([^\s,)]+)", operands), attrs=attrs))
    return _Module(computations, entry, num_partitions)


def _attr(attrs: str, key: str) -> Optional[str]:
    m = re.search(rf"\b{key}=%?([^\s,]+)", attrs)
    return m.group(1) if m else None


def _called(instr: _Instr) -> list[tuple[str, str]]:
    """``[(role, computation)]`` an instruction calls: body, condition, calls, branch."""
    out = []
    for role in ("body", "condition", "calls"):
        name = _attr(instr.attrs, role)
        if name:
            out.append((role, name))
    for role in ("true_computation", "false_computation"):
        name = _attr(instr.attrs, role)
        if name:
            out.append(("branch", name))
    m = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
    if m:
        out.extend(("branch", n.strip().lstrip("%")) for n in m.group(1).split(",") if n.strip())
    return out


def _scalar_constants(module: _Module, computation: str, text_of: Mapping[str, str], seen=None) -> list[int]:
    """Integer scalar constants of a computation and the computations it calls."""
    seen = set() if seen is None else seen
    if computation in seen or computation not in module.computations:
        return []
    seen.add(computation)
    values = []
    for instr in module.computations[computation]:
        if instr.opcode == "constant" and re.match(r"\s*[su](8|16|32|64)\[\]", instr.shape):
            m = re.search(r"constant\((-?\d+)\)", text_of.get(instr.name, ""))
            if m:
                values.append(int(m.group(1)))
        for _, callee in _called(instr):
            values.extend(_scalar_constants(module, callee, text_of, seen))
    return values


def _trip_count(module: _Module, caller: str, loop: _Instr, text_of: Mapping[str, str]) -> Optional[int]:
    """A while loop's trip count: ``known_trip_count``, else ``bound - init`` read from its condition."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if m:
        return int(m.group(1))
    condition = _attr(loop.attrs, "condition")
    bounds = _scalar_constants(module, condition, text_of) if condition else []
    if len(set(bounds)) != 1:
        return None
    bound = bounds[0]
    direction = re.search(r"direction=(LT|LE|GT|GE|NE)", "".join(text_of.get(i.name, "")
                                                                 for i in module.computations.get(condition, [])))
    # The induction variable's start: the constant (through copies) the loop's init tuple holds.
    init = 0
    local = module.by_name(caller)
    tuple_instr = local.get(loop.operands[0]) if loop.operands else None
    if tuple_instr is not None and tuple_instr.opcode == "tuple" and tuple_instr.operands:
        first = local.get(tuple_instr.operands[0])
        while first is not None and first.opcode == "copy" and first.operands:
            first = local.get(first.operands[0])
        if first is not None and first.opcode == "constant":
            c = re.search(r"constant\((-?\d+)\)", text_of.get(first.name, ""))
            init = int(c.group(1)) if c else 0
    trips = bound - init + (1 if direction and direction.group(1) == "LE" else 0)
    return trips if trips > 0 else None


# --------------------------------------------------------------------------------------------------
# Costs.


def ring_bytes_sent(kind: str, buffer_bytes: float, group_size: int) -> float:
    """Bytes one device sends in a ring collective over ``group_size`` devices.

    ``buffer_bytes`` is the full (unsharded) buffer: the all-gather's result, the reduce-scatter's,
    all-reduce's and all-to-all's operand; a collective-permute sends its operand once.
    """
    n = group_size
    if kind == "collective-permute":
        return float(buffer_bytes)
    if n <= 1:
        return 0.0
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
              "all-to-all": (n - 1) / n}[kind]
    return factor * buffer_bytes


def _group_size(attrs: str, num_partitions: int) -> int:
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        axes = re.findall(r"'([^']+)'", mesh.group(2))
        return math.prod(sizes.get(a, 1) for a in axes) if axes else num_partitions
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if iota:
        return int(iota.group(1).split(",")[-1])
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if listed:
        return len([x for x in listed.group(1).split(",") if x.strip()])
    return num_partitions  # replica_groups={} : every device


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the optimized program and what it sends per device."""

    kind: str
    name: str
    computation: str
    executions: int  # per step (loop trip counts multiplied in)
    group_size: int
    buffer_bytes: float  # the full buffer the ring model applies to
    bytes_sent: float  # per execution, per device

    @property
    def total_bytes(self) -> float:
        return self.executions * self.bytes_sent


@dataclasses.dataclass(frozen=True)
class HloCost:
    """Per-device costs of one step.

    ``flops`` / ``bytes_accessed``: XLA's cost analysis with the loop bodies' missing executions added
    (``xla_flops`` / ``xla_bytes``: as XLA reports them, each loop body once). ``collectives``: every
    collective with its per-step executions. ``loops``: ``(body, trip count or None if unknown)``.
    """

    flops: float
    bytes_accessed: float
    xla_flops: float
    xla_bytes: float
    collectives: tuple[Collective, ...]
    loops: tuple[tuple[str, Optional[int]], ...]

    @property
    def comm_bytes(self) -> float:
        return float(sum(c.total_bytes for c in self.collectives))

    def comm_bytes_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0.0) + c.total_bytes
        return out

    @property
    def unknown_trip_counts(self) -> int:
        return sum(1 for _, n in self.loops if n is None)


# Element-wise opcodes XLA's cost analysis counts at one FLOP per result element (transcendentals such
# as exp, log and tanh are counted apart by XLA, and here not at all).
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "compare", "select", "negate",
                "abs", "clamp", "power", "remainder", "and", "or", "xor", "not", "sign", "floor", "ceil",
                "round-nearest-even", "atan2"}


def _instr_flops(instr: _Instr, local: Mapping[str, _Instr]) -> float:
    """FLOPs of one instruction: matmuls exactly, element-wise ops and reductions one per element."""
    if instr.opcode in ("dot", "convolution"):
        return _dot_flops(instr, local)
    if instr.opcode in _ELEMENTWISE:
        return float(sum(math.prod(d) for _, d in _arrays(instr.shape)))
    if instr.opcode in ("reduce", "reduce-window") and instr.operands and instr.operands[0] in local:
        return float(sum(math.prod(d) for _, d in _arrays(local[instr.operands[0]].shape)))
    return 0.0


def _dot_flops(instr: _Instr, local: Mapping[str, _Instr]) -> float:
    out = _arrays(instr.shape)
    if not out:
        return 0.0
    out_elems = math.prod(out[0][1])
    if instr.opcode == "dot":
        lhs = local.get(instr.operands[0]) if instr.operands else None
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        if lhs is None or not m or not _arrays(lhs.shape):
            return 0.0
        dims = _arrays(lhs.shape)[0][1]
        contract = math.prod(dims[int(d)] for d in m.group(1).split(",") if d)
        return 2.0 * out_elems * contract
    if instr.opcode == "convolution" and len(instr.operands) > 1:
        return _conv_flops(instr, local, out[0][1])
    return 0.0


def _window(attrs: str, key: str, count: int, default: Any) -> list:
    m = re.search(rf"\b{key}=([0-9_x\-]+)", attrs)
    if not m:
        return [default] * count
    parts = m.group(1).split("x")
    if key == "pad":
        return [tuple(int(v) for v in p.split("_")) for p in parts]
    return [int(p) for p in parts]


def _conv_flops(instr: _Instr, local: Mapping[str, _Instr], out_dims: tuple[int, ...]) -> float:
    """FLOPs of a convolution: 2 x multiply-adds over the kernel taps that meet real input.

    The TPU compiler writes batched matmuls (attention's QK^T and AV, per-layer weight gradients) as
    convolutions whose batch dimensions are spatial dimensions with ``lhs_dilate`` = window size, so
    every output meets exactly one of a window's taps; counting whole windows would overcount by the
    batch size. Each spatial dimension's (output position, tap) pairs that land on an input element
    (not on dilation holes or padding) are counted, as XLA's own cost analysis does.
    """
    lhs, rhs = local.get(instr.operands[0]), local.get(instr.operands[1])
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", instr.attrs)
    if lhs is None or rhs is None or not labels or not _arrays(lhs.shape) or not _arrays(rhs.shape):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs_dims, rhs_dims = _arrays(lhs.shape)[0][1], _arrays(rhs.shape)[0][1]
    if len(lhs_dims) != len(lhs_l) or len(rhs_dims) != len(rhs_l) or len(out_dims) != len(out_l):
        return 0.0
    spatial = [c for c in out_l if c.isdigit()]
    n = len(spatial)
    strides = _window(instr.attrs, "stride", n, 1)
    pads = _window(instr.attrs, "pad", n, (0, 0))
    lhs_dilate = _window(instr.attrs, "lhs_dilate", n, 1)
    rhs_dilate = _window(instr.attrs, "rhs_dilate", n, 1)
    taps, out_spatial = 1, 1
    for k, c in enumerate(sorted(spatial, key=int)):
        size_in, size_w, size_out = lhs_dims[lhs_l.index(c)], rhs_dims[rhs_l.index(c)], out_dims[out_l.index(c)]
        dl, dr, stride, low = lhs_dilate[k], rhs_dilate[k], strides[k], pads[k][0]
        extent = (size_in - 1) * dl + 1
        if size_out * size_w > 1_000_000:  # a real image convolution: whole windows, no holes
            pairs = size_out * size_w
        else:
            pairs = sum(1 for o in range(size_out) for w in range(size_w)
                        if 0 <= o * stride + w * dr - low < extent and (o * stride + w * dr - low) % dl == 0)
        taps *= pairs
        out_spatial *= size_out
    kernel_in = rhs_dims[rhs_l.index("i")]
    return 2.0 * math.prod(out_dims) / max(out_spatial, 1) * taps * kernel_in


def _fused_param_bytes(module: _Module, fused: str, index: int, full: float) -> float:
    """HBM bytes a fusion reads of operand ``index``: only the slices taken when it is only sliced."""
    instrs = module.computations.get(fused, [])
    param = next((i for i in instrs if i.opcode == "parameter" and _param_index(i) == index), None)
    if param is None:
        return full
    users = [i for i in instrs if param.name in i.operands]
    if not users:
        return full
    total = 0.0
    for u in users:
        if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == param.name:
            total += _nbytes(u.shape)
        elif u.opcode == "dynamic-update-slice" and u.operands[0] == param.name:
            pass  # updated in place: the update is counted as the fusion's output
        elif u.opcode == "fusion" and _attr(u.attrs, "calls") in module.computations:
            # A nested fusion (TPU): what it reads of this operand.
            total += sum(_fused_param_bytes(module, _attr(u.attrs, "calls"), k, full)
                         for k, o in enumerate(u.operands) if o == param.name)
        else:
            return full
    return min(total, full)


def _param_index(instr: _Instr) -> int:
    return getattr(instr, "_index", -1)


def _traffic(module: _Module, instr: _Instr, local: Mapping[str, _Instr]) -> float:
    """HBM bytes one execution of a (non-fused) instruction reads and writes."""
    op = instr.opcode
    if op in _NO_TRAFFIC:
        return 0.0
    out = _nbytes(instr.shape)
    operand_bytes = [_nbytes(local[o].shape) if o in local else 0.0 for o in instr.operands]
    if op in ("dynamic-slice", "slice", "gather"):
        return 2.0 * out
    if op == "dynamic-update-slice":
        update = operand_bytes[1] if len(operand_bytes) > 1 else out
        return 2.0 * update
    if op == "fusion":
        fused = _attr(instr.attrs, "calls")
        if fused in module.computations:
            reads = sum(_fused_param_bytes(module, fused, k, b) for k, b in enumerate(operand_bytes))
            root = module.computations[fused][-1] if module.computations[fused] else None
            fused_local = module.by_name(fused)
            if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
                update = fused_local.get(root.operands[1])
                out = _nbytes(update.shape) if update is not None else out
            return reads + out
    if op.endswith("-start") and op != "copy-start":
        return sum(operand_bytes) + out / 2.0  # the result tuple repeats the operand
    return sum(operand_bytes) + out


def _index_parameters(module: _Module, text_of: Mapping[str, str]) -> None:
    for instrs in module.computations.values():
        for i in instrs:
            if i.opcode == "parameter":
                m = re.search(r"parameter\((\d+)\)", text_of.get(i.name, ""))
                i._index = int(m.group(1)) if m else -1  # type: ignore[attr-defined]


def _root_names(text: str) -> dict[str, str]:
    """``{instruction name: its line}`` (constants' values and compare directions are read from it)."""
    out = {}
    for line in text.splitlines():
        im = _INSTR.match(line)
        if im:
            out[im.group(1)] = line
    return out


def _executions(module: _Module, text_of: Mapping[str, str], loops: bool) -> tuple[dict[str, float], dict, set]:
    """``({computation: executions per step}, {while body: trip count}, fused computation names)``.

    Computations are printed callees first, so walking them in reverse meets every caller before its
    callees. Reducers (``to_apply``) are not walked: their cost is their caller's.
    """
    counts: dict[str, float] = {name: 0.0 for name in module.computations}
    counts[module.entry] = 1.0
    trips: dict[str, Optional[int]] = {}
    fused: set = set()
    for name in reversed(list(module.computations)):
        n = counts.get(name, 0.0)
        for instr in module.computations[name]:
            for role, callee in _called(instr):
                if callee not in counts:
                    continue
                factor = 1.0
                if instr.opcode == "while":
                    trip = _trip_count(module, name, instr, text_of)
                    if role == "body":
                        trips[callee] = trip
                    if loops and trip:
                        factor = float(trip) + (1.0 if role == "condition" else 0.0)
                if instr.opcode == "fusion" and role == "calls":
                    fused.add(callee)
                counts[callee] += n * factor
    return counts, trips, fused


def _xla_costs(compiled: Any) -> tuple[float, float]:
    stats = compiled.cost_analysis()
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else {}
    stats = dict(stats or {})
    return float(stats.get("flops", 0.0)), float(stats.get("bytes accessed", 0.0))


def analyze_text(text: str, xla_flops: float, xla_bytes: float) -> HloCost:
    """`HloCost` from an optimized HLO module's text and XLA's own (loop-once) flops and bytes."""
    module = parse_hlo(text)
    text_of = _root_names(text)
    _index_parameters(module, text_of)
    with_loops, trips, fused = _executions(module, text_of, loops=True)
    flat, _, _ = _executions(module, text_of, loops=False)
    extra_flops = extra_bytes = 0.0
    collectives = []
    for name, instrs in module.computations.items():
        extra = with_loops[name] - flat[name]
        local = {i.name: i for i in instrs}
        if extra:
            extra_flops += extra * sum(_instr_flops(i, local) for i in instrs)
            if name not in fused:
                extra_bytes += extra * sum(_traffic(module, i, local) for i in instrs)
        for instr in instrs:
            kind = next((k for k in COLLECTIVES if instr.opcode in (k, f"{k}-start")), None)
            if kind is None or not with_loops[name]:
                continue
            operand = sum(_nbytes(local[o].shape) for o in instr.operands if o in local)
            n = _group_size(instr.attrs, module.num_partitions)
            if kind == "collective-permute":
                pairs = re.findall(r"\{(\d+),(\d+)\}", instr.attrs.split("source_target_pairs=")[-1].split("}}")[0] + "}")
                moves = any(a != b for a, b in pairs) if pairs else True
                buffer = operand if moves else 0.0
            elif kind == "all-gather":
                buffer = operand * n
            else:
                buffer = operand
            collectives.append(Collective(kind=kind, name=instr.name, computation=name,
                                          executions=int(round(with_loops[name])), group_size=n,
                                          buffer_bytes=buffer, bytes_sent=ring_bytes_sent(kind, buffer, n)))
    loops = tuple(sorted((body, trip) for body, trip in trips.items()))
    return HloCost(flops=xla_flops + extra_flops, bytes_accessed=xla_bytes + extra_bytes, xla_flops=xla_flops,
                   xla_bytes=xla_bytes, collectives=tuple(collectives), loops=loops)


def analyze(compiled: Any, hlo_text: Optional[str] = None) -> HloCost:
    """`HloCost` of a compiled executable (``jax.jit(f).lower(...).compile()``), per device.

    `hlo_text`: its optimized HLO when already at hand (`kdjax.plan` has the TPU compiler write it out).
    """
    flops, nbytes = _xla_costs(compiled)
    return analyze_text(hlo_text if hlo_text is not None else compiled.as_text(), flops, nbytes)


# --------------------------------------------------------------------------------------------------
# Model FLOPs.


def matmul_params(config: Any) -> int:
    """Weights that multiply every token: the layers' projections and the vocabulary head.

    Embedding lookups, norms and biases are not matmuls; a pooler or classifier sees one token per
    sequence and is left out (its FLOPs are a 1/S share).
    """
    d, f, h, kv, hd = (config.hidden_size, config.intermediate_size, config.num_heads, config.kv_heads,
                       config.dim_per_head)
    layer = d * h * hd + 2 * d * kv * hd + h * hd * d + (3 if config.gated_mlp else 2) * d * f
    head = 0
    if config.head == "causal_lm":
        head = config.vocab_size * d
    elif config.head == "mlm":
        head = config.vocab_size * d + d * d
    return int(config.num_layers * layer + head)


def attention_flops(config: Any, batch: int, seq: int) -> float:
    """Forward FLOPs of the score and context matmuls: 4 x B x S x S' x heads x head_dim per layer.

    S' is the attended length: the full sequence (the causal mask is applied to a full score matrix,
    so masked entries are computed too), or the sliding window when there is one.
    """
    attended = min(seq, config.sliding_window) if config.sliding_window else seq
    return 4.0 * batch * seq * attended * config.num_heads * config.dim_per_head * config.num_layers


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Analytic FLOPs of one step by part (what the step must do, without remat recomputation)."""

    teacher_forward: float  # 2 x matmul params x tokens + attention, per teacher
    student_forward_backward: float  # 3 x (2 x matmul params x tokens + attention)
    loss: float  # logit terms over the vocabulary: LOSS_FLOPS_PER_LOGIT x B x S x V
    optimizer: float  # OPTIMIZER_FLOPS_PER_PARAM x trainable parameters

    @property
    def total(self) -> float:
        return self.teacher_forward + self.student_forward_backward + self.loss + self.optimizer


# Logit divergence, forward and backward: two float32 log-softmaxes over V (max, subtract, exp, sum,
# log, subtract: ~5 FLOPs per logit each), the divergence (~3 per logit) and its gradient (~3): ~16.
LOSS_FLOPS_PER_LOGIT = 16
# AdamW with clipping: two moment updates (3 + 4), bias corrections, sqrt, divide, weight decay, the
# update and the global norm's square-and-add: ~14 FLOPs per parameter.
OPTIMIZER_FLOPS_PER_PARAM = 14


def model_flops(student: Any, teachers: Mapping[str, Any], batch_shape: Sequence[int],
                terms: Iterable[Any] = (), trainable_params: Optional[int] = None) -> ModelFlops:
    """`ModelFlops` of one step for ``student`` distilled from ``teachers`` on ``batch_shape`` tokens.

    ``terms``: the stage's terms; those on ``logits`` over a vocabulary add the loss FLOPs.
    """
    b, s = int(batch_shape[0]), int(batch_shape[1])
    tokens = b * s
    teacher = sum(2.0 * matmul_params(t) * tokens + attention_flops(t, b, s) for t in teachers.values())
    student_fwd = 2.0 * matmul_params(student) * tokens + attention_flops(student, b, s)
    vocab_logits = any(getattr(t, "source", None) == "logits" for t in terms) and \
        student.head in ("causal_lm", "mlm")
    loss = float(LOSS_FLOPS_PER_LOGIT * tokens * student.vocab_size * max(1, len(teachers))) if vocab_logits else 0.0
    params = student.num_params() if trainable_params is None else trainable_params
    return ModelFlops(teacher_forward=teacher, student_forward_backward=3.0 * student_fwd, loss=loss,
                      optimizer=float(OPTIMIZER_FLOPS_PER_PARAM * params))


# --------------------------------------------------------------------------------------------------
# The estimate.


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A predicted step time on ``num_chips`` x ``chip`` -- an estimate, not a measurement."""

    chip: Chip
    num_chips: int
    tokens: int
    cost: HloCost
    model: ModelFlops

    @property
    def compute_seconds(self) -> float:
        return self.cost.flops / self.chip.peak_flops

    @property
    def memory_seconds(self) -> float:
        return self.cost.bytes_accessed / self.chip.hbm_bandwidth

    @property
    def comm_seconds(self) -> float:
        return self.cost.comm_bytes / self.chip.collective_bandwidth

    @property
    def step_seconds(self) -> float:
        """The roofline: the slowest of compute, memory and communication (perfect overlap)."""
        return max(self.compute_seconds, self.memory_seconds, self.comm_seconds)

    @property
    def serial_seconds(self) -> float:
        """The pessimistic bound: nothing overlaps."""
        return self.compute_seconds + self.memory_seconds + self.comm_seconds

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_seconds, "memory": self.memory_seconds, "communication": self.comm_seconds}
        return max(times, key=times.get)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds

    @property
    def mfu(self) -> float:
        """Model FLOPs / (predicted step time x chips x peak)."""
        return self.model.total / (self.step_seconds * self.num_chips * self.chip.peak_flops)

    @property
    def mfu_serial(self) -> float:
        return self.model.total / (self.serial_seconds * self.num_chips * self.chip.peak_flops)

    def as_dict(self) -> dict[str, float]:
        return dict(compute_seconds=self.compute_seconds, memory_seconds=self.memory_seconds,
                    comm_seconds=self.comm_seconds, step_seconds=self.step_seconds,
                    serial_seconds=self.serial_seconds, tokens_per_second=self.tokens_per_second, mfu=self.mfu,
                    flops_per_device=self.cost.flops, bytes_per_device=self.cost.bytes_accessed,
                    comm_bytes_per_device=self.cost.comm_bytes, model_flops=self.model.total)


def estimate(cost: HloCost, chip: Chip, num_chips: int, tokens: int, model: ModelFlops) -> Roofline:
    """The roofline of a step whose per-device `HloCost` is ``cost`` on ``num_chips`` chips."""
    return Roofline(chip=chip, num_chips=int(num_chips), tokens=int(tokens), cost=cost, model=model)


def _seconds(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.2f} us"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s"


def _flops(x: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def _bytes(x: float) -> str:
    for scale, unit in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def format_estimate(r: Roofline) -> list[str]:
    """Report lines (all ESTIMATES from the compiled program and the chip's published peaks)."""
    c, m = r.cost, r.model
    kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(r.cost.comm_bytes_by_kind().items()) if v)
    loops = ", ".join(str(n) if n else "?" for _, n in c.loops) or "none"
    share = lambda x: f"{100.0 * x / m.total:.1f}%" if m.total else "-"  # noqa: E731
    return [
        f"estimate chip:   {r.chip.name}: {r.chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"HBM {r.chip.hbm_bandwidth / GB:.0f} GB/s, ICI {r.chip.collective_bandwidth / GB:.0f} GB/s per ring "
        f"({r.chip.ring_links} of {r.chip.ici_links} links x {r.chip.ici_link_bandwidth / GB:.0f} GB/s)",
        f"per device:      {_flops(c.flops)} (XLA, loops x trip counts {loops}), {_bytes(c.bytes_accessed)} HBM "
        f"traffic, {_bytes(c.comm_bytes)} sent in collectives ({kinds or 'none'})",
        f"compute time:    {_seconds(r.compute_seconds)}  (estimate: FLOPs / peak)",
        f"memory time:     {_seconds(r.memory_seconds)}  (estimate: bytes / HBM bandwidth)",
        f"comm time:       {_seconds(r.comm_seconds)}  (estimate: ring collectives / ICI bandwidth)",
        f"step time:       {_seconds(r.step_seconds)} ESTIMATE ({r.bound}-bound roofline; "
        f"{_seconds(r.serial_seconds)} if nothing overlaps)",
        f"throughput:      {r.tokens_per_second:,.0f} tokens/s ESTIMATE ({r.tokens:,} tokens per step)",
        f"MFU:             {100.0 * r.mfu:.1f}% ESTIMATE ({100.0 * r.mfu_serial:.1f}% without overlap) of "
        f"{_flops(m.total)} model FLOPs per step",
        f"model FLOPs:     teacher forward {share(m.teacher_forward)}, student fwd+bwd "
        f"{share(m.student_forward_backward)}, loss {share(m.loss)}, optimizer {share(m.optimizer)}",
    ]


def estimate_step(compiled: Any, step: Any, generation: Optional[str], num_chips: int,
                  hlo_text: Optional[str] = None) -> Roofline:
    """The roofline of a compiled `kdjax.distill.sharded.ShardedStep` (what `kdjax.plan` reports)."""
    import jax

    batch = next(iter(step.abstract_batch.values())).shape
    batch_shape = (int(batch[0]), int(batch[1]))
    trainable = int(sum(math.prod(x.shape) for x in jax.tree.leaves((step.abstract_state.params,
                                                                      step.abstract_state.modules))))
    model = model_flops(step.student_config, step.teacher_configs, batch_shape, step.terms,
                        trainable_params=trainable)
    return estimate(analyze(compiled, hlo_text), chip_for(generation), num_chips, batch_shape[0] * batch_shape[1],
                    model)
