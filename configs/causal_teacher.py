"""Train a small Llama-style causal LM on the embedded corpus: the teacher of configs/onpolicy.py.

    python -m kdjax.main --config=configs/causal_teacher.py --workdir=workdir/causal_teacher

The model (4 layers, hidden 128, 4 heads with 2 KV heads, RoPE, SwiGLU, RMSNorm) uses the shipped
MiniLM WordPiece vocabulary, so no tokenizer is trained. kdjax derives a run's student from its
teacher, so this recipe first writes the randomly initialized model (seed `init_seed`) with the
tokenizer to `init_dir` (once; an existing directory is reused) and then trains a full copy of it
(`student.init="first"`, every layer) with the `supervised` method: next-token cross-entropy on packed
corpus windows. The trained model is written to <workdir>/student in Hugging Face layout.
Options: `:steps=600,batch=16,max_length=64,lr=1e-3,layers=4,hidden=128,init_dir=workdir/causal_init`.
"""

import os

from configs import common


def write_initial_model(directory: str, *, layers: int, hidden: int, seed: int) -> str:
    """A randomly initialized Llama-style causal LM with the MiniLM tokenizer, written once to `directory`."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import kdjax
    from transformers import AutoTokenizer
    from kdjax.distill.run import resolve_model_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(common.MINILM))
    config = kdjax.preset("llama", vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers,
                          num_heads=4, num_kv_heads=2, intermediate_size=4 * hidden, head="causal_lm",
                          max_position_embeddings=512)
    model = kdjax.Model.init(config, seed=seed, tokenizer=tokenizer)
    kdjax.save_pretrained(model, directory)
    return directory


def get_config(arg=None):
    args = common.parse_arg(arg, steps=600, batch=16, max_length=64, lr=1e-3, layers=4, hidden=128, init_seed=0,
                            init_dir="workdir/causal_init")
    c = common.base_config()
    c.teacher.path = write_initial_model(args.init_dir, layers=args.layers, hidden=args.hidden, seed=args.init_seed)
    c.student.num_layers = args.layers
    c.student.init = "first"
    c.method = "supervised"
    common.train_on(c, "kdjax_corpus", batch=args.batch, max_length=args.max_length, steps=args.steps, lr=args.lr,
                    pack=True, log_every=25, checkpoint_every=200)
    c.train.schedule = "cosine"
    return c
