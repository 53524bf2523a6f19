"""Decode benchmark: decoder speed, decode + resize + store frames/s per core, and frame-store size / read speed.

    .venv/bin/python bench/decode.py [--clips DIR] [--repeat 3]

Runs on one core (torch/cv2 threads set to 1) over the UCF101-format clips in ../shared/data/clips/ucf101
(XviD AVI 320x240, resized to short side 256 -> 340x256) and the Kinetics H.264 clips. Prints a markdown
table for docs/benchmarks.md and docs/formats.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.io.store import VideoStore, read_frames  # noqa: E402
from pipeline.data.video import decode_video, resized_size  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def cv2_decode(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n += 1
    return n


def pyav_default(path):
    with av.open(str(path)) as c:
        return sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, default=SHARED)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not args.clips.is_dir():
        sys.exit(f"clips folder {args.clips} not found (../shared/data/clips)")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ucf = sorted((args.clips / "ucf101").glob("*.avi"))
    kin = sorted((args.clips / "kinetics").glob("*.mp4"))

    print("## Decoders, one core (frames/s, best of", args.repeat, ")\n")
    print("| clip | frames | cv2 (BGR, source size) | PyAV to_ndarray rgb24 | ours: PyAV + one reformatter, "
          "resize to short side 256 |")
    print("|---|---|---|---|---|")
    for path in ucf + kin:
        t_cv, n = best(lambda: cv2_decode(path), args.repeat)
        t_av, _ = best(lambda: pyav_default(path), args.repeat)
        t_us, v = best(lambda: decode_video(path, short_side=256), args.repeat)
        print(f"| {path.name} | {n} | {n / t_cv:.0f} | {n / t_av:.0f} | {n / t_us:.0f} "
              f"({v.frames.shape[2]}x{v.frames.shape[1]}) |")

    print("\n## Decode + resize + store, one core (frames/s), and store size / read speed\n")
    print("| codec | backend | decode+resize+store frames/s | bytes/frame (340x256) | "
          "read: 8 random frames of a video, frames/s | read: whole video, frames/s |")
    print("|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    rng = np.random.default_rng(0)
    try:
        for codec in ("jpeg", "raw"):
            for backend in ("zarr", "h5"):
                store = VideoStore(tmp / f"{codec}-{backend}", backend)
                frames_total, t_write = 0, 0.0
                for path in ucf:
                    def work():
                        v = decode_video(path, short_side=256)
                        with store.writer(path.stem) as w:
                            w.write_images("frames", v.frames, codec=codec, quality=95)
                        return len(v.frames)
                    t, n = best(work, args.repeat)
                    t_write += t
                    frames_total += n
                size = sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file())
                t_rand = t_all = 0.0
                n_rand = n_all = 0
                for path in ucf:
                    n = read_frames(store, path.stem, [0]).shape[0] and \
                        len(decode_video(path, short_side=256, max_frames=0).frames)
                    idx = sorted(rng.choice(n, size=8, replace=False).tolist())
                    t, _ = best(lambda: read_frames(store, path.stem, idx), args.repeat)
                    t_rand += t
                    n_rand += 8
                    t, _ = best(lambda: read_frames(store, path.stem), args.repeat)
                    t_all += t
                    n_all += n
                print(f"| {codec} | {backend} | {frames_total / t_write:.0f} | {size / frames_total:,.0f} | "
                      f"{n_rand / t_rand:.0f} | {n_all / t_all:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w, h = resized_size(320, 240, 256)
    print(f"\nraw uint8 frame at {w}x{h}: {w * h * 3:,} bytes uncompressed")


if __name__ == "__main__":
    main()
