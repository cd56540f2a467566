"""Registry of tasks and corpora: where the data lives in tfds and how to read an example.

A :class:`TaskSpec` is the single description the pipeline, the trainer and the evaluator share:
tfds name, which features hold the input text, the label feature and its class names, the metrics,
the split names, and — for GLMD's prompt-style stage — one verbalizer word per class.

Field names are the tfds 4.9.10 feature names (checked against the catalog builders' metadata in
``tests/test_data_tasks.py``). Four SuperGLUE tasks do not fit "one or two texts → one label"; their
spec says so through ``input_format`` and ``extra_fields`` rather than pretending:

* ``copa`` — ``multiple_choice``: premise + ``question`` (``"cause"``/``"effect"``) and the
  candidates ``choice1``/``choice2``; the label is the index of the right choice.
* ``record`` — ``cloze``: a ``query`` with an ``@placeholder`` over a ``passage``; candidates are
  ``entities`` and the gold strings are ``answers`` (no class label; scored with EM/token F1).
* ``multirc`` — ``answer_scoring``: each row is one (paragraph, question, answer) option with a
  True/False label; EM groups rows by question (``idx/paragraph``, ``idx/question``).
* ``wsc`` — ``span_coreference``: ``text`` with the pronoun ``span2_text`` and candidate referent
  ``span1_text`` (token indices in ``span*_index``); ``wic`` — ``word_in_context`` with the target
  ``word`` and character offsets ``start1/end1/start2/end2``.

:func:`text_pair_formatter` turns any spec except ``multiple_choice`` and ``cloze`` into the
``(text_a, text_b)`` pair a sequence classifier reads; those two need a task head of their own.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from kdjax.data import embedded

__all__ = [
    "INPUT_FORMATS",
    "TASKS",
    "TaskSpec",
    "UnknownTaskError",
    "get_task",
    "register_task",
    "text_pair_formatter",
]

INPUT_FORMATS = (
    "single",
    "pair",
    "corpus",
    "multiple_choice",
    "cloze",
    "answer_scoring",
    "span_coreference",
    "word_in_context",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to find, read and score one task or corpus.

    Attributes:
      name: registry key (``"sst2"``, ``"boolq"``, ``"c4"``).
      tfds_name: tfds ``name/config`` (``"glue/sst2"``, ``"super_glue/wsc.fixed"``).
      text_fields: one or two text features fed to the tokenizer as a (pair of) segment(s).
      label_field: label feature, or None (corpora, ReCoRD).
      label_names: class names in label-id order, or None (regression, corpora, ReCoRD).
      is_regression: True for STS-B (float label, MSE head, correlation metrics).
      metrics: names in :data:`kdjax.data.metrics.METRICS`; empty for corpora.
      splits: role → tfds split (``"train"``, ``"validation"``, ``"test"``, and extra roles such
        as ``"validation_mismatched"``); a role a data set lacks is absent.
      verbalizer: one word per class for cloze-style (GLMD/PET) classification; each is a single
        WordPiece in the BERT uncased vocabulary.
      input_format: one of :data:`INPUT_FORMATS`.
      extra_fields: features a task-specific formatter or metric needs beyond the text fields.
      answers_field: gold answer strings (ReCoRD).
      choice_fields: candidate features (COPA choices, ReCoRD entities).
    """

    name: str
    tfds_name: str
    text_fields: tuple[str, ...]
    label_field: str | None
    label_names: tuple[str, ...] | None
    is_regression: bool = False
    metrics: tuple[str, ...] = ()
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType(
            {"train": "train", "validation": "validation", "test": "test"}
        ),
        hash=False,
    )
    verbalizer: tuple[str, ...] | None = None
    input_format: str = "single"
    extra_fields: tuple[str, ...] = ()
    answers_field: str | None = None
    choice_fields: tuple[str, ...] = ()

    def __post_init__(self):
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"task {self.name!r}: text_fields must name 1 or 2 features, got {self.text_fields}")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"task {self.name!r}: input_format {self.input_format!r} is not one of {INPUT_FORMATS}")
        if self.is_regression and self.label_names is not None:
            raise ValueError(f"task {self.name!r}: a regression task has label_names=None")
        if self.verbalizer is not None and (self.label_names is None or len(self.verbalizer) != len(self.label_names)):
            raise ValueError(f"task {self.name!r}: verbalizer needs one word per label in {self.label_names}")
        object.__setattr__(self, "splits", types.MappingProxyType(dict(self.splits)))

    @property
    def num_labels(self) -> int:
        """Output width of a task head: 1 for regression, else the number of classes."""
        if self.is_regression:
            return 1
        return len(self.label_names) if self.label_names else 0

    @property
    def is_corpus(self) -> bool:
        return self.input_format == "corpus"

    def split(self, role: str) -> str:
        """tfds split name for a role (``"train"``, ``"validation"``, ...), with a clear error."""
        if role not in self.splits:
            raise ValueError(f"task {self.name!r} has no {role!r} split; available: {sorted(self.splits)}")
        return self.splits[role]


TASKS: dict[str, TaskSpec] = {}


class UnknownTaskError(KeyError, ValueError):
    """A task name that is not registered (a KeyError for dict-like use, a ValueError for CLIs)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Add a task (custom data sets register the same way the built-ins do)."""
    if spec.name in TASKS and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered; pass overwrite=True to replace it")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """Spec by registry name (``"rte"``) or tfds name (``"super_glue/rte"``)."""
    if name in TASKS:
        return TASKS[name]
    for spec in TASKS.values():
        if spec.tfds_name == name:
            return spec
    raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")


# --- GLUE -------------------------------------------------------------------------------------
# Verbalizers follow PET/GLMKD's prompt conventions, lowercased for uncased WordPiece vocabularies.
_NLI3 = ("entailment", "neutral", "contradiction")
_TRAIN_VAL_TEST = {"train": "train", "validation": "validation", "test": "test"}

for _spec in [
    TaskSpec("cola", "glue/cola", ("sentence",), "label", ("unacceptable", "acceptable"),
             metrics=("mcc",), verbalizer=("wrong", "correct")),
    TaskSpec("sst2", "glue/sst2", ("sentence",), "label", ("negative", "positive"),
             metrics=("accuracy",), verbalizer=("terrible", "great")),
    TaskSpec("mrpc", "glue/mrpc", ("sentence1", "sentence2"), "label", ("not_equivalent", "equivalent"),
             metrics=("accuracy", "f1"), verbalizer=("no", "yes"), input_format="pair"),
    TaskSpec("qqp", "glue/qqp", ("question1", "question2"), "label", ("not_duplicate", "duplicate"),
             metrics=("accuracy", "f1"), verbalizer=("no", "yes"), input_format="pair"),
    TaskSpec("stsb", "glue/stsb", ("sentence1", "sentence2"), "label", None, is_regression=True,
             metrics=("pearson", "spearman"), input_format="pair"),
    TaskSpec("mnli", "glue/mnli", ("premise", "hypothesis"), "label", _NLI3,
             metrics=("accuracy",), verbalizer=("yes", "maybe", "no"), input_format="pair",
             splits={"train": "train", "validation": "validation_matched", "test": "test_matched",
                     "validation_mismatched": "validation_mismatched", "test_mismatched": "test_mismatched"}),
    TaskSpec("mnli_mismatched", "glue/mnli", ("premise", "hypothesis"), "label", _NLI3,
             metrics=("accuracy",), verbalizer=("yes", "maybe", "no"), input_format="pair",
             splits={"train": "train", "validation": "validation_mismatched", "test": "test_mismatched"}),
    TaskSpec("qnli", "glue/qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"),
             metrics=("accuracy",), verbalizer=("yes", "no"), input_format="pair"),
    TaskSpec("rte", "glue/rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
             metrics=("accuracy",), verbalizer=("yes", "no"), input_format="pair"),
    TaskSpec("wnli", "glue/wnli", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"),
             metrics=("accuracy",), verbalizer=("no", "yes"), input_format="pair"),
    # --- SuperGLUE ------------------------------------------------------------------------------
    TaskSpec("boolq", "super_glue/boolq", ("question", "passage"), "label", ("False", "True"),
             metrics=("accuracy",), verbalizer=("no", "yes"), input_format="pair"),
    TaskSpec("cb", "super_glue/cb", ("premise", "hypothesis"), "label", ("entailment", "contradiction", "neutral"),
             metrics=("accuracy", "macro_f1"), verbalizer=("yes", "no", "maybe"), input_format="pair"),
    TaskSpec("copa", "super_glue/copa", ("premise",), "label", ("choice1", "choice2"),
             metrics=("accuracy",), input_format="multiple_choice", extra_fields=("question",),
             choice_fields=("choice1", "choice2")),
    TaskSpec("multirc", "super_glue/multirc", ("paragraph", "question"), "label", ("False", "True"),
             metrics=("f1a", "multirc_em"), verbalizer=("no", "yes"), input_format="answer_scoring",
             extra_fields=("answer", "idx")),
    TaskSpec("record", "super_glue/record", ("passage", "query"), None, None,
             metrics=("exact_match", "token_f1"), input_format="cloze", extra_fields=("idx",),
             answers_field="answers", choice_fields=("entities",)),
    TaskSpec("superglue_rte", "super_glue/rte", ("premise", "hypothesis"), "label", ("entailment", "not_entailment"),
             metrics=("accuracy",), verbalizer=("yes", "no"), input_format="pair"),
    TaskSpec("wic", "super_glue/wic", ("sentence1", "sentence2"), "label", ("False", "True"),
             metrics=("accuracy",), verbalizer=("no", "yes"), input_format="word_in_context",
             extra_fields=("word", "start1", "end1", "start2", "end2")),
    TaskSpec("wsc", "super_glue/wsc.fixed", ("text",), "label", ("False", "True"),
             metrics=("accuracy",), verbalizer=("no", "yes"), input_format="span_coreference",
             extra_fields=("span1_text", "span2_text", "span1_index", "span2_index")),
    # --- embedded task ---------------------------------------------------------------------------
    TaskSpec(embedded.REVIEWS_NAME, embedded.REVIEWS_NAME, ("text",), "label", embedded.REVIEW_LABELS,
             metrics=("accuracy", "macro_f1"), verbalizer=("terrible", "okay", "great"),
             extra_fields=("domain",)),
    # --- corpora (general distillation) ----------------------------------------------------------
    TaskSpec("c4", "c4/en", ("text",), None, None, input_format="corpus",
             splits={"train": "train", "validation": "validation"}),
    TaskSpec("wikipedia", "wikipedia/20230601.en", ("text",), None, None, input_format="corpus",
             splits={"train": "train"}),
    TaskSpec(embedded.CORPUS_NAME, embedded.CORPUS_NAME, ("text",), None, None, input_format="corpus",
             splits={"train": "train", "validation": "validation"}, extra_fields=("topic",)),
]:
    register_task(_spec)
del _spec


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_pair_formatter(spec: TaskSpec | str) -> Callable[[Mapping[str, Any]], tuple[str, str | None]]:
    """``record -> (text_a, text_b or None)`` for a sequence-classification reading of ``spec``.

    Plain tasks return their text field(s). ``answer_scoring`` (MultiRC) pairs the paragraph with
    "question answer"; ``word_in_context`` (WiC) prefixes the first sentence with "word:";
    ``span_coreference`` (WSC) pairs the text with "pronoun → candidate" as a hypothesis, the
    usual classification reading of these tasks.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    fmt = spec.input_format
    if fmt in ("multiple_choice", "cloze"):
        raise ValueError(
            f"task {spec.name!r} is {fmt}, not sequence classification; give make_loader a format_fn "
            f"that builds one input per candidate from {spec.text_fields + spec.choice_fields}"
        )
    fields = spec.text_fields

    def format_record(record: Mapping[str, Any]) -> tuple[str, str | None]:
        if fmt == "answer_scoring":
            return _text(record["paragraph"]), f"{_text(record['question'])} {_text(record['answer'])}"
        if fmt == "word_in_context":
            return f"{_text(record['word'])}: {_text(record['sentence1'])}", _text(record["sentence2"])
        if fmt == "span_coreference":
            return _text(record["text"]), f"{_text(record['span2_text'])} refers to {_text(record['span1_text'])}"
        text_b = _text(record[fields[1]]) if len(fields) == 2 else None
        return _text(record[fields[0]]), text_b

    return format_record
