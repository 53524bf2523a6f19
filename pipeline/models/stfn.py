"""Spatio-Temporal Fusion Network head ([STFN], §3, eq. 1, Fig. 2, 4, 5).

    STFN(F^a, F^m) = H(F(G(F(F^a; W_a), F(F^m; W_m)); W_fa)) + H(F(G(...); W_fm))      (eq. 1)

- F(.; W_x): K consecutive Res-Inc blocks (:mod:`pipeline.models.resinc`), K = ``blocks``.
- G: element-wise fusion ``avg`` (eq. 4), ``mul`` (eq. 5), ``max`` (eq. 6), or ``stcb``
  (compact bilinear, [STPN], output ``stcb_dim`` with signed sqrt + L2).
- ``direction`` (Fig. 5, §4.5), i.e. which follow-up block receives the fused sequence P':
    ``bi``  (A<->M): both W_fa and W_fm receive P';
    ``m2a`` (A<-M, motion injected into appearance): W_fa receives P', W_fm receives P^m;
    ``a2m`` (A->M, appearance injected into motion): W_fm receives P', W_fa receives P^a.
- ``arch`` (Fig. 4): ``a`` as above; ``b`` without the follow-up blocks W_fa, W_fm (each H
  reads the sequence its follow-up block would have received); ``c`` the two feature
  sequences concatenated per segment, one path of K Res-Inc blocks on Da+Dm channels and
  one H (fusion and direction do not apply).
- H (the prediction function, "Softmax function ... is chosen for H"): the paper does not
  state how the N outputs become one prediction. Here H = temporal average over the N
  segments, dropout, linear, softmax: the average keeps one architecture for every N
  (Table 4: N = 3..9) and is TSN's consensus, which STFN builds on ("learned in an end-to-end
  scheme like TSN"); dropout (0.5 by default) is our regularisation choice on 2048-d inputs.
- The two paths' softmax predictions are summed (eq. 1); the head returns
  log((p_a + p_m) / 2), the log of the normalised sum (see :mod:`pipeline.models.fusion`).

Feature dimensions: avg/max/mul need equal widths. With Da != Dm, pass ``fused_dim`` and each
stream whose width differs is first projected to it by a per-segment linear map (an addition
to the paper, which uses 2048-d for both streams); without it the constructor raises.
``stcb`` fuses any widths; Res-Inc widths must be divisible by 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import FUSIONS, Classifier, Head, fuse, log_mean_probs
from .resinc import ResIncStack
from .stcb import DEFAULT_STCB_DIM, CompactBilinear, signed_sqrt_l2

__all__ = ["STFN", "ARCHS", "DIRECTIONS", "STFN_FUSIONS", "build_stfn"]

ARCHS = ("a", "b", "c")
DIRECTIONS = ("bi", "a2m", "m2a")
STFN_FUSIONS = FUSIONS + ("stcb",)


class STFN(Head):
    """STFN head: (B, N, Da), (B, N, Dm) -> (B, C) log-probabilities.

    Args:
        num_classes, rgb_dim, flow_dim, num_segments: see :class:`~pipeline.models.fusion.Head`.
        arch: ``a`` | ``b`` | ``c`` (Fig. 4; ``a`` is the paper's default).
        fusion: G, ``avg`` | ``max`` | ``mul`` | ``stcb`` (§3.2; ``avg`` is the default, §4.4).
            With arch ``c`` only ``avg`` (the default, ignored) or ``concat`` are accepted.
        direction: ``bi`` | ``a2m`` | ``m2a`` (Fig. 5; ``bi`` is the default, §4.5).
        blocks: K, Res-Inc blocks in each F(.; W_x) (§4.3: one per stage; more hurt).
        dropout: dropout in H.
        fused_dim: common width for differing Da, Dm (see the module docstring).
        stcb_dim: output width of the ``stcb`` fusion ([STPN] Table 3: 4096).
        seed: seed of the ``stcb`` count-sketch draws.
    """

    def __init__(self, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, *,
                 arch: str = "a", fusion: str = "avg", direction: str = "bi", blocks: int = 1,
                 dropout: float = 0.5, fused_dim: int | None = None,
                 stcb_dim: int = DEFAULT_STCB_DIM, seed: int = 0) -> None:
        super().__init__(num_classes, rgb_dim, flow_dim, num_segments)
        if arch not in ARCHS:
            raise ValueError(f"unknown STFN arch {arch!r}; valid: {', '.join(ARCHS)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown STFN direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.arch, self.direction, self.blocks = arch, direction, blocks

        if arch == "c":
            if fusion not in ("avg", "concat") or direction != "bi":
                raise ValueError(
                    "STFN arch 'c' fuses by concatenating the features before a single Res-Inc "
                    f"path (Fig. 4c); fusion={fusion!r} / direction={direction!r} do not apply"
                )
            self.fusion = "concat"
            self.path = ResIncStack(rgb_dim + flow_dim, blocks)
            self.classifier = Classifier(rgb_dim + flow_dim, num_classes, dropout)
            return

        if fusion not in STFN_FUSIONS:
            raise ValueError(f"unknown STFN fusion {fusion!r}; valid: {', '.join(STFN_FUSIONS)}")
        self.fusion = fusion
        da, dm = rgb_dim, flow_dim
        self.proj_a: nn.Module = nn.Identity()
        self.proj_m: nn.Module = nn.Identity()
        if fusion != "stcb" and da != dm:
            if fused_dim is None:
                raise ValueError(
                    f"fusion {fusion!r} needs equal rgb and flow widths, got {da} and {dm}; "
                    "pass fused_dim to project both streams to a common width"
                )
            if da != fused_dim:
                self.proj_a = nn.Linear(da, fused_dim)
            if dm != fused_dim:
                self.proj_m = nn.Linear(dm, fused_dim)
            da = dm = fused_dim

        self.stream_a = ResIncStack(da, blocks)  # W_a
        self.stream_m = ResIncStack(dm, blocks)  # W_m
        if fusion == "stcb":
            self.stcb = CompactBilinear([da, dm], stcb_dim, seed=seed)
            d_fused = stcb_dim
        else:
            d_fused = da
        in_a = d_fused if direction in ("bi", "m2a") else da
        in_m = d_fused if direction in ("bi", "a2m") else dm
        follow_blocks = blocks if arch == "a" else 0
        self.follow_a = ResIncStack(in_a, follow_blocks)  # W_fa (identity for arch b)
        self.follow_m = ResIncStack(in_m, follow_blocks)  # W_fm
        self.classifier_a = Classifier(in_a, num_classes, dropout)  # H on the appearance path
        self.classifier_m = Classifier(in_m, num_classes, dropout)  # H on the motion path

    def fuse(self, pa: Tensor, pm: Tensor) -> Tensor:
        """G over (B, N, d) sequences -> (B, N, d) (or (B, N, stcb_dim))."""
        if self.fusion == "stcb":
            return signed_sqrt_l2(self.stcb(pa, pm))
        return fuse(self.fusion, pa, pm)

    def path_inputs(self, rgb: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        """The sequences fed to W_fa and W_fm (arch a/b): fused or own stream per ``direction``."""
        pa = self.stream_a(self.proj_a(rgb))
        pm = self.stream_m(self.proj_m(flow))
        fused = self.fuse(pa, pm)
        in_a = fused if self.direction in ("bi", "m2a") else pa
        in_m = fused if self.direction in ("bi", "a2m") else pm
        return in_a, in_m

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        self.check_inputs(rgb, flow)
        if self.arch == "c":
            x = self.path(torch.cat([rgb, flow], dim=-1))
            return F.log_softmax(self.classifier(x), dim=-1)
        in_a, in_m = self.path_inputs(rgb, flow)
        log_pa = F.log_softmax(self.classifier_a(self.follow_a(in_a)), dim=-1)
        log_pm = F.log_softmax(self.classifier_m(self.follow_m(in_m)), dim=-1)
        return log_mean_probs([log_pa, log_pm])


def build_stfn(*, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int, **kwargs) -> STFN:
    """Registry builder for ``stfn``; kwargs: arch, fusion, direction, blocks, dropout,
    fused_dim, stcb_dim, seed."""
    return STFN(num_classes, rgb_dim, flow_dim, num_segments, **kwargs)
