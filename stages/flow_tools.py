"""Tools around the flow store: ``flow-pair`` (TV-L1 of one image pair, as Middlebury .flo) and ``show-flow``
(colour-coded flow of a stored video). Plain Click commands; the library code is :mod:`pipeline.flow`."""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from pipeline import dist
from pipeline.flow.stored import read_flow
from pipeline.io import artifacts
from pipeline.io.store import read_frames
from pipeline.stage import StageError
from stages.extract_flow import FlowParams
from stages.options import fail, param_options

#: The FlowParams fields that flow-pair takes.
PAIR_KEYS = {"tau", "lambda_", "theta", "nscales", "warps", "epsilon", "inner_iterations", "outer_iterations",
             "scale_step", "gamma", "median_filtering", "device", "backend", "fast", "kernel"}


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
        fail(str(e), 2)
    imgs = []
    for path in (img0, img1):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            fail(f"{path}: cannot read this image (not an image format OpenCV reads, or a damaged file)", 2)
        imgs.append(to_gray(img))
    if imgs[0].shape != imgs[1].shape:
        fail(f"{img0} is {imgs[0].shape[1]}x{imgs[0].shape[0]} but {img1} is {imgs[1].shape[1]}x"
              f"{imgs[1].shape[0]}: flow needs two images of the same size", 2)
    t0 = time.perf_counter()
    try:
        if params.backend == "opencv":
            flow = opencv_tvl1_flow(imgs[0], imgs[1], params.tvl1())
        else:
            dev = dist.device(params.device)
            I0, I1 = (torch.from_numpy(g).float().to(dev) for g in imgs)
            kernel = "eager" if not params.fast else params.kernel
            flow = tvl1_flow(I0, I1, params.tvl1(), kernel=kernel).cpu().numpy()
    except (ValueError, StageError) as e:
        fail(str(e), 2)
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
    root = cache_dir or default_cache_dir()
    try:
        store = artifacts.flow_store(root / artifacts.FLOW)
        flows = read_flow(store, video_id)
        rgb = read_frames(artifacts.frame_store(root / artifacts.DECODE), video_id).numpy()
    except (FileNotFoundError, OSError, KeyError) as e:
        fail(f"no stored flow for {video_id!r} under {root} ({e}); run `pipeline extract-flow` first", 2)
    except Exception as e:  # noqa: BLE001 - StoreError and friends, with their message
        fail(str(e), 2)
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
