"""Benchmark: the extract-flow stage's TV-L1 path against OpenCV's CPU DualTVL1, side by side.

Throughput on real frames (consecutive frames of the shared clips resized to 340x256, as TSN extracts flow),
same parameters and the same number of threads for both. Ours is timed through
``pipeline.flow.extract.flow_codes``, the function extract-flow runs per batch (TV-L1 + uint8 quantization),
for each batch size in ``--batch-sizes`` (the stage's default batch marked), then the average endpoint error
table on the FlyingChairs pairs.

    .venv/bin/python bench/flow.py                           # 16 pairs, batches 1,2,4,8,16, + FlyingChairs
    .venv/bin/python bench/flow.py --pairs 32 --batch-sizes 4,32 --no-chairs
    .venv/bin/python bench/flow.py --cuda-batch-sizes 32,64,128   # on a GPU machine

Compilation (first calls per shape) is timed separately and excluded from pairs/s.
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

from pipeline.flow.extract import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, flow_codes  # noqa: E402
from pipeline.flow.flo import read_flo  # noqa: E402
from pipeline.flow.quantize import DEFAULT_BOUND, dequantize_flow, quantize_flow  # noqa: E402
from pipeline.flow.tvl1 import TVL1Params, opencv_tvl1_flow, to_gray, tvl1_flow  # noqa: E402

# ../shared beside the checkout; PIPELINE_SHARED overrides it (as in tests/conftest.py).
SHARED_DATA = Path(os.environ.get("PIPELINE_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "data"
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


def time_stage_path(I0: np.ndarray, I1: np.ndarray, params: TVL1Params, batch: int, device: str,
                    kernel: str = "auto") -> tuple[float, dict, np.ndarray]:
    """(pairs/s of extract-flow's per-batch function over all pairs, work counters, uint8 codes (N, 2, H, W))."""
    a = torch.from_numpy(I0).float()
    b = torch.from_numpy(I1).float()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    codes, rows, iters = [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(a), batch):
        stats: dict = {}
        codes.append(flow_codes(a[i:i + batch], b[i:i + batch], params, bound=DEFAULT_BOUND, kernel=kernel,
                                device=device, stats=stats))
        rows += stats["rows"]
        iters += int(stats["pair_iterations"].sum())
    sync()
    elapsed = time.perf_counter() - t0
    return len(a) / elapsed, {"rows": rows, "pair_iterations": iters, "kernel": stats["kernel"]}, np.concatenate(codes)


def warm_up(I0: np.ndarray, I1: np.ndarray, params: TVL1Params, device: str, kernel: str = "auto") -> float:
    """Seconds for the compiling first calls: B = 1 and B = 2 (every larger batch reuses the dynamic-B graphs)."""
    t0 = time.perf_counter()
    for n in (1, 2):
        flow_codes(torch.from_numpy(I0[:n]).float(), torch.from_numpy(I1[:n]).float(), params,
                   bound=DEFAULT_BOUND, kernel=kernel, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


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
        print(f"| {k} | {e_cv:.3f} | {e_ours:.3f} | {e_ours / e_cv:.3f} | {epe(ours, ref):.3f} | {t_cv:.1f} | "
              f"{t_ours:.1f} |", flush=True)
    print("(ours s for pair 0 includes compiling the 512x384 shapes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="frame pairs to time on CPU (default 16)")
    parser.add_argument("--batch-sizes", default=f"1,2,{CPU_BATCH_SIZE},8,16",
                        help="CPU pairs per call to time (default 1,2,4,8,16)")
    parser.add_argument("--cuda-batch-sizes", default=f"32,{CUDA_BATCH_SIZE},128",
                        help="CUDA pairs per call to time (default 32,64,128)")
    parser.add_argument("--kernel", default="auto", help="auto|triton|compile|eager (default auto)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both (default 2)")
    parser.add_argument("--no-chairs", action="store_true", help="skip the FlyingChairs AEE table")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison (e.g. on a GPU box)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    params = TVL1Params()
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, OpenCV {cv2.__version__}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, params {params}")
    cuda = torch.cuda.is_available()
    cuda_batches = [int(x) for x in args.cuda_batch_sizes.split(",")] if cuda else []
    n = max([args.pairs, *(2 * b for b in cuda_batches)])
    I0, I1 = load_pairs(n)
    print(f"{n} real frame pairs at 340x256 from {len(CLIPS)} clips")
    have_opencv = hasattr(cv2, "optflow")

    if not args.no_cpu:
        m = args.pairs
        if have_opencv:
            cv_rate, ref = time_opencv(I0[:m], I1[:m], params)
            print(f"OpenCV CPU DualTVL1: {cv_rate:7.2f} pairs/s on {m} pairs")
        else:
            cv_rate, ref = None, None
            print("OpenCV: cv2.optflow is absent (opencv-contrib not installed): no side-by-side figure")
        print(f"ours CPU, first calls (compile, B = 1 and 2): {warm_up(I0, I1, params, 'cpu', args.kernel):.1f} s")
        print("| batch | pairs/s | ours / OpenCV | pair-iterations per pair | rows / pair-iterations |")
        print("|---|---|---|---|---|")
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            rate, work, codes = time_stage_path(I0[:m], I1[:m], params, batch, "cpu", args.kernel)
            mark = " (stage default)" if batch == CPU_BATCH_SIZE else ""
            ratio = f"{rate / cv_rate:.2f}" if cv_rate else "-"
            print(f"| {batch}{mark} | {rate:.2f} | {ratio} | {work['pair_iterations'] / m:.0f} | "
                  f"{work['rows'] / max(work['pair_iterations'], 1):.3f} |", flush=True)
        print(f"(kernel {work['kernel']})")
        if ref is not None:
            ours = dequantize_flow(codes, DEFAULT_BOUND)
            print(f"mean EPE ours (quantized, last batch size) vs OpenCV on these pairs: {epe(ours, ref):.4f} px "
                  f"(quantization step {2 * DEFAULT_BOUND / 255:.3f} px; same codes as OpenCV's quantized flow: "
                  f"{(codes == quantize_flow(ref, DEFAULT_BOUND)).mean():.1%}; "
                  f"mean |flow| {np.sqrt((ref.astype(np.float64) ** 2).sum(1)).mean():.3f} px)")
    if cuda:
        print(f"ours CUDA first calls (compile): {warm_up(I0, I1, params, 'cuda', args.kernel):.1f} s")
        for batch in cuda_batches:
            rate, work, codes = time_stage_path(I0, I1, params, batch, "cuda", args.kernel)
            print(f"ours CUDA : {rate:8.2f} pairs/s on {torch.cuda.get_device_name()} (batch {batch}, kernel "
                  f"{work['kernel']})", flush=True)
        m = min(8, n)
        if have_opencv:
            _, ref = time_opencv(I0[:m], I1[:m], params)
            print(f"mean EPE ours CUDA (quantized) vs OpenCV on {m} pairs: "
                  f"{epe(dequantize_flow(codes[:m], DEFAULT_BOUND), ref):.4f} px")
    else:
        print("CUDA: not available on this machine (unmeasured on GPU)")
    if not args.no_chairs and have_opencv:
        chairs_table(params)


if __name__ == "__main__":
    main()
