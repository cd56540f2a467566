"""Data for distillation: task registry and metrics, tfds/grain pipelines, embedded data sets.

* :mod:`kdjax.data.tasks` — :class:`TaskSpec` registry (GLUE, SuperGLUE, corpora, embedded task).
* :mod:`kdjax.data.metrics` — numpy metrics and :func:`compute_metrics`.
* :mod:`kdjax.data.sources` — random-access sources (prepared tfds data sets, text/JSONL/CSV).
* :mod:`kdjax.data.pipeline` — :func:`make_loader`, checkpointable grain iterators.
* :mod:`kdjax.data.embedded` — the offline corpus and review task shipped with kdjax.
"""

from kdjax.data.metrics import METRICS, compute_metrics
from kdjax.data.pipeline import (
    IGNORE_INDEX,
    make_loader,
    make_task_loader,
    restore_iterator_state,
    save_iterator_state,
)
from kdjax.data.sources import (
    CsvSource,
    DatasetNotPreparedError,
    InMemorySource,
    JsonlSource,
    TextFileSource,
    tfds_source,
)
from kdjax.data.tasks import TASKS, TaskSpec, UnknownTaskError, get_task, register_task, text_pair_formatter

__all__ = [
    "CsvSource",
    "DatasetNotPreparedError",
    "IGNORE_INDEX",
    "InMemorySource",
    "JsonlSource",
    "METRICS",
    "TASKS",
    "TaskSpec",
    "TextFileSource",
    "UnknownTaskError",
    "compute_metrics",
    "get_task",
    "make_loader",
    "make_task_loader",
    "register_task",
    "restore_iterator_state",
    "save_iterator_state",
    "text_pair_formatter",
    "tfds_source",
]
