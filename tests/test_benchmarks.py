"""benchmarks/step.py: the synthetic batch, the split teacher/student programs and a smoke run of main()."""

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from distill_fixtures import save_teacher, tiny_teacher

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", os.path.join(REPO_ROOT, "benchmarks", "step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # Six layers and a width divisible by the quickstart's 12 relation heads, so the quickstart config
    # (student from teacher layers 1, 3, 5; MiniLMv2 relations + hidden MSE) applies unchanged.
    model = tiny_teacher(head="base", layers=6, hidden=48, heads=12)
    return save_teacher(model, str(tmp_path_factory.mktemp("bench_teacher")))


def test_synthetic_batch_mask_and_ids():
    b = bench.synthetic_batch(16, 20, 500, seed=3, cls_id=101, sep_id=102, pad_id=0)
    mask = b["attention_mask"]
    lengths = mask.sum(1)
    assert b["input_ids"].shape == mask.shape == b["token_type_ids"].shape == (16, 20)
    # Right padding: each row is a run of ones then zeros, at least seq/4 long, and one row is full.
    np.testing.assert_array_equal(mask, (np.arange(20)[None] < lengths[:, None]).astype(np.int32))
    assert lengths.min() >= 5 and lengths.max() == 20 and lengths.min() < 20
    assert (b["input_ids"][:, 0] == 101).all()
    np.testing.assert_array_equal(b["input_ids"][np.arange(16), lengths - 1], 102)
    assert (b["input_ids"][mask == 0] == 0).all()
    assert b["input_ids"].max() < 500 and b["input_ids"].min() >= 0
    again = bench.synthetic_batch(16, 20, 500, seed=3, cls_id=101, sep_id=102, pad_id=0)
    other = bench.synthetic_batch(16, 20, 500, seed=4, cls_id=101, sep_id=102, pad_id=0)
    np.testing.assert_array_equal(again["input_ids"], b["input_ids"])
    assert not np.array_equal(other["input_ids"], b["input_ids"])


def test_synthetic_labels():
    mlm = bench.synthetic_batch(8, 32, 100, seed=0, labels="mlm")
    picked = mlm["labels"] != -100
    assert picked.any() and not (picked & (mlm["attention_mask"] == 0)).any()
    np.testing.assert_array_equal(mlm["labels"][picked], mlm["input_ids"][picked])
    lm = bench.synthetic_batch(8, 32, 100, seed=0, labels="causal_lm")
    np.testing.assert_array_equal(lm["labels"] == -100, lm["attention_mask"] == 0)
    cls = bench.synthetic_batch(64, 8, 100, seed=0, labels="classification", num_labels=3)
    assert cls["labels"].shape == (64,) and set(np.unique(cls["labels"])) == {0, 1, 2}
    reg = bench.synthetic_batch(4, 8, 100, labels="classification", num_labels=1)
    assert reg["labels"].dtype == np.float32
    with pytest.raises(ValueError, match="labels kind"):
        bench.synthetic_batch(4, 8, 100, labels="spans")
    with pytest.raises(ValueError, match="--batch/--seq"):
        bench.synthetic_batch(0, 8, 100)


def test_time_interleaved_rotates_and_counts():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = bench.time_interleaved(fns, repeats=3, warmup=1)
    # 1 first call + 1 warm-up round + 3 timed rounds, each starting one program later.
    assert calls == ["a", "b", "c"] * 2 + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.samples_s) == 3 and t.min_s <= t.median_s for t in timings.values())
    with pytest.raises(ValueError, match="--repeats"):
        bench.time_interleaved(fns, repeats=0, warmup=0)


def test_split_consistency_detects_a_different_student_step():
    metrics = {"loss": (np.float32(2.0), np.float32(1.0)), "term/x": (np.float32(3.0), np.float32(2.0))}
    state = {"w": np.ones((3, 2), np.float32), "step": np.int32(4)}
    same = bench.split_consistency(metrics, dict(metrics), state, dict(state))
    assert same["first_metrics_max_rel_diff"] == 0 and same["final_params_max_abs_diff"] == 0
    assert same["first_loss_full"] == same["first_loss_split"] == 2.0
    off = dict(metrics, **{"term/x": (np.float32(3.3), np.float32(2.0))})
    moved = dict(state, w=state["w"].copy())
    moved["w"][1, 0] = 1.25
    diff = bench.split_consistency(metrics, off, state, moved)
    assert np.isclose(diff["first_metrics_max_rel_diff"], 0.3 / 3.3)
    assert np.isclose(diff["final_params_max_abs_diff"], 0.25)
    with pytest.raises(RuntimeError, match="out of date"):
        bench.split_consistency(metrics, {"loss": metrics["loss"]}, state, state)


def test_main_smoke(teacher_dir, tmp_path, capsys):
    out = tmp_path / "step.json"
    result = bench.main(["step.py", f"--config={bench.DEFAULT_CONFIG}:steps=10",
                         f"--config.teacher.path={teacher_dir}", "--batch=4", "--seq=16", "--repeats=2",
                         "--warmup=1", f"--output={out}"])
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == 4 and saved["seq_len"] == 16 and saved["repeats"] == 2
    assert 0 < saved["valid_tokens"] <= saved["padded_tokens"] == 64
    for name in bench.PARTS:
        part = saved["parts"][name]
        assert len(part["samples_s"]) == 2
        assert 0 < part["min_s"] <= part["median_s"] and part["first_call_s"] > 0 and part["tokens_per_s"] > 0
    full, teacher, student = (saved["parts"][n]["median_s"] for n in bench.PARTS)
    assert math.isclose(saved["overhead_ratio"], full / (teacher + student), rel_tol=1e-9)
    assert math.isfinite(saved["overhead_ratio"]) and saved["overhead_ratio"] > 0
    assert math.isclose(saved["full_step_tokens_per_s"], saved["valid_tokens"] / full, rel_tol=1e-9)
    assert saved["device"]["jax_version"] == jax.__version__
    # The split programs do the fused step's work: same first-step loss, terms and gradient norm, and the
    # same parameters after the same number of updates (checked against the run's own jitted step).
    c = saved["consistency"]
    assert c["first_loss_full"] > 0 and c["first_metrics_max_rel_diff"] < 1e-4
    assert c["final_params_max_abs_diff"] < 1e-4
    assert "teacher.path" in saved["config"] and saved["stage"]["terms"] == result["stage"]["terms"]
    # The PyTorch eager step starts from the same weights on the same batch: same first-step loss.
    assert "torch_step" in saved["parts"] and saved["kdjax_over_torch"] > 0
    assert math.isclose(c["first_loss_torch"], c["first_loss_full"], rel_tol=1e-5, abs_tol=1e-7)
    assert saved["matmul_peak"]["jax_gflops"] > 0 and saved["matmul_peak"]["torch_gflops"] > 0
    assert len(saved["load_average"]["before"]) == 3
    full_part = saved["parts"]["full_step"]
    assert full_part["flops"] > 0 and 0 < full_part["fraction_of_matmul_peak"] and full_part["minor_faults_per_call"] >= 0
    tt = saved["teacher_truncation"]
    assert 0 < tt["flops"] <= tt["flops_full"]
    printed = capsys.readouterr().out
    assert "kdjax / PyTorch eager tokens/s" in printed and "load average" in printed and "PyTorch check" in printed
    assert "overhead ratio" in printed and "split check" in printed and "| full_step |" in printed and "jax " + jax.__version__ in printed


def test_main_rejects_bad_input(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bench.main(["step.py", f"--config.teacher.path={teacher_dir}", "--seq=1000", "--repeats=1",
                    f"--output={tmp_path / 'x.json'}"])
    with pytest.raises(ValueError, match="bad benchmark flags"):
        bench.main(["step.py", "--repeat=3"])
    with pytest.raises(ValueError, match="stage 3 does not exist"):
        bench.main(["step.py", f"--config.teacher.path={teacher_dir}", "--stage=3", "--output="])


def test_torch_step_refuses_what_it_does_not_reimplement(teacher_dir):
    from kdjax.distill.run import Distillation

    from configs import quickstart  # importable: benchmarks/step.py puts the repository root on sys.path

    torch_step = bench._load_torch_step()
    config = quickstart.get_config("steps=10")
    config.teacher.path = teacher_dir
    config.method = "minilmv2+unified"
    config.method_args = dict(minilmv2=dict(num_relation_heads=12), unified=dict(knowledge=("hidden", "cosine")))
    with pytest.raises(ValueError, match="cosine.*no PyTorch version"):
        torch_step.TorchKDStep(Distillation(config))
