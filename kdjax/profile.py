"""Where a compiled step's time goes: trace a few calls, sum the time of each XLA op, map it back to the step.

    breakdown = profile_calls(step, state, teacher_params, batch, calls=3, directory="workdir/profile")
    print(format_breakdown(breakdown))

`profile_calls` traces `calls` calls of a jitted function with `jax.profiler` (the trace is kept in
`directory` for TensorBoard / XProf) and reads the events back. Every event named after an instruction
of the compiled program is attributed to

- a **part** of the step, read from the instruction's `op_name` metadata, i.e. from the named scopes
  the step is built with (`kdjax.distill.step`): `teacher` (`teacher_<name>/`), `loss terms`
  (`term_<name>/`, forward and backward), `student backward` (`transpose(jvp(...))`), `student
  forward` (the rest under `jvp(...)`) and `optimizer and other` (the update, metrics, casts);
- a **kind**: `matmul` (a dot or convolution, or a fusion that contains one) or `other`
  (elementwise, reductions, copies, scatters);

and to the FLOPs of its matmuls (counted as `kdjax.roofline` counts them), so each row also says at what
rate its matmuls ran. XLA names a fusion after its root op, so a fusion of a loss term's first ops into
the student's last ones is charged to the part of whichever op it ends with.

Time is wall time: at every instant it is split equally between the ops running then (on a multi-core
CPU the runtime runs independent ops side by side and splits large dots across cores), so the rows add
up to the time during which any op ran, and a dot's rate is what the machine did for it.
`Breakdown.wall_s` is the measured time per call, `busy_s` the part of it with ops running.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

PARTS = ("teacher", "student forward", "student backward", "loss terms", "optimizer and other")
KINDS = ("matmul", "other")


class ProfileError(RuntimeError):
    """The trace cannot be taken or read."""


# --------------------------------------------------------------------------------------------------
# The compiled program: which instruction is which part, which kind, how many FLOPs


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    part: str
    kind: str
    flops: float
    op_name: str
    opcode: str = ""


def part_of(op_name: str) -> str:
    """The part of a KD step an instruction belongs to, from its `op_name` (the scopes of the step)."""
    if "/teacher_" in op_name or op_name.startswith("teacher_"):
        return "teacher"
    if "/term_" in op_name:
        return "loss terms"
    if "transpose(" in op_name:
        return "student backward"
    if "jvp(" in op_name or "/student/" in op_name:
        return "student forward"
    return "optimizer and other"


def instructions(hlo_text: str) -> dict[str, Instruction]:
    """Every instruction of an optimized HLO module that runs on its own, by name: its part, kind and matmul FLOPs.

    The text is read by `kdjax.roofline`'s HLO parser and its dots and convolutions are counted by the same
    code as the roofline's. A fusion counts the matmuls of the computation it calls (and of fusions nested
    in it), so a fused matmul is one `matmul` instruction with its FLOPs; the fused computations' own
    instructions are not listed.
    """
    from kdjax import roofline

    module = roofline.parse_hlo(hlo_text)
    comps = module.computations
    if not comps:
        raise ProfileError("no HLO computations found in the program text; pass the optimized HLO of the "
                           "traced program (`jit(f).lower(...).compile().as_text()`)")
    local = {c: module.by_name(c) for c in comps}

    def matmul_flops(ins, comp: str) -> float:
        if ins.opcode == "fusion":
            return sum(fused_flops(c) for _, c in roofline._called(ins))
        return roofline._dot_flops(ins, local[comp])

    own: dict[str, float] = {}

    def fused_flops(comp: str) -> float:
        if comp not in own:
            own[comp] = 0.0  # (a cycle cannot occur in HLO; this only guards the recursion)
            own[comp] = sum(matmul_flops(ins, comp) for ins in comps.get(comp, []))
        return own[comp]

    # A fusion's body runs as the fusion: its instructions never run (or appear in a trace) on their own.
    fused = {c for instrs in comps.values() for ins in instrs if ins.opcode == "fusion" for _, c in roofline._called(ins)}
    out: dict[str, Instruction] = {}
    for comp, instrs in comps.items():
        if comp in fused:
            continue
        for ins in instrs:
            flops = matmul_flops(ins, comp)
            m = re.search(r'op_name="([^"]*)"', ins.attrs)
            op_name = m.group(1) if m else ""
            out[ins.name] = Instruction(ins.name, part_of(op_name), "matmul" if flops > 0 else "other", flops,
                                        op_name, ins.opcode)
    return out


# --------------------------------------------------------------------------------------------------
# The trace


@dataclasses.dataclass
class Row:
    part: str
    kind: str
    seconds: float  # wall time per call charged to these ops (shared equally between ops running together)
    flops: float  # dot FLOPs per call

    @property
    def gflops_per_s(self) -> Optional[float]:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 and self.flops else None


@dataclasses.dataclass
class Breakdown:
    rows: list[Row]
    top_ops: list[tuple[str, str, str, float, float]]  # (name, part, kind, seconds per call, flops)
    calls: int
    wall_s: Optional[float] = None  # measured seconds per call (None when not timed)
    busy_s: float = 0.0  # per call: wall time charged to ops (one running, or a plain dot's pool tasks)
    trace_dir: Optional[str] = None
    last_args: Any = dataclasses.field(default=None, repr=False)  # `profile_calls`: the threaded arguments after
    # the traced calls (a donating step's live state)

    def share(self, part: Optional[str] = None, kind: Optional[str] = None) -> float:
        """Fraction of the time with ops running that went to `part` and/or `kind`."""
        total = sum(r.seconds for r in self.rows)
        sel = sum(r.seconds for r in self.rows if (part is None or r.part == part) and (kind is None or r.kind == kind))
        return sel / total if total else 0.0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "wall_s": self.wall_s, "busy_s": self.busy_s,
                "trace_dir": self.trace_dir,
                "rows": [{"part": r.part, "kind": r.kind, "seconds": r.seconds, "flops": r.flops,
                          "share": self.share(r.part, r.kind), "gflops_per_s": r.gflops_per_s} for r in self.rows],
                "top_ops": [{"name": n, "part": p, "kind": k, "seconds": s, "flops": f}
                            for n, p, k, s, f in self.top_ops]}


# Events of the runtime itself: a call's window on the calling thread (XLA:CPU's thunk executor).
_CALL_EVENT = "ThunkExecutor::Execute (wait for completion)"


def _read_trace(xplane_path: str, names: Mapping[str, Any]) -> tuple[list[list[tuple[int, int, str]]],
                                                                      list[tuple[int, int]], bool]:
    """Per trace line (thread or stream): the (start ns, end ns, name) of its events that name an op of
    `names`; the windows of the traced calls where the runtime marks them; whether there was any event."""
    import jax

    data = jax.profiler.ProfileData.from_file(xplane_path)
    lines, windows, seen = [], [], False
    for plane in data.planes:
        for line in plane.lines:
            ops = []
            for event in line.events:
                seen = True
                if event.name in names:
                    ops.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
                elif event.name == _CALL_EVENT:
                    windows.append((event.start_ns, event.start_ns + event.duration_ns))
            if ops:
                lines.append(ops)
    return lines, windows, seen


def _innermost(ops: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """One line's events flattened into disjoint segments, each given to the innermost event running then
    (a loop op's events contain its body's)."""
    bounds = sorted({t for s, e, _ in ops for t in (s, e)})
    ops = sorted(ops)
    out, active, i = [], [], 0
    for lo, hi in zip(bounds, bounds[1:]):
        while i < len(ops) and ops[i][0] <= lo:
            active.append(ops[i])
            i += 1
        active = [o for o in active if o[1] > lo]
        if active:
            out.append((lo, hi, max(active, key=lambda o: o[0])[2]))
    return out


def _wall_shares(lines: list[list[tuple[int, int, str]]], *, windows: Sequence[tuple[int, int]] = (),
                 asynchronous: Callable[[str], bool] = lambda name: False) -> tuple[collections.Counter, int]:
    """ns of wall time per op, each instant split equally between the ops running on all lines then, and
    the ns charged in all.

    Some ops only start their work on the runtime's threads and return (XLA:CPU runs a plain `dot`
    through Eigen's thread pool, whose tasks carry no op event): a stretch inside a call's `windows` with
    no op running is charged to the last such `asynchronous` op started before it. Stretches outside
    the windows, or with no such op since the window opened, are charged to nothing (idle).
    """
    points = []
    for ops in lines:
        for s, e, name in _innermost(ops):
            points += [(s, 1, name), (e, -1, name)]
    points.sort(key=lambda p: (p[0], p[1]))
    windows = sorted(windows)
    shares: collections.Counter = collections.Counter()
    running: collections.Counter = collections.Counter()
    busy, last, pending, w = 0, None, None, 0
    for t, delta, name in points:
        n = sum(running.values())
        if last is not None and t > last:
            if n:
                for op, k in running.items():
                    shares[op] += (t - last) * k / n
                busy += t - last
            elif pending is not None:  # nothing traced ran: the pending asynchronous op's work, within its call
                while w < len(windows) and windows[w][1] <= last:
                    w += 1
                if w < len(windows) and windows[w][0] <= last and t <= windows[w][1] and pending[1] >= windows[w][0]:
                    shares[pending[0]] += t - last
                    busy += t - last
        if delta > 0 and asynchronous(name):
            pending = (name, t)
        running[name] += delta
        if running[name] == 0:
            del running[name]
        last = t
    return shares, busy


def breakdown_from_trace(xplane_path: str, hlo_text: str, *, calls: int, wall_s: Optional[float] = None,
                         top: int = 12) -> Breakdown:
    """Attribute the trace's wall time to the parts and kinds of the program whose optimized HLO is `hlo_text`.

    At every instant the wall time is split equally between the ops running then (on all threads or
    streams), so the rows add up to the time at least one op ran, and a dot that shared the cores with
    another op is charged half of that time: its rate is what the machine did for it. Time in which
    only a plain `dot`'s thread-pool tasks ran (XLA:CPU traces its dispatch, not its work) is that
    dot's; see `_wall_shares`.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    table = instructions(hlo_text)
    lines, windows, seen_any = _read_trace(xplane_path, table)
    if not seen_any:
        raise ProfileError(f"{xplane_path} holds no events; was anything run while tracing?")
    if not lines:
        raise ProfileError(f"no event of {xplane_path} names an instruction of the given program; trace the "
                           "same compiled function whose HLO text you pass")
    runs = collections.Counter(name for ops in lines for _, _, name in ops)
    shares, busy = _wall_shares(lines, windows=windows, asynchronous=lambda name: table[name].opcode == "dot")
    sums: dict[tuple[str, str], list[float]] = {(p, k): [0.0, 0.0] for p in PARTS for k in KINDS}
    for name, ns in shares.items():
        ins = table[name]
        # An op inside a loop (a scanned layer stack) runs, and does its FLOPs, once per trip.
        sums[(ins.part, ins.kind)][0] += ns / 1e9 / calls
        sums[(ins.part, ins.kind)][1] += ins.flops * runs[name] / calls
    rows = [Row(p, k, s, f) for (p, k), (s, f) in sums.items() if s > 0]
    top_ops = [(n, table[n].part, table[n].kind, ns / 1e9 / calls, table[n].flops)
               for n, ns in shares.most_common(top)]
    return Breakdown(rows=rows, top_ops=top_ops, calls=calls, wall_s=wall_s, busy_s=busy / 1e9 / calls,
                     trace_dir=os.path.dirname(xplane_path))


def libtpu_loaded() -> bool:
    """Whether libtpu is mapped into this process (Linux; False where that cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtpu" in line for line in maps)
    except OSError:
        return False


def check_tracer() -> None:
    """Raise `ProfileError` where starting a trace would crash the process.

    Once libtpu is loaded into a process without a TPU backend, its profiler plugin crashes every trace
    (a segmentation fault, not an exception). It gets loaded in two ways: JAX loads it while looking
    for a TPU when `JAX_PLATFORMS` is unset and libtpu is installed (the AOT planner needs it), and
    compiling a TPU plan (`kdjax.plan`, `jax.experimental.topologies`) loads it too. A fresh process
    with `JAX_PLATFORMS` naming the platform, and no TPU plan compiled before the trace, is safe.
    """
    import jax
    from jax._src import xla_bridge

    jax.devices()  # the backends are set up (and the TPU plugin tried) on first use
    try:
        initialized = dict(getattr(xla_bridge, "_backends", {}))
        tried_tpu = not jax.config.jax_platforms and "tpu" in getattr(xla_bridge, "_backend_factories", {})
    except Exception:  # a JAX without these internals: rely on the process map alone
        initialized, tried_tpu = {}, False
    if "tpu" in initialized:  # a real TPU: the plugin is the backend's own profiler
        return
    if tried_tpu or libtpu_loaded():
        raise ProfileError("cannot trace: libtpu is loaded in this process but no TPU is attached, and its "
                           "profiler plugin crashes the process; profile in a fresh process with "
                           "JAX_PLATFORMS naming your platform (e.g. JAX_PLATFORMS=cpu) and no TPU plan "
                           "compiled before the trace")


def profile_calls(fn: Callable, *args, calls: int = 3, directory: str, hlo_text: Optional[str] = None,
                  thread: Optional[Callable[[Any, Any], tuple]] = None, top: int = 12) -> Breakdown:
    """Trace `calls` calls of the jitted `fn(*args)` into `directory` and break their time down.

    `fn` must already be compiled for `args` (call it once before). `thread(args, out) -> args` feeds a
    call's output into the next call's arguments (a step that donates its state); by default every call
    gets the same `args`. `hlo_text` defaults to `fn.lower(*args).compile().as_text()`.
    """
    import jax

    check_tracer()
    if hlo_text is None:
        hlo_text = fn.lower(*args).compile().as_text()
    os.makedirs(directory, exist_ok=True)
    before = set(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    jax.profiler.start_trace(directory)
    try:
        started = time.perf_counter()
        for _ in range(calls):
            out = jax.block_until_ready(fn(*args))
            if thread is not None:
                args = thread(args, out)
        wall = (time.perf_counter() - started) / calls
    finally:
        jax.profiler.stop_trace()
    written = sorted(set(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)) - before,
                     key=os.path.getmtime)
    if not written:
        raise ProfileError(f"the profiler wrote no trace under {directory}")
    result = breakdown_from_trace(written[-1], hlo_text, calls=calls, wall_s=wall, top=top)
    result.last_args = args
    return result


def format_breakdown(b: Breakdown) -> str:
    """A Markdown table of the breakdown: one row per part, its matmul and other time, and the slowest ops."""
    wall = b.wall_s or b.busy_s
    head = f"{b.busy_s * 1e3:.1f} ms per call with ops running"
    if b.wall_s:
        head += f" of {b.wall_s * 1e3:.1f} ms wall ({b.wall_s * 1e3 - b.busy_s * 1e3:.1f} ms with none)"
    lines = [head + f"; {b.calls} traced calls", "",
             "| part | matmul ms | matmul GFLOP/s | other ms | of wall |", "|---|---|---|---|---|"]
    for part in PARTS:
        mm = next((r for r in b.rows if r.part == part and r.kind == "matmul"), None)
        ot = next((r for r in b.rows if r.part == part and r.kind == "other"), None)
        if mm is None and ot is None:
            continue
        rate = mm.gflops_per_s if mm else None
        secs = (mm.seconds if mm else 0.0) + (ot.seconds if ot else 0.0)
        lines.append(f"| {part} | {mm.seconds * 1e3 if mm else 0:.1f} | {f'{rate:.0f}' if rate else '-'} | "
                     f"{ot.seconds * 1e3 if ot else 0:.1f} | {secs / wall:.0%} |")
    mm_s = sum(r.seconds for r in b.rows if r.kind == "matmul")
    mm_f = sum(r.flops for r in b.rows if r.kind == "matmul")
    ot_s = sum(r.seconds for r in b.rows if r.kind == "other")
    lines.append(f"| all | {mm_s * 1e3:.1f} | {mm_f / mm_s / 1e9 if mm_s else 0:.0f} | {ot_s * 1e3:.1f} | "
                 f"{(mm_s + ot_s) / wall:.0%} |")
    lines += ["", "slowest ops (ms per call): " + ", ".join(
        f"{name} ({part}, {kind}) {s * 1e3:.1f}" for name, part, kind, s, _ in b.top_ops[:8])]
    return "\n".join(lines)
