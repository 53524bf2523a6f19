"""The papers' published figures, for the report's "paper" column beside our results.

Top-1 accuracy (%) on UCF101 and HMDB51 as printed in the papers; which row of ours a figure belongs to is
decided by :func:`published_figure` from the row's stage, head options, segment count and backbone. The
figures are the papers' (full datasets, their backbones and training); the report shows them for reference
beside any cache, and says so when the cache holds another dataset.

- [STFN] Tables 1-4 (split 1): STFN's architectures (Fig. 4), fusion operations, directions and segment counts;
  every other setting at the paper's default (arch a, avg, bi, N = 5; [STFN] §4.2). The paper does not say
  which backbone these tables use.
- [STFN] Table 5 (split 1): the fine-tuned streams (Appear., Motion) and their late fusion, ResNet-101 and
  Inception-V3.
- [STFN] Table 6 (mean over 3 splits): STFN with ResNet-101 and Inception-V3 (N = 7, §4.6), and the baselines
  ST-Multiplier and TSN as the paper quotes them (the original networks, not heads on cached features).
- [STPN] Table 3 (UCF101 split 1): two-stream compact bilinear fusion, output dimension 4096 (our ``stcb``).
- [ST-Mult] Tables 3 and 5 for ``train-net``'s ``stmult`` at its default options: Table 3's best row (split 1,
  ResNet-50 streams, error 6.00 / 30.98 %) and Table 5 (mean of 3 splits, ResNet-50 + ResNet-152).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["Figure", "published_figure", "DATASETS"]

#: The datasets the papers report, as decode's ``--dataset`` names them, with their display names.
DATASETS = {"ucf101": "UCF101", "hmdb51": "HMDB51"}


@dataclass(frozen=True)
class Figure:
    """A published top-1 accuracy (%) on UCF101 and HMDB51 (None where the paper has none) and its source."""

    ucf101: float | None
    hmdb51: float | None
    source: str

    def value(self, dataset: str) -> float | None:
        return {"ucf101": self.ucf101, "hmdb51": self.hmdb51}.get(dataset)


#: [STFN] §4.2: "5 segments, average fusion, and bi-directional fusion as default" (one Res-Inc block, §4.3).
STFN_DEFAULTS = {"arch": "a", "fusion": "avg", "direction": "bi", "blocks": 1, "segments": 5}

#: [STFN] Tables 1-4 (UCF101, HMDB51), split 1: (option, value) -> (table, UCF101, HMDB51).
STFN_ABLATIONS: dict[tuple[str, object], tuple[int, float, float]] = {
    ("arch", "a"): (1, 93.5, 70.4), ("arch", "b"): (1, 93.2, 69.6), ("arch", "c"): (1, 92.0, 69.2),
    ("fusion", "avg"): (2, 93.5, 70.4), ("fusion", "max"): (2, 92.9, 69.5), ("fusion", "mul"): (2, 92.6, 68.3),
    ("direction", "bi"): (3, 93.5, 70.4), ("direction", "m2a"): (3, 93.4, 70.3),
    ("direction", "a2m"): (3, 93.2, 70.1),
    ("segments", 3): (4, 93.2, 70.3), ("segments", 5): (4, 93.5, 70.4), ("segments", 7): (4, 93.9, 70.8),
    ("segments", 9): (4, 93.6, 70.5),
}

#: [STFN] Table 5, split 1: backbone -> stream -> (UCF101, HMDB51).
STFN_STREAMS = {
    "resnet101": {"rgb": (83.5, 48.2), "flow": (86.0, 58.1), "late": (91.8, 61.1)},
    "inception_v3": {"rgb": (84.8, 51.2), "flow": (88.1, 59.2), "late": (92.3, 62.7)},
}
_BACKBONE_NAMES = {"resnet101": "ResNet-101", "inception_v3": "Inception-V3"}
_STREAM_NAMES = {"rgb": "Appear.", "flow": "Motion", "late": "Late Fusion"}

#: [STFN] Table 6, mean over 3 splits: STFN per backbone (N = 7) and the quoted baselines.
STFN_TABLE6 = {"resnet101": (94.3, 71.2), "inception_v3": (95.4, 72.1)}
TABLE6_BASELINES = {"stmultiplier": ("ST-Multiplier [ST-Mult]", 94.2, 68.9), "tsn": ("TSN [TSN]", 94.9, 71.0)}
#: The note of a head row whose figure is a network it only approximates.
_APPROXIMATES = {"stmultiplier": "; our head approximates it on pooled features"}


def _backbone(backbone: str | None) -> tuple[str, str]:
    """The paper's backbone for ours (ResNet-101 when ours is not one the paper trained) and a note."""
    if backbone in STFN_STREAMS:
        return backbone, _BACKBONE_NAMES[backbone]
    return "resnet101", f"ResNet-101; ours is {backbone}"


def _stfn_split1(options: Mapping[str, object], segments: int | None) -> Figure | None:
    """Tables 1-4: the setting that differs from the paper's default in at most one option."""
    setting = {**STFN_DEFAULTS, **{k: v for k, v in options.items() if k in STFN_DEFAULTS and v is not None},
               **({"segments": int(segments)} if segments is not None else {})}
    if setting["arch"] == "c":  # Fig. 4c concatenates the features: no fusion operation or direction
        setting.update(fusion="avg", direction="bi")
    changed = [k for k in STFN_DEFAULTS if setting[k] != STFN_DEFAULTS[k]]
    if "blocks" in changed or len(changed) > 1:
        return None
    key = (changed[0], setting[changed[0]]) if changed else ("arch", "a")
    if key not in STFN_ABLATIONS:
        return None
    table, ucf, hmdb = STFN_ABLATIONS[key]
    if not changed:
        return Figure(ucf, hmdb, "[STFN] Tables 1-4, the default a, avg, bi, N = 5 (split 1)")
    return Figure(ucf, hmdb, f"[STFN] Table {table}, {key[0]} {key[1]} (split 1)")


#: [ST-Mult] for train-net's stmult at its defaults (residual ⊙ gating, ‡ centre-initialised temporal filters, max
#: over time): Table 3's best row, split 1, ResNet-50 streams (100 - error), and Table 5, mean of 3 splits.
STMULT_SPLIT1 = (94.00, 69.02)
STMULT_TABLE5 = (94.2, 68.9)
_STMULT_PAPER = {"gate_appearance": "pre_relu", "temporal_placement": "residual", "temporal_init": "center",
                 "temporal_pool": "max"}


def _network_figure(net: str | None, options: Mapping[str, object], across_splits: bool) -> Figure | None:
    if net != "stmult" or any(options.get(k, v) != v for k, v in _STMULT_PAPER.items()):
        return None
    if across_splits:
        return Figure(*STMULT_TABLE5, "[ST-Mult] Table 5 (ResNet-50 + ResNet-152; mean of 3 splits)")
    return Figure(*STMULT_SPLIT1, "[ST-Mult] Table 3, residual ⊙ + ‡ centre init + max over time (ResNet-50; "
                                  "split 1)")


def published_figure(stage: str, *, stream: str | None = None, head: str | None = None,
                     options: Mapping[str, object] | None = None, segments: int | None = None,
                     backbone: str | None = None, across_splits: bool = False, net: str | None = None
                     ) -> Figure | None:
    """The published figure for one of our rows, or None when the papers have none.

    ``stage``: ``finetune`` (``stream`` rgb, flow, or ``late`` for the late fusion row), ``train-head`` or
    ``refine`` (``head`` with its effective ``options`` and ``segments``), ``train-net`` (``net`` with its
    effective ``options``). ``across_splits``: the row is a mean over splits, compared with Table 6's 3-split
    means (STFN and the quoted baselines only) or [ST-Mult] Table 5."""
    options = dict(options or {})
    if stage == "train-net":
        return _network_figure(net, options, across_splits)
    if stage == "finetune":
        if across_splits or stream not in _STREAM_NAMES:
            return None
        key, name = _backbone(backbone)
        ucf, hmdb = STFN_STREAMS[key][stream]
        return Figure(ucf, hmdb, f"[STFN] Table 5, {_STREAM_NAMES[stream]} ({name}; split 1)")
    if head in TABLE6_BASELINES:
        name, ucf, hmdb = TABLE6_BASELINES[head]
        return Figure(ucf, hmdb, f"[STFN] Table 6, {name} (the original network; mean of 3 splits"
                                 f"{_APPROXIMATES.get(head, '')})")
    if head == "stcb" and not across_splits:
        return Figure(93.2, None, "[STPN] Table 3, compact bilinear d = 4096 (BN-Inception; UCF101 split 1)")
    if head != "stfn":
        return None
    if across_splits:
        if any(options.get(k, v) != v for k, v in STFN_DEFAULTS.items() if k != "segments"):
            return None
        key, name = _backbone(backbone)
        ucf, hmdb = STFN_TABLE6[key]
        return Figure(ucf, hmdb, f"[STFN] Table 6, STFN ({name}; N = 7; mean of 3 splits)")
    return _stfn_split1(options, segments)
