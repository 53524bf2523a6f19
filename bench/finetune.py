"""Fine-tuning throughput: model (SGD step) vs data loader, for RGB frames and flow stacks.

    .venv/bin/python bench/finetune.py                      # CPU: resnet18 @ 64 px, resnet101 @ 224 px
    .venv/bin/python bench/finetune.py --device cuda        # GPU (bf16 autocast + channels_last)
    .venv/bin/python bench/finetune.py --configs resnet18:96 resnet50:224 --workers 4
    .venv/bin/python bench/finetune.py --test-pass --configs resnet18:112   # the test pass only

Model throughput: one SGD step (normalise on the device, forward, backward, update) on a batch of uint8
inputs already in memory, timed after warm-up; images/s for RGB, stacks/s for flow (each stack is one
network input of 2L = 20 channels). Loader throughput: the training DataLoader (``TrainClips``: TSN
sampling, read from the store, multi-scale corner crop, resize, flip, collate) over a synthetic store of
JPEG frames / raw flow at the size the configuration expects (short side 256 for 224 px input, the demo's
96x72 for small inputs), with ``--workers`` processes. The loader keeps up when its rate exceeds the
model's. Prints a markdown table for docs/benchmarks.md.

``--test-pass``: milliseconds per video of finetune's test pass (``pipeline.training.loop.predict_videos``:
the views of several videos per forward pass, ``--batch`` views each) against one forward pass per video (what
it did before), on ``--test-videos`` videos of ``--test-views`` views already in memory.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.training import loop as T  # noqa: E402
from pipeline.data.clips import TrainClips, VideoList, input_channels, input_normalizer  # noqa: E402
from pipeline.models.backbones import create_backbone  # noqa: E402
from pipeline.io.store import VideoStore  # noqa: E402


def make_store(root: Path, stream: str, height: int, width: int, videos: int = 6, frames: int = 32,
               backend: str = "zarr") -> VideoStore:
    """Synthetic videos: smooth textures (JPEG like real frames) or raw quantized flow."""
    store = VideoStore(root / stream, backend)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    for v in range(videos):
        with store.writer(f"v{v}") as c:
            if stream == "rgb":
                base = np.stack([(x * 0.7 + y * 0.3 + 40 * c) % 256 for c in range(3)], -1)
                imgs = np.stack([np.roll(base, t, axis=1) for t in range(frames)])
                imgs = (imgs + rng.normal(0, 6, imgs.shape)).clip(0, 255).astype(np.uint8)
                c.write_images("frames", imgs, codec="jpeg")
            else:
                q = rng.integers(100, 156, (frames - 1, height, width, 2), dtype=np.uint8)
                c.write_images("flow", q, codec="raw")
                c.set_attrs({"num_flows": frames - 1, "num_frames": frames, "step": 1, "bound": 20.0})
    return store


def model_rate(arch: str, size: int, stream: str, batch: int, device: torch.device, amp: bool, steps: int) -> float:
    model = create_backbone(arch, num_classes=101, in_channels=input_channels(stream), dropout=0.5).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(T.trainable_param_groups(model, 5e-4), lr=1e-3, momentum=0.9)
    x = torch.randint(0, 256, (batch, 1, input_channels(stream), size, size), dtype=torch.uint8)
    y = torch.randint(0, 101, (batch,))
    loader = [{"input": x, "label": y}]
    norm = input_normalizer(stream)
    T.train_one_epoch(model, loader * 2, opt, device=device, loss_fn=T.segment_consensus_loss(norm, amp))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    st = T.train_one_epoch(model, loader * steps, opt, device=device, loss_fn=T.segment_consensus_loss(norm, amp))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return st["frames"] / st["seconds"]


def loader_rate(store: VideoStore, stream: str, size: int, batch: int, workers: int, seconds: float) -> float:
    ids = tuple(store.video_ids())
    n = 32
    videos = VideoList(ids, (0,) * len(ids), (n,) * len(ids))
    ds = TrainClips(store, videos, stream, num_segments=1, input_size=size)
    sampler = T.EpochBatches(len(ds) * 1000, batch)  # indices wrap around the few stored videos
    ds_len = len(ds)

    class Wrap(torch.utils.data.Dataset):
        def __getitem__(self, key):
            i, e = key
            return ds[(i % ds_len, e)]

    dl = DataLoader(Wrap(), batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    it = iter(dl)
    next(it)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        count += len(next(it)["label"])
    return count / (time.perf_counter() - t0)


def test_pass_ms(arch: str, size: int, stream: str, device: torch.device, amp: bool, videos: int, views: int,
                 chunk: int) -> tuple[float, float]:
    """(ms per video one video per forward pass, ms per video with predict_videos), best of 2."""
    model = create_backbone(arch, num_classes=101, in_channels=input_channels(stream)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    items = [{"input": torch.randint(0, 256, (views, input_channels(stream), size, size), dtype=torch.uint8,
                                     generator=g), "index": i} for i in range(videos)]
    norm = input_normalizer(stream)

    def one_per_pass():
        with torch.no_grad():
            for item in items:
                with T.autocast(device, amp):
                    model(norm(item["input"].to(device))).float().cpu()

    def batched():
        with torch.no_grad():
            T.predict_videos(model, items, videos, 101, device=device, normalize=norm, amp=amp, chunk=chunk)

    out = []
    for fn in (one_per_pass, batched):
        fn() if device.type == "cuda" else None  # warm-up
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out.append(1000 * best / videos)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", nargs="+", default=None, help="arch:size pairs (default by device)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: 32 on GPU, 16 on CPU)")
    ap.add_argument("--steps", type=int, default=0, help="timed SGD steps (default: 20 on GPU, 3 on CPU)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--loader-seconds", type=float, default=5.0)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--test-pass", action="store_true", help="time the test pass only (see above)")
    ap.add_argument("--test-videos", type=int, default=64)
    ap.add_argument("--test-views", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    configs = args.configs or (["resnet18:112", "resnet101:224", "inception_v3:299"] if gpu
                               else ["resnet18:64", "resnet101:224"])
    batch = args.batch or (32 if gpu else 16)
    steps = args.steps or (20 if gpu else 3)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {batch}; loader workers {args.workers}; torch {torch.__version__}\n")
    if args.test_pass:
        print(f"| device | arch | input | stream | views | one video per pass (ms/video) | {batch} views per pass "
              "(ms/video) |\n|---|---|---|---|---|---|---|")
        for cfg in configs:
            arch, size = cfg.split(":")
            for stream in ("rgb", "flow"):
                one, many = test_pass_ms(arch, int(size), stream, device, gpu and not args.no_amp, args.test_videos,
                                         args.test_views, batch)
                print(f"| {device.type} | {arch} | {size} | {stream} | {args.test_views} | {one:.1f} | {many:.1f} |",
                      flush=True)
        return
    print("| device | arch | input | stream | model (SGD step) /s | loader /s | loader keeps up |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict = {}
        for cfg in configs:
            arch, size = cfg.split(":")
            size = int(size)
            h, w = (256, 340) if size > 128 else (72, 96)
            for stream in ("rgb", "flow"):
                if (stream, h) not in stores:
                    stores[(stream, h)] = make_store(Path(tmp) / f"{h}", stream, h, w)
                m = model_rate(arch, size, stream, batch, device, gpu and not args.no_amp, steps)
                lr = loader_rate(stores[(stream, h)], stream, size, batch, args.workers, args.loader_seconds)
                unit = "images" if stream == "rgb" else "stacks"
                print(f"| {device.type} | {arch} | {size} | {stream} | {m:.1f} {unit} | {lr:.1f} {unit} | "
                      f"{'yes' if lr >= m else 'no'} ({lr / m:.1f}x) |", flush=True)


if __name__ == "__main__":
    main()
