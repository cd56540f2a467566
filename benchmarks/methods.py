"""Every registered recipe on the same work: one table of accuracy, agreement, speed and memory.

        python benchmarks/methods.py --workdir=workdir/methods [--steps=100] [--seeds=0] [--methods=kd,takd]
        python benchmarks/methods.py --workdir=workdir/methods --readme=README.md   # also render into README
        python benchmarks/methods.py --workdir=workdir/methods --readme=README.md --from_json  # render again
        python benchmarks/methods.py --workdir=workdir/methods --methods=mt_bert  # rerun one, keep the others

1. fine-tunes the real teacher (all-MiniLM-L6-v2 + classification head) on `kdjax_reviews`, as
   benchmarks/task_distillation.py does, and a second, 4-layer teacher (four layers of the same
   pretrained model, uniform selection) for the multi-teacher recipes (`large`: 6 layers, `small`: 4);
2. distills the same 3-layer student (teacher layers 1, 3, 5) with every registered recipe that runs on
   a classification task, `--steps` steps per stage, for each seed in `--seeds`; each recipe runs in its
   own process, so its peak memory is its own (peak resident set size: on CPU that is the device memory);
3. trains the labels-only student (`supervised`, same init and steps) as the baseline;
4. writes `<workdir>/methods.json` and prints a markdown table (method, stages, test accuracy, top-1
   agreement with the 6-layer teacher, seconds per step, peak memory), means over seeds.

Recipes that need a language-model teacher (masked or causal LM) are listed as skipped. Every run
resumes when interrupted (rerun the same command). Budget: the defaults (50 steps per stage, one seed,
300 teacher steps) took 58 minutes on an idle 2-core CPU: 11 for the two teachers and 46 for the 26 recipe
processes (1-3 minutes each, the compiled evaluation programs shared through one compilation cache under
the workdir); other work on the machine stretches that. `--steps`, `--seeds`, `--methods` and
`--teacher_steps` scale it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", "workdir/methods", "Root directory of the teachers and every run.")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps of each stage of each recipe (and of the baseline).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 300, "Fine-tuning steps of each teacher.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds; the table reports means over them.")
_METHODS = flags.DEFINE_list("methods", [], "Recipes to run (default: every registered recipe).")
_README = flags.DEFINE_string("readme", "", "Render the table into this file between the benchmark markers.")
_ONE = flags.DEFINE_string("one", "", "Internal: run one recipe (name:seed) and write its result JSON.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 64, "Sequence length of every run.")
_FROM_JSON = flags.DEFINE_bool("from_json", False, "Only render <workdir>/methods.json again (into --readme).")

BASELINE = "supervised"
#: Recipes that distill from several teachers (they get `large` and `small`).
MULTI_TEACHER = ("uncertainty", "tmkd", "mt_bert", "rl_kd")
#: Recipes that need a masked or causal language-model teacher (not the classifier): logit KD over a
#: vocabulary, generation (on-policy), an MLM interchange objective, or two tokenizers.
NEEDS_LM = ("distilbert", "glmd", "minillm", "distillm", "gkd", "gkd_onpolicy", "minillm_pg", "distillm_adaptive",
            "onpolicy_rkl", "diito", "uld", "xtok_align")
#: Arguments some recipes need on this task.
METHOD_ARGS = {"kd": {"alpha": 0.5, "temperature": 4.0}, "tinybert": {"general": False},
               "uncertainty": {"teacher_order": ("small", "large")}, "mobilebert": {"num_layers": 3},
               "mt_bert": {"layers": "last"}}  # the 4-layer teacher is no multiple of the 3-layer student
START, END = "<!-- methods-benchmark:start -->", "<!-- methods-benchmark:end -->"


def methods_to_run(requested=()) -> list[str]:
    from kdjax.methods import known_methods
    names = list(requested) or sorted(known_methods(shipped_only=True))
    return [BASELINE] + [n for n in names if n != BASELINE]


def teacher_config(steps: int, layers: int, max_length: int):
    from configs import finetune_teacher
    c = finetune_teacher.get_config(f"steps={steps},max_length={max_length}")
    if layers != 6:
        c.student.num_layers = layers
        c.student.init = "uniform"
    return c


def method_config(method: str, teachers: dict, *, steps: int, seed: int, max_length: int):
    """The run config of one recipe: `teachers` = {"large": dir, "small": dir} of the fine-tuned teachers."""
    from configs import task_distill
    c = task_distill.get_config(f"method={method},teacher={teachers['large']},steps={steps},max_length={max_length}")
    c.method_args = {method: dict(METHOD_ARGS[method])} if method in METHOD_ARGS else {}
    if method in MULTI_TEACHER:
        c.teachers = {"large": {"path": teachers["large"]}, "small": {"path": teachers["small"]}}
    from kdjax.methods import build_method
    if method not in NEEDS_LM and build_method(method, c.method_args).student_from:  # a chain: the student's layers come from the assistant
        c.student.layers = None
        c.student.init = "uniform"
    c.train.seed = seed
    c.train.eval_every = 0
    return c


def test_batches(model, max_length: int, batch_size: int = 64):
    from kdjax.data import pipeline
    return pipeline.make_task_loader("kdjax_reviews", "test", model.tokenizer, max_length=max_length,
                                     batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False)


def run_one(method: str, seed: int, root: str, steps: int, max_length: int) -> dict:
    """Train one recipe (resumable) and evaluate its student on the test split."""
    import kdjax
    from kdjax import evaluate
    from kdjax.distill import Distillation
    teachers = {"large": os.path.join(root, "teacher_large", "student"),
                "small": os.path.join(root, "teacher_small", "student")}
    workdir = os.path.join(root, "runs", f"{method}-seed{seed}")
    run = Distillation(method_config(method, teachers, steps=steps, seed=seed, max_length=max_length))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    summary = run.fit(workdir, progress=False)
    load_after = os.getloadavg()[0]
    elapsed = time.perf_counter() - started
    student = kdjax.load_pretrained(os.path.join(workdir, "student"))
    teacher = kdjax.load_pretrained(teachers["large"])
    metrics = evaluate.evaluate_classifier(student, test_batches(student, max_length), task="kdjax_reviews",
                                           teacher=teacher)
    return {"method": method, "seed": seed, "stages": [s.name for s in run.method.stages], "steps": summary["steps"],
            "accuracy": metrics["accuracy"], "agreement": metrics.get("agreement/top1"),
            "seconds_per_step": seconds_per_step(summary, elapsed),
            "peak_memory_mib": peak_memory_mib(), "load_average": max(load_before, load_after)}


def peak_memory_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's `VmHWM` counts this program's own pages only; `ru_maxrss` also carries the peak of the
    parent that forked it (a child started by the driver would report the driver's teachers' memory).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


def seconds_per_step(summary: dict, elapsed: float) -> float:
    """Seconds per training step without compilation: the logged windows after each stage's first
    (which holds the compile); the whole run's mean when no such window exists."""
    seen, rates = set(), []
    for record in summary.get("history", []):
        if "steps_per_sec" not in record:
            continue
        if record["stage"] in seen and record["steps_per_sec"] > 0:
            rates.append(1.0 / record["steps_per_sec"])
        seen.add(record["stage"])
    return sum(rates) / len(rates) if rates else summary.get("train_seconds", elapsed) / max(summary["steps"], 1)


def aggregate(results: list[dict]) -> list[dict]:
    """One row per method: means over seeds (errors and skips kept as notes)."""
    rows = {}
    for r in results:
        rows.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in rows.items():
        ok = [r for r in rs if "accuracy" in r]
        row = {"method": method + (" (baseline)" if method == BASELINE else ""),
               "stages": " → ".join(rs[0].get("stages") or []) or "-", "seeds": len(ok)}
        for key, label in (("accuracy", "test accuracy"), ("agreement", "top-1 agreement"),
                           ("seconds_per_step", "s/step"), ("peak_memory_mib", "peak memory (MiB)"),
                           ("load_average", "load")):
            values = [r[key] for r in ok if r.get(key) is not None]
            row[label] = round(sum(values) / len(values), 4) if values else None
        notes = sorted({r["note"] for r in rs if r.get("note")})
        row["note"] = "; ".join(notes) if notes else ""
        out.append(row)
    return out


def render(rows: list[dict], test_examples: int, command: str, wall_minutes: tuple | None = None) -> str:
    """The markdown table with how many test examples one point is, how it was produced and how long it took
    (`wall_minutes`: the teachers' and the recipes' minutes)."""
    from kdjax import report
    took = (f" It took {sum(wall_minutes):.0f} minutes: {wall_minutes[0]:.0f} for the two teachers, "
            f"{wall_minutes[1]:.0f} for the recipes, each in its own process (start, compile, train, evaluate)."
            if wall_minutes else "")
    header = (f"Test split: {test_examples} examples, so one accuracy point is {test_examples / 100:g} "
              f"examples. `load`: the 1-minute load average at the start or end of the run, whichever is higher "
              f"(a run alone on 2 cores reads about 2; above that, other work shared the CPU and its s/step is "
              f"inflated). Produced by `{command}`.{took}\n\n")
    return header + report.format_table(rows)


def splice(text: str, table: str) -> str:
    """`text` with the part between the benchmark markers replaced by `table` (markers appended if absent)."""
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv):
    del argv
    root, steps, max_length = _WORKDIR.value, _STEPS.value, _MAX_LENGTH.value
    if _ONE.value:
        method, seed = _ONE.value.rsplit(":", 1)
        result = run_one(method, int(seed), root, steps, max_length)
        print("RESULT " + json.dumps(result))
        return
    if _FROM_JSON.value:
        saved = read_saved(root)
        if saved is None:
            raise SystemExit(f"no {root}/methods.json to render; run the benchmark first")
        publish(root, runs=saved["runs"], test_examples=saved["test_examples"], command=saved["command"],
                teacher_accuracy=saved.get("teacher_accuracy", saved["rows"][0]["test accuracy"]),
                teacher_seconds=saved.get("teacher_seconds"))
        return
    # Every recipe evaluates the same student and teacher programs: compile them once for the whole run.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(root), "compile_cache"))
    import kdjax
    from kdjax import evaluate
    from kdjax.distill import Distillation
    started = time.perf_counter()
    for name, layers in (("teacher_large", 6), ("teacher_small", 4)):
        Distillation(teacher_config(_TEACHER_STEPS.value, layers, max_length)).fit(os.path.join(root, name),
                                                                                   progress=True)
    teacher_seconds = time.perf_counter() - started
    teacher = kdjax.load_pretrained(os.path.join(root, "teacher_large", "student"))
    t_metrics = evaluate.evaluate_classifier(teacher, test_batches(teacher, max_length), task="kdjax_reviews")
    examples = sum(int(len(b["labels"])) for b in test_batches(teacher, max_length))
    results = []
    for method in methods_to_run(_METHODS.value):
        for seed in _SEEDS.value:
            if method in NEEDS_LM:
                results.append({"method": method, "seed": int(seed), "note": "skipped: needs a language-model teacher"})
                continue
            cmd = [sys.executable, os.path.abspath(__file__), f"--one={method}:{seed}", f"--workdir={root}",
                   f"--steps={steps}", f"--max_length={max_length}"]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = round(time.perf_counter() - started, 1)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
                results.append({"method": method, "seed": int(seed), "note": f"failed: {error}", "wall_seconds": wall})
            else:
                results.append({**json.loads(lines[-1][len("RESULT "):]), "wall_seconds": wall})
            print(json.dumps(results[-1]), flush=True)
    command = (f"python benchmarks/methods.py --steps={steps} --seeds={','.join(_SEEDS.value)} "
               f"--teacher_steps={_TEACHER_STEPS.value}")
    saved = read_saved(root) if _METHODS.value else None
    if saved is not None:  # a rerun of some recipes replaces their rows only
        if saved["command"] != command:
            raise SystemExit(f"{root}/methods.json was made by `{saved['command']}`; rerun recipes with the same flags")
        rerun = {r["method"] for r in results}
        results = [r for r in saved["runs"] if r["method"] not in rerun] + results
        order = {name: n for n, name in enumerate(methods_to_run())}
        results.sort(key=lambda r: order.get(r["method"], len(order)))
        teacher_seconds = max(teacher_seconds, saved.get("teacher_seconds") or 0.0)  # trained by the first run
    publish(root, runs=results, test_examples=examples, command=command, teacher_accuracy=t_metrics["accuracy"],
            teacher_seconds=teacher_seconds)


def read_saved(root: str):
    """`<root>/methods.json` as written by :func:`publish`, or None when there is none yet."""
    path = os.path.join(root, "methods.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def publish(root: str, *, runs: list[dict], test_examples: int, command: str, teacher_accuracy: float,
            teacher_seconds: float | None = None):
    """Aggregate `runs` into the table, write `<root>/methods.json`, print it and splice it into --readme."""
    from kdjax import report
    rows = [{"method": "teacher (fine-tuned MiniLM-L6)", "stages": "-", "seeds": 1,
             "test accuracy": round(teacher_accuracy, 4), "top-1 agreement": 1.0}] + aggregate(runs)
    walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds") is not None]
    wall_minutes = (teacher_seconds / 60, sum(walls) / 60) if teacher_seconds and walls else None
    table = render(rows, test_examples, command, wall_minutes)
    report.write_json(os.path.join(root, "methods.json"), {"rows": rows, "runs": runs, "test_examples": test_examples,
                                                           "command": command, "teacher_accuracy": teacher_accuracy,
                                                           "teacher_seconds": teacher_seconds})
    print(table)
    if _README.value:
        with open(_README.value) as f:
            text = f.read()
        with open(_README.value, "w") as f:
            f.write(splice(text, table))


if __name__ == "__main__":
    app.run(main)
