"""BERT-of-Theseus: progressive module replacing (GKD §8).

Xu, Zhou, Ge, Wei, Zhou, "BERT-of-Theseus: Compressing BERT by Progressive Module Replacing"
(EMNLP 2020). The teacher (predecessor) is cut into L_S modules of r = L_T / L_S consecutive blocks;
student (successor) block i stands for teacher blocks r·i .. r·i + r − 1. At every step each module is
drawn independently: with probability p(t) the student's block i runs, otherwise the teacher's group,
inside one forward of the student (a `ForwardHooks.block` hook running `apply_block` on the same input).
There is no distillation term: the task loss (hard CE) of the mixed model trains the successor.

    p(t) = min(1, b + t / (f · T) · (1 − b)),   b = 0.3 (`replacing_rate`), f = 0.66 (`full_at`)

so p reaches 1 after 66% of the stage and the rest is plain fine-tuning of the student (the paper's
second phase). Frozen: the teacher blocks (teacher parameters are never trained and run without
dropout). Trained: everything of the student — its blocks, embeddings, final norm and head, which always
come from the student. The student starts from the teacher's first L_S blocks (`student_init="first"`,
GKD's `--student_truncate_tn=0`); evaluation and export use the pure student.

The draw is `jax.random.bernoulli(key("theseus/replace"), p, [L_S])` with the stage's per-step key, so a
resumed run draws what the uninterrupted run drew. Teacher and student must have the same width and
L_T must be a multiple of L_S. With several teachers GLMKD splices a uniformly chosen teacher per module;
this recipe replaces with one teacher (`teacher`, default the first). The paper's and GLMKD's draws
agree (independent per module). GLMKD skips the teacher's own forward; here the step still builds it,
but no term reads its outputs, so XLA may drop it as dead code (not measured).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.methods.base import Method, MethodError, Stage, register
from kdjax.methods.kd import check_fraction, check_student_init, hard_label_term
from kdjax.models.transformer import ForwardHooks, apply_block

KEY = "theseus/replace"


def replacement_probability(progress, replacing_rate: float, full_at: float):
    """p(t): the probability that a module is the student's, at `progress` = t / T."""
    return jnp.minimum(1.0, replacing_rate + progress / full_at * (1.0 - replacing_rate))


def replacement_mask(key, p, num_modules: int):
    """`[L_S]` bools: True where the student's block runs this step."""
    return jax.random.bernoulli(key, p, (num_modules,))


def _theseus_loss(replacing_rate: float, full_at: float, teacher: Optional[str]):
    def loss(sctx):
        spec = sctx.teachers[0] if teacher is None else next((t for t in sctx.teachers if t.name == teacher), None)
        if spec is None:
            raise MethodError(f"theseus: no teacher named {teacher!r}")
        if spec.name not in sctx.teacher_params:
            raise MethodError("theseus: the step was built without teacher parameters (module replacement "
                              "runs teacher blocks inside the student forward)")
        n_s, n_t = sctx.student_config.num_layers, spec.config.num_layers
        if n_t % n_s or spec.config.hidden_size != sctx.student_config.hidden_size:
            raise MethodError(f"theseus: needs equal widths and L_T a multiple of L_S; student "
                              f"{n_s}x{sctx.student_config.hidden_size}, teacher {n_t}x{spec.config.hidden_size}")
        r = n_t // n_s
        p = replacement_probability(sctx.progress, replacing_rate, full_at)
        keep = replacement_mask(sctx.key(KEY), p, n_s)
        t_params = jax.lax.stop_gradient(sctx.teacher_params[spec.name])

        def block(layer, h_in, h_out, ctx):
            h = h_in
            for j in range(r):
                h = apply_block(spec.graphdef, t_params, layer * r + j, h, ctx)
            return jnp.where(keep[layer], h_out, h)

        s_out, s_inter = sctx.student_forward(hooks=ForwardHooks(block=block))
        total, metrics = sctx.teacher_loss(spec.name, s_out, s_inter)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["theseus/p"] = (p, one)
        metrics["theseus/student_modules"] = (keep.astype(jnp.float32).sum(), one)
        for i in range(n_s):
            metrics[f"theseus/keep{i}"] = (keep[i].astype(jnp.float32), one)
        return total, metrics

    return loss


@register("theseus", "BERT-of-Theseus: student modules replace teacher block groups with p rising 0.3→1 by 66%")
def theseus(*, replacing_rate=0.3, full_at: float = 0.66, teacher: Optional[str] = None,
            student_init="first") -> Method:
    """Progressive module replacing (GKD §8).

    Args:
      replacing_rate: b, the probability of the student's module at the start.
      full_at: the fraction of the stage at which p reaches 1 (GKD's `theseus_not_replaced_steps`).
      teacher: the predecessor's name (default: the first teacher).
      student_init: `kdjax.students` initialization; "first" = the teacher's first L_S blocks.
    """
    replacing_rate = check_fraction(replacing_rate, "theseus: replacing_rate")
    if isinstance(replacing_rate, tuple):
        raise MethodError("theseus: replacing_rate must be a number (the schedule is built in)")
    if not isinstance(full_at, (int, float)) or not 0 < full_at:
        raise MethodError(f"theseus: full_at must be > 0, got {full_at!r}")
    student_init = check_student_init(student_init, "theseus: student_init")
    stage = Stage("replace", (hard_label_term(1.0),), loss=_theseus_loss(float(replacing_rate), float(full_at),
                                                                         teacher))
    return Method("theseus", (stage,), description="BERT-of-Theseus module replacing", student_init=student_init)
