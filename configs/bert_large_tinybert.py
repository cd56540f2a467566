"""Plan TinyBERT general distillation from BERT-large into TinyBERT-4 (4 layers, 312 wide, 12 heads).

    python -m kdjax.plan --config=configs/bert_large_tinybert.py --topology=cpu:8 --device_memory_gb=16
    python -m kdjax.plan --config=configs/bert_large_tinybert.py --topology=v5e:2x2
    python -m kdjax.plan --config=configs/bert_large_tinybert.py:stage=task_prediction --topology=v5e:2x2

Teacher: BERT-large (24 layers, d 1024, 16 heads, FFN 4096, vocabulary 30522; 334M parameters).
Student: TinyBERT-4 (4 layers, d 312, 12 heads, FFN 1200; 14.3M parameters). The `tinybert` method's
general stage matches hidden states (embeddings included, uniform map 24 -> 4, through a learned
312 -> 1024 projection).

Attention knowledge: TinyBERT's attention-score MSE compares heads one to one, which a 16-head teacher
and a 12-head student cannot do, and the student cannot take 16 heads instead (312 / 16 is not an
integer; TinyBERT-4 is 12 heads of 26 in the paper, distilled from 12-head BERT-base). So the
attention term here is the head-count-free MiniLMv2 relation (`qkv_relation_kl`, from the `unified`
builder): the Q-Q, K-K and V-V self-relations of each model, heads concatenated and re-split into
A_r relation heads, on TinyBERT's own uniform layer map (student layer i <- teacher layer 6(i+1)).
A_r must divide both widths, 312 and 1024, whose largest common divisor is 8, so A_r = 8 (MiniLMv2's
48 or 64 divide neither 312 nor both). TinyBERT's own attention MSE is set to 0 (it would refuse the
head counts). kdjax's mix adds a one-stage method's terms to every stage of a multi-stage one, so the
relation term also runs, as an auxiliary loss, beside the prediction-layer soft cross-entropy of
`:stage=task_prediction` (which plans it with classification heads on both models).

BERT's vocabulary (30522 = 2 x 3 x 5087) does not split over 4 devices, so it stays replicated
(`vocab=None`); the mesh is data x fsdp with fsdp = 4 (312, 1024 and 1200 all divide by 4).
Options (`:batch=256,seq=128,stage=general,relation_heads=8,relation_weight=1.0`).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, batch=256, seq=128, stage="general", relation_heads=8, relation_weight=1.0)
    head = "classification" if args.stage == "task_prediction" else "base"
    c = common.base_config()
    c.teacher.path = ""
    c.teacher.model = dict(model_type="bert", vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                           intermediate_size=4096, max_position_embeddings=512, head=head, num_labels=2,
                           add_pooler=head != "base", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    c.teacher.rules = dict(vocab=None)
    c.student.model = dict(model_type="bert", vocab_size=30522, hidden_size=312, num_layers=4, num_heads=12,
                           intermediate_size=1200, max_position_embeddings=512, head=head, num_labels=2,
                           add_pooler=head != "base", dtype="float32", param_dtype="float32", scan_layers=True,
                           remat_policy="none")
    c.student.rules = dict()
    # TinyBERT's stages with its hidden-state terms, plus the MiniLMv2 relation as the attention term.
    c.method = "tinybert+unified"
    c.method_args = dict(
        tinybert=dict(attention_weight=0.0),
        unified=dict(knowledge=("qkv_relation",), matching="uniform", num_relation_heads=args.relation_heads,
                     weights=dict(qkv_relation=args.relation_weight)))
    c.data.train = dict(task="kdjax_corpus", max_length=args.seq, batch_size=args.batch, pack=False, data_dir=None)
    c.train.steps = 100000
    c.train.learning_rate = 1e-4
    c.train.warmup_ratio = 0.1
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(-1, 4, 1), dcn=(1, 1, 1))
    c.plan = dict(stage=args.stage, strict=True)
    return c
