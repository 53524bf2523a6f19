"""Flow <-> uint8 quantisation with a bound, as the two-stream literature stores flow.

TSN's extractor (yjxiong/dense_flow, ``convertFlowToImage``, after wanglimin/dense_flow) maps each flow
component ``v`` with bound ``b`` (default 20 px) to::

    q = 255                                 if v >  b
    q = 0                                   if v < -b
    q = cvRound(255 * (v + b) / (2 * b))    otherwise   (round half to even)

We use the same formula. (mmaction2's ``tools/misc/flow_extraction.py`` truncates with ``astype(uint8)``
instead of rounding, i.e. values up to one level lower.) Dequantisation is the inverse affine map
``v = q * 2b / 255 - b``, exact to within ``b / 255`` (0.078 px for b = 20) inside the bound.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_BOUND", "quantize_flow", "dequantize_flow"]

DEFAULT_BOUND = 20.0  # pixels, TSN / denseflow default


def _check_bound(bound: float) -> float:
    bound = float(bound)
    if not bound > 0 or not np.isfinite(bound):
        raise ValueError(f"flow quantisation bound must be a finite number > 0, got {bound}")
    return bound


def quantize_flow(flow: Tensor | np.ndarray, bound: float = DEFAULT_BOUND) -> Tensor | np.ndarray:
    """Float flow (any shape) -> uint8 of the same shape (tensor in, tensor out; array in, array out)."""
    bound = _check_bound(bound)
    is_numpy = isinstance(flow, np.ndarray)
    x = torch.from_numpy(flow) if is_numpy else flow
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"quantize_flow expects a float tensor or array, got {getattr(x, 'dtype', type(x))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_flow: flow contains NaN or infinite values")
    x = x.double()
    q = torch.round(255.0 * (x.clamp(-bound, bound) + bound) / (2.0 * bound)).to(torch.uint8)
    return q.numpy() if is_numpy else q


def dequantize_flow(q: Tensor | np.ndarray, bound: float = DEFAULT_BOUND) -> Tensor | np.ndarray:
    """uint8 quantised flow -> float32 flow in pixels, ``q * 2 * bound / 255 - bound``."""
    bound = _check_bound(bound)
    is_numpy = isinstance(q, np.ndarray)
    x = torch.from_numpy(q) if is_numpy else q
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        raise ValueError(f"dequantize_flow expects uint8 values, got {getattr(x, 'dtype', type(x))}")
    v = (x.double() * (2.0 * bound / 255.0) - bound).float()
    return v.numpy() if is_numpy else v
