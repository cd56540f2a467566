"""Task-specific distillation end to end on the embedded review task, with the three accuracies.

        python benchmarks/task_distillation.py --workdir=workdir/task [--steps=300] [--teacher_steps=300]

1. fine-tunes the real teacher (all-MiniLM-L6-v2 + classification head, configs/finetune_teacher.py);
2. distills a 3-layer student from it with `kd` and with `tinybert` task distillation
      (configs/task_distill.py);
3. trains the same student (same init, same steps) on labels only (`supervised`);
and reports test accuracy of the teacher, each distilled student and the labels-only student, plus the
students' agreement with the teacher. Each run resumes if interrupted (rerun the same command).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", "workdir/task", "Root directory of the four runs.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each student run.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 300, "Fine-tuning steps of the teacher.")
_METHODS = flags.DEFINE_list("methods", ["kd", "tinybert"], "Distillation recipes to compare.")


def test_batches(model, batch_size=64, max_length=64):
    from kdjax.data import pipeline
    return pipeline.make_task_loader("kdjax_reviews", "test", model.tokenizer, max_length=max_length,
                                                                      batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False)


def main(argv):
    del argv
    import kdjax
    from configs import finetune_teacher, task_distill
    from kdjax import evaluate, report
    from kdjax.distill import Distillation

    root = _WORKDIR.value
    teacher_dir = os.path.join(root, "teacher")
    config = finetune_teacher.get_config(f"steps={_TEACHER_STEPS.value}")
    Distillation(config).fit(teacher_dir, progress=True)
    teacher = kdjax.load_pretrained(os.path.join(teacher_dir, "student"))
    results = {"teacher": evaluate.evaluate_classifier(teacher, test_batches(teacher), task="kdjax_reviews")}

    for method in list(_METHODS.value) + ["supervised"]:
        workdir = os.path.join(root, method)
        config = task_distill.get_config(f"method={method},teacher={teacher_dir}/student,steps={_STEPS.value}")
        Distillation(config).fit(workdir, progress=True)
        student = kdjax.load_pretrained(os.path.join(workdir, "student"))
        results[method] = evaluate.evaluate_classifier(student, test_batches(student), task="kdjax_reviews",
                                                                                                      teacher=teacher)
        results[method]["params"] = student.num_params
    results["teacher"]["params"] = teacher.num_params

    rows = []
    for name, r in results.items():
        label = {"teacher": "teacher (fine-tuned MiniLM-L6)", "supervised": "student, labels only"}.get(
                name, f"student, {name}")
        rows.append({"model": label, "params": r["params"], "test accuracy": round(r["accuracy"], 4),
                                  "top-1 agreement": round(r.get("agreement/top1", 1.0), 4)})
    print(report.format_table(rows))
    report.write_json(os.path.join(root, "results.json"), results)
    best = max(results[m]["accuracy"] for m in _METHODS.value)
    print(f"best distilled student {best:.4f} vs labels-only {results['supervised']['accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
