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

3. **TODO (engine owner)**: student quality and step time trained from the cache vs a live teacher
   need a training stage that reads the cache (see the reader API at the top of kdjax/cache.py). Fill
   in :func:`train_from_cache_vs_live` once that stage exists; it is not run until then.
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


def train_from_cache_vs_live():
    """TODO (engine owner): once a stage can read a cache (kdjax/cache.py reader API), train the same
    student twice, from the cache (sparse_divergence) and from the live teacher (divergence), for the
    same steps, and report held-out full-vocabulary KL to the teacher and step time for both."""
    raise NotImplementedError("needs the cache-reading training stage")


def main(argv):
    del argv
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    from kdjax import cache
    from kdjax.distill.run import load_teachers

    teachers = load_teachers(_config(64, "uint16"))
    runs = write_caches(teachers)
    teacher = cache.tied_lm_head(next(iter(teachers.values()))[0])
    errors = kl_error(teacher, runs)
    result = {"split": _SPLIT.value, "storage": {f"k{k}_{f}": v for (k, f), v in runs.items()},
              "sparse_forward_kl": errors}
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
