"""Frames and TV-L1 flow extracted by other tools ("rawframes"): the layouts, finding the videos, the checks,
and reading them into the pipeline's stores (the mmaction2 export is :mod:`pipeline.interop.mmaction2`).

Layouts (``T`` frames give ``T - step`` flows; flow ``k`` goes from frame ``k`` to frame ``k + step``):

* ``mmaction2``: ``<frame_dir>/img_%05d.jpg`` with ``flow_x_%05d.jpg`` / ``flow_y_%05d.jpg``; first frame 1,
  first flow 1.
* ``tsn``: the same names (TSN's dense_flow); 1 / 1.
* ``denseflow``: the same names; 1 / 0.
* ``twostreamfusion``: ``jpegs_256/<vid>/frame%06d.jpg`` with ``tvl1_flow/u/<vid>/frame%06d.jpg`` and
  ``tvl1_flow/v/<vid>/frame%06d.jpg``; 1 / 1.

A frame folder is ``<root>/<Class>/<vid>`` or ``<root>/<vid>`` (under ``jpegs_256`` for twostreamfusion); its
path relative to that root is the video id. ``decode --dataset rawframes`` stores the frames' JPEG bytes as
they are (no re-encoding) and ``extract-flow --backend import`` stores the flow images as the flow store's
quantized values with the given ``--bound`` (``--codec jpeg``: their bytes copied, :func:`read_flow_jpegs`;
else their decoded uint8 codes, :func:`read_flow_codes`): the source tools quantize with
``255 * (v + b) / (2 b)`` rounded (TSN / denseflow's ``convertFlowToImage``), the same mapping as
:mod:`pipeline.flow.quantize`, so the codes are used unchanged.

Checks, each a per-video failure naming the folder: frames present, numbered without gaps from the layout's
first index, readable colour JPEGs of one size; x and y flow counts equal, numbered from the first flow index,
``flows = frames - step``, readable grayscale JPEGs of the frames' size.
"""
from __future__ import annotations

import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data import datasets as ds

log = logging.getLogger("pipeline")

#: What the labels of a rawframes tree come from: mmaction2 / TSN lists, or the official split files.
LABEL_SOURCES = ("lists", "ucf101", "hmdb51")


class RawframesError(ValueError):
    """A video folder of a rawframes tree fails a check; the message names the folder or file."""


@dataclass(frozen=True)
class Layout:
    name: str
    frame_prefix: str
    flow_prefixes: tuple[str, str]
    digits: int
    frame_start: int
    flow_start: int
    frames_sub: str = ""  # frame folders live under <root>/<frames_sub>
    flow_subs: tuple[str, str] = ("", "")  # flow x / y folders under <root>/<sub>/<video id>; "" = the frame folder

    def frames_root(self, root: Path) -> Path:
        return Path(root) / self.frames_sub if self.frames_sub else Path(root)

    def flow_dirs(self, root: Path, frame_dir: Path) -> tuple[Path, Path]:
        """The folders of a video's x and y flow images."""
        if not self.flow_subs[0]:
            return Path(frame_dir), Path(frame_dir)
        rel = Path(frame_dir).relative_to(self.frames_root(root))
        return Path(root) / self.flow_subs[0] / rel, Path(root) / self.flow_subs[1] / rel

    def frame_name(self, i: int) -> str:
        return f"{self.frame_prefix}{i:0{self.digits}d}.jpg"

    def flow_name(self, axis: int, i: int) -> str:
        return f"{self.flow_prefixes[axis]}{i:0{self.digits}d}.jpg"


LAYOUTS: dict[str, Layout] = {
    "mmaction2": Layout("mmaction2", "img_", ("flow_x_", "flow_y_"), 5, 1, 1),
    "tsn": Layout("tsn", "img_", ("flow_x_", "flow_y_"), 5, 1, 1),
    "denseflow": Layout("denseflow", "img_", ("flow_x_", "flow_y_"), 5, 1, 0),
    "twostreamfusion": Layout("twostreamfusion", "frame", ("frame", "frame"), 6, 1, 1, "jpegs_256",
                              ("tvl1_flow/u", "tvl1_flow/v")),
}


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise RawframesError(f"unknown rawframes layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# ----------------------------------------------------------------------------------------------------------
# Finding video folders and numbered images
# ----------------------------------------------------------------------------------------------------------

def _pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(\d+)\.jpe?g$", re.IGNORECASE)


def numbered(names: Sequence[str], prefix: str) -> list[tuple[int, str]]:
    """(index, file name) of the names ``<prefix><digits>.jpg``, sorted by index."""
    pat = _pattern(prefix)
    found = [(int(m.group(1)), n) for n in names if (m := pat.match(n))]
    return sorted(found)


def _names(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return [e.name for e in it if e.is_file()]


def _has_frames(folder: Path, prefix: str) -> bool:
    pat = _pattern(prefix)
    with os.scandir(folder) as it:
        return any(pat.match(e.name) for e in it)


def find_frame_dirs(root: Path, lay: Layout) -> dict[str, Path]:
    """Every frame folder of the tree: video id (``Class/vid`` or ``vid``) -> folder."""
    base = lay.frames_root(root)
    if not base.is_dir():
        raise ds.DatasetError(f"rawframes root {base} does not exist or is not a folder"
                              + (f" (the {lay.name} layout keeps frames in {lay.frames_sub}/)" if lay.frames_sub
                                 else ""))
    out: dict[str, Path] = {}
    with os.scandir(base) as top:
        tops = sorted(e.name for e in top if e.is_dir() and not e.name.startswith("."))
    for name in tops:
        folder = base / name
        if _has_frames(folder, lay.frame_prefix):
            out[name] = folder
            continue
        with os.scandir(folder) as it:
            subs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        for sub in subs:
            if _has_frames(folder / sub, lay.frame_prefix):
                out[f"{name}/{sub}"] = folder / sub
    if not out:
        raise ds.DatasetError(f"no frame folders under {base}: expected <Class>/<video>/ or <video>/ folders "
                              f"holding {lay.frame_name(lay.frame_start)}, ... ({lay.name} layout)")
    return out


class FrameDirIndex:
    """The frame folders of a tree, looked up like :class:`pipeline.data.datasets._DiskIndex` looks up video
    files, so the official split parsers (``load_ucf101``, ``load_hmdb51``) read a rawframes tree: a listed
    ``Class/v_x.avi`` resolves to ``Class/v_x`` (exact or case-insensitive) or, in a flat tree, to ``v_x``.
    In a flat tree, folders no split file names are not imported (their class is unknown)."""

    def __init__(self, root: Path, dirs: dict[str, Path]):
        self.root = Path(root)
        self.dirs = dirs
        self._lower = {r.lower(): r for r in dirs}
        self._stems: dict[str, list[str]] = defaultdict(list)
        for r in dirs:
            self._stems[r.rsplit("/", 1)[-1].lower()].append(r)
        self._resolved: set[str] = set()

    @property
    def files(self) -> set[str]:
        return {r for r in self.dirs if "/" in r} | self._resolved

    def resolve(self, listed: str) -> str | None:
        key = os.path.splitext(listed)[0].lower()
        found = self._lower.get(key)
        if found is None:
            candidates = self._stems.get(key.rsplit("/", 1)[-1], [])
            found = candidates[0] if len(candidates) == 1 else None
        if found is not None:
            self._resolved.add(found)
        return found


# ----------------------------------------------------------------------------------------------------------
# Labels: mmaction2 / TSN lists, or the official split files
# ----------------------------------------------------------------------------------------------------------

def _list_classes(rows: list[tuple[Path, ds.ListRow, str]], classes_file: Path | None) -> list[str]:
    """``classes_file``'s names, else the classes' folder names when each label has exactly one, else
    ``"0".."C-1"`` (the labels exactly 0..C-1 either way, :func:`pipeline.data.datasets._index_classes`)."""
    classes = ds._index_classes([(path, row) for path, row, _ in rows], classes_file)
    if classes_file is not None:
        return classes
    folders: dict[int, set[str]] = defaultdict(set)
    for _, row, frame_dir in rows:
        folders[row.label].add(frame_dir.split("/", 1)[0] if "/" in frame_dir else "")
    if all("" not in f for f in folders.values()):
        names = []
        for label in range(len(classes)):
            if len(folders[label]) != 1:
                raise ds.DatasetError(f"label {label} is used for folders {sorted(folders[label])[:5]}; give the "
                                      "class names with --classes")
            names.append(next(iter(folders[label])))
        if len(set(names)) == len(names):
            return names
    return classes


def load_lists(base: Path, train_list: Path | None, test_list: Path | None, *, classes_file: Path | None = None,
               allow_missing: bool = False) -> ds.Dataset:
    """mmaction2 / TSN rawframe lists, lines ``frame_dir total_frames label`` (label 0-based, frame_dir
    relative to ``base`` or absolute; read by :func:`pipeline.data.datasets.read_video_list`) -> a
    :class:`~pipeline.data.datasets.Dataset` (train and test)."""
    base = Path(os.path.abspath(base))
    files = ds._split_files("rawframes", train_list, test_list, "list", "--train-list / --test-list")
    rows = []  # (list file, row, frame_dir text, split)
    for split, path in files:
        for row in ds.read_video_list(path):
            if row.num_frames is None:
                raise ds.DatasetError(f"{path}:{row.line}: expected '<frame_dir> <total_frames> <label>' (label "
                                      "0-based), got 2 columns (a video list's 'path label'?)")
            frame_dir = row.name if os.path.isabs(row.name) else row.name.strip("/")
            rows.append((path, row, frame_dir, split))
    if not rows:
        raise ds.DatasetError("no videos in the rawframes lists (give --train-list and/or --test-list)")
    classes = _list_classes([(path, row, frame_dir) for path, row, frame_dir, _ in rows], classes_file)
    records, missing = [], []
    for path, row, frame_dir, split in rows:
        folder = Path(os.path.abspath(base / frame_dir))
        if not folder.is_dir():
            missing.append(frame_dir)
            continue
        rel = os.path.relpath(folder, base).replace(os.sep, "/")
        vid = rel if not rel.startswith("../") else folder.as_posix().lstrip("/")
        name = classes[row.label]
        records.append(ds.VideoRecord(vid, folder, row.label, name, split, ds._name_group(vid, name)))
    missing_t = ds._handle_missing(missing, allow_missing, base, ", ".join(str(p) for _, p in files))
    return ds._finish("rawframes", base, classes, records, 1, missing_t)


def load_split(root: Path, layout_name: str, labels: str, split: int, *, splits_dir: Path | None = None,
               train_list: Path | None = None, test_list: Path | None = None, classes_file: Path | None = None,
               allow_missing: bool = False) -> ds.Dataset:
    """Split ``split`` of a rawframes tree: labels from the lists (one split) or the official split files,
    parsed by :mod:`pipeline.data.datasets` over the tree's frame folders."""
    lay = layout(layout_name)
    base = lay.frames_root(root)
    if labels == "lists":
        if split != 1:
            raise ds.MissingSplitFile("rawframes lists define one split")
        if train_list is None and test_list is None:
            raise ds.DatasetError("--dataset rawframes needs --rawframes-train-list / --rawframes-test-list or "
                                  "--rawframes-labels ucf101|hmdb51 with the official split files")
        return load_lists(base, train_list, test_list, classes_file=classes_file, allow_missing=allow_missing)
    if labels not in LABEL_SOURCES:
        raise ds.DatasetError(f"unknown rawframes label source {labels!r}; choose one of {', '.join(LABEL_SOURCES)}")
    index = FrameDirIndex(base, find_frame_dirs(root, lay))
    loader = ds.load_ucf101 if labels == "ucf101" else ds.load_hmdb51
    return loader(base, splits_dir=splits_dir, split=split, allow_missing=allow_missing, index=index)


# ----------------------------------------------------------------------------------------------------------
# Checks and reading
# ----------------------------------------------------------------------------------------------------------

def _sequence_problem(found: list[tuple[int, str]], start: int, what: str, folder: Path, example: str) -> str | None:
    if not found:
        return f"{folder}: no {what} images ({example}, ...)"
    idx = [i for i, _ in found]
    if idx[0] != start:
        return (f"{folder}: {what} images start at index {idx[0]} ({found[0][1]}), the layout's first index is "
                f"{start}")
    for k, i in enumerate(idx):
        if i != start + k:
            return f"{folder}: {what} image index {start + k} missing (found {found[k][1]} next)"
    return None


def check_jpeg(blob: bytes, path: Path, *, colour: bool) -> tuple[int, int]:
    """(height, width) of a JPEG file's bytes; RawframesError naming ``path`` when it is not a complete,
    decodable JPEG (colour for frames, grayscale for flow)."""
    import cv2
    from PIL import Image

    if not blob.startswith(b"\xff\xd8"):
        raise RawframesError(f"{path}: not a JPEG file")
    if not blob.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise RawframesError(f"{path}: truncated JPEG (no end-of-image marker)")
    try:
        with Image.open(io.BytesIO(blob)) as im:
            w, h = im.size
            mode = im.mode
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise RawframesError(f"{path}: unreadable JPEG ({type(e).__name__}: {e})") from None
    want = "RGB" if colour else "L"
    if mode != want:
        raise RawframesError(f"{path}: a {mode} JPEG, expected {'colour (RGB)' if colour else 'grayscale'}")
    if colour and cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_REDUCED_COLOR_8) is None:
        raise RawframesError(f"{path}: unreadable JPEG (OpenCV cannot decode it)")
    return h, w


def read_frame_jpegs(folder: Path, lay: Layout, max_frames: int = 0) -> tuple[list[bytes], int, tuple[int, int]]:
    """The JPEG bytes of a video's frames (the first ``max_frames`` when > 0), the number of frames in the
    folder and the frame size (H, W); RawframesError on a failed check."""
    folder = Path(folder)
    found = numbered(_names(folder), lay.frame_prefix)
    problem = _sequence_problem(found, lay.frame_start, "frame", folder, lay.frame_name(lay.frame_start))
    if problem:
        raise RawframesError(problem)
    total = len(found)
    if max_frames:
        found = found[:max_frames]
    blobs, size = [], None
    for _, name in found:
        blob = (folder / name).read_bytes()
        hw = check_jpeg(blob, folder / name, colour=True)
        if size is None:
            size = hw
        elif hw != size:
            raise RawframesError(f"{folder / name}: frame size {hw[1]}x{hw[0]}, the video's first frame is "
                                 f"{size[1]}x{size[0]}")
        blobs.append(blob)
    return blobs, total, size


def read_flow_jpegs(root: Path, frame_dir: Path, lay: Layout, *, start_index: int | None = None, step: int = 1,
                    num_frames: int | None = None, size: tuple[int, int] | None = None
                    ) -> tuple[list[bytes], list[bytes]]:
    """A video's flow images as their JPEG bytes, unchanged: (x images, y images), ``num_frames - step`` each.

    Every image is checked (a complete grayscale JPEG of the frames' ``size``, all of one size; the counts
    and numbering as :func:`read_flow_codes`); RawframesError naming the file or folder on a failed check.
    """
    frame_dir = Path(frame_dir)
    start = lay.flow_start if start_index is None else int(start_index)
    frame_names = _names(frame_dir) if frame_dir.is_dir() else []
    total = len(numbered(frame_names, lay.frame_prefix))
    dirs = lay.flow_dirs(root, frame_dir)
    seqs = []
    for axis, d in enumerate(dirs):
        if not d.is_dir():
            raise RawframesError(f"{d}: no flow folder ({'xy'[axis]}) for {frame_dir}")
        names = frame_names if d == frame_dir else _names(d)
        found = numbered(names, lay.flow_prefixes[axis])
        problem = _sequence_problem(found, start, f"flow {'xy'[axis]}", d, lay.flow_name(axis, start))
        if problem:
            hint = (f"; the first flow index is {1 - start} there? (--flow-start-index {1 - start})"
                    if found and found[0][0] == 1 - start else "")
            raise RawframesError(problem + hint)
        seqs.append(found)
    if len(seqs[0]) != len(seqs[1]):
        raise RawframesError(f"{frame_dir}: {len(seqs[0])} x flow images but {len(seqs[1])} y flow images"
                             + (f" ({dirs[0]}, {dirs[1]})" if dirs[0] != dirs[1] else ""))
    if len(seqs[0]) != total - step:
        raise RawframesError(f"{frame_dir}: {len(seqs[0])} flows for {total} frames; step {step} needs "
                             f"{total} - {step} = {total - step}")
    n = (num_frames if num_frames is not None else total) - step
    out: tuple[list[bytes], list[bytes]] = ([], [])
    first = None
    for axis in (0, 1):
        for _, name in seqs[axis][:n]:
            path = dirs[axis] / name
            blob = path.read_bytes()
            hw = check_jpeg(blob, path, colour=False)
            if size is not None and hw != tuple(size):
                raise RawframesError(f"{path}: flow image {hw[1]}x{hw[0]}, the frames are {size[1]}x{size[0]}")
            if first is None:
                first = hw
            elif hw != first:
                raise RawframesError(f"{path}: flow image {hw[1]}x{hw[0]}, the first is {first[1]}x{first[0]}")
            out[axis].append(blob)
    return out


def read_flow_codes(root: Path, frame_dir: Path, lay: Layout, *, start_index: int | None = None, step: int = 1,
                    num_frames: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """A video's flow images as the stored uint8 codes, (num_frames - step, H, W, 2) (x then y).

    ``num_frames``: the frames stored for the video (fewer than in the folder under ``--max-frames``), default
    all; ``size``: the frames' (H, W) the flow must match. RawframesError naming the folder on a failed check.
    """
    import cv2

    xs, ys = read_flow_jpegs(root, frame_dir, lay, start_index=start_index, step=step, num_frames=num_frames,
                             size=size)
    out = None
    for axis, blobs in enumerate((xs, ys)):
        for k, blob in enumerate(blobs):
            img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_GRAYSCALE)
            if img is None:
                name = lay.flow_name(axis, k + (lay.flow_start if start_index is None else int(start_index)))
                raise RawframesError(f"{lay.flow_dirs(root, Path(frame_dir))[axis] / name}: unreadable JPEG "
                                     "(OpenCV cannot decode it)")
            if out is None:
                out = np.empty((len(xs), *img.shape, 2), np.uint8)
            out[k, :, :, axis] = img
    return out if out is not None else np.zeros((0, *(size or (0, 0)), 2), np.uint8)


def flow_source_stats(root: Path, lay: Layout, frame_dirs: Sequence[str]) -> list[tuple[str, int, int]]:
    """(folder, size, mtime_ns) of every flow folder of the videos (the extract-flow import's input digest;
    a folder's mtime changes when images are added, removed or renamed)."""
    seen, out = set(), []
    for frame_dir in frame_dirs:
        for d in lay.flow_dirs(root, Path(frame_dir)):
            if d in seen:
                continue
            seen.add(d)
            try:
                st = os.stat(d)
                out.append((str(d), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(d), -1, -1))
    return out
