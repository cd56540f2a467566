"""DGKD: densely guided KD -- the student learns from the teacher and every teacher assistant at once,
each guide dropped at random per step (GKD §18).

Son, Na, Choi, Hwang, "Densely Guided Knowledge Distillation using Multiple Teacher Assistants"
(ICCV 2021). With guides k = 1..K (the config teachers and the assistants trained before the student):

    m_k ~ Bernoulli(p)  independently per guide, one draw per step for the whole batch
    L   = Σ_k m_k · ρ_s · CE_T(z_S, z_T^k) + ρ_h · CE(y, z_S)

summed over the guides that survive (not averaged), CE_T the soft cross-entropy at temperature T with
no T². When every guide is dropped only the hard term remains. Defaults are GKD's logged run: p = 0.75,
T = 10, ρ_s = ρ_h = 0.5. The draws come from the stage key and the step (`StageContext.key`), so a
resumed run drops the same guides.

The chain is one config: with `assistants=1` (default) a first stage trains a teacher assistant from
the teacher exactly as TAKD's first step (T²·KL at `assistant_temperature` + CE, `kdjax.methods.takd`),
and the student stage is guided by the teacher and the assistant, the student being derived from the
trained assistant (GKD: "the student is initialised by truncating teacher 0, the TA"). `assistants=n`
trains n assistants in turn, each derived from and guided by every model before it (the default
engine combination, a weighted mean); `assistants=0` is DGKD over the config's teachers only.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from kdjax.methods.base import Method, MethodError, Stage, Term, register
from kdjax.methods.kd import (_is_number, check_positive_int, check_student_init, check_temperature, check_weight,
                              hard_label_term, keep_nonzero, stage_overrides)
from kdjax.methods.takd import assistant_model, kd_terms

KEY = "dgkd/survival"


def survivors(key, survival_p: float, num_guides: int):
    """`[K]` float mask: guide k survives this step with probability p (independent draws)."""
    return jax.random.bernoulli(key, survival_p, (num_guides,)).astype(jnp.float32)


def dgkd_loss(survival_p: float):
    def loss(sctx):
        names = [t.name for t in sctx.teachers]
        soft_terms = [t for t in sctx.terms if t.fn != "cross_entropy"]
        hard_terms = [t for t in sctx.terms if t.fn == "cross_entropy"]
        keep = survivors(sctx.key(KEY), survival_p, len(names))
        one = jnp.ones((), jnp.float32)
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        if soft_terms:
            for k, name in enumerate(names):
                soft, _ = sctx.teacher_loss(name, terms=soft_terms)
                total = total + keep[k] * soft
                metrics[f"dgkd/soft_{name}"] = (keep[k] * soft, one)
                metrics[f"dgkd/kept_{name}"] = (keep[k], one)
        if hard_terms:
            hard, m = sctx.teacher_loss(names[0], terms=hard_terms)
            total = total + hard
            metrics["dgkd/hard"] = (hard, one)
        return total, metrics

    return loss


def _names(count: int) -> list[str]:
    return ["assistant"] if count == 1 else [f"assistant{i + 1}" for i in range(count)]


@register("dgkd", "DGKD: teacher + assistant(s) guide the student, each dropped w.p. 1−p a step; 0.5·CE_T + 0.5·CE")
def dgkd(*, survival_p: float = 0.75, temperature=10.0, soft_weight=0.5, hard_weight=0.5, assistants: int = 1,
         assistant_layers: Union[None, int, Sequence[int]] = None, assistant_init: Union[str, tuple] = "uniform",
         assistant_shape: Optional[Mapping[str, int]] = None, assistant_temperature=10.0,
         assistant_soft_weight=1.0, assistant_hard_weight=1.0, student_from_assistant: bool = True,
         student_init: Union[str, tuple] = "uniform", steps: Optional[Mapping[str, int]] = None,
         learning_rates: Optional[Mapping[str, float]] = None) -> Method:
    """Densely guided KD (Son et al., 2021; GKD §18).

    Args:
      survival_p: probability that a guide's loss is kept in a step (0.75; 1 = never drop).
      temperature, soft_weight, hard_weight: T, ρ_s and ρ_h of the student stage (10, 0.5, 0.5).
      assistants: how many teacher assistants the run trains before the student (0: guides are the
        config teachers only).
      assistant_layers: depth of each assistant (an int for all, or one per assistant; None: halfway
        between its source and the student).
      assistant_init, assistant_shape: as in `takd`.
      assistant_temperature, assistant_soft_weight, assistant_hard_weight: the assistants' TAKD loss.
      student_from_assistant: derive the student from the last trained assistant (True) or the teacher.
      student_init: which layers the student copies.
      steps, learning_rates: per-stage overrides keyed by stage name ("assistant"/"assistantN", "student").
    """
    what = "dgkd"
    if not _is_number(survival_p) or not 0.0 < float(survival_p) <= 1.0:
        raise MethodError(f"{what}: survival_p must be in (0, 1], got {survival_p!r}")
    if not isinstance(assistants, int) or isinstance(assistants, bool) or assistants < 0:
        raise MethodError(f"{what}: assistants must be an int >= 0, got {assistants!r}")
    temperature = check_temperature(temperature, f"{what}: temperature")
    soft_weight = check_weight(soft_weight, f"{what}: soft_weight")
    terms = keep_nonzero(Term.make("soft_cross_entropy", "logits", weight=soft_weight, name="soft",
                                   temperature=temperature),
                         hard_label_term(check_weight(hard_weight, f"{what}: hard_weight")), what=what)
    names = _names(assistants)
    layers = list(assistant_layers) if isinstance(assistant_layers, (list, tuple)) else [assistant_layers] * assistants
    if len(layers) != assistants:
        raise MethodError(f"{what}: assistant_layers lists {len(layers)} depths for {assistants} assistant(s)")
    models, stages = [], []
    ta_terms = kd_terms(check_weight(assistant_soft_weight, f"{what}: assistant_soft_weight"),
                        check_weight(assistant_hard_weight, f"{what}: assistant_hard_weight"),
                        check_temperature(assistant_temperature, f"{what}: assistant_temperature"), what=what)
    for i, name in enumerate(names):
        models.append(assistant_model(what, check_positive_int(layers[i], f"{what}: assistant_layers", allow_none=True),
                                      assistant_init, assistant_shape, name=name,
                                      derive_from=names[i - 1] if i else None))
        stages.append(Stage(name, ta_terms, trains=name))
    stages.append(Stage("student", terms, loss=dgkd_loss(float(survival_p))))
    return Method("dgkd", stage_overrides(tuple(stages), what, steps, learning_rates),
                  description=f"DGKD: guides dropped w.p. {1 - float(survival_p):g}, {soft_weight}·CE_T={temperature} "
                              f"+ {hard_weight}·CE",
                  student_init=check_student_init(student_init, f"{what}: student_init"), models=tuple(models),
                  student_from=names[-1] if (names and student_from_assistant) else None)
