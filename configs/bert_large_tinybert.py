"""Plan TinyBERT general distillation from BERT-large into TinyBERT-4 (4 layers, 312 wide, 12 heads).

    python -m kdjax.plan --config=configs/bert_large_tinybert.py --topology=cpu:8 --device_memory_gb=16
    python -m kdjax.plan --config=configs/bert_large_tinybert.py --topology=v5e:2x2
    python -m kdjax.plan --config=configs/bert_large_tinybert.py:stage=task_prediction --topology=v5e:2x2

Teacher: BERT-large (24 layers, d 1024, 16 heads, FFN 4096, vocabulary 30522; 334M parameters).
Student: TinyBERT-4 (4 layers, d 312, 12 heads, FFN 1200; 14.3M parameters). The `tinybert` method's
general stage matches hidden states (embeddings included, uniform map 24 -> 4, through a learned
312 -> 1024 projection). TinyBERT's attention-score MSE compares heads one to one, which a 16-head
teacher and a 12-head student cannot do, so the attention term is off here (`attention_weight=0`);
use a 12-head teacher (BERT-base) for the paper's full recipe, or add `minilmv2` relations, which
are head-count free. `:stage=task_prediction` plans the prediction-layer soft cross-entropy with
classification heads on both models.

BERT's vocabulary (30522 = 2 x 3 x 5087) does not split over 4 devices, so it stays replicated
(`vocab=None`); the mesh is data x fsdp with fsdp = 4 (312, 1024 and 1200 all divide by 4).
Options (`:batch=256,seq=128,stage=general`).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, batch=256, seq=128, stage="general")
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
    c.method = "tinybert"
    c.method_args = dict(attention_weight=0.0)
    c.data.train = dict(task="kdjax_corpus", max_length=args.seq, batch_size=args.batch, pack=False, data_dir=None)
    c.train.steps = 100000
    c.train.learning_rate = 1e-4
    c.train.warmup_ratio = 0.1
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(-1, 4, 1), dcn=(1, 1, 1))
    c.plan = dict(stage=args.stage, strict=True)
    return c
