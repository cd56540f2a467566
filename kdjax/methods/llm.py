"""Token-level distillation of causal language models: MiniLLM, DistiLLM and GKD divergences.

All three compare next-token distributions over the full vocabulary at T = 1 on the positions with
LM labels (`positions="labeled"`: the response tokens when prompts are masked with −100), with the
teacher scoring the same sequences as the student. They differ only in the divergence:

* **minillm** — reverse KL `KL(q ‖ p)` (mode-seeking; Gu et al., 2024);
* **distillm** — skew reverse KL `KL(q ‖ (1−λ)p + λq)` (default; DistiLLM's released scripts use
  `adaptive-srkl`) or skew forward KL `KL(p ‖ λp + (1−λ)q)`, λ = 0.1 (Ko et al., 2024);
* **gkd** — generalized JSD with TRL's β convention (β = 0.5; β→0 forward KL, β→1 reverse KL;
  Agarwal et al., 2024; TRL `GKDTrainer`).

These recipes are the **off-policy** forms: the sequences come from the data. The on-policy parts of
the papers (MiniLLM's policy gradient, DistiLLM's adaptive student-generated data, GKD's λ fraction of
student samples) sample in the training loop and are the recipes of `kdjax/methods/onpolicy.py`
(`minillm_pg`, `distillm_adaptive`, `gkd_onpolicy`, `onpolicy_rkl`); `gkd(lmbda=...)` and friends
reject a non-zero on-policy fraction and name the on-policy recipe instead of silently ignoring it. An optional `lm_weight`
adds the hard next-token cross-entropy (MiniLLM's pre-training loss, or SFT on the data).
"""

from __future__ import annotations

from typing import Optional, Union

from kdjax.methods.base import Method, MethodError, Schedule, Stage, register
from kdjax.methods.kd import (check_fraction, check_kind, check_positions, check_positive_int, check_student_init,
                              check_temperature, check_weight, hard_label_term, keep_nonzero, logit_kd_term)


def _llm_method(name: str, kind: str, description: str, *, weight: Schedule, temperature: Schedule,
                lm_weight: Schedule, positions: str, student_init: Union[str, tuple], chunk_size: Optional[int] = None,
                **divergence_args) -> Method:
    weight = check_weight(weight, f"{name}: weight")
    if chunk_size is not None:
        # Sequence chunks with the LM heads recomputed per chunk: no [B, S, V] logits (same value and gradients).
        divergence_args["chunk_size"] = check_positive_int(chunk_size, f"{name}: chunk_size")
    temperature = check_temperature(temperature, f"{name}: temperature")
    positions = check_positions(positions, f"{name}: positions")
    terms = keep_nonzero(logit_kd_term(weight, temperature, kind=kind, name=kind, positions=positions,
                                       **divergence_args),
                         hard_label_term(check_weight(lm_weight, f"{name}: lm_weight"), name="lm", positions=positions),
                         what=name)
    return Method(name=name, stages=(Stage("distill", terms),), description=description,
                  student_init=check_student_init(student_init, f"{name}: student_init"))


ON_POLICY_RECIPES = {"gkd": "gkd_onpolicy", "distillm": "distillm_adaptive", "minillm": "minillm_pg"}


def _off_policy_only(name: str, fraction: float, arg: str) -> None:
    if fraction != 0:
        raise MethodError(f"{name}: {arg}={fraction} asks for on-policy student samples, which this off-policy "
                          f"recipe does not generate; use {arg}=0, or the on-policy recipe "
                          f"{ON_POLICY_RECIPES[name]!r} (kdjax/methods/onpolicy.py)")


@register("minillm", "MiniLLM (off-policy): token-level reverse KL(q‖p) over the vocabulary, T=1")
def minillm(*, weight: Schedule = 1.0, temperature: Schedule = 1.0, lm_weight: Schedule = 0.0,
            positions: str = "labeled", student_init: Union[str, tuple] = "uniform",
            chunk_size: Optional[int] = None) -> Method:
    """MiniLLM's reverse KL, token-level and off-policy.

    Args:
      weight: weight of the divergence; lm_weight: weight of the hard next-token CE (0 drops it).
      temperature: T (1 in the paper; the divergence is multiplied by T²).
      positions: `"labeled"` (tokens with LM labels) or `"all"` valid tokens.
      chunk_size: compute the divergence over sequence chunks of this many positions with the LM heads
        recomputed per chunk (large vocabularies; see `kd`'s `chunk_size`). None: full logits.
    """
    return _llm_method("minillm", "reverse_kl", "MiniLLM (off-policy): reverse KL", weight=weight,
                       temperature=temperature, lm_weight=lm_weight, positions=positions, student_init=student_init,
                       chunk_size=chunk_size)


@register("distillm", "DistiLLM (off-policy): skew reverse KL (or skew KL via kind), λ=0.1, T=1")
def distillm(*, kind: str = "skew_reverse_kl", lam: float = 0.1, weight: Schedule = 1.0, temperature: Schedule = 1.0,
             lm_weight: Schedule = 0.0, positions: str = "labeled", student_on_policy: float = 0.0,
             student_init: Union[str, tuple] = "uniform", chunk_size: Optional[int] = None) -> Method:
    """DistiLLM's skew divergences.

    Args:
      kind: `"skew_reverse_kl"` (SRKL) or `"skew_kl"` (SKL).
      lam: the skew λ in [0, 1] (0.1 in the paper).
      student_on_policy: fraction of student-generated sequences; only 0 (off-policy) is supported.
      chunk_size: sequence-chunked divergence, as for `minillm`.
    """
    check_kind(kind, "distillm: kind", ("skew_kl", "skew_reverse_kl"))
    lam = check_fraction(lam, "distillm: lam")
    if isinstance(lam, tuple):
        raise MethodError("distillm: lam must be a constant in [0, 1], not a schedule")
    _off_policy_only("distillm", student_on_policy, "student_on_policy")
    label = "SRKL" if kind == "skew_reverse_kl" else "SKL"
    return _llm_method("distillm", kind, f"DistiLLM (off-policy): {label} with λ={lam}", weight=weight,
                       temperature=temperature, lm_weight=lm_weight, positions=positions, student_init=student_init,
                       chunk_size=chunk_size, lam=lam)


@register("gkd", "GKD (off-policy): generalized JSD_β with TRL's convention, β=0.5, T=1")
def gkd(*, beta: float = 0.5, lmbda: float = 0.0, weight: Schedule = 1.0, temperature: Schedule = 1.0,
        lm_weight: Schedule = 0.0, positions: str = "labeled", student_init: Union[str, tuple] = "uniform",
        chunk_size: Optional[int] = None) -> Method:
    """GKD's generalized Jensen-Shannon divergence.

    Args:
      beta: β of `JSD_β` in TRL's convention (0 → forward KL, 1 → reverse KL), 0.5 by default.
      lmbda: TRL's on-policy fraction λ; only 0 (off-policy, supervised KD) is supported here.
      chunk_size: sequence-chunked divergence, as for `minillm`.
    """
    beta = check_fraction(beta, "gkd: beta")
    if isinstance(beta, tuple):
        raise MethodError("gkd: beta must be a constant in [0, 1], not a schedule")
    _off_policy_only("gkd", lmbda, "lmbda")
    return _llm_method("gkd", "jsd", f"GKD (off-policy): JSD with β={beta}", weight=weight, temperature=temperature,
                       lm_weight=lm_weight, positions=positions, student_init=student_init, chunk_size=chunk_size,
                       beta=beta)
