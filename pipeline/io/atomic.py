"""The one atomic write, and the one checkpoint save/load, of the whole pipeline.

Every file a stage finishes goes through :func:`atomic_write`: the bytes are written to a temporary sibling
(``.tmp-<pid>-<name>``), flushed and fsynced, then renamed over the final path. A reader therefore sees
either the old file or the complete new one, never a torn write, and a killed writer leaves only a
``.tmp-*`` file that the next run overwrites. Folders (a per-video Zarr store) use :func:`atomic_dir`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"


def tmp_sibling(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, if present."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to build a file or folder in; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    remove_path(tmp)
    try:
        yield tmp
        if path.exists():
            remove_path(path)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists and numpy scalars as Python numbers (what JSON and
    store attributes can hold)."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def write_text(path: Path, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented, key-sorted JSON, atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save(state)`` atomically (the one checkpoint writer: finetune, train-head, refine)."""
    import torch

    with atomic_write(path) as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: Path, *, require: tuple[str, ...] = ("model",), map_location: Any = "cpu") -> dict:
    """The one checkpoint reader: tensors and plain values only (``weights_only``), on ``map_location``.

    Raises ``ValueError`` naming the file when it is unreadable or lacks one of the ``require`` entries.
    """
    import torch

    try:
        obj = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint of this pipeline (a {type(obj).__name__}, not a dict)")
    missing = [k for k in require if k not in obj]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (no {', '.join(map(repr, missing))} entry)")
    return obj


def weights_sha256(state_dict: dict) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order).

    What determines a network's output, and nothing else: two checkpoints with the same weights but other
    bookkeeping (timings, epoch counters, optimizer state) have the same digest, so a resumed or forced
    fine-tuning that ends with the same weights gives its downstream stages the same fingerprint.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
