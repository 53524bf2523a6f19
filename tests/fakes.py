"""Test-only stand-ins for expensive stages, shared by the test modules that need their outputs.

``FAKE_FLOW_STAGE`` replaces ``extract-flow``: OpenCV's Farneback flow (fast, and an independent algorithm)
written in the documented flow store layout (docs/formats.md, "Flow"), quantized by the documented formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.table import VideoTable
from pipeline.io import artifacts
from pipeline.io.store import VideoStore, read_frames
from pipeline.stage import Plan, Stage, param


def quantize(f: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """docs/formats.md: q = clip(round((f + b) * 255 / (2 b)), 0, 255)."""
    return np.clip(np.round((f + bound) * 255.0 / (2 * bound)), 0, 255).astype(np.uint8)


def farneback_flow(frames: np.ndarray, bound: float = 20.0, step: int = 1) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T - step, H, W, 2) uint8 quantized OpenCV Farneback flow."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    out = [cv2.calcOpticalFlowFarneback(gray[i], gray[i + step], None, 0.5, 2, 9, 3, 5, 1.1, 0)
           for i in range(len(gray) - step)]
    return quantize(np.stack(out), bound)


def write_flow_store(frame_store: VideoStore, video_ids, root: Path, *, bound: float = 20.0, step: int = 1,
                     backend: str = "zarr") -> VideoStore:
    """A flow store in the documented layout (docs/formats.md, "Flow") from decoded frames."""
    store = VideoStore(root, backend)
    for vid in video_ids:
        frames = read_frames(frame_store, vid).numpy()
        q = farneback_flow(frames, bound, step)
        with store.writer(vid) as c:
            c.write_images("flow", q, codec="raw")
            c.set_attrs({"num_flows": len(q), "num_frames": len(frames), "step": step, "bound": bound,
                         "height": q.shape[1], "width": q.shape[2], "backend": "farneback"})
    return store


@dataclass(frozen=True)
class FakeFlowParams:
    store: str = param("zarr", "flow store back end")
    bound: float = param(20.0, "quantisation bound")
    step: int = param(1, "frame step")


def _table_plan(params, upstream) -> Plan:
    return Plan("", VideoTable.load(upstream.dir(artifacts.DECODE)))


def _fake_flow_run(ctx, plan):
    table = plan.data
    frames = artifacts.frame_store(ctx.upstream.dir(artifacts.DECODE))
    write_flow_store(frames, table.video_ids, ctx.dir / artifacts.FLOW_DIR, bound=ctx.params.bound,
                     step=ctx.params.step, backend=ctx.params.store)
    for vid in table.video_ids:
        ctx.journal.record_ok(vid)
    return {"line": "fake extract-flow (Farneback)"}


#: A stand-in for the extract-flow stage in tests: Farneback flow in the documented store layout.
FAKE_FLOW_STAGE = Stage(artifacts.FLOW, "test", FakeFlowParams, run=_fake_flow_run, plan=_table_plan,
                        upstream=lambda p: (artifacts.DECODE,))


def decode_or_die(source: str, video_id: str, *args, **kw) -> dict:
    """decode's worker (``stages.decode._decode_one``), except that a video whose file name contains ``oom``
    kills its process with SIGKILL, as the kernel's out-of-memory killer would."""
    import os
    import signal

    from stages.decode import _decode_one

    if "oom" in Path(source).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode_one(source, video_id, *args, **kw)
