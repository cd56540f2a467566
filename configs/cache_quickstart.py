"""Cache the shipped MiniLM teacher's top-k token distribution on the embedded corpus.

    python -m kdjax.cache --config=configs/cache_quickstart.py --workdir=workdir/cache_quickstart

all-MiniLM-L6-v2 is a sentence-transformers encoder saved without BERT's MLM head, so there are no
trained token logits to cache. `cache.lm_head="tied"` gives it a head built only from its own
weights (kdjax.cache.tied_lm_head): identity transform, unit layer norm, zero bias, decoder tied to
the input embeddings, so the cached distribution is softmax(LN(gelu(h)) · Eᵀ) over the 30522-token
vocabulary. It is deterministic and fingerprinted with the teacher, but it is not a masked-LM
prediction: use it to exercise and measure the cache (size, speed, sparse-KL error), and a teacher
with a real `mlm`/`causal_lm` head (`:lm_head=checkpoint` with `teacher.head` set) for real runs.

Writes shards of 1024 rows of the corpus train split (unshuffled, one epoch; sentences padded to
max_length=64, not packed), k=64 ids at 15 bits and uint16 log-probability codes per token, and
manifest.json with fingerprints and the measured bytes/token (264 per token as records, 272 on
disk, on the first 1024-row shard).
Options: `:k=64,temperature=1.0,format=uint16,max_length=64,batch=32,lm_head=tied`.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, k=64, temperature=1.0, format="uint16", max_length=64, batch=32, lm_head="tied")
    c = common.base_config()
    c.teacher.path = common.MINILM
    c.data.train.task = "kdjax_corpus"
    c.data.train.split = "train"
    c.data.train.max_length = args.max_length
    c.data.train.batch_size = args.batch
    c.data.train.pack = False
    c.cache = dict(k=args.k, k_temperature=args.temperature, logprob_format=args.format, rows_per_shard=1024,
                   batch_size=args.batch, lm_head=None if args.lm_head == "checkpoint" else args.lm_head)
    return c
