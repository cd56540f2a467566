"""TinyBERT task distillation on a GLUE task: fine-tune all-MiniLM-L6-v2, then distill it into 3 layers.

    tfds build glue/sst2 --data_dir ~/tensorflow_datasets --file_format array_record
    python -m kdjax.main --config=configs/glue_tinybert.py:stage=teacher,task=sst2 --workdir=workdir/glue/teacher
    python -m kdjax.main --config=configs/glue_tinybert.py:task=sst2,teacher=workdir/glue/teacher/student \
        --workdir=workdir/glue/tinybert

`stage=teacher` fine-tunes the pretrained encoder with a new classification head on hard labels (the
teacher TinyBERT's task stages need: one with task logits). `stage=distill` (the default) runs TinyBERT's
task distillation (`general=False`, the encoder is already pre-trained): hidden-state (with embeddings)
and attention-score MSE on uniformly matched layers, then soft cross-entropy on the task logits. The
student copies teacher layers 1, 3, 5 and the teacher's classifier. The class count comes from the task
registry (`kdjax.data.tasks`), so any single-label GLUE classification task works (`task=mrpc`, `rte`, ...).

The mesh is pure data parallelism over every device (`ici=(-1, 1, 1)`): a 22M-parameter model fits
each core, so replicating it and splitting only the batch is the cheapest layout; the global batch must
then be a multiple of the device count (32 on the 8 cores of a Colab TPU: 4 per core).
TinyBERT's two task stages run `steps` steps each. Options (defaults): `:stage=distill,task=sst2,
teacher=workdir/glue/teacher/student,steps=1000,batch=32,max_length=64,data_dir=` and `lr=` (5e-5 for
the teacher, 1e-4 for distillation); an empty `data_dir` means `$TFDS_DATA_DIR` or ~/tensorflow_datasets.
"""

from configs import common
from kdjax.data import tasks

STAGES = ("teacher", "distill")


def get_config(arg=None):
    args = common.parse_arg(arg, stage="distill", task="sst2", teacher="workdir/glue/teacher/student", steps=1000,
                            lr=None, batch=32, max_length=64, data_dir="")
    if args.stage not in STAGES:
        raise ValueError(f"glue_tinybert: stage={args.stage!r} is not one of {', '.join(STAGES)}; use stage=teacher "
                         "to fine-tune the teacher, then stage=distill")
    spec = tasks.get_task(args.task)  # one-line UnknownTaskError naming the registered tasks
    if spec.is_regression or not spec.label_names:
        raise ValueError(f"glue_tinybert: task {spec.name!r} has no class labels; choose a classification task "
                         "such as sst2, mrpc, rte or qnli")
    c = common.base_config()
    if args.stage == "teacher":
        # The whole pretrained encoder (6 layers, copied as is) plus a new classifier, trained on labels.
        c.teacher.path = common.MINILM
        c.student.num_layers = 6
        c.student.init = "first"
        c.student.head = "classification"
        c.student.num_labels = spec.num_labels
        c.method = "supervised"
        lr = 5e-5
    else:
        c.teacher.path = args.teacher
        c.student.num_layers = 3
        c.student.layers = (1, 3, 5)
        c.method = "tinybert"
        c.method_args = dict(tinybert=dict(general=False))
        lr = 1e-4
    c.data.train.task = spec.name
    c.data.train.max_length = args.max_length
    c.data.train.batch_size = args.batch
    c.data.train.data_dir = args.data_dir or None
    c.data.task = c.data.train.copy_and_resolve_references()
    c.train.steps = args.steps
    c.train.learning_rate = float(args.lr) if args.lr else lr
    c.train.warmup_ratio = 0.1
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.mesh.ici = (-1, 1, 1)
    return c
