"""SID (Aguilar et al., "Knowledge Distillation from Internal Representations", AAAI 2020): distill
self-attention (KL) and [CLS] hidden states (cosine) progressively, layer by layer, then the classifier.

The stage is cut into L_S + 1 equal phases; κ (`nextLockedLay`) starts at 1 and advances when
step ≥ steps/(L_S+1)·κ (GKD spec §5, `--sid_lim_e=avg`). With g(i) = i·L_T/L_S:

* κ ≤ L_S:  L = Σ_{i ≤ κ} [ KL(softmax A^T_{g(i)} ‖ softmax A^S_i) + (1 − cos(H^S_i[CLS], H^T_{g(i)}[CLS])) ]
  (attention KL on the pre-softmax scores, T = 1, per head and query row; layer L_S's hidden pair is
  the final output of both models);
* κ > L_S: L = CE_{T=1}(z_S, z_T), the soft cross-entropy −Σ p_T log q_T, and nothing else.

As in the reference code, earlier layers are not frozen: every layer ≤ κ keeps being distilled, and
there is no hard label. The code's early advance when the cosine loss falls below `--sid_accumulate_t`
never fires with the logged 0 and is not implemented. Equal head counts and widths are required.
The KL is averaged over valid query rows (GKD's mean also counts padded rows). The phase boundaries
read the stage's float32 progress and are exact for stages up to ~10⁵ steps.
"""

from __future__ import annotations

from typing import Union

import jax.numpy as jnp

from kdjax.knowledge import attention as attention_lib
from kdjax.knowledge import divergences as divergences_lib
from kdjax.knowledge.registry import KnowledgeError, knowledge
from kdjax.methods.base import Method, Stage, Term, register
from kdjax.methods.kd import check_student_init


def phase(progress, student_layers: int):
    """κ at stage progress p: 1 + ⌊p·(L_S + 1)⌋ (float32, traced; boundaries exact up to rounding)."""
    n = float(student_layers + 1)
    return 1.0 + jnp.floor(jnp.asarray(progress, jnp.float32) * n + 4e-7 * n)


def _all_taps(term, student, teacher):
    kinds = {"attention_scores": None, "hidden_states": None}
    return dict(kinds), dict(kinds)


@knowledge("sid", sources=("attention_scores", "cls", "logits"), taps=_all_taps, head_sensitive=True)
def sid_loss(ctx, term):
    ls, lt = ctx.student.num_layers, ctx.teacher.num_layers
    if ctx.student.hidden_size != ctx.teacher.hidden_size:
        raise KnowledgeError(f"term {term.name!r}: SID compares [CLS] states of equal widths "
                             f"({ctx.student.hidden_size} != {ctx.teacher.hidden_size})")
    kappa = phase(ctx.progress, ls)
    mask = ctx.mask(term)
    one = jnp.ones((), jnp.float32)
    inter = jnp.zeros((), jnp.float32)
    metrics = {}
    for i in range(1, ls + 1):
        j = (i * lt) // ls
        att, _ = attention_lib.attention_kl(ctx.student_at("attention_scores", i - 1),
                                            ctx.teacher_at("attention_scores", j - 1), mask)
        s = ctx.student_at("hidden_states", i)[:, 0].astype(jnp.float32)
        t = ctx.teacher_at("hidden_states", j)[:, 0].astype(jnp.float32)
        cos = jnp.sum(s * t, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-8)
        cos_dist = jnp.mean(1.0 - cos)
        active = ((i <= kappa) & (kappa <= ls)).astype(jnp.float32)
        inter = inter + active * (att + cos_dist)
        metrics[f"{term.name}/attention{i}"] = (att, one)
        metrics[f"{term.name}/cls_cosine{i}"] = (cos_dist, one)
    soft, _ = divergences_lib.soft_cross_entropy(ctx.s_out.logits, ctx.t_out.logits, None, temperature=1.0)
    prediction = (kappa > ls).astype(jnp.float32)
    loss = inter + prediction * soft
    metrics.update({term.name: (loss, one), f"{term.name}/phase": (kappa, one), f"{term.name}/soft_ce": (soft, one)})
    return loss, metrics


@register("sid", "SID: layer-by-layer attention KL + [CLS] cosine in L_S+1 phases, then soft CE (T=1)")
def sid(*, student_init: Union[str, tuple] = "uniform") -> Method:
    """SID's progressive fine-tuning (one stage whose phases follow the step)."""
    return Method(name="sid", stages=(Stage("distill", (Term.make("sid", "attention_scores", name="sid"),)),),
                  description="SID: progressive attention KL + [CLS] cosine, then soft CE",
                  student_init=check_student_init(student_init, "sid: student_init"))
