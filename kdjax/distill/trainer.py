"""The training loop: stages, data, logging, progress, orbax checkpoints and exact resume.

A run's position is (stage, step within the stage). `fit` is a short loop over stages and steps;
everything that happens around a step is a `Hook` (`on_start`, `on_stage_start`, `on_step`,
`on_stage_end`, `on_end`): `MetricsHook` logs averaged metrics and stops on a non-finite loss,
`EvalHook` evaluates, `CheckpointHook` saves, `ProgressHook` draws the bar.

Every checkpoint stores the train state leaves (orbax, asynchronous, keep last N) together with the
stage index, the data iterator state and the hooks' and the run's host state, so a killed run
restarted with the same command continues with the same batches and RNG and ends with the same
metrics as an uninterrupted one. A state with NaN/inf is never saved; a non-finite loss stops the
run, names the offending terms, and leaves the last good checkpoint in place. Ctrl-C (SIGINT) lets
the current step finish, saves a checkpoint and returns.

Methods that need the host between steps (e.g. on-policy sampling) define
`run.before_step(stage_index, step_in_stage, batch) -> batch`, called outside jit before each step,
and keep what must survive a restart in `run.host_state() -> dict` / `run.restore_host_state(dict)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import config as config_lib
from kdjax import fileio
from kdjax.config import cfg_get as _cfg_get
from kdjax.distill.checkpoints import Checkpointer, NonFiniteStateError  # noqa: F401  (re-exported)

log = logging.getLogger("kdjax")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped with its last good checkpoint intact."""


class DataError(ValueError):
    """A stage's batches lack what its loss terms read (e.g. labels)."""


# ------------------------------------------------------------------------------------------------
# Data


def make_stage_loader(run, stage_index: int, *, seed: int, role: str = "train"):
    """The grain dataset feeding a stage: `config.data[stage.data]`, else `config.data.train`."""
    from kdjax.data import pipeline
    from kdjax.data import tasks as tasks_lib
    stage = run.method.stages[stage_index]
    cache = getattr(run, "stage_caches", {}).get(stage_index)
    if cache is not None:  # the cached rows are the stage's batches (tokens and teacher top-k together)
        if role != "train":
            raise ValueError(f"stage {stage.name!r} trains from {cache.cache_dir}, which caches the train rows only")
        return cache.loader(seed)
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
    section = stage.data if _cfg_get(data_cfg, stage.data) is not None else "train"
    field = lambda name: _cfg_get(spec, name, config_lib.default(f"data.{section}.{name}"))  # noqa: E731
    kw = dict(max_length=int(field("max_length")), batch_size=int(field("batch_size")),
              shuffle=role == "train", seed=seed, num_epochs=None if role == "train" else 1, drop_remainder=True)
    if _cfg_get(spec, "pack") is not None:
        kw["pack"] = bool(_cfg_get(spec, "pack"))
    task = _cfg_get(spec, "task")
    if task:
        split_role = field("split") if role == "train" else field("eval_split")
        return pipeline.make_task_loader(tasks_lib.get_task(task), split_role, tokenizer,
                                                                          data_dir=_cfg_get(spec, "data_dir"), **kw)
    path = _cfg_get(spec, "path")
    if not path:
        raise ValueError(f"config.data.{stage.data} needs `task` (a registered task) or `path` (a local file)")
    from kdjax.data import sources
    fmt = _cfg_get(spec, "format") or os.path.splitext(path)[1].lstrip(".")
    source = {"jsonl": sources.JsonlSource, "csv": sources.CsvSource}.get(fmt, sources.TextFileSource)(path)
    return pipeline.make_loader(source, tokenizer, text_fields=tuple(field("text_fields")),
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
            kept = []
            for line in fileio.read_text(self.path).splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("dropping a partial line of %s (a run killed while writing it): %.60s", self.path, line)
                    continue
                if record.get("global_step", 0) <= resume_from_global_step:
                    kept.append(line + "\n")
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


# ------------------------------------------------------------------------------------------------
# The loop and its hooks


@dataclasses.dataclass
class Loop:
    """Where a run is and what it holds; hooks read it and may set `stop` to end the run early."""

    run: Any
    workdir: str
    ckpt: Checkpointer
    total_steps: int
    stage_index: int = 0
    step_in_stage: int = 0
    global_step: int = 0
    stage_steps: int = 0
    state: Any = None
    iterator: Any = None
    tokens_seen: int = 0
    history: list = dataclasses.field(default_factory=list)
    stop: Optional[str] = None  # "max_steps" or "SIGINT"
    last_saved: Optional[int] = None  # global step of the last checkpoint this process wrote
    resumed_meta: Optional[dict] = None

    @property
    def stage_name(self) -> str:
        return self.run.method.stages[self.stage_index].name

    @property
    def at_stage_end(self) -> bool:
        return self.step_in_stage == self.stage_steps

    def every(self, n: int) -> bool:
        """Whether this step closes a period of `n` steps (or the stage)."""
        return self.step_in_stage % n == 0 or self.at_stage_end


class Hook:
    """Something done around steps; every method is optional."""

    def on_start(self, loop: Loop) -> None: ...

    def on_stage_start(self, loop: Loop) -> None: ...

    def on_step(self, loop: Loop, metrics) -> None: ...

    def on_stage_end(self, loop: Loop) -> None: ...

    def on_end(self, loop: Loop) -> None: ...

    def host_state(self) -> dict:
        return {}

    def restore_host_state(self, state: dict) -> None: ...


class MetricsHook(Hook):
    """Averages step metrics over `log_every` steps, stops on a non-finite loss, writes metrics.jsonl."""

    def __init__(self, log_every: int, ckpt_every: int, metrics_log: "MetricsLog"):
        self.log_every, self.ckpt_every, self.log = log_every, ckpt_every, metrics_log
        self.pending: list = []
        self.last = None

    def on_stage_start(self, loop):
        self.last = (time.perf_counter(), loop.step_in_stage, loop.tokens_seen)

    def on_step(self, loop, metrics):
        self.pending.append(metrics)
        if not (loop.step_in_stage % self.log_every == 0 or loop.every(self.ckpt_every)):
            return
        values = _average(self.pending)
        self.pending = []
        if not math.isfinite(values.get("loss", 0.0)):
            last_good = loop.ckpt.latest()
            raise NonFiniteLossError(
                f"loss became {values['loss']} at stage {loop.stage_index} ({loop.stage_name}) step "
                f"{loop.step_in_stage}; non-finite: {', '.join(_non_finite_terms(values) or ['loss'])}; stopped "
                f"without saving; last good checkpoint: {'step ' + str(last_good) if last_good is not None else 'none'} "
                f"in {loop.ckpt.directory}")
        now, step0, tokens0 = self.last
        elapsed = max(time.perf_counter() - now, 1e-9)
        self.last = (time.perf_counter(), loop.step_in_stage, loop.tokens_seen)
        record = {"stage": loop.stage_index, "stage_name": loop.stage_name, "step": loop.step_in_stage,
                  "global_step": loop.global_step, **values, "steps_per_sec": (loop.step_in_stage - step0) / elapsed,
                  "tokens_per_sec": (loop.tokens_seen - tokens0) / elapsed}
        loop.history.append(record)
        self.log.write(record)

    def on_end(self, loop):
        self.log.close()

    def host_state(self):
        # Metrics of steps since the last log record, so a resumed run logs the same averages.
        total = _sums(self.pending)
        return {"pending": {k: [s, c] for k, (s, c) in total.items()}} if total else {}

    def restore_host_state(self, state):
        pending = state.get("pending")
        self.pending = [{k: (s, c) for k, (s, c) in pending.items()}] if pending else []


class EvalHook(Hook):
    """Evaluates the stage on its eval split every `eval_every` steps and at the stage's end."""

    def __init__(self, eval_every: int, seed: int, metrics_log: "MetricsLog"):
        self.eval_every, self.seed, self.log = eval_every, seed, metrics_log

    def on_step(self, loop, metrics):
        if not self.eval_every or not loop.every(self.eval_every):
            return
        ev = evaluate(loop.run, loop.state, loop.stage_index, seed=self.seed)
        if ev:
            record = {"stage": loop.stage_index, "step": loop.step_in_stage, "global_step": loop.global_step,
                      **{f"eval/{k}": v for k, v in ev.items()}}
            loop.history.append(record)
            self.log.write(record)


class CheckpointHook(Hook):
    """Saves every `ckpt_every` steps, at each stage's end and when the run is stopped early."""

    def __init__(self, ckpt_every: int, hooks: list):
        self.ckpt_every, self.hooks = ckpt_every, hooks

    def on_step(self, loop, metrics):
        if loop.every(self.ckpt_every) or loop.stop == "SIGINT":
            self.save(loop)

    def save(self, loop):
        from kdjax.data import pipeline
        meta = {"stage": loop.stage_index, "step": loop.step_in_stage,
                "data": pipeline.encode_iterator_state(loop.iterator.get_state()),
                "hooks": {type(h).__name__: h.host_state() for h in self.hooks if h.host_state()}}
        if hasattr(loop.run, "host_state"):
            meta["run"] = loop.run.host_state()
        try:
            loop.ckpt.save(loop.global_step, loop.state, meta)
            loop.last_saved = loop.global_step
        except NonFiniteStateError as e:
            last_good = loop.ckpt.latest()
            raise NonFiniteLossError(f"{e}; stopped; last good checkpoint: "
                                     f"{'step ' + str(last_good) if last_good is not None else 'none'} in "
                                     f"{loop.ckpt.directory}") from None

    def on_end(self, loop):
        loop.ckpt.wait()


class ProgressHook(Hook):
    """A tqdm bar (steps/s and ETA), with the loss and tokens/s of the last log record."""

    def __init__(self, show: bool):
        self.show, self.bar = show, None

    def on_start(self, loop):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=loop.total_steps, initial=loop.global_step, disable=not self.show, desc="distill",
                        unit="step", dynamic_ncols=True)

    def on_stage_start(self, loop):
        self.bar.set_description(f"stage {loop.stage_index + 1}/{loop.run.num_stages} {loop.stage_name}")

    def on_step(self, loop, metrics):
        self.bar.update(1)
        last = loop.history[-1] if loop.history else None
        if last is not None and last.get("global_step") == loop.global_step and "loss" in last:
            self.bar.set_postfix({"loss": f"{last['loss']:.4g}", "tok/s": f"{last['tokens_per_sec']:,.0f}"},
                                 refresh=False)

    def on_end(self, loop):
        self.bar.close()


class ProfileHook(Hook):
    """Trace global steps (start, start + steps] into `directory` with `jax.profiler` (TensorBoard / XProf).

    The trace starts after step `start` has been dispatched and stops once step `start + steps` is done,
    so with `start` past the first (compiling) steps it holds steady-state steps only. Refused up front
    where a trace would crash the process (`kdjax.profile.check_tracer`).
    """

    def __init__(self, start: int, steps: int, directory: str):
        from kdjax import profile as profile_lib

        profile_lib.check_tracer()
        self.start, self.steps, self.directory = start, steps, directory
        self.active = False

    def on_start(self, loop):
        if loop.global_step > self.start:
            log.warning("resumed at step %d, past train.profile_start=%d: nothing will be traced; set a later "
                        "train.profile_start", loop.global_step, self.start)

    def on_step(self, loop, metrics):
        if not self.active and loop.global_step == self.start:
            jax.block_until_ready(loop.state)  # the trace holds whole steps
            fileio.makedirs(self.directory)
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif self.active and loop.global_step >= self.start + self.steps:
            self._stop(loop)

    def on_end(self, loop):
        if self.active:  # the run ended (or was interrupted) inside the traced steps
            self._stop(loop)

    def _stop(self, loop):
        jax.block_until_ready(loop.state)
        jax.profiler.stop_trace()
        self.active = False
        log.info("profile of steps %d-%d written under %s (tensorboard --logdir %s)", self.start + 1,
                 loop.global_step, self.directory, self.directory)


@contextlib.contextmanager
def _stop_on_sigint(loop: Loop):
    """While training, Ctrl-C sets `loop.stop` (the step in flight finishes, then a checkpoint is saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if loop.stop == "SIGINT":  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        log.warning("interrupted (SIGINT): saving a checkpoint after this step; press Ctrl-C again to abort")
        loop.stop = "SIGINT"

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _restore(loop: Loop, hooks: list) -> tuple[int, int, Any, Any]:
    """(start stage, start step, restored state or None, iterator state or None) from the newest checkpoint."""
    restored = loop.ckpt.restore_latest(loop.run)
    if restored is None:
        return 0, 0, None, None
    _, meta, state = restored
    log.info("resuming from %s: stage %d (%s), step %d", loop.ckpt.directory, int(meta["stage"]),
             loop.run.method.stages[int(meta["stage"])].name, int(meta["step"]))
    for h in hooks:
        h.restore_host_state(meta.get("hooks", {}).get(type(h).__name__, {}))
    if "run" in meta and hasattr(loop.run, "restore_host_state"):
        loop.run.restore_host_state(meta["run"])
    loop.resumed_meta = meta
    return int(meta["stage"]), int(meta["step"]), state, meta.get("data")


def _next_batch(loop: Loop, *, mlm_prob: float, tokenizer, seed: int) -> dict:
    """The host batch of the next step: masked for MLM if configured, then `run.before_step` (outside jit)."""
    batch = _masked(loop.run, next(loop.iterator), loop.global_step, mlm_prob=mlm_prob, tokenizer=tokenizer, seed=seed)
    if hasattr(loop.run, "before_step"):
        batch = loop.run.before_step(loop.stage_index, loop.step_in_stage, batch)
    return batch


def _masked(run, batch: dict, global_step: int, *, mlm_prob: float, tokenizer, seed: int) -> dict:
    if not mlm_prob or tokenizer is None:
        return batch
    return mlm_mask(batch, probability=mlm_prob, mask_id=tokenizer.mask_token_id,
                    vocab_size=run.student.config.vocab_size, special_ids=tokenizer.all_special_ids,
                    seed=seed * 1_000_003 + global_step)


def check_stage_batch(run, stage_index: int, batch: dict) -> None:
    """One line, before anything compiles, when a stage's terms read fields its batches lack."""
    stage = run.method.stages[stage_index]
    readers = [t.name for t in stage.terms if getattr(t, "source", None) == "labels"]
    if readers and "labels" not in batch:
        data = f"config.data.{stage.data}" if _cfg_get(_cfg_get(run.config, "data"), stage.data) else "config.data.train"
        raise DataError(f"stage {stage.name!r} ({run.method.name}) trains on labels (term {readers[0]!r}) but "
                        f"{data} has none; use labeled data (a task with labels, or label_field for a file), or a "
                        "method without hard labels (e.g. method_args.kd.alpha=1.0)")


def fit(run, workdir: str, *, max_steps: Optional[int] = None, progress: Optional[bool] = None,
        export: bool = True) -> dict:
    """Train every stage of `run.method`, resuming from `workdir` when it holds checkpoints.

    `max_steps` stops after that many global steps (used to simulate interruptions in tests).
    """
    get = lambda name: config_lib.get(run.config, name)  # noqa: E731
    seed, ckpt_every = int(get("train.seed")), int(get("train.checkpoint_every"))
    data_kw = dict(mlm_prob=float(get("data.mlm_probability") or 0.0), seed=seed,
                   tokenizer=next(iter(run.teachers.values()))[0].tokenizer or run.student.tokenizer)
    if not hasattr(run, "before_step"):  # batches a method rewrites are its own to check
        for i in range(run.num_stages):  # before anything is written or compiled
            check_stage_batch(run, i, _masked(run, next(iter(make_stage_loader(run, i, seed=seed + i))), 0, **data_kw))
    fileio.makedirs(workdir)
    offsets = np.cumsum([0] + [run.stage_steps(i) for i in range(run.num_stages)])
    loop = Loop(run=run, workdir=workdir, total_steps=int(offsets[-1]), ckpt=Checkpointer(
        fileio.join(workdir, "checkpoints"), keep=int(get("train.keep_checkpoints")),
        async_save=bool(get("train.async_checkpointing"))))
    metrics_hook = MetricsHook(int(get("train.log_every")), ckpt_every, None)
    hooks: list[Hook] = [metrics_hook]
    start_stage, start_step, state, iterator_state = _restore(loop, hooks)
    if state is not None and hasattr(run, "restore_models"):  # a chain's models trained before this stage
        run.restore_models(workdir, start_stage)
    metrics_log = metrics_hook.log = MetricsLog(workdir, resume_from_global_step=loop.ckpt.latest() or 0)
    hooks += [EvalHook(int(get("train.eval_every")), seed, metrics_log), ProgressHook(
        progress if progress is not None else jax.process_index() == 0)]
    if int(get("train.profile_steps")):
        hooks.append(ProfileHook(int(get("train.profile_start")), int(get("train.profile_steps")),
                                 fileio.join(workdir, "profile")))
    hooks.append(CheckpointHook(ckpt_every, hooks))  # last: saves what the other hooks have updated
    _log_parameters(run)
    loop.global_step = int(offsets[start_stage] + start_step)
    started = time.perf_counter()
    for h in hooks:
        h.on_start(loop)
    try:
        with _stop_on_sigint(loop):
            for stage_index in range(start_stage, run.num_stages):
                resume = (start_step, state, iterator_state) if stage_index == start_stage and state is not None else None
                runner = _enter_stage(loop, stage_index, resume, seed=seed + stage_index)
                teacher_params = run.teacher_params(stage_index)
                for h in hooks:
                    h.on_stage_start(loop)
                while loop.step_in_stage < runner.steps and loop.stop is None:
                    if max_steps is not None and loop.global_step >= max_steps:
                        loop.stop = "max_steps"
                        break
                    batch = _next_batch(loop, **data_kw)
                    loop.tokens_seen += int(np.sum(batch["attention_mask"]))
                    if getattr(runner.stage, "data_hook", None) is not None:  # the stage rewrites its batches
                        loop.state, metrics = run.train_step(loop.state, batch, stage_index)
                    else:
                        loop.state, metrics = runner.step_fn(loop.state, teacher_params, run.prepare_batch(batch))
                    loop.step_in_stage += 1
                    loop.global_step += 1
                    for h in hooks:
                        h.on_step(loop, metrics)
                if loop.stop is not None:
                    if loop.stop == "SIGINT" and loop.last_saved != loop.global_step:
                        hooks[-1].save(loop)  # Ctrl-C came after this step's hooks ran
                    break
                for h in hooks:
                    h.on_stage_end(loop)
                if hasattr(run, "end_stage"):  # a chain model's last stage: it becomes a teacher of later ones
                    run.end_stage(stage_index, loop.state, workdir)
    finally:
        for h in reversed(hooks):
            with contextlib.suppress(Exception):
                h.on_end(loop)
    if loop.stop is not None:
        loop.ckpt.close()
        return {"interrupted_at": loop.global_step, "signal": loop.stop, "history": loop.history}
    loop.ckpt.close()
    return _finish(run, loop, time.perf_counter() - started, export=export)


def _enter_stage(loop: Loop, stage_index: int, resume, *, seed: int):
    """Points `loop` at the start of a stage, or at `resume = (step, state, iterator state)` within it."""
    run = loop.run
    runner = run.runner(stage_index)
    if resume is None:
        if hasattr(run, "stage_start_params"):  # the previous stage's model, or one derived from a chain model
            params = run.stage_start_params(stage_index, loop.state)
        else:
            params = None if loop.state is None else loop.state.params  # the previous stage's student
        loop.state, loop.step_in_stage, iterator_state = run.init_state(stage_index, params=params), 0, None
    else:
        loop.step_in_stage, loop.state, iterator_state = resume
    loop.stage_index, loop.stage_steps = stage_index, runner.steps
    loop.iterator = iter(make_stage_loader(run, stage_index, seed=seed))
    if iterator_state is not None:
        from kdjax.data import pipeline
        loop.iterator.set_state(pipeline.decode_iterator_state(iterator_state))
    return runner


def _log_parameters(run) -> None:
    if jax.process_index() != 0:
        return
    from kdjax.sharding import param_overview
    for name, (teacher, _) in run.teachers.items():
        if teacher.params is None:
            log.info("teacher %r: cached top-k (no parameters loaded)", name)
            continue
        log.info("teacher %r parameters:\n%s", name, param_overview(teacher.params))
    log.info("student parameters:\n%s", param_overview(run.student.params))


def _finish(run, loop: Loop, elapsed: float, *, export: bool) -> dict:
    """The run's summary; exports the student (Hugging Face layout) to `<workdir>/student`."""
    final = [r for r in loop.history if "loss" in r]
    summary = {"method": run.method.name, "stages": [s.name for s in run.method.stages], "steps": loop.total_steps,
               "final_loss": final[-1]["loss"] if final else None, "final_metrics": final[-1] if final else None,
               "train_seconds": elapsed, "tokens_per_sec": loop.tokens_seen / max(elapsed, 1e-9)}
    student = run.student_model(loop.state)
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
        student_dir = fileio.join(loop.workdir, "student")
        with fileio.local_staging(student_dir) as local:  # safetensors writes local files; gs:// is copied up
            save_pretrained(student, local)
        summary["student_dir"] = student_dir
    summary["history"] = loop.history
    summary["state"] = loop.state
    return summary


def _non_finite_terms(values: dict) -> list[str]:
    return sorted(k for k, v in values.items() if not math.isfinite(v) and k not in ("loss", "grad_norm"))


def _sums(pending) -> dict:
    total: dict = {}
    for m in jax.device_get(pending):
        for k, (s, c) in m.items():
            a, b = total.get(k, (0.0, 0.0))
            total[k] = (a + float(s), b + float(c))
    return total


def _average(pending) -> dict:
    return {k: s / max(c, 1e-12) for k, (s, c) in _sums(pending).items()}


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
