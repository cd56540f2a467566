"""Workdir I/O on local disk and on an object store (``gs://``), the latter faked with etils' epath mock.

The fake maps ``gs://bucket/...`` onto a temporary directory underneath epath, so the code under test
takes its remote branch (no append, no rename, local staging and upload) while the test reads the
result from disk.
"""

import json
import logging
import os

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from kdjax import fileio, report
from kdjax.distill.trainer import MetricsLog


@pytest.fixture
def fake_gcs(tmp_path):
    root = tmp_path / "bucket-root"
    root.mkdir()

    def local(path):
        path = os.fspath(path)
        return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

    def wrap(original, path, *args, **kwargs):
        args = tuple(local(a) if isinstance(a, (str, os.PathLike)) and os.fspath(a).startswith("gs://") else a
                     for a in args)
        return original(local(path), *args, **kwargs)

    names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
             "replace", "rmtree", "stat", "walk")
    with epath_testing.mock_epath(**{n: wrap for n in names}):
        yield root


def test_local_write_is_atomic_and_append_appends(tmp_path):
    path = tmp_path / "a" / "f.txt"
    fileio.write_text(path, "one\n")
    fileio.append_text(path, "two\n")
    assert path.read_text() == "one\ntwo\n"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"], "no temporary file may be left behind"
    assert fileio.join(str(tmp_path), "x", "y") == os.path.join(str(tmp_path), "x", "y")


def test_uri_join_and_detection():
    assert fileio.is_remote("gs://b/run") and not fileio.is_remote("/tmp/run") and not fileio.is_remote("run")
    assert fileio.join("gs://b/run/", "checkpoints") == "gs://b/run/checkpoints"
    assert fileio.join("gs://b/run", "plots", "loss_kd.png") == "gs://b/run/plots/loss_kd.png"


def test_remote_append_rewrites_object_and_staging_uploads_tree(fake_gcs, tmp_path):
    fileio.makedirs("gs://b/run")
    fileio.append_text("gs://b/run/log.txt", "a\n")
    fileio.append_text("gs://b/run/log.txt", "b\n")
    assert (fake_gcs / "b/run/log.txt").read_text() == "a\nb\n"
    assert fileio.read_text("gs://b/run/log.txt") == "a\nb\n" and fileio.exists("gs://b/run/log.txt")
    with fileio.local_staging("gs://b/run/student") as local:
        assert not local.startswith("gs://")
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "config.json"), "w") as f:
            f.write("{}")
        np.save(os.path.join(local, "sub", "w.npy"), np.arange(5))
    assert (fake_gcs / "b/run/student/config.json").read_text() == "{}"
    np.testing.assert_array_equal(np.load(fake_gcs / "b/run/student/sub/w.npy"), np.arange(5))
    assert not os.path.exists(local), "the staging directory is removed after the upload"
    # An error inside the block uploads nothing.
    with pytest.raises(RuntimeError):
        with fileio.local_staging("gs://b/run/broken") as local:
            os.makedirs(local)
            raise RuntimeError("export failed")
    assert not (fake_gcs / "b/run/broken").exists()


def test_reports_and_metrics_log_on_a_bucket(fake_gcs, caplog):
    workdir = "gs://b/job"
    fileio.makedirs(workdir)  # as fit() does; a real bucket has no directories to create
    with caplog.at_level(logging.WARNING, logger="kdjax"):
        metrics = MetricsLog(workdir)
    records = [{"stage": 0, "stage_name": "distill", "step": s, "global_step": s, "loss": 1.0 / s,
                "term/kd": 0.5 / s} for s in (1, 2, 3)]
    for r in records:
        metrics.write(r)
    metrics.close()
    assert "google-cloud-storage" in caplog.text, "a gs:// workdir without the GCS client says why TensorBoard is off"
    got = [json.loads(line) for line in (fake_gcs / "b/job/metrics.jsonl").read_text().splitlines()]
    assert got == records
    # A resume from global step 2 trims the log to what that checkpoint had seen.
    MetricsLog(workdir, resume_from_global_step=2).close()
    assert [r["global_step"] for r in report.read_jsonl(workdir + "/metrics.jsonl")] == [1, 2]

    report.write_json(workdir + "/summary.json", {"final_loss": np.float32(0.25)})
    assert json.loads((fake_gcs / "b/job/summary.json").read_text()) == {"final_loss": 0.25}
    paths = report.plot_loss_terms(records, workdir, title="kd")
    assert paths == {"total": "gs://b/job/loss.png", "kd": "gs://b/job/plots/loss_kd.png"}
    for rel in ("loss.png", "plots/loss_kd.png"):
        assert (fake_gcs / "b/job" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
