"""Observability of a run: TensorBoard events (read back without TensorFlow), metrics.jsonl, progress, loss PNGs."""

import contextlib
import io
import json
import logging
import os
import struct
import sys

import numpy as np
import pytest

from distill_fixtures import save_teacher, tiny_config, tiny_teacher
from kdjax import report
from kdjax.distill import trainer
from kdjax.distill.job import run_job

STEPS = 4


# --- an independent TFRecord / event-file reader -----------------------------------------------------

def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir):
    """Every `Event` in the event files under `logdir`, checking the TFRecord framing and both CRCs."""
    from tensorboardX.proto import event_pb2

    events = []
    files = sorted(f for f in os.listdir(logdir) if f.startswith("events.out.tfevents"))
    assert files, f"no event files in {logdir}"
    for name in files:
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert header_crc == _masked_crc32c(header), f"{name}: bad length CRC at byte {pos}"
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert payload_crc == _masked_crc32c(payload), f"{name}: bad data CRC at byte {pos}"
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            pos += 16 + length
    return events


def scalars(events):
    out = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


# --- one small job shared by the tests -----------------------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    teacher_dir = save_teacher(tiny_teacher(), str(tmp_path_factory.mktemp("teacher")))
    config = tiny_config(teacher_dir, method="kd", steps=STEPS, log_every=2, checkpoint_every=STEPS,
                         eval_every=STEPS)
    workdir = str(tmp_path_factory.mktemp("run"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        out = run_job(config, workdir, progress=True)
    records = report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {"config": config, "workdir": workdir, "out": out, "records": records, "stderr": stderr.getvalue()}


def test_tensorboard_events_match_metrics_jsonl(job):
    tb = scalars(read_events(os.path.join(job["workdir"], "tensorboard")))
    train = [r for r in job["records"] if "loss" in r]
    evals = [r for r in job["records"] if "eval/loss" in r]
    assert [r["global_step"] for r in train] == [2, 4] and [r["global_step"] for r in evals] == [STEPS]
    expected = {"loss/total": "loss", "loss/kd": "term/kd", "loss/hard_ce": "term/hard_ce",
                "train/grad_norm": "grad_norm", "perf/steps_per_sec": "steps_per_sec",
                "perf/tokens_per_sec": "tokens_per_sec"}
    for tag, key in expected.items():
        assert tag in tb, f"missing TensorBoard tag {tag}; have {sorted(tb)}"
        assert sorted(tb[tag]) == [r["global_step"] for r in train], tag
        for r in train:
            assert tb[tag][r["global_step"]] == pytest.approx(r[key], rel=1e-6), tag  # stored as float32
    assert tb["eval/loss/total"][STEPS] == pytest.approx(evals[0]["eval/loss"], rel=1e-6)
    assert tb["eval/loss/kd"][STEPS] == pytest.approx(evals[0]["eval/term/kd"], rel=1e-6)
    assert tb["eval/accuracy"][STEPS] == pytest.approx(evals[0]["eval/accuracy"], rel=1e-6)
    # Every numeric field of every record is in TensorBoard, nothing else is.
    fields = {(trainer.tensorboard_tag(k), r["global_step"]) for r in job["records"] for k, v in r.items()
              if isinstance(v, (int, float)) and k not in ("step", "global_step", "stage")}
    assert fields == {(tag, step) for tag, by_step in tb.items() for step in by_step}


def test_jsonl_speed_fields_and_progress_bar(job):
    from kdjax.distill import Distillation
    from kdjax.distill.trainer import make_stage_loader

    train = [r for r in job["records"] if "loss" in r]
    # tokens/s over steps/s is the number of real tokens per step in each logging interval: recount it.
    it = iter(make_stage_loader(Distillation(job["config"]), 0, seed=0))
    tokens = [int(np.sum(next(it)["attention_mask"])) for _ in range(STEPS)]
    for r, interval in zip(train, (tokens[0:2], tokens[2:4])):
        assert r["steps_per_sec"] > 0 and r["tokens_per_sec"] > 0
        assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(np.mean(interval), rel=1e-6)
    bar = job["stderr"]
    assert "tok/s=" in bar and "loss=" in bar, bar[-500:]
    assert "step/s" in bar or "s/step" in bar  # tqdm's rate
    assert f"{STEPS}/{STEPS} [" in bar and "<" in bar  # elapsed<remaining (the ETA)


def test_loss_pngs_listed_in_summary(job):
    workdir = job["workdir"]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    plots = summary["loss_plots"]
    assert set(plots) == {"total", "kd", "hard_ce"}
    assert plots["total"] == summary["loss_plot"] == os.path.join(workdir, "loss.png")
    assert plots["kd"] == os.path.join(workdir, "plots", "loss_kd.png")
    for path in plots.values():
        with open(path, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
        assert struct.unpack(">II", head[16:24]) == (700, 450)  # 7x4.5 inches at 100 dpi
    # The figure behind loss_kd.png has one curve with the logged values.
    train = [r for r in job["records"] if "loss" in r]
    fig = report.curve_figure(train, keys=("term/kd",), x_key="global_step")
    curves = [line for line in fig.axes[0].lines if not line.get_label().startswith("_")]
    assert len(curves) == 1
    np.testing.assert_allclose(curves[0].get_ydata(), [r["term/kd"] for r in train])


def _two_stage_records():
    records = []
    for s in range(1, 6):
        records.append({"stage": 0, "stage_name": "intermediate", "step": s, "global_step": s,
                        "loss": 3.0 / s, "term/hidden": 2.0 / s, "term/attention": 1.0 / s})
    for s in range(1, 4):
        records.append({"stage": 1, "stage_name": "prediction", "step": s, "global_step": 5 + s,
                        "loss": 1.0 / s, "term/prediction": 1.0 / s})
    records.append({"stage": 1, "step": 3, "global_step": 8, "eval/loss": 0.5})
    return records


def test_multi_stage_plots_mark_boundaries(tmp_path):
    records = _two_stage_records()
    paths = report.plot_loss_terms(records, tmp_path, title="two stages")
    assert set(paths) == {"total", "hidden", "attention", "prediction"}
    assert all(os.path.getsize(p) > 2000 for p in paths.values())
    # Stage 1 starts after global step 5, the last one logged in stage 0.
    assert report.stage_boundaries(records) == [(5.0, "prediction")]
    fig = report.curve_figure([r for r in records if "loss" in r], keys=("term/prediction",), x_key="global_step",
                              boundaries=report.stage_boundaries(records), xlim=(1, 8))
    ax = fig.axes[0]
    curves = [line for line in ax.lines if not line.get_label().startswith("_")]
    marks = [line for line in ax.lines if line.get_label().startswith("_stage boundary")]
    assert len(curves) == 1 and len(marks) == 1
    np.testing.assert_allclose(curves[0].get_xdata(), [6, 7, 8])
    np.testing.assert_allclose(marks[0].get_xdata(), [5, 5])
    assert ax.get_xlim() == (1.0, 8.0)
    with pytest.raises(ValueError, match="no training records"):
        report.plot_loss_terms([{"step": 1, "eval/loss": 1.0}], tmp_path)


def test_missing_tensorboardx_warns_once_and_keeps_jsonl(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` raise ImportError
    monkeypatch.setattr(trainer, "_warned_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="kdjax"):
        logs = [trainer.MetricsLog(str(tmp_path)) for _ in range(2)]
    warnings = [r for r in caplog.records if "tensorboardX" in r.getMessage()]
    assert len(warnings) == 1 and "pip install" in warnings[0].getMessage()
    logs[0].write({"stage": 0, "step": 1, "global_step": 1, "loss": 1.5})
    logs[0].close()
    assert report.read_jsonl(tmp_path / "metrics.jsonl") == [{"stage": 0, "step": 1, "global_step": 1, "loss": 1.5}]


def test_resume_purges_tensorboard_steps_past_the_checkpoint(tmp_path):
    first = trainer.MetricsLog(str(tmp_path))
    for step in (2, 4, 6):
        first.write({"stage": 0, "step": step, "global_step": step, "loss": float(step)})
    first.close()
    resumed = trainer.MetricsLog(str(tmp_path), resume_from_global_step=4)
    resumed.write({"stage": 0, "step": 6, "global_step": 6, "loss": 60.0})
    resumed.close()
    assert [r["loss"] for r in report.read_jsonl(tmp_path / "metrics.jsonl")] == [2.0, 4.0, 60.0]
    events = read_events(tmp_path / "tensorboard")
    # TensorBoard drops earlier events at steps >= a SessionLog.START's step: the old step 6 disappears.
    from tensorboardX.proto import event_pb2
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [5]
    visible = {}
    for e in events:
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            visible = {s: v for s, v in visible.items() if s < e.step}
        for v in e.summary.value:
            if v.tag == "loss/total":
                visible[e.step] = v.simple_value
    assert visible == {2: 2.0, 4: 4.0, 6: 60.0}
