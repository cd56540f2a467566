"""The training loop: stages, data, logging, progress, orbax checkpoints and exact resume.

A run's position is (stage, step within the stage). Every checkpoint stores the train state leaves
(orbax, asynchronous, keep last N) together with the stage index and the data iterator state, so a
killed run restarted with the same command continues with the same batches and RNG and ends with the
same metrics as an uninterrupted one. A non-finite loss stops the run before anything is saved, names
the offending terms, and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


from kdjax import fileio
from kdjax.distill.run import _cfg_get

log = logging.getLogger("kdjax")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped with its last good checkpoint intact."""


# ------------------------------------------------------------------------------------------------
# Data


def make_stage_loader(run, stage_index: int, *, seed: int, role: str = "train"):
    """The grain dataset feeding a stage: `config.data[stage.data]`, else `config.data.train`."""
    from kdjax.data import pipeline
    from kdjax.data import tasks as tasks_lib
    stage = run.method.stages[stage_index]
    data_cfg = _cfg_get(run.config, "data")
    if data_cfg is None:
        raise ValueError("the config has no data section: set config.data.train.task (e.g. 'kdjax_corpus')")
    spec = _cfg_get(data_cfg, stage.data) or _cfg_get(data_cfg, "train")
    if spec is None:
        raise ValueError(f"stage {stage.name!r} reads config.data.{stage.data}, which is not set")
    # Batches carry the teacher's token ids; a compressed-vocabulary student gets remapped ids per batch.
    tokenizer = next(iter(run.teachers.values()))[0].tokenizer or run.student.tokenizer
    if tokenizer is None:
        raise ValueError("neither the student nor the teacher has a tokenizer; load the teacher from a directory "
                                          "with tokenizer files")
    kw = dict(max_length=int(_cfg_get(spec, "max_length", 128)), batch_size=int(_cfg_get(spec, "batch_size", 32)),
                        shuffle=role == "train", seed=seed, num_epochs=None if role == "train" else 1,
                        drop_remainder=True)
    if _cfg_get(spec, "pack") is not None:
        kw["pack"] = bool(_cfg_get(spec, "pack"))
    task = _cfg_get(spec, "task")
    if task:
        split_role = _cfg_get(spec, "split", "train") if role == "train" else _cfg_get(spec, "eval_split", "validation")
        return pipeline.make_task_loader(tasks_lib.get_task(task), split_role, tokenizer,
                                                                          data_dir=_cfg_get(spec, "data_dir"), **kw)
    path = _cfg_get(spec, "path")
    if not path:
        raise ValueError(f"config.data.{stage.data} needs `task` (a registered task) or `path` (a local file)")
    from kdjax.data import sources
    fmt = _cfg_get(spec, "format") or os.path.splitext(path)[1].lstrip(".")
    source = {"jsonl": sources.JsonlSource, "csv": sources.CsvSource}.get(fmt, sources.TextFileSource)(path)
    return pipeline.make_loader(source, tokenizer, text_fields=tuple(_cfg_get(spec, "text_fields", ("text",))),
                                                            label_field=_cfg_get(spec, "label_field"), label_names=_cfg_get(spec, "label_names"), **kw)


def mlm_mask(batch: dict, *, probability: float, mask_id: int, vocab_size: int, special_ids, seed: int) -> dict:
    """BERT-style masking on the host (80% [MASK], 10% random, 10% kept), seeded per step for resume."""
    rng = np.random.default_rng(seed)
    ids = np.array(batch["input_ids"])
    maskable = np.isin(ids, np.asarray(list(special_ids)), invert=True) & (np.asarray(batch["attention_mask"]) == 1)
    chosen = (rng.random(ids.shape) < probability) & maskable
    labels = np.where(chosen, ids, -100)
    roll = rng.random(ids.shape)
    ids = np.where(chosen & (roll < 0.8), mask_id, ids)
    random_ids = rng.integers(0, vocab_size, ids.shape)
    ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
    out = dict(batch)
    out["input_ids"] = ids.astype(np.int32)
    out["labels"] = labels.astype(np.int32)
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
    """orbax `CheckpointManager` over (state leaves, metadata); steps are global step numbers."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = directory if fileio.is_remote(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                                                      create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, global_step: int, state, meta: dict) -> None:
        leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state))}
        self.manager.save(global_step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardSave(leaves), meta=self.ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, global_step: int) -> dict:
        return self.manager.restore(global_step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]

    def restore_state(self, global_step: int, template):
        leaves, treedef = jax.tree.flatten(template)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                                for i, x in enumerate(leaves)}
        restored = self.manager.restore(global_step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(abstract)))["state"]
        return jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))])

    def restore_latest(self, run):
        """(global_step, metadata, train state) of the latest checkpoint of `run`, or None when there is none."""
        latest = self.latest()
        if latest is None:
            return None
        meta = self.restore_meta(latest)
        state = self.restore_state(latest, run.init_state(int(meta["stage"])))
        return latest, meta, state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------------------------
# Logging


#: TensorBoard tags of the record fields with a fixed meaning; `term/<name>` becomes `loss/<name>`, `eval/...`
#: keeps its namespace (with `eval/loss` -> `eval/loss/total`), and any other field goes under `train/`.
TENSORBOARD_TAGS = {"loss": "loss/total", "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
                    "steps_per_sec": "perf/steps_per_sec", "tokens_per_sec": "perf/tokens_per_sec"}
_NOT_SCALARS = ("step", "global_step", "stage")
_warned_no_tensorboard = False


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl field, grouping losses, training signals, speed and eval."""
    if key in TENSORBOARD_TAGS:
        return TENSORBOARD_TAGS[key]
    if key.startswith("term/"):
        return "loss/" + key[len("term/"):]
    if key.startswith("eval/"):
        rest = key[len("eval/"):]
        return "eval/" + tensorboard_tag(rest) if rest in ("loss",) or rest.startswith("term/") else key
    return key if "/" in key else "train/" + key


class MetricsLog:
    """metrics.jsonl (append, one record per log step) plus TensorBoard event files under `tensorboard/`.

    The event files are written with tensorboardX (a runtime dependency), so TensorBoard works without
    TensorFlow; if it cannot be imported the run goes on with metrics.jsonl alone and says so once.
    Both are flushed at every log step, so a killed run loses nothing that was logged. On resume the
    writer purges TensorBoard events past the checkpoint (`purge_step`), as the JSONL file is trimmed,
    so the curves of a resumed run read like an uninterrupted one.
    """

    def __init__(self, workdir: str, resume_from_global_step: int = 0):
        self.path = fileio.join(workdir, "metrics.jsonl")
        if jax.process_index() == 0 and fileio.exists(self.path):
            # Drop records past the checkpoint we resume from, so a resumed log reads like an uninterrupted one.
            kept = [line + "\n" for line in fileio.read_text(self.path).splitlines()
                    if line.strip() and json.loads(line).get("global_step", 0) <= resume_from_global_step]
            fileio.write_text(self.path, "".join(kept))
        self.writer = None
        self.tensorboard_dir = fileio.join(workdir, "tensorboard")
        if jax.process_index() == 0:
            self.writer = _summary_writer(self.tensorboard_dir, resume_from_global_step)

    def write(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        fileio.append_text(self.path, json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_SCALARS:
                    self.writer.add_scalar(tensorboard_tag(k), v, record["global_step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _summary_writer(logdir: str, resume_from_global_step: int):
    """A tensorboardX `SummaryWriter`, or None (with one warning per process) when it is unavailable.

    Event file names carry only a timestamp in seconds, so a run restarted within the same second
    would overwrite the previous file; the suffix (resume step, then process id) keeps every file and
    sorts a resumed run's file after the one it continues, the order in which TensorBoard reads them.
    """
    global _warned_no_tensorboard
    try:
        from tensorboardX import SummaryWriter
    except Exception as e:  # a broken install must not kill a training run
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            log.warning("no TensorBoard events: tensorboardX cannot be imported (%s: %s); metrics go to "
                        "metrics.jsonl only; run: pip install tensorboardX==2.6.5", type(e).__name__, e)
        return None
    if logdir.startswith("gs://"):
        try:
            import google.cloud.storage  # noqa: F401  (tensorboardX's gs:// writer needs it)
        except ImportError:
            if not _warned_no_tensorboard:
                _warned_no_tensorboard = True
                log.warning("no TensorBoard events in %s: writing to gs:// needs google-cloud-storage "
                            "(pip install gcsfs brings it); metrics go to metrics.jsonl only", logdir)
            return None
    try:
        return SummaryWriter(logdir, purge_step=resume_from_global_step + 1 if resume_from_global_step else None,
                             filename_suffix=f".{resume_from_global_step:010d}.{os.getpid()}")
    except Exception as e:  # e.g. gs:// without google-cloud-storage (pip install gcsfs brings it)
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            log.warning("no TensorBoard events in %s (%s: %s); metrics go to metrics.jsonl only", logdir,
                        type(e).__name__, e)
        return None


def _non_finite_terms(values: dict) -> list[str]:
    return sorted(k for k, v in values.items() if not math.isfinite(v) and k not in ("loss", "grad_norm"))


# ------------------------------------------------------------------------------------------------


def fit(run, workdir: str, *, max_steps: Optional[int] = None, progress: Optional[bool] = None,
                export: bool = True) -> dict:
    """Train every stage of `run.method`, resuming from `workdir` when it holds checkpoints.

    `max_steps` stops after that many global steps (used to simulate interruptions in tests).
    """
    from kdjax.data import pipeline
    tc = run.train_cfg
    fileio.makedirs(workdir)
    log_every = int(_cfg_get(tc, "log_every", 10))
    ckpt_every = int(_cfg_get(tc, "checkpoint_every", 100))
    eval_every = int(_cfg_get(tc, "eval_every", 0))
    seed = int(_cfg_get(tc, "seed", 0))
    ckpt = Checkpointer(fileio.join(workdir, "checkpoints"), keep=int(_cfg_get(tc, "keep_checkpoints", 3)),
                                            async_save=bool(_cfg_get(tc, "async_checkpointing", True)))
    offsets = np.cumsum([0] + [run.stage_steps(i) for i in range(run.num_stages)])
    total_steps = int(offsets[-1])

    start_stage, start_step, restored_state, iterator_state = 0, 0, None, None
    latest = None
    restored = ckpt.restore_latest(run)
    if restored is not None:
        latest, meta, restored_state = restored
        start_stage, start_step = int(meta["stage"]), int(meta["step"])
        iterator_state = meta.get("data")
        log.info("resuming from %s: stage %d (%s), step %d", ckpt.directory, start_stage,
                          run.method.stages[start_stage].name, start_step)
    metrics_log = MetricsLog(workdir, resume_from_global_step=int(latest or 0))
    if jax.process_index() == 0:
        from kdjax.sharding import param_overview
        for name, (teacher, _) in run.teachers.items():
            log.info("teacher %r parameters:\n%s", name, param_overview(teacher.params))
        log.info("student parameters:\n%s", param_overview(run.student.params))
    show = progress if progress is not None else (jax.process_index() == 0)

    data_cfg = _cfg_get(run.config, "data")
    mlm_prob = float(_cfg_get(data_cfg, "mlm_probability", 0.0) or 0.0)
    tokenizer = next(iter(run.teachers.values()))[0].tokenizer or run.student.tokenizer

    params = None if restored_state is None else restored_state.params
    history = []
    global_step = int(offsets[start_stage] + start_step)
    state = None
    started = time.perf_counter()
    tokens_seen = 0
    try:
        from tqdm.auto import tqdm
        # tqdm shows steps/s and the ETA; tokens/s and the loss are set as postfix at every log step.
        bar = tqdm(total=total_steps, initial=global_step, disable=not show, desc="distill", unit="step",
                              dynamic_ncols=True)
        for stage_index in range(start_stage, run.num_stages):
            runner = run.runner(stage_index)
            if restored_state is not None and stage_index == start_stage:
                state = restored_state
            else:
                state = run.init_state(stage_index, params=params)
                start_step = 0
                iterator_state = None
            dataset = make_stage_loader(run, stage_index, seed=seed + stage_index)
            iterator = iter(dataset)
            if iterator_state is not None:
                iterator.set_state(pipeline.decode_iterator_state(iterator_state))
            bar.set_description(f"stage {stage_index + 1}/{run.num_stages} {runner.stage.name}")
            teacher_params = run.teacher_params(stage_index)
            pending = []
            step_in_stage = int(start_step)
            last_time = time.perf_counter()
            last_logged_step = step_in_stage
            last_logged_tokens = tokens_seen
            while step_in_stage < runner.steps:
                if max_steps is not None and global_step >= max_steps:
                    raise _Interrupted()
                batch = next(iterator)
                if mlm_prob and tokenizer is not None:
                    batch = mlm_mask(batch, probability=mlm_prob, mask_id=tokenizer.mask_token_id,
                                                      vocab_size=run.student.config.vocab_size, special_ids=tokenizer.all_special_ids,
                                                      seed=seed * 1_000_003 + global_step)
                tokens_seen += int(np.sum(batch["attention_mask"]))
                state, metrics = runner.step_fn(state, teacher_params, run.prepare_batch(batch))
                pending.append(metrics)
                step_in_stage += 1
                global_step += 1
                bar.update(1)
                at_end = step_in_stage == runner.steps
                at_ckpt = step_in_stage % ckpt_every == 0 or at_end
                if step_in_stage % log_every == 0 or at_ckpt:
                    values = _average(pending)
                    pending = []
                    if not math.isfinite(values.get("loss", 0.0)):
                        bad = _non_finite_terms(values) or ["loss"]
                        last_good = ckpt.latest()
                        raise NonFiniteLossError(
                                f"loss became {values['loss']} at stage {stage_index} ({runner.stage.name}) step {step_in_stage}; "
                                f"non-finite: {', '.join(bad)}; stopped without saving; last good checkpoint: "
                                f"{'step ' + str(last_good) if last_good is not None else 'none'} in {ckpt.directory}")
                    now = time.perf_counter()
                    rate = (step_in_stage - last_logged_step) / max(now - last_time, 1e-9)
                    token_rate = (tokens_seen - last_logged_tokens) / max(now - last_time, 1e-9)
                    last_time, last_logged_step, last_logged_tokens = now, step_in_stage, tokens_seen
                    record = {"stage": stage_index, "stage_name": runner.stage.name, "step": step_in_stage,
                                        "global_step": global_step, **values, "steps_per_sec": rate,
                                        "tokens_per_sec": token_rate}
                    history.append(record)
                    metrics_log.write(record)
                    bar.set_postfix({"loss": f"{values['loss']:.4g}", "tok/s": f"{token_rate:,.0f}"}, refresh=False)
                if eval_every and (step_in_stage % eval_every == 0 or at_end):
                    ev = evaluate(run, state, stage_index, seed=seed)
                    if ev:
                        record = {"stage": stage_index, "step": step_in_stage, "global_step": global_step,
                                            **{f"eval/{k}": v for k, v in ev.items()}}
                        history.append(record)
                        metrics_log.write(record)
                if at_ckpt:
                    ckpt.save(global_step, state, {"stage": stage_index, "step": step_in_stage,
                                                                                  "data": pipeline.encode_iterator_state(iterator.get_state())})
            params = state.params
            restored_state = None
        bar.close()
    except _Interrupted:
        ckpt.wait()
        metrics_log.close()
        return {"interrupted_at": global_step, "history": history}
    finally:
        ckpt.wait()

    ckpt.close()
    metrics_log.close()
    elapsed = time.perf_counter() - started
    final = [r for r in history if "loss" in r]
    summary = {"method": run.method.name, "stages": [s.name for s in run.method.stages], "steps": total_steps,
                          "final_loss": final[-1]["loss"] if final else None, "final_metrics": final[-1] if final else None,
                          "train_seconds": elapsed, "tokens_per_sec": tokens_seen / max(elapsed, 1e-9)}
    student = run.student_model(state)
    if export and jax.process_count() > 1:
        # Each host holds only its shards: gather the student onto every host (a collective, so all
        # processes join) before process 0 writes it.
        from jax.experimental import multihost_utils
        from kdjax.hub.api import Model
        params = multihost_utils.process_allgather(student.params, tiled=True)
        student = Model(student.config, student.graphdef, params, student.tokenizer, source=student.source,
                        id2label=student.id2label)
    if export and jax.process_index() == 0:
        from kdjax.hub.api import save_pretrained
        student_dir = fileio.join(workdir, "student")
        with fileio.local_staging(student_dir) as local:  # safetensors writes local files; gs:// is copied up
            save_pretrained(student, local)
        summary["student_dir"] = student_dir
    summary["history"] = history
    summary["state"] = state
    return summary


class _Interrupted(Exception):
    pass


def _average(pending) -> dict:
    if not pending:
        return {}
    total: dict = {}
    for m in jax.device_get(pending):
        for k, (s, c) in m.items():
            a, b = total.get(k, (0.0, 0.0))
            total[k] = (a + float(s), b + float(c))
    return {k: s / max(c, 1e-12) for k, (s, c) in total.items()}


def evaluate(run, state, stage_index: int, *, seed: int = 0, max_batches: Optional[int] = None) -> dict:
    """Mean stage losses on the eval split (and accuracy for classification students)."""
    data_cfg = _cfg_get(run.config, "data")
    spec = _cfg_get(data_cfg, run.method.stages[stage_index].data) or _cfg_get(data_cfg, "train")
    if spec is None or not _cfg_get(spec, "task"):
        return {}
    try:
        dataset = make_stage_loader(run, stage_index, seed=seed, role="eval")
    except (ValueError, KeyError) as e:
        log.warning("no evaluation data: %s", e)
        return {}
    pending = []
    correct = count = 0.0
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        metrics, logits = run.evaluate_batch(state, batch, stage_index)
        pending.append(metrics)
        if logits is not None and logits.ndim == 2 and "labels" in batch:
            pred = np.asarray(jnp.argmax(logits, -1))
            correct += float(np.sum(pred == np.asarray(batch["labels"])))
            count += len(pred)
    out = _average(pending)
    if count:
        out["accuracy"] = correct / count
    return out
