"""Off- vs on-policy distillation of a small causal LM: quality on held-out text and where step time goes.

    python -m kdjax.main --config=configs/causal_teacher.py --workdir=workdir/causal_teacher
    python benchmarks/onpolicy.py --teacher=workdir/causal_teacher/student --steps=150 --out=onpolicy.json

For each recipe of configs/onpolicy.py (same steps, batch, learning rate and student initialization) it
trains a 2-layer student with `Distillation.train_step` and reports:

* `ppl`: the student's perplexity on held-out packed windows of the corpus (validation split);
* `teacher_nll`: the teacher's mean negative log-likelihood per token of the student's own continuations
  (T = 1 samples) of held-out sentence prefixes, how plausible the teacher finds what the student writes;
* `rkl`: the mean per-token reverse KL `KL(q ‖ p)` over the full vocabulary on those continuations;
* `gen / teacher / update`: the share of the timed steps' wall time spent sampling in the data hook,
  in a teacher forward on the step's batch (timed apart, same shapes), and the rest of the step
  (student forward, backward, optimizer), after two warm-up steps that include compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kdjax  # noqa: E402
from configs import onpolicy as recipe_config  # noqa: E402
from kdjax.data import pipeline  # noqa: E402
from kdjax.data import tasks as tasks_lib  # noqa: E402
from kdjax.distill import Distillation  # noqa: E402
from kdjax.distill.step import metric_values  # noqa: E402
from kdjax.distill.trainer import make_stage_loader  # noqa: E402
from kdjax.models.transformer import forward  # noqa: E402


def _log_probs(graphdef, params, ids, mask):
    out, _ = forward(graphdef, params, {"input_ids": ids, "attention_mask": mask})
    return jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)


_log_probs_jit = jax.jit(_log_probs, static_argnums=(0,))


def heldout_windows(run, batches: int):
    loader = make_stage_loader(run, 0, seed=0, role="eval")
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            break
    return out


def perplexity(model, windows) -> float:
    total, count = 0.0, 0.0
    for batch in windows:
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        logp = np.asarray(_log_probs_jit(model.graphdef, model.params, ids, mask))
        tok = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        valid = mask[:, 1:] * mask[:, :-1]
        total += float(-(tok * valid).sum())
        count += float(valid.sum())
    return float(np.exp(total / max(count, 1)))


def heldout_prompts(tokenizer, prompt: int, rows: int, seed: int = 0) -> np.ndarray:
    """Sentence prefixes: the first `prompt` tokens of held-out corpus records at least that long."""
    task = tasks_lib.get_task("kdjax_corpus")
    loader = pipeline.make_task_loader(task, "validation", tokenizer, max_length=prompt + 1, batch_size=rows,
                                       shuffle=True, seed=seed, num_epochs=1, drop_remainder=False)
    picked = []
    for batch in loader:
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        picked.extend(ids[i, :prompt] for i in range(len(ids)) if mask[i].sum() > prompt)
        if len(picked) >= rows:
            break
    return np.stack(picked[:rows]).astype(np.int32)


def on_own_samples(student, teacher, prompts, new_tokens: int, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """(teacher NLL per token, mean reverse KL per token, the continuations) of T = 1 student samples."""
    out = kdjax.generate(student, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    gen = np.asarray(out.tokens)
    full = np.concatenate([prompts, gen], 1)
    mask = np.ones_like(full)
    logp = np.asarray(_log_probs_jit(teacher.graphdef, teacher.params, full, mask), np.float64)
    logq = np.asarray(_log_probs_jit(student.graphdef, student.params, full, mask), np.float64)
    p0 = prompts.shape[1]
    pos = slice(p0 - 1, full.shape[1] - 1)                     # positions predicting the continuation
    nll = -np.take_along_axis(logp[:, pos], gen[..., None], -1)[..., 0].mean()
    rkl = np.sum(np.exp(logq[:, pos]) * (logq[:, pos] - logp[:, pos]), -1).mean()
    return float(nll), float(rkl), gen


def time_teacher(run, batch, repeats: int = 5) -> float:
    teacher = next(iter(run.teachers.values()))[0]
    prepared = run.prepare_batch({k: batch[k] for k in ("input_ids", "attention_mask")})
    fn = jax.jit(lambda p, b: forward(teacher.graphdef, p, b)[0].logits, donate_argnums=())
    jax.block_until_ready(fn(teacher.params, prepared))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(teacher.params, prepared))
    return (time.perf_counter() - start) / repeats


def run_recipe(recipe: str, args, prompts, windows) -> dict:
    config = recipe_config.get_config(f"recipe={recipe},steps={args.steps},batch={args.batch},"
                                      f"max_length={args.max_length},prompt={args.prompt},lr={args.lr},"
                                      f"teacher={args.teacher}")
    run = Distillation(config)
    hook = run.method.stages[0].data_hook
    state = run.init_state()
    it = iter(make_stage_loader(run, 0, seed=int(config.train.seed)))
    step_s, gen_s, teacher_s, last = 0.0, 0.0, 0.0, {}
    timed = 0
    for step in range(args.steps):
        batch = next(it)
        before = hook.seconds["generate"] if hook is not None else 0.0
        start = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        last = metric_values(metrics)
        elapsed = time.perf_counter() - start
        if step >= 2:
            timed += 1
            step_s += elapsed
            gen_s += (hook.seconds["generate"] - before) if hook is not None else 0.0
        if step == 2:
            teacher_s = time_teacher(run, batch)
    teacher_s *= timed
    student = run.student_model(state)
    teacher = next(iter(run.teachers.values()))[0]
    nll, rkl, gen = on_own_samples(student, teacher, prompts, args.new_tokens)
    update_s = max(step_s - gen_s - teacher_s, 0.0)
    tok = teacher.tokenizer
    samples = [tok.decode(np.concatenate([prompts[i], gen[i]]).tolist(), skip_special_tokens=True)
               for i in range(args.samples)]
    return {"recipe": recipe, "ppl": perplexity(student, windows), "teacher_nll": nll, "rkl": rkl,
            "final_loss": last.get("loss"), "step_ms": 1000 * step_s / max(timed, 1),
            "gen_share": gen_s / max(step_s, 1e-9), "teacher_share": teacher_s / max(step_s, 1e-9),
            "update_share": update_s / max(step_s, 1e-9), "samples": samples}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="workdir/causal_teacher/student")
    p.add_argument("--recipes", default="kd,gkd_onpolicy,onpolicy_rkl,distillm_adaptive")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--eval_rows", type=int, default=64)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.teacher, "config.json")):
        raise SystemExit(f"no teacher at {args.teacher}: train it first with "
                         "python -m kdjax.main --config=configs/causal_teacher.py --workdir=workdir/causal_teacher")
    probe = Distillation(recipe_config.get_config(f"teacher={args.teacher},max_length={args.max_length}"))
    teacher = next(iter(probe.teachers.values()))[0]
    prompts = heldout_prompts(teacher.tokenizer, args.prompt, args.eval_rows)
    windows = heldout_windows(probe, args.eval_batches)
    t_nll, t_rkl, t_gen = on_own_samples(teacher, teacher, prompts, args.new_tokens)
    results = {"teacher": {"ppl": perplexity(teacher, windows), "own_nll": t_nll,
                           "samples": [teacher.tokenizer.decode(np.concatenate([prompts[i], t_gen[i]]).tolist(),
                                                                skip_special_tokens=True)
                                       for i in range(args.samples)]},
               "settings": vars(args), "recipes": []}
    print(f"teacher: held-out ppl {results['teacher']['ppl']:.2f}, NLL of its own samples {t_nll:.3f}", flush=True)
    for recipe in args.recipes.split(","):
        start = time.perf_counter()
        r = run_recipe(recipe, args, prompts, windows)
        r["wall_s"] = time.perf_counter() - start
        results["recipes"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
    print("\n| recipe | held-out ppl | teacher NLL of student samples | reverse KL on own samples | step ms "
          "| generate | teacher | update |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["recipes"]:
        print(f"| {r['recipe']} | {r['ppl']:.2f} | {r['teacher_nll']:.3f} | {r['rkl']:.3f} | {r['step_ms']:.0f} "
              f"| {100 * r['gen_share']:.0f}% | {100 * r['teacher_share']:.0f}% | {100 * r['update_share']:.0f}% |")
    for r in results["recipes"]:
        print(f"\n{r['recipe']}:")
        for s in r["samples"]:
            print("  ", s)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
