"""tfds builders for the embedded data: ``kdjax_corpus`` and ``kdjax_reviews``.

tensorflow-datasets 4.9.10 *can* prepare a ``GeneratorBasedBuilder`` without TensorFlow when the
output format is ArrayRecord: feature encoding (``Text``, ``ClassLabel``) is pure numpy, the
writer is ``array_record``, and ``tfds.data_source`` reads it back with random access. Two things
must be avoided, and are, here:

* ``dataset_info_from_configs`` looks for a metadata folder next to the builder module, so the
  ``DatasetInfo`` is built directly;
* any download (there is nothing to download: the examples come from the package files).

Examples are written in generation order (``disable_shuffling=True``) so that index ``i`` of a
prepared split is element ``i`` of :func:`kdjax.data.embedded.corpus_sentences` /
:func:`~kdjax.data.embedded.review_examples`. Text features are read back as ``bytes`` (tfds
convention); the pipeline decodes them.

Importing this module registers both builders with tfds, so afterwards
``tfds.data_source("kdjax_reviews", split="test", data_dir=...)`` works like any catalog data set.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from kdjax.data import embedded

_FINGERPRINT_FILE = "kdjax_source_fingerprint.txt"


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: an optional ``source_dir`` (for tests and forks) and no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default probes the top-level package with `importlib_resources`, which is not a
        # dependency and fails for namespace packages; the builder file is all it needs.
        return epath.Path(__file__)

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._source_dir = source_dir
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(rows) for split, rows in self._splits().items()}

    def _generate_examples(self, rows):
        for i, row in enumerate(rows):
            yield i, row

    def _splits(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError


class KdjaxCorpus(_EmbeddedBuilder):
    """One sentence per example, with the topic (file stem) it came from."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Topical English sentences written for kdjax, one per example; used for general "
                "distillation and vocabulary statistics. Splits: fixed-seed 95/5 "
                f"(validation >= {embedded.CORPUS_MIN_VALIDATION} sentences)."
            ),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "topic": tfds.features.Text()}
            ),
            supervised_keys=None,
            disable_shuffling=True,
        )

    def _splits(self):
        return embedded.corpus_splits(self._source_dir)


class KdjaxReviews(_EmbeddedBuilder):
    """Three-class sentiment reviews with the domain (file stem) they belong to."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Short reviews written for kdjax, labeled negative/neutral/positive; "
                "80/10/10 train/validation/test, stratified by label."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(embedded.REVIEW_LABELS)),
                    "domain": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            disable_shuffling=True,
        )

    def _splits(self):
        return embedded.review_splits(self._source_dir)


BUILDERS: dict[str, type[_EmbeddedBuilder]] = {
    embedded.CORPUS_NAME: KdjaxCorpus,
    embedded.REVIEWS_NAME: KdjaxReviews,
}


def get_builder(
    name: str,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> _EmbeddedBuilder:
    """Builder instance for an embedded data set (not prepared yet)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown embedded data set {name!r}; use one of {sorted(BUILDERS)}")
    data_dir = os.fspath(data_dir) if data_dir is not None else embedded.default_data_dir()
    return BUILDERS[name](data_dir=data_dir, source_dir=source_dir)


def prepare(
    name: str,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> _EmbeddedBuilder:
    """Prepare (or re-prepare when the source files changed) and return the builder."""
    builder = get_builder(name, data_dir, source_dir)
    fingerprint = embedded.source_fingerprint(name, source_dir)
    stamp = epath.Path(builder.data_dir) / _FINGERPRINT_FILE
    if builder.is_prepared():
        if stamp.exists() and stamp.read_text().strip() == fingerprint:
            return builder
        # Stale or foreign copy: the package files changed since it was written.
        shutil.rmtree(builder.data_dir)
        builder = get_builder(name, data_dir, source_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    stamp.write_text(fingerprint + "\n")
    return builder


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
):
    """Random-access ``ArrayRecordDataSource`` for one split (prepares on first use)."""
    allowed = embedded.CORPUS_SPLITS if name == embedded.CORPUS_NAME else embedded.REVIEW_SPLITS
    if name in BUILDERS and split not in allowed:
        raise ValueError(f"unknown split {split!r} for {name}; use one of {list(allowed)}")
    return prepare(name, data_dir, source_dir).as_data_source(split=split)
