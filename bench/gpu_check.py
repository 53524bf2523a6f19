"""The GPU check: one command that measures every GPU goal of the pipeline and prints one goal table last.

Made for the lent GPU machine (one H100 / H200, 16 cores, offline, 15 minutes at a time): it needs only the
working tree, the machine's own packages (torch, torchvision, numpy, h5py, OpenCV headless) and, for the
flow accuracy figures, ``bench/data/gpu_check.npz`` (``bench/make_gpu_check_data.py`` writes it here). Stores
are HDF5, so neither zarr nor PyAV is needed. docs/gpu.md says how to run it there.

Sections, each in its own process with its own time limit, so that one failure (an exception, a CUDA error
that poisons the context, a hang, a crash) loses only that section; results are recorded as they are
measured, so a section stopped at its limit keeps what it had:

* ``env``: versions, packages, the GPU; device-to-device copy bandwidth, pinned host-to-device bandwidth,
  bf16 matrix product rate.
* ``flow``: TV-L1 (:func:`pipeline.flow.tvl1.tvl1_flow`, OpenCV's defaults) on real 340x256 pairs: first-call
  (compile) time and pairs/s at B = 32, 64, 128; mean endpoint difference of the CUDA flow to the CPU eager
  reference and to the carried OpenCV flows; FlyingChairs AEE of ours and of OpenCV (ratio).
* ``features``: extract-features end to end (read + decode + crop + ResNet-101 at 224 on both streams +
  write) on synthetic videos made on the fly, frames/s; the forward-pass ceiling at the same batch;
  threaded vs serial bit-identity; GPU vs CPU JPEG decode, and nvJPEG called from several threads.
* ``finetune``: SGD step rate of the model vs the training loader's rate, RGB and flow (bench/finetune.py).
* ``heads``: a UCF101-scale epoch of the STFN head (9,537 videos, N = 7; bench/heads.py).
* ``train_net``: train-net's [ST-Mult] network, ResNet-50 + ResNet-152 on 4 videos x 5 frames at 224, bf16:
  SGD steps/s and peak memory without and with gradient checkpointing; one test video's seconds (2 flips x 25
  whole 340x256 frames).
* ``tests``: ``pytest tests/test_cuda.py`` (the CUDA tests; they skip without a GPU).

``--smoke`` runs every section tiny on the CPU (tests/test_gpu_check.py runs it), so this script cannot rot.
Full figures and per-section logs go to ``$OUT/gpu_check.json`` (or ``--out``) when set.

    python3 bench/gpu_check.py                 # on the GPU machine: about 8-9 minutes
    python3 bench/gpu_check.py --sections flow,heads
    python3 bench/gpu_check.py --smoke --inline   # on any CPU, well under a minute
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

DEFAULT_DATA = HERE / "data" / "gpu_check.npz"
UCF101_SPLIT1_TRAIN = 9537
#: seconds per section on the GPU (sum 510 s: with start-up and the table, under 9 minutes)
LIMITS = {"env": 20, "flow": 135, "features": 110, "finetune": 75, "heads": 35, "train_net": 60, "tests": 75}
SMOKE_LIMIT = 120
GRACE = 4  # after a section's limit, before its process is killed


# ----------------------------------------------------------------------------------------------------------
# Recording, timing
# ----------------------------------------------------------------------------------------------------------

class Ctx:
    """What a section gets: the device, smoke or not, its soft deadline, and the recorder of its results."""

    def __init__(self, name: str, *, smoke: bool, device: str, limit: float, data: Path, result: Path | None):
        self.name, self.smoke, self.device, self.data = name, smoke, device, data
        self.t0 = time.monotonic()
        self.limit = limit
        self.results: dict[str, Any] = {}
        self._file = result

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left(self) -> float:
        """Seconds left before the soft deadline (80 % of the limit: room to record and exit)."""
        return 0.8 * self.limit - (time.monotonic() - self.t0)

    def put(self, key: str, value: Any) -> None:
        """Record one result (and write them all out at once: a kill after this keeps it)."""
        self.results[key] = value
        self.log(f"{key}: {_short(value)}")
        if self._file is not None:
            tmp = self._file.with_name(self._file.name + ".tmp")
            tmp.write_text(json.dumps(self.results, default=_jsonable))
            tmp.replace(self._file)

    def log(self, msg: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def _short(v: Any) -> str:
    s = json.dumps(v, default=_jsonable)
    return s if len(s) < 300 else s[:297] + "..."


def _timed_repeats(fn: Callable[[], Any], ctx: Ctx, *, min_calls: int, seconds: float, max_calls: int) -> tuple[int, float]:
    """Call ``fn`` at least ``min_calls`` times and until ``seconds`` have passed (at most ``max_calls``);
    returns (calls, elapsed) with the device synchronised."""
    ctx.sync()
    t0 = time.perf_counter()
    calls = 0
    while calls < min_calls or (time.perf_counter() - t0 < seconds and calls < max_calls):
        fn()
        calls += 1
    ctx.sync()
    return calls, time.perf_counter() - t0


def _load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------------------------------

def section_env(c: Ctx) -> None:
    import torch

    c.put("python", platform.python_version())
    c.put("torch", torch.__version__)
    c.put("cpu_count", os.cpu_count())
    pkgs = {}
    for mod in ("torchvision", "numpy", "h5py", "cv2", "zarr", "av", "triton"):
        try:
            m = __import__(mod)
            pkgs[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - an absent package is a finding, not a failure
            pkgs[mod] = f"missing ({type(e).__name__})"
    try:
        import cv2

        pkgs["cv2.optflow"] = hasattr(cv2, "optflow")
    except ImportError:
        pass
    c.put("packages", pkgs)
    if c.cuda:
        p = torch.cuda.get_device_properties(0)
        c.put("gpu", {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                      "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda})
    dev = torch.device(c.device)
    n = (1 << 30) if c.cuda else (16 << 20)
    x = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    calls, dt = _timed_repeats(lambda: y.copy_(x), c, min_calls=5, seconds=1.0, max_calls=50)
    c.put("copy_GBps", 2 * n * calls / dt / 1e9)  # bytes read + written
    del x, y
    if c.cuda:
        h = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8).pin_memory()
        d = torch.empty(h.shape, dtype=torch.uint8, device=dev)
        d.copy_(h, non_blocking=True)
        calls, dt = _timed_repeats(lambda: d.copy_(h, non_blocking=True), c, min_calls=5, seconds=1.0, max_calls=50)
        c.put("h2d_pinned_GBps", h.numel() * calls / dt / 1e9)
        del h, d
    m = 8192 if c.cuda else 256
    a = torch.randn(m, m, device=dev).to(torch.bfloat16)
    b = torch.randn(m, m, device=dev).to(torch.bfloat16)
    for _ in range(3):
        a @ b
    calls, dt = _timed_repeats(lambda: a @ b, c, min_calls=5, seconds=1.5, max_calls=100)
    c.put("bf16_matmul_TFLOPs", 2 * m ** 3 * calls / dt / 1e12)
    c.put("bf16_matmul_size", m)


# ----------------------------------------------------------------------------------------------------------
# flow
# ----------------------------------------------------------------------------------------------------------

def _epe(a, b) -> float:
    """Mean endpoint distance between two (N, 2, H, W) flows."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.sqrt(((a - b) ** 2).sum(axis=-3)).mean())


def _shrink(x, size: tuple[int, int]):
    """(N, H, W) uint8 images or (N, 2, H, W) flows -> ``size`` (area); flows scaled with the image."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if t.dim() == 3:
        return F.interpolate(t[:, None], size=size, mode="area")[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    out = F.interpolate(t, size=size, mode="area")
    out[:, 0] *= size[1] / t.shape[-1]
    out[:, 1] *= size[0] / t.shape[-2]
    return out.numpy()


def _synthetic_pairs(n: int, h: int, w: int):
    """Smooth random textures and the same shifted by (2, 1) px: a stand-in when no data was carried."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    base = F.avg_pool2d(torch.rand(n, 1, h + 8, w + 8, generator=g) * 255, 5, 1)[:, 0]
    i0 = base[:, 2:2 + h, 2:2 + w]
    i1 = base[:, 1:1 + h, 0:w]
    return i0.round().to(torch.uint8).numpy(), i1.round().to(torch.uint8).numpy()


def section_flow(c: Ctx) -> None:
    import numpy as np
    import torch

    from pipeline.flow.tvl1 import TVL1Params, tvl1_flow

    params = TVL1Params()
    data = dict(np.load(c.data)) if c.data.is_file() else {}
    if "pairs0" in data:
        i0, i1 = data["pairs0"], data["pairs1"]
        c.put("data", f"{c.data.name}: {len(i0)} real pairs {i0.shape[2]}x{i0.shape[1]}")
    else:
        i0, i1 = _synthetic_pairs(8, 256, 340)
        c.put("data", f"no {c.data}: synthetic pairs (no accuracy figures)")
    cv_flow, chairs = data.get("cv_flow"), ("chairs0" in data)
    small = (48, 64)
    if c.smoke:  # tiny pairs, eager path (compiling on a CPU takes minutes)
        i0, i1 = _shrink(i0[:4], small), _shrink(i1[:4], small)
        cv_flow = _shrink(cv_flow[:4], small) if cv_flow is not None else None
    fast = not c.smoke
    batches = (2, 4) if c.smoke else (32, 64, 128)
    dev = torch.device(c.device)
    a = torch.from_numpy(i0).float().to(dev)
    b = torch.from_numpy(i1).float().to(dev)
    n = len(a)

    def rate(B: int):
        """First-call (compile) time and pairs/s at batch B; returns the flows of the first call."""
        if c.left() < 10:
            c.put(f"B{B}", "skipped: section time")
            return None
        idx = torch.arange(B, device=dev) % n  # fewer carried pairs than B: repeated
        x0, x1 = a[idx], b[idx]
        c.sync()
        t0 = time.perf_counter()
        f = tvl1_flow(x0, x1, params, fast=fast)
        c.sync()
        first = time.perf_counter() - t0
        calls, dt = _timed_repeats(lambda: tvl1_flow(x0, x1, params, fast=fast), c, min_calls=1,
                                   seconds=min(3.0, max(c.left() / 4, 0.1)), max_calls=5)
        c.put(f"B{B}", {"first_call_s": first, "pairs_per_s": B * calls / dt, "calls": calls})
        return f[:min(B, n)].float().cpu().numpy()

    def accuracy_real(flows) -> None:
        if flows is None:
            return
        k = min(len(flows), 1 if c.smoke else 4)
        if c.cuda and c.left() > 15:
            torch.set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            ref = tvl1_flow(a[:k].cpu(), b[:k].cpu(), params, fast=False).numpy()
            c.put("cuda_vs_cpu_eager", {"pairs": k, "mean_epe_px": _epe(flows[:k], ref),
                                        "max_abs_px": float(np.abs(flows[:k] - ref).max()),
                                        "cpu_eager_s": time.perf_counter() - t0})
        elif not c.cuda:
            ref = tvl1_flow(a[:k], b[:k], params, fast=False).numpy()  # smoke: the same path twice
            c.put("cuda_vs_cpu_eager", {"pairs": k, "mean_epe_px": _epe(flows[:k], ref), "note": "CPU run"})
        if cv_flow is not None:
            m = min(len(cv_flow), len(flows))
            c.put("vs_opencv_real", {"pairs": m, "mean_epe_px": _epe(flows[:m], cv_flow[:m]),
                                     "mean_flow_px": float(np.sqrt((cv_flow[:m].astype(np.float64) ** 2).sum(1)).mean())})

    def flyingchairs() -> None:
        if not chairs or c.left() < 10:
            return
        c0, c1, gt, cv = data["chairs0"], data["chairs1"], data["chairs_gt"], data.get("chairs_cv")
        if c.smoke:
            c0, c1, gt = _shrink(c0[:1], small), _shrink(c1[:1], small), _shrink(gt[:1], small)
            cv = _shrink(cv[:1], small) if cv is not None else None
        t0 = time.perf_counter()
        ours = tvl1_flow(torch.from_numpy(c0).float().to(dev), torch.from_numpy(c1).float().to(dev), params,
                         fast=fast).float().cpu().numpy()
        r: dict[str, Any] = {"pairs": len(c0), "seconds_incl_compile": time.perf_counter() - t0,
                             "aee_ours": float(np.mean([_epe(ours[i:i + 1], gt[i:i + 1]) for i in range(len(gt))]))}
        if cv is not None:
            r["aee_opencv"] = float(np.mean([_epe(cv[i:i + 1], gt[i:i + 1]) for i in range(len(gt))]))
            r["aee_ratio"] = r["aee_ours"] / r["aee_opencv"]
            r["ours_vs_opencv_epe"] = _epe(ours, cv)
        c.put("flyingchairs", r)

    # The smallest batch first (its flows feed the accuracy figures), then the headline batch, then the
    # FlyingChairs size (another compile), then the middle batch: a section cut short loses the least.
    accuracy_real(rate(batches[0]))
    rate(batches[-1])
    flyingchairs()
    for B in batches[1:-1]:
        rate(B)


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------

def section_features(c: Ctx) -> None:
    import numpy as np
    import torch

    from pipeline.streams import STREAMS
    from pipeline.features import build_backbone, extract, features_of_video, forward_features, write_part
    from pipeline.io.store import VideoStore, decode_jpeg_frames

    bfeat = _load_bench("features")
    if c.smoke:
        cfg = dict(arch="resnet18", size=32, videos=3, frames=12, height=52, width=68, positions=4, batch=8,
                   workers=2)
    else:
        cfg = dict(arch="resnet101", size=224, videos=32, frames=180, height=256, width=340, positions=45,
                   batch=64, workers=4)  # extract-features' defaults: P = 45, batch 64, 4 reader threads
    c.put("config", cfg)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-features-"))
    try:
        t0 = time.perf_counter()
        fstore, flstore, jobs = bfeat.make_stores(root, cfg["videos"], cfg["frames"], height=cfg["height"],
                                                  width=cfg["width"], backend="h5")
        c.put("make_stores_s", time.perf_counter() - t0)
        src = bfeat.sources(cfg["arch"], cfg["size"])
        models = {s: build_backbone(x, c.device) for s, x in src.items()}
        if c.cuda:
            models = {s: m.to(memory_format=torch.channels_last) for s, m in models.items()}
        kw = dict(num_positions=cfg["positions"], views=1, dtype="float32", device=c.device,
                  batch_size=cfg["batch"], amp=True)
        for _ in extract(jobs[:1], fstore, flstore, src, models, workers=cfg["workers"], **kw):
            pass  # warm-up: allocator, cuDNN, nvJPEG
        parts = VideoStore(root / "parts", "h5")
        keep = min(4, len(jobs))
        threaded: dict[str, dict] = {}
        inputs = 0
        c.sync()
        t0 = time.perf_counter()
        for vid, vf, err, _ in extract(jobs, fstore, flstore, src, models, workers=cfg["workers"], **kw):
            if err:
                raise RuntimeError(f"{vid}: {err}")
            write_part(parts, vf)
            inputs += vf.inputs
            if len(threaded) < keep:
                threaded[vid] = vf.features
        c.sync()
        dt = time.perf_counter() - t0
        c.put("end_to_end", {"videos": len(jobs), "inputs": inputs, "seconds": dt, "frames_per_s": inputs / dt})

        rates = {}
        for s in STREAMS:
            x = torch.randint(0, 256, (cfg["batch"], src[s].in_channels, cfg["size"], cfg["size"]),
                              dtype=torch.uint8, device=c.device)
            for _ in range(2):
                forward_features(models[s], x, s, cfg["batch"], True)
            calls, dt = _timed_repeats(lambda: forward_features(models[s], x, s, cfg["batch"], True), c,
                                       min_calls=2, seconds=min(3.0, max(c.left() / 6, 0.1)), max_calls=200)
            rates[s] = cfg["batch"] * calls / dt
        both = 2 / (1 / rates["rgb"] + 1 / rates["flow"])  # as many flow stacks as RGB frames
        c.put("forward_ceiling", {"rgb_per_s": rates["rgb"], "flow_per_s": rates["flow"], "both_per_s": both,
                                  "batch": cfg["batch"]})

        ids = list(threaded)
        serial = {vid: features_of_video(vid, n, fstore, flstore, src, models, **kw).features
                  for vid, n in jobs[:keep]}
        again = features_of_video(*jobs[0], fstore, flstore, src, models, **kw).features
        diff = max(float(np.abs(threaded[v][s] - serial[v][s]).max()) for v in ids for s in STREAMS)
        c.put("threaded_vs_serial", {
            "videos": len(ids),
            "identical": all(np.array_equal(threaded[v][s], serial[v][s]) for v in ids for s in STREAMS),
            "max_abs_diff": diff,
            "serial_repeat_identical": all(np.array_equal(again[s], serial[ids[0]][s]) for s in STREAMS)})

        # JPEG: GPU (nvJPEG) vs CPU decode of one video's frames, then nvJPEG from several threads at once
        with fstore.reader(jobs[0][0]) as r:
            block, offsets = r.jpeg_block("frames")
        idx = list(range(0, len(offsets) - 1, max(1, (len(offsets) - 1) // cfg["positions"])))[:cfg["positions"]]
        cpu = decode_jpeg_frames(block, offsets, idx)
        threads = min(8, os.cpu_count() or 1)
        reps = 2 if c.smoke else 25

        def cpu_decode(_):
            return decode_jpeg_frames(block, offsets, idx)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(cpu_decode, range(threads * reps)))
        cpu_fps = threads * reps * len(idx) / (time.perf_counter() - t0)
        jpeg: dict[str, Any] = {"frames": len(idx), "cpu_threads": threads, "cpu_decode_frames_per_s": cpu_fps}
        if c.cuda:
            gpu = decode_jpeg_frames(block, offsets, idx, device=c.device)
            c.sync()
            d = (gpu.cpu().int() - cpu.int()).abs()
            jpeg.update(gpu_vs_cpu_max_abs=int(d.max()), gpu_vs_cpu_equal_fraction=float((d == 0).float().mean()))
            calls, dt = _timed_repeats(lambda: decode_jpeg_frames(block, offsets, idx, device=c.device), c,
                                       min_calls=3, seconds=1.0, max_calls=100)
            jpeg["gpu_decode_serial_frames_per_s"] = calls * len(idx) / dt
            c.put("jpeg", jpeg)  # kept if the threaded decodes below crash the process

            def gpu_decode(_):
                out = decode_jpeg_frames(block, offsets, idx, device=c.device)
                return out.clone()  # consumed at once on this thread's current stream, as the engine does

            with ThreadPoolExecutor(threads) as pool:
                outs = list(pool.map(gpu_decode, range(threads * reps)))
            c.sync()
            bad = sum(not torch.equal(o, gpu) for o in outs)
            jpeg.update(threaded_gpu_decodes=len(outs), threaded_gpu_corrupt=bad)
        c.put("jpeg", jpeg)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# finetune, heads, tests
# ----------------------------------------------------------------------------------------------------------

def section_finetune(c: Ctx) -> None:
    import torch

    bft = _load_bench("finetune")
    if c.smoke:
        cfg = dict(arch="resnet18", size=32, batch=2, steps=1, workers=0, seconds=0.3, height=72, width=96,
                   videos=2, frames=32)  # bench/finetune.py's loader reads 32-frame videos
    else:
        cfg = dict(arch="resnet101", size=224, batch=32, steps=15, workers=min(16, os.cpu_count() or 1),
                   seconds=6.0, height=256, width=340, videos=6, frames=32)
    c.put("config", cfg)
    dev = torch.device(c.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-finetune-") as tmp:
        for stream in ("rgb", "flow"):
            store = bft.make_store(Path(tmp), stream, cfg["height"], cfg["width"], cfg["videos"], cfg["frames"],
                                   backend="h5")
            m = bft.model_rate(cfg["arch"], cfg["size"], stream, cfg["batch"], dev, c.cuda, cfg["steps"])
            lo = bft.loader_rate(store, stream, cfg["size"], cfg["batch"], cfg["workers"], cfg["seconds"])
            c.put(stream, {"model_per_s": m, "loader_per_s": lo, "loader_over_model": lo / m})


def section_heads(c: Ctx) -> None:
    import torch

    bh = _load_bench("heads")
    args = Namespace(head="stfn", videos=64 if c.smoke else UCF101_SPLIT1_TRAIN, positions=25, segments=7,
                     dim=64 if c.smoke else 2048, classes=101, batch_size=32, epochs=1)
    c.put("epoch", bh.measure(torch.device(c.device), args))


def section_train_net(c: Ctx) -> None:
    """train-net's [ST-Mult] network: SGD steps of ResNet-50 appearance + ResNet-152 motion on 4 videos x 5
    frames (one micro-batch of the paper's setting), bf16 autocast, without and with gradient checkpointing
    (step rate, peak GPU memory); then one test video's forward (2 flips x 25 frames, whole 340x256 frame)."""
    import torch

    from pipeline.models.networks import Source, create_network
    from pipeline.training import loop as T
    from pipeline.training.networks import network_loss

    if c.smoke:
        cfg = dict(rgb="resnet18", flow="resnet18", size=32, batch=2, frames=3, steps=1, classes=5,
                   test_hw=(36, 48), test_frames=3, seconds=0.2)
    else:
        cfg = dict(rgb="resnet50", flow="resnet152", size=224, batch=4, frames=5, steps=8, classes=101,
                   test_hw=(256, 340), test_frames=25, seconds=5.0)
    c.put("config", cfg)
    dev = torch.device(c.device)
    kinds = {"rgb": "rgb", "flow": "flow"}
    g = torch.Generator().manual_seed(0)
    shape = (cfg["batch"], cfg["frames"])
    batch = {"rgb": torch.randint(0, 256, (*shape, 3, cfg["size"], cfg["size"]), dtype=torch.uint8, generator=g),
             "flow": torch.randint(0, 256, (*shape, 20, cfg["size"], cfg["size"]), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)}
    sources = {"rgb": Source(cfg["rgb"], 3), "flow": Source(cfg["flow"], 20)}
    for checkpointing in (False, True):
        model = create_network("stmult", num_classes=cfg["classes"], sources=sources,
                               checkpointing=checkpointing).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = network_loss(model, kinds, amp=c.cuda)

        def step():
            model.train()
            T.train_one_epoch(model, [batch], opt, device=dev, loss_fn=loss_fn, micro_batch=cfg["batch"])

        step()  # warm-up (cuDNN autotuning, allocator)
        if c.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        calls, secs = _timed_repeats(step, c, min_calls=cfg["steps"], seconds=cfg["seconds"], max_calls=100)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if c.cuda else None
        c.put("checkpointing" if checkpointing else "plain",
              {"steps_per_s": calls / secs, "videos_per_s": calls * cfg["batch"] / secs, "peak_gib": peak})
        if checkpointing:
            from pipeline.training.networks import predict

            h, w = cfg["test_hw"]
            views = {"rgb": torch.randint(0, 256, (2, cfg["test_frames"], 3, h, w), dtype=torch.uint8, generator=g),
                     "flow": torch.randint(0, 256, (2, cfg["test_frames"], 20, h, w), dtype=torch.uint8, generator=g),
                     "label": 0, "index": 0}
            predict(model, [views], 1, cfg["classes"], kinds, device=dev, amp=c.cuda, chunk=2)  # warm-up
            calls, secs = _timed_repeats(lambda: predict(model, [views], 1, cfg["classes"], kinds, device=dev,
                                                         amp=c.cuda, chunk=2), c, min_calls=1,
                                         seconds=cfg["seconds"] / 2, max_calls=20)
            c.put("test_video_s", secs / calls)
        del model, opt
        if c.cuda:
            torch.cuda.empty_cache()


def section_tests(c: Ctx) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_cuda.py"]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(c.left(), 5))
    except subprocess.TimeoutExpired as e:
        c.put("pytest", {"rc": "timeout", "tail": (e.stdout or "")[-2000:] if isinstance(e.stdout, str) else ""})
        return
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    c.put("pytest", {"rc": p.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:])})


SECTIONS: dict[str, Callable[[Ctx], None]] = {
    "env": section_env, "flow": section_flow, "features": section_features, "finetune": section_finetune,
    "heads": section_heads, "train_net": section_train_net, "tests": section_tests,
}


# ----------------------------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------------------------

def _get(res: dict, *path, default=None):
    x: Any = res
    for k in path:
        if not isinstance(x, dict) or k not in x:
            return default
        x = x[k]
    return x


def goal_rows(res: dict[str, dict], smoke: bool) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows from the sections' results."""
    rows = []

    def row(goal: str, target: str, value, ok: Callable[[Any], bool] | None, fmt: str = "{:,.1f}") -> None:
        if value is None:
            rows.append((goal, target, "not measured", "n/a"))
            return
        shown = fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        verdict = "info" if ok is None else ("n/a (smoke)" if smoke else ("PASS" if ok(value) else "FAIL"))
        rows.append((goal, target, shown, verdict))

    fl = res.get("flow", {}).get("results", {})
    bs = sorted((int(k[1:]), v) for k, v in fl.items() if k.startswith("B") and isinstance(v, dict))
    if bs:
        for B, v in bs:
            row(f"TV-L1 pairs/s, 340x256, B={B}", ">= 1,000 (issue 17)", v["pairs_per_s"], lambda x: x >= 1000)
        row("TV-L1 first call (compile) s", "-", bs[0][1]["first_call_s"], None, "{:.1f}")
    else:
        row("TV-L1 pairs/s, 340x256", ">= 1,000 (issue 17)", None, None)
    row("TV-L1 FlyingChairs AEE ours / OpenCV", "<= 1.05", _get(fl, "flyingchairs", "aee_ratio"),
        lambda x: x <= 1.05, "{:.3f}")
    row("TV-L1 CUDA vs CPU eager, mean EPE px", "small (< 0.05)", _get(fl, "cuda_vs_cpu_eager", "mean_epe_px"),
        lambda x: x < 0.05, "{:.4f}")
    row("TV-L1 vs OpenCV on real pairs, mean EPE px", "-", _get(fl, "vs_opencv_real", "mean_epe_px"), None, "{:.3f}")
    fe = res.get("features", {}).get("results", {})
    row("features end to end frames/s (R101 224, both streams)", ">= 2,000", _get(fe, "end_to_end", "frames_per_s"),
        lambda x: x >= 2000)
    row("features forward ceiling, both streams /s", "-", _get(fe, "forward_ceiling", "both_per_s"), None)
    row("features threaded == serial (bits)", "identical", _get(fe, "threaded_vs_serial", "identical"),
        lambda x: x is True)
    row("nvJPEG from threads, corrupt decodes", "0", _get(fe, "jpeg", "threaded_gpu_corrupt"), lambda x: x == 0,
        "{:d}")
    ft = res.get("finetune", {}).get("results", {})
    for s in ("rgb", "flow"):
        row(f"finetune {s}: loader / model rate", ">= 1.5", _get(ft, s, "loader_over_model"), lambda x: x >= 1.5,
            "{:.2f}")
    he = res.get("heads", {}).get("results", {})
    row("STFN head epoch s (9,537 videos, N=7)", "< 1", _get(he, "epoch", "epoch_seconds_ucf101"), lambda x: x < 1,
        "{:.2f}")
    tn = res.get("train_net", {}).get("results", {})
    for mode in ("plain", "checkpointing"):
        row(f"train-net stmult R50+R152 steps/s, 4x5 frames bf16 ({mode})", "-", _get(tn, mode, "steps_per_s"), None,
            "{:.2f}")
        row(f"train-net stmult peak GiB ({mode})", "< 78 (H100)", _get(tn, mode, "peak_gib"), None, "{:.1f}")
    row("train-net stmult test video s (2x25 frames, 340x256)", "-", _get(tn, "test_video_s"), None, "{:.2f}")
    te = res.get("tests", {}).get("results", {})
    row("CUDA tests (tests/test_cuda.py)", "all pass", _get(te, "pytest", "summary"),
        lambda x: _get(te, "pytest", "rc") == 0 and "passed" in x and "skipped" not in x)
    for name, r in res.items():
        if r.get("status") != "ok":
            rows.append((f"section {name}", "runs", r.get("status", "?"), "FAIL"))
    return rows


def goal_table(rows) -> str:
    out = ["| goal | target | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# Running the sections
# ----------------------------------------------------------------------------------------------------------

def _pick_device(smoke: bool, asked: str | None) -> str:
    if smoke:
        return "cpu"
    if asked:
        return asked
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def run_inline(name: str, a: argparse.Namespace, limit: float, result: Path | None) -> dict:
    """Run one section in this process; returns {"status", "seconds", "results", "error"?}."""
    c = Ctx(name, smoke=a.smoke, device=_pick_device(a.smoke, a.device), limit=limit, data=a.data, result=result)
    t0 = time.monotonic()
    try:
        SECTIONS[name](c)
        status, err = "ok", None
    except Exception as e:  # noqa: BLE001 - a section's failure is recorded, the others still run
        status, err = "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        c.log(f"FAILED: {type(e).__name__}: {e}")
    out = {"status": status, "seconds": time.monotonic() - t0, "results": c.results}
    if err:
        out["error"] = err
    return out


def run_subprocess(name: str, a: argparse.Namespace, limit: float, workdir: Path) -> dict:
    """Run one section in its own process, killed at ``limit`` + GRACE; what it recorded is kept."""
    result = workdir / f"{name}.json"
    status_file = workdir / f"{name}.status.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-section", name, "--result", str(result),
           "--status", str(status_file), "--data", str(a.data), "--limit", str(limit)]
    if a.smoke:
        cmd.append("--smoke")
    if a.device:
        cmd += ["--device", a.device]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    # its own process group: a section stopped at its limit goes with everything it started (DataLoader
    # workers, compile workers, pytest), which would otherwise hold the GPU during the next sections
    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = p.wait(timeout=limit + GRACE)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # leftovers of a finished section too
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
    out: dict[str, Any] = {}
    if status_file.is_file():
        out = json.loads(status_file.read_text())
    else:
        out = {"status": f"timeout after {limit + GRACE:.0f} s" if rc == "timeout" else f"crashed (exit {rc})"}
    if "results" not in out:
        out["results"] = json.loads(result.read_text()) if result.is_file() else {}
    out["seconds"] = time.monotonic() - t0
    out["rc"] = rc
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every section tiny, on the CPU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--inline", action="store_true", help="run the sections in this process (no isolation)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for gpu_check.json and gpu_check.md (default: $OUT when set)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the carried real data (make_gpu_check_data.py)")
    ap.add_argument("--device", default=None, help="default: cuda:0 when present (cpu with --smoke)")
    ap.add_argument("--run-section", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.run_section:  # a child: one section, its status written beside its results
        out = run_inline(a.run_section, a, a.limit, a.result)
        a.status.write_text(json.dumps(out, default=_jsonable))
        return 0 if out["status"] == "ok" else 1

    names = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.monotonic()
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for name in names:
            limit = SMOKE_LIMIT if a.smoke else LIMITS[name]
            print(f"== {name} (limit {limit:.0f} s)", flush=True)
            res[name] = (run_inline(name, a, limit, None) if a.inline
                         else run_subprocess(name, a, limit, Path(work)))
            print(f"== {name}: {res[name]['status']} in {res[name]['seconds']:.1f} s", flush=True)
    total = time.monotonic() - t0
    rows = goal_rows(res, a.smoke)
    env = res.get("env", {}).get("results", {})
    head = (f"GPU check{' (smoke, CPU)' if a.smoke else ''}, {started:%Y-%m-%d %H:%M} UTC, "
            f"{_get(env, 'gpu', 'name', default='no GPU')}, torch {env.get('torch', '?')}, {total:.0f} s")
    report = {"started_utc": started.isoformat(), "seconds": total, "smoke": a.smoke, "sections": res,
              "goals": [dict(zip(("goal", "target", "measured", "verdict"), r)) for r in rows]}
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=_jsonable))
        (a.out / "gpu_check.md").write_text(f"{head}\n\n{goal_table(rows)}\n")
    for name, r in res.items():
        if r.get("error"):
            print(f"\n{name} error: {r['error'].splitlines()[0]}")
    print(f"\n{head}\n\n{goal_table(rows)}", flush=True)
    return 0 if all(r["status"] == "ok" for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
