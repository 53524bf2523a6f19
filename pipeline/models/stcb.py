"""Spatiotemporal Compact Bilinear (STCB) fusion ([STPN], §3.1-3.2, Algorithm 1) and its heads.

STCB(v_1, ..., v_m) = IFFT( prod_i FFT( Psi(v_i; h_i, s_i) ) ), where Psi is the Count Sketch
(Charikar et al.) of v_i in R^{p_i} into R^d: v'(h_i(j)) += s_i(j) v_i(j), with h_i uniform in
{0..d-1}^{p_i} and s_i uniform in {-1, 1}^{p_i}, drawn once and then fixed (Algorithm 1, lines 1-6).
It is the Tensor Sketch (Pham & Pagh) of the outer product v_1 (x) ... (x) v_m, so
E[<STCB(x, y), STCB(x', y')>] = <x, x'><y, y'>. The h_i, s_i are registered buffers: they are
saved in and restored from the state dict (a head trained with one sketch must be evaluated
with the same one).

Normalisation: [STPN] does not state any; it cites compact bilinear pooling (Gao et al.,
CVPR 2016, its ref. [7]), which follows the bilinear output with a signed square root and L2
normalisation. The heads here apply that (``normalize=True``, the default); the bare operator
:class:`CompactBilinear` does not.

Heads (inputs rgb (B, N, Da), flow (B, N, Dm); output log-probabilities (B, C)):

- :class:`STCBHead`: per segment z_n = norm(STCB(rgb_n, flow_n)) (the spatiotemporal fusion
  of §3.1, d = 4096 per Table 3), average over the N segments, dropout, linear, log-softmax.
- :class:`STCBTemporalHead`: the multi-path temporal fusion of §3.2 first. [STPN] feeds
  each chunk with several optical-flow stacks around its centre (3 paths best, Table 4) and
  fuses them with one STCB. A head sees one flow feature per segment, so path r of segment n
  is the flow feature of segment n + r - (paths - 1) // 2 (the neighbouring segments),
  replicated at the ends of the sequence. t_n = norm(STCB(flow_{n-1}, flow_n, flow_{n+1})),
  then z_n = norm(STCB(rgb_n, t_n)) and the same aggregation and classifier as STCBHead.
  (The paper's random interval tau in 1..10 frames has no counterpart at segment level; docs/networks.md
  proposes taking the paths from neighbouring cached positions instead. The full pyramid: stpn.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import Classifier, Head

__all__ = [
    "CompactBilinear",
    "count_sketch",
    "signed_sqrt_l2",
    "STCBHead",
    "STCBTemporalHead",
    "build_stcb",
    "build_stcb_temporal",
]

# Output dimension of STCB ([STPN], Table 3: 4096 is "appropriate for both video datasets").
DEFAULT_STCB_DIM = 4096


def count_sketch(x: Tensor, h: Tensor, s: Tensor, d: int) -> Tensor:
    """Count Sketch of the last axis: (..., p) -> (..., d), out[..., h[j]] += s[j] * x[..., j]."""
    out = x.new_zeros(*x.shape[:-1], d)
    return out.index_add(-1, h, x * s)


def signed_sqrt_l2(z: Tensor, eps: float = 1e-12) -> Tensor:
    """sign(z) sqrt(|z|), then L2 normalisation over the last axis (compact bilinear pooling)."""
    z = torch.sign(z) * torch.sqrt(z.abs() + eps)
    return F.normalize(z, dim=-1)


class CompactBilinear(nn.Module):
    """STCB over any number of inputs (Algorithm 1). Inputs (..., p_i) -> output (..., d).

    Args:
        input_dims: p_1..p_m, one per fused input (m >= 1).
        output_dim: d (4096 in [STPN]).
        seed: seed of the generator that draws h_i, s_i (fixed afterwards, kept as buffers).
    """

    def __init__(self, input_dims: list[int] | tuple[int, ...], output_dim: int = DEFAULT_STCB_DIM,
                 *, seed: int = 0) -> None:
        super().__init__()
        input_dims = tuple(int(p) for p in input_dims)
        if not input_dims or any(p <= 0 for p in input_dims):
            raise ValueError(f"input_dims must be a non-empty list of positive sizes, got {input_dims}")
        if output_dim <= 0:
            raise ValueError(f"output_dim must be positive, got {output_dim}")
        self.input_dims = input_dims
        self.output_dim = int(output_dim)
        gen = torch.Generator().manual_seed(seed)
        for i, p in enumerate(input_dims):
            h = torch.randint(0, output_dim, (p,), generator=gen)
            s = torch.randint(0, 2, (p,), generator=gen).float() * 2 - 1
            self.register_buffer(f"h{i}", h)
            self.register_buffer(f"s{i}", s)

    def sketch(self, i: int, x: Tensor) -> Tensor:
        """Count Sketch of input i: (..., p_i) -> (..., d)."""
        return count_sketch(x, getattr(self, f"h{i}"), getattr(self, f"s{i}").to(x.dtype), self.output_dim)

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_dims):
            raise ValueError(f"STCB built for {len(self.input_dims)} inputs, got {len(inputs)}")
        for i, (x, p) in enumerate(zip(inputs, self.input_dims)):
            if x.shape[-1] != p:
                raise ValueError(f"STCB input {i} must have last dimension {p}, got {tuple(x.shape)}")
        d = self.output_dim
        # Line 13: product of the sketches' spectra, back to the signal domain (float32 FFT).
        spectrum = None
        for i, x in enumerate(inputs):
            f = torch.fft.rfft(self.sketch(i, x.float()), n=d, dim=-1)
            spectrum = f if spectrum is None else spectrum * f
        return torch.fft.irfft(spectrum, n=d, dim=-1).to(inputs[0].dtype)

    def extra_repr(self) -> str:
        return f"input_dims={self.input_dims}, output_dim={self.output_dim}"


def _neighbour_paths(x: Tensor, paths: int) -> list[Tensor]:
    """(B, N, D) -> `paths` tensors (B, N, D); path r holds segment n + r - (paths-1)//2, clamped."""
    n = x.shape[1]
    centre = (paths - 1) // 2
    index = torch.arange(n, device=x.device)
    return [x[:, (index + r - centre).clamp(0, n - 1)] for r in range(paths)]


class STCBHead(Head):
    """Per-segment STCB of appearance and motion, temporal average, linear classifier.

    Args:
        num_classes, rgb_dim, flow_dim, num_segments: see :class:`~pipeline.models.fusion.Head`.
        stcb_dim: STCB output dimension d ([STPN] Table 3: 4096).
        normalize: signed sqrt + L2 after each STCB (compact bilinear pooling, [STPN] ref. [7]).
        dropout: dropout before the classifier.
        seed: seed of the count-sketch draws.
    """

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 stcb_dim: int = DEFAULT_STCB_DIM, normalize: bool = True, dropout: float = 0.5,
                 seed: int = 0) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        self.normalize = normalize
        self.stcb = CompactBilinear([rgb_dim, flow_dim], stcb_dim, seed=seed)
        self.classifier = Classifier(stcb_dim, num_classes, dropout)

    def _norm(self, z: Tensor) -> Tensor:
        return signed_sqrt_l2(z) if self.normalize else z

    def fuse(self, rgb: Tensor, flow: Tensor) -> Tensor:
        """(B, N, Da), (B, N, Dm) -> (B, N, stcb_dim)."""
        return self._norm(self.stcb(rgb, flow))

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        return F.log_softmax(self.classifier(self.fuse(rgb, flow)), dim=-1)


class STCBTemporalHead(STCBHead):
    """Multi-path temporal STCB on the flow sequence ([STPN] §3.2), then STCB with appearance.

    Args (beyond :class:`STCBHead`):
        paths: number of flow paths per segment ([STPN] Table 4: 3 is best); path r of
            segment n is segment n + r - (paths-1)//2, clamped to the sequence.
    """

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 paths: int = 3, stcb_dim: int = DEFAULT_STCB_DIM, normalize: bool = True,
                 dropout: float = 0.5, seed: int = 0) -> None:
        if paths < 1:
            raise ValueError(f"paths must be >= 1, got {paths}")
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments, stcb_dim=stcb_dim,
                         normalize=normalize, dropout=dropout, seed=seed)
        self.paths = paths
        self.temporal_stcb = CompactBilinear([flow_dim] * paths, stcb_dim, seed=seed + 1)
        # The spatiotemporal STCB fuses appearance with the temporal STCB's output.
        self.stcb = CompactBilinear([rgb_dim, stcb_dim], stcb_dim, seed=seed)

    def fuse(self, rgb: Tensor, flow: Tensor) -> Tensor:
        """(B, N, Da), (B, N, Dm) -> (B, N, stcb_dim)."""
        temporal = self._norm(self.temporal_stcb(*_neighbour_paths(flow, self.paths)))
        return self._norm(self.stcb(rgb, temporal))


def build_stcb(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> STCBHead:
    """Registry builder for ``stcb``; kwargs: stcb_dim, normalize, dropout, seed."""
    return STCBHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)


def build_stcb_temporal(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int,
                        **kwargs) -> STCBTemporalHead:
    """Registry builder for ``stcb_temporal``; kwargs: paths, stcb_dim, normalize, dropout, seed."""
    return STCBTemporalHead(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)
