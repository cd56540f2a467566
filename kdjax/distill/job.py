"""A whole job as the CLI runs it: build, measure the undistilled student, fit, measure again, report.

Writes into the workdir:

* `checkpoints/` (orbax) and `student/` (Hugging Face layout);
* `metrics.jsonl`, one record per log step (losses, `term/<name>` per loss term, grad norm,
  `steps_per_sec`, `tokens_per_sec`, `eval/...`);
* `tensorboard/`, event files of the same scalars under `loss/total`, `loss/<term>`, `train/...`,
  `perf/...` and `eval/...` (``tensorboard --logdir WORKDIR/tensorboard``);
* `loss.png`, the total loss, and `plots/loss_<term>.png`, one PNG per loss term: separate files
  because terms differ by orders of magnitude and each needs its own y axis. The x axis is the
  global step, with a dashed line and the stage name where each stage of a multi-stage run begins;
* `summary.json`, whose `loss_plots` maps `total` and each term name to its PNG (`loss_plot` is the
  total, as before).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax

from kdjax import fileio
from kdjax.config import cfg_get as _cfg_get
from kdjax.distill.run import Distillation

log = logging.getLogger("kdjax")


def _heldout_sentences(config, n: int) -> list[str]:
    from kdjax.data import embedded
    source = _cfg_get(_cfg_get(config, "report"), "heldout", "kdjax_corpus")
    if source == "kdjax_corpus":
        return list(embedded.corpus_sentences("validation"))[:n]
    if source == "kdjax_reviews":
        return [r["text"] for r in embedded.review_examples("validation")][:n]
    raise ValueError(f"report.heldout must be kdjax_corpus or kdjax_reviews, got {source!r}")


def run_job(config, workdir: str, *, max_steps: Optional[int] = None, progress: Optional[bool] = None) -> dict:
    from kdjax import evaluate, report
    fileio.makedirs(workdir)
    run = Distillation(config, workdir=workdir)
    teacher = next(iter(run.teachers.values()))[0]
    rep = _cfg_get(config, "report")
    want_embed = bool(_cfg_get(rep, "embedding_agreement", False))
    want_latency = bool(_cfg_get(rep, "latency", False))
    sentences = _heldout_sentences(config, int(_cfg_get(rep, "heldout_sentences", 256))) if want_embed else []
    max_length = int(_cfg_get(rep, "max_length", 128))

    before = None
    if want_embed and jax.process_index() == 0:
        before = evaluate.embedding_agreement(run.student, teacher, sentences, max_length=max_length)

    summary = run.fit(workdir, max_steps=max_steps, progress=progress)
    if "interrupted_at" in summary:
        return summary
    student = run.student_model(summary["state"])

    out: dict[str, Any] = {
            "method": summary["method"], "stages": summary["stages"], "steps": summary["steps"],
            "final_loss": summary["final_loss"], "train_seconds": summary["train_seconds"],
            "train_tokens_per_sec": summary["tokens_per_sec"],
            "teacher": {"source": teacher.source, "params": teacher.num_params, "layers": teacher.config.num_layers,
                                    "hidden": teacher.config.hidden_size},
            "student": {"dir": summary.get("student_dir"), "params": student.num_params,
                                    "layers": student.config.num_layers, "hidden": student.config.hidden_size},
    }
    out["compression"] = teacher.num_params / max(student.num_params, 1)
    if want_embed:
        after = evaluate.embedding_agreement(student, teacher, sentences, max_length=max_length)
        out["heldout_sentences"] = len(sentences)
        out["embedding_agreement"] = {"before_distillation": before, "after_distillation": after}
    if want_latency:
        kw = dict(batch_size=int(_cfg_get(rep, "latency_batch_size", 32)), seq_len=int(_cfg_get(rep, "latency_seq_len", 128)))
        t_lat = evaluate.measure_latency(teacher, **kw)
        s_lat = evaluate.measure_latency(student, **kw)
        out["latency"] = {"teacher": t_lat, "student": s_lat,
                                            "speedup": t_lat["median_s"] / max(s_lat["median_s"], 1e-12)}
    history = summary["history"]
    if jax.process_index() == 0:
        # metrics.jsonl holds the whole run, also the part before a resume, which `history` lacks.
        metrics_path = fileio.join(workdir, "metrics.jsonl")
        records = report.read_jsonl(metrics_path) if fileio.exists(metrics_path) else history
        if any("loss" in r for r in records):
            out["loss_plots"] = report.plot_loss_terms(records, workdir, title=summary["method"])
            out["loss_plot"] = out["loss_plots"]["total"]
        report.write_json(fileio.join(workdir, "summary.json"), out)
    return out

