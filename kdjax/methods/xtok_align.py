"""Cross-tokenizer distillation through character-offset alignment (DSKD / GOLD-style token alignment).

The teacher's batch is decoded to text and re-encoded by both tokenizers with character offsets
(`CrossTokenizerHook`, a stage data hook). A teacher position and a student position are *aligned*
when their tokens end at the same character: both models have then read exactly the same text, whether
the segment since the previous alignment is one token on each side or several merged tokens. Over the
aligned positions the recipe applies

* `xtok_logits`: forward KL of the next-token distributions restricted to the tokens whose strings
  exist in both vocabularies (each side renormalized over that shared set, in the same order), × T²;
* `xtok_hidden`: MSE between the student's final hidden state (projected to the teacher's width by a
  learned module when the widths differ) and the teacher's;

plus the student's own cross-entropy on its tokenization. The shared vocabulary is computed once from
the two tokenizers (`teacher_tokenizer` / `student_tokenizer` directories, method arguments).
"""

from __future__ import annotations

from functools import lru_cache

from kdjax.knowledge import cross_tokenizer as xtok
from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, MethodError, Stage, Term, register
from kdjax.methods.kd import check_schedule


def _alignment(ctx, term):
    batch = ctx.teacher_batch if ctx.teacher_batch is not None else ctx.batch
    if "xtok_teacher_index" not in batch:
        raise KnowledgeError(f"term {term.name!r} reads the alignment arrays of CrossTokenizerHook; add the hook "
                             "to the stage (the xtok_align recipe does)")
    return batch["xtok_student_index"], batch["xtok_teacher_index"], batch["xtok_mask"]


@knowledge("xtok_logits", sources=("logits",), fn=xtok.aligned_logit_kl, cross_vocab=True)
def _xtok_logits(ctx, term):
    kw = ctx.args(term)
    pairs = kw.get("pairs")
    if not isinstance(pairs, xtok.VocabPairs):
        raise KnowledgeError(f"term {term.name!r} needs pairs=VocabPairs (kdjax.knowledge.cross_tokenizer."
                             "matched_vocabulary of the two tokenizers)")
    s_idx, t_idx, mask = _alignment(ctx, term)
    return xtok.aligned_logit_kl(ctx.s_out.logits, ctx.t_out.logits, s_idx, t_idx, mask, pairs,
                                 temperature=kw.get("temperature", 1.0), name=term.name)


@knowledge("xtok_hidden", sources=("hidden_states",), fn=xtok.aligned_hidden_mse, projectable=True,
           cross_vocab=True)
def _xtok_hidden(ctx, term):
    (s_layer, t_layer), = ctx.pairs(term)
    s_idx, t_idx, mask = _alignment(ctx, term)
    student_h = ctx.projection(term, ctx.student_at("hidden_states", s_layer))
    return xtok.aligned_hidden_mse(student_h, ctx.teacher_at("hidden_states", t_layer), s_idx, t_idx, mask,
                                   name=term.name)


@lru_cache(maxsize=8)
def shared_vocabulary(teacher_tokenizer: str, student_tokenizer: str) -> xtok.VocabPairs:
    """The exact-string vocabulary matches of two tokenizer directories (cached per pair)."""
    from transformers import AutoTokenizer
    return xtok.matched_vocabulary(AutoTokenizer.from_pretrained(teacher_tokenizer),
                                   AutoTokenizer.from_pretrained(student_tokenizer))


@register("xtok_align", "cross-tokenizer KD on offset-aligned positions: shared-vocabulary KL + hidden MSE + CE")
def xtok_align(teacher_tokenizer=None, student_tokenizer=None, logit_weight=1.0, hidden_weight=1.0,
               ce_weight=1.0, temperature=1.0, student_length=None) -> Method:
    logit_weight = check_schedule(logit_weight, "xtok_align: logit_weight")
    hidden_weight = check_schedule(hidden_weight, "xtok_align: hidden_weight")
    ce_weight = check_schedule(ce_weight, "xtok_align: ce_weight")
    temperature = check_schedule(temperature, "xtok_align: temperature", strict=True)
    terms = []
    if logit_weight != 0.0:
        if not teacher_tokenizer or not student_tokenizer:
            raise MethodError("xtok_align: the logit term needs method_args.xtok_align.teacher_tokenizer and "
                              "student_tokenizer (tokenizer directories), or logit_weight=0")
        pairs = shared_vocabulary(str(teacher_tokenizer), str(student_tokenizer))
        terms.append(Term.make("xtok_logits", "logits", weight=logit_weight, temperature=temperature, pairs=pairs))
    if hidden_weight != 0.0:
        terms.append(Term.make("xtok_hidden", "hidden_states", weight=hidden_weight, layers="final"))
    if ce_weight != 0.0:
        terms.append(Term.make("cross_entropy", "labels", weight=ce_weight))
    if not terms:
        raise MethodError("xtok_align: every weight is 0; give at least one term a weight")
    return Method("xtok_align", (Stage("xtok_align", tuple(terms), data_hook=xtok.CrossTokenizerHook(student_length)),),
                  description="offset-aligned cross-tokenizer KD", student_init="uniform")
