"""Command line: `python -m kdjax.main --config=configs/<recipe>.py[:args] --workdir=DIR [--config.x=y ...]`.

Before jax is imported the config is validated (`kdjax.config`), and the workdir, model directories
and data files are checked (`kdjax.preflight`), so bad input costs a second and one line on stderr
(exit status 2) and leaves the workdir untouched. Rerunning the same command on a workdir that holds
checkpoints resumes the run exactly; on a finished workdir it prints the existing summary. Ctrl-C
saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, Sequence

USAGE = ("usage: python -m kdjax.main --config=configs/<recipe>.py[:opt=value,...] --workdir=DIR "
         "[--config.section.field=value ...] [--max_steps=N]")


def _flag_values():
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("config", None, "A configs/<recipe>.py file, optionally ':opt=value,...'; override any "
                        "field with --config.section.field=value (None clears it).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs, the student and summary.json go.", flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "Stop after this many global steps (resume later).", lower_bound=1,
                         flag_values=fv)
    return fv


def _print_summary(summary: dict, workdir: str, *, finished_before: bool = False) -> None:
    if finished_before:
        print(f"kdjax: {workdir} holds a finished run; nothing to do (use a new --workdir to train again)")
    print(f"kdjax: done; summary: {os.path.join(workdir, 'summary.json')}")
    emb = summary.get("embedding_agreement")
    if emb:
        b, a = emb["before_distillation"]["mean_cosine"], emb["after_distillation"]["mean_cosine"]
        if b is not None and a is not None:
            print(f"  student-teacher mean cosine on held-out sentences: {b:.4f} before -> {a:.4f} after distillation")
    lat = summary.get("latency")
    if lat:
        print(f"  speedup over the teacher: {lat['speedup']:.2f}x; compression {summary['compression']:.2f}x params")
    if summary.get("final_loss") is not None:
        print(f"  final loss {summary['final_loss']:.4g} after {summary.get('steps')} steps")


def _run(fv, spec: Optional[str], overrides) -> int:
    from kdjax import config as config_lib
    from kdjax import preflight
    from kdjax.workdir import Workdir

    if not spec:
        raise config_lib.ConfigFieldError("--config is required, e.g. --config=configs/quickstart.py")
    config = config_lib.load(spec, overrides)
    workdir = fv.workdir or config.workdir or "workdir/run"
    preflight.check_workdir(workdir)
    wd = Workdir(workdir)
    wd.check_fingerprint(config)
    finished = wd.finished_summary()
    if finished is not None:
        _print_summary(finished, workdir, finished_before=True)
        return 0
    preflight.check_run_inputs(config)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wd.acquire()
    summary: dict[str, Any] = {}
    try:
        wd.record_fingerprint(config)
        import jax
        from kdjax import sharding
        sharding.maybe_initialize_distributed()
        jax.config.update("jax_threefry_partitionable", True)
        from kdjax.distill.job import run_job
        summary = run_job(config, workdir, max_steps=fv.max_steps)
    except BaseException:
        wd.release(failed=True)
        raise
    wd.release()
    if "interrupted_at" in summary:
        if summary.get("signal") == "SIGINT":
            print(f"kdjax: interrupted at global step {summary['interrupted_at']}; checkpoint saved in "
                  f"{workdir}; rerun the same command to resume", file=sys.stderr)
            return 130
        print(f"kdjax: stopped at global step {summary['interrupted_at']} (--max_steps); rerun to resume")
        return 0
    if jax.process_index() == 0:
        _print_summary(summary, workdir)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kdjax.cli import run_cli

    status, result = run_cli(argv, _flag_values(), USAGE, _run, prog="kdjax", config=True, quiet_stdout=False)
    return result if status == 0 and isinstance(result, int) else status


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
