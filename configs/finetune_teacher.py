"""Fine-tune the real teacher (all-MiniLM-L6-v2 + a classification head) on the embedded review task.

    python -m kdjax.main --config=configs/finetune_teacher.py --workdir=workdir/finetune

The "student" here is a full copy of the pretrained model (6 layers, init "first") with a new
3-way classification head, trained with hard labels only; the result (workdir/finetune/student) is the
fine-tuned teacher for task distillation (configs/task_distill.py). Options: `:steps=300,lr=1e-4`.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, steps=300, lr=1e-4, batch=32, max_length=64, task="kdjax_reviews")
    c = common.base_config()
    c.teacher.path = common.MINILM
    c.student.num_layers = 6
    c.student.init = "first"
    c.student.head = "classification"
    c.student.num_labels = 3
    c.method = "supervised"
    common.train_on(c, args.task, batch=args.batch, max_length=args.max_length, steps=args.steps, lr=args.lr,
                    warmup_ratio=0.1, checkpoint_every=100)
    return c
