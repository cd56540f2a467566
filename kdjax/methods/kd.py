"""Hinton knowledge distillation, and the small helpers every logit-based recipe builds on.

`kd` is the baseline all other recipes are measured against:

    L = (1 − α) · CE(y, q) + α · T² · KL(p_T ‖ q_T)

with `p_T`, `q_T` the teacher's and student's softmax at temperature `T`. The same two terms (a hard
cross-entropy and a temperature-scaled divergence) recur in PKD, MobileBERT, MLKD-BERT and the LLM
recipes, so their construction and the argument checks live here and are imported by those files.

Defaults: α = 0.5 (Hinton et al. and most reproductions weigh the two terms equally) and T = 10, the
temperature of GKD's KD and PKD baselines (`--distill_temperature=10`), so that `kd` is exactly `pkd`
with β = 0 and the two are directly comparable. GKD's own KD baseline uses a soft cross-entropy without
`T²`; kdjax follows the formula above (docs/methods.md), whose gradients do not shrink as `1/T²`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

from kdjax.knowledge import DIVERGENCE_KINDS
from kdjax.matching import STRATEGIES
from kdjax.methods.base import Method, MethodError, Schedule, Stage, Term, register

SCHEDULE_KINDS = ("linear", "cosine")


# --------------------------------------------------------------------------------------------------
# Argument checks shared by the recipe files. Each raises a one-line MethodError naming the recipe.
# --------------------------------------------------------------------------------------------------

def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_schedule(value: Any, what: str, *, low: float = 0.0, high: Optional[float] = None,
                   strict: bool = False) -> Schedule:
    """`value` if it is a number or a `("linear"|"cosine", start, end)` schedule within the bounds.

    `strict` excludes `low` itself (temperatures must be > 0; weights may be 0).
    """
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple):
        if len(value) != 3 or value[0] not in SCHEDULE_KINDS or not all(_is_number(v) for v in value[1:]):
            raise MethodError(f"{what} must be a number or a (\"linear\"|\"cosine\", start, end) schedule, got {value!r}")
        ends = value[1:]
    elif _is_number(value):
        ends = (value,)
    else:
        raise MethodError(f"{what} must be a number or a (\"linear\"|\"cosine\", start, end) schedule, got {value!r}")
    for v in ends:
        if (v <= low if strict else v < low) or (high is not None and v > high):
            bound = f"in [{low}, {high}]" if high is not None else (f"> {low}" if strict else f">= {low}")
            raise MethodError(f"{what} must be {bound}, got {value!r}")
    return tuple(float(v) if i else v for i, v in enumerate(value)) if isinstance(value, tuple) else float(value)


def check_weight(value: Any, what: str) -> Schedule:
    """A non-negative loss weight (constant or schedule)."""
    return check_schedule(value, what, low=0.0)


def check_temperature(value: Any, what: str) -> Schedule:
    """A strictly positive softmax temperature (constant or schedule)."""
    return check_schedule(value, what, low=0.0, strict=True)


def check_fraction(value: Any, what: str) -> Schedule:
    """A mixing coefficient in [0, 1] (constant or schedule), e.g. Hinton's α."""
    return check_schedule(value, what, low=0.0, high=1.0)


def check_kind(kind: Any, what: str, allowed: Sequence[str] = DIVERGENCE_KINDS) -> str:
    if kind not in allowed:
        raise MethodError(f"{what} {kind!r} is not one of {', '.join(allowed)}")
    return kind


def check_layers(layers: Any, what: str) -> Union[str, tuple]:
    """A `kdjax.matching` strategy name or explicit `(student, teacher)` pairs."""
    if isinstance(layers, str):
        if layers not in STRATEGIES:
            raise MethodError(f"{what} {layers!r} is not a layer matching; use one of {', '.join(STRATEGIES)} "
                              "or explicit (student, teacher) pairs")
        return layers
    try:
        pairs = tuple(tuple(int(x) for x in p) for p in layers)
    except (TypeError, ValueError):
        raise MethodError(f"{what} must be a matching name or (student, teacher) pairs, got {layers!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise MethodError(f"{what} must be non-empty, non-negative (student, teacher) pairs, got {layers!r}")
    return pairs


def check_positions(positions: Any, what: str) -> str:
    if positions not in ("all", "labeled"):
        raise MethodError(f"{what} must be 'all' or 'labeled', got {positions!r}")
    return positions


def check_positive_int(value: Any, what: str, *, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise MethodError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_student_init(init: Any, what: str) -> Union[str, tuple]:
    """A `kdjax.students` initialization: a name (checked there) or a tuple of teacher layer indices."""
    if isinstance(init, str):
        return init
    try:
        layers = tuple(int(i) for i in init)
    except (TypeError, ValueError):
        raise MethodError(f"{what} must be an init name such as 'uniform', 'first' or 'random', "
                          f"or a tuple of teacher layer indices, got {init!r}") from None
    if not layers or min(layers) < 0:
        raise MethodError(f"{what} must list non-negative teacher layer indices, got {init!r}")
    return layers


def complement(alpha: Schedule) -> Schedule:
    """`1 − α` for a constant or a schedule (schedules are affine in their end points, so this is exact)."""
    if isinstance(alpha, tuple):
        return (alpha[0], 1.0 - alpha[1], 1.0 - alpha[2])
    return 1.0 - alpha


def scale(weight: Schedule, factor: float) -> Schedule:
    """`factor · weight` for a constant or a schedule."""
    if isinstance(weight, tuple):
        return (weight[0], weight[1] * factor, weight[2] * factor)
    return weight * factor


def is_zero(weight: Schedule) -> bool:
    """True for a weight that is zero for the whole stage: such terms are left out of a recipe."""
    if isinstance(weight, tuple):
        return weight[1] == 0 and weight[2] == 0
    return weight == 0


def keep_nonzero(*terms: Term, what: str) -> tuple[Term, ...]:
    """The terms whose weight is not identically zero (so α = 1 needs no labels, α = 0 no teacher logits).

    Raises if nothing is left: a stage that trains on no loss is a configuration mistake.
    """
    kept = tuple(t for t in terms if not is_zero(t.weight))
    if not kept:
        raise MethodError(f"{what}: every term ({', '.join(t.name for t in terms)}) has weight 0; "
                          "give at least one a positive weight")
    return kept


# --------------------------------------------------------------------------------------------------
# Term builders.
# --------------------------------------------------------------------------------------------------

def logit_kd_term(weight: Schedule = 1.0, temperature: Schedule = 1.0, *, kind: str = "forward_kl",
                  name: str = "kd", positions: str = "all", scale_by_t2: bool = True, **divergence_args: Any) -> Term:
    """`weight · [T²] · D(p_T, q_T)` on the head logits (token- or sample-level), via `divergence`."""
    return Term.make("divergence", "logits", weight=weight, name=name, positions=positions, kind=kind,
                     temperature=temperature, scale_by_t2=scale_by_t2, **divergence_args)


def hard_label_term(weight: Schedule = 1.0, *, name: str = "hard_ce", positions: str = "all") -> Term:
    """`weight · CE(y, q)` against `batch["labels"]` (ignore index −100; causal LMs shifted by the engine)."""
    return Term.make("cross_entropy", "labels", weight=weight, name=name, positions=positions)


def stage_overrides(stages: Sequence[Stage], what: str, steps: Optional[Mapping[str, int]] = None,
                    learning_rates: Optional[Mapping[str, float]] = None) -> tuple[Stage, ...]:
    """`stages` with per-stage step budgets / learning rates from `{stage_name: value}` mappings."""
    names = [s.name for s in stages]
    out = list(stages)
    for field, table in (("steps", steps), ("learning_rate", learning_rates)):
        if not table:
            continue
        if not isinstance(table, Mapping):
            raise MethodError(f"{what}: {field} overrides must map stage name -> value, got {table!r}")
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise MethodError(f"{what}: no stage named {', '.join(map(repr, unknown))} for {field}; "
                              f"stages are {', '.join(names)}")
        for i, st in enumerate(out):
            if st.name in table:
                value = table[st.name]
                if field == "steps":
                    value = check_positive_int(value, f"{what}: steps[{st.name!r}]")
                elif not _is_number(value) or value <= 0:
                    raise MethodError(f"{what}: learning_rates[{st.name!r}] must be > 0, got {value!r}")
                out[i] = dataclasses.replace(st, **{field: value})
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The recipe.
# --------------------------------------------------------------------------------------------------

@register("kd", "Hinton KD: (1-α)·CE(labels) + α·T²·KL(p_T‖q_T); α=0.5, T=10")
def kd(*, alpha: Schedule = 0.5, temperature: Schedule = 10.0, kind: str = "forward_kl", positions: str = "all",
       student_init: Union[str, tuple] = "uniform", chunk_size: Optional[int] = None) -> Method:
    """Hinton et al. (2015): soft targets at temperature T plus the hard labels.

    Args:
      alpha: weight α of the soft term; the hard term gets 1 − α. With α = 1 no labels are needed.
      temperature: T, for teacher and student alike; the soft term is multiplied by T².
      kind: the divergence (`kdjax.knowledge.DIVERGENCE_KINDS`); Hinton's is `forward_kl`.
      positions: token-level logits: `"all"` valid tokens or only `"labeled"` ones (MLM/LM labels).
      student_init: `kdjax.students` initialization.
      chunk_size: compute the soft term over sequence chunks of this many positions, recomputing the
        LM heads per chunk, so `[B, S, V]` logits never exist (`kdjax.knowledge.chunked_divergence`;
        same value and gradients). For large vocabularies; None computes full logits.
    """
    alpha = check_fraction(alpha, "kd: alpha")
    chunk_args = {"chunk_size": check_positive_int(chunk_size, "kd: chunk_size")} if chunk_size is not None else {}
    temperature = check_temperature(temperature, "kd: temperature")
    kind = check_kind(kind, "kd: kind")
    positions = check_positions(positions, "kd: positions")
    student_init = check_student_init(student_init, "kd: student_init")
    terms = keep_nonzero(hard_label_term(complement(alpha), positions=positions),
                         logit_kd_term(alpha, temperature, kind=kind, positions=positions, **chunk_args), what="kd")
    return Method(name="kd", stages=(Stage("distill", terms),),
                  description=f"Hinton KD: {complement(alpha)}·CE + {alpha}·T²·{kind} at T={temperature}",
                  student_init=student_init)
