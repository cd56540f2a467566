"""Reporting helpers: JSON/JSONL I/O, training-curve plots and compact summaries.

These are the host-side ends of a run: the trainer appends one JSON object per logging step to
``metrics.jsonl``; :func:`read_jsonl` reads it back, :func:`plot_curves` draws it and
:func:`summarize` condenses it, and :func:`write_json` stores evaluation results. Everything here
is plain Python/numpy (plus matplotlib for plots), so it runs on a laptop against the outputs of a
pod run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

__all__ = ["curve_figure", "format_table", "loss_terms", "plot_curves", "plot_loss_terms", "read_jsonl",
           "spans_decades", "stage_boundaries", "summarize", "to_jsonable", "write_json"]

PathLike = Union[str, os.PathLike]


def to_jsonable(obj: Any) -> Any:
    """`obj` with numpy/jax scalars and arrays turned into Python numbers and lists.

    Tuples become lists and mapping keys become strings (JSON has nothing else); non-finite floats
    stay ``NaN``/``Infinity``, which Python's ``json`` reads back (a diverged loss stays visible).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON; convert it to numbers, strings, lists or dicts")


def write_json(path: PathLike, obj: Any, *, indent: Optional[int] = 2) -> str:
    """Write `obj` as JSON atomically: a temporary file in the same folder, then ``os.replace``
    (a ``gs://`` object write is atomic by itself).

    A reader (or a preempted job restarting) therefore sees either the old file or the complete
    new one, never a truncated one. Numpy/jax values are converted with :func:`to_jsonable`.
    """
    from kdjax import fileio
    path = os.fspath(path)
    payload = json.dumps(to_jsonable(obj), indent=indent, sort_keys=True)
    fileio.write_text(path, payload + "\n")
    return path


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """All JSON objects of a JSON-lines file (blank lines skipped), e.g. a run's ``metrics.jsonl``.

    A truncated *last* line — what a job killed mid-write leaves — is skipped; a malformed line
    anywhere else is an error naming the line.
    """
    from kdjax import fileio
    path = os.fspath(path)
    if not (fileio.exists(path) if fileio.is_remote(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"no JSON-lines file at {path}; pass the run's metrics.jsonl")
    lines = fileio.read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _series(records: Sequence[Mapping[str, Any]], key: str, x_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, values) of the records that have a finite number under `key`, sorted by `x_key`."""
    steps, values = [], []
    for i, record in enumerate(records):
        value = record.get(key)
        if not _is_number(value) or not math.isfinite(float(value)):
            continue
        if x_key not in record:
            raise ValueError(f"record {i} has {key!r} but no {x_key!r}; write a {x_key} with every logged record")
        steps.append(float(record[x_key]))
        values.append(float(value))
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values)[order]


def spans_decades(values, decades: float = 2.0) -> bool:
    """True when all `values` are positive and max/min exceeds ``10**decades`` (log axis is better)."""
    values = np.asarray(values, np.float64)
    return bool(values.size and np.all(values > 0) and values.max() / values.min() > 10.0 ** decades)


def stage_boundaries(records: Sequence[Mapping[str, Any]], x_key: str = "global_step") -> list[tuple[float, str]]:
    """``(x, stage name)`` where each stage after the first begins, from the records' ``stage`` fields.

    The x position is the last `x_key` logged in the previous stage, i.e. where that stage ended, so
    a vertical line there separates the curves of consecutive stages of a multi-stage run.
    """
    out: list[tuple[float, str]] = []
    previous_stage, previous_x = None, None
    for record in sorted((r for r in records if "stage" in r and _is_number(r.get(x_key))),
                         key=lambda r: float(r[x_key])):
        stage = record["stage"]
        if previous_stage is not None and stage != previous_stage:
            out.append((float(previous_x), str(record.get("stage_name", f"stage {stage}"))))
        previous_stage, previous_x = stage, record[x_key]
    return out


def curve_figure(records: Sequence[Mapping[str, Any]], *, keys: Sequence[str] = ("loss",),
                 title: Optional[str] = None, x_key: str = "step",
                 boundaries: Sequence[tuple[float, str]] = (), labels: Optional[Sequence[str]] = None,
                 xlim: Optional[tuple[float, float]] = None):
    """The matplotlib `Figure` that :func:`plot_curves` saves (one line per key, one axes).

    Kept separate so callers and tests can inspect the drawn lines without decoding a PNG. Stage
    boundaries are dashed vertical lines whose labels start with ``_`` (matplotlib's marker for
    "not a data series"), so ``[l for l in ax.lines if not l.get_label().startswith("_")]`` are the curves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(keys, str):
        keys = (keys,)
    if not keys:
        raise ValueError("keys is empty; name at least one metric to plot, e.g. keys=('loss',)")
    labels = list(labels) if labels is not None else list(keys)
    if len(labels) != len(keys):
        raise ValueError(f"got {len(labels)} labels for {len(keys)} keys; pass one label per key")
    series = {key: _series(records, key, x_key) for key in keys}
    missing = [k for k, (steps, _) in series.items() if steps.size == 0]
    if missing:
        available = sorted({k for r in records for k, v in r.items() if k != x_key and _is_number(v)})
        raise ValueError(f"no finite values for {missing} in {len(records)} records; available metrics: {available}")

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (steps, values) in zip(labels, series.values()):
        ax.plot(steps, values, label=label, marker="o" if steps.size == 1 else None, linewidth=1.5)
    if spans_decades(np.concatenate([v for _, v in series.values()])):
        ax.set_yscale("log")
    for x, name in boundaries:
        ax.axvline(x, color="0.4", linestyle="--", linewidth=1.0, label=f"_stage boundary {name}")
        ax.annotate(f"{name} ", xy=(x, 1.0), xycoords=("data", "axes fraction"), va="top", ha="right",
                    rotation=90, fontsize=8, color="0.3")
    if xlim is not None and xlim[1] > xlim[0]:
        ax.set_xlim(*xlim)
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(labels[0] if len(keys) == 1 else "value")
    ax.grid(True, alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_curves(records: Union[Sequence[Mapping[str, Any]], PathLike], out_png: PathLike, *,
                keys: Sequence[str] = ("loss",), title: Optional[str] = None, x_key: str = "step",
                boundaries: Sequence[tuple[float, str]] = (), labels: Optional[Sequence[str]] = None,
                xlim: Optional[tuple[float, float]] = None) -> str:
    """Plot metric curves against `x_key` to a PNG; one line per key.

    Args:
      records: dicts with `x_key` and metric values (as in ``metrics.jsonl``), or that file's path.
        Records lacking a key (e.g. eval metrics logged every N steps) are skipped for that key.
      out_png: output path (folders are created).
      keys: metric names to draw.
      title: figure title.
      x_key: the x axis: ``step`` (within a stage) or ``global_step`` (across the stages of a run).
      boundaries: ``(x, name)`` pairs drawn as dashed vertical lines, e.g. :func:`stage_boundaries`.
      labels: legend/axis names of the keys (default: the keys).
      xlim: the x range to show (default: that of the data), e.g. the whole run for a one-stage term.

    The y axis is logarithmic when every plotted value is positive and they span more than two
    decades (max/min > 100), as losses over a full run usually do. Uses matplotlib's Agg canvas
    directly, so no display and no global pyplot state are involved.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_jsonl(records)
    fig = curve_figure(records, keys=keys, title=title, x_key=x_key, boundaries=boundaries, labels=labels,
                       xlim=xlim)
    from kdjax import fileio
    out_png = os.fspath(out_png)
    with fileio.local_staging(out_png) as local:  # matplotlib writes local files; a gs:// target is copied up
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        fig.savefig(local, format="png")
    return out_png


def loss_terms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the per-term losses in training records (``term/<name>`` keys), in first-seen order."""
    return list(dict.fromkeys(k.split("/", 1)[1] for r in records for k, v in r.items()
                              if k.startswith("term/") and _is_number(v)))


def _join(*parts: str) -> str:
    from kdjax import fileio
    return fileio.join(*parts)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_loss_terms(records: Union[Sequence[Mapping[str, Any]], PathLike], out_dir: PathLike, *,
                    title: Optional[str] = None) -> dict[str, str]:
    """One PNG per loss curve of a run: ``out_dir/loss.png`` (total) and ``out_dir/plots/loss_<term>.png``.

    Separate files rather than one crowded figure, because terms differ by orders of magnitude and
    each gets its own (possibly logarithmic) y axis. The x axis is ``global_step`` so the stages of a
    multi-stage run follow each other, with dashed lines at the stage boundaries; a term that only
    exists in some stages is drawn where it was logged. Returns ``{"total": path, term: path, ...}``.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_jsonl(records)
    train = [r for r in records if _is_number(r.get("loss"))]
    if not train:
        raise ValueError(f"no training records with a 'loss' among {len(records)}; pass the run's metrics.jsonl")
    out_dir = os.fspath(out_dir)
    x_key = "global_step" if all("global_step" in r for r in train) else "step"
    boundaries = stage_boundaries(train, x_key) if x_key == "global_step" else []
    xs = [float(r[x_key]) for r in train if _is_number(r.get(x_key))]
    xlim = (min(xs), max(xs)) if xs else None  # every term's figure spans the whole run
    prefix = f"{title}: " if title else ""
    paths = {"total": plot_curves(train, _join(out_dir, "loss.png"), keys=("loss",), x_key=x_key,
                                  boundaries=boundaries, labels=("total loss",), title=f"{prefix}total loss",
                                  xlim=xlim)}
    for term in loss_terms(train):
        key = f"term/{term}"
        if not any(_is_number(r.get(key)) and math.isfinite(float(r[key])) for r in train):
            continue
        paths[term] = plot_curves(train, _join(out_dir, "plots", f"loss_{_file_safe(term)}.png"), keys=(key,),
                                  x_key=x_key, boundaries=boundaries, labels=(f"{term} loss",),
                                  title=f"{prefix}{term} loss", xlim=xlim)
    return paths


def summarize(records: Sequence[Mapping[str, Any]], keys: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Per metric: ``first``, ``last``, ``min``, ``max``, the ``step`` of the last value and ``count``.

    `keys` defaults to every numeric field except ``step``. Non-finite values are ignored.
    """
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if k != "step" and _is_number(v)})
    out = {}
    for key in keys:
        steps, _ = _series(records, key)
        if steps.size == 0:
            continue
        # _series sorts by step; keep file order for first/last when steps tie.
        values = [float(r[key]) for r in records if _is_number(r.get(key)) and math.isfinite(float(r[key]))]
        out[key] = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                    "step": float(steps[-1]), "count": len(values)}
    return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None, *,
                 float_format: str = ".4g") -> str:
    """A Markdown table of `rows` (e.g. one evaluation result per model) for reports and READMEs.

    Columns default to the union of keys in first-seen order; missing cells are blank and
    ``None`` prints as ``-``.
    """
    if not rows:
        raise ValueError("format_table needs at least one row")
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if _is_number(value) and not isinstance(value, (int, np.integer)):
            return format(float(value), float_format)
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[c]) if c in row else "" for c in columns) + " |")
    return "\n".join(lines)
