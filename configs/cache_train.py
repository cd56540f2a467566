"""Train the quickstart's 3-layer student from the offline teacher cache instead of the live teacher.

    python -m kdjax.cache --config=configs/cache_quickstart.py --workdir=workdir/cache_quickstart
    python -m kdjax.main --config=configs/cache_train.py --workdir=workdir/cache_train

`data.train.teacher_cache` points the stage at the cache written by `configs/cache_quickstart.py`
(same teacher, tokenizer, corpus split and max_length, which the run checks before it starts): no
teacher is loaded and the logit term is a sparse forward KL over the cached top-k ids and the tail.
The student copies teacher layers 1, 3, 5 and the tied MLM head the cache was written with (read
once from the checkpoint when the run is built). Hidden-state and attention terms (the quickstart's
`minilmv2+unified`) need a live teacher, so the method here is plain logit KD at the cache's
temperature. The MiniLM teacher's tied head is very flat (docs/cache.md): this config exercises
the cache path; expect a teacher with a trained LM head to be the one worth caching.
Options: `:steps=300,batch=32,lr=2e-4,cache=workdir/cache_quickstart`.
"""

from configs import cache_quickstart, common


def get_config(arg=None):
    args = common.parse_arg(arg, steps=300, batch=32, lr=2e-4, cache="workdir/cache_quickstart")
    c = cache_quickstart.get_config(f"batch={args.batch}")
    del c["cache"]
    c.data.train.teacher_cache = args.cache
    c.student.num_layers = 3
    c.student.layers = (1, 3, 5)
    c.method = "kd"
    c.method_args = dict(kd=dict(alpha=1.0, temperature=1.0))
    c.train.steps = args.steps
    c.train.learning_rate = args.lr
    c.train.warmup_ratio = 0.05
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
