"""Data for distillation: task registry and metrics, tfds/grain pipelines, embedded data sets.

* :mod:`kdjax.data.tasks` — :class:`TaskSpec` registry (GLUE, SuperGLUE, corpora, embedded task).
* :mod:`kdjax.data.metrics` — numpy metrics and :func:`compute_metrics`.
* :mod:`kdjax.data.sources` — random-access sources (prepared tfds data sets, text/JSONL/CSV).
* :mod:`kdjax.data.pipeline` — :func:`make_loader`, checkpointable grain iterators.
* :mod:`kdjax.data.embedded` — the offline corpus and review task shipped with kdjax.

The names below are imported on first use: checking a task name needs neither grain nor tfds.
"""

import importlib

_LAZY = {
    "METRICS": "metrics", "compute_metrics": "metrics",
    "IGNORE_INDEX": "pipeline", "make_loader": "pipeline", "make_task_loader": "pipeline",
    "restore_iterator_state": "pipeline", "save_iterator_state": "pipeline",
    "CsvSource": "sources", "DatasetNotPreparedError": "sources", "InMemorySource": "sources",
    "JsonlSource": "sources", "TextFileSource": "sources", "tfds_source": "sources",
    "TASKS": "tasks", "TaskSpec": "tasks", "UnknownTaskError": "tasks", "get_task": "tasks",
    "register_task": "tasks", "text_pair_formatter": "tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kdjax.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdjax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
