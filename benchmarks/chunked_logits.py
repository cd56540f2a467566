"""Compiled memory of logit KD (loss + gradient) with full logits vs sequence chunks, at Qwen2 scale.

        python benchmarks/chunked_logits.py [--vocab=151936 --seq_len=2048 --batch=1 --dim=1024]
                [--chunk_sizes=32,128,512] [--vocab_block_size=4096] [--dtype=float32] [--output=chunked_logits.json]

Every variant computes the forward-KL distillation term of two LM heads (``h @ W``, ``W: [D, V]``) and
its gradient with respect to the student hidden states and the student head weight. They are only
lowered and compiled, from ``jax.ShapeDtypeStruct`` inputs, never run, so nothing of that size is
allocated and the script takes seconds on a CPU. XLA's ``memory_analysis()`` then reports ``temp``,
the scratch buffers the program needs at its peak besides inputs and outputs (``argument`` /
``output``: hidden states and head weights in, gradients out; equal for all variants):

* ``unchunked``: ``divergence`` on full logits: several ``[B, S, V]`` float32 tensors (1.16 GiB each
  at the defaults; about 4.6 GiB of temp in all).
* ``autodiff (c)``: ``chunked_divergence`` with a plain callable head, differentiated by JAX inside
  the checkpointed scan. A couple of ``[B, c, V]`` tensors, plus one ``[Ds, V]`` buffer: each
  chunk's head-weight gradient ``h_cᵀ · dlogits_c`` is a full matrix that the CPU compiler writes
  before adding it to the scan's accumulator (0.58 GiB at the defaults). That floor does not shrink
  with ``c``, so this variant stays above 10% of the unchunked temp at the defaults.
* ``linear vjp (c)``: ``chunked_divergence`` with a ``LinearHead`` (what the distillation step uses):
  a ``custom_vjp`` whose backward scan adds ``h_cᵀ · dlogits_c`` into the weight gradient one
  strided vocabulary block of at most ``--vocab_block_size`` columns at a time, in place, so the
  floor becomes ``[Ds, V / blocks]``. Temp is then a handful of ``[B, c, V]`` tensors and scales with
  ``c``: about 2% of the unchunked temp at ``c = 32`` and 7% at ``c = 128``; at ``c = 512`` the
  per-chunk tensors alone are a quarter of it.

The numbers are those of the CPU backend's buffer assignment; an accelerator's compiler fuses
differently, but the full-logit buffers, and so the saving, are the same in kind. Keep
``--dtype=float32`` for this comparison on CPU: its dot emitter upcasts bfloat16 operands, and the
upcast copies of the ``[D, V]`` head weights then dominate every column.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_VOCAB = flags.DEFINE_integer("vocab", 151_936, "Vocabulary size V (Qwen2: 151,936).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Sequence length S.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_DIM = flags.DEFINE_integer("dim", 1024, "Student hidden size Ds.")
_TEACHER_DIM = flags.DEFINE_integer("teacher_dim", None, "Teacher hidden size Dt (default: --dim).")
_CHUNK_SIZES = flags.DEFINE_list("chunk_sizes", ["32", "128", "512"], "Sequence chunk sizes to compare.")
_VOCAB_BLOCK = flags.DEFINE_integer("vocab_block_size", 4096,
                                    "Linear-vjp variant: most weight-gradient columns formed at once.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Hidden-state and head-weight dtype.")
_KIND = flags.DEFINE_string("kind", "forward_kl", "Divergence kind (see kdjax.knowledge.DIVERGENCE_KINDS).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this path.")

GIB = 1024 ** 3


def compiled_memory(grad_fn, abstract_args) -> dict:
    """Lowers and compiles ``grad_fn`` for abstract arguments; its memory analysis in bytes."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(grad_fn).lower(*abstract_args).compile()
    stats = compiled.memory_analysis()
    return {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes), "compile_s": round(time.perf_counter() - start, 2)}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from kdjax import report
    from kdjax.knowledge import divergence
    from kdjax.knowledge.chunked import LinearHead, chunked_divergence, vocab_blocks

    b, s, v = _BATCH.value, _SEQ_LEN.value, _VOCAB.value
    d_s = _DIM.value
    d_t = _TEACHER_DIM.value or d_s
    chunk_sizes = [int(c) for c in _CHUNK_SIZES.value]
    dtype = jnp.dtype(_DTYPE.value)
    kind = _KIND.value
    abstract = [jax.ShapeDtypeStruct(shape, dtype) for shape in ((b, s, d_s), (d_s, v), (b, s, d_t), (d_t, v))]

    def full_grad(hs, ws, ht, wt):
        def loss(hs, ws):
            return divergence(hs @ ws, jax.lax.stop_gradient(ht @ wt), kind=kind)[0]
        return jax.grad(loss, (0, 1))(hs, ws)

    def chunked_grad(chunk, linear):
        def grad(hs, ws, ht, wt):
            def loss(hs, ws):
                head = LinearHead(ws) if linear else (lambda h: h @ ws)
                return chunked_divergence(hs, ht, head, lambda h: h @ wt, kind=kind, chunk_size=chunk,
                                          vocab_block_size=_VOCAB_BLOCK.value)[0]
            return jax.grad(loss, (0, 1))(hs, ws)
        return grad

    logits_bytes = b * s * v * 4  # one float32 [B, S, V] tensor
    head_grad_bytes = d_s * v * 4  # one float32 [Ds, V] student head-weight gradient
    print(f"{kind} loss + grad, B={b} S={s} V={v:,} Ds={d_s} Dt={d_t} {dtype.name}; one float32 [B, S, V] "
          f"logit tensor is {logits_bytes / GIB:.2f} GiB, one [Ds, V] head gradient {head_grad_bytes / GIB:.2f} GiB. "
          f"Linear vjp: {vocab_blocks(v, _VOCAB_BLOCK.value)} vocabulary blocks. "
          f"Compiling (no execution) on {jax.devices()[0].platform}.")
    rows = [{"variant": "unchunked", **compiled_memory(full_grad, abstract)}]
    for chunk in chunk_sizes:
        for linear, label in ((False, "autodiff"), (True, "linear vjp")):
            rows.append({"variant": f"{label} ({chunk})", "chunk_size": chunk, "linear_vjp": linear,
                         **compiled_memory(chunked_grad(chunk, linear), abstract)})
    full_temp = rows[0]["temp_bytes"]
    for row in rows:
        row["temp_ratio"] = row["temp_bytes"] / full_temp if full_temp else float("nan")

    print(report.format_table([
        {"variant": r["variant"], "temp GiB": r["temp_bytes"] / GIB, "temp bytes": r["temp_bytes"], "argument GiB": r["argument_bytes"] / GIB,
         "output GiB": r["output_bytes"] / GIB, "temp / unchunked": r["temp_ratio"], "compile s": r["compile_s"]}
        for r in rows]))
    best = min(rows[1:], key=lambda r: r["temp_bytes"]) if len(rows) > 1 else None
    if best is not None:
        print(f"chunking cuts the compiled scratch memory {1 / best['temp_ratio']:.1f}x "
              f"({full_temp / GIB:.2f} GiB -> {best['temp_bytes'] / GIB:.3f} GiB, {best['variant']})")
    if _OUTPUT.value:
        results = {"config": {"batch": b, "seq_len": s, "vocab": v, "student_dim": d_s, "teacher_dim": d_t,
                              "dtype": dtype.name, "kind": kind, "platform": jax.devices()[0].platform,
                              "vocab_block_size": _VOCAB_BLOCK.value,
                              "vocab_blocks": vocab_blocks(v, _VOCAB_BLOCK.value)},
                   "logits_bytes_f32": logits_bytes, "head_grad_bytes_f32": head_grad_bytes, "results": rows}
        print(f"wrote {report.write_json(_OUTPUT.value, results)}")


if __name__ == "__main__":
    app.run(main)
