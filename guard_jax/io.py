"""Atomic result files: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror} (pick a writable path)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Remove the temporary files (and folders) that an atomic write killed midway left in `folder`.

    They are named `.NAME.*.tmp` (see `atomic_write_bytes`; `hf.export` builds folders the same way). Call
    it where one process owns the folder (a training run at its start): a concurrent writer's file would go
    too. -> the paths removed.
    """
    removed = []
    for p in sorted(pathlib.Path(folder).glob(".*.tmp")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> pathlib.Path:
    """JSON with sorted keys; NaN/inf are refused (they would make the file unparsable by strict readers)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")
