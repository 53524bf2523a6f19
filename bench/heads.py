"""Training throughput of a temporal head on synthetic in-memory features (not a test).

Default: the paper's STFN head (arch a, avg fusion, bi-directional, N = 7 segments) at UCF101
split-1 scale: 9,537 training videos, 2 x 2048-d features at P = 25 positions, 101 classes,
batch 32, RMSProp. Prints videos/s for one training epoch (pipeline.training.heads.train_head_epoch)
and for test-time prediction (5 sequences per video).

``--device auto`` (the default) runs on CUDA when present, else on the CPU; ``all`` runs both. On CUDA
the default is the full epoch; on the CPU, where a full epoch takes minutes, ``--cpu-videos`` (256)
videos, and the full-epoch time is extrapolated linearly (videos / throughput) and printed as such.
``--videos`` sets the count on every device.

    .venv/bin/python bench/heads.py                       # CUDA full epoch, or 256 videos on the CPU
    .venv/bin/python bench/heads.py --videos 256 --device cpu
    .venv/bin/python bench/heads.py --device all --videos 9537   # full epoch on both
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.training.heads import predict_views, train_head_epoch  # noqa: E402
from pipeline.models.heads import create_head  # noqa: E402

UCF101_SPLIT1_TRAIN = 9537


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, args: argparse.Namespace) -> dict:
    """Seconds of one training epoch and of test-time prediction on ``args.videos`` synthetic videos."""
    g = torch.Generator(device=device).manual_seed(0)
    v, p, d = args.videos, args.positions, args.dim
    rgb = torch.rand(v, p, d, generator=g, device=device)
    flow = torch.rand(v, p, d, generator=g, device=device)
    labels = torch.randint(0, args.classes, (v,), generator=g, device=device)
    torch.manual_seed(0)
    head = create_head(args.head, num_classes=args.classes, rgb_dim=d, flow_dim=d,
                       num_segments=args.segments).to(device)
    optimizer = torch.optim.RMSprop(head.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    n_params = sum(q.numel() for q in head.parameters())

    # Warm-up (allocator, cuDNN autotuning, lazy init) on a few batches.
    warm = min(v, 4 * args.batch_size)
    train_head_epoch(head, optimizer, rgb[:warm], flow[:warm], labels[:warm],
                     num_segments=args.segments, batch_size=args.batch_size, generator=gen)
    predict_views(head, rgb[:warm], flow[:warm], args.segments, num_test=5, batch_size=256)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        train_head_epoch(head, optimizer, rgb, flow, labels, num_segments=args.segments,
                         batch_size=args.batch_size, generator=gen)
    _sync(device)
    train_s = (time.perf_counter() - t0) / args.epochs

    _sync(device)
    t0 = time.perf_counter()
    predict_views(head, rgb, flow, args.segments, num_test=5, batch_size=256)
    _sync(device)
    test_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "head": args.head, "params": n_params, "segments": args.segments, "positions": p,
            "dim": d, "batch": args.batch_size, "videos": v, "train_seconds": train_s,
            "train_videos_per_s": v / train_s, "test_videos_per_s": v / test_s,
            "epoch_seconds_ucf101": UCF101_SPLIT1_TRAIN * train_s / v}


def bench(device: torch.device, args: argparse.Namespace) -> None:
    r = measure(device, args)
    scale = "" if r["videos"] == UCF101_SPLIT1_TRAIN else f" (extrapolated from {r['videos']} videos)"
    print(f"[{r['device']}] head={r['head']} params={r['params'] / 1e6:.1f}M N={r['segments']} P={r['positions']} "
          f"D={r['dim']} batch={r['batch']}")
    print(f"  train: {r['train_videos_per_s']:,.0f} videos/s; one UCF101 split-1 epoch ({UCF101_SPLIT1_TRAIN} "
          f"videos): {r['epoch_seconds_ucf101']:.2f} s{scale}")
    print(f"  test (5 sequences/video): {r['test_videos_per_s']:,.0f} videos/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", default="stfn")
    ap.add_argument("--videos", type=int, default=None, help="videos per epoch on every device "
                    f"(default: {UCF101_SPLIT1_TRAIN} on CUDA, --cpu-videos on the CPU)")
    ap.add_argument("--cpu-videos", type=int, default=256)
    ap.add_argument("--positions", type=int, default=25)
    ap.add_argument("--segments", type=int, default=7)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", choices=["auto", "all", "cpu", "cuda"], default="auto")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv on CUDA")
    args = ap.parse_args()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            raise SystemExit("CUDA requested but not available")
    for device in devices:
        a = copy.copy(args)
        if a.videos is None:
            a.videos = UCF101_SPLIT1_TRAIN if device.type == "cuda" else a.cpu_videos
        bench(device, a)


if __name__ == "__main__":
    main()
