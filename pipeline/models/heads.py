"""Registry of temporal heads: each head's builder and its options with their defaults, in one place.

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
stmultiplier    pooled-feature approximation of [ST-Mult]: motion-gated residual temporal head (the
                network itself: ``pipeline train-net --net stmult``)
==============  =================================================================

Options (:data:`HEADS`): each head declares the options it takes and their defaults, named as in the papers.
:func:`head_options` turns the options a user gave into the effective ones (the head's defaults updated with
the given ones) and refuses an option that does not apply (naming it and the head); :func:`head_label` names
a head by its effective options (only those that differ from the defaults, beside STFN's arch, fusion and
direction); :func:`create_head` builds it from :func:`head_kwargs`. Options whose value is ``None`` are "not given".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .baselines import build_concat, build_flow, build_late, build_rgb, build_tsn
from .fusion import Head
from .stcb import DEFAULT_STCB_DIM, build_stcb, build_stcb_temporal
from .stfn import build_stfn
from .stmultiplier import build_stmultiplier

__all__ = ["HEADS", "HEAD_OPTIONS", "HeadSpec", "HeadOptionError", "create_head", "list_heads", "head_options",
           "applicable_options", "head_label", "head_output_name", "head_kwargs",
           "load_head_checkpoint"]

DROPOUT = 0.5


@dataclass(frozen=True)
class HeadSpec:
    """One head: its builder, its options -> defaults, whether the builder takes a ``seed``, the options
    always written in its name, and ``applies(option, options) -> reason or None`` for conditional options.
    ``note``: what a results table adds to the head's rows (e.g. that it approximates a paper's network);
    ``version``: bumped when the head's training changes, so that only its outputs go stale (train-head's
    fingerprint digests it when set)."""

    builder: Callable[..., Head]
    options: Mapping[str, Any]
    seeded: bool = False
    named: tuple[str, ...] = ()
    applies: Callable[[str, Mapping[str, Any]], str | None] = field(default=lambda option, options: None)
    note: str = ""
    version: str = ""


def _stfn_applies(option: str, o: Mapping[str, Any]) -> str | None:
    """Why ``option`` does not apply to STFN with options ``o`` (None when it does)."""
    if o.get("arch") == "c" and option in ("fusion", "direction", "fused_dim", "stcb_dim"):
        return "with arch c (Fig. 4c: concatenated features, one Res-Inc path)"
    if option == "stcb_dim" and o.get("fusion") != "stcb":
        return f"with fusion {o.get('fusion')} (only with fusion stcb)"
    if option == "fused_dim" and o.get("fusion") == "stcb":
        return "with fusion stcb (STCB takes features of any widths)"
    return None


#: The default head and segment count N: [STFN] §4.2 ("5 segments, average fusion, and bi-directional fusion as
#: default"); train-head's defaults, and refine's default head is the output they give.
DEFAULT_HEAD = "stfn"
DEFAULT_SEGMENTS = 5

#: name -> the head's declaration; the defaults are [STFN] §4.2's ("5 segments, average fusion, and
#: bi-directional fusion as default"), [STPN] Table 3's STCB width and TSN's flow weight.
HEADS: dict[str, HeadSpec] = {
    "stfn": HeadSpec(build_stfn, {"arch": "a", "fusion": "avg", "direction": "bi", "blocks": 1,
                                  "fused_dim": None, "stcb_dim": DEFAULT_STCB_DIM, "dropout": DROPOUT},
                     seeded=True, named=("arch", "fusion", "direction"), applies=_stfn_applies),
    "rgb": HeadSpec(build_rgb, {"dropout": DROPOUT}),
    "flow": HeadSpec(build_flow, {"dropout": DROPOUT}),
    "late": HeadSpec(build_late, {"flow_weight": 1.0, "dropout": DROPOUT}),
    "tsn": HeadSpec(build_tsn, {"flow_weight": 1.5, "dropout": DROPOUT}),
    "concat": HeadSpec(build_concat, {"dropout": DROPOUT}),
    "stcb": HeadSpec(build_stcb, {"stcb_dim": DEFAULT_STCB_DIM, "dropout": DROPOUT}, seeded=True),
    "stcb_temporal": HeadSpec(build_stcb_temporal, {"stcb_dim": DEFAULT_STCB_DIM, "dropout": DROPOUT},
                              seeded=True),
    # Version 2: the paper's two losses (one cross-entropy per stream, [ST-Mult] §5.1) instead of the NLL of the
    # fused prediction.
    "stmultiplier": HeadSpec(build_stmultiplier, {"dropout": DROPOUT},
                             note="pooled-feature approximation of [ST-Mult]", version="2"),
}

#: Every option some head takes, in name order (the parameters a command exposes).
HEAD_OPTIONS: tuple[str, ...] = ("arch", "fusion", "direction", "blocks", "fused_dim", "stcb_dim", "flow_weight",
                                 "dropout")
assert all(set(s.options) <= set(HEAD_OPTIONS) for s in HEADS.values())

#: Short tags of the options in a head's name (stfn-a-avg-bi-k2-n5-s0).
_TAGS = {"blocks": "k", "flow_weight": "w", "stcb_dim": "d", "fused_dim": "f", "dropout": "p"}


class HeadOptionError(ValueError):
    """An option that the head does not take; ``option`` and ``head`` name them."""

    def __init__(self, option: str, head: str, why: str = ""):
        self.option, self.head = option, head
        super().__init__(f"option {option} does not apply to head {head}" + (f" {why}" if why else ""))


def list_heads() -> list[str]:
    """Names accepted by :func:`create_head`, sorted."""
    return sorted(HEADS)


def _spec(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(list_heads())}") from None


def head_options(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective options of head ``name``: its defaults updated with ``given`` (None values = not given),
    without the options that do not apply to this configuration (STFN arch c: fusion, direction, ...).

    Raises :class:`HeadOptionError` for a given option the head does not take or that does not apply.
    """
    spec = _spec(name)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for k in given:
        if k not in spec.options:
            raise HeadOptionError(k, name, f"(it takes: {', '.join(spec.options)})")
    merged = {**spec.options, **given}
    for k in given:
        why = spec.applies(k, merged)
        if why:
            raise HeadOptionError(k, name, why)
    return {k: v for k, v in merged.items() if v is not None and not spec.applies(k, merged)}


def applicable_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` (None = not given) that head ``name`` takes in that configuration: for
    carrying shared settings (a config's ``fused_dim``) across the rows of an ablation."""
    spec = _spec(name)
    given = {k: v for k, v in options.items() if v is not None and k in spec.options}
    merged = {**spec.options, **given}
    return {k: v for k, v in given.items() if not spec.applies(k, merged)}


def head_label(name: str, options: Mapping[str, Any]) -> str:
    """``name`` and its effective ``options`` as a name: STFN's arch, fusion and direction always, every other
    option only where it differs from the head's default (``stfn-a-avg-bi-k2``, ``tsn-w2``, ``stfn-c``)."""
    spec = _spec(name)
    parts = [name] + [str(options[k]) for k in spec.named if k in options]
    for k, v in options.items():
        if k not in spec.named and v != spec.options.get(k):
            parts.append(f"{_TAGS[k]}{v:g}" if isinstance(v, float) else f"{_TAGS[k]}{v}")
    return "-".join(parts)


def head_output_name(name: str = DEFAULT_HEAD, given: Mapping[str, Any] | None = None, *,
                     segments: int = DEFAULT_SEGMENTS, seed: int = 0,
                     test_fusion: str = "mean") -> str:
    """The name of a head's ``train-head/<scope>/<name>`` output: :func:`head_label` of the effective options,
    then N, the seed and a non-default test fusion (``stfn-a-avg-bi-n5-s0``). The split and backbone are in
    the scope (:func:`pipeline.io.artifacts.scope`), not in the name."""
    parts = [head_label(name, head_options(name, given)), f"n{segments}", f"s{seed}"]
    if test_fusion != "mean":
        parts.append(test_fusion)
    return "-".join(parts)


def head_kwargs(name: str, options: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Keyword options of :func:`create_head` for effective ``options`` (plus ``seed`` for seeded heads)."""
    return {**options, **({"seed": seed} if _spec(name).seeded else {})}


def create_head(name: str, *, num_classes: int, rgb_dim: int, flow_dim: int, num_segments: int,
                **kwargs) -> Head:
    """Build head ``name``; ``kwargs`` are its paper-named options (see each builder).

    Raises ValueError for an unknown name (listing the valid ones) and TypeError for an
    option the head does not take.
    """
    builder = _spec(name).builder
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
