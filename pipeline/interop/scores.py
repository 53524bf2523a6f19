"""Other tools' saved test scores: tsn-pytorch's ``--save_scores`` ``.npz`` and mmaction2's ``.pkl`` dumps.

Both hold one score vector per test video but no video ids (or only some), in an order fixed by the list
file the test ran on; :func:`read_foreign_scores` turns them into ``(video_ids, scores (V, C), None)`` for
``evaluate --external-scores`` ([STFN] §4.8 averages another model's scores with its own).

- **tsn-pytorch** (``test_models.py --save_scores F``, also TSM and its forks): ``np.savez(F, scores=...,
  labels=...)`` where ``scores[i]`` is ``(rst, label)``, ``rst`` the crop-averaged *logits* of each test
  segment, shape ``(segments, 1, C)``, and the videos are **reordered into the sorted order of the test
  list's first column** before saving. A video's score is the mean over its segments (TSN's own
  ``np.mean(x[0], axis=0)``).
- **mmaction2 0.x** (``tools/test.py --out F.pkl``): a list of ``(C,)`` arrays in the annotation file's
  order, logits with ``--average-clips score`` (the default) or probabilities with ``prob``.
- **mmaction2 1.x** (``tools/test.py --dump F.pkl``): a list of data-sample dicts in annotation order with
  ``pred_score`` (1.1 and later) or ``pred_scores: {'item': ...}`` (1.0), a tensor ``(C,)``; ``gt_label`` /
  ``gt_labels`` and, where the dataset put them there, ``frame_dir`` or ``filename`` naming the video.

Logits are turned into probabilities with a softmax so that they average on the same scale as our softmax
scores; rows that already are probability vectors are kept. Where the file holds labels and a list is given,
they must equal the list's labels in that order — a wrong list is an error, not silently shuffled scores.

Pickles are read with an unpickler that only builds numpy arrays, torch tensors (through ``torch.load``'s
``weights_only`` loader), and plain containers: a pickle that names any other callable is refused unread.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["ForeignScoresError", "read_foreign_scores", "read_score_list", "restricted_unpickle"]

_VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".flv", ".m4v")


class ForeignScoresError(ValueError):
    """A foreign scores file (or its list) that cannot be read; the message names the file."""


def _safe_load_from_bytes(b: bytes):
    import torch
    return torch.load(io.BytesIO(b), weights_only=True)


def _allowed(module: str, name: str):
    """The object a pickle may name, or None. Numpy arrays / scalars, torch tensors, plain containers."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray, name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(np._core.numeric if hasattr(np, "_core") else np.core.numeric, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    if module == "collections" and name == "OrderedDict":
        from collections import OrderedDict
        return OrderedDict
    if module == "builtins":
        return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}.get(name)
    if module == "_codecs" and name == "encode":  # Python-2-era numpy pickles carry bytes this way
        import codecs
        return codecs.encode
    if module.startswith("torch"):
        import torch
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _safe_load_from_bytes
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
    return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refused to build {module}.{name} (only numpy arrays, torch tensors, "
                                         "lists, tuples and dicts are read)")
        return obj


def restricted_unpickle(f, path: Path | str):
    """Unpickle ``f`` (a binary file object) allowing only arrays, tensors and plain containers."""
    try:
        return _Unpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, RuntimeError) as e:
        raise ForeignScoresError(f"{path}: not a readable scores pickle ({e})") from None


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, object arrays unpickled with :func:`restricted_unpickle`."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if not member.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if dtype.hasobject:
                        arr = np.asarray(restricted_unpickle(f, path), dtype=object)
                    else:
                        arr = np.frombuffer(f.read(), dtype=dtype, count=int(np.prod(shape)))
                        arr = arr.reshape(shape, order="F" if fortran else "C")
                out[member[:-4]] = arr
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ForeignScoresError(f"{path}: not a readable .npz ({e})") from None
    return out


def _video_id(name: str) -> str:
    """A list entry or dumped file name as a video id: trailing slashes and a video suffix dropped."""
    name = name.strip().rstrip("/")
    for suffix in _VIDEO_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_score_list(path: Path) -> tuple[list[str], list[int | None]]:
    """(video ids, labels) of a test list in file order: TSN / mmaction2 rawframe lines ``frame_dir
    num_frames label`` or video lines ``path label`` (label the last column; a lone path has none)."""
    path = Path(path)
    if not path.is_file():
        raise ForeignScoresError(f"{path}: list file not found")
    ids, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        label = None
        if len(parts) > 1:
            try:
                label = int(parts[-1])
            except ValueError:
                raise ForeignScoresError(f"{path}:{n}: the last column {parts[-1]!r} is not an integer label "
                                         "(lines are 'frame_dir num_frames label' or 'path label')") from None
        ids.append(_video_id(parts[0]))
        labels.append(label)
    if not ids:
        raise ForeignScoresError(f"{path}: no videos listed")
    if len(set(ids)) != len(ids):
        dup = sorted({v for v in ids if ids.count(v) > 1})[:3]
        raise ForeignScoresError(f"{path}: videos listed twice, e.g. {dup}")
    return ids, labels


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that are probability vectors (non-negative, summing to 1) unchanged, others softmaxed."""
    scores = np.asarray(scores, dtype=np.float64)
    if (scores >= 0).all() and np.allclose(scores.sum(1), 1.0, atol=1e-3):
        return scores
    import torch

    return torch.from_numpy(scores).softmax(1).numpy()


def _vector(x, path: Path, i: int) -> np.ndarray:
    """One video's score entry (array, tensor, or TSN's (segments, 1, C) logits) as a (C,) vector."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ForeignScoresError(f"{path}: entry {i} is not a score array ({type(x).__name__})") from None
    if a.ndim == 0 or a.shape[-1] < 2:
        raise ForeignScoresError(f"{path}: entry {i} has shape {a.shape}, not (..., classes)")
    return a.reshape(-1, a.shape[-1]).mean(0)


def _stack(vectors: list[np.ndarray], path: Path) -> np.ndarray:
    sizes = sorted({v.shape[0] for v in vectors})
    if len(sizes) != 1:
        raise ForeignScoresError(f"{path}: score vectors of {sizes} classes; all videos need the same classes")
    return np.stack(vectors)


def _label(x) -> int | None:
    if x is None:
        return None
    if isinstance(x, dict):  # mmaction2 1.0 LabelData as dict: {'item': tensor([k])}
        x = x.get("item", x.get("label"))
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x).reshape(-1)
    return int(a[0]) if a.size == 1 else None


def _tsn(path: Path, arrays: dict[str, np.ndarray], listed) -> tuple[list[str], np.ndarray, list]:
    """tsn-pytorch ``--save_scores``: entries in the sorted order of the list's first column."""
    if listed is None:
        raise ForeignScoresError(f"{path}: a tsn-pytorch scores file has no video ids; give the test list it was "
                                 "made from (--external-list)")
    raw = arrays["scores"]
    vectors, labels = [], []
    for i in range(raw.shape[0]):
        e = raw[i]
        # Saved from a list of (rst, label) pairs: numpy made an object array (V, 2) or (V,) of pairs.
        if raw.dtype == object and len(e) == 2 and np.ndim(e[1]) == 0:
            vectors.append(_vector(e[0], path, i))
            labels.append(_label(e[1]))
        else:
            vectors.append(_vector(e, path, i))
            labels.append(None)
    if "labels" in arrays and all(v is None for v in labels):
        labels = [_label(v) for v in arrays["labels"]]
    ids, list_labels = listed
    order = sorted(range(len(ids)), key=lambda k: ids[k])  # tsn-pytorch: sorted(name_list)
    return [ids[k] for k in order], _stack(vectors, path), (labels, [list_labels[k] for k in order])


def _mmaction2(path: Path, obj, listed) -> tuple[list[str], np.ndarray, tuple]:
    """mmaction2 ``--out`` (0.x: list of arrays) or ``--dump`` (1.x: list of data-sample dicts)."""
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ForeignScoresError(f"{path}: an mmaction2 results pickle is a non-empty list (got "
                                 f"{type(obj).__name__})")
    vectors, labels, names = [], [], []
    for i, e in enumerate(obj):
        if isinstance(e, dict):
            score = e.get("pred_score", e.get("pred_scores"))
            if isinstance(score, dict):
                score = score.get("item", score.get("score"))
            if score is None:
                raise ForeignScoresError(f"{path}: entry {i} has no pred_score (keys {sorted(e)[:8]})")
            vectors.append(_vector(score, path, i))
            labels.append(_label(e.get("gt_label", e.get("gt_labels"))))
            name = e.get("frame_dir", e.get("filename"))
            names.append(_video_id(str(name)) if name is not None else None)
        else:
            vectors.append(_vector(e, path, i))
            labels.append(None)
            names.append(None)
    if listed is not None:
        ids, list_labels = listed
    elif all(n is not None for n in names):
        ids, list_labels = names, [None] * len(names)
    else:
        raise ForeignScoresError(f"{path}: the mmaction2 results do not name their videos; give the annotation "
                                 "file the test ran on (--external-list)")
    return list(ids), _stack(vectors, path), (labels, list(list_labels))


def read_foreign_scores(path: Path, list_file: Path | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    """(video_ids (V,), probabilities (V, C), None) of a tsn-pytorch ``.npz`` or an mmaction2 ``.pkl``."""
    path = Path(path)
    listed = read_score_list(list_file) if list_file is not None else None
    if path.suffix == ".npz":
        arrays = _npz_arrays(path)
        if "scores" not in arrays:
            raise ForeignScoresError(f"{path}: no 'scores' array (has {sorted(arrays)})")
        ids, scores, (labels, list_labels) = _tsn(path, arrays, listed)
    else:
        with open(path, "rb") as f:
            obj = restricted_unpickle(f, path)
        ids, scores, (labels, list_labels) = _mmaction2(path, obj, listed)
    if len(ids) != scores.shape[0]:
        raise ForeignScoresError(f"{path}: {scores.shape[0]} score rows but {list_file} lists {len(ids)} videos; "
                                 "give the list the test ran on")
    bad = [i for i, (a, b) in enumerate(zip(labels, list_labels)) if a is not None and b is not None and a != b]
    if bad:
        i = bad[0]
        raise ForeignScoresError(f"{path}: its labels differ from {list_file}'s at {len(bad)} videos (e.g. "
                                 f"{ids[i]}: {labels[i]} vs {list_labels[i]}); it was made from another list")
    return np.asarray(ids), as_probabilities(scores), None
