"""ULD: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation").

A teacher and a student with different tokenizers have no common vocabulary, so KL over ids is
undefined. ULD compares the two next-token distributions with the Wasserstein-1 distance under a cost
that ignores which token is which: with both probability vectors sorted in decreasing order (the
shorter padded with zeros), the distance has the closed form ``Σ_i |p_(i) − q_(i)|``. Positions are
aligned the way the paper aligns answers: the k-th answer token of the student with the k-th answer
token of the teacher, the longer answer truncated to the shorter (`kdjax.knowledge.cross_tokenizer`).

    L = λ_CE · CE(student) + λ_ULD · ULD(teacher, student)

Defaults follow the paper's reference implementation: λ_CE = λ_ULD = 1 and both temperatures 1.
The positions compared are the labeled ones (the answer/continuation; every valid token when the
batch carries no prompt mask). With different tokenizers the stage's data hook re-tokenizes each batch
for the student (`CrossTokenizerHook`); with the same tokenizer it passes the batch through.
"""

from __future__ import annotations

import jax.numpy as jnp

from kdjax.knowledge import cross_tokenizer as xtok
from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, Stage, Term, register
from kdjax.methods.kd import check_schedule


def prediction_mask(batch, causal: bool, labeled: bool):
    """`[B, S]` positions whose logits predict a compared token: labeled (or valid) tokens, and for a
    causal model the position before each of them (logits at i predict token i + 1)."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = jnp.ones(batch["input_ids"].shape, jnp.int32)
    mask = mask.astype(jnp.int32)
    labels = batch.get("labels")
    if labeled and labels is not None and labels.shape == mask.shape:
        mask = mask * (labels != -100).astype(jnp.int32)
    if causal:
        mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    return mask


@knowledge("uld", sources=("logits",), fn=xtok.uld_loss, cross_vocab=True)
def _uld(ctx, term):
    kw = ctx.args(term)
    if ctx.s_out.logits is None or ctx.t_out.logits is None:
        raise KnowledgeError(f"term {term.name!r}: ULD needs both models' full logits; drop chunk_size")
    labeled = term.positions == "labeled"
    s_mask = prediction_mask(ctx.batch, ctx.student.causal, labeled)
    t_mask = prediction_mask(ctx.teacher_batch if ctx.teacher_batch is not None else ctx.batch,
                             ctx.teacher.causal, labeled)
    return xtok.uld_loss(ctx.s_out.logits, ctx.t_out.logits, s_mask, t_mask, name=term.name,
                         student_temperature=ctx.schedule(kw.get("student_temperature", 1.0)),
                         teacher_temperature=ctx.schedule(kw.get("teacher_temperature", 1.0)))


@register("uld", "Universal Logit Distillation: sorted-probability Wasserstein-1 + CE (any two tokenizers)")
def uld(distillation_weight=1.0, crossentropy_weight=1.0, student_temperature=1.0, teacher_temperature=1.0,
        positions="labeled", student_length=None) -> Method:
    distillation_weight = check_schedule(distillation_weight, "uld: distillation_weight")
    crossentropy_weight = check_schedule(crossentropy_weight, "uld: crossentropy_weight")
    student_temperature = check_schedule(student_temperature, "uld: student_temperature", strict=True)
    teacher_temperature = check_schedule(teacher_temperature, "uld: teacher_temperature", strict=True)
    terms = (Term.make("uld", "logits", weight=distillation_weight, positions=positions,
                       student_temperature=student_temperature, teacher_temperature=teacher_temperature),
             Term.make("cross_entropy", "labels", weight=crossentropy_weight))
    return Method("uld", (Stage("uld", terms, data_hook=xtok.CrossTokenizerHook(student_length)),),
                  description="ULD (Boizard et al. 2024)", student_init="uniform")
