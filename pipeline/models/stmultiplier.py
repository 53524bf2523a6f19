"""ST-Multiplier-style head: an approximation of [ST-Mult] on pooled features (§3.2.2 eq. 5, §3.3 eq. 8-10).

Not the paper's network: [ST-Mult] gates per pixel inside the residual units of two ResNets trained end to end
(that network is :mod:`pipeline.models.stmult_net`, trained by ``pipeline train-net --net stmult``). This head
applies the same two ideas, once, to the globally pooled segment features the pipeline caches.

On segment feature sequences (B, N, D), one residual unit per stream:

    motion:      x̂_m = f(x_m) + F_m(f(x_m))
    appearance:  x̂_a = f(x_a) + F_a(x_a ⊙ f(x_m))        (eq. 5, motion gates appearance)

with f = ReLU (the f of [ST-Mult] eq. 1 and 5) and F(z) = BN(T(z)), T a 1-D temporal convolution over all D
channels (eq. 8) whose kernel is initialised as W = 1 ⊗ f_t (eq. 9): the D x D identity
between channels times a temporal filter f_t of length ``temporal_kernel``. With the default
``temporal_init="identity"`` f_t is a centred unit impulse, so T is exactly the identity at
initialisation ("do not impact the information flow at initialization"); ``"average"`` uses
f_t = 1 / T. Biases start at zero. Then global max pooling over time (eq. 10), dropout and a
linear softmax classifier per stream; the two streams' predictions are averaged ([ST-Mult]
§4.2 averages the predictions; the head returns log of that average, see
:mod:`pipeline.models.fusion`). The training loss is the paper's: one cross-entropy per stream, summed
([ST-Mult] §5.1, "two loss layers"). The multiplicative gate needs Da == Dm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import Head, log_mean_probs
from .resinc import same_padding

__all__ = ["IdentityTemporalConv", "STMultiplierHead", "build_stmultiplier"]

TEMPORAL_INITS = ("identity", "average")


class IdentityTemporalConv(nn.Module):
    """Temporal conv over (B, N, D) keeping N, initialised per eq. 9 (identity across channels).

    Args:
        channels: D.
        kernel_size: T (zero padding ((T-1)//2, T//2), so the centre tap is index (T-1)//2).
        init: ``identity`` (f_t = unit impulse at the centre tap) or ``average`` (f_t = 1/T).
    """

    def __init__(self, channels: int, kernel_size: int = 3, init: str = "identity") -> None:
        super().__init__()
        if init not in TEMPORAL_INITS:
            raise ValueError(f"unknown temporal init {init!r}; valid: {', '.join(TEMPORAL_INITS)}")
        self.padding = same_padding(kernel_size)
        self.conv = nn.Conv1d(channels, channels, kernel_size)
        if init == "identity":
            f_t = torch.zeros(kernel_size)
            f_t[self.padding[0]] = 1.0
        else:
            f_t = torch.full((kernel_size,), 1.0 / kernel_size)
        with torch.no_grad():
            # Conv1d weight (out, in, T) = I_D (x) f_t (eq. 9); bias b = 0 (eq. 8).
            self.conv.weight.copy_(torch.eye(channels)[:, :, None] * f_t)
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        y = self.conv(F.pad(x.transpose(1, 2), self.padding))
        return y.transpose(1, 2)


class _ResidualUnit(nn.Module):
    """x̂ = f(x) + BN(T(z)) over (B, N, D), z the (gated) input of the residual branch."""

    def __init__(self, d: int, kernel_size: int, init: str) -> None:
        super().__init__()
        self.temporal = IdentityTemporalConv(d, kernel_size, init)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        r = self.bn(self.temporal(z).transpose(1, 2)).transpose(1, 2)
        return F.relu(x) + r


class STMultiplierHead(Head):
    """Motion-gated residual temporal head (B, N, D), (B, N, D) -> (B, C) log-probabilities.

    Args:
        num_classes, rgb_dim, flow_dim, num_segments: see :class:`~pipeline.models.fusion.Head`.
        temporal_kernel: T of the temporal convolutions (eq. 8; 3 by default).
        temporal_init: ``identity`` | ``average`` (eq. 9, see module docstring).
        dropout: dropout before each classifier.
    """

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 temporal_kernel: int = 3, temporal_init: str = "identity",
                 dropout: float = 0.5) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        if rgb_dim != flow_dim:
            raise ValueError(
                f"ST-Multiplier gates appearance by motion element-wise and needs equal widths, "
                f"got rgb_dim={rgb_dim}, flow_dim={flow_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.unit_a = _ResidualUnit(rgb_dim, temporal_kernel, temporal_init)
        self.unit_m = _ResidualUnit(flow_dim, temporal_kernel, temporal_init)
        self.dropout = nn.Dropout(dropout)
        self.fc_a = nn.Linear(rgb_dim, num_classes)
        self.fc_m = nn.Linear(flow_dim, num_classes)

    def stream_logits(self, rgb: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C) logits of the appearance and the motion classifier."""
        self.check_inputs(rgb, flow)
        gate = F.relu(flow)
        xa = self.unit_a(rgb, rgb * gate)  # eq. 5
        xm = self.unit_m(flow, gate)
        # Global max pooling over time (eq. 10).
        za, zm = xa.amax(dim=1), xm.amax(dim=1)
        return self.fc_a(self.dropout(za)), self.fc_m(self.dropout(zm))

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        za, zm = self.stream_logits(rgb, flow)
        return log_mean_probs([F.log_softmax(za, dim=-1), F.log_softmax(zm, dim=-1)])

    def loss(self, rgb: Tensor, flow: Tensor, target: Tensor) -> Tensor:
        """[ST-Mult] §5.1: one softmax cross-entropy per stream ("two loss layers"), summed."""
        za, zm = self.stream_logits(rgb, flow)
        return F.cross_entropy(za, target) + F.cross_entropy(zm, target)


def build_stmultiplier(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int,
                       **kwargs) -> STMultiplierHead:
    """Registry builder for ``stmultiplier``; kwargs: temporal_kernel, temporal_init, dropout."""
    return STMultiplierHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)
