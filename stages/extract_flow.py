"""``extract-flow``: TV-L1 optical flow between consecutive decoded frames ([STFN] §4.2: "We pre-compute the
optical flows using the TVL1 method before training").

For a video of T frames and ``--step s`` there are T - s flows; flow ``i`` goes from frame ``i`` to frame
``i + s`` (x then y, in pixels at the stored frame size). Flows are quantized to uint8 with ``--bound``
(default 20, as TSN and mmaction2) and stored per video (docs/formats.md) with ``--codec``: x and y as
grayscale JPEGs (default, quality ``--quality`` 95, the bytes TSN / denseflow write), or lossless (zstd, raw).
``--backend torch`` runs our batched PyTorch TV-L1 (CPU or CUDA) on pairs gathered across videos of the same size, so a GPU sees large
batches; ``--backend opencv`` runs OpenCV's CPU ``DualTVL1OpticalFlow`` (the reference) pair by pair.
Under ``torchrun`` each rank takes its share of the videos.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipeline import dist
from pipeline.data.table import VideoTable
from pipeline.flow.stored import tvl1_params
from pipeline.io import artifacts
from pipeline.io.store import BACKENDS, IMAGE_CODECS, VideoStore, read_frames
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, param
from pipeline.stage.space import SpaceGuard, is_disk_full, path_size

VERSION = "1"
FLOW_BACKENDS = ("torch", "opencv", "import")
KERNELS = ("auto", "triton", "compile", "eager")  # pipeline.flow.tvl1.KERNELS (imported lazily: torch)
FLOW_CODECS = IMAGE_CODECS


@dataclass(frozen=True)
class FlowParams:
    backend: str = param("torch", "TV-L1 implementation: torch (ours, batched, CPU or CUDA) or opencv (OpenCV's "
                         "CPU DualTVL1OpticalFlow, the reference); import: the flow images of the rawframes tree "
                         "that decode --dataset rawframes read (docs/rawframes.md).", choices=FLOW_BACKENDS)
    device: str = param("auto", "Device for --backend torch: auto (CUDA when available), cpu, cuda, cuda:N.",
                        fingerprint=False)
    step: int = param(1, "Flow i goes from frame i to frame i + step; T frames give T - step flows.", min=1)
    bound: float = param(20.0, "Quantization bound in pixels: x and y are clipped to [-bound, bound] and stored as "
                         "uint8 (TSN / mmaction2 use 20).", min=0.0, min_exclusive=True)
    tau: float = param(0.25, "TV-L1 time step (OpenCV default).")
    lambda_: float = param(0.15, "TV-L1 data term weight (OpenCV default).")
    theta: float = param(0.3, "TV-L1 coupling weight (OpenCV default).")
    nscales: int = param(5, "Pyramid levels (OpenCV default; fewer when frames are small).")
    warps: int = param(5, "Warpings per pyramid level (OpenCV default).")
    epsilon: float = param(0.01, "Stopping threshold of the inner iterations (OpenCV default).")
    inner_iterations: int = param(30, "Iterations between median filterings (OpenCV default).")
    outer_iterations: int = param(10, "Median filtering rounds per warp (OpenCV default).")
    scale_step: float = param(0.8, "Size ratio between pyramid levels (OpenCV default).")
    gamma: float = param(0.0, "Illumination term weight (OpenCV default 0: off).")
    median_filtering: int = param(5, "Median filter size applied to the flow (OpenCV default 5; 0 or 1: off).")
    store: str = param("zarr", "Flow store back end: zarr or h5.", choices=BACKENDS)
    codec: str = param("jpeg", "How the quantized flow is stored: jpeg (x and y as grayscale JPEGs, as TSN / "
                       "denseflow / mmaction2; ~4x smaller, lossy within a fraction of the quantization step), "
                       "zstd (lossless, Zstandard; gzip in HDF5) or raw (lossless, Blosc-LZ4 / LZF; the old "
                       "layout).", choices=FLOW_CODECS)
    quality: int = param(95, "JPEG quality of --codec jpeg (1-100).", min=1, max=100)
    flow_start_index: int | None = param(None, "For --backend import: index of the first flow image, 0 or 1 "
                                         "(default: the layout's, 0 for denseflow, else 1).", omit_default=True,
                                         min=0, max=1)
    batch_size: int | None = param(None, "Frame pairs per TV-L1 call (torch backend); pairs of several videos of "
                                   "one size share a batch. Default: 4 on CPU, 64 on CUDA "
                                   "(pipeline/flow/extract.py; measured in docs/benchmarks.md).", fingerprint=False,
                                   min=1)
    fast: bool = param(True, "Fuse the inner iteration with torch.compile (the eager path is the reference).",
                       fingerprint=False)
    # Not fingerprinted, like device and fast: every kernel computes the eager reference's flow up to float
    # rounding (tested), so the choice changes speed, not the output's meaning; caches stay valid.
    kernel: str = param("auto", "Inner-iteration kernel for --backend torch: auto (triton on CUDA when Triton "
                        "imports, else compile), triton, compile (torch.compile) or eager (the reference; the "
                        "same as --no-fast).", choices=KERNELS, fingerprint=False)

    def tvl1(self):
        return tvl1_params({f.name: getattr(self, f.name) for f in fields(self)})

    def validate(self) -> None:
        """The checks across parameters (each parameter's own are declared with it; the TV-L1 parameters'
        are :class:`pipeline.flow.tvl1.TVL1Params`')."""
        if self.flow_start_index is not None and self.backend != "import":
            raise StageError("--flow-start-index applies to --backend import only")
        if not self.fast and self.kernel not in ("auto", "eager"):
            raise StageError(f"--no-fast runs the eager reference; it contradicts --kernel {self.kernel}")
        try:
            self.tvl1()
        except ValueError as e:
            raise StageError(str(e)) from None


def plan(params: FlowParams, upstream: Upstream) -> Plan:
    table = VideoTable.load(upstream.dir(artifacts.DECODE))
    if params.backend == "import":
        return _import_plan(params, upstream, table)
    short = [v for v, n in zip(table.video_ids, table.num_frames) if n <= params.step]
    describe = f"{len(table)} videos, backend {params.backend}"
    if short:
        describe += f", {len(short)} too short for step {params.step}"
    return Plan("", table, describe)


def run(ctx: StageContext, plan: Plan) -> dict:
    import torch

    from pipeline.flow.batcher import PairVideo, VideoFailed, flows_by_video, pair_frames, read_ahead
    from pipeline.flow.extract import default_batch_size, flow_codes
    from pipeline.flow.quantize import quantize_flow as quantize
    from pipeline.flow.tvl1 import opencv_tvl1_flow, resolve_kernel, rgb_to_gray

    p: FlowParams = ctx.params
    if p.backend == "import":
        return _import_run(ctx, plan)
    table: VideoTable = plan.data
    frames = artifacts.frame_store(ctx.upstream.dir(artifacts.DECODE))
    out = VideoStore(ctx.dir / artifacts.FLOW_DIR, p.store)
    if ctx.rank == 0:
        out.clean_temporary()
    tv = p.tvl1()
    device = dist.device(p.device) if p.backend == "torch" else "cpu"
    kernel = "eager" if not p.fast else p.kernel
    batch_size = p.batch_size or default_batch_size(device)
    if p.backend == "torch":
        try:
            kernel = resolve_kernel(kernel, device)
        except ValueError as e:
            raise StageError(str(e)) from None
    mine = ctx.shard(list(zip(table.video_ids, table.num_frames)))
    todo = [(v, n) for v, n in mine if not ctx.journal.is_done(v)]
    for v, n in todo:
        if n <= p.step:
            ctx.journal.record_failure(v, f"too short: {n} frame(s), flow with --step {p.step} needs at least "
                                          f"{p.step + 1}")
    todo = [(v, n) for v, n in todo if n > p.step]
    # Free space: projected per frame pair from the videos written (pipeline/stage/space.py).
    ctx.space = SpaceGuard(ctx.upstream.cache_root, artifacts.FLOW, sum(n - p.step for _, n in todo), len(todo),
                           "flow")
    bar = ctx.progress(sum(n - p.step for _, n in todo), "extract-flow", unit="pair")
    t_start = time.perf_counter()
    pairs_done = 0

    def load(vid: str):
        rgb = read_frames(frames, vid).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        return rgb_to_gray(rgb)  # (T, H, W) float32, OpenCV's 8-bit gray values

    def videos():
        for vid, gray in read_ahead([v for v, _ in todo], load):
            if isinstance(gray, Exception):
                ctx.journal.record_failure(vid, f"cannot read frames: {type(gray).__name__}: {gray}")
            elif gray.shape[0] <= p.step:
                ctx.journal.record_failure(vid, f"too short: {gray.shape[0]} frame(s) stored, flow with --step "
                                                f"{p.step} needs at least {p.step + 1}")
            else:
                yield PairVideo(vid, gray, p.step)

    def compute(batch) -> np.ndarray:
        """TV-L1 codes (pairs, 2, H, W) uint8 of a batch, in one call for the torch backend."""
        if p.backend == "torch":
            return flow_codes(*pair_frames(batch), tv, bound=p.bound, kernel=kernel, device=device)
        codes = []
        for piece in batch:
            g = piece.video.frames.to(torch.uint8).numpy()
            for i in range(piece.start, piece.stop):
                flow = torch.from_numpy(opencv_tvl1_flow(g[i], g[i + p.step], tv))
                codes.append(quantize(flow, p.bound).numpy()[None])
        return np.concatenate(codes)

    def progress(pairs: int) -> None:
        nonlocal pairs_done
        pairs_done += pairs
        bar.update(pairs)
        bar.set_postfix_str(f"{pairs_done / max(time.perf_counter() - t_start, 1e-9):.1f} pairs/s")

    for done in flows_by_video(videos(), batch_size, compute, on_batch=progress):
        if isinstance(done, VideoFailed):
            ctx.journal.record_failure(done.video_id, f"TV-L1 failed: {done.reason}")
            continue
        q, num = done.codes, len(done.codes)  # (num, 2, H, W) uint8
        with out.writer(done.video_id) as c:
            c.write_images("flow", np.ascontiguousarray(q.transpose(0, 2, 3, 1)), codec=p.codec,
                           quality=p.quality)
            c.set_attrs({**_codec_attrs(p), "num_flows": num, "num_frames": num + p.step, "step": p.step,
                         "bound": p.bound, "height": q.shape[2], "width": q.shape[3], "backend": p.backend,
                         "tvl1": {f.name: getattr(tv, f.name) for f in fields(tv)}})
        ctx.journal.record_ok(done.video_id, num_flows=num, seconds=round(done.seconds, 3))
        ctx.space.add(path_size(out.path(done.video_id)), num)
    bar.close()
    seconds = time.perf_counter() - t_start
    rate = pairs_done / max(seconds, 1e-9)
    line = (f"extract-flow: {len(ctx.journal.done)} videos ({len(ctx.journal.failed)} failed), {pairs_done} pairs "
            f"in {seconds:.1f} s ({rate:.1f} pairs/s, {p.backend} on {device}"
            + (f", kernel {kernel}" if p.backend == "torch" else "") + ")")
    ctx.log.info(line)
    return {"line": line, "pairs": pairs_done, "seconds": seconds, "pairs_per_s": rate, "device": device}


def _import_plan(params: FlowParams, upstream: Upstream, table: VideoTable) -> Plan:
    """--backend import: the flow folders of the rawframes tree decode read; their stats are the input digest."""
    from pipeline.interop import rawframes
    from pipeline.stage import digest

    dp = upstream.manifests[artifacts.DECODE].get("params") or {}
    if dp.get("dataset") != "rawframes":
        raise StageError(f"extract-flow --backend import reads the flow images of a rawframes tree, but decode "
                         f"read --dataset {dp.get('dataset')}; run `pipeline import-rawframes` (or decode "
                         "--dataset rawframes) first, or choose --backend torch|opencv")
    lay = rawframes.layout(dp.get("rawframes_layout") or "mmaction2")
    root = Path(dp["root"])
    stats = rawframes.flow_source_stats(root, lay, table.sources)
    start = lay.flow_start if params.flow_start_index is None else params.flow_start_index
    data = {"table": table, "layout": lay, "root": root, "start": start}
    return Plan(digest({"flow_dirs": stats, "start": start}), data,
                f"{len(table)} videos, flow images of the {lay.name} tree {root} (first index {start})")


def _import_run(ctx: StageContext, plan: Plan) -> dict:
    """Check and store every video's flow images as the flow store's uint8 codes (docs/rawframes.md)."""
    import os

    from pipeline.interop import rawframes

    p: FlowParams = ctx.params
    table, lay, root, start = (plan.data[k] for k in ("table", "layout", "root", "start"))
    out = VideoStore(ctx.dir / artifacts.FLOW_DIR, p.store)
    if ctx.rank == 0:
        out.clean_temporary()
    rows = ctx.shard(list(range(len(table))))
    todo = [i for i in rows if not ctx.journal.is_done(table.video_ids[i])]
    t0 = time.perf_counter()
    bar = ctx.progress(len(todo), "extract-flow (import)")
    flows = 0

    def one(i: int) -> int:
        vid, n, (h, w) = table.video_ids[i], table.num_frames[i], table.sizes[i]
        t = time.perf_counter()
        with out.writer(vid) as c:
            if p.codec == "jpeg":  # the tree's JPEG bytes as they are: no re-encoding
                xs, ys = rawframes.read_flow_jpegs(root, Path(table.sources[i]), lay, start_index=start,
                                                   step=p.step, num_frames=n, size=(h, w))
                c.write_encoded_images("flow", [b for xy in zip(xs, ys) for b in xy], planes=2)
                num = len(xs)
            else:
                q = rawframes.read_flow_codes(root, Path(table.sources[i]), lay, start_index=start, step=p.step,
                                              num_frames=n, size=(h, w))
                c.write_images("flow", q, codec=p.codec)
                num = len(q)
            c.set_attrs({**_codec_attrs(p, imported=True), "num_flows": num, "num_frames": n, "step": p.step,
                         "bound": p.bound, "height": h, "width": w, "backend": "import",
                         "source": [str(d) for d in lay.flow_dirs(root, Path(table.sources[i]))],
                         "rawframes_layout": lay.name, "flow_start_index": start})
        ctx.journal.record_ok(vid, num_flows=num, seconds=round(time.perf_counter() - t, 3))
        return num

    # cv2.imdecode and the store writes release the GIL: a few threads keep the cores busy.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        futures = {table.video_ids[i]: pool.submit(one, i) for i in todo}
        for vid, fut in futures.items():
            try:
                flows += fut.result()
            except Exception as e:  # noqa: BLE001 - recorded per video, naming its folder
                if is_disk_full(e):
                    raise  # the first ENOSPC stops the run (the runner names the path and the space needed)
                ctx.journal.record_failure(vid, f"{type(e).__name__}: {e}")
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    line = (f"extract-flow: {len(ctx.journal.done)} videos ({len(ctx.journal.failed)} failed), {flows} flows "
            f"imported from the {lay.name} tree in {seconds:.1f} s ({flows / max(seconds, 1e-9):.0f} flows/s)")
    ctx.log.info(line)
    return {"line": line, "pairs": flows, "seconds": seconds, "pairs_per_s": flows / max(seconds, 1e-9),
            "device": "cpu"}


def _codec_attrs(p: FlowParams, imported: bool = False) -> dict:
    """The flow codec attributes of a container: ``codec``, and for jpeg ``quality`` (None when the JPEG
    bytes were copied from a rawframes tree, whose encoder quality is unknown)."""
    if p.codec != "jpeg":
        return {"codec": p.codec}
    return {"codec": "jpeg", "quality": None if imported else p.quality}


def imported(recorded: dict) -> str:
    """What an extract-flow run with these recorded parameters imported: the flow images of the rawframes tree
    decode read (--backend import)."""
    return "the flow images of the rawframes tree decode read" if recorded.get("backend") == "import" else ""


STAGE = Stage(
    name=artifacts.FLOW, version=VERSION, params_type=FlowParams, plan=plan, run=run, imported=imported,
    upstream=lambda p: (artifacts.DECODE,),
    help="TV-L1 optical flow between consecutive frames (ours on CPU/CUDA, or OpenCV), quantized to uint8.",
)
