"""Other tools' checkpoints -> torchvision key names, so ``--weights PATH`` loads them.

Recognised (each from the file's own structure, never from its name):

``mmaction2``
    a dict with ``state_dict`` (and usually ``meta``) whose keys start with ``backbone.`` (the recognizer's
    ResNet, built of ``ConvModule`` s) and ``cls_head.`` (``TSNHead``: ``cls_head.fc_cls.weight`` / ``.bias``).
    mmaction2's ResNet names a conv and its BatchNorm ``<name>.conv`` / ``<name>.bn``; they become
    torchvision's names (mmaction2's own ``ResNet._load_conv_params`` does the inverse)::

        backbone.conv1.conv.weight            -> conv1.weight
        backbone.conv1.bn.<p>                 -> bn1.<p>
        backbone.layer1.0.conv2.conv.weight   -> layer1.0.conv2.weight
        backbone.layer1.0.conv2.bn.<p>        -> layer1.0.bn2.<p>
        backbone.layer1.0.downsample.conv.w.. -> layer1.0.downsample.0.weight
        backbone.layer1.0.downsample.bn.<p>   -> layer1.0.downsample.1.<p>
        cls_head.fc_cls.<p>                   -> fc.<p>

    A backbone already in torchvision names (``backbone=dict(type='torchvision.resnet50')``) passes
    unchanged. ``data_preprocessor.*`` (mean / std buffers) is dropped. A flow model's ``conv1`` has
    ``2 * clip_len`` input channels (10 for mmaction2's TSN flow configs, ``clip_len=5``).
``tsn-pytorch``
    a dict with ``state_dict`` (and ``arch``, ``epoch``, ``best_prec1``) whose keys start with
    ``module.base_model.`` (DataParallel around ``TSN``; the base model is torchvision's, so its keys are
    already torchvision's) and the classifier ``module.new_fc.*`` (dropout > 0) or ``module.base_model.fc.*``.

:func:`convert` returns the converted state and, per converted key, the key as the file spells it, so a
mismatch names the file's keys. :func:`convert_foreign` is the converter a caller resolving ``--weights`` passes
to :func:`pipeline.models.backbones.create_backbone` (``convert=``; the model layer knows no foreign format).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["FOREIGN_FORMATS", "Converted", "convert", "convert_foreign", "detect"]

FOREIGN_FORMATS = ("mmaction2", "tsn-pytorch")

_MM_CONV = re.compile(r"^(?P<pre>(?:layer\d+\.\d+\.)?)(?P<name>conv\d+)\.(?P<kind>conv|bn)\.(?P<param>.+)$")
_MM_DOWN = re.compile(r"^(?P<pre>layer\d+\.\d+\.)downsample\.(?P<kind>conv|bn)\.(?P<param>.+)$")


@dataclass
class Converted:
    """A foreign checkpoint in torchvision names: ``trunk`` (backbone) and ``head`` (``fc.weight``,
    ``fc.bias``) tensors, ``source_keys`` (converted key -> the file's key), the ``format`` and
    what the file says of itself (``arch`` when it names one)."""

    format: str
    trunk: dict
    head: dict
    source_keys: dict = field(default_factory=dict)
    arch: str | None = None
    dropped: list = field(default_factory=list)


def detect(obj: Mapping) -> str | None:
    """``"mmaction2"``, ``"tsn-pytorch"`` or None (not a checkpoint of either)."""
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        return None
    keys = [str(k) for k in state]
    if any(k.startswith(("module.base_model.", "base_model.")) for k in keys):
        return "tsn-pytorch"
    if any(k.startswith("backbone.") for k in keys):
        return "mmaction2"
    return None


def _mm_key(key: str) -> str:
    """One mmaction2 backbone key (without ``backbone.``) in torchvision's names."""
    m = _MM_DOWN.match(key)
    if m:
        return f"{m['pre']}downsample.{0 if m['kind'] == 'conv' else 1}.{m['param']}"
    m = _MM_CONV.match(key)
    if m:
        name = m["name"] if m["kind"] == "conv" else "bn" + m["name"].removeprefix("conv")
        return f"{m['pre']}{name}.{m['param']}"
    return key


def convert(obj: Mapping, fmt: str) -> Converted:
    """The trunk and head of a checkpoint of ``fmt`` (one of :data:`FOREIGN_FORMATS`) in torchvision names.

    Keys that are neither backbone nor classifier (``cls_head`` losses, ``data_preprocessor``) are listed
    in ``dropped``; an unknown top-level prefix stays in ``trunk`` under its own name, so that loading it
    fails naming it."""
    if fmt not in FOREIGN_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FOREIGN_FORMATS)}")
    state = obj["state_dict"]
    out = Converted(fmt, {}, {}, arch=obj.get("arch") if isinstance(obj.get("arch"), str) else None)
    for key, value in state.items():
        key = str(key)
        bare = key.removeprefix("module.")
        if fmt == "mmaction2":
            if bare.startswith("backbone."):
                new, where = _mm_key(bare.removeprefix("backbone.")), out.trunk
            elif bare.startswith("cls_head.fc_cls."):
                new, where = "fc." + bare.removeprefix("cls_head.fc_cls."), out.head
            elif bare.startswith(("data_preprocessor.", "cls_head.")):
                out.dropped.append(key)
                continue
            else:
                new, where = key, out.trunk
        else:
            if bare.startswith("base_model.fc."):
                new, where = "fc." + bare.removeprefix("base_model.fc."), out.head
            elif bare.startswith("base_model."):
                new, where = bare.removeprefix("base_model."), out.trunk
            elif bare.startswith("new_fc."):
                new, where = "fc." + bare.removeprefix("new_fc."), out.head
            else:
                new, where = key, out.trunk
        where[new] = value
        out.source_keys[new] = key
    return out


def convert_foreign(obj: Mapping) -> Converted | None:
    """``obj`` (a loaded weights file) in torchvision names when it is a checkpoint of one of
    :data:`FOREIGN_FORMATS`, else None: the ``convert`` argument of
    :func:`pipeline.models.backbones.create_backbone`."""
    fmt = detect(obj)
    return None if fmt is None else convert(obj, fmt)
