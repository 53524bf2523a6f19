"""Factorized spatio-temporal convolutional network, FstCN ([FstCN] §2, Fig. 1, §2.5).

A 3-D kernel restricted to K = K_xy (x) k_t (eq. 2) is a per-frame 2-D convolution followed by a
per-pixel 1-D temporal convolution (eq. 3). FstCN builds on that: spatial convolutional layers
(SCLs) on single frames, then a transformation-and-permutation (T-P) operator and a temporal
convolutional layer (TCL) over the (time, feature-channel) plane, beside a spatial path on one frame::

    diff (B, l_t, 3, S, S) --lower SCLs--> (B·l_t, c, h, w) --SCL 128--> (B·l_t, 128, x, y)
        --T-P--> (B, x·y, l_t, f') --TCL 3x3 ‖ 5x5--> (B, 64, l_t, f') --FC 4096--FC 2048--┐
    frame (B, 3, S, S)   --lower SCLs--> (B, c, h, w)     --SCL 128--> (B, 128, x, y)        ├ concat
        -------------------------------------------------------------------FC 4096--FC 2048--┘
        --> FC 2048 --> classifier (B, C); one cross-entropy loss.

What goes where (§2.2, last paragraph): the frames of V_clip and V_diff both pass the *same* lower SCLs;
every frame of V_diff (eq. 4, ``batch["diff"]``) goes on to the T-P operator and the TCL; one frame of
V_clip (``batch["frame"]``: a random one in training, the middle one at test) goes to the parallel SCL.

Layers ([FstCN] §2.5):

* Lower SCLs (:class:`LowerSCLs`): ``Conv(96,7,2)-ReLU-LRN-Pool(3,2)-Conv(256,5,2)-ReLU-LRN-Pool(3,2)-
  Conv(512,3,1)-ReLU-Conv(512,3,1)-ReLU`` ("ReLU ... applied to all the hidden weights layers"). Paddings
  (0, 1, 1, 1) and ceil-rounded pooling are those of the CNN-M-2048 spatial net of [Two-Stream], whose
  settings §2.5 says the spatial path shares; with them a 204 x 204 input gives 12 x 12 maps and the SCL
  before the TCL gives the 4 x 4 map. Alternatively (:class:`ResNetLowerSCLs`) the convolutional trunk of a
  ResNet from this pipeline's RGB ``finetune`` checkpoint, up to ``layer4`` (or ``layer3``).
* LRN (:func:`caffe_lrn`): k = 2, n = 5, alpha = 5e-4, beta = 0.75. The paper gives AlexNet's settings
  in Caffe's convention, b = a / (k + alpha/n · sum a^2)^beta (AlexNet's own paper writes alpha = 1e-4
  without the 1/n; 5e-4 / 5 = 1e-4). ``torch.nn.LocalResponseNorm`` divides by n the same way (it
  averages the squares over the window, zero-padded, always dividing by n), so alpha = 5e-4 is passed
  unchanged; ``tests/test_fstcn.py`` checks the layer against the numpy formula.
* SCL before the TCL and the parallel SCL (:class:`SpatialConvLayer`): ``Conv(128,3,1)``, ReLU,
  ``Pool(3,3)`` (padding 1, ceil rounding). Whether the two share weights is not stated: they do not by
  default (``share_scl=False``), since one sees |frame differences| and the other plain frames.
* T-P (:class:`TransformPermute`): vectorise x x y, transform to (x·y, t, f), multiply the f channels by a
  learned ``P`` in R^{f x f'} (f = f' = 128), Gaussian init.
* TCL (:class:`TemporalConvLayer`): parallel 2-D convolutions over (t, f'), 3 x 3 and 5 x 5, 32 filters
  each, stride 1, "same" zero padding, ReLU and dropout 0.5 each, concatenated; no pooling (§2.5:
  "pooling will ruin the temporal cues"), so the temporal length l_t is kept.
* Heads: FC 4096 -> FC 2048 per path (ReLU; dropout ``fc_dropout``, as CNN-M's fc6/fc7), concatenated,
  FC 2048, classifier. ``paths="scl"`` or ``"tcl"`` keeps one path (its FC 2048 then feeds the
  classifier): Table 2's "only SCL / TCL path" rows.
* Auxiliary classifier (§2.3, after GoogLeNet's): on the lower SCLs' maps, for pre-training the lower
  SCLs on single frames (:meth:`FstCN.forward_auxiliary`); it is not part of the global training's loss.

Initialisation (not stated): He-normal convolutions and hidden FC layers, zero biases, classifiers
N(0, 0.001) as the pipeline's backbones' (:meth:`pipeline.models.backbones.Backbone.reset_classifier`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.sampling import fstcn_scl_frame

from .backbones import backbone_info, create_backbone, load_finetuned_trunk

__all__ = [
    "LRN",
    "OPTIONS",
    "PATHS",
    "TRUNK_LAYERS",
    "AuxiliaryClassifier",
    "FstCN",
    "LowerSCLs",
    "ResNetLowerSCLs",
    "SpatialConvLayer",
    "TemporalConvLayer",
    "TransformPermute",
    "build_fstcn",
    "caffe_lrn",
    "parse_kernels",
]

#: [FstCN] §2.5 (AlexNet's settings, Caffe's convention: alpha is divided by n).
LRN = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}
PATHS = ("both", "scl", "tcl")
LOWER_KINDS = ("paper", "resnet")
TRUNK_LAYERS = ("layer3", "layer4")


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0, *, ceil: bool = False) -> int:
    """Output side of a convolution / pooling (PyTorch's rule; for ceil pooling without padding, Caffe's)."""
    num = size + 2 * padding - kernel
    out = (-(-num // stride) if ceil else num // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input (or its left padding)
    return out


def caffe_lrn() -> nn.LocalResponseNorm:
    """Local response normalisation across channels with [FstCN] §2.5's constants (:data:`LRN`):
    b_c = a_c / (2 + 5e-4 / 5 · sum_{|c'-c| <= 2} a_{c'}^2)^0.75 (Caffe's alpha / n = AlexNet's 1e-4)."""
    return nn.LocalResponseNorm(**LRN)


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _classifier(in_features: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(in_features, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.001)
    nn.init.zeros_(fc.bias)
    return fc


# --------------------------------------------------------------------------------------------
# Lower SCLs
# --------------------------------------------------------------------------------------------


class LowerSCLs(nn.Module):
    """The four lower SCLs of [FstCN] §2.5: (N, 3, S, S) -> (N, 512, h, h); h = 12 for S = 204.

    ``Conv(96,7,2)-ReLU-LRN-Pool(3,2)-Conv(256,5,2)-ReLU-LRN-Pool(3,2)-Conv(512,3,1)-ReLU-Conv(512,3,1)-ReLU``
    with paddings 0, 1, 1, 1 and ceil-rounded max pooling (CNN-M-2048 of [Two-Stream], as in Caffe).
    No ImageNet weights for it exist offline: train it from scratch (with :class:`AuxiliaryClassifier`)
    or load a user's state dict.
    """

    out_channels = 512

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2)
        self.norm1 = caffe_lrn()
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(96, 256, 5, stride=2, padding=1)
        self.norm2 = caffe_lrn()
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4 = nn.Conv2d(512, 512, 3, padding=1)
        _he_init(self)

    @staticmethod
    def output_size(size: int) -> int:
        """Side of the output map for an input side ``size`` (204 -> 12)."""
        s = _conv_out(size, 7, 2)
        s = _conv_out(s, 3, 2, ceil=True)
        s = _conv_out(s, 5, 2, 1)
        return _conv_out(s, 3, 2, ceil=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, 512, h, h)."""
        x = self.pool1(self.norm1(F.relu(self.conv1(x))))
        x = self.pool2(self.norm2(F.relu(self.conv2(x))))
        return F.relu(self.conv4(F.relu(self.conv3(x))))


class ResNetLowerSCLs(nn.Module):
    """A ResNet's convolutional trunk (stem, ``layer1`` .. ``layer3`` or ``layer4``) as the lower SCLs.

    (N, 3, S, S) -> (N, c, h, h) with stride 32 (``layer4``: c = the backbone's ``num_features``, 512
    for ResNet-18/34, 2048 for ResNet-50/101/152; h = 7 for S = 204) or 16 (``layer3``: c / 2, h = 13):
    :meth:`pipeline.models.backbones.Backbone.forward_map`, with ``layer4`` replaced by the identity for
    ``layer3``.

    Args:
        arch: a ResNet of :func:`pipeline.models.backbones.list_backbones`.
        state: the weights, the ``"model"`` entry of an RGB ``finetune`` checkpoint (a
            :class:`~pipeline.models.backbones.Backbone` state dict, keys ``trunk.*``; ``fc.*`` is ignored),
            loaded by :func:`~pipeline.models.backbones.load_finetuned_trunk`. None: random initialisation.
        layers: the last ResNet stage kept, ``layer4`` (the whole trunk) or ``layer3``.
    """

    def __init__(self, arch: str, state: Mapping[str, Tensor] | None = None, *, layers: str = "layer4") -> None:
        super().__init__()
        if not arch.startswith("resnet"):
            raise ValueError(f"the lower SCLs take a ResNet trunk, not {arch!r}")
        if layers not in TRUNK_LAYERS:
            raise ValueError(f"unknown trunk_layers {layers!r}; valid: {', '.join(TRUNK_LAYERS)}")
        self.backbone = create_backbone(arch, num_classes=0)
        if state is not None:
            conv = state.get("trunk.conv1.weight", state.get("module.trunk.conv1.weight"))
            if conv is not None and conv.dim() == 4 and conv.shape[1] != 3:
                raise ValueError(f"the {arch} state dict's first convolution takes {conv.shape[1]} channels; FstCN "
                                 "learns from RGB frames: pass the RGB stream's finetune checkpoint, not the flow one")
            load_finetuned_trunk(self.backbone, state, "rgb")
        if layers == "layer3":
            self.backbone.trunk.layer4 = nn.Identity()
        self.arch, self.layers = arch, layers
        width = backbone_info(arch)["num_features"]
        self.out_channels = width if layers == "layer4" else width // 2

    def output_size(self, size: int) -> int:
        """Side of the output map for an input side ``size`` (204 -> 7 with layer4, 13 with layer3)."""
        s = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
        for _ in range(3 if self.layers == "layer4" else 2):
            s = _conv_out(s, 3, 2, 1)
        return s

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, c, h, h)."""
        return self.backbone.forward_map(x)


# --------------------------------------------------------------------------------------------
# SCL, T-P operator, TCL
# --------------------------------------------------------------------------------------------


class SpatialConvLayer(nn.Module):
    """``Conv(128,3,1)-ReLU-Pool(3,3)`` ([FstCN] §2.5): (N, c, h, h) -> (N, 128, x, x); 12 -> 4 (ceil)."""

    def __init__(self, in_channels: int, channels: int = 128) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 3, ceil_mode=True)
        self.out_channels = channels
        _he_init(self)

    @staticmethod
    def output_size(size: int) -> int:
        return _conv_out(size, 3, 3, ceil=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.conv(x)))


class TransformPermute(nn.Module):
    """The T-P operator ([FstCN] §2.1): (B, t, f, x, y) -> (B, x·y, t, f').

    Vectorise each x x y map (row-major: position ``i·y + j`` holds ``(i, j)``), transform the 4-D array
    to (x·y, t, f) so that a 2-D convolution runs over (t, f) with the x·y positions as its input
    channels, and "permute" the feature channels with the learned P in R^{f x f'}:
    ``out[b, s, t, g] = sum_c v[b, s, t, c] · P[c, g]``, "f' new feature maps via weighted combination of
    the f input feature maps". P is initialised from N(0, std^2); std (not stated) defaults to
    1 / sqrt(f), which gives its columns unit expected norm, as a permutation matrix's.
    """

    def __init__(self, f: int = 128, f_prime: int = 128, *, std: float | None = None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(f) if std is None else std
        self.P = nn.Parameter(torch.randn(f, f_prime) * std)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[2] != self.P.shape[0]:
            raise ValueError(f"T-P expects (B, t, {self.P.shape[0]}, x, y), got {tuple(x.shape)}")
        b, t, f, h, w = x.shape
        v = x.reshape(b, t, f, h * w).permute(0, 3, 1, 2)  # vectorise, transform: (B, x·y, t, f)
        return v @ self.P  # permute: (B, x·y, t, f')


class TemporalConvLayer(nn.Module):
    """The TCL ([FstCN] §2.1, §2.5): (B, x·y, t, f') -> (B, filters · len(kernels), t, f').

    One branch per kernel size k (Table 1: 3 and 5): ``Conv(filters, k, 1)`` over the (t, f') plane with
    zero padding k // 2 (the size is kept), ReLU, dropout; the branches are concatenated in the order of
    ``kernels``. No pooling.
    """

    def __init__(self, in_channels: int, *, kernels: Sequence[int] = (3, 5), filters: int = 32,
                 dropout: float = 0.5) -> None:
        super().__init__()
        kernels = tuple(kernels)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"TCL kernels must be odd sizes >= 1 (size-keeping padding), got {kernels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.kernels = kernels
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, filters, k, padding=k // 2), nn.ReLU(), nn.Dropout(dropout))
            for k in kernels)
        self.out_channels = filters * len(kernels)
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def _fc(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Linear, ReLU, dropout (He-initialised)."""
    block = nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(), nn.Dropout(dropout))
    _he_init(block)
    return block


class AuxiliaryClassifier(nn.Module):
    """Auxiliary classifier on the lower SCLs for their pre-training ([FstCN] §2.3, after GoogLeNet's).

    (N, c, h, w) -> (N, C): average pooling to 4 x 4, ``Conv(128,1,1)``-ReLU, FC ``width``-ReLU, dropout
    0.7, linear classifier: the three weight layers §2.3 fine-tunes ("only fine-tuning the last three
    layers of the auxiliary network"). GoogLeNet pools 5 x 5 with stride 3 from 14 x 14 to 4 x 4; the
    adaptive pooling here reaches 4 x 4 from any map size.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 1024, dropout: float = 0.7) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = nn.Conv2d(in_channels, 128, 1)
        self.fc = _fc(128 * 16, width, dropout)
        self.classifier = _classifier(width, num_classes)
        _he_init(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fc(F.relu(self.conv(self.pool(x))).flatten(1)))


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class FstCN(nn.Module):
    """FstCN ([FstCN] Fig. 1): ``{"diff": (B, l_t, 3, S, S), "frame": (B, 3, S, S)} -> {"logits": (B, C)}``.

    Inputs are float, normalised (as RGB frames for the lower SCLs). ``"frame"`` is the V_clip frame of
    the SCL path; without it, at test (eval mode), the middle frame of ``"clip"`` (B, l_t, 3, S, S) is
    taken (:func:`pipeline.data.sampling.fstcn_scl_frame`); in training the sample's random frame must
    come as ``"frame"``. ``paths="scl"`` needs no ``"diff"``, ``paths="tcl"`` no frame.

    Args:
        num_classes: C.
        l_t: frames per clip (the TCL's temporal length; the FC after the TCL depends on it).
        input_size: S (204 in §2.5); the FC widths depend on the map size it gives.
        lower_scls: the lower SCLs, a module with ``out_channels`` and ``output_size(S)``;
            None builds :class:`LowerSCLs`.
        scl_channels: f, the filters of the 128-channel SCLs (§2.5: 128).
        permuted_channels: f', the columns of P (§2.5: f' = f = 128).
        tcl_kernels, tcl_filters, tcl_dropout: the TCL (§2.5: (3, 5), 32, 0.5).
        fc_widths: the two FC layers of each path (§2.5: 4096, 2048).
        fused_width: the FC after the concatenation (§2.5: 2048).
        fc_dropout: dropout after each hidden FC layer (not stated; CNN-M's 0.5).
        share_scl: one 128-channel SCL for both paths (not stated; default: two).
        paths: ``both`` | ``scl`` | ``tcl`` (Table 2's rows).
        auxiliary: add the auxiliary classifier of §2.3 (:meth:`forward_auxiliary`).
        aux_width: its FC width (GoogLeNet's 1024).
    """

    def __init__(self, *, num_classes: int, l_t: int = 5, input_size: int = 204,
                 lower_scls: nn.Module | None = None, scl_channels: int = 128, permuted_channels: int = 128,
                 tcl_kernels: Sequence[int] = (3, 5), tcl_filters: int = 32, tcl_dropout: float = 0.5,
                 fc_widths: tuple[int, int] = (4096, 2048), fused_width: int = 2048, fc_dropout: float = 0.5,
                 share_scl: bool = False, paths: str = "both", auxiliary: bool = False,
                 aux_width: int = 1024) -> None:
        super().__init__()
        if paths not in PATHS:
            raise ValueError(f"unknown paths {paths!r}; valid: {', '.join(PATHS)}")
        if num_classes < 2 or l_t < 1:
            raise ValueError(f"need num_classes >= 2 and l_t >= 1, got {num_classes}, {l_t}")
        if not 0.0 <= fc_dropout < 1.0:
            raise ValueError(f"fc_dropout must be in [0, 1), got {fc_dropout}")
        self.num_classes, self.l_t, self.input_size, self.paths = num_classes, l_t, input_size, paths
        self.lower = LowerSCLs() if lower_scls is None else lower_scls
        h = self.lower.output_size(input_size)
        x = SpatialConvLayer.output_size(h)
        if h < 1 or x < 1:
            raise ValueError(f"input_size {input_size} is too small for these lower SCLs")
        self.map_size = x
        fc1, fc2 = fc_widths
        c = self.lower.out_channels
        self.uses_tcl, self.uses_scl = paths in ("both", "tcl"), paths in ("both", "scl")
        if self.uses_scl:
            self.scl = SpatialConvLayer(c, scl_channels)
            self.scl_fc = nn.Sequential(_fc(scl_channels * x * x, fc1, fc_dropout), _fc(fc1, fc2, fc_dropout))
        if self.uses_tcl:
            # share_scl: the same module under both names (its parameters are counted once).
            self.tcl_scl = self.scl if share_scl and self.uses_scl else SpatialConvLayer(c, scl_channels)
            self.tp = TransformPermute(scl_channels, permuted_channels)
            self.tcl = TemporalConvLayer(x * x, kernels=tcl_kernels, filters=tcl_filters, dropout=tcl_dropout)
            self.tcl_fc = nn.Sequential(_fc(self.tcl.out_channels * l_t * permuted_channels, fc1, fc_dropout),
                                        _fc(fc1, fc2, fc_dropout))
        if paths == "both":
            self.fuse_fc = _fc(2 * fc2, fused_width, fc_dropout)
            self.classifier = _classifier(fused_width, num_classes)
        else:
            self.classifier = _classifier(fc2, num_classes)
        self.aux = AuxiliaryClassifier(c, num_classes, width=aux_width) if auxiliary else None

    @classmethod
    def from_finetuned(cls, rgb_state: Mapping[str, Tensor], *, rgb_arch: str, num_classes: int,
                       **options: object) -> FstCN:
        """FstCN whose lower SCLs are the RGB ``finetune`` run's ResNet trunk (``lower=resnet``).

        Args:
            rgb_state: the ``"model"`` entry of the RGB finetune checkpoint; the model never reads files.
            rgb_arch: its backbone name (the checkpoint's ``"arch"``).
            num_classes: C.
            options: :data:`OPTIONS` (``lower`` is ``resnet`` here).
        """
        if options.get("lower", "resnet") != "resnet":
            raise ValueError("from_finetuned builds lower=resnet; use build_fstcn for the paper's lower SCLs")
        return build_fstcn(num_classes=num_classes, backbone_arch=rgb_arch, backbone_state=rgb_state,
                           **{**options, "lower": "resnet"})

    def _check(self, x: Tensor, name: str, dims: int) -> None:
        if x.dim() != dims or x.shape[-3] != 3 or x.shape[-2:] != (self.input_size, self.input_size):
            want = "(B, l_t, 3, S, S)" if dims == 5 else "(B, 3, S, S)"
            raise ValueError(f"FstCN's {name!r} must be {want} with S = input_size = {self.input_size}, "
                             f"got {tuple(x.shape)}")

    def _frame(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "frame" in batch:
            frame = batch["frame"]
            self._check(frame, "frame", 4)
            return frame
        if "clip" not in batch:
            raise ValueError("FstCN's SCL path needs batch['frame'] (or batch['clip'] at test)")
        if self.training:
            raise ValueError("in training FstCN's SCL path takes a random frame of each clip ([FstCN] §2.2): "
                             "give it as batch['frame'] (pipeline.data.sampling.fstcn_scl_frame with an rng)")
        clip = batch["clip"]
        self._check(clip, "clip", 5)
        return clip[:, fstcn_scl_frame(clip.shape[1])]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"diff": (B, l_t, 3, S, S), "frame": (B, 3, S, S)}`` -> ``{"logits": (B, C)}``."""
        parts: list[Tensor] = []
        b = t = 0
        if self.uses_tcl:
            if "diff" not in batch:
                raise ValueError("FstCN's TCL path needs batch['diff'], V_diff (B, l_t, 3, S, S) ([FstCN] eq. 4)")
            diff = batch["diff"]
            self._check(diff, "diff", 5)
            if diff.shape[1] != self.l_t:
                raise ValueError(f"FstCN was built for l_t = {self.l_t} frames, got {diff.shape[1]} in 'diff'")
            b, t = diff.shape[:2]
            parts.append(diff.flatten(0, 1))
        if self.uses_scl:
            frame = self._frame(batch)
            if b and frame.shape[0] != b:
                raise ValueError(f"'frame' has {frame.shape[0]} samples, 'diff' {b}")
            parts.append(frame)
        # One pass through the shared lower SCLs (§2.2: "feed individual frames of each pair of V_clip and
        # V_diff into the lower SCLs"); under BatchNorm (a ResNet trunk) both kinds share the statistics.
        low = self.lower(torch.cat(parts) if len(parts) > 1 else parts[0])
        feats = []
        if self.uses_tcl:
            m = self.tcl_scl(low[: b * t])  # (B·l_t, f, x, y)
            z = self.tcl(self.tp(m.unflatten(0, (b, t))))  # (B, x·y, l_t, f') -> (B, 64, l_t, f')
            feats.append(self.tcl_fc(z.flatten(1)))
        if self.uses_scl:
            feats.append(self.scl_fc(self.scl(low[b * t:]).flatten(1)))
        z = self.fuse_fc(torch.cat(feats, dim=1)) if self.paths == "both" else feats[0]
        return {"logits": self.classifier(z)}

    def loss(self, out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        """The one training loss: cross-entropy of the softmax classifier (of the network or, for
        :meth:`forward_auxiliary`'s output, the auxiliary one)."""
        return F.cross_entropy(out["logits"], labels)

    def class_scores(self, out: Mapping[str, Tensor]) -> Tensor:
        """(B, C) class probabilities of one view (softmax); the views of a clip are fused by SCI (eq. 6) and
        the clips by the row-wise maximum (eq. 7): :func:`pipeline.eval.scores.sci_max_fuse`."""
        return F.softmax(out["logits"], dim=-1)

    def forward_auxiliary(self, frames: Tensor) -> dict[str, Tensor]:
        """Pre-training of the lower SCLs on single frames (§2.3): (N, 3, S, S) -> ``{"logits": (N, C)}``."""
        if self.aux is None:
            raise ValueError("this FstCN has no auxiliary classifier (build it with auxiliary=True)")
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"forward_auxiliary takes frames (N, 3, S, S), got {tuple(frames.shape)}")
        return {"logits": self.aux(self.lower(frames))}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """The parameters the auxiliary pre-training trains: the lower SCLs and the auxiliary classifier."""
        if self.aux is None:
            raise ValueError("this FstCN has no auxiliary classifier (build it with auxiliary=True)")
        return [*self.lower.parameters(), *self.aux.parameters()]


# --------------------------------------------------------------------------------------------
# Options and builder
# --------------------------------------------------------------------------------------------

#: The options a user may set: name -> (default, help). Defaults are [FstCN] §2.5's where it states them.
OPTIONS: dict[str, tuple[object, str]] = {
    "lower": ("paper", "lower SCLs: 'paper' (Conv96-Conv256-Conv512-Conv512, [FstCN] §2.5) or 'resnet' "
                       "(the RGB finetune checkpoint's trunk)"),
    "trunk_layers": ("layer4", "with lower=resnet: the last ResNet stage kept (layer3 | layer4)"),
    "l_t": (5, "frames per clip ([FstCN] §3: 5)"),
    "input_size": (204, "input side ([FstCN] §2.5: 204)"),
    "tcl_kernels": ("3,5", "TCL kernel sizes ([FstCN] Table 1: 3,5 | 3 | 5)"),
    "tcl_filters": (32, "filters per TCL kernel ([FstCN] §2.5: 32)"),
    "tcl_dropout": (0.5, "dropout after each TCL branch ([FstCN] §2.5: 0.5)"),
    "scl_channels": (128, "f, filters of the SCLs before the TCL and on the frame ([FstCN] §2.5: 128)"),
    "permuted_channels": (128, "f', columns of the T-P matrix P ([FstCN] §2.5: 128)"),
    "fc1": (4096, "first FC of each path ([FstCN] §2.5: 4096)"),
    "fc2": (2048, "second FC of each path ([FstCN] §2.5: 2048)"),
    "fused_width": (2048, "FC after the concatenation ([FstCN] §2.5: 2048)"),
    "fc_dropout": (0.5, "dropout after each hidden FC (not stated; CNN-M's 0.5)"),
    "share_scl": (False, "one 128-channel SCL for both paths (not stated)"),
    "paths": ("both", "both | scl | tcl ([FstCN] Table 2)"),
    "auxiliary": (False, "add the auxiliary classifier for pre-training the lower SCLs ([FstCN] §2.3)"),
}


def parse_kernels(kernels: str | Sequence[int]) -> tuple[int, ...]:
    """``"3,5"`` (or ``(3, 5)``) -> ``(3, 5)``."""
    if isinstance(kernels, str):
        try:
            return tuple(int(k) for k in kernels.replace("+", ",").split(",") if k.strip())
        except ValueError:
            raise ValueError(f"tcl_kernels must be odd sizes separated by commas, e.g. 3,5; got {kernels!r}") from None
    return tuple(int(k) for k in kernels)


def build_fstcn(*, num_classes: int, backbone_arch: str | None = None,
                backbone_state: Mapping[str, Tensor] | None = None, **options: object) -> FstCN:
    """FstCN from :data:`OPTIONS` (unknown names refused; missing ones take their defaults).

    With ``lower="resnet"``, ``backbone_arch`` names the ResNet and ``backbone_state`` holds the RGB
    finetune checkpoint's ``"model"`` state dict (None: random initialisation); the caller loads the file.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown FstCN option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    o = {name: default for name, (default, _) in OPTIONS.items()} | options
    if o["lower"] not in LOWER_KINDS:
        raise ValueError(f"unknown lower {o['lower']!r}; valid: {', '.join(LOWER_KINDS)}")
    if o["lower"] == "resnet":
        if backbone_arch is None:
            raise ValueError("lower=resnet needs backbone_arch (the finetune checkpoint's arch)")
        lower: nn.Module = ResNetLowerSCLs(backbone_arch, backbone_state, layers=str(o["trunk_layers"]))
    else:
        if backbone_state is not None:
            raise ValueError("backbone_state is for lower=resnet; the paper's lower SCLs start from scratch")
        lower = LowerSCLs()
    return FstCN(num_classes=num_classes, l_t=int(o["l_t"]), input_size=int(o["input_size"]), lower_scls=lower,
                 scl_channels=int(o["scl_channels"]), permuted_channels=int(o["permuted_channels"]),
                 tcl_kernels=parse_kernels(o["tcl_kernels"]), tcl_filters=int(o["tcl_filters"]),
                 tcl_dropout=float(o["tcl_dropout"]), fc_widths=(int(o["fc1"]), int(o["fc2"])),
                 fused_width=int(o["fused_width"]), fc_dropout=float(o["fc_dropout"]),
                 share_scl=bool(o["share_scl"]), paths=str(o["paths"]), auxiliary=bool(o["auxiliary"]))
