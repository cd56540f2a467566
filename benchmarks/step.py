"""Throughput of one knowledge-distillation step, and what fusing teacher and student into it costs.

    make bench                                           # = python benchmarks/step.py (quickstart config)
    python benchmarks/step.py --config=configs/quickstart.py:max_length=128 --batch=64 --repeats=30 \
        --output=workdir/bench/step.json
    python benchmarks/step.py --config=configs/quickstart.py --config.teacher.path=/path/to/teacher

Three programs are compiled from the same `Distillation` and fed the same synthetic batch:

  full_step        the run's own jitted step (`runner.step_fn`): teacher forward + student
                   forward/backward + optimizer update, state donated;
  teacher_forward  `jit(forward(teacher_graphdef, teacher_params, batch, teacher_taps))` for every
                   teacher of the stage;
  student_step     the same student forward/backward, loss terms and update, with the teacher outputs
                   precomputed and passed in as arguments (state donated as well).

Repetitions are interleaved (each round times all three, the starting program rotating), so slow
drifts of the machine (thermal, other processes) hit all three alike. The report gives the median and
minimum seconds of each, the full step's tokens/s (valid, i.e. non-padding, tokens per second) and

    overhead_ratio = median(full_step) / (median(teacher_forward) + median(student_step))

≈ 1: one fused program costs what its parts cost; > 1: fusing adds overhead; < 1: XLA gains from
seeing both models at once (e.g. it drops teacher outputs no loss reads, which the standalone teacher
forward must materialize, and overlaps the two models' work).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `configs/*.py` import `configs.common`; scripts run from benchmarks/
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "quickstart.py")
PARTS = ("full_step", "teacher_forward", "student_step")
IGNORE_INDEX = -100
MLM_FRACTION = 0.15  # share of valid positions that carry an MLM label when a term reads labels


# --------------------------------------------------------------------------------------------------
# Synthetic inputs


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 0, min_length: Optional[int] = None,
                    cls_id: Optional[int] = None, sep_id: Optional[int] = None, pad_id: int = 0,
                    labels: Optional[str] = None, num_labels: int = 2) -> dict[str, np.ndarray]:
    """A deterministic batch of random token ids with a realistic right-padding mask.

    Row lengths are drawn uniformly from `[min_length, seq_len]` (default `min_length = seq_len // 4`),
    so about 60% of the positions are valid, as with sentence data padded to a fixed length; the
    longest row is always `seq_len` so the padded shape is exercised. Token identity does not change
    the cost of a step, only the shapes and the mask do, which is why random ids are enough here and
    the data pipeline (tokenization, shuffling) stays out of the measurement.

    `labels`: None, "classification" ([B] int32 in [0, num_labels); float32 when num_labels == 1),
    "mlm" ([B, S] ids on ~15% of valid positions, -100 elsewhere) or "causal_lm" ([B, S] = ids on valid
    positions, -100 on padding).
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} x {seq_len}; pass --batch/--seq")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    min_length = max(2, seq_len // 4) if min_length is None else int(min_length)
    if not 1 <= min_length <= seq_len:
        raise ValueError(f"min_length {min_length} must lie in [1, seq_len={seq_len}]")
    rng = np.random.default_rng(seed)
    lengths_b = rng.integers(min_length, seq_len + 1, size=batch_size)
    lengths_b[rng.integers(batch_size)] = seq_len
    positions_bs = np.arange(seq_len)[None, :]
    valid_bs = positions_bs < lengths_b[:, None]
    ids_bs = rng.integers(0, vocab_size, size=(batch_size, seq_len))
    if cls_id is not None:
        ids_bs[:, 0] = cls_id
    if sep_id is not None:
        ids_bs[np.arange(batch_size), lengths_b - 1] = sep_id
    ids_bs = np.where(valid_bs, ids_bs, pad_id).astype(np.int32)
    batch = {"input_ids": ids_bs, "attention_mask": valid_bs.astype(np.int32),
             "token_type_ids": np.zeros((batch_size, seq_len), np.int32)}
    if labels is None:
        return batch
    if labels == "classification":
        if num_labels == 1:
            batch["labels"] = rng.standard_normal(batch_size).astype(np.float32)
        else:
            batch["labels"] = rng.integers(0, num_labels, size=batch_size).astype(np.int32)
    elif labels == "mlm":
        picked_bs = valid_bs & (rng.random((batch_size, seq_len)) < MLM_FRACTION)
        batch["labels"] = np.where(picked_bs, ids_bs, IGNORE_INDEX).astype(np.int32)
    elif labels == "causal_lm":
        batch["labels"] = np.where(valid_bs, ids_bs, IGNORE_INDEX).astype(np.int32)
    else:
        raise ValueError(f"unknown labels kind {labels!r}; use classification, mlm or causal_lm")
    return batch


def _labels_kind(terms, student_config) -> Optional[str]:
    """Which labels the stage's terms read (None when no term reads `batch['labels']`)."""
    reads_labels = any(t.source == "labels" or t.positions == "labeled" or t.fn == "supervised_contrastive"
                       for t in terms)
    if not reads_labels:
        return None
    head = student_config.head
    if head == "classification":
        return "classification"
    if head in ("mlm", "causal_lm"):
        return head
    return "causal_lm" if student_config.causal else "mlm"


def _special_ids(model) -> tuple[Optional[int], Optional[int], int]:
    """(first-token id, end-of-sequence id, pad id) of the teacher's tokenizer, or config fallbacks."""
    tok = getattr(model, "tokenizer", None)
    cls_id = sep_id = pad_id = None
    if tok is not None:
        cls_id = getattr(tok, "cls_token_id", None)
        if cls_id is None:
            cls_id = getattr(tok, "bos_token_id", None)
        sep_id = getattr(tok, "sep_token_id", None)
        if sep_id is None:
            sep_id = getattr(tok, "eos_token_id", None)
        pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return cls_id, sep_id, int(pad_id)


# --------------------------------------------------------------------------------------------------
# The two parts of the fused step, compiled on their own


def build_teacher_forward(run, stage: int = 0, *, full: bool = False) -> Callable:
    """`jit(teacher_params, batch) -> {teacher name: (outputs, intermediates)}` with the run's taps.

    What the fused step computes for its teachers: when the stage's terms read only taps, each teacher
    stops after its last tapped layer and skips its head (`terms.teacher_outputs_needed`). Every tap is
    materialized (returned), since a standalone program cannot know which of them a later loss will
    read. `full=True` builds the untruncated pass (all layers, pooler and head) for comparison.
    """
    from kdjax.distill import step as step_lib
    from kdjax.distill import terms as terms_lib
    runner = run.runner(stage)
    terms = runner.stage.terms
    truncate = not full and not terms_lib.teacher_outputs_needed(terms, runner.stage.loss)
    return jax.jit(step_lib.build_teacher_pass(runner.teachers, () if full else terms, truncate=truncate))


def compiled_flops(fn: Callable, *args) -> Optional[float]:
    """XLA's cost-analysis FLOP count of `fn` compiled for `args` (None when the backend gives none).

    XLA counts a `while` body once, whatever its trip count, so for scanned layer stacks this is a
    lower bound; the CPU default unrolls shallow stacks (`kdjax.models.transformer.scans_layers`).
    """
    try:
        cost = fn.lower(*args).compile().cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = None if not cost else cost.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def build_student_step(run, stage: int = 0) -> Callable:
    """`jit(state, teacher_results, batch) -> (state, metrics)`: the fused step minus the teacher forward.

    It is `kdjax.distill.step.build_student_step`, built from the same loss and update code as the
    run's fused step, so the student's share of the work is identical; tests check that it yields the
    same loss and parameters as the run's step. Only
    `grad_accum == 1` is supported: with accumulation the fused step interleaves teacher and student
    micro-batches, which has no precomputed-teacher equivalent.
    """
    from kdjax.distill import step as step_lib
    from kdjax.distill.run import _cfg_get

    grad_accum = int(_cfg_get(run.train_cfg, "grad_accum", 1))
    if grad_accum != 1:
        raise ValueError(f"the step benchmark splits teacher and student only for grad_accum=1, got {grad_accum}; "
                         "pass --config.train.grad_accum=1 (and a larger --batch if needed)")
    runner = run.runner(stage)
    student_step = step_lib.build_student_step(
        tx=runner.tx, total_steps=runner.steps, update_mask=runner.update_mask,
        student_graphdef=runner.student_graphdef, student_config=runner.student_config,
        student_taps=runner.student_taps, teachers=runner.teachers, terms=runner.stage.terms,
        vocab_map=run.vocab_map)

    return jax.jit(student_step, donate_argnums=0)


# --------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    """Seconds of each timed call of one program (after warm-up) and of its first, compiling call."""

    first_call_s: float
    samples_s: list[float]

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.samples_s))

    @property
    def min_s(self) -> float:
        return float(min(self.samples_s))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int) -> dict[str, Timing]:
    """Call each zero-argument `fn` (which must block until its result is ready) `warmup` then `repeats` times.

    One round calls every function once; the starting function rotates from round to round so no
    program always runs right after the same other one (caches, clocks). The first call of each
    function is timed separately: it includes tracing and compilation.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}; pass --repeats=N")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}; pass --warmup=N")
    names = list(fns)
    first: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        first[name] = time.perf_counter() - t0
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: Timing(first[name], samples[name]) for name in names}


# --------------------------------------------------------------------------------------------------
# The benchmark


def device_info() -> dict:
    import jaxlib
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "jax_version": jax.__version__, "jaxlib_version": getattr(jaxlib, "__version__", "?"),
            "python": platform.python_version(), "host_cpus": os.cpu_count(), "host": platform.machine()}


def _num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def split_consistency(full_metrics, split_metrics, full_state, split_state) -> dict:
    """How closely the split programs reproduce the fused step (evidence that the split is honest).

    `first_metrics_max_rel_diff`: the largest relative difference between the fused and the split
    step's metrics (loss, every term, gradient norm) on their first call, from the same initial state;
    `final_params_max_abs_diff`: the largest difference between the two trained states after the same
    number of steps on the same batch. Both are at float rounding level when the student work is the same.
    """
    from kdjax.distill.step import metric_values
    a, b = metric_values(full_metrics), metric_values(split_metrics)
    if set(a) != set(b):
        raise RuntimeError(f"the split student step reports metrics {sorted(b)}, the fused step {sorted(a)}; "
                           "benchmarks/step.py is out of date with kdjax.distill.step.build_step")
    rel = max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-6) for k in a)
    leaves_full, leaves_split = jax.tree.leaves(full_state), jax.tree.leaves(split_state)
    diff = max((float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                for x, y in zip(leaves_full, leaves_split) if x.size), default=0.0)
    return {"first_loss_full": a["loss"], "first_loss_split": b["loss"], "first_metrics_max_rel_diff": rel,
            "final_params_max_abs_diff": diff}


def run_benchmark(config, *, batch_size: Optional[int] = None, seq_len: Optional[int] = None, repeats: int = 20,
                  warmup: int = 3, stage: int = 0, seed: int = 0, run=None,
                  config_source: Optional[str] = None, torch_reference: bool = True, profile: int = 0,
                  profile_dir: Optional[str] = None) -> dict:
    """Time the full KD step, the teacher forward and the student step of `config`'s `stage` side by side.

    `batch_size`/`seq_len` default to the stage's data entry (`config.data[stage.data]`, else
    `config.data.train`). `run` reuses an existing `Distillation` of `config` (teachers already loaded).
    `config_source` (the config file and its overrides) is only recorded in the result.
    `profile=N` traces N more calls of the full step after the timed rounds (into `profile_dir`) and
    adds where their time went (`kdjax.profile`) to the result.
    Returns a JSON-ready dict (see `benchmarks/README.md` for each field).
    """
    from kdjax import profile as profile_lib
    from kdjax.distill.run import Distillation, _cfg_get

    if profile < 0:
        raise ValueError(f"--profile takes a number of traced steps >= 0, got {profile}")
    if profile:
        profile_lib.check_tracer()  # before minutes of timing, not after

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}; "
                         "pass --repeats=N (N >= 1) and --warmup=M (M >= 0)")
    if run is None:
        # One device: the three programs are compared on the same device, so the ratio measures the fused
        # step's overhead and nothing of a mesh's collectives.
        config = copy.deepcopy(config)
        config.mesh = None
        run = Distillation(config)
    if not 0 <= stage < run.num_stages:
        raise ValueError(f"stage {stage} does not exist; method {run.method.name!r} has {run.num_stages} "
                         f"stage(s), pass --stage in [0, {run.num_stages - 1}]")
    runner = run.runner(stage)
    data = _cfg_get(run.config, "data")
    spec = _cfg_get(data, runner.stage.data) or _cfg_get(data, "train")
    batch_size = int(batch_size or _cfg_get(spec, "batch_size", 32))
    seq_len = int(seq_len or _cfg_get(spec, "max_length", 64))
    teacher_model = run.teachers[runner.teachers[0].name][0]
    for name, (model, _) in run.teachers.items():
        limit = model.config.max_position_embeddings
        if model.config.position_embedding == "learned" and seq_len > limit:
            raise ValueError(f"--seq={seq_len} exceeds teacher {name!r}'s max_position_embeddings={limit}; "
                             f"pass --seq <= {limit}")
    if run.student.config.position_embedding == "learned" and seq_len > run.student.config.max_position_embeddings:
        raise ValueError(f"--seq={seq_len} exceeds the student's max_position_embeddings="
                         f"{run.student.config.max_position_embeddings}; pass a smaller --seq")

    cls_id, sep_id, pad_id = _special_ids(teacher_model)
    host_batch = synthetic_batch(batch_size, seq_len, teacher_model.config.vocab_size, seed=seed, cls_id=cls_id,
                                 sep_id=sep_id, pad_id=pad_id,
                                 labels=_labels_kind(runner.stage.terms, runner.student_config),
                                 num_labels=runner.student_config.num_labels)
    batch = run.prepare_batch(host_batch)
    teacher_params = run.teacher_params(stage)
    valid_tokens = int(host_batch["attention_mask"].sum())

    teacher_forward = build_teacher_forward(run, stage)
    student_step = build_student_step(run, stage)
    # Teacher outputs for the student step are computed once, outside the timed region; this first call
    # is the teacher program's compiling call, so its time is reported as such.
    t0 = time.perf_counter()
    teacher_results = jax.block_until_ready(teacher_forward(teacher_params, batch))
    teacher_first_call_s = time.perf_counter() - t0
    # Both stepping programs donate their state, so each keeps its own and threads it through its calls.
    states = {"full_step": run.init_state(stage), "student_step": run.init_state(stage)}
    first_metrics: dict[str, Any] = {}
    flops = {"full_step": compiled_flops(runner.step_fn, states["full_step"], teacher_params, batch),
             "teacher_forward": compiled_flops(teacher_forward, teacher_params, batch)}
    teacher_full = build_teacher_forward(run, stage, full=True)
    flops["teacher_forward_full"] = compiled_flops(teacher_full, teacher_params, batch)

    def call_full():
        states["full_step"], metrics = runner.step_fn(states["full_step"], teacher_params, batch)
        jax.block_until_ready((states["full_step"], metrics))
        first_metrics.setdefault("full_step", metrics)

    def call_teacher():
        jax.block_until_ready(teacher_forward(teacher_params, batch))

    def call_teacher_full():
        jax.block_until_ready(teacher_full(teacher_params, batch))

    def call_student():
        states["student_step"], metrics = student_step(states["student_step"], teacher_results, batch)
        jax.block_until_ready((states["student_step"], metrics))
        first_metrics.setdefault("student_step", metrics)

    programs = {"full_step": call_full, "teacher_forward": call_teacher, "student_step": call_student}
    # The untruncated teacher is timed only where truncation changes the program (a middle layer is read).
    truncated = (flops["teacher_forward"] is not None and flops["teacher_forward_full"] is not None
                 and flops["teacher_forward"] < flops["teacher_forward_full"])
    if truncated:
        programs["teacher_forward_full"] = call_teacher_full
    torch_note = None
    torch_first_loss = None
    if torch_reference:
        torch_mod = _load_torch_step()
        try:
            torch_step = torch_mod.TorchKDStep(run, stage)
        except (ValueError, ImportError) as e:
            torch_note = f"no PyTorch reference: {e}"
        else:
            torch_first_loss = torch_step.loss(host_batch).item()

            def call_torch():
                torch_step.step(host_batch)

            programs["torch_step"] = call_torch
            flops["torch_step"] = flops["full_step"]  # the same computation
    probe = _load_torch_step().matmul_peak if torch_reference else None
    peak = probe() if probe else None
    faults = {name: [] for name in programs}

    def counting(name, fn):
        def call():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return call

    load_before = os.getloadavg()
    timings = time_interleaved({n: counting(n, f) for n, f in programs.items()}, repeats=repeats, warmup=warmup)
    load_after = os.getloadavg()
    if probe:  # probed before and after the rounds: the best of both, so a slow moment does not set the peak
        after = probe()
        peak = {"n": peak["n"], **{k: max(peak[k], after[k]) for k in ("jax_gflops", "torch_gflops")}}
    timings["teacher_forward"].first_call_s = teacher_first_call_s
    consistency = split_consistency(first_metrics["full_step"], first_metrics["student_step"],
                                    states["full_step"], states["student_step"])
    if torch_first_loss is not None:
        consistency["first_loss_torch"] = torch_first_loss

    parts = {}
    peak_flops = None if peak is None else 1e9 * max(peak["jax_gflops"], peak["torch_gflops"])
    for name in programs:
        t = timings[name]
        n_faults = faults[name][-repeats:]
        parts[name] = {"median_s": t.median_s, "min_s": t.min_s, "first_call_s": t.first_call_s,
                       "tokens_per_s": valid_tokens / t.median_s, "samples_s": list(t.samples_s),
                       "flops": flops.get(name), "minor_faults_per_call": float(statistics.median(n_faults)),
                       "fraction_of_matmul_peak": (None if peak_flops is None or flops.get(name) is None
                                                   else flops[name] / t.median_s / peak_flops)}
    full, teach, stud = (timings[n] for n in PARTS)
    result = {
        "config": config_source,
        "method": run.method.name,
        "stage": {"index": stage, "name": runner.stage.name, "terms": [t.name for t in runner.stage.terms]},
        "teachers": {name: {"params": _num_params(model.params), "layers": model.config.num_layers,
                            "hidden_size": model.config.hidden_size} for name, (model, _) in run.teachers.items()},
        "student": {"params": _num_params(run.student.params), "layers": runner.student_config.num_layers,
                    "hidden_size": runner.student_config.hidden_size},
        "batch_size": batch_size, "seq_len": seq_len, "valid_tokens": valid_tokens,
        "padded_tokens": batch_size * seq_len, "repeats": repeats, "warmup": warmup, "seed": seed,
        "device": device_info(),
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "matmul_peak": peak,
        "parts": parts,
        "full_step_tokens_per_s": valid_tokens / full.median_s,
        "overhead_ratio": full.median_s / (teach.median_s + stud.median_s),
        "overhead_ratio_min": full.min_s / (teach.min_s + stud.min_s),
        "teacher_truncation": {"flops": flops["teacher_forward"], "flops_full": flops["teacher_forward_full"],
                               "timed": truncated},
        "consistency": consistency,
    }
    if "torch_step" in timings:
        result["kdjax_over_torch"] = timings["torch_step"].median_s / full.median_s
        result["kdjax_over_torch_min"] = timings["torch_step"].min_s / full.min_s
    if torch_note:
        result["torch_note"] = torch_note
    if profile:  # after the consistency check, which compares states that took the same number of steps
        breakdown = profile_lib.profile_calls(
            runner.step_fn, states["full_step"], teacher_params, batch, calls=profile,
            directory=profile_dir or os.path.join("workdir", "bench", "profile"),
            thread=lambda args, out: (out[0],) + tuple(args[1:]))
        states["full_step"] = breakdown.last_args[0]
        result["profile"] = breakdown.as_dict()
        result["profile_table"] = profile_lib.format_breakdown(breakdown)
    return result


def _load_torch_step():
    """`benchmarks/torch_step.py` as a module (this directory is not a package)."""
    name = "kdjax_bench_torch_step"
    if name not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "torch_step.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def format_report(result: Mapping[str, Any]) -> str:
    """Device line, a table of the three programs and the headline numbers."""
    from kdjax import report
    d = result["device"]
    lines = [f"device: {d['device_kind']} ({d['backend']}, {d['device_count']} device(s)); jax {d['jax_version']}, "
             f"jaxlib {d['jaxlib_version']}; host cpus {d['host_cpus']}",
             f"method {result['method']} stage {result['stage']['name']!r}; batch {result['batch_size']} x "
             f"{result['seq_len']} ({result['valid_tokens']} valid of {result['padded_tokens']} tokens); "
             f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up",
             ""]
    rows = []
    for name, p in result["parts"].items():
        frac = p.get("fraction_of_matmul_peak")
        rows.append({"program": name, "median ms": 1e3 * p["median_s"], "min ms": 1e3 * p["min_s"],
                     "first call s (compile)": p["first_call_s"], "valid tokens/s": p["tokens_per_s"],
                     "GFLOP": "" if p.get("flops") is None else p["flops"] / 1e9,
                     "of matmul peak": "" if frac is None else f"{100 * frac:.0f}%",
                     "minor faults/call": p.get("minor_faults_per_call", "")})
    lines.append(report.format_table(rows))
    lines.append("")
    load = result.get("load_average")
    if load:
        lines.append(f"load average (1/5/15 min): before {'/'.join(f'{x:.2f}' for x in load['before'])}, "
                     f"after {'/'.join(f'{x:.2f}' for x in load['after'])} on {result['device']['host_cpus']} cpus")
    peak = result.get("matmul_peak")
    if peak:
        lines.append(f"fp32 matmul peak ({peak['n']}^3): jax {peak['jax_gflops']:.1f} GFLOP/s, torch "
                     f"{peak['torch_gflops']:.1f} GFLOP/s")
    lines.append(f"full step: {result['full_step_tokens_per_s']:.1f} valid tokens/s")
    if "kdjax_over_torch" in result:
        lines.append(f"kdjax / PyTorch eager tokens/s: {result['kdjax_over_torch']:.2f} median, "
                     f"{result['kdjax_over_torch_min']:.2f} min")
    elif result.get("torch_note"):
        lines.append(result["torch_note"])
    tt = result.get("teacher_truncation") or {}
    if tt.get("flops") and tt.get("flops_full"):
        lines.append(f"teacher pass: {tt['flops'] / 1e9:.3g} GFLOP as run, {tt['flops_full'] / 1e9:.3g} GFLOP untruncated "
                     f"({100 * (1 - tt['flops'] / tt['flops_full']):.0f}% less)")
    lines.append(f"overhead ratio full / (teacher_forward + student_step): {result['overhead_ratio']:.3f} median, "
                 f"{result['overhead_ratio_min']:.3f} min")
    c = result["consistency"]
    lines.append(f"split check: first-step metrics match the fused step to {c['first_metrics_max_rel_diff']:.1e} "
                 f"(relative), final parameters to {c['final_params_max_abs_diff']:.1e} (absolute)")
    if "first_loss_torch" in c:
        lines.append(f"PyTorch check: first-step loss {c['first_loss_torch']:.7g} vs kdjax {c['first_loss_full']:.7g}")
    if result.get("profile_table"):
        lines += ["", f"where the full step's time goes (trace: {result['profile']['trace_dir']}):",
                  result["profile_table"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> dict:
    """Parse `argv` (program name first, like `sys.argv`), run the benchmark, print it, write `--output`.

    Flags live in a private `FlagValues` so that importing this module (e.g. from tests) never clashes
    with other absl flags; `--config.<field>=value` overrides work as in `python -m kdjax.main`.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "A configs/<recipe>.py file, optionally ':arg' (default: the quickstart).",
        flag_values=fv, lock_config=True, sys_argv=argv)
    batch = flags.DEFINE_integer("batch", None, "Sequences per batch (default: the config's data batch_size).",
                                 flag_values=fv)
    seq = flags.DEFINE_integer("seq", None, "Padded sequence length (default: the config's data max_length).",
                               flag_values=fv)
    repeats = flags.DEFINE_integer("repeats", 20, "Timed rounds; each times all three programs once.", flag_values=fv)
    warmup = flags.DEFINE_integer("warmup", 3, "Untimed rounds after the first (compiling) call.", flag_values=fv)
    stage = flags.DEFINE_integer("stage", 0, "Which stage of a multi-stage method to measure.", flag_values=fv)
    seed = flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch.", flag_values=fv)
    torch_ref = flags.DEFINE_boolean("torch", True, "Also time the same step in PyTorch eager (benchmarks/"
                                     "torch_step.py) and probe the fp32 matmul peak.", flag_values=fv)
    profile = flags.DEFINE_integer("profile", 0, "Trace this many more full steps after the timed rounds and "
                                   "print where their time goes (kdjax.profile); 0: no trace.", flag_values=fv)
    profile_dir = flags.DEFINE_string("profile_dir", os.path.join("workdir", "bench", "profile"),
                                      "Where --profile writes its trace (for TensorBoard / XProf).", flag_values=fv)
    output = flags.DEFINE_string("output", os.path.join("workdir", "bench", "step.json"),
                                 "Where the JSON result goes ('' to skip).", flag_values=fv)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise ValueError(f"bad benchmark flags: {e}") from None
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments {rest[1:]}; flags take the form --name=value")

    from kdjax import report
    overrides = config_flags.get_override_values(fv["config"])
    source = config_flags.get_config_filename(fv["config"])
    if overrides:
        source += " " + " ".join(f"--config.{k}={v}" for k, v in sorted(overrides.items()))
    result = run_benchmark(config_flag.value, batch_size=batch.value, seq_len=seq.value, repeats=repeats.value,
                           warmup=warmup.value, stage=stage.value, seed=seed.value, config_source=source,
                           torch_reference=torch_ref.value, profile=profile.value, profile_dir=profile_dir.value)
    print(format_report(result))
    if output.value:
        report.write_json(output.value, result)
        print(f"wrote {output.value}")
    return result


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.WARNING)
    from kdjax.profile import ProfileError
    try:
        main(sys.argv)
    except (ValueError, ProfileError) as e:
        if len(str(e).splitlines()) == 1:
            print(f"benchmarks/step.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
