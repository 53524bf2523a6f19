"""Write ``bench/data/gpu_check.npz``: the real data ``bench/gpu_check.py`` carries to the GPU machine.

The GPU machine has no ``../shared/data`` and no ``cv2.optflow`` (its OpenCV is the plain headless
build), so the flow section's accuracy figures need their inputs and references made here:

* ``pairs0``, ``pairs1``: (N, 256, 340) uint8 gray consecutive-frame pairs from the shared clips, resized
  to 340x256 as TSN extracts flow (``cv2.INTER_AREA``, gray by :func:`pipeline.flow.tvl1.to_gray`),
  spread over the clips and over each clip's length;
* ``cv_flow``: (K, 2, 256, 340) float16 OpenCV DualTVL1 flows of the first K pairs (default parameters);
* ``chairs0``, ``chairs1``: (5, 384, 512) uint8 gray FlyingChairs pairs, ``chairs_gt`` (5, 2, 384, 512)
  float32 ground truth and ``chairs_cv`` float16 OpenCV flows of them.

The OpenCV arrays are left out when ``cv2.optflow`` is missing. About 15 MB compressed (the carry limit is
64 MiB). ``bench/data/`` is git-ignored: run this before a GPU check, then carry ``bench/data``.

    .venv/bin/python bench/make_gpu_check_data.py              # 64 pairs, OpenCV flows of 8 (~35 s on 2 cores)
    .venv/bin/python bench/make_gpu_check_data.py --pairs 32 --cv-pairs 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.flow.flo import read_flo  # noqa: E402
from pipeline.flow.tvl1 import TVL1Params, opencv_tvl1_flow, to_gray  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "gpu_check.npz"
# ../shared/data beside the checkout (or beside a folder above it, for a worktree)
DEFAULT_SHARED = next((d / "shared" / "data" for d in HERE.parents if (d / "shared" / "data").is_dir()),
                      HERE.parents[1] / "shared" / "data")
SIZE = (340, 256)  # (width, height), as cv2.resize takes it


def clip_pairs(path: Path, count: int, size=SIZE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` consecutive-frame gray pairs from ``path``, their first frames evenly spread over the clip."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(to_gray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)))
    cap.release()
    if len(frames) < 2:
        raise ValueError(f"{path}: fewer than 2 decodable frames")
    starts = np.linspace(0, len(frames) - 2, count).round().astype(int)
    return [frames[s] for s in starts], [frames[s + 1] for s in starts]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--pairs", type=int, default=64, help="real 340x256 pairs (spread over the clips)")
    ap.add_argument("--cv-pairs", type=int, default=8, help="of them, how many get OpenCV flows")
    ap.add_argument("--no-opencv", action="store_true", help="leave the OpenCV flows out")
    a = ap.parse_args(argv)

    import cv2

    clips = sorted(p for p in (a.shared / "clips").rglob("*") if p.suffix in (".avi", ".mp4"))
    if not clips:
        raise SystemExit(f"no clips under {a.shared / 'clips'}")
    per = -(-a.pairs // len(clips))
    first, second = [], []
    for clip in clips:
        f0, f1 = clip_pairs(clip, per)
        first += f0
        second += f1
    # interleave the clips so that any prefix of the pairs mixes them
    order = np.argsort(np.arange(len(first)) % per, kind="stable")[:a.pairs]
    out: dict[str, np.ndarray] = {"pairs0": np.stack(first)[order], "pairs1": np.stack(second)[order],
                                  "clips": np.array([str(c.relative_to(a.shared)) for c in clips])}
    chairs = a.shared / "flow" / "flyingchairs"
    ids = sorted(p.name[:7] for p in chairs.glob("*-img0.ppm"))
    if ids:
        out["chairs0"] = np.stack([to_gray(cv2.imread(str(chairs / f"{k}-img0.ppm"))) for k in ids])
        out["chairs1"] = np.stack([to_gray(cv2.imread(str(chairs / f"{k}-img1.ppm"))) for k in ids])
        out["chairs_gt"] = np.stack([read_flo(chairs / f"{k}-gt.flo").astype(np.float32) for k in ids])

    have_cv = hasattr(cv2, "optflow") and not a.no_opencv
    if have_cv:
        params = TVL1Params()
        t0 = time.perf_counter()
        k = min(a.cv_pairs, a.pairs)
        out["cv_flow"] = np.stack([opencv_tvl1_flow(x, y, params) for x, y in
                                   zip(out["pairs0"][:k], out["pairs1"][:k])]).astype(np.float16)
        if ids:
            out["chairs_cv"] = np.stack([opencv_tvl1_flow(x, y, params) for x, y in
                                         zip(out["chairs0"], out["chairs1"])]).astype(np.float16)
        print(f"OpenCV DualTVL1 flows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    else:
        print("cv2.optflow missing: no OpenCV reference flows written", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(".tmp-" + a.out.name)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **out)
    tmp.replace(a.out)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB): {shapes}")


if __name__ == "__main__":
    main()
