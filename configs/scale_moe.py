"""Plan a Qwen3-235B-A22B-shaped MoE teacher distilled into a Qwen3-8B-shaped dense student (shapes only).

    python -m kdjax.plan --config=configs/scale_moe.py --topology=v5p:4x4x4
    python -m kdjax.plan --config=configs/scale_moe.py:expert=8,tensor=2 --topology=v5p:4x4x8

Teacher (`qwen3_moe`): 94 layers, d_model 4096, 64 query / 4 KV heads of width 128 with q/k RMSNorm,
128 experts per layer with 8 routed per token, expert FFN 1536 (SwiGLU), vocabulary 151936, bf16;
235.1B parameters (about 22B active per token), 470 GB in bf16. Student (`qwen3`): 36 layers, d 4096,
32 / 8 heads of width 128, FFN 12288, untied head (8.2B parameters), float32 master weights with AdamW
moments, bf16 compute. Same tokenizer, so the logit term compares the full 151936-way distributions;
the method is token-level forward KL (`kd` at T = 1, no hard labels).

Sharding: the teacher's expert stacks `[L, E, D, F]` split E over the `expert` mesh axis, D over
`fsdp` and F over `tensor` (`DEFAULT_TEACHER_RULES` + `expert -> expert`), so every chip holds
1 / (expert x fsdp x tensor) of every expert matrix; its attention and embeddings follow the usual
fsdp x tensor rules. The student uses the teacher's weight rules (embed -> fsdp; heads, kv, mlp, vocab
-> tensor) and is replicated over `expert`. Batches split over `data` x `fsdp`.

MoE dispatch in kdjax is dense (every expert on every token, weighted by the sparse top-k gate; see
`kdjax/models/moe.py`): exact, and its expert axis shards without all-to-all, but the teacher forward
does E / k = 16x the FLOPs of a routed dispatch, so this plan measures memory, not speed.

Measured with the defaults (batch 16 x 2048, tensor 4, expert 4): v5p:4x4x4 (64 chips, mesh fsdp 4 x
tensor 4 x expert 4) FITS at 20.80 GiB of 95 per chip: 7.56 GiB of teacher weights, 5.72 GiB of student
train state, 7.47 GiB of temporaries (the TPU compile took 29 min on a heavily loaded 2-core machine).
v5p:2x2x4 (16 chips, fsdp 1 x tensor 4 x expert 4) also FITS, at 78.57 GiB of 95 (teacher 30.23 GiB,
train state 22.89 GiB, temporaries 25.42 GiB).

Options (`:batch=16,seq=2048,tensor=4,expert=4,remat=full`): global batch, sequence length, the tensor-
and expert-parallel widths (fsdp takes the remaining chips), the student's remat policy.
"""

from configs import common
from kdjax import sharding

VOCAB = 151936


def teacher_model():
    return dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=4096, num_layers=94, num_heads=64,
                num_kv_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
                max_position_embeddings=40960, rope_theta=1000000.0, norm_eps=1e-6, head="causal_lm",
                tie_word_embeddings=False, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                remat_policy="full")


def student_model(remat="full"):
    return dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=4096, num_layers=36, num_heads=32,
                num_kv_heads=8, head_dim=128, intermediate_size=12288, max_position_embeddings=40960,
                rope_theta=1000000.0, norm_eps=1e-6, head="causal_lm", tie_word_embeddings=False,
                dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy=remat)


def get_config(arg=None):
    args = common.parse_arg(arg, batch=16, seq=2048, tensor=4, expert=4, remat="full")
    c = common.base_config()
    c.teacher.path = ""
    c.teacher.dtype = "bfloat16"
    c.teacher.model = teacher_model()
    c.teacher.rules = dict(sharding.EXPERT_RULES)  # on top of DEFAULT_TEACHER_RULES
    c.student.model = student_model(args.remat)
    c.student.rules = {name: axes for name, axes in sharding.DEFAULT_TEACHER_RULES if name in sharding.WEIGHT_AXES}
    c.method = "kd"
    c.method_args = dict(kd=dict(alpha=1.0, temperature=1.0))
    c.data.train = dict(task="kdjax_corpus", max_length=args.seq, batch_size=args.batch, pack=True, data_dir=None)
    c.train.steps = 20000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 1000
    c.train.schedule = "cosine"
    # Parallelism: one slice; `expert` and `tensor` inside chip groups, `fsdp` over the rest (-1).
    c.mesh = dict(axes=("data", "fsdp", "tensor", "expert"), ici=(1, -1, args.tensor, args.expert),
                  dcn=(1, 1, 1, 1), allow_split_physical_axes=True)
    c.plan = dict(stage=0, strict=True)
    return c
