"""Every recipe computes what it computed before the engine's knowledge terms moved into one registry.

`tests/golden/recipes.json` was recorded on the previous engine (terms dispatched by source in one
function) with `KDJAX_RECORD_GOLDEN=1 pytest tests/test_engine_golden.py`: for each recipe and stage,
two steps on fixed batches of tiny models, the metrics of both steps and a fingerprint of every student
parameter after them (sum, absolute sum and a dot product with a fixed random vector per leaf). The
current engine must give the same numbers within 1e-6 relative (float32 summation order aside).
"""

import json
import os
import pathlib
import zlib

import numpy as np
import pytest

from distill_fixtures import tiny_config, tiny_teacher, tokenizer
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader, mlm_mask
from kdjax.hub.api import flat_params
from test_recipes_run import CASES

GOLDEN = pathlib.Path(__file__).parent / "golden" / "recipes.json"
RECORD = os.environ.get("KDJAX_RECORD_GOLDEN") == "1"


@pytest.fixture(scope="module")
def teachers():
    return {
        "classification": tiny_teacher(head="classification"),
        "mlm": tiny_teacher(head="mlm"),
        "causal_lm": tiny_teacher(head="causal_lm", family="gpt2"),
    }


def fingerprint(params) -> dict:
    out = {}
    for name, value in sorted(flat_params(params).items()):
        x = np.asarray(value, np.float64).ravel()
        probe = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(x.size)
        out[name] = [float(x.sum()), float(np.abs(x).sum()), float(x @ probe)]
    return out


def run_case(name, teachers) -> dict:
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
    run = Distillation(config, teachers={"teacher": (teacher, 1.0)})
    tok = tokenizer()
    params, stages = None, []
    for stage in range(run.num_stages):
        state = run.init_state(stage, params=params)
        it = iter(make_stage_loader(run, stage, seed=stage))
        steps = []
        for i in range(2):
            batch = next(it)
            if case.get("mlm"):
                batch = mlm_mask(batch, probability=0.3, mask_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                                 special_ids=tok.all_special_ids, seed=i)
            state, metrics = run.train_step(state, batch, stage=stage)
            steps.append(metric_values(metrics))
        stages.append({"metrics": steps, "params": fingerprint(state.params)})
        params = state.params
    return {"stages": stages}


def _close(a, b, where):
    assert np.isclose(a, b, rtol=1e-6, atol=1e-6), f"{where}: {a} != golden {b}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_matches_golden(name, teachers):
    if not RECORD and name not in json.loads(GOLDEN.read_text()):
        pytest.skip(f"{name}: no golden values recorded (a case added after tests/golden/recipes.json was "
                    "written); record them with KDJAX_RECORD_GOLDEN=1")
    result = run_case(name, teachers)
    if RECORD:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = result
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True))
        pytest.skip("recorded")
    golden = json.loads(GOLDEN.read_text())[name]
    assert len(result["stages"]) == len(golden["stages"])
    for s, (got, want) in enumerate(zip(result["stages"], golden["stages"])):
        for i, (m, w) in enumerate(zip(got["metrics"], want["metrics"])):
            # The metric names themselves may grow (new metrics), never lose a recorded one.
            missing = set(w) - set(m)
            assert not missing, f"{name} stage {s} step {i}: metrics gone: {sorted(missing)}"
            for key in w:
                _close(m[key], w[key], f"{name} stage {s} step {i} {key}")
        assert set(got["params"]) == set(want["params"])
        for leaf, values in want["params"].items():
            for a, b in zip(got["params"][leaf], values):
                _close(a, b, f"{name} stage {s} param {leaf}")
