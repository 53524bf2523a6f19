"""Middlebury ``.flo`` files and the Middlebury colour-wheel visualisation of flow.

File format (Baker et al., "A Database and Evaluation Methodology for Optical Flow", IJCV 2011; the
``flow-code`` README): little-endian float32 magic 202021.25 (the bytes "PIEH"), int32 width, int32 height,
then ``height * width`` interleaved float32 pairs (u, v), row-major.
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["FLO_MAGIC", "read_flo", "write_flo", "make_color_wheel", "flow_to_color"]

FLO_MAGIC = 202021.25
# Sanity bound on width/height read from a header (the reference code uses 99999 as its limit).
_MAX_DIM = 99999


def read_flo(path: str | PathLike) -> np.ndarray:
    """Read a Middlebury ``.flo`` file -> float32 (2, H, W): channel 0 is u (x), channel 1 is v (y)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 12:
        raise ValueError(f"{path}: too short for a .flo header ({len(data)} bytes)")
    magic = np.frombuffer(data, "<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise ValueError(f"{path}: not a .flo file (magic {magic!r}, expected {FLO_MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    if not (0 < width <= _MAX_DIM and 0 < height <= _MAX_DIM):
        raise ValueError(f"{path}: implausible .flo size {width}x{height}")
    expected = 12 + 8 * width * height
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for a {width}x{height} .flo")
    uv = np.frombuffer(data, "<f4", count=2 * width * height, offset=12).reshape(height, width, 2)
    return np.ascontiguousarray(uv.transpose(2, 0, 1))


def write_flo(path: str | PathLike, flow: np.ndarray | Tensor) -> None:
    """Write flow (2, H, W) (u then v, as ``read_flo`` returns) to a Middlebury ``.flo`` file."""
    if isinstance(flow, Tensor):
        flow = flow.detach().cpu().numpy()
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"write_flo expects flow of shape (2, H, W), got {flow.shape}")
    _, height, width = flow.shape
    header = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    body = np.ascontiguousarray(flow.transpose(1, 2, 0), dtype="<f4").tobytes()
    Path(path).write_bytes(header + body)


def make_color_wheel() -> np.ndarray:
    """The Middlebury colour wheel (55, 3) float64, RGB in 0..255: red, yellow, green, cyan, blue, magenta.

    Segment lengths RY=15, YG=6, GC=4, CB=11, BM=13, MR=6 (Baker et al. 2011, ``colorcode.cpp``), chosen
    for perceptually similar steps; within a segment one channel ramps as ``floor(255 * i / n)``.
    """
    RY, YG, GC, CB, BM, MR = 15, 6, 4, 11, 13, 6
    wheel = np.zeros((RY + YG + GC + CB + BM + MR, 3))
    col = 0
    for n, const, ramp, rising in (
        (RY, 0, 1, True),    # red -> yellow: R = 255, G rises
        (YG, 1, 0, False),   # yellow -> green: G = 255, R falls
        (GC, 1, 2, True),    # green -> cyan: G = 255, B rises
        (CB, 2, 1, False),   # cyan -> blue: B = 255, G falls
        (BM, 2, 0, True),    # blue -> magenta: B = 255, R rises
        (MR, 0, 2, False),   # magenta -> red: R = 255, B falls
    ):
        steps = np.floor(255 * np.arange(n) / n)
        wheel[col:col + n, const] = 255
        wheel[col:col + n, ramp] = steps if rising else 255 - steps
        col += n
    return wheel


def flow_to_color(flow: np.ndarray | Tensor, max_flow: float | None = None) -> np.ndarray:
    """Colour-code flow (2, H, W) -> uint8 RGB image (H, W, 3) with the Middlebury colour wheel.

    Hue is the direction (+x red, -x blue-cyan, +y yellow-orange, -y blue-violet), saturation the magnitude
    relative to ``max_flow`` (default: the largest magnitude in the field, so its longest vector is fully
    saturated); colours beyond ``max_flow`` are darkened by 0.75, as in ``colorcode.cpp``. Unknown flow (NaN,
    inf or |component| > 1e9) is black. Zero flow is white.
    """
    if isinstance(flow, Tensor):
        flow = flow.detach().cpu().numpy()
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"flow_to_color expects flow of shape (2, H, W), got {flow.shape}")
    u, v = flow[0].copy(), flow[1].copy()
    unknown = ~np.isfinite(u) | ~np.isfinite(v) | (np.abs(u) > 1e9) | (np.abs(v) > 1e9)
    u[unknown] = 0.0
    v[unknown] = 0.0
    rad = np.sqrt(u * u + v * v)
    if max_flow is None:
        max_flow = float(rad.max()) if rad.size else 0.0
    if max_flow <= 0:
        max_flow = 1.0
    u, v, rad = u / max_flow, v / max_flow, rad / max_flow

    wheel = make_color_wheel()
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # -1..1
    fk = (angle + 1) / 2 * (ncols - 1)  # 0..ncols-1
    k0 = fk.astype(int)
    k1 = (k0 + 1) % ncols
    f = (fk - k0)[..., None]
    col = (1 - f) * wheel[k0] / 255 + f * wheel[k1] / 255
    r = rad[..., None]
    inside = r <= 1
    col = np.where(inside, 1 - r * (1 - col), col * 0.75)  # saturate with radius; darken beyond max_flow
    img = np.floor(255 * col).astype(np.uint8)
    img[unknown] = 0
    return img
