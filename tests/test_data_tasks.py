"""Task registry vs tfds metadata, metrics vs scikit-learn/SciPy, formatters and errors."""

import types
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import tensorflow_datasets as tfds
from tensorflow_datasets.text import c4, glue, super_glue, wikipedia  # noqa: F401  (registers builders)

from kdjax.data import metrics, tasks

from distill_fixtures import MINILM
CATALOG_PREFIXES = ("glue/", "super_glue/", "c4/", "wikipedia/")


def _catalog_features(tfds_name, data_dir):
    """Feature spec straight from the catalog builder's own `_info()`, offline.

    Instantiating a builder with an empty data_dir reads no data and downloads nothing. SuperGLUE's
    `_info()` spells its index dtype as `tf.int32`, the only TensorFlow use on that path; a numpy
    stand-in lets the unmodified method run without TensorFlow installed.
    """
    with mock.patch.object(super_glue, "tf", types.SimpleNamespace(int32=np.int32)):
        return tfds.builder(tfds_name, data_dir=str(data_dir)).info.features


@pytest.mark.parametrize(
    "spec", [s for s in tasks.TASKS.values() if s.tfds_name.startswith(CATALOG_PREFIXES)], ids=lambda s: s.name
)
def test_spec_fields_match_tfds_metadata(spec, tmp_path):
    features = _catalog_features(spec.tfds_name, tmp_path)
    for field in spec.text_fields:
        assert isinstance(features[field], tfds.features.Text), field
    for field in spec.extra_fields + spec.choice_fields:
        assert field in features, field
    if spec.is_corpus:
        assert spec.label_field is None and not spec.metrics
        return
    if spec.answers_field is not None:  # ReCoRD: string answers, candidate entities, no class label
        assert isinstance(features[spec.answers_field], tfds.features.Sequence)
        assert "label" not in features and spec.label_field is None
        return
    label = features[spec.label_field]
    if spec.is_regression:
        assert np.dtype(label.np_dtype) == np.float32 and spec.label_names is None
    else:
        assert isinstance(label, tfds.features.ClassLabel)
        assert tuple(label.names) == spec.label_names


def test_registry_covers_the_benchmarks():
    glue_names = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_mismatched", "qnli", "rte", "wnli"}
    sg_names = {"boolq", "cb", "copa", "multirc", "record", "superglue_rte", "wic", "wsc"}
    assert glue_names | sg_names | {"kdjax_reviews", "c4", "wikipedia", "kdjax_corpus"} <= set(tasks.TASKS)
    assert tasks.get_task("mnli").split("validation") == "validation_matched"
    assert tasks.get_task("mnli_mismatched").split("validation") == "validation_mismatched"
    assert tasks.get_task("super_glue/rte").name == "superglue_rte"  # lookup by tfds name
    # the wikipedia config is one tfds 4.9.10 actually defines
    assert tasks.get_task("wikipedia").tfds_name.split("/")[1] in {c.name for c in wikipedia.Wikipedia.BUILDER_CONFIGS}


def test_unknown_task_error_is_one_line_and_lists_names():
    with pytest.raises(ValueError) as e:
        tasks.get_task("glue/colaa")
    msg = str(e.value)
    assert "\n" not in msg and "unknown task 'glue/colaa'" in msg and "cola" in msg and "boolq" in msg
    with pytest.raises(KeyError):
        tasks.get_task("nope")  # also a KeyError, for dict-like callers
    with pytest.raises(ValueError, match="no 'validation' split; available: \\['train'\\]"):
        tasks.get_task("wikipedia").split("validation")


def test_spec_validation():
    with pytest.raises(ValueError, match="1 or 2"):
        tasks.TaskSpec("x", "x", ("a", "b", "c"), "label", ("n", "p"))
    with pytest.raises(ValueError, match="one word per label"):
        tasks.TaskSpec("x", "x", ("a",), "label", ("n", "p"), verbalizer=("bad",))
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task(tasks.get_task("sst2"))


def test_verbalizers_are_single_wordpieces():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    for spec in tasks.TASKS.values():
        for word in spec.verbalizer or ():
            assert len(tok.tokenize(word)) == 1 and tok.convert_tokens_to_ids(word) != tok.unk_token_id, (spec.name, word)


def test_text_pair_formatter_special_structures():
    wic = tasks.text_pair_formatter("wic")({"word": b"bank", "sentence1": b"A river bank.", "sentence2": b"A bank loan."})
    assert wic == ("bank: A river bank.", "A bank loan.")
    wsc = tasks.text_pair_formatter("wsc")({"text": "Mark told Pete he won.", "span1_text": "Pete", "span2_text": "he"})
    assert wsc == ("Mark told Pete he won.", "he refers to Pete")
    mrc = tasks.text_pair_formatter("multirc")({"paragraph": "P.", "question": "Q?", "answer": "A."})
    assert mrc == ("P.", "Q? A.")
    assert tasks.text_pair_formatter("sst2")({"sentence": b"fine"}) == ("fine", None)
    with pytest.raises(ValueError, match="multiple_choice"):
        tasks.text_pair_formatter("copa")


# --- metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 200, 3
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels] * rng.random((n, 1))
    preds = logits.argmax(-1)
    assert metrics.accuracy(logits, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, preds))
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(sklearn.metrics.matthews_corrcoef(labels, preds))
    assert metrics.macro_f1(preds, labels) == pytest.approx(sklearn.metrics.f1_score(labels, preds, average="macro"))
    yb, pb = labels % 2, preds % 2
    assert metrics.binary_f1(pb, yb) == pytest.approx(sklearn.metrics.f1_score(yb, pb))
    assert metrics.matthews_corrcoef(pb, yb) == pytest.approx(sklearn.metrics.matthews_corrcoef(yb, pb))


def test_metric_edge_cases_match_sklearn():
    y = np.array([1, 1, 0, 0])
    const = np.ones(4, int)
    assert metrics.matthews_corrcoef(const, y) == sklearn.metrics.matthews_corrcoef(y, const) == 0.0
    zeros = np.zeros(4, int)
    assert metrics.binary_f1(zeros, zeros) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        metrics.accuracy([0, 1], [0, 1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, 150).astype(float)  # many ties, like STS-B's 0..5 scores
    preds = labels + rng.normal(scale=1.5, size=150)
    preds[:30] = np.round(preds[:30])
    assert metrics.pearson(preds, labels) == pytest.approx(scipy.stats.pearsonr(preds, labels)[0], abs=1e-12)
    assert metrics.spearman(preds, labels) == pytest.approx(scipy.stats.spearmanr(preds, labels)[0], abs=1e-12)


def test_record_exact_match_and_token_f1():
    preds = ["The Eiffel Tower", "Paris, France", "London"]
    answers = [["Eiffel Tower", "the tower"], ["Paris"], ["Berlin", "Bonn"]]
    # 1) normalization drops "the" and case -> EM 1; 2) F1 of {paris, france} vs {paris} = 2/3; 3) 0
    assert metrics.exact_match(preds, answers) == pytest.approx(1 / 3)
    assert metrics.token_f1(preds, answers) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics.normalize_answer("  An Apple, a day!") == "apple day"


@pytest.mark.parametrize("seed", range(3))
def test_multirc_em_and_f1a_against_bruteforce(seed):
    rng = np.random.default_rng(seed)
    qid = np.sort(rng.integers(0, 25, 120))
    labels = rng.integers(0, 2, 120)
    preds = np.where(rng.random(120) < 0.8, labels, 1 - labels)
    groups = {}
    for q, p, y in zip(qid, preds, labels):
        groups.setdefault(int(q), []).append(p == y)
    expected_em = np.mean([all(v) for v in groups.values()])
    got = metrics.compute_metrics("multirc", preds, labels, question_ids=qid)
    assert got["multirc_em"] == pytest.approx(expected_em)
    assert got["f1a"] == pytest.approx(sklearn.metrics.f1_score(labels, preds))
    assert got["score"] == pytest.approx((got["multirc_em"] + got["f1a"]) / 2)
    pairs = np.stack([qid // 5, qid % 5], -1)  # (paragraph, question) ids group identically
    assert metrics.multirc_em(preds, labels, pairs) == pytest.approx(expected_em)
    with pytest.raises(ValueError, match="question_ids"):
        metrics.compute_metrics("multirc", preds, labels)


def test_compute_metrics_per_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    p = np.where(rng.random(64) < 0.7, y, 1 - y)
    out = metrics.compute_metrics("mrpc", p, y)
    assert set(out) == {"accuracy", "f1", "score"}
    assert out["score"] == pytest.approx((sklearn.metrics.accuracy_score(y, p) + sklearn.metrics.f1_score(y, p)) / 2)
    s = rng.random(64) * 5
    out = metrics.compute_metrics(tasks.get_task("stsb"), s + rng.normal(size=64), s)
    assert set(out) == {"pearson", "spearman", "score"}
    with pytest.raises(ValueError, match="no evaluation metrics"):
        metrics.compute_metrics("c4", p, y)
