"""Storage benchmark: bytes per flow pair and files per video for each flow codec, and read speed of the
store format written before issue #13 (format 1, read with that commit's code) against today's.

    .venv/bin/python bench/storage.py [--clips DIR] [--pairs 40] [--repeats 20] [--old-commit 58127eb]

For each UCF101 clip in ../shared/data/clips/ucf101: the first ``--pairs`` + 1 frames resized to 340x256,
OpenCV's DualTVL1OpticalFlow with its default parameters between consecutive frames, quantized with bound
20. The quantized flow is stored per codec (format 1 raw = the old layout; raw, zstd, jpeg q95 of today's format)
in Zarr and HDF5; then read: 8 random flows, a 10-flow stack, the whole video (median of ``--repeats``).
Frames (JPEG q95, 340x256) are read the same way: the old torchvision decode against cv2.imdecode.
Prints markdown tables for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
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


def load_old_store(commit: str):
    """pipeline/io/store.py as of ``commit`` (format 1), imported as a separate module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:pipeline/io/store.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_store.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_store", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_store"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def clip_frames(clip: Path, n: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(clip))
    out = []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(cv2.resize(bgr, (340, 256), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(out)


def tvl1_codes(frames: np.ndarray) -> np.ndarray:
    from pipeline.flow.quantize import quantize_flow
    from pipeline.flow.tvl1 import opencv_tvl1_flow, to_gray

    gray = [to_gray(np.ascontiguousarray(f[..., ::-1])).astype(np.uint8) for f in frames]
    flows = [opencv_tvl1_flow(gray[i], gray[i + 1]) for i in range(len(gray) - 1)]  # (2, H, W) each
    return quantize_flow(np.stack(flows), 20.0).transpose(0, 2, 3, 1).copy()  # (T, H, W, 2) uint8


def store_size(path: Path) -> tuple[int, int]:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, default=SHARED)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--old-commit", default="58127eb")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from pipeline.io import store as new

    old = load_old_store(args.old_commit)
    clips = sorted(args.clips.glob("*.avi"))
    if not clips:
        sys.exit(f"no .avi clips in {args.clips}")
    rng = np.random.default_rng(0)
    rows_size, rows_read, rows_frames = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    for clip in clips:
        frames = clip_frames(clip, args.pairs + 1)
        t = time.perf_counter()
        codes = tvl1_codes(frames)
        print(f"{clip.name}: {len(codes)} TV-L1 pairs at 340x256 in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        T = len(codes)
        eight = sorted(rng.choice(T, 8, replace=False).tolist())
        stack = list(range(T // 2 - 5, T // 2 + 5))
        variants = [("format 1 raw (old)", old, "raw"), ("raw", new, "raw"), ("zstd", new, "zstd"),
                    ("jpeg q95", new, "jpeg")]
        for backend in ("zarr", "h5"):
            for label, mod, codec in variants:
                st = mod.VideoStore(tmp / f"{clip.stem}-{label.split()[0]}-{codec}-{backend}", backend)
                with st.writer("v") as w:
                    w.write_images("flow", codes, codec=codec)
                size, files = store_size(st.path("v"))
                with st.reader("v") as r:
                    got = r.read_images("flow").numpy()
                err = np.abs(got.astype(int) - codes.astype(int))
                rows_size.append((clip.stem, backend, label, size / T / 1e3, files, err.mean() * 40 / 255,
                                  err.max()))

                def read(idx, st=st):
                    with st.reader("v") as r:
                        r.read_images("flow", idx)
                rows_read.append((clip.stem, backend, label, timed(lambda: read(eight), args.repeats),
                                  timed(lambda: read(stack), args.repeats),
                                  timed(lambda: read(None), max(3, args.repeats // 4))))
        # Frames: JPEG q95 in the zarr store, read with the old code (torchvision decode) and the new (cv2).
        for label, mod in (("format 1 (torchvision decode_jpeg)", old), ("format 3 (cv2.imdecode)", new)):
            st = mod.VideoStore(tmp / f"{clip.stem}-frames-{label[:8]}", "zarr")
            with st.writer("v") as w:
                w.write_images("frames", frames, codec="jpeg")
            size, files = store_size(st.path("v"))

            def readf(idx, st=st):
                with st.reader("v") as r:
                    r.read_images("frames", idx)
            rows_frames.append((clip.stem, label, files, timed(lambda: readf(eight), args.repeats),
                                timed(lambda: readf(None), max(3, args.repeats // 4))))
    print("\n| clip | store | codec | KB per flow pair | files per video | mean abs error (px) | max error (codes) |")
    print("|---|---|---|---|---|---|---|")
    for c, b, lab, kb, files, mae, mx in rows_size:
        print(f"| {c} | {b} | {lab} | {kb:.1f} | {files} | {mae:.4f} | {mx} |")
    print(f"\n| clip | store | codec | 8 random flows (ms) | 10-flow stack (ms) | whole video, {T} flows (ms) |")
    print("|---|---|---|---|---|---|")
    for c, b, lab, a, s, w in rows_read:
        print(f"| {c} | {b} | {lab} | {a:.1f} | {s:.1f} | {w:.1f} |")
    print(f"\n| clip | frames (zarr, JPEG q95) | files per video | 8 random frames (ms) | whole video, {T + 1} "
          "frames (ms) |")
    print("|---|---|---|---|---|")
    for c, lab, files, a, w in rows_frames:
        print(f"| {c} | {lab} | {files} | {a:.1f} | {w:.1f} |")
    print(f"\ntorch {torch.__version__}, opencv {cv2.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
