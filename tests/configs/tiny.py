"""A seconds-long CLI run on a tiny teacher (its path is passed with --config.teacher.path)."""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, steps=16)
    c = common.base_config()
    c.teacher.path = ""
    c.student.num_layers = 2
    c.method = "kd"
    c.data.train.task = "kdjax_reviews"
    c.data.train.max_length = 32
    c.data.train.batch_size = 8
    c.train.steps = args.steps
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    return c
