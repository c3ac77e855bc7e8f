"""TensorFlow Datasets view of the embedded corpus, and a reader for any locally prepared TFDS text dataset.

`tensorflow-datasets` is an optional extra (`pip install -e '.[tfds]'`). It does not need TensorFlow:
the `guard_corpus` builder below writes `array_record` files and is read as a random-access data source:

    import tensorflow_datasets as tfds
    import guard_jax.data.tfds_corpus  # registers the builder
    ds = tfds.data_source("guard_corpus", split="train")   # prepares offline on first use
    ds[0]["text"]                                          # bytes

`tfds.load("guard_corpus", ...)` (tf.data pipelines) works too where TensorFlow is installed.
Importing this module without tensorflow-datasets raises a ModuleNotFoundError that says what to install.
"""

from __future__ import annotations

import os

from guard_jax.data import corpus

try:
    import tensorflow_datasets as tfds
except ModuleNotFoundError as e:  # pragma: no cover - exercised by a subprocess test
    raise ModuleNotFoundError(
        "TFDS datasets need the optional extra tensorflow-datasets: pip install -e '.[tfds]' "
        "(tensorflow-datasets and array-record; TensorFlow is not needed). The embedded corpus itself loads "
        "without it: guard_jax.data.corpus.load()."
    ) from e


class GuardCorpus(tfds.core.GeneratorBasedBuilder):
    """The embedded fortune-cookie corpus (see guard_jax.data.corpus), one example per document."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "FreeBSD classic fortunes (fortunes, startrek, murphy), SHA-256 5% validation split."}

    def __init__(self, *, file_format=None, **kwargs):
        # array_record by default: it is written and read without TensorFlow (tfrecord needs it).
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=corpus.__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=None,
            disable_shuffling=True,  # same order as guard_jax.data.corpus.split_documents
            homepage=f"https://pypi.org/project/{corpus.FORTUNE_PACKAGE}/",
            license="BSD-3-Clause",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the text comes with an installed package
        return {split: self._generate_examples(split) for split in corpus.SPLITS}

    def _generate_examples(self, split):
        for i, doc in enumerate(corpus.split_documents(split)):
            yield i, {"text": doc}


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_tfds(name: str, split: str, *, data_dir: str | os.PathLike | None = None, text_key: str = "text") -> list[str]:
    """The `text_key` feature of every example of a TFDS dataset's split, as strings.

    `guard_corpus` is prepared offline on first use. Any other dataset must already be prepared under
    `data_dir`; nothing is downloaded. array_record datasets are read without TensorFlow; tfrecord ones
    need TensorFlow installed.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if name != corpus.NAME:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared under {builder.data_dir_root}: prepare it where there is "
                f"internet (`tfds build {name} --data_dir DIR`, add `--file_format array_record` to read it without "
                f"TensorFlow) and pass data_dir=DIR"
            )
        builder.download_and_prepare(file_format="array_record")
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} is not in {name}: choose one of {sorted(builder.info.splits)}")
    if text_key not in builder.info.features:
        raise ValueError(f"text_key {text_key!r} is not a feature of {name}: choose one of {sorted(builder.info.features)}")
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = builder.as_data_source(split=split)
        return [_as_str(source[i][text_key]) for i in range(len(source))]
    try:
        import tensorflow  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"{name} is stored as {builder.info.file_format.value}, which TFDS reads only with TensorFlow: "
            f"pip install tensorflow, or rebuild it with --file_format array_record"
        ) from None
    return [_as_str(ex[text_key]) for ex in tfds.as_numpy(builder.as_dataset(split=split))]
