"""Distill the causal teacher of configs/causal_teacher.py into a 2-layer student, off- or on-policy.

    python -m kdjax.main --config=configs/causal_teacher.py --workdir=workdir/causal_teacher
    python -m kdjax.main --config=configs/onpolicy.py:recipe=gkd_onpolicy --workdir=workdir/onpolicy_gkd

`recipe` is one of `kd` (off-policy logit KD on the corpus, T=1), `gkd_onpolicy` (λ=1: every step on
student samples, JSD β=0.5), `onpolicy_rkl`, `distillm_adaptive` (SRKL with the replay buffer) or
`minillm_pg`. Prompts are the first `prompt` tokens of each corpus window (sentence prefixes); the
on-policy recipes sample the rest of the window from the student. Every recipe gets the same
number of steps, batch and learning rate; the student starts from teacher layers 0 and 2 (uniform).
benchmarks/onpolicy.py runs all of them and scores the students on held-out text.
Options: `:recipe=kd,steps=150,batch=8,max_length=32,prompt=8,lr=1e-3,teacher=workdir/causal_teacher/student`.
"""

from configs import common

RECIPES = ("kd", "gkd_onpolicy", "onpolicy_rkl", "distillm_adaptive", "minillm_pg")


def get_config(arg=None):
    args = common.parse_arg(arg, recipe="kd", steps=150, batch=8, max_length=32, prompt=8, lr=1e-3,
                            teacher="workdir/causal_teacher/student")
    if args.recipe not in RECIPES:
        raise common.config_lib.ConfigFieldError(f"recipe={args.recipe!r} is not one of {', '.join(RECIPES)}")
    c = common.base_config()
    c.teacher.path = args.teacher
    c.student.num_layers = 2
    c.student.init = "uniform"
    c.method = args.recipe
    if args.recipe == "kd":
        c.method_args = {"kd": dict(temperature=1.0, alpha=1.0)}
    elif args.recipe == "gkd_onpolicy":
        c.method_args = {"gkd_onpolicy": dict(lmbda=1.0, beta=0.5, temperature=1.0, prompt_length=args.prompt)}
    else:
        c.method_args = {args.recipe: dict(prompt_length=args.prompt)}
    common.train_on(c, "kdjax_corpus", batch=args.batch, max_length=args.max_length, steps=args.steps, lr=args.lr,
                    pack=True, log_every=10, checkpoint_every=1000)
    return c
