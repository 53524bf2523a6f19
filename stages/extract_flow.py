"""``extract-flow``: TV-L1 optical flow between consecutive decoded frames ([STFN] §4.2: "We pre-compute the
optical flows using the TVL1 method before training").

For a video of T frames and ``--step s`` there are T - s flows; flow ``i`` goes from frame ``i`` to frame
``i + s`` (x then y, in pixels at the stored frame size). Flows are quantized to uint8 with ``--bound``
(default 20, as TSN and mmaction2) and stored raw per video (docs/formats.md). ``--backend torch`` runs our
batched PyTorch TV-L1 (CPU or CUDA) on pairs gathered across videos of the same size, so a GPU sees large
batches; ``--backend opencv`` runs OpenCV's CPU ``DualTVL1OpticalFlow`` (the reference) pair by pair.
Under ``torchrun`` each rank takes its share of the videos.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import click
import numpy as np

from pipeline import dist
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, param
from stages.options import _fail, param_options
from pipeline.io.store import BACKENDS, VideoStore, read_frames
from pipeline.data.table import VideoTable

VERSION = "1"
FLOW_BACKENDS = ("torch", "opencv")


@dataclass(frozen=True)
class FlowParams:
    backend: str = param("torch", "TV-L1 implementation: torch (ours, batched, CPU or CUDA) or opencv (OpenCV's "
                         "CPU DualTVL1OpticalFlow, the reference).", choices=FLOW_BACKENDS)
    device: str = param("auto", "Device for --backend torch: auto (CUDA when available), cpu, cuda, cuda:N.",
                        fingerprint=False)
    step: int = param(1, "Flow i goes from frame i to frame i + step; T frames give T - step flows.")
    bound: float = param(20.0, "Quantization bound in pixels: x and y are clipped to [-bound, bound] and stored as "
                         "uint8 (TSN / mmaction2 use 20).")
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
    batch_size: int = param(64, "Frame pairs per TV-L1 call (torch backend); pairs of several videos of one size "
                            "share a batch.", fingerprint=False)
    fast: bool = param(True, "Fuse the inner iteration with torch.compile (the eager path is the reference).",
                       fingerprint=False)

    def tvl1(self):
        from pipeline.flow.tvl1 import TVL1Params

        names = {f.name for f in fields(TVL1Params)}
        return TVL1Params(**{k: getattr(self, k) for k in names})

    def validate(self) -> None:
        if self.step < 1:
            raise StageError(f"--step must be >= 1 (got {self.step})")
        if not self.bound > 0:
            raise StageError(f"--bound must be > 0 (got {self.bound})")
        if self.batch_size < 1:
            raise StageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        try:
            self.tvl1()
        except ValueError as e:
            raise StageError(str(e)) from None


def flow_store(flow_dir: Path) -> VideoStore:
    """The flow store a finished extract-flow wrote (back end read from its manifest)."""
    import json

    manifest = json.loads((Path(flow_dir) / "manifest.json").read_text())
    return VideoStore(Path(flow_dir) / "flow", manifest["params"]["store"])


def read_flow(store: VideoStore, video_id: str, indices=None, *, dequantize: bool = True):
    """Stored flows of a video: (k, H, W, 2) float32 pixels (or the uint8 codes with ``dequantize=False``)."""
    from pipeline.flow.quantize import dequantize_flow as dq

    with store.reader(video_id) as r:
        q = r.read_images("flow", indices)
        bound = r.attrs["bound"]
    return dq(q.numpy(), bound) if dequantize else q


def pair_flow(cache_root: Path, video_id: str, i: int, j: int | None = None, *, device: str = "auto"):
    """Float TV-L1 flow (2, H, W) from stored frame ``i`` to frame ``j`` (default ``i + step``) of a video,
    computed with the parameters and backend of the finished extract-flow run (unquantized, any pair)."""
    import torch

    from pipeline.stage import read_manifest
    from pipeline.flow.tvl1 import opencv_tvl1_flow, rgb_to_gray, tvl1_flow
    from stages.decode import frame_store

    manifest = read_manifest(Path(cache_root) / "extract-flow")
    if manifest is None:
        raise StageError(f"no extract-flow output in {cache_root}: run `pipeline extract-flow` first")
    known = {f.name for f in fields(FlowParams)}
    params = FlowParams(**{k: v for k, v in manifest["params"].items() if k in known})
    j = i + params.step if j is None else j
    gray = rgb_to_gray(read_frames(frame_store(Path(cache_root) / "decode"), video_id, [i, j]).permute(0, 3, 1, 2))
    if params.backend == "opencv":
        g = gray.to(torch.uint8).numpy()
        return opencv_tvl1_flow(g[0], g[1], params.tvl1())
    dev = dist.device(device)
    return tvl1_flow(gray[0].to(dev), gray[1].to(dev), params.tvl1(), fast=params.fast).cpu().numpy()


def plan(params: FlowParams, upstream: Upstream) -> Plan:
    table = VideoTable.load(upstream.dir("decode"))
    short = [v for v, n in zip(table.video_ids, table.num_frames) if n <= params.step]
    describe = f"{len(table)} videos, backend {params.backend}"
    if short:
        describe += f", {len(short)} too short for step {params.step}"
    return Plan("", table, describe)


class _Pending:
    """One video whose flows are being computed: its gray frames and the flows finished so far."""

    def __init__(self, vid: str, gray, step: int):
        self.vid, self.gray, self.step = vid, gray, step
        self.num = gray.shape[0] - step
        self.next = 0  # next pair index to schedule
        self.parts: list[np.ndarray] = []
        self.done = 0
        self.t0 = time.perf_counter()


def run(ctx: StageContext, plan: Plan) -> dict:
    import torch

    from pipeline.flow.quantize import quantize_flow as quantize
    from pipeline.flow.tvl1 import opencv_tvl1_flow, rgb_to_gray, tvl1_flow

    p: FlowParams = ctx.params
    table: VideoTable = plan.data
    from stages.decode import frame_store

    frames = frame_store(ctx.upstream.dir("decode"))
    out = VideoStore(ctx.dir / "flow", p.store)
    if ctx.rank == 0:
        out.clean_temporary()
    tv = p.tvl1()
    device = dist.device(p.device) if p.backend == "torch" else "cpu"
    mine = ctx.shard(list(zip(table.video_ids, table.num_frames)))
    todo = [(v, n) for v, n in mine if not ctx.journal.is_done(v)]
    for v, n in todo:
        if n <= p.step:
            ctx.journal.record_failure(v, f"too short: {n} frame(s), flow with --step {p.step} needs at least "
                                          f"{p.step + 1}")
    todo = [(v, n) for v, n in todo if n > p.step]
    total_pairs = sum(n - p.step for _, n in todo)
    bar = ctx.progress(total_pairs, "extract-flow", unit="pair")
    t_start = time.perf_counter()
    pairs_done = 0

    def load(vid: str):
        rgb = read_frames(frames, vid).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        return rgb_to_gray(rgb)  # (T, H, W) float32, OpenCV's 8-bit gray values

    def commit(item: _Pending) -> None:
        q = np.concatenate(item.parts)  # (num, 2, H, W) uint8
        h, w = q.shape[2:]
        with out.writer(item.vid) as c:
            c.write_images("flow", np.ascontiguousarray(q.transpose(0, 2, 3, 1)), codec="raw")
            c.set_attrs({"num_flows": item.num, "num_frames": item.num + p.step, "step": p.step,
                         "bound": p.bound, "height": h, "width": w, "backend": p.backend,
                         "tvl1": {f.name: getattr(tv, f.name) for f in fields(tv)}})
        ctx.journal.record_ok(item.vid, num_flows=item.num, seconds=round(time.perf_counter() - item.t0, 3))

    def compute(batch: list[tuple[_Pending, int, int]]) -> None:
        """Run TV-L1 on the pairs [a, b) of each listed video, in one call for the torch backend."""
        nonlocal pairs_done
        if p.backend == "torch":
            I0 = torch.cat([it.gray[a:b] for it, a, b in batch]).to(device, non_blocking=True)
            I1 = torch.cat([it.gray[a + it.step:b + it.step] for it, a, b in batch]).to(device, non_blocking=True)
            flow = tvl1_flow(I0, I1, tv, fast=p.fast)
            q = quantize(flow, p.bound).cpu().numpy()
        else:
            qs = []
            for it, a, b in batch:
                g = it.gray.to(torch.uint8).numpy()
                for i in range(a, b):
                    qs.append(quantize(torch.from_numpy(opencv_tvl1_flow(g[i], g[i + it.step], tv)), p.bound)
                              .numpy()[None])
            q = np.concatenate(qs)
        k = 0
        for it, a, b in batch:
            it.parts.append(q[k:k + b - a])
            it.done += b - a
            k += b - a
            if it.done == it.num:
                commit(it)
        pairs_done += len(q)
        bar.update(len(q))
        bar.set_postfix_str(f"{pairs_done / max(time.perf_counter() - t_start, 1e-9):.1f} pairs/s")

    # Read the next videos' frames in a background thread while TV-L1 runs.
    with ThreadPoolExecutor(2) as pool:
        loads = [(v, pool.submit(load, v)) for v, _ in todo[:2]]
        queue = iter(todo[2:])
        active: list[_Pending] = []
        while loads or active:
            # Fill the batch: pairs of videos with the same frame size.
            while loads and sum(it.num - it.next for it in active) < p.batch_size:
                vid, fut = loads.pop(0)
                nxt = next(queue, None)
                if nxt is not None:
                    loads.append((nxt[0], pool.submit(load, nxt[0])))
                try:
                    gray = fut.result()
                except Exception as e:  # noqa: BLE001 - recorded per video
                    ctx.journal.record_failure(vid, f"cannot read frames: {type(e).__name__}: {e}")
                    continue
                if active and gray.shape[1:] != active[0].gray.shape[1:]:
                    # Another frame size: finish the current group first.
                    loads.insert(0, (vid, _done_future(gray)))
                    break
                active.append(_Pending(vid, gray, p.step))
            batch, room = [], p.batch_size
            for it in active:
                if room == 0:
                    break
                take = min(room, it.num - it.next)
                if take:
                    batch.append((it, it.next, it.next + take))
                    it.next += take
                    room -= take
            if not batch:
                break
            try:
                compute(batch)
            except Exception as e:  # noqa: BLE001 - a failing batch fails its videos, not the run
                for it, _, _ in batch:
                    if it.vid not in ctx.journal.failed:
                        ctx.journal.record_failure(it.vid, f"TV-L1 failed: {type(e).__name__}: {e}")
                    it.done = it.num = -1
            active = [it for it in active if it.done != it.num]
    bar.close()
    seconds = time.perf_counter() - t_start
    rate = pairs_done / max(seconds, 1e-9)
    line = (f"extract-flow: {len(ctx.journal.done)} videos ({len(ctx.journal.failed)} failed), {pairs_done} pairs "
            f"in {seconds:.1f} s ({rate:.1f} pairs/s, {p.backend} on {device})")
    ctx.log.info(line)
    return {"line": line, "pairs": pairs_done, "seconds": seconds, "pairs_per_s": rate, "device": device}


def _done_future(value):
    from concurrent.futures import Future

    f: Future = Future()
    f.set_result(value)
    return f


STAGE = Stage(
    name="extract-flow", version=VERSION, params_type=FlowParams, plan=plan, run=run,
    upstream=lambda p: ("decode",),
    help="TV-L1 optical flow between consecutive frames (ours on CPU/CUDA, or OpenCV), quantized to uint8.",
)


# ----------------------------------------------------------------------------------------------------------
# Tools: flow of one image pair, and colour-coded flow of a stored video
# ----------------------------------------------------------------------------------------------------------

#: The FlowParams fields that flow-pair takes.
PAIR_KEYS = {"tau", "lambda_", "theta", "nscales", "warps", "epsilon", "inner_iterations", "outer_iterations",
             "scale_step", "gamma", "median_filtering", "device", "backend", "fast"}


@click.command("flow-pair")
@click.argument("img0", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("img1", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Middlebury .flo file to write (float32).")
@click.option("--vis", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Middlebury colour-coded flow as an image (PNG).")
@param_options(FlowParams, only=PAIR_KEYS)
def flow_pair_command(img0, img1, output, vis, **opts):
    """TV-L1 flow between two images (any format OpenCV reads), written as Middlebury .flo.

    The images are converted to gray as cv2.cvtColor(..., COLOR_BGR2GRAY) does.

    \b
    Examples:
      pipeline flow-pair frame0.png frame1.png -o flow.flo --vis flow.png
      pipeline flow-pair a.ppm b.ppm -o ab.flo --backend opencv
    """
    import cv2
    import torch

    from pipeline.stage.config import build_params
    from pipeline.flow.flo import flow_to_color, write_flo
    from pipeline.flow.tvl1 import opencv_tvl1_flow, to_gray, tvl1_flow

    from pipeline.stage.config import ConfigError

    try:
        params = build_params(FlowParams, {}, "", {k: v for k, v in opts.items() if v is not None})
    except (StageError, ConfigError) as e:
        _fail(str(e), 2)
    imgs = []
    for path in (img0, img1):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            _fail(f"{path}: cannot read this image (not an image format OpenCV reads, or a damaged file)", 2)
        imgs.append(to_gray(img))
    if imgs[0].shape != imgs[1].shape:
        _fail(f"{img0} is {imgs[0].shape[1]}x{imgs[0].shape[0]} but {img1} is {imgs[1].shape[1]}x"
              f"{imgs[1].shape[0]}: flow needs two images of the same size", 2)
    t0 = time.perf_counter()
    try:
        if params.backend == "opencv":
            flow = opencv_tvl1_flow(imgs[0], imgs[1], params.tvl1())
        else:
            dev = dist.device(params.device)
            I0, I1 = (torch.from_numpy(g).float().to(dev) for g in imgs)
            flow = tvl1_flow(I0, I1, params.tvl1(), fast=params.fast).cpu().numpy()
    except (ValueError, StageError) as e:
        _fail(str(e), 2)
    write_flo(output, flow)
    msg = f"wrote {output} ({imgs[0].shape[1]}x{imgs[0].shape[0]}, {params.backend}, {time.perf_counter() - t0:.2f} s)"
    if vis is not None:
        cv2.imwrite(str(vis), flow_to_color(flow)[..., ::-1])
        msg += f" and {vis}"
    click.echo(msg)


@click.command("show-flow")
@click.argument("video_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="A folder for colour-coded PNG frames, or a file ending in .mp4 for a video (frames | flow).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--max-flow", type=float, default=None,
              help="Flow magnitude shown at full saturation (default: the largest in the video).")
def show_flow_command(video_id, output, cache_dir, max_flow):
    """Colour-code a stored video's flow (Middlebury colour wheel) for a person to look at.

    \b
    Examples:
      pipeline show-flow LeftThenRight/v_LeftThenRight_g03_c01 -o flow.mp4
      pipeline show-flow ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01 -o flow_pngs/
    """
    import cv2

    from pipeline.stage.config import default_cache_dir
    from pipeline.flow.flo import flow_to_color
    from stages.decode import frame_store

    root = cache_dir or default_cache_dir()
    try:
        store = flow_store(root / "extract-flow")
        flows = read_flow(store, video_id)
        rgb = read_frames(frame_store(root / "decode"), video_id).numpy()
    except (FileNotFoundError, OSError, KeyError) as e:
        _fail(f"no stored flow for {video_id!r} under {root} ({e}); run `pipeline extract-flow` first", 2)
    except Exception as e:  # noqa: BLE001 - StoreError and friends, with their message
        _fail(str(e), 2)
    m = max_flow or float(np.sqrt((flows ** 2).sum(-1)).max()) or 1.0
    colour = [flow_to_color(f.transpose(2, 0, 1), max_flow=m) for f in flows]
    if output.suffix.lower() == ".mp4":
        import av

        h, w = colour[0].shape[:2]
        with av.open(str(output), "w") as c:
            s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=12)
            s.width, s.height, s.pix_fmt = 2 * w, h, "yuv420p"
            for frame, col in zip(rgb, colour):
                for pkt in s.encode(av.VideoFrame.from_ndarray(np.concatenate([frame, col], 1), format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    else:
        output.mkdir(parents=True, exist_ok=True)
        for i, col in enumerate(colour):
            cv2.imwrite(str(output / f"flow_{i:05d}.png"), col[..., ::-1])
    click.echo(f"wrote {len(colour)} colour-coded flows of {video_id} to {output} (full saturation at {m:.2f} px)")


COMMANDS = [flow_pair_command, show_flow_command]
