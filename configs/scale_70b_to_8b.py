"""Plan Llama-3-70B -> Llama-3-8B distillation (shapes only) with GKD's generalized JSD, off-policy.

    python -m kdjax.plan --config=configs/scale_70b_to_8b.py --topology=v5p:4x4x4
    python -m kdjax.plan --config=configs/scale_70b_to_8b.py --topology=v4:4x4x4 --search

Teacher: 80 layers, d_model 8192, 64 query / 8 KV heads, SwiGLU FFN 28672, vocabulary 128256, bf16
(70.6B parameters). Student: 32 layers, d 4096, 32 / 8 heads, FFN 14336 (8.0B parameters), float32
master weights with AdamW moments (16 bytes per parameter, ~128 GB before sharding), bf16 compute.
At this size the student needs tensor parallelism as much as the teacher, so both use the large-model
rules (embed -> fsdp; heads, kv, mlp, vocab -> tensor). The loss is the token-level JSD(β = 0.5) of
`gkd` on labeled positions.

Options (`:batch=32,seq=4096,tensor=8,remat=full,chunk=0`); `chunk=N > 0` computes the JSD over
sequence chunks of N positions with both LM heads recomputed per chunk (no [B, S, V] logits).
"""

from configs import common
from kdjax import sharding

VOCAB = 128256


def get_config(arg=None):
    args = common.parse_arg(arg, batch=32, seq=4096, tensor=8, remat="full", chunk=0)
    c = common.base_config()
    c.teacher.path = ""
    c.teacher.dtype = "bfloat16"
    c.teacher.model = dict(model_type="llama", vocab_size=VOCAB, hidden_size=8192, num_layers=80, num_heads=64,
                           num_kv_heads=8, intermediate_size=28672, max_position_embeddings=8192,
                           rope_theta=500000.0, norm_eps=1e-5, head="causal_lm", tie_word_embeddings=False,
                           dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="full")
    c.teacher.rules = dict()
    c.student.model = dict(model_type="llama", vocab_size=VOCAB, hidden_size=4096, num_layers=32, num_heads=32,
                           num_kv_heads=8, intermediate_size=14336, max_position_embeddings=8192,
                           rope_theta=500000.0, norm_eps=1e-5, head="causal_lm", tie_word_embeddings=False,
                           dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy=args.remat)
    # The teacher's layout for the student too: weight rules only (activation rules stay shared).
    c.student.rules = {name: axes for name, axes in sharding.DEFAULT_TEACHER_RULES
                       if name in sharding.WEIGHT_AXES}
    c.method = "gkd"
    c.method_args = dict(gkd=dict(beta=0.5))
    if args.chunk:  # JSD over sequence chunks of `chunk` positions, LM heads recomputed per chunk
        c.method_args.gkd.chunk_size = args.chunk
    c.data.train = dict(task="kdjax_corpus", max_length=args.seq, batch_size=args.batch, pack=True, data_dir=None)
    c.train.steps = 20000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 1000
    c.train.schedule = "cosine"
    # tensor = 8 spans two axes of a 4x4x4 torus (4 x 2), so the mesh may split a physical axis.
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, args.tensor), dcn=(1, 1, 1),
                  allow_split_physical_axes=True)
    c.plan = dict(stage=0, strict=True)
    return c
