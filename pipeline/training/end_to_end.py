"""End-to-end training of both backbones and a trained head ([STFN] §4.2, second step; the ``refine`` stage).

What differs from fine-tuning one stream, on top of the one loop of :mod:`pipeline.training.loop`:

* :func:`two_stream_loss`: a batch ``{"rgb": (b, N, 3, H, W), "flow": (b, N, 2L, H, W) uint8, "label": (b,)}``
  (:class:`pipeline.data.paired.PairedClips`) goes through
  :class:`pipeline.models.two_stream.TwoStreamSegmentNet`, whose loss is the head's (NLL, or the per-stream
  sum of the late / TSN baselines);
* :func:`set_train_mode`: a stream the head ignores stays in eval mode (its BatchNorm statistics included);
* :func:`predict`: the head's test protocol (``train-head``) on frames, the ``num_test`` sequences of
  :class:`pipeline.data.paired.PairedTestSequences`, probabilities averaged over them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.streams import STREAMS
from pipeline.models.two_stream import TwoStreamSegmentNet
from pipeline.training import loop as T

__all__ = ["predict", "set_train_mode", "two_stream_loss"]


def two_stream_loss(net: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, None, int]:
    """:data:`pipeline.training.loop.LossFn` of the two-stream network: (summed loss, None, 2 b N inputs)."""
    rgb = batch["rgb"].to(device, non_blocking=True)
    flow = batch["flow"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    b, n = rgb.shape[:2]
    return net(rgb, flow, y) * b, None, 2 * b * n


def set_train_mode(model: TwoStreamSegmentNet) -> None:
    """Training mode with partial BN (:func:`pipeline.training.loop.set_train_mode`); a stream the head ignores
    is not trained, its BatchNorm statistics included."""
    T.set_train_mode(model, True)
    for s in STREAMS:
        if s not in model.streams:
            getattr(model, s).eval()


@torch.no_grad()
def predict(model: TwoStreamSegmentNet, loader, num_videos: int, num_classes: int, *, device: torch.device,
            chunk: int = 32, progress=None) -> Tensor:
    """(V, C) float32 class probabilities averaged over each video's test sequences.

    ``loader`` yields :class:`~pipeline.data.paired.PairedTestSequences` items (``batch_size=None``) for this
    rank's share of the videos; the features of a video's U distinct inputs are computed once (in chunks of
    ``chunk``), gathered into its ``num_test`` sequences of N segments and fused by the head. Results are
    summed over ranks (each video is scored by one rank). Leaves the model in eval mode.
    """
    model.eval()
    out = torch.zeros(num_videos, num_classes + 1, dtype=torch.float64)
    for item in loader:
        feats = []
        for s in STREAMS:
            x = item[s]
            feats.append(torch.cat([model.stream_features(s, x[i:i + chunk].to(device)[None])[0]
                                    for i in range(0, x.shape[0], chunk)]))
        seq = item["sequences"].to(device)  # (num_test, N)
        probs = model.head(feats[0][seq], feats[1][seq]).float().exp()  # (num_test, C)
        idx = int(item["index"])
        out[idx, :num_classes] = probs.mean(0).double().cpu()
        out[idx, -1] = 1
        if progress is not None:
            progress(1)
    return T.sum_over_ranks(out, device)[:, :num_classes].float()
