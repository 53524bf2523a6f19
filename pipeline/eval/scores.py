"""Test-time fusion of several views' class scores: plain averaging ([STFN] §4.2),
SCI-weighted fusion ([FstCN] §2.4, eq. 5-6) and FstCN's maximum over clips (eq. 7).

Scores are class *probabilities* (non-negative; rows need not sum to 1), shaped
(V, views, C): V videos, ``views`` scores per video (e.g. the 5 test sequences of STFN's
protocol), C classes. Heads return log-probabilities; pass ``log_probs.exp()``.

SCI (Sparsity Concentration Index, eq. 5) of p in R^C:
    SCI(p) = (C * max_j p_j / sum_j p_j - 1) / (C - 1)   in [0, 1]
eq. 6 fuses the views of one clip with weights SCI(p_k) / sum_k SCI(p_k). If every view of a video has SCI = 0
(all uniform), eq. 6 is 0/0; the plain average is used for that video. [STFN]'s test protocol fuses its
sequences with ``fuse_scores``; [FstCN]'s (M clips of 18 views each, (V, M, views, C) scores) fuses the views of each
clip by eq. 6 and the clips by eq. 7, p_hat = max_row([p_1, ..., p_M]): the class-wise maximum over the M clips
(:func:`sci_max_fuse`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sci", "average_scores", "sci_fuse", "sci_max_fuse", "fuse_scores", "SCORE_FUSIONS"]

SCORE_FUSIONS = ("mean", "sci")


def _check_probs(scores: Tensor, ndim: int, shape: str) -> None:
    if scores.dim() != ndim:
        raise ValueError(f"scores must be {shape}, got shape {tuple(scores.shape)}")
    if scores.shape[-1] < 2:
        raise ValueError(f"scores need at least 2 classes, got {scores.shape[-1]}")
    if (scores < 0).any() or not torch.isfinite(scores).all():
        raise ValueError("scores must be finite non-negative probabilities (exp() log-probabilities first)")


def sci(p: Tensor) -> Tensor:
    """Sparsity Concentration Index over the last axis (eq. 5): (..., C) -> (...)."""
    c = p.shape[-1]
    if c < 2:
        raise ValueError(f"SCI needs at least 2 classes, got {c}")
    total = p.sum(dim=-1)
    if (total <= 0).any():
        raise ValueError("SCI is undefined for an all-zero score vector")
    return (c * p.amax(dim=-1) / total - 1) / (c - 1)


def average_scores(scores: Tensor) -> Tensor:
    """Plain average over views: (V, views, C) -> (V, C)."""
    _check_probs(scores, 3, "(V, views, C)")
    return scores.mean(dim=1)


def sci_fuse(scores: Tensor) -> Tensor:
    """SCI-weighted average over views (eq. 6): (V, views, C) -> (V, C)."""
    _check_probs(scores, 3, "(V, views, C)")
    w = sci(scores)  # (V, views)
    total = w.sum(dim=1, keepdim=True)
    weighted = (w.unsqueeze(-1) * scores).sum(dim=1) / total.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(total > 0, weighted, scores.mean(dim=1))


def sci_max_fuse(scores: Tensor) -> Tensor:
    """[FstCN]'s test fusion: (V, M, views, C) -> (V, C).

    Per video and clip, the SCI-weighted average of its views (eq. 6); then, per class, the maximum over the M
    clips (eq. 7, "max_row" of the C x M matrix [p_1, ..., p_M]). The result need not sum to 1.
    """
    _check_probs(scores, 4, "(V, M, views, C)")
    v, m = scores.shape[:2]
    return sci_fuse(scores.flatten(0, 1)).unflatten(0, (v, m)).amax(dim=1)


def fuse_scores(scores: Tensor, method: str = "mean") -> Tensor:
    """(V, views, C) -> (V, C) by ``mean`` ([STFN] §4.2) or ``sci`` ([FstCN] eq. 6)."""
    if method == "mean":
        return average_scores(scores)
    if method == "sci":
        return sci_fuse(scores)
    raise ValueError(f"unknown score fusion {method!r}; valid: {', '.join(SCORE_FUSIONS)}")
