"""Distillation recipes as data: registry, per-recipe structure against docs/methods.md, term/argument
compatibility with ``kdjax.knowledge``, layer maps that resolve, mixing, errors — and, for the logit
recipes, the loss the terms evaluate to against float64 numpy formulas written from the papers."""

import inspect

import numpy as np
import pytest

from kdjax import knowledge
from kdjax.matching import STRATEGIES, layer_pairs
from kdjax.methods import MethodError, build_method, get_method, known_methods
from kdjax.methods.base import SOURCES

RECIPES = ("kd", "distilbert", "pkd", "tinybert", "minilm", "minilmv2", "mobilebert", "mlkd_bert", "glmd",
           "unified", "minillm", "distillm", "gkd")

# Which knowledge functions may read which source (the engine's calling conventions, from the brief).
FNS_BY_SOURCE = {
        "logits": {"divergence", "soft_cross_entropy", "logit_mse"},
        "labels": {"cross_entropy"},
        "hidden_states": {"hidden_mse", "cosine"},
        "embeddings": {"embedding_relation_kl"},
        "cls": {"pkd", "sample_relation_kl", "supervised_contrastive"},
        "attention_scores": {"attention_score_mse", "attention_kl"},
        "attention_probs": {"attention_score_mse", "attention_kl"},
        "qkv": {"qkv_relation_kl"},
        "value": {"value_relation_kl"},
        "attention_context": {"head_split_relation_kl"},
}
# Positional inputs the engine supplies; a recipe must never pass them as keyword arguments.
DATA_PARAMS = {"student_logits", "teacher_logits", "logits", "labels", "mask", "student_h", "teacher_h",
               "student_cls", "teacher_cls", "student_scores", "teacher_scores", "student_x", "teacher_x",
               "student_v", "teacher_v", "student_qkv", "teacher_qkv", "student_ctx", "teacher_ctx", "student_e",
               "teacher_e"}
# Depths at which default recipes must resolve their layer maps (student, teacher).
DEPTHS = {"mobilebert": (24, 24)}


def all_methods():
    return [(name, get_method(name)) for name in RECIPES]


def summary(stage):
    return [(t.name, t.fn, t.source, t.weight, t.layers, t.kwargs, t.positions) for t in stage.terms]


# ---------------------------------------------------------------------------------------------
# registry and generic well-formedness
# ---------------------------------------------------------------------------------------------


def test_known_methods_lists_every_recipe_with_a_description():
    known = known_methods()
    assert set(RECIPES) <= set(known)
    for name in RECIPES:
        assert known[name].strip(), name


@pytest.mark.parametrize("name", RECIPES)
def test_every_term_is_callable_as_configured(name):
    method = get_method(name)
    assert method.name == name and method.stages
    for stage in method.stages:
        assert stage.terms, (name, stage.name)
        names = [t.name for t in stage.terms]
        assert len(names) == len(set(names)), f"{name}/{stage.name}: duplicate term names {names}"
        for term in stage.terms:
            assert term.fn in knowledge.TERMS, term
            assert term.source in SOURCES
            assert term.fn in FNS_BY_SOURCE[term.source], f"{term.fn} cannot read {term.source}"
            params = inspect.signature(knowledge.TERMS[term.fn]).parameters
            for key in term.kwargs:
                assert key in params and key not in DATA_PARAMS, f"{name}: {term.fn} takes no argument {key!r}"
                assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, (term.fn, key)
            # Required keyword-only arguments the engine does not fill must be given by the recipe.
            engine_fills = {"num_heads", "num_groups"}  # the student's head count by default
            for key, p in params.items():
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty and key not in engine_fills:
                    assert key in term.kwargs, f"{name}: {term.fn} needs {key}"


@pytest.mark.parametrize("name", RECIPES)
def test_layer_maps_resolve_for_a_12_to_6_distillation(name):
    student, teacher = DEPTHS.get(name, (6, 12))
    for stage in get_method(name).stages:
        for term in stage.terms:
            if term.space is None:
                continue
            assert isinstance(term.layers, tuple) or term.layers in STRATEGIES
            pairs = layer_pairs(term.layers, student, teacher, term.space)
            assert pairs, (name, term.name)


# ---------------------------------------------------------------------------------------------
# per-recipe structure (docs/methods.md)
# ---------------------------------------------------------------------------------------------


def test_kd_structure_and_alpha():
    (stage,) = get_method("kd").stages
    assert summary(stage) == [
            ("hard_ce", "cross_entropy", "labels", 0.5, "final", {}, "all"),
            ("kd", "divergence", "logits", 0.5, "final",
             {"kind": "forward_kl", "temperature": 10.0, "scale_by_t2": True}, "all")]
    (soft_only,) = get_method("kd", alpha=1.0).stages
    assert [t.source for t in soft_only.terms] == ["logits"]  # no labels needed
    (sched,) = get_method("kd", alpha=("linear", 0.2, 0.8)).stages
    (hard_kind, *hard_ends), (soft_kind, *soft_ends) = [t.weight for t in sched.terms]
    assert (hard_kind, soft_kind) == ("linear", "linear")
    np.testing.assert_allclose([hard_ends, soft_ends], [[0.8, 0.2], [0.2, 0.8]])
    with pytest.raises(MethodError, match="alpha must be in"):
        get_method("kd", alpha=1.5)
    with pytest.raises(MethodError, match="temperature must be > 0"):
        get_method("kd", temperature=0)
    with pytest.raises(MethodError, match="kind"):
        get_method("kd", kind="kl")


def test_distilbert_structure():
    method = get_method("distilbert")
    assert method.student_init == (0, 2, 4, 7, 9, 11)
    (stage,) = method.stages
    assert summary(stage) == [
            ("kd", "divergence", "logits", 5.0, "final",
             {"kind": "forward_kl", "temperature": 2.0, "scale_by_t2": True}, "labeled"),
            ("mlm", "cross_entropy", "labels", 2.0, "final", {}, "labeled"),
            ("cosine", "cosine", "hidden_states", 1.0, "final", {}, "all")]
    assert layer_pairs(stage.terms[2].layers, 6, 12, "hidden") == ((6, 12),)
    assert [t.name for t in get_method("distilbert", alpha_cos=0).stages[0].terms] == ["kd", "mlm"]


@pytest.mark.parametrize("strategy,teacher_layers", [("skip", [2, 4, 6, 8, 10]), ("last", [7, 8, 9, 10, 11])])
def test_pkd_structure(strategy, teacher_layers):
    method = get_method("pkd", strategy=strategy)
    assert method.student_init == "first"
    (stage,) = method.stages
    hard, soft, patience = stage.terms
    assert (hard.fn, hard.weight, soft.fn, soft.weight, soft.kwargs["temperature"]) == (
            "cross_entropy", 0.5, "divergence", 0.5, 10.0)
    assert (patience.fn, patience.source, patience.weight) == ("pkd", "cls", 100.0)
    pairs = layer_pairs(patience.layers, 6, 12, "hidden")
    assert [s for s, _ in pairs] == [1, 2, 3, 4, 5] and [t for _, t in pairs] == teacher_layers


def test_pkd_last_uses_the_matching_strategy_and_rejects_unknown_variants():
    assert get_method("pkd", strategy="last").stages[0].terms[2].layers == "pkd_last"
    with pytest.raises(MethodError, match="'skip' or 'last'"):
        get_method("pkd", strategy="middle")


def test_tinybert_stages():
    method = get_method("tinybert")
    assert [(s.name, s.data) for s in method.stages] == [
            ("general", "corpus"), ("task_intermediate", "task"), ("task_prediction", "task")]
    for stage in method.stages[:2]:
        hidden, attention = stage.terms
        assert (hidden.fn, hidden.source, hidden.layers, hidden.projection) == (
                "hidden_mse", "hidden_states", "uniform", True)
        assert (attention.fn, attention.source, attention.layers) == (
                "attention_score_mse", "attention_scores", "uniform")
        # uniform hidden matching includes the embeddings (0, 0); attention matching is 0-based
        assert layer_pairs(hidden.layers, 4, 12, "hidden") == ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))
        assert layer_pairs(attention.layers, 4, 12, "attention") == ((0, 2), (1, 5), (2, 8), (3, 11))
    (pred,) = method.stages[2].terms
    assert (pred.fn, pred.source, pred.kwargs) == (
            "soft_cross_entropy", "logits", {"temperature": 1.0, "scale_by_t2": False})
    task_only = get_method("tinybert", general=False, task_teacher="finetuned",
                           steps={"task_prediction": 100}, learning_rates={"task_intermediate": 5e-5})
    assert [s.name for s in task_only.stages] == ["task_intermediate", "task_prediction"]
    assert {s.teacher for s in task_only.stages} == {"finetuned"}
    assert (task_only.stages[0].learning_rate, task_only.stages[1].steps) == (5e-5, 100)
    with pytest.raises(MethodError, match="no stage named 'general'.*task_intermediate, task_prediction"):
        get_method("tinybert", general=False, steps={"general": 10})


def test_minilm_structure():
    (stage,) = get_method("minilm").stages
    assert summary(stage) == [
            ("attention", "attention_kl", "attention_scores", 1.0, "final", {}, "all"),
            ("value_relation", "value_relation_kl", "value", 1.0, "final", {}, "all")]
    assert layer_pairs("final", 6, 12, "attention") == ((5, 11),)
    assert get_method("minilm", num_heads=12).stages[0].terms[1].kwargs == {"num_heads": 12}


def test_minilmv2_teacher_layer_is_one_based():
    (term,) = get_method("minilmv2").stages[0].terms
    assert (term.fn, term.source, term.layers, term.kwargs) == ("qkv_relation_kl", "qkv", "final",
                                                                {"num_relation_heads": 48})
    (large,) = get_method("minilmv2", teacher_layer=21, student_layers=6, teacher_layers=24,
                          num_relation_heads=64).stages[0].terms
    assert large.layers == ((5, 20),)  # student's last layer <- the 21st of 24 teacher layers
    assert layer_pairs(large.layers, 6, 24, "attention") == ((5, 20),)
    assert large.kwargs == {"num_relation_heads": 64}
    with pytest.raises(MethodError, match="needs student_layers"):
        get_method("minilmv2", teacher_layer=21)
    with pytest.raises(MethodError, match="only 12 layers"):
        get_method("minilmv2", teacher_layer=13, student_layers=6, teacher_layers=12)


def test_mobilebert_progressive_stages():
    method = get_method("mobilebert", num_layers=4, teacher_layers=8)
    assert method.student_init == "random"
    assert [s.name for s in method.stages] == ["progressive_0", "progressive_1", "progressive_2", "progressive_3",
                                               "final"]
    assert [s.train_scope for s in method.stages] == [f"progressive:{i}" for i in range(4)] + ["all"]
    for layer, stage in enumerate(method.stages[:4]):
        feature, attention = stage.terms
        assert (feature.fn, feature.source) == ("hidden_mse", "hidden_states")
        assert (attention.fn, attention.source) == ("attention_kl", "attention_scores")
        # student layer l (0-based) is hidden index l + 1; the teacher is matched uniformly (k = 2)
        assert feature.layers == ((layer + 1, 2 * (layer + 1)),)
        assert attention.layers == ((layer, 2 * layer + 1),)
    mlm, kd = method.stages[-1].terms
    assert (mlm.fn, mlm.weight, kd.fn, kd.weight, kd.kwargs["temperature"]) == (
            "cross_entropy", 0.5, "divergence", 0.5, 1.0)
    assert len(get_method("mobilebert").stages) == 25
    with pytest.raises(MethodError, match="divisible"):
        get_method("mobilebert", num_layers=4, teacher_layers=6)


def test_mlkd_bert_stages():
    method = get_method("mlkd_bert")
    intermediate, prediction = method.stages
    assert [(t.fn, t.source, t.weight) for t in intermediate.terms] == [
            ("embedding_relation_kl", "embeddings", 1.0), ("head_split_relation_kl", "attention_context", 1.0),
            ("hidden_mse", "hidden_states", 1.0)]
    assert [(t.fn, t.source, t.layers) for t in prediction.terms] == [
            ("sample_relation_kl", "cls", "final"), ("supervised_contrastive", "cls", "final"),
            ("divergence", "logits", "final")]
    ffn = get_method("mlkd_bert", student_layers=6, teacher_layers=12).stages[0].terms[2]
    assert ffn.layers == ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12))  # no embedding pair
    with pytest.raises(MethodError, match="unknown weight key"):
        get_method("mlkd_bert", weights={"attention": 1.0})


def test_glmd_stages():
    method = get_method("glmd", vocab_compression=0.5)
    assert method.student_init == "random"
    assert [(s.name, s.data, s.teacher) for s in method.stages] == [
            ("general", "corpus", None), ("task_kl", "task", "finetuned"), ("task_prediction", "task", "finetuned")]
    for stage in method.stages[:2]:
        assert summary(stage) == [("word_kl", "divergence", "logits", 1.0, "final",
                                   {"kind": "forward_kl", "temperature": 15.0, "scale_by_t2": True}, "all")]
    assert summary(method.stages[2]) == [("prediction", "soft_cross_entropy", "logits", 1.0, "final",
                                          {"temperature": 1.0, "scale_by_t2": False}, "all")]
    assert all(t.source != "labels" for s in method.stages for t in s.terms)  # no hard labels anywhere
    assert "0.5" in method.description
    with pytest.raises(MethodError, match="vocab_compression"):
        get_method("glmd", vocab_compression=1.5)


@pytest.mark.parametrize("name,fn,kwargs", [
        ("minillm", "divergence", {"kind": "reverse_kl", "temperature": 1.0, "scale_by_t2": True}),
        ("distillm", "divergence", {"kind": "skew_reverse_kl", "lam": 0.1, "temperature": 1.0, "scale_by_t2": True}),
        ("gkd", "divergence", {"kind": "jsd", "beta": 0.5, "temperature": 1.0, "scale_by_t2": True}),
])
def test_llm_recipes(name, fn, kwargs):
    (stage,) = get_method(name).stages
    (term,) = stage.terms
    assert (term.fn, term.source, term.kwargs, term.positions) == (fn, "logits", kwargs, "labeled")
    with_lm = get_method(name, lm_weight=0.5).stages[0].terms
    assert [(t.fn, t.weight) for t in with_lm] == [(fn, 1.0), ("cross_entropy", 0.5)]


def test_llm_options_and_errors():
    assert get_method("distillm", kind="skew_kl", lam=0.2).stages[0].terms[0].kwargs["lam"] == 0.2
    assert get_method("gkd", beta=0.9).stages[0].terms[0].kwargs["beta"] == 0.9
    with pytest.raises(MethodError, match="skew_kl, skew_reverse_kl"):
        get_method("distillm", kind="reverse_kl")
    with pytest.raises(MethodError, match="on-policy"):
        get_method("gkd", lmbda=0.5)
    with pytest.raises(MethodError, match="beta must be in"):
        get_method("gkd", beta=2.0)


# ---------------------------------------------------------------------------------------------
# unified grid
# ---------------------------------------------------------------------------------------------

UNIFIED = {
        "embedding": ("hidden_mse", "hidden_states", "embeddings"),
        "hidden": ("hidden_mse", "hidden_states", "last"),
        "attention": ("attention_score_mse", "attention_scores", "last"),
        "attention_kl": ("attention_kl", "attention_scores", "last"),
        "value_relation": ("value_relation_kl", "value", "last"),
        "qkv_relation": ("qkv_relation_kl", "qkv", "last"),
        "logits": ("divergence", "logits", "final"),
        "soft_ce": ("soft_cross_entropy", "logits", "final"),
        "cosine": ("cosine", "hidden_states", "last"),
        "pkd": ("pkd", "cls", "last"),
        "hard": ("cross_entropy", "labels", "final"),
}


@pytest.mark.parametrize("kind", sorted(UNIFIED))
def test_unified_maps_each_knowledge_name(kind):
    (term,) = get_method("unified", knowledge=(kind,), matching="last").stages[0].terms
    assert (term.fn, term.source, term.layers) == UNIFIED[kind]


def test_unified_grid_options():
    method = get_method("unified", knowledge="hidden, logits,hard", matching="skip", weights={"logits": 2.0},
                        layers={"hidden": ((1, 3),)}, temperature=4.0)
    hidden, logits, hard = method.stages[0].terms
    assert hidden.layers == ((1, 3),) and logits.weight == 2.0 and hard.weight == 1.0
    assert logits.kwargs == {"kind": "forward_kl", "temperature": 4.0, "scale_by_t2": True}


def test_unified_errors_are_one_line_and_actionable():
    with pytest.raises(MethodError) as err:
        get_method("unified", knowledge=("hidden", "attentoin"))
    message = str(err.value)
    assert "'attentoin'" in message and "\n" not in message
    assert all(name in message for name in UNIFIED)
    with pytest.raises(MethodError, match="is not a layer matching"):
        get_method("unified", matching="diagonal")
    with pytest.raises(MethodError, match="not in knowledge"):
        get_method("unified", knowledge=("hidden",), weights={"logits": 1.0})
    with pytest.raises(MethodError, match="read no layers"):
        get_method("unified", knowledge=("hidden", "logits"), layers={"logits": "last"})
    with pytest.raises(MethodError, match="twice"):
        get_method("unified", knowledge=("hidden", "hidden"))
    with pytest.raises(MethodError, match="empty"):
        get_method("unified", knowledge=())
    with pytest.raises(MethodError, match="weight 0"):
        get_method("unified", knowledge=("hidden",), weights={"hidden": 0})


# ---------------------------------------------------------------------------------------------
# mixing and registry errors
# ---------------------------------------------------------------------------------------------


def test_build_method_mixes_terms_with_scaled_weights():
    mixed = build_method([("minilmv2", 1.0), ("kd", 0.5)])
    (stage,) = mixed.stages
    assert [(t.name, t.fn, t.weight) for t in stage.terms] == [
            ("minilmv2/qkv_relation", "qkv_relation_kl", 1.0), ("kd/hard_ce", "cross_entropy", 0.25),
            ("kd/kd", "divergence", 0.25)]
    assert stage.terms[2].kwargs["temperature"] == 10.0  # arguments survive the mix


def test_build_method_passes_per_method_arguments_and_joins_single_stage_parts():
    mixed = build_method([("tinybert", 1.0), ("kd", 2.0)], {"tinybert": {"general": False}, "kd": {"alpha": 1.0}})
    assert [s.name for s in mixed.stages] == ["task_intermediate", "task_prediction"]
    for stage in mixed.stages:
        assert stage.data == "task"
        assert stage.terms[-1].name == "kd/kd" and stage.terms[-1].weight == 2.0
    assert build_method("pkd", {"pkd": {"strategy": "last"}}).stages[0].terms[2].layers == "pkd_last"
    with pytest.raises(MethodError, match="cannot mix"):
        build_method([("tinybert", 1.0), ("mlkd_bert", 1.0)])


def test_unknown_method_lists_known_methods():
    with pytest.raises(MethodError) as err:
        get_method("tinybret")
    assert all(name in str(err.value) for name in RECIPES)
    with pytest.raises(MethodError, match="unexpected keyword"):
        get_method("kd", temprature=2.0)


# ---------------------------------------------------------------------------------------------
# the loss the logit recipes evaluate to, against numpy formulas from the papers
# ---------------------------------------------------------------------------------------------


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


def evaluate(method, student, teacher, labels, mask=None):
    """A minimal engine for logit/label terms: Σ weight · fn(student, teacher, mask, **kwargs)."""
    total = 0.0
    for term in method.stages[-1].terms:
        fn = knowledge.TERMS[term.fn]
        if term.source == "labels":
            value, _ = fn(student, labels, mask)
        else:
            assert term.source == "logits"
            value, _ = fn(student, teacher, mask, **term.kwargs)
        total += term.weight * float(value)
    return total


def logits(seed, shape):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(np.float32), (rng.standard_normal(shape) * 3).astype(np.float32)


def test_kd_and_pkd_logit_terms_equal_hintons_loss():
    s, t = logits(0, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0])
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    T, alpha = 10.0, 0.5
    ce = -_log_softmax(s64)[np.arange(6), y].mean()
    kl = _kl(_log_softmax(t64 / T), _log_softmax(s64 / T)).mean()
    expected = (1 - alpha) * ce + alpha * T * T * kl
    np.testing.assert_allclose(evaluate(get_method("kd"), s, t, y), expected, rtol=1e-5)
    pkd_logit_terms = get_method("pkd").stages[0].terms[:2]
    total = sum(t_.weight * float(knowledge.TERMS[t_.fn](*((s, y) if t_.source == "labels" else (s, t)),
                                                         **t_.kwargs)[0]) for t_ in pkd_logit_terms)
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_glmd_kl_is_t_squared_scaled_and_tinybert_prediction_is_plain_soft_ce():
    s, t = logits(1, (2, 3, 7))
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    valid = mask.astype(bool)
    kl15 = _kl(_log_softmax(t64 / 15), _log_softmax(s64 / 15))[valid].mean()
    glmd = get_method("glmd")
    stage1 = type(glmd)(name="glmd", stages=glmd.stages[:1])
    np.testing.assert_allclose(evaluate(stage1, s, t, None, mask), 225 * kl15, rtol=1e-5)
    soft_ce = -(np.exp(_log_softmax(t64)) * _log_softmax(s64)).sum(-1)[valid].mean()
    np.testing.assert_allclose(evaluate(get_method("tinybert"), s, t, None, mask), soft_ce, rtol=1e-5)
    np.testing.assert_allclose(evaluate(glmd, s, t, None, mask), soft_ce, rtol=1e-5)


def test_llm_divergences_match_their_papers():
    s, t = logits(2, (4, 9))
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    logp, logq = _log_softmax(t64), _log_softmax(s64)
    p, q = np.exp(logp), np.exp(logq)
    rkl = _kl(logq, logp).mean()
    np.testing.assert_allclose(evaluate(get_method("minillm"), s, t, None), rkl, rtol=1e-5)
    lam = 0.1
    srkl = _kl(logq, np.log((1 - lam) * p + lam * q)).mean()
    skl = _kl(logp, np.log(lam * p + (1 - lam) * q)).mean()
    np.testing.assert_allclose(evaluate(get_method("distillm"), s, t, None), srkl, rtol=1e-5)
    np.testing.assert_allclose(evaluate(get_method("distillm", kind="skew_kl"), s, t, None), skl, rtol=1e-5)
    beta = 0.3  # TRL: M = β p + (1 − β) q; β·KL(p‖M) + (1 − β)·KL(q‖M)
    m = np.log(beta * p + (1 - beta) * q)
    jsd = (beta * _kl(logp, m) + (1 - beta) * _kl(logq, m)).mean()
    np.testing.assert_allclose(evaluate(get_method("gkd", beta=beta), s, t, None), jsd, rtol=1e-5)


@pytest.mark.parametrize("name", ["kd", "minillm", "distillm", "gkd"])
def test_logit_recipes_take_chunk_size(name):
    plain = build_method(name, {name: {}})
    chunked = build_method(name, {name: {"chunk_size": 64}})
    soft = lambda m: [t for t in m.stages[0].terms if t.source == "logits"]  # noqa: E731
    (a,), (b,) = soft(plain), soft(chunked)
    assert "chunk_size" not in a.kwargs and b.kwargs["chunk_size"] == 64
    # Everything else about the term is unchanged.
    assert {k: v for k, v in b.kwargs.items() if k != "chunk_size"} == dict(a.kwargs)
    with pytest.raises(MethodError, match="chunk_size"):
        build_method(name, {name: {"chunk_size": 0}})


def test_python_m_kdjax_methods_lists_every_recipe_with_its_stages():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "kdjax.methods"], capture_output=True, text=True, check=True).stdout
    for name, description in known_methods(shipped_only=True).items():
        assert f"{name:<22} {description}" in out
    assert "stages: general -> task_kl -> task_prediction" in out  # glmd's three stages
