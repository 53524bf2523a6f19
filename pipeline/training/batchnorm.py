"""BatchNorm in the training loop: TSN's partial BN and batch statistics over the global batch under DDP.

:func:`freeze_partial_bn` freezes every BatchNorm layer but the first (TSN, Wang et al. 2016, §3.2) and
:func:`set_train_mode` keeps the frozen ones in eval mode; :func:`sync_batchnorm` swaps the layers that train
on batch statistics for :class:`GlobalBatchNorm2d`, whose statistics are taken over every rank's samples (so K
ranks with global batch B compute what one process with batch B computes). Used by
:func:`pipeline.training.loop.fit` and the stages that train backbones (finetune, refine).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["GlobalBatchNorm2d", "freeze_partial_bn", "set_train_mode", "sync_batchnorm"]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_partial_bn(model: nn.Module) -> int:
    """TSN's partial BN (Wang et al. 2016, §3.2): freeze every BatchNorm layer except the first.

    Frozen layers keep their running statistics (see :func:`set_train_mode`) and their affine parameters
    (``requires_grad = False``), as in the reference tsn-pytorch ``TSN.train``. Returns how many were frozen.
    """
    bns = _batchnorms(model)
    for m in bns[1:]:
        m._partial_bn_frozen = True  # read by set_train_mode
        for p in m.parameters():
            p.requires_grad_(False)
    return max(len(bns) - 1, 0)


def set_train_mode(model: nn.Module, training: bool = True) -> None:
    """``model.train(training)``, then frozen BatchNorm layers back to eval mode (running statistics)."""
    model.train(training)
    if training:
        for m in _batchnorms(model):
            if getattr(m, "_partial_bn_frozen", False):
                m.eval()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the global batch of every rank.

    Like :class:`torch.nn.SyncBatchNorm`, but it also runs on CPU with gloo (SyncBatchNorm is GPU-only):
    per-channel sums and sums of squares are all-reduced by a differentiable sum, so gradients flow through
    the shared statistics to every rank's inputs.
    Outside a process group (or in eval mode) it is a plain BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                # n > 1 decided on the device: no host sync per layer per step
                unbiased = torch.where(n > 1, var.detach() * (n / (n - 1)).clamp_min(0), var.detach())
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm2d that trains on batch statistics by a :class:`GlobalBatchNorm2d` in place.

    Layers frozen by :func:`freeze_partial_bn` are left alone (they use running statistics). Returns how
    many were replaced.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d and not getattr(child, "_partial_bn_frozen", False):
                new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.to(next(child.buffers()).device)
                setattr(module, child_name, new)
                replaced += 1
    return replaced
