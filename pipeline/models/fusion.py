"""The common head interface, feature fusion G ([STFN] eq. 4-6) and prediction fusion.

Head convention (every head in :mod:`pipeline.models.heads`):

    head(rgb: (B, N, Da), flow: (B, N, Dm)) -> (B, C) log-probabilities

i.e. rows with logsumexp == 0. ``F.nll_loss`` trains on them directly, and so does
``F.cross_entropy`` (log_softmax of a log-probability vector is the vector itself), and
``exp`` gives the class probabilities that test-time score averaging ([STFN] §4.2) and SCI
fusion ([FstCN] eq. 5-7) need. Log-probabilities rather than logits because several heads
output a *sum of softmax predictions* (STFN eq. 1, late fusion, TSN's two streams): that sum is
not the softmax of any single logit vector, but its normalised log, log((p_1 + p_2) / 2), is a
proper log-probability (computed stably as logsumexp - log 2). The arg-max is unchanged by
the normalisation.

A head may override :meth:`Head.loss` when the paper trains its parts separately (late fusion
and TSN train each stream on its own loss; the sum of the per-stream losses has the same
gradients per stream as separate training, because the streams share no parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Head", "Classifier", "FUSIONS", "fuse", "log_mean_probs"]

# Element-wise fusion operations G over (B, N, d) sequences ([STFN] §3.2, eq. 4-6).
FUSIONS = ("avg", "max", "mul")


def fuse(op: str, a: Tensor, m: Tensor) -> Tensor:
    """G(P^a, P^m) element-wise: avg (eq. 4), mul (eq. 5) or max (eq. 6). Shapes must match."""
    if a.shape != m.shape:
        raise ValueError(f"fusion {op!r} needs equal shapes, got {tuple(a.shape)} and {tuple(m.shape)}")
    if op == "avg":
        return (a + m) / 2
    if op == "mul":
        return a * m
    if op == "max":
        return torch.maximum(a, m)
    raise ValueError(f"unknown fusion {op!r}; valid: {', '.join(FUSIONS)}")


def log_mean_probs(log_probs: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """log( sum_i w_i p_i / sum_i w_i ) from log p_i, each (B, C); stable (logsumexp)."""
    if not log_probs:
        raise ValueError("log_mean_probs needs at least one input")
    if weights is None:
        weights = [1.0] * len(log_probs)
    if len(weights) != len(log_probs) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(log_probs)} non-negative numbers with a positive sum, got {weights}")
    terms = [lp + math.log(w) for lp, w in zip(log_probs, weights) if w > 0]
    return torch.logsumexp(torch.stack(terms), dim=0) - math.log(sum(weights))


class Head(nn.Module):
    """Base of all temporal heads: stores the sizes and checks inputs.

    Args:
        num_classes: C.
        rgb_dim: Da, appearance feature dimension.
        flow_dim: Dm, motion feature dimension.
        num_segments: N, the number of segments per video the head is trained and tested with.
    """

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("rgb_dim", rgb_dim),
                            ("flow_dim", flow_dim), ("num_segments", num_segments)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.rgb_dim = int(rgb_dim)
        self.flow_dim = int(flow_dim)
        self.num_segments = int(num_segments)

    def check_inputs(self, rgb: Tensor, flow: Tensor) -> None:
        """Raise ValueError unless rgb is (B, N, rgb_dim) and flow is (B, N, flow_dim)."""
        n = self.num_segments
        if rgb.dim() != 3 or rgb.shape[1:] != (n, self.rgb_dim):
            raise ValueError(f"rgb features must be (B, {n}, {self.rgb_dim}), got {tuple(rgb.shape)}")
        if flow.dim() != 3 or flow.shape[1:] != (n, self.flow_dim):
            raise ValueError(f"flow features must be (B, {n}, {self.flow_dim}), got {tuple(flow.shape)}")
        if rgb.shape[0] != flow.shape[0]:
            raise ValueError(f"rgb and flow batch sizes differ: {rgb.shape[0]} vs {flow.shape[0]}")

    def loss(self, rgb: Tensor, flow: Tensor, target: Tensor) -> Tensor:
        """Training loss (scalar): negative log-likelihood of the forward output."""
        return F.nll_loss(self(rgb, flow), target)


class SegmentClassifier(nn.Module):
    """Dropout then linear on each segment: (B, N, d) -> (B, N, C) logits (or (B, d) -> (B, C))."""

    def __init__(self, d: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x))


class Classifier(SegmentClassifier):
    """Prediction function H before the softmax: temporal average, dropout, linear.

    (B, N, d) -> (B, C) logits. Averaging over time makes H independent of N ([STFN]
    Table 4 uses N = 3..9 with one architecture) and matches TSN's average consensus.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.mean(dim=1))
