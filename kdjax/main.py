"""Command line: `python -m kdjax.main --config=configs/<recipe>.py[:args] --workdir=DIR [--config.x=y ...]`.

Rerunning the same command on a workdir that holds checkpoints resumes the run exactly.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<recipe>.py file, optionally ':arg'.",
                                                                                    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, the student and summary.json go.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many global steps (resume later).")

# Errors a user can fix; reported as one line without a traceback.
USER_ERRORS = ("ConfigError", "MethodError", "MatchingError", "CheckpointError", "NonFiniteLossError",
                              "DatasetNotPreparedError", "TapError", "UnknownTaskError", "MeshError", "ShardingError")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
    workdir = _WORKDIR.value or config.get("workdir") or "workdir/run"
    import jax
    from kdjax import sharding
    sharding.maybe_initialize_distributed()
    jax.config.update("jax_threefry_partitionable", True)
    from kdjax.distill.job import run_job
    try:
        summary = run_job(config, workdir, max_steps=_MAX_STEPS.value)
    except Exception as e:  # pylint: disable=broad-except
        if type(e).__name__ in USER_ERRORS or isinstance(e, (ValueError, FileNotFoundError)) and len(str(e).splitlines()) == 1:
            print(f"kdjax: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    if "interrupted_at" in summary:
        print(f"kdjax: stopped at global step {summary['interrupted_at']} (--max_steps); rerun to resume")
        return
    if jax.process_index() == 0:
        print(f"kdjax: done; summary: {os.path.join(workdir, 'summary.json')}")
        emb = summary.get("embedding_agreement")
        if emb:
            b, a = emb["before_distillation"]["mean_cosine"], emb["after_distillation"]["mean_cosine"]
            print(f"  student-teacher mean cosine on held-out sentences: {b:.4f} before -> {a:.4f} after distillation")
        lat = summary.get("latency")
        if lat:
            print(f"  speedup over the teacher: {lat['speedup']:.2f}x; compression {summary['compression']:.2f}x params")


def run():
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
