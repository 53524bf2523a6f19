"""The Spatiotemporal Multiplier network ([ST-Mult], Feichtenhofer, Pinz & Wildes, CVPR 2017), end to end.

Two torchvision ResNets (:mod:`pipeline.models.backbones`), appearance on RGB frames and motion on 2L = 20
channel flow stacks, run side by side over the T frames of a clip (frames folded into the batch for the 2-D
convolutions, unfolded for the temporal ones):

* **Motion gating, eq. 5** (§3.2.2, Fig. 2d / 3), once per stage conv2_x..conv5_x, motion -> appearance
  only (Table 2)::

      x̂ᵃ_{l+1} = f(xᵃ_l) + F(xᵃ_l ⊙ f(xᵐ_l), Wᵃ_l)

  where ``l`` is the input of the *second* residual unit of a stage (block b) and ``x_l`` the pre-ReLU sum
  of the first one (block a), f = ReLU. The released code's fusion table pairs ``'res2a_relu'`` of the
  motion net with ``'res2a'`` (the Sum layer, before its ReLU) of the appearance net, and likewise res3a,
  res4a, res5a (feichtenhofer/st-resnet, ``STMulNet.m``, ``opts.train.fusionLayer``): so the motion
  stream's post-ReLU *output of block a* multiplies the appearance stream's pre-ReLU *output of block a*,
  and the product is the input of the residual branch of the appearance *block b*; block b's skip path
  keeps ``f(xᵃ)`` (Table 2: gating the skip path, "direct", fails). Gradients flow into the motion stream
  (eq. 6-7; the code's ``backPropInput = [1 1]``). Whether the product takes the pre-ReLU ``xᵃ`` (eq. 5,
  the code's Sum) or ``f(xᵃ)`` is :attr:`STMultiplierNet.gate_appearance`.
* **Temporal filters, eq. 8-9** (§3.3, Fig. 4, Table 3): :class:`TemporalConv`, a ``(3, 1, 1)``
  convolution over T with weights ``I ⊗ f`` and bias 0, no BatchNorm after it; ``f = [0, 1, 0]``
  (``center``, the released ``addConv3D = 9``) or ``[1/3, 1/3, 1/3]`` (``avg``). Where: :data:`PLACEMENTS`.
* **Max over time** (eq. 10) at each (i, j, c) of the last conv's output, then the spatial average, dropout
  (0.8, §4.1) and each stream's classifier; the loss is the sum of the two streams' cross-entropies (§5.1,
  "two loss layers").

``forward`` returns per-stream logits and fused ``logits``; :meth:`STMultiplierNet.class_scores` is their
softmax. By default the fused logits are the average of the two streams' prediction layer outputs (§5.3's
late fusion, "averaging the prediction layer outputs", and the released test code), optionally with the flow
weighted (§5.3: 3x on HMDB51); ``fusion="softmax"`` averages the softmaxes instead. The network
is fully convolutional in space and time: any H, W (§4.2 tests at short side 256) and any T.

Every choice the paper leaves open is in ``docs/networks.md``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.models.backbones import (Backbone, create_backbone, load_finetuned_classifier,
                                       load_finetuned_trunk)
from pipeline.models.fusion import log_mean_probs
from pipeline.models.two_stream import _checkpointed

__all__ = ["GATE_APPEARANCE", "OPTIONS", "PLACEMENTS", "TEMPORAL_INITS", "TEMPORAL_POOLS", "MotionGate",
           "MultiplierStream", "STMultiplierNet", "TemporalConv", "build_stmult_net", "gated_residual"]

STAGES = ("layer1", "layer2", "layer3", "layer4")  # torchvision names of conv2_x .. conv5_x
GATED_BLOCK = 1  # block b of every stage (res2b, res3b, res4b, res5b; res3b1 / res4b1 in ResNet-101/152)

TEMPORAL_INITS = {"center": (0.0, 1.0, 0.0), "avg": (1 / 3, 1 / 3, 1 / 3)}  # eq. 9's f, Table 3
GATE_APPEARANCE = ("pre_relu", "post_relu")
TEMPORAL_POOLS = ("max", "avg")
FUSIONS = ("logits", "softmax")
# temporal_placement -> (stages with a temporal conv in block b's residual branch, stages with one on the
# skip path = after the stage's last unit). Table 1 / Fig. 4 / Table 3's symbols; docs/networks.md.
PLACEMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "residual": (STAGES, ()),               # ‡: after the 3x3 conv of block b, every stage (released addConv3D 8/9)
    "conv5": (("layer4",), ()),             # §: the same in conv5_x only (addConv3D 6/7)
    "skip": ((), STAGES),                   # after each stage's last unit, on the trunk (addConv3D 4/5)
    "residual+skip": (STAGES, STAGES),      # Table 1's caption: "also ... into the shortcut path"
    "none": ((), ()),                       # Table 2's networks
}

# The options a user may set (the registry reads this): name -> (default = the released setting, help).
OPTIONS: dict[str, tuple[object, str]] = {
    "gate_appearance": ("pre_relu", "appearance in the eq. 5 product: pre_relu (the released code's res*a sum) "
                                    "or post_relu ([ST-Mult] §3.2.2)"),
    "temporal_placement": ("residual", "temporal convs (eq. 8): residual (Table 3 ‡, every stage), conv5 (§), "
                                       "skip, residual+skip, none ([ST-Mult] Fig. 4)"),
    "temporal_init": ("center", "temporal filter f of eq. 9: center [0,1,0] or avg [1/3,1/3,1/3] (Table 3)"),
    "temporal_pool": ("max", "pooling over time after the last conv: max (eq. 10) or avg (Table 3, no pool)"),
    "dropout": (0.8, "dropout before each stream's classifier ([ST-Mult] §4.1)"),
    "fusion": ("logits", "test fusion of the streams: logits (average of the prediction layer outputs, §5.3, "
                         "the released test) or softmax (average of the softmaxes)"),
    "flow_weight": (1.0, "weight of the flow stream in the test fusion ([ST-Mult] §5.3: 3 on HMDB51)"),
    "checkpointing": (False, "recompute each residual unit in the backward pass (less memory, same gradients)"),
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------

class TemporalConv(nn.Module):
    """Eq. 8-9: ``x * Ŵ + b`` over time with ``Ŵ = I ⊗ f`` (C x C identity times a length-3 filter), ``b = 0``.

    A ``(3, 1, 1)`` :class:`torch.nn.Conv3d` with zero padding 1 in time (the released ``ConvTime``'s
    ``pad = [0 0 1 1]``), so T frames in, T frames out; no BatchNorm after it (the released
    ``appendBnorm3D = 0``).

    Args:
        channels: C.
        init: ``center`` (f = [0, 1, 0]: the identity at initialisation) or ``avg`` (f = [1/3, 1/3, 1/3]).

    ``forward(x (B*T, C, H, W), num_frames=T) -> (B*T, C, H, W)``.
    """

    def __init__(self, channels: int, *, init: str = "center") -> None:
        super().__init__()
        if init not in TEMPORAL_INITS:
            raise ValueError(f"unknown temporal_init {init!r}; valid: {', '.join(TEMPORAL_INITS)}")
        self.conv = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=True)
        f = torch.tensor(TEMPORAL_INITS[init])
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None, None] * f[None, None, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        bt, c, h, w = x.shape
        y = x.reshape(bt // num_frames, num_frames, c, h, w).transpose(1, 2)   # (B, C, T, H, W)
        return self.conv(y).transpose(1, 2).reshape(bt, c, h, w)


class MotionGate(nn.Module):
    """The cross-stream connection of eq. 5: ``(xᵃ, xᵐ) -> (f(xᵃ), xᵃ ⊙ f(xᵐ))``, the skip path's input and
    the residual branch's input of the gated unit.

    Args:
        appearance: ``pre_relu`` multiplies the pre-ReLU sum ``xᵃ`` (eq. 5, the released code's ``res*a``
            Sum layer), ``post_relu`` multiplies ``f(xᵃ)`` (the input a plain ResNet's branch would get).

    Both inputs are pre-ReLU sums ``(N, C, H, W)``; f = ReLU is applied here, so gradients reach the motion
    stream through ``f`` (eq. 7: ``∂L/∂xᵐ`` gets ``(∂F/∂z)ᵀg ⊙ xᵃ ⊙ 1[xᵐ > 0]``).
    """

    def __init__(self, appearance: str = "pre_relu") -> None:
        super().__init__()
        if appearance not in GATE_APPEARANCE:
            raise ValueError(f"unknown gate_appearance {appearance!r}; valid: {', '.join(GATE_APPEARANCE)}")
        self.appearance = appearance

    def forward(self, xa: Tensor, xm: Tensor) -> tuple[Tensor, Tensor]:
        fa = F.relu(xa)
        return fa, (xa if self.appearance == "pre_relu" else fa) * F.relu(xm)

    def extra_repr(self) -> str:
        return f"appearance={self.appearance}"


def gated_residual(gate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], residual: Callable[[Tensor], Tensor],
                   xa: Tensor, xm: Tensor, shortcut: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Eq. 5: ``x̂ᵃ = f(xᵃ) + F(xᵃ ⊙ f(xᵐ))`` (pre-ReLU, as eq. 1's sum before its f); ``shortcut`` maps the
    skip path where the unit changes width or stride (none in a gated unit of a torchvision ResNet)."""
    skip, z = gate(xa, xm)
    return (skip if shortcut is None else shortcut(skip)) + residual(z)


def _branch(block: nn.Module, temporal: TemporalConv | None, num_frames: int, z: Tensor) -> Tensor:
    """F(z) of a torchvision residual unit, with the temporal conv after the 3x3 conv block (its BN + ReLU).

    Bottleneck: 1x1 -> 3x3 -> [temporal] -> 1x1 (Table 1's "3x3 ‡"; the released code puts the ConvTime
    after ``res*b_branch2b_relu``). BasicBlock (ResNet-18/34, two 3x3 convs): after the first 3x3 conv
    block, so that, as in the bottleneck, one conv and its BN follow the temporal conv inside the branch.
    """
    out = block.relu(block.bn1(block.conv1(z)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        if temporal is not None:
            out = temporal(out, num_frames)
        return block.bn3(block.conv3(out))
    if temporal is not None:
        out = temporal(out, num_frames)
    return block.bn2(block.conv2(out))


def _plain_unit(block: nn.Module, temporal: TemporalConv | None, num_frames: int, x: Tensor) -> Tensor:
    """Eq. 1 before its f: ``x + F(x)`` (``downsample(x) + F(x)`` where the unit changes width / stride)."""
    skip = x if block.downsample is None else block.downsample(x)
    return skip + _branch(block, temporal, num_frames, x)


def _gated_unit(gate: MotionGate, block: nn.Module, temporal: TemporalConv | None, num_frames: int,
                xa: Tensor, xm: Tensor) -> Tensor:
    return gated_residual(gate, functools.partial(_branch, block, temporal, num_frames), xa, xm, block.downsample)


def _check_resnet(backbone: Backbone, role: str) -> None:
    trunk = backbone.trunk
    if not all(hasattr(trunk, s) for s in STAGES) or any(
            not isinstance(b, (BasicBlock, Bottleneck)) for s in STAGES for b in getattr(trunk, s)):
        raise ValueError(f"the {role} stream must be a torchvision ResNet (resnet18..resnet152), got "
                         f"{backbone.arch}")
    if any(len(getattr(trunk, s)) <= GATED_BLOCK for s in STAGES):
        raise ValueError(f"the {role} stream {backbone.arch} has a stage with a single residual unit")


def _stage_width(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features


def _branch_width(block: nn.Module) -> int:
    """Channels after the 3x3 conv block where the temporal conv goes (see :func:`_branch`)."""
    return (block.conv2 if isinstance(block, Bottleneck) else block.conv1).out_channels


class MultiplierStream(nn.Module):
    """One ResNet stream run unit by unit, with the temporal convs of ``temporal_placement`` injected.

    Args:
        backbone: a :class:`~pipeline.models.backbones.Backbone` holding a torchvision ResNet (its ``trunk``
            modules are used as they are, so a finetune state dict loads unchanged into ``backbone``).
        temporal_placement: a key of :data:`PLACEMENTS`.
        temporal_init: a key of :data:`TEMPORAL_INITS`.

    ``forward(x (B*T, C_in, H, W), num_frames=T, gate=None, motion=None)`` returns the last unit's output
    ``(B*T, D, h, w)`` (post-ReLU, after a skip-path temporal conv if any) and the pre-ReLU sums of block a of
    each stage (the ``xᵐ`` the motion stream hands to the gates). With ``gate`` and ``motion`` (four such sums
    of the other stream) block b of each stage is the gated unit of eq. 5.
    """

    def __init__(self, backbone: Backbone, *, temporal_placement: str = "residual",
                 temporal_init: str = "center") -> None:
        super().__init__()
        if temporal_placement not in PLACEMENTS:
            raise ValueError(f"unknown temporal_placement {temporal_placement!r}; valid: {', '.join(PLACEMENTS)}")
        self.backbone = backbone
        residual, skip = PLACEMENTS[temporal_placement]
        trunk = backbone.trunk
        self.residual_temporal = nn.ModuleDict(
            {s: TemporalConv(_branch_width(getattr(trunk, s)[GATED_BLOCK]), init=temporal_init) for s in residual})
        self.skip_temporal = nn.ModuleDict(
            {s: TemporalConv(_stage_width(getattr(trunk, s)), init=temporal_init) for s in skip})
        self.checkpointing = False

    def _run(self, fn: Callable[..., Tensor], block: nn.Module, *tensors: Tensor) -> Tensor:
        if self.checkpointing:
            return _checkpointed(block, fn)(*tensors)
        return fn(*tensors)

    def forward(self, x: Tensor, num_frames: int, gate: MotionGate | None = None,
                motion: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        trunk = self.backbone.trunk
        x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
        sums_a: list[Tensor] = []
        for k, name in enumerate(STAGES):
            for j, block in enumerate(getattr(trunk, name)):
                temporal = self.residual_temporal[name] if j == GATED_BLOCK and name in self.residual_temporal \
                    else None
                if j == GATED_BLOCK and gate is not None:
                    s = self._run(functools.partial(_gated_unit, gate, block, temporal, num_frames), block,
                                  s, motion[k])
                else:
                    s = self._run(functools.partial(_plain_unit, block, temporal, num_frames), block, x)
                if j == 0:
                    sums_a.append(s)
                x = F.relu(s)
            if name in self.skip_temporal:
                x = self.skip_temporal[name](x, num_frames)
        return x, sums_a


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------

class STMultiplierNet(nn.Module):
    """Spatiotemporal Multiplier network ([ST-Mult] §3-4): motion-gated appearance ResNet + motion ResNet.

    Args:
        appearance: RGB :class:`~pipeline.models.backbones.Backbone` (a torchvision ResNet, 3 input channels,
            a ``num_classes``-way classifier), e.g. finetune's appearance network.
        motion: flow Backbone (2L input channels), the same ``num_classes``; any depth whose stage widths
            equal the appearance stream's (ResNet-50/101/152 together, or ResNet-18/34 together).
        gate_appearance: ``pre_relu`` | ``post_relu`` (:class:`MotionGate`).
        temporal_placement: a key of :data:`PLACEMENTS`.
        temporal_init: ``center`` | ``avg`` (eq. 9).
        temporal_pool: ``max`` over time (eq. 10) or ``avg`` (Table 3's rows without temporal pooling: the
            predictions averaged over all frames and positions, §4.2), then the spatial average.
        dropout: before each stream's classifier (replaces the backbones' ``head_drop``).
        fusion: ``logits`` (the fused logits are ``(z_rgb + w z_flow) / (1 + w)``) or ``softmax`` (the fused
            probabilities are ``(softmax(z_rgb) + w softmax(z_flow)) / (1 + w)``), w = ``flow_weight``.
        flow_weight: the flow stream's weight w in the fusion.
        checkpointing: recompute each residual unit in the backward pass (see :meth:`set_checkpointing`).

    ``forward(batch)`` with ``batch["rgb"] (B, T, 3, H, W)`` and ``batch["flow"] (B, T, 2L, H, W)`` float,
    already normalised, returns ``{"rgb_logits": (B, C), "flow_logits": (B, C), "logits": (B, C)}``, the last
    being the fused logits (:meth:`class_scores` is their softmax).
    """

    def __init__(self, appearance: Backbone, motion: Backbone, *, gate_appearance: str = "pre_relu",
                 temporal_placement: str = "residual", temporal_init: str = "center", temporal_pool: str = "max",
                 dropout: float = 0.8, fusion: str = "logits", flow_weight: float = 1.0,
                 checkpointing: bool = False) -> None:
        super().__init__()
        _check_resnet(appearance, "appearance")
        _check_resnet(motion, "motion")
        wa = [_stage_width(getattr(appearance.trunk, s)) for s in STAGES]
        wm = [_stage_width(getattr(motion.trunk, s)) for s in STAGES]
        if wa != wm:
            raise ValueError(f"the motion gate multiplies feature maps channel by channel: the stage widths of "
                             f"{appearance.arch} {wa} and {motion.arch} {wm} differ (pair ResNet-50/101/152 with "
                             f"each other, or ResNet-18/34)")
        if appearance.in_channels != 3:
            raise ValueError(f"the appearance stream takes RGB (3 channels), got {appearance.in_channels}")
        if appearance.num_classes < 1 or appearance.num_classes != motion.num_classes:
            raise ValueError(f"both streams need the same C-way classifier, got {appearance.num_classes} "
                             f"(appearance) and {motion.num_classes} (motion)")
        if temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(f"unknown temporal_pool {temporal_pool!r}; valid: {', '.join(TEMPORAL_POOLS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        if not flow_weight >= 0.0:
            raise ValueError(f"flow_weight must be >= 0, got {flow_weight}")
        self.num_classes = appearance.num_classes
        self.gate_appearance, self.temporal_placement = gate_appearance, temporal_placement
        self.temporal_init, self.temporal_pool = temporal_init, temporal_pool
        self.dropout, self.fusion, self.flow_weight = dropout, fusion, flow_weight
        for b in (appearance, motion):
            b.head_drop = nn.Dropout(dropout)
        self.appearance = MultiplierStream(appearance, temporal_placement=temporal_placement,
                                           temporal_init=temporal_init)
        self.motion = MultiplierStream(motion, temporal_placement=temporal_placement, temporal_init=temporal_init)
        self.gate = MotionGate(gate_appearance)
        self.checkpointing = False
        self.set_checkpointing(checkpointing)

    @classmethod
    def from_finetuned(cls, rgb_state: Mapping[str, Tensor], flow_state: Mapping[str, Tensor], *, rgb_arch: str,
                       flow_arch: str, num_classes: int, flow_in_channels: int = 20, **options) -> STMultiplierNet:
        """The network initialised from two finetune runs: :func:`build_stmult_net` with both state dicts (the
        ``"model"`` entries of finetune's checkpoints) and their archs."""
        return build_stmult_net(num_classes=num_classes, rgb_arch=rgb_arch, flow_arch=flow_arch,
                                flow_in_channels=flow_in_channels, rgb_state=rgb_state, flow_state=flow_state,
                                **options)

    def set_checkpointing(self, on: bool = True) -> None:
        """Recompute each residual unit (with its gate and temporal conv) in the backward pass instead of
        keeping its activations (``torch.utils.checkpoint``, BatchNorm running statistics updated once), so
        ResNet-152 fits; results and gradients are those without it."""
        self.checkpointing = self.appearance.checkpointing = self.motion.checkpointing = bool(on)

    def _classify(self, stream: MultiplierStream, x: Tensor, b: int, t: int) -> Tensor:
        """(B*T, D, h, w) -> (B, C): pool time (eq. 10) then space, dropout, the stream's classifier."""
        x = x.reshape(b, t, *x.shape[1:])
        x = x.amax(dim=1) if self.temporal_pool == "max" else x.mean(dim=1)
        return stream.backbone.forward_head(x.mean(dim=(-2, -1)))

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        rgb, flow = batch["rgb"], batch["flow"]
        if rgb.dim() != 5 or flow.dim() != 5 or rgb.shape[:2] != flow.shape[:2] or rgb.shape[-2:] != flow.shape[-2:]:
            raise ValueError(f"ST-Multiplier needs rgb (B, T, 3, H, W) and flow (B, T, 2L, H, W) with the same B, "
                             f"T, H, W, got rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)}")
        b, t = rgb.shape[:2]
        if rgb.shape[2] != 3 or flow.shape[2] != self.motion.backbone.in_channels:
            raise ValueError(f"rgb needs 3 channels and flow {self.motion.backbone.in_channels}, got "
                             f"{rgb.shape[2]} and {flow.shape[2]}")
        xm, motion_sums = self.motion(flow.flatten(0, 1), t)
        xa, _ = self.appearance(rgb.flatten(0, 1), t, gate=self.gate, motion=motion_sums)
        out = {"rgb_logits": self._classify(self.appearance, xa, b, t),
               "flow_logits": self._classify(self.motion, xm, b, t)}
        out["logits"] = self._fuse(out["rgb_logits"], out["flow_logits"])
        return out

    def loss(self, out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        """§5.1: one softmax cross-entropy per stream ("two loss layers"), summed (the released code back-props
        both with weight 1), on the raw logits (no ReLU before the loss)."""
        return F.cross_entropy(out["rgb_logits"], labels) + F.cross_entropy(out["flow_logits"], labels)

    def _fuse(self, za: Tensor, zm: Tensor) -> Tensor:
        w = self.flow_weight
        if self.fusion == "logits":
            return (za + w * zm) / (1.0 + w)
        return log_mean_probs([F.log_softmax(za, dim=-1), F.log_softmax(zm, dim=-1)], [1.0, w])

    def class_scores(self, out: Mapping[str, Tensor]) -> Tensor:
        """(B, C) test probabilities of one view: the softmax of the fused ``logits`` (see ``fusion``)."""
        return F.softmax(out["logits"], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------------

def build_stmult_net(*, num_classes: int, rgb_arch: str = "resnet50", flow_arch: str = "resnet152",
                     flow_in_channels: int = 20, rgb_state: Mapping[str, Tensor] | None = None,
                     flow_state: Mapping[str, Tensor] | None = None, **options) -> STMultiplierNet:
    """The network from finetune's two backbones ([ST-Mult] §4.1: each stream trained first, then joined).

    Args:
        num_classes: C.
        rgb_arch, flow_arch: ResNet depths per stream (the paper's best: ResNet-50 appearance, ResNet-152
            motion, §5.3).
        flow_in_channels: 2L (20 for L = 10 flow fields, §3.1).
        rgb_state, flow_state: the ``"model"`` entries of the two finetune checkpoints (:class:`Backbone` state
            dicts, keys ``trunk.*`` and ``fc.*``, with a C-way classifier), loaded by
            :func:`~pipeline.models.backbones.load_finetuned_trunk` and ``load_finetuned_classifier``; None
            leaves that stream randomly initialised. The model never reads files: the stage loads them.
        options: :data:`OPTIONS` (keyword arguments of :class:`STMultiplierNet`), unknown ones refused by name.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown ST-Multiplier option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    appearance = create_backbone(rgb_arch, num_classes=num_classes, in_channels=3)
    motion = create_backbone(flow_arch, num_classes=num_classes, in_channels=flow_in_channels)
    for backbone, state, name in ((appearance, rgb_state, "appearance"), (motion, flow_state, "motion")):
        if state is not None:
            load_finetuned_trunk(backbone, state, name)
            load_finetuned_classifier(backbone.fc, state, name)
    return STMultiplierNet(appearance, motion, **options)
