"""Training and evaluation of temporal heads on cached segment features, in memory or streamed from the store.

Feature layout: per stream a tensor (V, P, D) of features at P cached temporal positions per
video, position k at the centre of the k-th of P equal parts of the video; labels (V,).
Which positions a segment and a test sequence take is :mod:`pipeline.data.sampling`'s rule
(:func:`~pipeline.data.sampling.segment_positions`, :func:`~pipeline.data.sampling.train_positions`,
:func:`~pipeline.data.sampling.eval_sequences`).

Protocol ([STFN] §4.2):
- training: one random position per segment, fresh each epoch;
- testing: ``num_test`` = 5 sequences of N positions, the class probabilities averaged over the sequences
  (or SCI-fused, :mod:`pipeline.eval.scores`);
- RMSProp, learning rate 1e-4 divided by 10 whenever the validation error stops improving for
  ``patience`` epochs, down to 1e-7; when it stops improving at 1e-7, training ends. The
  weights of the best validation epoch are restored. "Improving" compares (error, loss)
  lexicographically: a lower validation error, or the same error with a lower validation
  loss (small validation sets make the error alone coarse).

Features are either tensors (any float dtype: the stored float16 is kept, each batch is cast to float32),
moved to the training device once and gathered there by indexing; or, when they exceed a memory budget,
:class:`~pipeline.data.feature_dataset.FeatureArray` s read from the feature store on demand: a training epoch
reads the segments its draws picked (as many batches at once as fit ``max_bytes``, each store chunk read once
per read), validation and test read blocks of whole prediction batches. Both ways draw the same order and
positions from the same generator and call the head on the same float32 batches, so they give bit-identical
weights and scores (``tests/test_headtrain.py``).

Runs are deterministic for a given seed on CPU (the global RNG is forked, not disturbed); on
CUDA, index_add (STCB) and cuDNN backward are not bitwise deterministic unless
``torch.use_deterministic_algorithms(True)`` is set by the caller.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import dist
from pipeline.data.feature_dataset import FeatureArray
from pipeline.data.sampling import NUM_TEST, eval_sequences, segment_positions, train_positions
from pipeline.eval.scores import fuse_scores
from pipeline.streams import STREAMS
from pipeline.training import NonFiniteLoss, check_finite_loss  # noqa: F401 (NonFiniteLoss re-exported)

__all__ = [
    "gather_segments",
    "train_head_epoch",
    "predict_views",
    "predict",
    "fit_head",
    "History",
    "load_array",
    "nonfinite_videos",
    "stream_shapes",
    "split_indices",
    "eval_scores",
    "PREDICT_BATCH",
]

# [STFN] §4.2: RMSProp with lr 1e-4 decayed by 10 down to 1e-7 (5 test sequences: sampling.NUM_TEST).
LR = 1e-4
MIN_LR = 1e-7
FACTOR = 0.1
#: Videos per forward pass when predicting (validation and test): blocks read from a store are multiples of it,
#: so the head sees the same batches whether the features are in memory or streamed.
PREDICT_BATCH = 256

#: (V, P, D) features of one stream: a tensor in memory, or a FeatureArray read from the store on demand.
Features = Tensor | FeatureArray


# ----------------------------------------------------------------------------- batches

def gather_segments(features: Tensor, videos: Tensor, positions: Tensor) -> Tensor:
    """features (V, P, D), videos (B,), positions (B, N) or (N,) -> (B, N, D)."""
    positions = positions.to(features.device)
    if positions.dim() == 1:
        positions = positions.expand(videos.shape[0], -1)
    return features[videos.to(features.device)[:, None], positions]


def _check_split(name: str, rgb: Features, flow: Features, labels: Tensor | None) -> None:
    if len(rgb.shape) != 3 or len(flow.shape) != 3:
        raise ValueError(f"{name}: features must be (V, P, D), got rgb {tuple(rgb.shape)}, flow {tuple(flow.shape)}")
    if rgb.shape[:2] != flow.shape[:2]:
        raise ValueError(f"{name}: rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)} differ in (V, P)")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != rgb.shape[0]):
        raise ValueError(f"{name}: labels must be ({rgb.shape[0]},), got {tuple(labels.shape)}")
    if rgb.shape[0] == 0:
        raise ValueError(f"{name}: no videos")


# ----------------------------------------------------------------------------- training

def train_head_epoch(head: nn.Module, optimizer: torch.optim.Optimizer, rgb: Features, flow: Features,
                     labels: Tensor, *, num_segments: int, batch_size: int,
                     generator: torch.Generator, max_bytes: int | None = None) -> float:
    """One pass over the videos in random order, one random position per segment.

    rgb (V, P, Da), flow (V, P, Dm): tensors on the head's device, or FeatureArrays (read ``max_bytes`` of
    segment features at a time; all the epoch's at once when None); labels (V,) on the head's device. A final
    batch with a single segment feature (batch of 1 video at N = 1) is skipped: BatchNorm needs more than one
    value per channel. Returns the mean training loss.
    """
    v, p = rgb.shape[:2]
    head.train()
    # Drawn on the CPU generator (the same draws on every device and whether the features are in memory or
    # not); in memory they move to the features' device once per epoch: no host-to-device copy and no host sync
    # per step; the loss is read once, at the end.
    order = torch.randperm(v, generator=generator)
    positions = train_positions(p, num_segments, generator, num_videos=v)
    total, count = 0.0, 0  # a device tensor after the first step
    for idx, a, m in _train_batches(rgb, flow, order, positions, batch_size, max_bytes, labels.device):
        if idx.numel() * num_segments < 2:
            continue
        loss = head.loss(a.float(), m.float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * idx.numel()
        count += idx.numel()
    return float(total / max(count, 1))


def _train_batches(rgb: Features, flow: Features, order: Tensor, positions: Tensor, batch_size: int,
                   max_bytes: int | None, device: torch.device):
    """(videos (B,), rgb (B, N, Da), flow (B, N, Dm)) of each batch of ``order``, at ``positions`` (V, N)."""
    v = order.numel()
    if isinstance(rgb, Tensor):
        order, positions = order.to(rgb.device), positions.to(rgb.device)
        for i in range(0, v, batch_size):
            idx = order[i:i + batch_size]
            pos = positions[idx]
            yield idx, gather_segments(rgb, idx, pos), gather_segments(flow, idx, pos)
        return
    per_batch = batch_size * positions.shape[1] * (rgb.shape[-1] * rgb.itemsize + flow.shape[-1] * flow.itemsize)
    window = v if max_bytes is None else max(1, max_bytes // max(1, per_batch)) * batch_size
    for w in range(0, v, window):  # as many batches as fit: their segments read at once, each chunk once
        vids = order[w:w + window]
        pos = positions[vids].numpy()
        a, m = rgb.take(vids.numpy(), pos), flow.take(vids.numpy(), pos)
        for j in range(0, vids.numel(), batch_size):
            yield (vids[j:j + batch_size].to(device), a[j:j + batch_size].to(device, non_blocking=True),
                   m[j:j + batch_size].to(device, non_blocking=True))


@torch.no_grad()
def predict_views(head: nn.Module, rgb: Features, flow: Features, num_segments: int,
                  num_test: int = NUM_TEST, batch_size: int = PREDICT_BATCH) -> Tensor:
    """Class probabilities of every test sequence: (V, num_test, C) float32 on CPU.

    rgb (V, P, Da), flow (V, P, Dm): tensors on any device or FeatureArrays (``batch_size`` videos read at a
    time); batches go to the head's device, cast to float32.
    """
    _check_split("predict", rgb, flow, None)
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    v, p = rgb.shape[:2]
    seqs = torch.from_numpy(eval_sequences(p, num_segments, num_test)).to(rgb.device)  # (num_test, N), moved once
    stored = not isinstance(rgb, Tensor)
    out = []
    try:
        for i in range(0, v, batch_size):
            ra, rm = (rgb.rows(i, i + batch_size), flow.rows(i, i + batch_size)) if stored else \
                (rgb[i:i + batch_size], flow[i:i + batch_size])
            idx = torch.arange(ra.shape[0], device=ra.device)
            views = []
            for j in range(num_test):
                a = gather_segments(ra, idx, seqs[j]).to(device, non_blocking=True).float()
                m = gather_segments(rm, idx, seqs[j]).to(device, non_blocking=True).float()
                views.append(head(a, m).float().exp())
            out.append(torch.stack(views, dim=1))
    finally:
        head.train(was_training)
    return torch.cat(out).cpu()  # one copy back (and one host sync) per call


def predict(head: nn.Module, rgb: Features, flow: Features, num_segments: int, num_test: int = NUM_TEST,
            *, fusion: str = "mean", batch_size: int = PREDICT_BATCH) -> Tensor:
    """Video scores (V, C) (CPU float32 probabilities): the ``num_test`` sequences' probabilities
    fused by ``mean`` ([STFN] §4.2) or ``sci`` ([FstCN] eq. 6)."""
    return fuse_scores(predict_views(head, rgb, flow, num_segments, num_test, batch_size), fusion)


@dataclass
class History:
    """Per-epoch records and the outcome of :func:`fit_head`."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_error: float = math.inf
    best_val_loss: float = math.inf
    stop_reason: str = ""

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "best_val_error": self.best_val_error, "best_val_loss": self.best_val_loss,
                "stop_reason": self.stop_reason}


def _val_metrics(probs: Tensor, labels: Tensor) -> tuple[float, float]:
    labels = labels.cpu()
    error = float((probs.argmax(dim=1) != labels).float().mean())
    loss = float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())
    return error, loss


def fit_head(head: nn.Module, train: tuple[Features, Features, Tensor], val: tuple[Features, Features, Tensor], *,
             num_segments: int | None = None, lr: float = LR, min_lr: float = MIN_LR,
             factor: float = FACTOR, patience: int = 3, batch_size: int = 32, max_epochs: int = 100,
             num_test: int = NUM_TEST, device: str | torch.device | None = None, seed: int = 0,
             log: Callable[[dict], None] | None = None, max_bytes: int | None = None) -> History:
    """Train ``head`` on train = (rgb (V, P, Da), flow (V, P, Dm), labels (V,)), select on val.

    The features are tensors (moved to ``device`` once) or FeatureArrays read from the store on demand, the
    training epochs ``max_bytes`` of segment features at a time (:func:`train_head_epoch`); the results are the
    same either way.

    Args:
        num_segments: N (default: ``head.num_segments``).
        lr, min_lr, factor, patience: RMSProp learning rate, its floor, the decay factor and the
            number of epochs without validation improvement before each decay (§4.2).
        batch_size, max_epochs: mini-batch size (videos) and a hard cap on epochs.
        num_test: test sequences per video for validation (§4.2: 5).
        device: training device (default: this rank's, :func:`pipeline.dist.device`).
        seed: seeds the order, the positions and dropout.
        log: called with each epoch's record (dict).

    Returns the :class:`History`; ``head`` is left on ``device`` with the best weights loaded.
    """
    num_segments = int(num_segments if num_segments is not None else head.num_segments)
    if not (0 < min_lr <= lr) or not (0 < factor < 1) or patience < 1 or batch_size < 1 or max_epochs < 1:
        raise ValueError(
            f"need 0 < min_lr <= lr, 0 < factor < 1, patience >= 1, batch_size >= 1, max_epochs >= 1; got "
            f"lr={lr}, min_lr={min_lr}, factor={factor}, patience={patience}, batch_size={batch_size}, "
            f"max_epochs={max_epochs}"
        )
    _check_split("train", *train)
    _check_split("val", *val)
    device = torch.device(device if device is not None else dist.device("auto"))
    # Moved once (features in memory); every batch is then gathered on the device.
    tr_rgb, tr_flow, tr_labels = (t.to(device) if isinstance(t, Tensor) else t for t in train)
    va_rgb, va_flow, va_labels = (t.to(device) if isinstance(t, Tensor) else t for t in val)
    tr_labels, va_labels = tr_labels.long(), va_labels.long()
    segment_positions(tr_rgb.shape[1], num_segments)  # fail early on P < N

    head.to(device)
    optimizer = torch.optim.RMSprop(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    best_state = None
    current_lr, since_best = lr, 0
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for epoch in range(1, max_epochs + 1):
            t0 = time.perf_counter()
            train_loss = train_head_epoch(head, optimizer, tr_rgb, tr_flow, tr_labels,
                                          num_segments=num_segments, batch_size=batch_size,
                                          generator=generator, max_bytes=max_bytes)
            check_finite_loss(train_loss, f"epoch {epoch} (lr {current_lr:g})")
            probs = fuse_scores(predict_views(head, va_rgb, va_flow, num_segments, num_test), "mean")
            val_error, val_loss = _val_metrics(probs, va_labels)
            improved = (val_error, val_loss) < (history.best_val_error, history.best_val_loss)
            if improved:
                history.best_epoch, history.best_val_error, history.best_val_loss = epoch, val_error, val_loss
                best_state = copy.deepcopy(head.state_dict())
                since_best = 0
            else:
                since_best += 1
            record = {"epoch": epoch, "lr": current_lr, "train_loss": train_loss, "val_loss": val_loss,
                      "val_error": val_error, "improved": improved,
                      "seconds": time.perf_counter() - t0}
            history.epochs.append(record)
            if log is not None:
                log(record)
            if since_best >= patience:
                if current_lr <= min_lr * (1 + 1e-6):
                    history.stop_reason = f"validation error saturated at the minimum learning rate {min_lr:g}"
                    break
                current_lr = max(current_lr * factor, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                since_best = 0
        else:
            history.stop_reason = f"reached max_epochs={max_epochs}"
    if best_state is not None:
        head.load_state_dict(best_state)
    return history


# ----------------------------------------------------------------------------- feature stores

_LOADED: dict[tuple, Tensor] = {}
_SCANNED: dict[tuple, dict[str, str]] = {}


def _file_key(path: Path) -> tuple:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_ino, st.st_mtime_ns


def nonfinite_videos(path: Path, streams: Sequence[str] = STREAMS) -> dict[str, str]:
    """Videos of a feature store whose features hold NaN or inf: {video id: "rgb: 3 non-finite values"}, or
    sit in a damaged chunk: {video id: the reason, naming the file}. Read one chunk at a time (memory: one
    chunk), once per process for the same file (``ablate`` trains many heads on it)."""
    from pipeline.io.store import damaged_chunk_reason, decode_strings, feature_chunks, open_feature_store

    key = (*_file_key(path), tuple(streams))
    if key in _SCANNED:
        return dict(_SCANNED[key])
    r = open_feature_store(Path(path), check_format=True)
    damaged: dict[str, str] = {}
    counts: dict[str, list[str]] = {}
    try:
        ids = decode_strings(r["video_ids"][...]).ravel().tolist()
        for s in streams:
            for lo, hi, block in feature_chunks(r[f"streams/{s}"]):
                if isinstance(block, Exception):
                    for vid in ids[lo:hi]:
                        damaged.setdefault(vid, damaged_chunk_reason(path, f"streams/{s}", lo, hi, block))
                    continue
                n = (~np.isfinite(block)).reshape(hi - lo, -1).sum(1)
                for i in np.flatnonzero(n):
                    counts.setdefault(ids[lo + i], []).append(f"{s}: {int(n[i])} non-finite values")
    finally:
        r.close()
    bad = dict(damaged)
    bad.update({v: ", ".join(why) for v, why in counts.items() if v not in damaged})
    _SCANNED.clear()
    _SCANNED[key] = bad
    return dict(bad)


def load_array(array: FeatureArray) -> Tensor:
    """A FeatureArray read into memory (stored dtype), kept for the next call with the same file, stream, view
    and videos (``ablate`` trains many heads on one store); arrays of another file are let go."""
    file_key = _file_key(array.dataset.path)
    key = (*file_key, array.stream, array.view, hash(array.dataset.rows[array.items].tobytes()))
    for k in [k for k in _LOADED if k[:3] != file_key]:
        del _LOADED[k]
    if key not in _LOADED:
        _LOADED[key] = array.load()
    return _LOADED[key]


def stream_shapes(path: Path, streams: Sequence[str] = STREAMS) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored streams, without reading them."""
    from pipeline.io.store import feature_store_shapes

    shapes = feature_store_shapes(Path(path))
    return {s: tuple(shapes[s]) for s in streams if s in shapes}


def split_indices(split: Sequence[str], where: str = "feature store") -> dict[str, np.ndarray]:
    """{"train", "val", "test"} -> indices of the store's ``split`` column (the hold-out recorded by
    ``decode``, :mod:`pipeline.data.splits`). Raises ValueError when a part is empty, saying what to re-run."""
    split = np.asarray(split).astype(str)
    parts = {k: np.flatnonzero(split == k) for k in ("train", "val", "test")}
    if parts["val"].size == 0:
        raise ValueError(f"{where}: no validation videos (no \"val\" rows in the split column); re-run "
                         "`pipeline decode` with --val-fraction > 0, then `pipeline extract-features`")
    for k in ("train", "test"):
        if parts[k].size == 0:
            raise ValueError(f"{where}: no {k} videos in the split column")
    return parts


def eval_scores(head: nn.Module, rgb: Features, flow: Features, num_segments: int, num_test: int = NUM_TEST,
                fusion: str = "mean", *, max_bytes: int | None = None, batch_size: int = PREDICT_BATCH) -> Tensor:
    """Video scores (V, C) of the test protocol: ``num_test`` sequences of every view of rgb, flow
    (V, P, views, D), all fused by ``fusion`` (TSN trains on one crop and tests on all).

    FeatureArrays are scored in blocks of whole prediction batches (``batch_size`` videos) holding at most
    ``max_bytes`` of features (every view; at least one batch), so the scores equal the in-memory ones."""
    v, views = rgb.shape[0], rgb.shape[2]
    block = v
    if not isinstance(rgb, Tensor) and max_bytes is not None:
        per_batch = batch_size * rgb.shape[1] * views * (rgb.shape[-1] * rgb.itemsize + flow.shape[-1] * flow.itemsize)
        block = max(1, max_bytes // max(1, per_batch)) * batch_size
    out = []
    for lo in range(0, v, block):
        a, m = (rgb[lo:lo + block], flow[lo:lo + block]) if isinstance(rgb, Tensor) else \
            (rgb.rows(lo, lo + block), flow.rows(lo, lo + block))
        out.append(torch.cat([predict_views(head, a[:, :, k], m[:, :, k], num_segments, num_test, batch_size)
                              for k in range(views)], dim=1))
    return fuse_scores(torch.cat(out), fusion)
