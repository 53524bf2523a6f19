"""Residual Inception (Res-Inc) block over time ([STFN], STFN, §3.2, Fig. 3, eq. 3).

    y = ReLU( C(R(F; W_2), R(F; W_3), R(F; W_4), R(F; W_5)) + R'(F; W_j=2) )

Each residual branch R(F; W_k) is a 1-D convolution over time with kernel size k in
{2, 3, 4, 5} and d/4 filters, followed by BatchNorm and ReLU ("conv_b"); the four
branches are concatenated back to d channels. The skip branch R' is a kernel-2
convolution with d filters and BatchNorm, without ReLU. Their sum goes through a ReLU.
There are no 1x1 reduction convolutions (§3.2: they "perturb the input signal").

Padding: every convolution keeps the temporal length N. A kernel of size k is zero-padded
asymmetrically with (k - 1) // 2 steps on the left (past) and k // 2 on the right (future),
i.e. k=2: (0, 1), k=3: (1, 1), k=4: (1, 2), k=5: (2, 2). Convolutions have no bias (each is
followed by BatchNorm, whose shift plays that role).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResIncBlock", "ResIncStack", "same_padding"]

# Kernel sizes of the four inception branches (§3.2: "2,3,4,5 shows the best performance").
BRANCH_KERNELS = (2, 3, 4, 5)
# Kernel size of the skip connection (§3.2: "the smallest local temporal information").
SKIP_KERNEL = 2


def same_padding(kernel_size: int) -> tuple[int, int]:
    """(left, right) zero padding that keeps the length for a 1-D kernel: ((k-1)//2, k//2)."""
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    return (kernel_size - 1) // 2, kernel_size // 2


class _PaddedConv(nn.Module):
    """conv1d over (B, C, N) reading from an input zero-padded by `pad` on both sides."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, pad: int) -> None:
        super().__init__()
        left, _ = same_padding(kernel_size)
        if kernel_size - 1 > 2 * pad:
            raise ValueError(f"kernel {kernel_size} needs more than {pad} padding per side")
        self.offset = pad - left
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, bias=False)

    def forward(self, x_padded: Tensor, length: int) -> Tensor:
        start = self.offset
        return self.conv(x_padded[..., start : start + length + self.kernel_size - 1])


class ResIncBlock(nn.Module):
    """One Res-Inc block (Fig. 3). Input and output (B, N, d); d divisible by 4.

    Args:
        d: feature dimension (the paper's "input vector dimension, d"; 2048 for ResNet-101).
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        if d <= 0 or d % 4 != 0:
            raise ValueError(
                f"Res-Inc block needs a feature dimension divisible by 4 (four branches of d/4 "
                f"filters), got d={d}"
            )
        self.d = d
        self._pad = max(max(same_padding(k)) for k in BRANCH_KERNELS + (SKIP_KERNEL,))
        self.branches = nn.ModuleList(
            [_PaddedConv(d, d // 4, k, self._pad) for k in BRANCH_KERNELS]
        )
        self.branch_bns = nn.ModuleList([nn.BatchNorm1d(d // 4) for _ in BRANCH_KERNELS])
        self.skip = _PaddedConv(d, d, SKIP_KERNEL, self._pad)
        self.skip_bn = nn.BatchNorm1d(d)

    def forward_channels_first(self, x: Tensor) -> Tensor:
        """(B, d, N) -> (B, d, N)."""
        if x.dim() != 3 or x.shape[1] != self.d:
            raise ValueError(f"expected (B, {self.d}, N), got {tuple(x.shape)}")
        n = x.shape[-1]
        xp = F.pad(x, (self._pad, self._pad))
        inception = torch.cat(
            [F.relu(bn(conv(xp, n))) for conv, bn in zip(self.branches, self.branch_bns)], dim=1
        )
        skip = self.skip_bn(self.skip(xp, n))
        return F.relu(inception + skip)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, N, d)."""
        if x.dim() != 3 or x.shape[-1] != self.d:
            raise ValueError(f"expected (B, N, {self.d}), got {tuple(x.shape)}")
        return self.forward_channels_first(x.transpose(1, 2)).transpose(1, 2)


class ResIncStack(nn.Module):
    """K consecutive Res-Inc blocks (§3.2: "a series of Res-Inc block can be easily setup").

    (B, N, d) -> (B, N, d); K = 0 is the identity.
    """

    def __init__(self, d: int, blocks: int = 1) -> None:
        super().__init__()
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.d = d
        self.blocks = nn.ModuleList([ResIncBlock(d) for _ in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        if len(self.blocks) == 0:
            return x
        y = x.transpose(1, 2)
        for block in self.blocks:
            y = block.forward_channels_first(y)
        return y.transpose(1, 2)
