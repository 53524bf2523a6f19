"""Rawframes benchmark: import-rawframes (frames + flow) and export --format mmaction2 speed and store sizes.

    .venv/bin/python bench/rawframes.py [--clips DIR] [--copies 4] [--workers 2]

Builds an mmaction2 tree from the UCF101 clips in ../shared/data/clips/ucf101 (every frame resized to
340x256 and written as JPEG with OpenCV, flows from OpenCV's Farneback quantized with bound 20 and written as
grayscale JPEGs), each clip ``--copies`` times, then times the two stage runs of the import and the export.
Prints a markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "clips" / "ucf101"


def quantize(f: np.ndarray, bound: float = 20.0) -> np.ndarray:
    return np.clip(np.round((f + bound) * 255.0 / (2 * bound)), 0, 255).astype(np.uint8)


def make_tree(root: Path, clips: list[Path], copies: int) -> tuple[int, int]:
    lines, frames_total, flows_total = [], 0, 0
    for label, clip in enumerate(clips):
        cap = cv2.VideoCapture(str(clip))
        frames = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.resize(bgr, (340, 256), interpolation=cv2.INTER_AREA))
        gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
        flows = [quantize(cv2.calcOpticalFlowFarneback(gray[i], gray[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0))
                 for i in range(len(gray) - 1)]
        cls = clip.stem.split("_")[1]
        for c in range(copies):
            name = clip.stem.replace("_c01", f"_c{c + 1:02d}")
            d = root / cls / name
            d.mkdir(parents=True)
            for i, f in enumerate(frames):
                cv2.imwrite(str(d / f"img_{i + 1:05d}.jpg"), f)
            for i, q in enumerate(flows):
                cv2.imwrite(str(d / f"flow_x_{i + 1:05d}.jpg"), np.ascontiguousarray(q[..., 0]))
                cv2.imwrite(str(d / f"flow_y_{i + 1:05d}.jpg"), np.ascontiguousarray(q[..., 1]))
            lines.append((f"{cls}/{name} {len(frames)} {label}\n", label))
            frames_total += len(frames)
            flows_total += len(flows)
    (root / "train.txt").write_text("".join(ln for ln, _ in lines))
    return frames_total, flows_total


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=Path, default=SHARED)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    clips = sorted(args.clips.glob("*.avi"))
    if not clips:
        sys.exit(f"no .avi clips in {args.clips}")
    from pipeline.stage import run_stage  # noqa: F401  (imports torch once, outside the timings)
    from stages.import_rawframes import import_rawframes

    with tempfile.TemporaryDirectory() as tmp:
        tree, cache, out = Path(tmp) / "tree", Path(tmp) / "cache", Path(tmp) / "out"
        frames, flows = make_tree(tree, clips, args.copies)
        d, f, _ = import_rawframes(tree, "mmaction2", cache, train_list=tree / "train.txt", workers=args.workers)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages", "export", "-o", str(out), "--cache-dir", str(cache)],
                       check=True, cwd=ROOT, capture_output=True)
        export_s = time.perf_counter() - t0
        print(f"{len(clips) * args.copies} videos, {frames} frames, {flows} flows (340x256), "
              f"{args.workers} workers\n")
        print("| step | seconds | per second | bytes |")
        print("|---|---|---|---|")
        print(f"| decode --dataset rawframes (frames, JPEG copied) | {d.manifest['seconds']:.2f} | "
              f"{frames / d.manifest['seconds']:.0f} frames/s | {du(cache / 'decode' / 'frames'):,} "
              f"(tree's JPEGs: {sum(p.stat().st_size for p in tree.rglob('img_*.jpg')):,}) |")
        print(f"| extract-flow --backend import (flow codes, raw store) | {f.manifest['seconds']:.2f} | "
              f"{flows / f.manifest['seconds']:.0f} flows/s | {du(cache / 'extract-flow' / 'flow'):,} "
              f"(tree's JPEGs: {sum(p.stat().st_size for p in tree.rglob('flow_*.jpg')):,}) |")
        print(f"| export --format mmaction2 (frames, flow, lists; incl. process start) | {export_s:.2f} | "
              f"{frames / export_s:.0f} frames/s | {du(out):,} |")
        shutil.rmtree(tree)


if __name__ == "__main__":
    main()
