"""The two-stream segment network of end-to-end training ([STFN] §4.2, refine), and its checkpoints.

* :class:`TwoStreamSegmentNet`: N segments through the shared-weight RGB and flow backbones (TSN style),
  ``forward_features`` -> (B, N, D) per stream, the head fuses them -> (B, C) log-probabilities.
* :func:`build_two_stream` / :func:`load_two_stream_checkpoint`: the network from finetune's backbones and a
  train-head head, and from a checkpoint ``refine`` wrote.
* :func:`enable_gradient_checkpointing`: recompute a backbone's residual stages / Inception blocks in the
  backward pass instead of keeping their activations (BatchNorm running statistics updated once).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.streams import STREAMS
from pipeline.models.backbones import Backbone, create_backbone, normalize_flow, normalize_rgb
from pipeline.models.heads import create_head, load_head_checkpoint


def head_streams(head_name: str) -> tuple[str, ...]:
    """The streams a head reads: the single-stream baselines read one, every other head both."""
    return (head_name,) if head_name in ("rgb", "flow") else ("rgb", "flow")


class TwoStreamSegmentNet(nn.Module):
    """N segments through shared-weight RGB and flow backbones, fused by a temporal head ([STFN] §4.2).

    Args:
        rgb, flow: the appearance and motion backbones (:class:`pipeline.models.backbones.Backbone`).
        head: a temporal head (:func:`pipeline.models.heads.create_head`) with ``rgb_dim`` / ``flow_dim``
            equal to the backbones' ``num_features``.
        streams: the streams the head reads (:func:`head_streams`); a stream it ignores is not computed
            (its features are zeros) and its backbone is frozen.
        amp: bf16 autocast of the backbones on CUDA (the head runs in float32).

    ``forward(rgb (B, N, 3, H, W) uint8, flow (B, N, 2L, H', W') uint8)`` -> (B, C) log-probabilities;
    ``forward(rgb, flow, target)`` -> the head's training loss (its ``loss``: NLL, or the per-stream sum of
    the late / TSN baselines), so that DistributedDataParallel sees the whole computation.
    """

    def __init__(self, rgb: Backbone, flow: Backbone, head: nn.Module, *, streams: Sequence[str] = ("rgb", "flow"),
                 amp: bool = False) -> None:
        super().__init__()
        if rgb.num_features != head.rgb_dim or flow.num_features != head.flow_dim:
            raise ValueError(f"the head takes rgb {head.rgb_dim}-d and flow {head.flow_dim}-d features, the "
                             f"backbones give {rgb.num_features}-d ({rgb.arch}) and {flow.num_features}-d "
                             f"({flow.arch})")
        if not streams or any(s not in ("rgb", "flow") for s in streams):
            raise ValueError(f"streams must be a non-empty subset of ('rgb', 'flow'), got {tuple(streams)}")
        self.rgb, self.flow, self.head = rgb, flow, head
        self.streams, self.amp = tuple(streams), amp
        for s in ("rgb", "flow"):
            if s not in self.streams:
                getattr(self, s).requires_grad_(False)

    @property
    def num_segments(self) -> int:
        return self.head.num_segments

    def stream_features(self, stream: str, x: Tensor) -> Tensor:
        """``(B, N, C, H, W)`` uint8 -> ``(B, N, D)`` float32 pooled features of one backbone."""
        backbone: Backbone = getattr(self, stream)
        b, n = x.shape[:2]
        if stream not in self.streams:
            return torch.zeros(b, n, backbone.num_features, device=x.device)
        flat = (normalize_rgb if stream == "rgb" else normalize_flow)(x.flatten(0, 1))
        if flat.device.type == "cuda":
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=flat.device.type, dtype=torch.bfloat16,
                            enabled=self.amp and flat.device.type == "cuda"):
            feats = backbone.forward_features(flat)
        return feats.float().view(b, n, -1)

    def forward(self, rgb: Tensor, flow: Tensor, target: Tensor | None = None) -> Tensor:
        a, m = self.stream_features("rgb", rgb), self.stream_features("flow", flow)
        return self.head(a, m) if target is None else self.head.loss(a, m, target)


# ----------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """BatchNorm layers of ``module`` leave their running statistics untouched (the recomputation)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _checkpointed(module: nn.Module, forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(module)), **kwargs)

    return run


def enable_gradient_checkpointing(backbone: Backbone) -> int:
    """Recompute every residual stage (ResNet ``layer1..4``) or Inception block (``Mixed_*``) of ``backbone``
    in the backward pass instead of storing its activations; returns how many blocks were wrapped.

    Activations inside a block are freed after the forward pass, at the cost of a second forward of the
    block during backward (about a third more compute). The recomputation leaves BatchNorm running statistics
    as they were, so results and buffers equal those without checkpointing. The state dict is unchanged
    (the blocks' ``forward`` is wrapped in place).
    """
    n = 0
    for name, child in backbone.trunk.named_children():
        if name.startswith(("layer", "Mixed_")) and not getattr(child, "_grad_checkpointed", False):
            child.forward = _checkpointed(child, child.forward)
            child._grad_checkpointed = True
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------------
# Building it, its checkpoints
# ----------------------------------------------------------------------------------------------------------

def build_two_stream(sources: Mapping[str, Mapping], head_path: Path, *, amp: bool = False) -> TwoStreamSegmentNet:
    """The network to refine: per stream ``sources[s] = {"arch", "in_channels", "path"}`` (finetune's
    ``best.pt``), the head from a train-head ``best.pt``."""
    backbones = {s: create_backbone(src["arch"], num_classes=0, in_channels=src["in_channels"], weights=src["path"])
                 for s, src in sources.items()}
    head, meta = load_head_checkpoint(head_path)
    return TwoStreamSegmentNet(backbones["rgb"], backbones["flow"], head, streams=head_streams(meta["head"]), amp=amp)


def load_two_stream_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[TwoStreamSegmentNet, dict]:
    """(model, checkpoint dict) from a ``best.pt`` / ``last.pt`` written by ``refine``."""
    from pipeline.io.atomic import load_checkpoint

    ckpt = load_checkpoint(path, require=("model", "sources", "head", "head_kwargs", "num_classes", "rgb_dim",
                                          "flow_dim", "num_segments"))
    src = ckpt["sources"]
    backbones = {s: create_backbone(src[s]["arch"], num_classes=0, in_channels=src[s]["in_channels"])
                 for s in STREAMS}
    head = create_head(ckpt["head"], num_classes=ckpt["num_classes"], rgb_dim=ckpt["rgb_dim"],
                       flow_dim=ckpt["flow_dim"], num_segments=ckpt["num_segments"], **ckpt["head_kwargs"])
    model = TwoStreamSegmentNet(backbones["rgb"], backbones["flow"], head, streams=head_streams(ckpt["head"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt
