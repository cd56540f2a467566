"""Teacher cache: storage per token, and the error of sparse (top-k + tail) KL against full-vocabulary KL.

        python benchmarks/cache.py [--ks=8,32,64,128] [--formats=uint16,uint8,bfloat16] [--split=validation]
                [--workdir=workdir/bench/cache] [--output=workdir/bench/cache.json]

Teacher: the shipped all-MiniLM-L6-v2 with the weight-tied head of ``configs/cache_quickstart.py``
(it has no trained MLM head; see that file). Data: the embedded corpus (``--split``, unshuffled,
sentences padded to 64 tokens, not packed).

1. **bytes/token**: a cache is written for every k in ``--ks`` (uint16 codes) and every format in
   ``--formats`` (at k = 64); the manifest's ``record_bytes_per_token`` (the row format) and
   ``bytes_per_token`` (the shard files on disk) are reported, with the write throughput.
2. **sparse KL error**: a student (3 layers copied from teacher layers 1, 3, 5, with the same tied
   head, untrained) reads each cache in order; for every batch the full-vocabulary forward KL
   ``KL(p ‖ q)`` (teacher logits recomputed live, ``kdjax.knowledge.divergences.divergence``) is set
   against ``sparse_divergence`` on the cached top-k. Reported per k: both means over valid tokens,
   the absolute and relative gap, and the teacher's mean tail mass. The sparse value is a lower
   bound (data processing inequality); the gap is ``p_tail · KL(p|tail ‖ q|tail)``.

3. **training from the cache vs the live teacher** (``--sections=train``): a k = 64 cache of
   ``--split`` at ``--train_max_length``; the same student (as in 2) trained ``--train_steps`` steps
   twice on the same batches, once from the cache (``data.train.teacher_cache``: no teacher loaded,
   sparse forward KL) and once with the live teacher (dense forward KL). Reported: median step time
   of each and their ratio, the cache's read time per batch, and held-out top-1 agreement with the
   teacher and full-vocabulary KL (before training and after each run). Also the load average: on a
   shared machine step times are only comparable within one run.

        python benchmarks/cache.py --sections=train --train_steps=30 --output=workdir/bench/cache_train.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_KS = flags.DEFINE_list("ks", ["8", "32", "64", "128"], "top-k sizes to cache")
_FORMATS = flags.DEFINE_list("formats", ["uint16", "uint8", "bfloat16"], "log-prob formats to size at k=64")
_SPLIT = flags.DEFINE_string("split", "validation", "corpus split to cache")
_BATCH = flags.DEFINE_integer("batch", 32, "rows per teacher batch")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/bench/cache", "where the caches are written (replaced)")
_OUTPUT = flags.DEFINE_string("output", "", "write the results as JSON here")
_SECTIONS = flags.DEFINE_list("sections", ["storage", "train"], "storage (sections 1-2) and/or train (section 3)")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 30, "section 3: training steps of each run")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 8, "section 3: rows per step")
_TRAIN_LEN = flags.DEFINE_integer("train_max_length", 32, "section 3: max_length of the cached training rows")
_TRAIN_LR = flags.DEFINE_float("train_lr", 5e-4, "section 3: peak learning rate (linear decay)")
_HELDOUT = flags.DEFINE_integer("heldout", 128, "section 3: held-out rows (the first of the train split)")


def _config(k: int, fmt: str):
    from configs import cache_quickstart
    c = cache_quickstart.get_config(f"k={k},format={fmt},batch={_BATCH.value}")
    c.data.train.split = _SPLIT.value
    return c


def write_caches(teachers) -> dict:
    from kdjax import cache
    runs = {}
    jobs = [(int(k), "uint16") for k in _KS.value] + [(64, f) for f in _FORMATS.value if f != "uint16"]
    for k, fmt in jobs:
        workdir = os.path.join(_WORKDIR.value, f"k{k}_{fmt}")
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.perf_counter()
        manifest = cache.write_cache(_config(k, fmt), workdir, teachers=teachers, progress=False)
        seconds = time.perf_counter() - start
        runs[(k, fmt)] = workdir
        print(f"k={k:4d} {fmt:9s} rows={manifest['rows']} tokens={manifest['tokens']} "
              f"record B/token={manifest['record_bytes_per_token']:.1f} disk B/token={manifest['bytes_per_token']:.1f} "
              f"write {seconds:.1f}s (incl. compile)", flush=True)
        runs[(k, fmt)] = dict(workdir=workdir, rows=manifest["rows"], tokens=manifest["tokens"],
                              record_bytes_per_token=manifest["record_bytes_per_token"],
                              bytes_per_token=manifest["bytes_per_token"], write_seconds=round(seconds, 2))
    return runs


def kl_error(teacher, runs) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax import cache
    from kdjax.knowledge.divergences import divergence
    from kdjax.knowledge.sparse import sparse_divergence
    from kdjax.models.transformer import forward
    from kdjax.students import student_from

    student = cache.tied_lm_head(student_from(teacher, init=(1, 3, 5)))

    @jax.jit
    def logits(s_params, t_params, batch):
        s = forward(student.graphdef, s_params, batch)[0].logits
        t = forward(teacher.graphdef, t_params, batch)[0].logits
        return s, t

    full_kl = jax.jit(lambda s, t, m: divergence(s, t, m, kind="forward_kl")[1]["kd/forward_kl"])
    sparse_kl = jax.jit(lambda s, i, lp, tail, m: sparse_divergence(s, i, lp, tail, m, kind="forward_kl")[1]["kd/forward_kl"])
    tail_mass = jax.jit(lambda tail, m: jnp.sum(jnp.where(m == 1, jnp.exp(tail), 0.0)))
    out = {}
    for (k, fmt), run in sorted(runs.items()):
        if fmt != "uint16":
            continue
        sums = np.zeros(4)
        ds = cache.make_cache_loader(run["workdir"], batch_size=_BATCH.value, shuffle=False, num_epochs=1,
                                     drop_remainder=False, shard_index=0, shard_count=1)
        for batch in ds:
            feed = {f: jnp.asarray(batch[f]) for f in ("input_ids", "attention_mask", "token_type_ids")}
            s, t = logits(student.params, teacher.params, feed)
            m = feed["attention_mask"]
            f_sum, count = full_kl(s, t, m)
            s_sum, _ = sparse_kl(s, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                 batch["teacher_tail_logprob"], m)
            sums += [float(f_sum), float(s_sum), float(count), float(tail_mass(batch["teacher_tail_logprob"], m))]
        full, sparse, mass = sums[0] / sums[2], sums[1] / sums[2], sums[3] / sums[2]
        out[k] = dict(full_kl=round(full, 5), sparse_kl=round(sparse, 5), abs_gap=round(full - sparse, 5),
                      rel_gap=round((full - sparse) / full, 5), teacher_tail_mass=round(mass, 5), tokens=int(sums[2]))
        print(f"k={k:4d} full KL={full:.4f} sparse KL={sparse:.4f} gap={full - sparse:.4f} "
              f"({100 * (full - sparse) / full:.2f}%) teacher tail mass={mass:.4f}", flush=True)
    return out


def _train_config(cache_dir):
    from configs import cache_quickstart
    c = cache_quickstart.get_config(f"k=64,format=uint16,batch={_TRAIN_BATCH.value},max_length={_TRAIN_LEN.value}")
    c.data.train.split = _SPLIT.value
    c.data.train.teacher_cache = cache_dir
    c.student.num_layers = 3
    c.student.layers = (1, 3, 5)
    c.method = "kd"
    c.method_args = {"kd": dict(alpha=1.0, temperature=1.0)}
    c.train.steps = _TRAIN_STEPS.value
    c.train.learning_rate = _TRAIN_LR.value
    c.train.warmup_ratio = 0.0
    c.train.seed = 0
    return c


def train_from_cache_vs_live(teacher, teachers) -> dict:
    """The same student trained twice for the same steps on the same batches (the cached rows, in the
    cache loader's shuffled order): from the k = 64 cache (sparse forward KL over the top-64 + tail, no
    teacher loaded) and from the live teacher (dense forward KL). Reports each run's step time (median
    over the steps after the first, which compiles) and, on held-out sentences (the first
    ``--heldout`` rows of the train split, which neither run sees), top-1 agreement with the teacher's
    tied-head prediction and full-vocabulary forward KL, before and after."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax import cache
    from kdjax.data import pipeline
    from kdjax.data import tasks as tasks_lib
    from kdjax.distill.run import Distillation
    from kdjax.knowledge.divergences import divergence
    from kdjax.models.transformer import forward
    from kdjax.students import student_from

    cache_dir = os.path.join(_WORKDIR.value, "train_k64")
    shutil.rmtree(cache_dir, ignore_errors=True)
    config = _train_config(cache_dir)
    start = time.perf_counter()
    cache.write_cache(config, cache_dir, teachers=teachers, progress=False)
    write_seconds = time.perf_counter() - start
    student0 = cache.tied_lm_head(student_from(teacher, init=(1, 3, 5)))

    live_config = _train_config(None)
    runs = {"cache": Distillation(config, student=student0),
            "live": Distillation(live_config, teachers={"teacher": (teacher, 1.0)}, student=student0)}
    assert runs["cache"].teacher_params(0) == {"teacher": None}
    loader = iter(runs["cache"].stage_caches[0].loader(seed=0))
    batches, read_seconds = [], []
    for _ in range(_TRAIN_STEPS.value):
        t0 = time.perf_counter()
        batches.append(next(loader))
        read_seconds.append(time.perf_counter() - t0)

    heldout = pipeline.make_task_loader(tasks_lib.get_task("kdjax_corpus"), "train", teacher.tokenizer,
                                        max_length=_TRAIN_LEN.value, batch_size=_HELDOUT.value, shuffle=False,
                                        num_epochs=1, drop_remainder=False, pack=False)
    held = {k: jnp.asarray(v) for k, v in next(iter(heldout)).items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}
    t_logits = jax.jit(lambda p, b: forward(teacher.graphdef, p, b)[0].logits)(teacher.params, held)
    s_fn = jax.jit(lambda p, b: forward(student0.graphdef, p, b)[0].logits)
    mask = held["attention_mask"]

    def quality(params):
        s = s_fn(params, held)
        agree = jnp.sum((jnp.argmax(s, -1) == jnp.argmax(t_logits, -1)) * mask) / jnp.sum(mask)
        return {"top1_agreement": round(float(agree), 4),
                "full_forward_kl": round(float(divergence(s, t_logits, mask, kind="forward_kl")[0]), 4)}

    out = {"steps": _TRAIN_STEPS.value, "batch": _TRAIN_BATCH.value, "max_length": _TRAIN_LEN.value,
           "learning_rate": _TRAIN_LR.value, "heldout_rows": int(held["input_ids"].shape[0]),
           "heldout_tokens": int(jnp.sum(mask)), "cache_write_seconds": round(write_seconds, 2),
           "cache_read_ms_per_batch": round(1000 * float(np.median(read_seconds[1:])), 2),
           "before": quality(student0.params)}
    for name, run in runs.items():
        state = run.init_state(0)
        times = []
        for batch in batches:
            t0 = time.perf_counter()
            state, metrics = run.train_step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        out[name] = dict(quality(state.params), step_ms=round(1000 * float(np.median(times[1:])), 1),
                         first_step_s=round(times[0], 2))
        print(f"{name:5s}: step {out[name]['step_ms']:.1f} ms (median), held-out top-1 agreement "
              f"{out[name]['top1_agreement']:.4f}, full KL {out[name]['full_forward_kl']:.4f}", flush=True)
    out["step_time_ratio_cache_over_live"] = round(out["cache"]["step_ms"] / out["live"]["step_ms"], 3)
    out["load_average_1m"] = os.getloadavg()[0]
    print(f"before: {out['before']}; step time cache/live = {out['step_time_ratio_cache_over_live']:.3f}; "
          f"cache read {out['cache_read_ms_per_batch']:.2f} ms/batch; load average {out['load_average_1m']:.2f}",
          flush=True)
    return out


def main(argv):
    del argv
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    from kdjax import cache
    from kdjax.distill.run import load_teachers

    teachers = load_teachers(_config(64, "uint16"))
    teacher = cache.tied_lm_head(next(iter(teachers.values()))[0])
    result = {"split": _SPLIT.value, "load_average_at_start": os.getloadavg()}
    if "storage" in _SECTIONS.value:
        runs = write_caches(teachers)
        result["storage"] = {f"k{k}_{f}": v for (k, f), v in runs.items()}
        result["sparse_forward_kl"] = kl_error(teacher, runs)
    if "train" in _SECTIONS.value:
        result["train_cache_vs_live"] = train_from_cache_vs_live(teacher, teachers)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
