"""benchmarks/methods.py plumbing: configs for every recipe, aggregation, the table and the README splice."""

import importlib.util
import os
import sys

from kdjax import config as config_lib
from kdjax.methods import build_method, known_methods

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("bench_methods", os.path.join(REPO_ROOT, "benchmarks", "methods.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_every_registered_recipe_gets_a_valid_config():
    names = bench.methods_to_run()
    assert names[0] == "supervised" and set(names) == set(known_methods(shipped_only=True))
    teachers = {"large": "/t/large", "small": "/t/small"}
    for name in names:
        c = bench.method_config(name, teachers, steps=7, seed=2, max_length=32)
        config_lib.validate(c)
        if name in bench.NEEDS_LM:  # listed as skipped by the benchmark (no language-model teacher there)
            continue
        method = build_method(c.method, config_lib.method_args(c))
        assert c.train.steps == 7 and c.train.seed == 2
        if name in bench.MULTI_TEACHER:
            assert set(c.teachers) == {"large", "small"}
        if method.student_from:
            assert c.student.layers is None


def test_aggregate_render_and_splice():
    runs = [{"method": "supervised", "seed": 0, "stages": ["train"], "accuracy": 0.5, "agreement": 0.6,
             "seconds_per_step": 0.2, "peak_memory_mib": 100.0},
            {"method": "takd", "seed": 0, "stages": ["assistant", "student"], "accuracy": 0.7, "agreement": 0.8,
             "seconds_per_step": 0.4, "peak_memory_mib": 300.0, "load_average": 2.0},
            {"method": "takd", "seed": 1, "stages": ["assistant", "student"], "accuracy": 0.8, "agreement": 0.9,
             "seconds_per_step": 0.6, "peak_memory_mib": 200.0, "load_average": 3.0},
            {"method": "gkd", "seed": 0, "note": "skipped: needs a language-model teacher"}]
    rows = bench.aggregate(runs)
    assert [r["method"] for r in rows] == ["supervised (baseline)", "takd", "gkd"]
    takd = rows[1]
    assert takd["stages"] == "assistant → student" and takd["seeds"] == 2
    assert takd["test accuracy"] == 0.75 and takd["s/step"] == 0.5 and takd["peak memory (MiB)"] == 250.0
    assert takd["load"] == 2.5 and rows[0]["load"] is None
    assert rows[2]["test accuracy"] is None and "skipped" in rows[2]["note"]
    table = bench.render(rows, 600, "python benchmarks/methods.py --steps=1")
    assert "one accuracy point is 6 examples" in table and "| takd |" in table and "It took" not in table
    timed = bench.render(rows, 600, "python benchmarks/methods.py --steps=1", wall_minutes=(15.6, 60.2))
    assert "It took 76 minutes: 16 for the two teachers, 60 for the recipes" in timed
    text = "# Title\n\nintro\n"
    once = bench.splice(text, table)
    assert once.count(bench.START) == 1 and table in once
    twice = bench.splice(once, "new table")
    assert twice.count(bench.START) == 1 and "new table" in twice and table not in twice
    assert twice.startswith("# Title\n\nintro\n")


def test_seconds_per_step_leaves_out_each_stages_first_window():
    history = [{"stage": 0, "steps_per_sec": 0.1}, {"stage": 0, "steps_per_sec": 2.0}, {"stage": 1, "steps_per_sec": 0.2},
               {"stage": 1, "steps_per_sec": 4.0}, {"stage": 1, "eval/loss": 1.0}]
    assert bench.seconds_per_step({"history": history, "steps": 4}, 99.0) == (0.5 + 0.25) / 2
    assert bench.seconds_per_step({"history": history[:1], "steps": 4, "train_seconds": 8.0}, 99.0) == 2.0
