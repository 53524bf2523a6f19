"""The torch backend's unit of work in ``extract-flow``: one batch of gray pairs -> uint8 flow codes.

``flow_codes`` is what the stage runs per batch and what ``bench/flow.py`` times, so the benchmark measures
the stage's own path. ``default_batch_size`` is the stage's ``--batch-size`` when it is not given.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["CPU_BATCH_SIZE", "CUDA_BATCH_SIZE", "default_batch_size", "flow_codes"]

# Pairs per TV-L1 call. CPU: measured with bench/flow.py on the shared real clips at 340x256 (docs/
# benchmarks.md, 2026-12-06): past ~4 pairs the working tensors (~3.5 MB per pair) leave the caches and
# pairs/s falls. CUDA: unmeasured on GPU; a GPU needs large batches to fill its cores.
CPU_BATCH_SIZE = 4
CUDA_BATCH_SIZE = 64


def default_batch_size(device: torch.device | str) -> int:
    """The default pairs per call on ``device``."""
    return CUDA_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_BATCH_SIZE


def flow_codes(I0: Tensor, I1: Tensor, params, *, bound: float, kernel: str = "auto",
               device: torch.device | str = "cpu", stats: dict | None = None) -> np.ndarray:
    """TV-L1 flow of the gray pairs (B, H, W) float 0..255 (any device) on ``device``, quantized with
    ``bound`` as the flow store keeps it: (B, 2, H, W) uint8 on the host."""
    from pipeline.flow.quantize import quantize_flow
    from pipeline.flow.tvl1 import tvl1_flow

    I0 = I0.to(device, non_blocking=True)
    I1 = I1.to(device, non_blocking=True)
    flow = tvl1_flow(I0, I1, params, kernel=kernel, stats=stats)
    return quantize_flow(flow, bound).cpu().numpy()
