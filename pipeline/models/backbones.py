"""Two-stream ConvNet backbones: torchvision ResNets and Inception-V3 behind one timm-like API.

[STFN] §4.2 ("Two-stream ConvNets"): ResNet-101 and Inception-V3, initialised from ImageNet,
with the classification layer replaced by a C-way layer. The appearance stream takes RGB
frames, the motion stream a stack of L = 10 optical flow fields (2L = 20 input channels) whose
first convolution is initialised by cross-modality averaging (TSN, Wang et al. 2016, §3.2).

Every backbone shares the API that feature extraction and the heads need::

    model = create_backbone("resnet101", num_classes=101, in_channels=20, weights="imagenet")
    feats = model.forward_features(x)   # (B, D) globally average-pooled features
    logits = model.forward_head(feats)  # (B, C): dropout, then the C-way linear layer
    model.num_features                  # D: 2048 (ResNet-50/101/152, Inception-V3), 512 (ResNet-18/34)

Input normalisation lives here too, because it belongs to the ImageNet weights:
:func:`normalize_rgb` for uint8 frames and :func:`normalize_flow` for uint8 quantized flow.

Other tools' checkpoint formats are not known here: a caller that accepts them passes a converter
(``create_backbone(..., convert=pipeline.interop.checkpoints.convert_foreign)``), as timm's ``filter_fn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import (
    Inception3,
    Inception_V3_Weights,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNet152_Weights,
    WeightsEnum,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "backbone_info",
    "require_imagenet_weights",
    "create_backbone",
    "cross_modality_init",
    "imagenet_weights_path",
    "list_backbones",
    "load_finetuned_classifier",
    "load_finetuned_trunk",
    "normalize_flow",
    "normalize_rgb",
    "reinit_first_conv",
    "WeightsConverter",
]

#: ``convert(loaded weights file) -> None`` when it is not a checkpoint the converter knows, else an object with
#: ``format`` (str), ``trunk`` and ``head`` (tensors in torchvision names; head ``fc.weight``, ``fc.bias``),
#: ``source_keys`` (converted key -> the file's key) and ``arch`` (str or None), e.g.
#: :func:`pipeline.interop.checkpoints.convert_foreign`.
WeightsConverter = Callable[[Mapping], Any]

# ImageNet statistics the torchvision weights were trained with (RGB order, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Inception-V3's stride-2 valid convolutions and poolings leave nothing below 75 x 75 pixels
# (74 x 74 fails in Mixed_7a); 299 x 299 is its native ImageNet size, 224 x 224 works as well.
INCEPTION_MIN_INPUT = 75


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------


def normalize_rgb(x: Tensor) -> Tensor:
    """uint8 RGB frames to the float input the ImageNet weights expect.

    Args:
        x: ``(B, 3, H, W)`` or ``(B, T, 3, H, W)`` uint8 (or float already on the 0..255 scale),
            channels in RGB order, on any device.

    Returns:
        float32 tensor of the same shape, ``(x / 255 - mean) / std`` per colour channel with
        :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.
    """
    if x.dim() not in (4, 5) or x.shape[-3] != 3:
        raise ValueError(f"normalize_rgb expects (B, 3, H, W) or (B, T, 3, H, W), got shape {tuple(x.shape)}")
    mean, std = _imagenet_stats(x.device)
    return (x.to(torch.float32) / 255.0 - mean) / std


_STATS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """(3, 1, 1) float32 mean and std on ``device``, made once per device: ``torch.tensor(..., device=cuda)``
    on every call is a blocking host-to-device copy in the training and extraction loops."""
    stats = _STATS.get(device)
    if stats is None:
        with torch.inference_mode(False):  # plain tensors, usable by autograd later even if first made under it
            stats = _STATS[device] = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1).to(device),
                                      torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1).to(device))
    return stats


def normalize_flow(x: Tensor) -> Tensor:
    """uint8 quantized flow to the float input of the motion stream.

    The flow store quantizes each component as ``q = round((f + bound) * 255 / (2 * bound))``
    clipped to [0, 255] (denseflow / TSN convention, ``bound`` = 20 px by default). This maps
    ``q`` back to ``(q - 127.5) / 127.5``, i.e. ``f / bound`` in [-1, 1], zero flow at 0 and
    independent of ``bound``. No per-channel mean/std: the cross-modality initialised first
    convolution is followed by batch normalisation, so only the scale's order of magnitude
    matters (TSN normalises flow to about [-2.2, 2.2], same shape up to a factor).

    Args:
        x: ``(..., H, W)`` uint8, e.g. ``(B, 2L, H, W)`` with channels ``x0, y0, x1, y1, ...``.

    Returns:
        float32 tensor of the same shape in [-1, 1].
    """
    return (x.to(torch.float32) - 127.5) / 127.5


# --------------------------------------------------------------------------------------------
# Cross-modality initialisation
# --------------------------------------------------------------------------------------------


def cross_modality_init(conv_rgb_weight: Tensor, in_channels: int) -> Tensor:
    """First-conv weights for a ``in_channels``-channel input from RGB weights (TSN §3.2).

    "Average the weights across the RGB channels and replicate this average by the channel
    number of the temporal network input" (Wang et al., Temporal Segment Networks, 2016).

    Args:
        conv_rgb_weight: ``(O, 3, kH, kW)`` weights of the RGB network's first convolution.
        in_channels: input channels of the new network (``2L`` = 20 for 10 flow fields).

    Returns:
        ``(O, in_channels, kH, kW)`` tensor with ``out[:, c] == conv_rgb_weight.mean(1)`` for
        every ``c`` (a new contiguous tensor, same dtype and device).
    """
    if conv_rgb_weight.dim() != 4 or conv_rgb_weight.shape[1] != 3:
        raise ValueError(
            f"cross_modality_init expects RGB conv weights of shape (O, 3, kH, kW), got {tuple(conv_rgb_weight.shape)}"
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = conv_rgb_weight.detach().mean(dim=1, keepdim=True)
    return mean.expand(-1, in_channels, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------
# The uniform backbone
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A torchvision classification network split into pooled features and a C-way head.

    Attributes:
        arch: registry name, e.g. ``"resnet101"``.
        in_channels: input channels (3 for RGB, ``2L`` for a flow stack).
        num_features: ``D``, the width of :meth:`forward_features`.
        num_classes: ``C``; 0 means no classifier (:meth:`forward` returns features).
        input_size: native square input side (224 for ResNets, 299 for Inception-V3).
        min_input_size: the smallest side the network accepts.
        trunk: the torchvision network with its classifier (and Inception's dropout and
            auxiliary head) removed; its forward returns ``(B, D)`` pooled features.
        head_drop, fc: the head, dropout then ``nn.Linear(D, C)``.

    The state dict is the torchvision one with ``trunk.`` prepended, plus ``fc.weight`` and
    ``fc.bias`` for the head.
    """

    def __init__(
        self,
        arch: str,
        trunk: nn.Module,
        *,
        num_features: int,
        num_classes: int,
        in_channels: int,
        first_conv: str,
        input_size: int,
        min_input_size: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.arch = arch
        self.trunk = trunk
        self.num_features = num_features
        self.in_channels = in_channels
        self.first_conv = first_conv
        self.input_size = input_size
        self.min_input_size = min_input_size
        self.head_drop = nn.Dropout(dropout)
        self.num_classes = 0
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh ``num_classes``-way linear layer (0: no classifier).

        The new layer is initialised as in TSN (weights ~ N(0, 0.001), zero bias).
        """
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        if num_classes == 0:
            self.fc = nn.Identity()
            return
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(fc.weight, mean=0.0, std=0.001)
        nn.init.zeros_(fc.bias)
        if isinstance(self.fc, nn.Linear):
            fc = fc.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        self.fc = fc

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` normalised input -> ``(B, num_features)`` pooled features."""
        self._check_input(x)
        return self.trunk(x)

    def forward_map(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` normalised input -> ``(B, num_features, h, w)``: the last convolutional map
        (ResNet ``layer4``, 7 x 7 at 224; Inception-V3 ``Mixed_7c``, 8 x 8 at 299), before the global average
        pooling, so ``forward_features(x) == forward_map(x).mean((2, 3))``. It runs the trunk's children in
        order up to ``avgpool`` (Inception-V3 first re-normalises RGB input as its own forward does)."""
        self._check_input(x)
        trunk = self.trunk
        if isinstance(trunk, Inception3):
            x = trunk._transform_input(x)
        for name, layer in trunk.named_children():
            if name == "avgpool":
                return x
            x = layer(x)
        raise RuntimeError(f"{self.arch} trunk has no avgpool layer to stop before")

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"{self.arch} needs inputs of at least {self.min_input_size}x{self.min_input_size} pixels, "
                f"got {x.shape[-2]}x{x.shape[-1]} (native size {self.input_size})"
            )

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, num_features)`` -> ``(B, num_classes)`` logits (after dropout when training).

        With ``pre_logits=True`` return the features unchanged (timm's convention).
        """
        if pre_logits:
            return feats
        return self.fc(self.head_drop(feats))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, num_classes)`` logits (features if ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    num_features: int
    first_conv: str  # dotted name of the first nn.Conv2d inside the torchvision model
    input_size: int
    min_input_size: int


_SPECS: dict[str, _Spec] = {
    # Native input sizes: torchvision's ImageNet recipes. ResNets pad every strided layer and end
    # with adaptive average pooling, so any input size works (the last map is at least 1 x 1).
    "resnet18": _Spec(resnet18, ResNet18_Weights.DEFAULT, 512, "conv1", 224, 1),
    "resnet34": _Spec(resnet34, ResNet34_Weights.DEFAULT, 512, "conv1", 224, 1),
    "resnet50": _Spec(resnet50, ResNet50_Weights.DEFAULT, 2048, "conv1", 224, 1),
    "resnet101": _Spec(resnet101, ResNet101_Weights.DEFAULT, 2048, "conv1", 224, 1),
    "resnet152": _Spec(resnet152, ResNet152_Weights.DEFAULT, 2048, "conv1", 224, 1),
    "inception_v3": _Spec(
        Inception3, Inception_V3_Weights.DEFAULT, 2048, "Conv2d_1a_3x3.conv", 299, INCEPTION_MIN_INPUT
    ),
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_SPECS)


def _spec(arch: str) -> _Spec:
    try:
        return _SPECS[arch]
    except KeyError:
        raise ValueError(f"unknown backbone {arch!r}; valid names: {', '.join(list_backbones())}") from None


def imagenet_weights_path(arch: str) -> Path:
    """Where the ImageNet weights of ``arch`` must be: ``torch.hub.get_dir()/checkpoints/<file>``.

    The file name is the last part of the torchvision weights URL (e.g. ``resnet101-cd907fc2.pth``
    for ``ResNet101_Weights.IMAGENET1K_V2``), the same place ``torch.hub`` downloads it to.
    """
    url = _spec(arch).weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def backbone_info(arch: str) -> dict[str, int]:
    """What a stage checks before building ``arch``: ``num_features``, ``input_size`` (native) and
    ``min_input_size``, without building the network. Raises ValueError for an unknown name."""
    spec = _spec(arch)
    return {"num_features": spec.num_features, "input_size": spec.input_size, "min_input_size": spec.min_input_size}


def require_imagenet_weights(arch: str) -> Path:
    """:func:`imagenet_weights_path` of ``arch`` when the file is there, else FileNotFoundError naming the file,
    the folder and the URL to fetch it from (nothing is ever downloaded)."""
    path = imagenet_weights_path(arch)
    if not path.is_file():
        url = _spec(arch).weights.url
        raise FileNotFoundError(
            f"ImageNet weights for {arch} not found: expected the file {path.name} at {path}. "
            f"This pipeline never downloads; on a machine with internet fetch {url} and copy it there "
            f"(or set TORCH_HOME so that torch.hub.get_dir() points at a folder with checkpoints/{path.name})."
        )
    return path


def _build_trunk(arch: str, in_channels: int, random_init: bool) -> nn.Module:
    """The torchvision network of ``arch`` without classifier, with ``in_channels`` inputs."""
    spec = _spec(arch)
    if arch == "inception_v3":
        # No auxiliary classifier (it only adds a training loss at 17 x 17; left out for
        # simplicity). transform_input re-normalises ImageNet-normalised RGB to the [-1, 1]
        # range the ported Google weights expect; it is hard-wired to 3 channels, so it is off
        # for flow. It depends only on (arch, in_channels), so a checkpoint behaves the same
        # whichever weights it started from.
        trunk = Inception3(aux_logits=False, transform_input=in_channels == 3, init_weights=random_init)
        trunk.dropout = nn.Identity()  # the head's dropout is Backbone.head_drop
    else:
        trunk = spec.builder(weights=None)
    trunk.fc = nn.Identity()

    if in_channels != 3:
        parent_name, _, leaf = spec.first_conv.rpartition(".")
        parent = trunk.get_submodule(parent_name) if parent_name else trunk
        old: nn.Conv2d = getattr(parent, leaf)
        new = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=old.bias is not None,
        )
        # Same random initialisation as the network's own first conv.
        if arch == "inception_v3":
            nn.init.trunc_normal_(new.weight, mean=0.0, std=0.1, a=-2, b=2)
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        setattr(parent, leaf, new)
    return trunk


def _read_state_dict(path: Path, convert: WeightsConverter | None = None
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], Mapping | None, Any]:
    """Load ``path`` and split it into (trunk, head) state dicts with torchvision key names.

    Accepts a torchvision state dict (keys ``conv1.weight``, ..., ``fc.weight``), our checkpoint
    format, a dict with a ``"model"`` entry holding :class:`Backbone` state (keys ``trunk.*``,
    ``fc.*``; a ``module.`` prefix from DistributedDataParallel is removed), or a checkpoint ``convert``
    (a :data:`WeightsConverter`) recognises. The third value is the checkpoint dict for our format, None
    otherwise; the fourth the conversion of a foreign one.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        hint = ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            hint = (" (it holds Python objects beyond tensors, e.g. an mmengine checkpoint's 'meta'; keep only "
                    "its weights: torch.save({'state_dict': torch.load(p, weights_only=False)['state_dict']}, "
                    "new_path), on a file you trust)")
        raise ValueError(f"cannot read weights file {path}: {exc}{hint}") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    conv = convert(obj) if convert is not None else None
    if conv is not None:
        for key, value in (*conv.trunk.items(), *conv.head.items()):
            if not isinstance(value, Tensor):
                raise ValueError(f"weights file {path} ({conv.format}): entry {conv.source_keys[key]!r} is a "
                                 f"{type(value).__name__}, not a tensor")
        return conv.trunk, conv.head, None, conv
    is_checkpoint = "model" in obj and isinstance(obj["model"], Mapping)
    state = obj["model"] if is_checkpoint else obj
    trunk: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            foreign = isinstance(state.get("state_dict"), Mapping)
            hint = (" (another tool's checkpoint? it loads through a converter: create_backbone(..., "
                    "convert=pipeline.interop.checkpoints.convert_foreign))") if foreign else ""
            raise ValueError(f"weights file {path}: entry {key!r} is a {type(value).__name__}, not a tensor{hint}")
        key = key.removeprefix("module.")
        if key.startswith("trunk."):
            trunk[key.removeprefix("trunk.")] = value
        elif key.startswith("fc."):
            head[key] = value
        elif key.startswith("AuxLogits."):
            continue  # Inception-V3's auxiliary classifier is not part of our backbone
        else:
            trunk[key] = value
    return trunk, head, obj if is_checkpoint else None, None


def reinit_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A first conv for ``in_channels`` inputs from one with another channel count, as TSN's cross-modality
    initialisation: the weights averaged over the input channels, replicated ``in_channels`` times (from an
    RGB conv this is :func:`cross_modality_init`; from a 10-channel flow conv, e.g. mmaction2's L = 5, it
    feeds a 2L = 20-channel one)."""
    if weight.dim() != 4:
        raise ValueError(f"first conv weights must be (O, C, kH, kW), got {tuple(weight.shape)}")
    if weight.shape[1] == 3:
        return cross_modality_init(weight, in_channels)
    return weight.detach().mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1).contiguous()


def _load_trunk(model: Backbone, state: dict[str, Tensor], source: str,
                file_keys: Mapping[str, str] | None = None) -> None:
    """Load ``state`` into ``model.trunk``. A first conv with another channel count than a flow model's
    (3 from an RGB file, 10 from mmaction2's flow TSN) is re-initialised by :func:`reinit_first_conv`.
    ``file_keys`` (converted key -> the file's own key) makes errors name the keys as the file spells them."""
    conv_key = f"{model.first_conv}.weight"
    expected = model.trunk.state_dict()
    if (conv_key in state and conv_key in expected and model.in_channels != 3 and state[conv_key].dim() == 4
            and state[conv_key].shape[1] != model.in_channels
            and state[conv_key].shape[0] == expected[conv_key].shape[0]):
        state = dict(state)
        state[conv_key] = reinit_first_conv(state[conv_key], model.in_channels)

    def name(k: str) -> str:
        return file_keys.get(k, k) if file_keys else k

    # torchvision's ImageNet files predate BatchNorm's num_batches_tracked buffer.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es), e.g. " + "; ".join(mismatched[:3]))
        if missing:
            problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(name(k) for k in unexpected[:3])}")
        raise ValueError(
            f"weights file {source} does not fit {model.arch} with in_channels={model.in_channels}: "
            + "; ".join(problems)
        )
    model.trunk.load_state_dict(state, strict=False)


def _load_imagenet(model: Backbone) -> None:
    path = require_imagenet_weights(model.arch)
    trunk, _, _, _ = _read_state_dict(path)  # the ImageNet classifier is replaced ([STFN] §4.2)
    _load_trunk(model, trunk, str(path))


def _load_file(model: Backbone, path: Path, convert: WeightsConverter | None) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    trunk, head, checkpoint, conv = _read_state_dict(path, convert)
    if conv is not None:
        _load_foreign(model, path, conv)
        return
    arch = checkpoint.get("arch") if checkpoint is not None else None
    if isinstance(arch, str) and arch != model.arch:
        raise ValueError(f"checkpoint {path} holds a {arch} backbone, not {model.arch}")
    _load_trunk(model, trunk, str(path))
    if checkpoint is None or model.num_classes == 0:
        return  # a torchvision file's classifier is the source task's: start a fresh head
    if not head:
        raise ValueError(f"checkpoint {path} has no classifier (fc.weight, fc.bias)")
    if head["fc.weight"].shape != model.fc.weight.shape:
        raise ValueError(
            f"checkpoint {path} has a {head['fc.weight'].shape[0]}-way classifier over "
            f"{head['fc.weight'].shape[1]} features; the model needs {model.num_classes}-way over {model.num_features}"
        )
    model.fc.load_state_dict({k.removeprefix("fc."): v for k, v in head.items()})


def _load_foreign(model: Backbone, path: Path, conv: Any) -> None:
    """An mmaction2 / tsn-pytorch checkpoint: the backbone must fit; its classifier is kept when it has the
    model's shape (same number of classes; the class order is the file's list's), else a fresh one."""
    if conv.arch is not None and conv.arch.lower() != model.arch:
        raise ValueError(f"{conv.format} checkpoint {path} holds a {conv.arch} backbone, not {model.arch}")
    _load_trunk(model, conv.trunk, f"{path} ({conv.format} checkpoint)", conv.source_keys)
    if model.num_classes == 0 or set(conv.head) != {"fc.weight", "fc.bias"}:
        return
    if conv.head["fc.weight"].shape == model.fc.weight.shape and conv.head["fc.bias"].shape == model.fc.bias.shape:
        model.fc.load_state_dict({k.removeprefix("fc."): v for k, v in conv.head.items()})


def load_finetuned_trunk(backbone: Backbone, state: Mapping[str, Tensor], name: str) -> None:
    """A finetune checkpoint's ``"model"`` state dict (:class:`Backbone` keys ``trunk.*``, ``fc.*``; a ``module.``
    prefix removed) into ``backbone``'s trunk; ``fc.*`` is ignored. ``name`` (e.g. ``"rgb"``) names the state in
    errors: no ``trunk.*`` keys, or keys / shapes that do not fit ``backbone``. For the networks that take state
    dicts, not files ([STPN], [FstCN]): the caller loads the checkpoint."""
    trunk = {k.removeprefix("module.").removeprefix("trunk."): v for k, v in state.items()
             if k.removeprefix("module.").startswith("trunk.")}
    if not trunk:
        raise ValueError(f"the {name} state dict holds no backbone weights (keys trunk.*); pass the 'model' entry "
                         "of a finetune checkpoint")
    expected = backbone.trunk.state_dict()
    missing = [k for k in expected if k not in trunk and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in trunk if k not in expected]
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in trunk.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"the {name} state dict does not fit {backbone.arch} with in_channels={backbone.in_channels}: "
                         f"shapes (state vs model) {mismatched[:2]}, missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    backbone.trunk.load_state_dict(trunk, strict=False)


def load_finetuned_classifier(fc: nn.Linear, state: Mapping[str, Tensor], name: str) -> None:
    """The classifier of a finetune checkpoint's ``"model"`` state dict (its ``fc.weight``, ``fc.bias``; a
    ``module.`` prefix removed) into ``fc``, the companion of :func:`load_finetuned_trunk`. ``name`` names the
    state in the error raised when it has no classifier of ``fc``'s shape (another number of classes)."""
    head = {k.removeprefix("module.").removeprefix("fc."): v for k, v in state.items()
            if k.removeprefix("module.").startswith("fc.")}
    if set(head) != {"weight", "bias"} or head["weight"].shape != fc.weight.shape:
        shape = tuple(head["weight"].shape) if "weight" in head else None
        raise ValueError(f"the {name} finetune state dict has no {tuple(fc.weight.shape)} classifier (fc.weight "
                         f"{shape}); it must come from a finetune run with {fc.out_features} classes on "
                         f"{fc.in_features}-channel features")
    fc.load_state_dict(head)


def create_backbone(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    weights: str | os.PathLike | None = "none",
    dropout: float = 0.0,
    convert: WeightsConverter | None = None,
) -> Backbone:
    """Build a two-stream backbone ([STFN] §4.2).

    Args:
        arch: one of :func:`list_backbones` (resnet18/34/50/101/152, inception_v3).
        num_classes: ``C``, the width of the new classification layer (0: none).
        in_channels: 3 for the appearance stream, ``2L`` (20 for L = 10) for the motion stream.
        weights: ``"none"`` (or None) trains from scratch; ``"imagenet"`` loads torchvision's
            default ImageNet weights from the torch hub cache (:func:`imagenet_weights_path`),
            never downloading; a path loads a torchvision state dict for ``arch``, one of our
            checkpoints (a dict with a ``"model"`` entry), or a checkpoint ``convert`` recognises
            (mmaction2 / tsn-pytorch TSN with :func:`pipeline.interop.checkpoints.convert_foreign`). A first
            conv whose channel count
            differs from a flow model's ``in_channels`` (3 from RGB, 10 from mmaction2's flow TSN)
            is re-initialised by :func:`reinit_first_conv` (TSN's cross-modality average). The
            classifier is new, except from one of our checkpoints, or a foreign one, with the same
            ``num_classes``.
        dropout: dropout before the classifier.
        convert: a :data:`WeightsConverter` for other tools' checkpoints (none: only torchvision's and ours).

    Inception-V3 is built without its auxiliary classifier; its native input is 299 x 299, it
    works at 224 x 224 too, and inputs below 75 x 75 are refused with a clear error.

    Raises:
        ValueError: unknown ``arch``, bad arguments, or a weights file that does not fit.
        FileNotFoundError: missing ImageNet weights (naming the file, folder and URL) or path.
    """
    spec = _spec(arch)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    if weights is None:
        weights = "none"
    if isinstance(weights, str) and weights in ("none", "imagenet"):
        kind = weights
    elif isinstance(weights, (str, os.PathLike)):
        kind = "file"
    else:
        raise ValueError(f"weights must be 'none', 'imagenet' or a path, got {weights!r}")

    trunk = _build_trunk(arch, in_channels, random_init=kind == "none")
    model = Backbone(
        arch,
        trunk,
        num_features=spec.num_features,
        num_classes=num_classes,
        in_channels=in_channels,
        first_conv=spec.first_conv,
        input_size=spec.input_size,
        min_input_size=spec.min_input_size,
        dropout=dropout,
    )
    if kind == "imagenet":
        _load_imagenet(model)
    elif kind == "file":
        _load_file(model, Path(weights), convert)
    return model
