"""Hugging Face checkpoint folders <-> guard_jax models (no PyTorch needed).

A folder holds config.json, the weights as model.safetensors or as shards listed in
model.safetensors.index.json, and optionally a tokenizer (tokenizer.json / tokenizer_config.json ...).
Loading streams the weights tensor by tensor (`safetensors.safe_open`), so the host never holds a second
full copy; exporting writes shards of at most `max_shard_bytes` the same way, into a temporary folder that
replaces the target in one rename.

Each model module registers the Hugging Face `model_type`s it handles in `MODEL_TYPES` and provides
`from_hf_config`, `to_hf_config`, `params_from_hf` and `params_to_hf`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np

from guard_jax.io import atomic_write_json
from guard_jax.models import gemma, gpt2, llama

_MODULES = (gpt2, gemma, llama)
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _registry() -> dict:
    return {t: m for m in _MODULES for t in m.MODEL_TYPES}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_registry()))


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a Hugging Face folder, with clear errors for a missing folder or file."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist (pass a local Hugging Face folder "
                                f"written by save_pretrained, with config.json and *.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}: a Hugging Face model folder needs config.json "
                                f"and model.safetensors (save_pretrained writes both)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({e}); fix or re-save the model folder") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def module_for(config: dict):
    """The model module that handles `config["model_type"]`."""
    model_type = config.get("model_type")
    module = _registry().get(model_type)
    if module is None:
        raise ValueError(f"unknown model_type {model_type!r} in config.json; supported: {', '.join(supported_model_types())}")
    return module


def _weight_map(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> safetensors file holding it (one file, or the shards of an index)."""
    from safetensors import safe_open

    if (path / _INDEX).is_file():
        try:
            index = json.loads((path / _INDEX).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(path / _INDEX)!r} is not valid JSON ({e}); re-export the model folder") from None
        if "weight_map" not in index:
            raise ValueError(f"{path / _INDEX} has no 'weight_map'; it is not a safetensors index")
        files = {name: path / f for name, f in index["weight_map"].items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name!r} listed in {_INDEX} is missing from {str(path)!r}")
        return files
    if (path / _WEIGHTS).is_file():
        with _open_weights(safe_open, path / _WEIGHTS) as f:
            return {name: path / _WEIGHTS for name in f.keys()}
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
    hint = (f"found {', '.join(other)}; only safetensors weights are read (re-save with "
            f"model.save_pretrained(path, safe_serialization=True))" if other else "save_pretrained writes it")
    raise FileNotFoundError(f"no {_WEIGHTS} or {_INDEX} in {str(path)!r}: {hint}")


def load_tokenizer(path: str | os.PathLike):
    """The folder's tokenizer (transformers fast tokenizer), or None when it has no tokenizer files."""
    path = pathlib.Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _open_weights(safe_open, file: pathlib.Path):
    """safe_open with an error that names the file when it is not a readable safetensors file."""
    try:
        return safe_open(file, framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated or foreign file
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e}); it may be truncated: "
                         f"re-export or re-download it") from None


def _finite_tensor(handle, name: str, file: pathlib.Path) -> np.ndarray:
    """The tensor `name`, checked for NaN/Inf (one pass on the host while loading; the error names it)."""
    try:
        array = handle.get_tensor(name)
    except Exception as e:
        raise ValueError(f"{str(file)!r}: tensor {name!r} cannot be read ({e}); the file may be truncated: "
                         f"re-export or re-download it") from None
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(f"{str(file)!r}: tensor {name!r} holds {bad:,} NaN/Inf values of {array.size:,}; the "
                             f"checkpoint is broken (load an earlier checkpoint, or re-export the model)")
    return array


def load(path: str | os.PathLike, dtype=jnp.float32, param_dtype=None, tokenizer: bool = True):
    """Load a Hugging Face folder -> (model, params, tokenizer or None).

    dtype: computation dtype; param_dtype: storage dtype of the params (default: dtype). Tensors are read
    one at a time and converted to `param_dtype` straight away.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    config = read_config(path)
    module = module_for(config)
    model = module.from_hf_config(config, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
    files = _weight_map(path)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open_weights(safe_open, f)) for f in sorted(set(files.values()))}
        params = module.params_from_hf(model, lambda name: _finite_tensor(handles[files[name]], name, files[name]), set(files))
    tok = load_tokenizer(path) if tokenizer else None
    if tok is not None and len(tok) > model.vocab_size:
        raise ValueError(f"the tokenizer in {str(path)!r} has {len(tok)} tokens but the model's embedding has "
                         f"vocab_size={model.vocab_size}; the tokenizer does not belong to these weights "
                         f"(resize the embedding before saving)")
    return model, params, tok


def export(path: str | os.PathLike, model, params, tokenizer=None, max_shard_bytes: int = 4 << 30) -> pathlib.Path:
    """Write a Hugging Face folder (config.json, safetensors weights, tokenizer files) that transformers loads.

    Weights are written in shards of at most `max_shard_bytes` (one model.safetensors when they fit, else
    model-0000i-of-0000n.safetensors plus an index). The folder is built next to `path` and then renamed
    over it, so readers never see a half-written checkpoint.
    """
    from safetensors.numpy import save_file

    module = next((m for m in _MODULES if type(model).__module__ == m.__name__), None)
    if module is None:
        raise TypeError(f"cannot export a {type(model).__name__}; supported model types: {', '.join(supported_model_types())}")
    if getattr(model, "lora", None) is not None:
        raise ValueError("export got a model with LoRA adapters: merge them first (guard_jax.lora.merge(lm), "
                         "or guard_jax.lora.export(path, lm) which merges and exports)")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        shards, shard, size = [], {}, 0

        def flush():
            nonlocal shard, size
            if shard:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                shards.append((name, list(shard)))
                shard, size = {}, 0

        for name, array in module.params_to_hf(model, params):
            if shard and size + array.nbytes > max_shard_bytes:
                flush()
            shard[name], size = array, size + array.nbytes
        flush()
        if len(shards) == 1:
            os.replace(tmp / shards[0][0], tmp / _WEIGHTS)
        else:
            weight_map = {}
            for i, (name, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                weight_map.update({n: final for n in names})
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            atomic_write_json(tmp / _INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", module.to_hf_config(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` (the old one is removed after the rename)."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{str(dst)!r} exists and is not a folder")
    old = None
    if dst.exists():
        old = pathlib.Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
