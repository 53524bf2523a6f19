"""Benchmark: our TV-L1 (CPU, and CUDA when present) against OpenCV's CPU DualTVL1, side by side.

Throughput on real frames (the shared clips resized to 340x256, as TSN extracts flow), same parameters and
the same number of threads for both, then the average endpoint error table on the FlyingChairs pairs.

    .venv/bin/python bench/flow.py                    # 8 pairs, batch 4, 2 threads, + FlyingChairs table
    .venv/bin/python bench/flow.py --pairs 16 --batch 8 --no-chairs
    .venv/bin/python bench/flow.py --cuda-batch 64    # on a GPU machine

Compilation (first call per shape) is timed separately and excluded from pairs/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Sleep, not spin, in OpenMP barriers: on a CPU shared with other processes a spinning barrier costs a
# scheduler time slice per parallel region (measured here: a 2-thread step took 31 ms instead of 3 ms).
# Must be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.flow.flo import read_flo  # noqa: E402
from pipeline.flow.tvl1 import TVL1Params, opencv_tvl1_flow, to_gray, tvl1_flow  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = ("ucf101/v_BaseballPitch_g01_c01.avi", "kinetics/arm_wrestling_demo.mp4", "kinetics/test.mp4",
         "ucf101/v_ApplyEyeMakeup_g01_c01.avi")


def load_pairs(n_pairs: int, size=(340, 256)) -> tuple[np.ndarray, np.ndarray]:
    """n_pairs consecutive-frame gray pairs (uint8 (N, H, W) each), spread over the shared clips."""
    per_clip = -(-n_pairs // len(CLIPS))
    first, second = [], []
    for clip in CLIPS:
        cap = cv2.VideoCapture(str(SHARED_DATA / "clips" / clip))
        frames = []
        while len(frames) < per_clip + 1:
            ok, frame = cap.read()
            if not ok:
                raise ValueError(f"{clip}: could not decode {per_clip + 1} frames")
            frames.append(to_gray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)))
        cap.release()
        first += frames[:-1]
        second += frames[1:]
    return np.stack(first[:n_pairs]), np.stack(second[:n_pairs])


def time_ours(I0: np.ndarray, I1: np.ndarray, params: TVL1Params, batch: int, device: str) -> tuple[float, float, np.ndarray]:
    """(seconds for the first, compiling call on one batch, pairs/s afterwards, flows (N, 2, H, W))."""
    a = torch.from_numpy(I0).float().to(device)
    b = torch.from_numpy(I1).float().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    tvl1_flow(a[:batch], b[:batch], params)
    if len(a) % batch:
        tvl1_flow(a[: len(a) % batch], b[: len(a) % batch], params)
    sync()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    flows = [tvl1_flow(a[i:i + batch], b[i:i + batch], params) for i in range(0, len(a), batch)]
    sync()
    elapsed = time.perf_counter() - t0
    return warmup, len(a) / elapsed, torch.cat(flows).cpu().numpy()


def time_opencv(I0: np.ndarray, I1: np.ndarray, params: TVL1Params) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    flows = [opencv_tvl1_flow(a, b, params) for a, b in zip(I0, I1)]
    return len(I0) / (time.perf_counter() - t0), np.stack(flows)


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b) ** 2).sum(axis=-3)).mean())


def chairs_table(params: TVL1Params) -> None:
    root = SHARED_DATA / "flow" / "flyingchairs"
    print("\nFlyingChairs average endpoint error (512x384, gray via COLOR_BGR2GRAY, same parameters)")
    print("| pair | OpenCV | ours (fast) | ours / OpenCV | ours vs OpenCV EPE | OpenCV s | ours s |")
    print("|---|---|---|---|---|---|---|")
    for k in range(5):
        a = to_gray(cv2.imread(str(root / f"000000{k}-img0.ppm")))
        b = to_gray(cv2.imread(str(root / f"000000{k}-img1.ppm")))
        gt = read_flo(root / f"000000{k}-gt.flo")
        t0 = time.perf_counter()
        ref = opencv_tvl1_flow(a, b, params)
        t_cv = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = tvl1_flow(torch.from_numpy(a).float(), torch.from_numpy(b).float(), params).numpy()
        t_ours = time.perf_counter() - t0
        e_cv, e_ours = epe(ref, gt), epe(ours, gt)
        print(f"| {k} | {e_cv:.3f} | {e_ours:.3f} | {e_ours / e_cv:.3f} | {epe(ours, ref):.3f} | {t_cv:.1f} | {t_ours:.1f} |",
              flush=True)
    print("(ours s for pair 0 includes compiling the 512x384 shapes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs to time (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per call on CPU (default 4)")
    parser.add_argument("--cuda-batch", type=int, default=64, help="pairs per call on CUDA (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both (default 2)")
    parser.add_argument("--no-chairs", action="store_true", help="skip the FlyingChairs AEE table")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison (e.g. on a GPU box)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    params = TVL1Params()
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, params {params}")
    cuda = torch.cuda.is_available()
    n = max(args.pairs, args.cuda_batch * 2) if cuda else args.pairs
    I0, I1 = load_pairs(n)
    print(f"{n} real frame pairs at 340x256 from {len(CLIPS)} clips")

    if not args.no_cpu:
        m = args.pairs
        cv_rate, ref = time_opencv(I0[:m], I1[:m], params)
        warm, our_rate, ours = time_ours(I0[:m], I1[:m], params, args.batch, "cpu")
        print(f"OpenCV CPU : {cv_rate:7.2f} pairs/s")
        print(f"ours CPU   : {our_rate:7.2f} pairs/s (batch {args.batch}; first call incl. compile {warm:.1f} s)")
        print(f"ratio ours/OpenCV on CPU: {our_rate / cv_rate:.2f}")
        print(f"mean EPE ours vs OpenCV on these pairs: {epe(ours, ref):.4f} px "
              f"(mean |flow| {np.sqrt((ref.astype(np.float64) ** 2).sum(1)).mean():.3f} px)")
    if cuda:
        warm, rate, flows = time_ours(I0, I1, params, args.cuda_batch, "cuda")
        print(f"ours CUDA  : {rate:7.2f} pairs/s on {torch.cuda.get_device_name()} (batch {args.cuda_batch}; "
              f"first call incl. compile {warm:.1f} s)")
        m = min(8, n)
        _, ref = time_opencv(I0[:m], I1[:m], params)
        print(f"mean EPE ours CUDA vs OpenCV on {m} pairs: {epe(flows[:m], ref):.4f} px")
    else:
        print("CUDA: not available on this machine")
    if not args.no_chairs:
        chairs_table(params)


if __name__ == "__main__":
    main()
