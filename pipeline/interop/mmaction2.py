"""The cache in mmaction2's layout: a rawframes tree, the split lists, and per-video feature files.

``<out>/rawframes/<Class>/<video>/img_%05d.jpg`` with ``flow_x_%05d.jpg`` / ``flow_y_%05d.jpg`` (1-based,
flow ``k`` from frame ``k`` to ``k + step``): frames stored as JPEG are copied byte for byte, raw frames are
encoded; flow codes are written as grayscale JPEGs. ``<out>/{dataset}_{train,val}_split_{k}_rawframes.txt``:
lines ``Class/video total_frames label`` (mmaction2 calls the test list ``val``; train is the official
training list, i.e. our train and validation hold-out together). ``<out>/features/<scope>/<stream>/<video>.npy``:
float32 (positions, D) per video and stream (the centre view of a 10-view store), for temporal-localization
tools. ``import-rawframes --layout mmaction2`` with the exported lists reads the tree back.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.data.table import VideoTable
from pipeline.io import artifacts
from pipeline.io.atomic import atomic_dir, write_text
from pipeline.interop.rawframes import LAYOUTS
from pipeline.stage.declare import load_upstream
from pipeline.stage.errors import StageError
from pipeline.stage.manifest import finished_outputs

log = logging.getLogger("pipeline")

WHAT = ("frames", "flow", "lists", "features")
RAWFRAMES_DIR = "rawframes"
FEATURES_DIR = "features"


def dataset_name(cache_root: Path, table: VideoTable) -> str:
    """The dataset's name in list file names: decode's --dataset (ucf101 / hmdb51 for an import labelled by
    the official split files)."""
    if table.dataset != "rawframes":
        return table.dataset
    params = artifacts.manifest_params(Path(cache_root) / artifacts.DECODE)
    labels = params.get("rawframes_labels") or "lists"
    return labels if labels != "lists" else "rawframes"


def export_dirs(table: VideoTable) -> list[str]:
    """``Class/video`` of every video (its folder in the exported tree and its name in the lists)."""
    rels = [f"{table.classes[lab]}/{vid.rsplit('/', 1)[-1]}" for vid, lab in zip(table.video_ids, table.labels)]
    seen: dict[str, str] = {}
    for rel, vid in zip(rels, table.video_ids):
        if rel in seen:
            raise StageError(f"videos {seen[rel]} and {vid} would both be exported as {rel}")
        seen[rel] = vid
    return rels


def _write_video(folder: Path, frames: list[bytes] | None, flow_x: list[bytes] | None,
                 flow_y: list[bytes] | None) -> None:
    lay = LAYOUTS["mmaction2"]
    with atomic_dir(folder) as tmp:
        tmp.mkdir(parents=True)
        for i, b in enumerate(frames or []):
            (tmp / lay.frame_name(i + 1)).write_bytes(b)
        for axis, images in enumerate((flow_x, flow_y)):
            for i, b in enumerate(images or []):
                (tmp / lay.flow_name(axis, i + 1)).write_bytes(b)


def _frame_jpegs(store, vid: str, quality: int) -> list[bytes]:
    import cv2

    with store.reader(vid) as r:
        if r.image_codec("frames") == "jpeg" and r.jpeg_planes("frames") == 1:
            return r.encoded_images("frames")
        rgb = r.read_images("frames").numpy()
    out = []
    for f in rgb:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        out.append(buf.tobytes())
    return out


def _flow_jpegs(store, vid: str, quality: int) -> tuple[list[bytes], list[bytes]]:
    import cv2

    from pipeline.flow.stored import read_flow

    with store.reader(vid) as r:
        if r.image_codec("flow") == "jpeg" and r.jpeg_planes("flow") == 2:  # stored x / y JPEGs, as they are
            images = r.encoded_images("flow")
            return images[0::2], images[1::2]
    q = read_flow(store, vid, dequantize=False).numpy()  # (k, H, W, 2) uint8 codes
    params = [int(cv2.IMWRITE_JPEG_QUALITY), quality]
    xs = [cv2.imencode(".jpg", np.ascontiguousarray(f[..., 0]), params)[1].tobytes() for f in q]
    ys = [cv2.imencode(".jpg", np.ascontiguousarray(f[..., 1]), params)[1].tobytes() for f in q]
    return xs, ys


def _export_features(cache_root: Path, key: str, out: Path, table: VideoTable, rels: list[str]) -> int:
    """One (positions, D) float32 .npy per video and stream of a finished extract-features output."""
    from pipeline.io.store import decode_strings, open_feature_store

    path = artifacts.feature_store_file(Path(cache_root) / key)
    r = open_feature_store(path)
    name_of = dict(zip(table.video_ids, (rel.rsplit("/", 1)[-1] for rel in rels)))
    written = 0
    try:
        attrs = r.attrs
        views = list(attrs.get("view_names") or ["center"])
        centre = views.index("center") if "center" in views else 0
        ids = decode_strings(r["video_ids"][...]).ravel().tolist()
        folder = out / FEATURES_DIR / artifacts.split_key(key)[1]
        for stream in attrs.get("streams", []):
            arr = r[f"streams/{stream}"]
            (folder / stream).mkdir(parents=True, exist_ok=True)
            for i, vid in enumerate(ids):
                feats = np.asarray(arr[i])[:, centre, :].astype(np.float32)  # (P, D)
                target = folder / stream / f"{name_of.get(vid, vid.rsplit('/', 1)[-1])}.npy"
                with atomic_dir(target) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, feats)
                written += 1
    finally:
        r.close()
    return written


def export_mmaction2(cache_root: Path, out: Path, what: Sequence[str] | None = None, *, name: str | None = None,
                     quality: int = 95, progress: Callable | None = None) -> dict:
    """Write the cache's outputs under ``out`` in mmaction2's layout (module docstring); returns counts.

    ``what``: any of ``frames, flow, lists, features`` (default: each one the cache has). Video folders that
    exist in ``out`` are kept (a re-run completes an interrupted export); nothing is deleted.
    """
    cache_root, out = Path(cache_root), Path(out)
    asked = what is not None
    what = list(WHAT if what is None else what)
    bad = [w for w in what if w not in WHAT]
    if bad:
        raise StageError(f"--what: unknown part(s) {', '.join(bad)}; choose from {', '.join(WHAT)}")
    load_upstream(cache_root, [artifacts.DECODE], "export")
    has_flow = bool(finished_outputs(cache_root, artifacts.FLOW))
    scopes = list(finished_outputs(cache_root, artifacts.FEATURES))
    if "flow" in what and not has_flow:
        if asked:
            load_upstream(cache_root, [artifacts.FLOW], "export")
        what.remove("flow")
    if "features" in what and not scopes:
        if asked:
            raise StageError(f"export --what features: no finished extract-features output in {cache_root}; run "
                             "`pipeline extract-features` first")
        what.remove("features")
    table = VideoTable.load(cache_root / artifacts.DECODE)
    rels = export_dirs(table)
    counts = {"videos": 0, "kept": 0, "lists": 0, "features": 0}
    if "frames" in what or "flow" in what:
        frames = artifacts.frame_store(cache_root / artifacts.DECODE)
        flows = artifacts.flow_store(cache_root / artifacts.FLOW) if "flow" in what else None
        flow_ids = set(flows.video_ids()) if flows is not None else set()
        for vid, rel in zip(table.video_ids, rels):
            folder = out / RAWFRAMES_DIR / rel
            if folder.exists():
                counts["kept"] += 1
            else:
                fr = _frame_jpegs(frames, vid, quality) if "frames" in what else None
                fx, fy = _flow_jpegs(flows, vid, quality) if vid in flow_ids else (None, None)
                _write_video(folder, fr, fx, fy)
                counts["videos"] += 1
            if progress is not None:
                progress(1)
    if "lists" in what:
        ds_name = name or dataset_name(cache_root, table)
        for sid, membership in sorted(table.splits.items()):
            for part, wanted in (("train", {"train", "val"}), ("val", {"test"})):
                lines = [f"{rel} {n} {lab}" for rel, n, lab, m in zip(rels, table.num_frames, table.labels, membership)
                         if m in wanted]
                write_text(out / f"{ds_name}_{part}_split_{sid}_rawframes.txt", "".join(f"{x}\n" for x in lines))
                counts["lists"] += 1
        write_text(out / "classes.txt", "".join(f"{c}\n" for c in table.classes))
    if "features" in what:
        for key in scopes:
            counts["features"] += _export_features(cache_root, key, out, table, rels)
    counts["what"] = what
    return counts
