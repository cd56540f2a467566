"""Task-specific distillation of a fine-tuned teacher into a 3-layer student on the review task.

    python -m kdjax.main --config=configs/task_distill.py:method=kd,teacher=workdir/finetune/student \
        --workdir=workdir/task_kd

`method` is any registered recipe whose stages read task data: `kd` (Hinton), `tinybert` (task
distillation: intermediate layers, then soft predictions; `general=False`), or `supervised` for the
labels-only baseline with the same student and steps. The student copies teacher layers (1, 3, 5)
and the teacher's classification head.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, method="kd", teacher="workdir/finetune/student", steps=300, lr=1e-4, batch=32,
                            max_length=64, task="kdjax_reviews")
    c = common.base_config()
    c.teacher.path = args.teacher
    c.student.num_layers = 3
    c.student.layers = (1, 3, 5)
    c.method = args.method
    if args.method == "tinybert":
        c.method_args = dict(tinybert=dict(general=False))
    elif args.method == "kd":
        c.method_args = dict(kd=dict(alpha=0.5, temperature=4.0))
    common.train_on(c, args.task, batch=args.batch, max_length=args.max_length, steps=args.steps, lr=args.lr,
                    warmup_ratio=0.1, checkpoint_every=100)
    c.data.task = c.data.train.copy_and_resolve_references()
    return c
