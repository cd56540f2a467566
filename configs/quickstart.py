"""Quickstart: distill all-MiniLM-L6-v2 (6 layers) into a 3-layer student on the embedded corpus.

    make quickstart                       # or:
    python -m kdjax.main --config=configs/quickstart.py --workdir=workdir/quickstart

MiniLMv2 Q/K/V self-attention relations on the last layer plus hidden-state MSE on uniformly matched
layers (TinyBERT map 6 -> 3), student initialized from teacher layers 1, 3, 5. Runs in a few minutes
on a 2-core CPU and writes summary.json (parameter counts, final loss, held-out student-teacher cosine
before and after distillation, latency and speedup), student/ (Hugging Face layout) and loss.png.
Options: `:steps=300,batch=32,max_length=64,lr=2e-4` (the defaults).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, steps=300, batch=32, max_length=64, lr=2e-4)
    c = common.base_config()
    c.teacher.path = common.MINILM
    c.student.num_layers = 3
    c.student.layers = (1, 3, 5)
    c.method = "minilmv2+unified"
    c.method_args = dict(minilmv2=dict(num_relation_heads=12), unified=dict(knowledge=("hidden",), matching="uniform"))
    common.train_on(c, "kdjax_corpus", batch=args.batch, max_length=args.max_length, steps=args.steps, lr=args.lr,
                    log_every=10, checkpoint_every=100)
    c.report.embedding_agreement = True
    c.report.latency = True
    c.report.heldout_sentences = 256
    return c
