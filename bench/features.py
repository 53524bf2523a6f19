"""End-to-end feature extraction speed: read + decode + crop + forward (both streams) + write, in frames/s.

Builds a synthetic frame store (JPEG-in-array, as ``decode`` writes by default) and flow store (raw uint8)
of ``--videos`` clips at 340x256, then runs the extract-features engine (``pipeline.features.extract``
and ``write_part``, the code the stage runs) with random backbones (weights do not change the speed).
"frames" counts network inputs: RGB frames plus flow stacks (one forward each). Prints a markdown table.

    .venv/bin/python bench/features.py                     # CPU: resnet18 @ 112 and resnet101 @ 224
    .venv/bin/python bench/features.py --device cuda       # adds ResNet-101 @ 224 on the GPU (AMP, nvJPEG)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.store import VideoStore, encode_jpeg_frames  # noqa: E402
from pipeline.features import StreamSource, build_backbone, extract, write_part  # noqa: E402

WIDTH, HEIGHT = 340, 256


def make_stores(root: Path, videos: int, frames: int, *, height: int = HEIGHT, width: int = WIDTH,
                backend: str = "zarr", threads: int | None = None) -> tuple[VideoStore, VideoStore, list[tuple[str, int]]]:
    """Frame (JPEG q95) and flow (raw uint8) stores of synthetic videos, made in ``threads`` threads: a smooth
    moving pattern with fixed noise (JPEG sizes like real frames), smooth flow with noise."""
    fstore, flstore = VideoStore(root / "frames", backend), VideoStore(root / "flow", backend)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 6, (height, width + frames, 3)).astype(np.float32)
    fnoise = rng.integers(-2, 3, (height, width + frames, 2)).astype(np.int16)
    y, x = np.mgrid[0:height, 0:width + frames].astype(np.float32)

    def make(v: int):
        base = (np.sin(x / (17 + v)) * 60 + np.cos(y / 23) * 50 + 128)[..., None] + noise
        base = np.concatenate([base[..., :1], np.roll(base[..., 1:2], 7, 0), np.roll(base[..., 2:], 13, 1)], -1)
        base = np.clip(base, 0, 255).astype(np.uint8)
        rgb = np.stack([base[:, t:t + width] for t in range(frames)])  # the pattern moves 1 px a frame
        fbase = np.clip(128 + (20 * np.sin(x / 31 + v))[..., None].astype(np.int16) + fnoise, 0, 255)
        flow = np.stack([fbase[:, t:t + width] for t in range(frames - 1)]).astype(np.uint8)
        return v, encode_jpeg_frames(rgb), flow

    jobs = []
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # JPEG encoding releases the GIL
        for v, (data, offsets), flow in pool.map(make, range(videos)):
            vid = f"C{v % 8}/v_{v:04d}"
            with fstore.writer(vid) as c:
                c.write_encoded_images("frames", [data[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])])
                c.set_attrs({"num_frames": frames})
            with flstore.writer(vid) as c:
                c.write_images("flow", flow, codec="raw")
                c.set_attrs({"num_flows": frames - 1, "num_frames": frames, "step": 1, "bound": 20.0})
            jobs.append((vid, frames))
    return fstore, flstore, jobs


def sources(arch: str, size: int, L: int = 10) -> dict[str, StreamSource]:
    nf = 512 if arch in ("resnet18", "resnet34") else 2048
    return {"rgb": StreamSource("rgb", arch, "none", None, None, 3, size, 0, nf),
            "flow": StreamSource("flow", arch, "none", None, None, 2 * L, size, L, nf)}


def run(arch: str, size: int, device: str, fstore, flstore, jobs, parts_root: Path, *, positions: int,
        batch_size: int, workers: int, amp: bool) -> dict:
    src = sources(arch, size)
    models = {s: build_backbone(x, device) for s, x in src.items()}
    if device.startswith("cuda") and amp:
        models = {s: m.to(memory_format=torch.channels_last) for s, m in models.items()}
    # float32: a random ResNet-101 with identity BatchNorm statistics overflows float16 (trained ones do not).
    kw = dict(num_positions=positions, views=1, dtype="float32", device=device, batch_size=batch_size,
              workers=workers, amp=amp)
    # Warm-up on the first video (allocator, cuDNN, thread pools), not timed.
    for _ in extract(jobs[:1], fstore, flstore, src, models, **kw):
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    parts = VideoStore(parts_root, "h5")
    t0 = time.perf_counter()
    inputs = 0
    for vid, vf, err, _ in extract(jobs, fstore, flstore, src, models, **kw):
        if err:
            raise RuntimeError(f"{vid}: {err}")
        write_part(parts, vf)
        inputs += vf.inputs
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    shutil.rmtree(parts_root, ignore_errors=True)
    return {"arch": arch, "size": size, "device": device, "videos": len(jobs), "inputs": inputs,
            "seconds": seconds, "fps": inputs / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to add the GPU rows")
    ap.add_argument("--positions", type=int, default=45)
    ap.add_argument("--frames", type=int, default=64, help="frames per synthetic video")
    ap.add_argument("--cpu-videos", type=int, default=2)
    ap.add_argument("--gpu-videos", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--no-amp", action="store_true")
    a = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    rows = []
    try:
        n = max(a.cpu_videos, a.gpu_videos if a.device.startswith("cuda") else 0)
        t0 = time.perf_counter()
        fstore, flstore, jobs = make_stores(root, n, a.frames)
        print(f"built {n} videos x {a.frames} frames ({WIDTH}x{HEIGHT}) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        common = dict(positions=a.positions, batch_size=a.batch_size, workers=a.workers, amp=not a.no_amp)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        rows.append(run("resnet18", 112, "cpu", fstore, flstore, jobs[:a.cpu_videos], root / "p", **common))
        rows.append(run("resnet101", 224, "cpu", fstore, flstore, jobs[:a.cpu_videos], root / "p", **common))
        if a.device.startswith("cuda"):
            rows.append(run("resnet101", 224, a.device, fstore, flstore, jobs[:a.gpu_videos], root / "p", **common))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else ""
    print(f"\nextract-features end to end (read + JPEG/flow decode + crop + forward of both streams + write), "
          f"P = {a.positions}, 1 view, {WIDTH}x{HEIGHT} frames, float32 parts (random weights); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads{', ' + gpu if gpu else ''}\n")
    print("| backbone | input | device | videos | inputs (RGB + flow) | seconds | frames/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['size']}x{r['size']} | {r['device']} | {r['videos']} | {r['inputs']} | "
              f"{r['seconds']:.2f} | {r['fps']:.0f} |")


if __name__ == "__main__":
    main()
