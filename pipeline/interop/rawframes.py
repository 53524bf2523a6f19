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
path relative to that root is the video id. Its labels (rawframe lists or the official split files) are read
by :mod:`pipeline.data.annotations.rawframes`, given a :class:`Layout`. ``decode --dataset rawframes`` stores
the frames' JPEG bytes as they are (no re-encoding) and ``extract-flow --backend import`` stores the flow
images as the flow store's quantized values with the given ``--bound`` (``--codec jpeg``: their bytes copied,
:func:`read_flow_jpegs`; else their decoded uint8 codes, :func:`read_flow_codes`): the source tools quantize
with ``255 * (v + b) / (2 b)`` rounded (TSN / denseflow's ``convertFlowToImage``), the same mapping as
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.annotations.base import DatasetError

log = logging.getLogger("pipeline")


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

    def frame_dirs(self, root: Path) -> dict[str, Path]:
        """Every frame folder of the tree at ``root`` (:func:`find_frame_dirs`)."""
        return find_frame_dirs(root, self)

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
        raise DatasetError(f"rawframes root {base} does not exist or is not a folder"
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
        raise DatasetError(f"no frame folders under {base}: expected <Class>/<video>/ or <video>/ folders "
                           f"holding {lay.frame_name(lay.frame_start)}, ... ({lay.name} layout)")
    return out


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
