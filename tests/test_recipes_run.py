"""Every registered recipe runs a few real steps of every stage on tiny models."""

import numpy as np
import pytest

from distill_fixtures import MINILM, tiny_config, tiny_teacher, tokenizer
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader, mlm_mask
from kdjax.hub.api import flat_params
from kdjax.methods import known_methods

ENCODER = dict(head="classification")
CASES = {
    "kd": dict(),
    "supervised": dict(),
    "pkd": dict(),
    "pkd_last": dict(method="pkd", method_args={"strategy": "last"}),
    "tinybert": dict(),
    "minilm": dict(),
    "minilmv2": dict(method_args={"num_relation_heads": 4}),
    "mobilebert": dict(method_args={"num_layers": 2}),
    "mlkd_bert": dict(student={"num_heads": 2}),
    "unified": dict(method_args={"knowledge": ("embedding", "hidden", "attention", "value_relation", "logits",
                                               "hard", "cosine", "pkd"), "matching": "uniform"}),
    "distilbert": dict(teacher="mlm", task="kdjax_corpus", mlm=True),
    "glmd": dict(teacher="mlm", task="kdjax_corpus", mlm=True),
    "minillm": dict(teacher="causal_lm", task="kdjax_corpus", pack=True),
    "distillm": dict(teacher="causal_lm", task="kdjax_corpus", pack=True),
    "gkd": dict(teacher="causal_lm", task="kdjax_corpus", pack=True),
    "rail_kd": dict(method_args={"u": 16, "steps_per_epoch": 1}),
    "annealing_kd": dict(),
    "continuation_kd": dict(),
    "alp_kd": dict(),
    "sid": dict(),
    "uncertainty": dict(),
    "tmkd": dict(),
    "mt_bert": dict(),
    "theseus": dict(),
    "lrc_bert": dict(),
    "uld": dict(teacher="causal_lm", task="kdjax_corpus"),
    "xtok_align": dict(teacher="causal_lm", task="kdjax_corpus",
                       method_args={"teacher_tokenizer": MINILM, "student_tokenizer": MINILM}),
    "pd": dict(),
    "ckd": dict(method_args={"window": 5}),
    "universal_kd": dict(method_args={"size": 8}),
    "mgskd": dict(method_args={"relation_heads": 4, "k1": 4, "k2": 4}),
    "diito": dict(teacher="mlm", task="kdjax_corpus", mlm=True),
    "takd": dict(),
    "dgkd": dict(),
    "rl_kd": dict(method_args={"average_stage": True}),
}


def test_every_registered_method_is_covered():
    from test_onpolicy_run import RECIPES as ON_POLICY  # sampling recipes run there, on a causal teacher
    covered = {c.get("method", name) for name, c in CASES.items()} | {name for name, _ in ON_POLICY}
    shipped = set(known_methods(shipped_only=True))
    assert shipped <= covered, shipped - covered


@pytest.fixture(scope="module")
def teachers():
    return {
        "classification": tiny_teacher(head="classification"),
        "mlm": tiny_teacher(head="mlm"),
        "causal_lm": tiny_teacher(head="causal_lm", family="gpt2"),
    }


def case_run(name, teachers):
    """`(Distillation, case)` of a `CASES` entry on its tiny teacher: 2 steps per stage, batch 4 x 24."""
    case = CASES[name]
    teacher = teachers[case.get("teacher", "classification")]
    config = tiny_config("unused", method=case.get("method", name), method_args=case.get("method_args"), batch=4,
                         max_length=24, task=case.get("task", "kdjax_reviews"), steps=2)
    if case.get("pack"):
        for key in ("train", "corpus", "task"):
            config.data[key].pack = True
    if teacher.config.head != "classification":
        config.data.task.task = "kdjax_corpus"
    for key, value in case.get("student", {}).items():
        config.student[key] = value
    return Distillation(config, teachers={"teacher": (teacher, 1.0)}), case


def case_batches(run, case, stage, steps=2):
    """The stage's first `steps` batches (seed = stage), MLM-masked for MLM cases (seed = step)."""
    tok = tokenizer()
    it = iter(make_stage_loader(run, stage, seed=stage))
    for i in range(steps):
        batch = next(it)
        if case.get("mlm"):
            batch = mlm_mask(batch, probability=0.3, mask_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                             special_ids=tok.all_special_ids, seed=i)
        yield batch


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_runs_every_stage(name, teachers):
    run, case = case_run(name, teachers)
    previous = None
    for stage in range(run.num_stages):
        state = run.init_state(stage, params=run.stage_start_params(stage, previous))
        before = {k: np.array(v) for k, v in flat_params(state.params).items()}
        for batch in case_batches(run, case, stage):
            state, metrics = run.train_step(state, batch, stage=stage)
            values = metric_values(metrics)
            assert np.isfinite(values["loss"]), (run.method.stages[stage].name, values)
            assert all(np.isfinite(v) for v in values.values()), values
        after = flat_params(state.params)
        changed = [k for k in before if not np.allclose(before[k], after[k])]
        assert changed, f"stage {run.method.stages[stage].name} did not update the student"
        scope = run.method.stages[stage].train_scope
        if scope.startswith("progressive:"):
            layer = int(scope.split(":")[1])
            assert all(k.startswith("layers/") for k in changed)
            for k in changed:
                other = [i for i in range(before[k].shape[0]) if i != layer]
                np.testing.assert_array_equal(before[k][other], np.asarray(after[k])[other])
        run.end_stage(stage, state)  # a chain model trained here becomes a teacher of later stages
        previous = state
