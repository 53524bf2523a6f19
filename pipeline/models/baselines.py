"""Baseline heads beside STFN ([STFN] Table 5 and §4.8): single streams, late fusion, TSN,
feature concatenation. All follow :class:`~pipeline.models.fusion.Head`: (B, N, Da), (B, N, Dm)
-> (B, C) log-probabilities.

- ``rgb`` / ``flow`` (Table 5 "Appear." / "Motion"): the two-stream protocol (Simonyan &
  Zisserman; [STFN] §4.2 "Two-stream ConvNets"): a linear softmax classifier trained on
  single snippets (each segment is a training sample of the video's label), and a video's
  prediction is the average of its segments' softmax scores.
- ``late`` (Table 5 "Late Fusion"): both single-stream classifiers, trained separately (their
  losses are summed; they share no parameters), scores fused as
  (p_rgb + w p_flow) / (1 + w) with ``flow_weight`` w (1: plain averaging, as in [STFN] §1).
- ``tsn`` (TSN, Wang et al., [STFN] ref. [46]): per stream, per-segment class scores,
  average consensus over segments *before* the softmax, trained on the video-level
  consensus; the two streams trained separately and fused by weighted averaging of their
  softmax scores with ``flow_weight`` (TSN uses 1 : 1.5 for RGB : flow).
- ``concat``: per-segment concatenation of the two features, temporal average, dropout,
  linear (a plain counterpart of Fig. 4c without Res-Inc blocks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .fusion import Classifier, Head, SegmentClassifier, log_mean_probs

__all__ = [
    "SingleStreamHead",
    "LateFusionHead",
    "TSNHead",
    "ConcatHead",
    "build_rgb",
    "build_flow",
    "build_late",
    "build_tsn",
    "build_concat",
]


def _snippet_log_probs(logits: Tensor) -> Tensor:
    """(B, N, C) segment logits -> (B, C) log of the mean segment softmax."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])


def _snippet_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean NLL over segments, each segment labelled with its video's class."""
    b, n, c = logits.shape
    return F.cross_entropy(logits.reshape(b * n, c), target.repeat_interleave(n))


class SingleStreamHead(Head):
    """One stream only (``stream`` = ``rgb`` or ``flow``), two-stream snippet protocol."""

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 stream: str = "rgb", dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        if stream not in ("rgb", "flow"):
            raise ValueError(f"stream must be 'rgb' or 'flow', got {stream!r}")
        self.stream = stream
        self.scores = SegmentClassifier(rgb_dim if stream == "rgb" else flow_dim, num_classes, dropout)

    def _logits(self, rgb: Tensor, flow: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        return self.scores(rgb if self.stream == "rgb" else flow)

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        return _snippet_log_probs(self._logits(rgb, flow))

    def loss(self, rgb: Tensor, flow: Tensor, target: Tensor) -> Tensor:
        return _snippet_loss(self._logits(rgb, flow), target)


class _TwoStreamScores(Head):
    """Per-segment class scores of each stream (``scores_a`` for RGB, ``scores_m`` for flow), fused with
    weight ``flow_weight`` on flow."""

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 flow_weight: float, dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        if flow_weight < 0:
            raise ValueError(f"flow_weight must be >= 0, got {flow_weight}")
        self.flow_weight = float(flow_weight)
        self.scores_a = SegmentClassifier(rgb_dim, num_classes, dropout)
        self.scores_m = SegmentClassifier(flow_dim, num_classes, dropout)


class LateFusionHead(_TwoStreamScores):
    """Two single-stream classifiers, softmax scores fused with weight ``flow_weight`` on flow."""

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 flow_weight: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments, flow_weight=flow_weight, dropout=dropout)

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        return log_mean_probs([_snippet_log_probs(self.scores_a(rgb)),
                               _snippet_log_probs(self.scores_m(flow))], [1.0, self.flow_weight])

    def loss(self, rgb: Tensor, flow: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        return _snippet_loss(self.scores_a(rgb), target) + _snippet_loss(self.scores_m(flow), target)


class TSNHead(_TwoStreamScores):
    """TSN average consensus of per-segment scores, per stream; streams fused by weighted average."""

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 flow_weight: float = 1.5, dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments, flow_weight=flow_weight, dropout=dropout)

    def consensus(self, rgb: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        """Average consensus G = mean_n of per-segment scores: two (B, C) logit tensors."""
        self.check_inputs(rgb, flow)
        return self.scores_a(rgb).mean(dim=1), self.scores_m(flow).mean(dim=1)

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        ga, gm = self.consensus(rgb, flow)
        return log_mean_probs([F.log_softmax(ga, dim=-1), F.log_softmax(gm, dim=-1)],
                              [1.0, self.flow_weight])

    def loss(self, rgb: Tensor, flow: Tensor, target: Tensor) -> Tensor:
        ga, gm = self.consensus(rgb, flow)
        return F.cross_entropy(ga, target) + F.cross_entropy(gm, target)


class ConcatHead(Head):
    """Concatenate features per segment, temporal average, dropout, linear, softmax."""

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        self.classifier = Classifier(rgb_dim + flow_dim, num_classes, dropout)

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        return F.log_softmax(self.classifier(torch.cat([rgb, flow], dim=-1)), dim=-1)


def build_rgb(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> SingleStreamHead:
    """Registry builder for ``rgb``; kwargs: dropout."""
    return SingleStreamHead(num_classes, rgb_dim, flow_dim, num_segments, stream="rgb", **kwargs)


def build_flow(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> SingleStreamHead:
    """Registry builder for ``flow``; kwargs: dropout."""
    return SingleStreamHead(num_classes, rgb_dim, flow_dim, num_segments, stream="flow", **kwargs)


def build_late(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> LateFusionHead:
    """Registry builder for ``late``; kwargs: flow_weight, dropout."""
    return LateFusionHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)


def build_tsn(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> TSNHead:
    """Registry builder for ``tsn``; kwargs: flow_weight, dropout."""
    return TSNHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)


def build_concat(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> ConcatHead:
    """Registry builder for ``concat``; kwargs: dropout."""
    return ConcatHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)
