"""Shared pieces of kdjax configs: argument parsing and the base config every recipe starts from."""

import ml_collections

from kdjax import config as config_lib

MINILM = config_lib.MINILM  # the pretrained teacher shipped as a PyPI wheel (offline)


def parse_arg(arg, **defaults):
    """`"student=4,steps=100,runlocal"` -> ConfigDict with typed values (bare names become True).

    Only the recipe's own options are accepted: a typo (`stepz=3`) is a one-line error naming the
    options, never a silently ignored setting.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise config_lib.ConfigFieldError(f"unknown option {key!r} after ':'; this recipe's options: {known}")
        if not eq:
            out[key] = True
            continue
        kind = type(defaults[key]) if defaults[key] is not None else str
        try:
            if kind is bool:
                if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("1", "true", "yes")
            else:
                out[key] = kind(value)
        except ValueError:
            raise config_lib.ConfigFieldError(f"option {key}={value!r} after ':' must be {kind.__name__} "
                                              f"(default {defaults[key]!r})") from None
    return out


def base_config():
    """Every field a run reads, with its default (`kdjax.config.SCHEMA`); recipes override what they need."""
    return config_lib.base_config()


def train_on(c, task, *, batch, max_length, steps, lr, warmup_ratio=0.05, pack=False, log_every=None,
             checkpoint_every=None):
    """Point `c` at its training task and schedule (the data and train fields every recipe sets).

    `log_every` / `checkpoint_every` left at None keep the defaults of `kdjax.config`.
    """
    c.data.train.task = task
    c.data.train.max_length = max_length
    c.data.train.batch_size = batch
    c.data.train.pack = pack
    c.train.steps = steps
    c.train.learning_rate = lr
    c.train.warmup_ratio = warmup_ratio
    if log_every is not None:
        c.train.log_every = log_every
    if checkpoint_every is not None:
        c.train.checkpoint_every = checkpoint_every
    return c
