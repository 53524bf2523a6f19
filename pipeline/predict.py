"""Scoring videos outside the dataset with the cache's trained models (``pipeline predict``).

The command (``stages/predict.py``) runs the real ``decode``, ``extract-flow`` and ``extract-features`` stages on
the new videos in a work cache of their own, with the parameters the dataset's cache recorded for them and the
dataset's fine-tuned backbones as weights files, so the videos go through exactly the code and settings the
head was trained on. This module holds what comes before and after: finding the models in the cache
(:func:`find_models`), the test protocol of ``train-head`` on the new features (:func:`video_probabilities`,
the same :func:`pipeline.training.heads.eval_scores`), the top-k (:func:`top_k`) and the per-window scores of
the timeline (:func:`timeline_probabilities`). With an end-to-end network (``--net``, a ``train-net`` output)
no features are extracted: :func:`find_network` finds it, :func:`network_probabilities` runs its own test
protocol on the new videos' frames and flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.streams import STREAMS
from pipeline.io import artifacts
from pipeline.io.artifacts import key_parts
from pipeline.models.heads import DEFAULT_HEAD, head_label, head_options, head_output_name
from pipeline.stage.manifest import Manifest, finished_outputs


class PredictError(RuntimeError):
    """A model is missing or unusable; the message names the stage to run."""


@dataclass
class Models:
    """The finished outputs a prediction uses, with their folders and manifests."""

    cache_root: Path
    split: int
    backbone: str
    head_key: str
    manifests: dict[str, Manifest]  # key -> manifest for decode, extract-flow, finetune rgb/flow, features, head

    def dir(self, key: str) -> Path:
        return self.cache_root / key

    def params(self, key: str) -> dict:
        return self.manifests[key].params

    @property
    def head_name(self) -> str:
        return artifacts.key_parts(self.head_key).name

    def fingerprints(self) -> dict[str, str]:
        return {k: m.fingerprint for k, m in self.manifests.items()}


def default_head(names: Sequence[str]) -> str | None:
    """train-head's default output (:func:`pipeline.models.heads.head_output_name` at its defaults: STFN a,
    avg, bi, N = 5, seed 0; [STFN] §4.2) when trained, else the first other output of the default head at its
    default options (another N or seed), else the first output of the default head."""
    if head_output_name() in names:
        return head_output_name()
    for prefix in (head_label(DEFAULT_HEAD, head_options(DEFAULT_HEAD)) + "-", DEFAULT_HEAD + "-"):
        hits = sorted(n for n in names if n.startswith(prefix))
        if hits:
            return hits[0]
    return None


def find_models(cache_root: Path, split: int, backbone: str, head: str | None = None) -> Models:
    """The decode, extract-flow, finetune (both streams), extract-features and train-head outputs of one
    scope; a PredictError naming the stage to run when one is missing."""
    cache_root = Path(cache_root)
    scope = artifacts.scope(split, backbone)
    finished = {**finished_outputs(cache_root, artifacts.DECODE), **finished_outputs(cache_root, artifacts.FLOW),
                **finished_outputs(cache_root, artifacts.FINETUNE, scope),
                **finished_outputs(cache_root, artifacts.FEATURES, scope),
                **finished_outputs(cache_root, artifacts.TRAIN_HEAD, scope)}
    names = [key_parts(k).name for k in finished if key_parts(k).stage == artifacts.TRAIN_HEAD]
    if head is None:
        head = default_head(names)
        if head is None:
            listed = ", ".join(names) if names else "none"
            raise PredictError(f"no finished STFN head in {cache_root / artifacts.TRAIN_HEAD / scope}: run "
                               f"`pipeline train-head` (or pick one with --head; finished: {listed})"
                               + other_scopes_hint(cache_root, scope))
    keys = {"decode": artifacts.DECODE, "extract-flow": artifacts.FLOW,
            **{f"finetune {s}": artifacts.finetune_key(s, split, backbone) for s in STREAMS},
            "extract-features": artifacts.features_key(split, backbone),
            "train-head": artifacts.head_key(head, split, backbone)}
    manifests = {}
    for stage, key in keys.items():
        m = finished.get(key)
        if m is None:
            hint = (f"; finished heads of {scope}: {', '.join(names) or 'none'}" if stage == "train-head" else "")
            if not names or stage != "train-head":
                hint += other_scopes_hint(cache_root, scope)
            command = stage.split()[0] + (f" --stream {stage.split()[1]}" if " " in stage else "")
            scoped = f" with --split {split} and backbone {backbone}" if key_parts(key).split is not None else ""
            raise PredictError(f"{cache_root / key}: no finished {stage} output; run `pipeline {command}`"
                               f"{scoped} first{hint}")
        manifests[key] = m
    return Models(cache_root, split, backbone, keys["train-head"], manifests)


def other_scopes_hint(cache_root: Path, scope: str) -> str:
    """For a scope without the models: the scopes that have finished heads, and the options that pick one
    (``--split 1 --backbone resnet18``); "" when there are none."""
    heads: dict[str, list[str]] = {}
    for key in finished_outputs(cache_root, artifacts.TRAIN_HEAD):
        parts = key_parts(key)
        other = artifacts.scope(parts.split, parts.backbone)
        if other != scope:
            heads.setdefault(other, []).append(parts.name)
    if not heads:
        return ""
    listed = "; ".join(f"{s}: {', '.join(sorted(n))}" for s, n in sorted(heads.items()))
    split, backbone = artifacts.parse_scope(min(heads))
    return (f". Finished heads in other scopes: {listed}; pick a scope with --split and --backbone (e.g. "
            f"--split {split} --backbone {backbone}), or set split / backbone in the config's [pipeline] table")


def video_probabilities(head: torch.nn.Module, rgb: np.ndarray, flow: np.ndarray, num_segments: int,
                        num_test: int, fusion: str = "mean") -> np.ndarray:
    """(V, C) class probabilities of ``train-head``'s test protocol on features (V, P, views, D)."""
    from pipeline.training.heads import eval_scores

    with torch.no_grad():
        out = eval_scores(head, torch.from_numpy(np.asarray(rgb, dtype=np.float32)),
                          torch.from_numpy(np.asarray(flow, dtype=np.float32)), num_segments, num_test, fusion)
    return out.numpy()


def timeline_probabilities(head: torch.nn.Module, rgb: np.ndarray, flow: np.ndarray,
                           num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores over time of one video: window w holds the N = ``num_segments`` consecutive feature positions
    w .. w + N - 1 (stride 1), one per segment, scored by the head (views averaged). Returns (the window
    centres as position indices (W,), probabilities (W, C)); rgb, flow (P, views, D)."""
    P = rgb.shape[0]
    n = num_segments
    if P < n:
        raise ValueError(f"{P} positions cannot fill {n} segments")
    starts = np.arange(P - n + 1)
    idx = torch.from_numpy(starts[:, None] + np.arange(n)[None])  # (W, N)
    r = torch.from_numpy(np.asarray(rgb, dtype=np.float32))
    f = torch.from_numpy(np.asarray(flow, dtype=np.float32))
    probs = []
    with torch.no_grad():
        for k in range(r.shape[1]):
            probs.append(head(r[idx, k], f[idx, k]).exp())
    return starts + (n - 1) / 2, torch.stack(probs).mean(0).numpy()


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict]:
    """``[{"label": name, "prob": p}, ...]``, the k most probable classes, highest first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": str(class_names[i]), "prob": float(probs[i])} for i in order]


# ----------------------------------------------------------------------------------------------------------
# An end-to-end network (train-net) instead of a head
# ----------------------------------------------------------------------------------------------------------

def default_network_output(names: Sequence[str], net: str) -> str | None:
    """The train-net output ``net`` names: itself when finished; for a network's name (``stmult``), its output
    at the default options (``stmult-s0``), else the first other finished output of that network."""
    from pipeline.models.networks import NETWORKS, network_output_name

    if net in names:
        return net
    if net not in NETWORKS:
        return None
    if network_output_name(net) in names:
        return network_output_name(net)
    hits = sorted(n for n in names if n.startswith(net + "-"))
    return hits[0] if hits else None


def find_network(cache_root: Path, split: int, backbone: str, net: str) -> Models:
    """The decode, extract-flow and train-net outputs an end-to-end network's prediction uses (``net``: an
    output name or a network's name, :func:`default_network_output`); a PredictError naming the stage to run
    when one is missing. ``backbone`` is the scope's (``resnet50+resnet152`` for streams of two archs)."""
    cache_root = Path(cache_root)
    scope = artifacts.scope(split, backbone)
    finished = {**finished_outputs(cache_root, artifacts.DECODE), **finished_outputs(cache_root, artifacts.FLOW),
                **finished_outputs(cache_root, artifacts.TRAIN_NET, scope)}
    names = [key_parts(k).name for k in finished if key_parts(k).stage == artifacts.TRAIN_NET]
    name = default_network_output(names, net)
    if name is None:
        raise PredictError(f"no finished train-net output {net!r} in {cache_root / artifacts.TRAIN_NET / scope}: "
                           f"run `pipeline train-net --net ...` with --split {split} and backbone {backbone} "
                           f"(finished: {', '.join(names) or 'none'})")
    keys = (artifacts.DECODE, artifacts.FLOW, artifacts.net_key(name, split, backbone))
    for key in keys[:2]:
        if key not in finished:
            raise PredictError(f"{cache_root / key}: no finished {key} output; run `pipeline {key}` first")
    return Models(cache_root, split, backbone, keys[2], {k: finished[k] for k in keys})


def network_probabilities(model: torch.nn.Module, ckpt: dict, frames, flow, videos, flow_settings: tuple,
                          *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(V, C) class probabilities of ``videos`` (a :class:`pipeline.data.clips.VideoList`) with a train-net
    network and its test protocol (:class:`pipeline.training.networks.NetworkViews`, e.g. [ST-Mult] §4.2's 25
    frames and flips over the whole frame), read from the frame and flow stores; also which videos were scored
    and why the others could not be read."""
    from pipeline.models.networks import NETWORKS
    from pipeline.training.networks import READERS, Inputs, NetworkViews, predict

    spec = NETWORKS[ckpt["net"]]
    bound, step = flow_settings
    inputs = Inputs({"frames": frames, "flow": flow}, flow_length=int(ckpt["flow_length"]), flow_bound=bound,
                    flow_step=step)
    views = NetworkViews(spec, ckpt["net_options"], inputs, videos, input_size=int(ckpt["input_size"]))
    probs, scored, failed = predict(model, (views[i] for i in range(len(videos))), len(videos),
                                    int(ckpt["num_classes"]), READERS[spec.data].kinds, device=torch.device(device))
    return probs.numpy(), scored.numpy(), failed
