"""Registry of temporal heads: ``create_head(name, ...)`` and ``list_heads()``.

Every head maps rgb (B, N, rgb_dim) and flow (B, N, flow_dim) segment features to (B, C)
log-probabilities (convention in :mod:`pipeline.models.fusion`) and has a ``loss(rgb, flow,
target)`` method for training.

==============  =================================================================
name            head
==============  =================================================================
stfn            STFN ([STFN]): arch a|b|c, fusion avg|max|mul|stcb, direction bi|a2m|m2a
rgb, flow       single stream (two-stream snippet protocol)
late            late fusion of the two streams' scores, ``flow_weight``
tsn             TSN average consensus, both streams, ``flow_weight``
concat          feature concatenation + temporal average + linear
stcb            per-segment compact bilinear fusion ([STPN] §3.1)
stcb_temporal   multi-path temporal STCB on flow, then STCB with rgb ([STPN] §3.2)
stmultiplier    motion-gated residual temporal head ([ST-Mult])
==============  =================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from .baselines import build_concat, build_flow, build_late, build_rgb, build_tsn
from .fusion import Head
from .stcb import build_stcb, build_stcb_temporal
from .stfn import build_stfn
from .stmultiplier import build_stmultiplier

__all__ = ["create_head", "list_heads", "load_head_checkpoint"]

_HEADS: dict[str, Callable[..., Head]] = {
    "stfn": build_stfn,
    "rgb": build_rgb,
    "flow": build_flow,
    "late": build_late,
    "tsn": build_tsn,
    "concat": build_concat,
    "stcb": build_stcb,
    "stcb_temporal": build_stcb_temporal,
    "stmultiplier": build_stmultiplier,
}


def list_heads() -> list[str]:
    """Names accepted by :func:`create_head`, sorted."""
    return sorted(_HEADS)


def create_head(name: str, *, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int,
                **kwargs) -> Head:
    """Build head ``name``; ``kwargs`` are its paper-named options (see each builder).

    Raises ValueError for an unknown name (listing the valid ones) and TypeError for an
    option the head does not take.
    """
    try:
        builder = _HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(list_heads())}") from None
    return builder(num_classes=num_classes, rgb_dim=rgb_dim, flow_dim=flow_dim,
                   num_segments=num_segments, **kwargs)


def load_head_checkpoint(path, device="cpu"):
    """(head, checkpoint dict) from a ``best.pt`` written by ``train-head``: the head is rebuilt from the
    options recorded in the checkpoint and its weights loaded, on ``device``."""
    from pipeline.io.atomic import load_checkpoint

    ckpt = load_checkpoint(path, require=("model", "head", "num_classes", "rgb_dim", "flow_dim", "num_segments",
                                          "head_kwargs"), map_location=device)
    head = create_head(ckpt["head"], num_classes=ckpt["num_classes"], rgb_dim=ckpt["rgb_dim"],
                       flow_dim=ckpt["flow_dim"], num_segments=ckpt["num_segments"], **ckpt["head_kwargs"])
    head.load_state_dict(ckpt["model"])
    return head.to(device), ckpt
