"""Plan a ~100B Llama-style teacher distilled into a ~1.2B student (token-level logit KD, MiniLLM).

    python -m kdjax.plan --config=configs/scale_100b.py --topology=v5p:4x4x4
    python -m kdjax.plan --config=configs/scale_100b.py --topology=cpu:8 --device_memory_gb=80
    python -m kdjax.plan --config=configs/scale_100b.py --topology=v5e:4x4 --search

This config is for `kdjax.plan`: it describes both models by `ModelConfig` fields (no checkpoint) and
compiles the real step -- teacher forward in bf16, student forward/backward, MiniLLM's reverse KL
over the 128,256-token vocabulary at every labeled position, AdamW -- for the target topology, then
prints XLA's per-device memory. The teacher (80 layers, d_model 10240, 80 query / 8 KV heads, SwiGLU
FFN 32768, vocabulary 128256) has 101.6B parameters, 203 GB in bf16; the student has the shape of
Llama-3.2-1B (16 layers, d 2048, 32/8 heads, FFN 8192, tied embeddings; 1.24B parameters, float32
master weights and AdamW moments, bf16 compute).

Sharding: the teacher splits `embed` over `fsdp` and heads / KV / MLP / vocabulary over `tensor`
(`DEFAULT_TEACHER_RULES`); the student shards `embed` over `fsdp` and, unlike the small-model
default, its vocabulary over `tensor` too, so its [B, S, V] logits meet the teacher's with the same
layout. Mesh: `tensor` = 4 inside a chip group, `fsdp` takes the rest (-1). Layers are scanned; the
student recomputes each layer in the backward pass (`remat_policy="full"`).

Per-device totals measured with the defaults (batch 16 x 2048): v5p:2x2x2 42.08 GiB of 95 (fits),
v5p:4x4x4 5.39 GiB, v4:4x4x4 5.54 GiB of 32 (fits); v5e:4x4 (16 GiB) and v6e:2x4 (32 GiB) do not fit
(the TPU compiler asks for 21.54 / 39.81 GiB of temporaries); cpu:8 44.88 GiB: fits 80 GB, not 40 GB.

Options (`:batch=16,seq=2048,tensor=4,remat=full,method=minillm,chunk=0`): global batch, sequence
length, tensor-parallel width, the student's remat policy, the logit method (`minillm` reverse KL or
`kd` forward KL at T=1 with no hard labels) and, with `chunk=N > 0`, the divergence computed over
sequence chunks of N positions with both LM heads recomputed per chunk (no [B, S, V] logits).
"""

from configs import common

VOCAB = 128256


def teacher_model():
    return dict(model_type="llama", vocab_size=VOCAB, hidden_size=10240, num_layers=80, num_heads=80,
                num_kv_heads=8, intermediate_size=32768, max_position_embeddings=8192, rope_theta=500000.0,
                norm_eps=1e-5, head="causal_lm", tie_word_embeddings=False, dtype="bfloat16",
                param_dtype="bfloat16", scan_layers=True, remat_policy="full")


def student_model(remat="full"):
    return dict(model_type="llama", vocab_size=VOCAB, hidden_size=2048, num_layers=16, num_heads=32,
                num_kv_heads=8, intermediate_size=8192, max_position_embeddings=8192, rope_theta=500000.0,
                norm_eps=1e-5, head="causal_lm", tie_word_embeddings=True, dtype="bfloat16",
                param_dtype="float32", scan_layers=True, remat_policy=remat)


def get_config(arg=None):
    args = common.parse_arg(arg, batch=16, seq=2048, tensor=4, remat="full", method="minillm", chunk=0)
    c = common.base_config()
    c.teacher.path = ""
    c.teacher.dtype = "bfloat16"
    c.teacher.model = teacher_model()
    c.teacher.rules = dict()  # DEFAULT_TEACHER_RULES: embed->fsdp; heads, kv, mlp, vocab->tensor
    c.student.model = student_model(args.remat)
    c.student.rules = dict(vocab="tensor")  # on top of DEFAULT_STUDENT_RULES (embed->fsdp)
    if args.method == "minillm":
        c.method = "minillm"
        c.method_args = dict(minillm=dict())
    elif args.method == "kd":
        c.method = "kd"
        c.method_args = dict(kd=dict(alpha=1.0, temperature=1.0))
    else:
        raise ValueError(f"scale_100b: method={args.method!r} is not one of minillm, kd")
    if args.chunk:
        c.method_args[c.method] = dict(c.method_args[c.method], chunk_size=args.chunk)
    c.data.train = dict(task="kdjax_corpus", max_length=args.seq, batch_size=args.batch, pack=True, data_dir=None)
    c.train.steps = 10000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 500
    c.train.schedule = "cosine"
    c.train.grad_accum = 1
    # Parallelism: one slice; `tensor` within a chip group, `fsdp` over the rest (-1 fills it).
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, args.tensor), dcn=(1, 1, 1))
    c.plan = dict(stage=0, strict=True)
    return c
