"""Generic training utilities: devices, DDP, batch order, partial BN, one SGD epoch, evaluation, checkpoints.

Plain functions with explicit arguments (torchvision's ``references/`` style), shared by the stages that
train networks. Nothing here knows about stages or the cache.

Distributed training (``torchrun --nproc-per-node K``; the process group, gloo for CPU tensors and nccl for
CUDA ones, is set up by :mod:`pipeline.dist`): :class:`EpochBatches` gives every rank its slice of each *global* batch, and
:func:`train_one_epoch` scales each rank's loss so that DDP's gradient average equals the gradient of the
mean loss over the global batch; BatchNorm layers that use batch statistics are made global
(:class:`GlobalBatchNorm2d`). So K ranks with global batch B compute what one process with batch B
computes, up to floating-point summation order.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training import check_finite_loss
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DistInfo", "EpochBatches", "GlobalBatchNorm2d", "accuracy_metrics", "autocast", "evaluate",
    "freeze_partial_bn", "load_checkpoint", "save_checkpoint", "seed_epoch", "set_train_mode",
    "global_batch_size", "global_batch_sizes", "loss_scale", "sync_batchnorm", "train_one_epoch",
    "trainable_param_groups",
]


# ----------------------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's generators (dropout) from (seed, epoch, rank), so a resumed epoch repeats exactly."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


# ----------------------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------------------

class EpochBatches:
    """Batch sampler yielding ``[(index, epoch), ...]`` keys: a fresh permutation every epoch, sliced per rank.

    Epoch ``e`` shuffles ``range(n)`` with ``np.random.default_rng([seed, e])`` and cuts it into global
    batches of ``batch_size``; rank ``r`` of ``K`` gets the ``r``-th of ``K`` near-equal contiguous slices of
    every global batch (all of it when ``K = 1``). A final global batch smaller than ``K`` is dropped (a rank
    cannot step on nothing); with ``K = 1`` no sample is dropped. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the number of ranks {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            part = np.array_split(batch, self.world_size)[self.rank]
            yield [(int(i), self.epoch) for i in part]

    def __len__(self) -> int:
        return len(self.global_batches())


# ----------------------------------------------------------------------------------------------------------
# BatchNorm: partial BN (TSN) and global batch statistics under DDP
# ----------------------------------------------------------------------------------------------------------

def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_partial_bn(model: nn.Module) -> int:
    """TSN's partial BN (Wang et al. 2016, §3.2): freeze every BatchNorm layer except the first.

    Frozen layers keep their running statistics (see :func:`set_train_mode`) and their affine parameters
    (``requires_grad = False``), as in the reference tsn-pytorch ``TSN.train``. Returns how many were frozen.
    """
    bns = _batchnorms(model)
    for m in bns[1:]:
        m._partial_bn_frozen = True  # read by set_train_mode
        for p in m.parameters():
            p.requires_grad_(False)
    return max(len(bns) - 1, 0)


def set_train_mode(model: nn.Module, training: bool = True) -> None:
    """``model.train(training)``, then frozen BatchNorm layers back to eval mode (running statistics)."""
    model.train(training)
    if training:
        for m in _batchnorms(model):
            if getattr(m, "_partial_bn_frozen", False):
                m.eval()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the global batch of every rank.

    Like :class:`torch.nn.SyncBatchNorm`, but it also runs on CPU with gloo (SyncBatchNorm is GPU-only):
    per-channel sums and sums of squares are all-reduced by a differentiable sum, so gradients flow through
    the shared statistics to every rank's inputs.
    Outside a process group (or in eval mode) it is a plain BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                # n > 1 decided on the device: no host sync per layer per step
                unbiased = torch.where(n > 1, var.detach() * (n / (n - 1)).clamp_min(0), var.detach())
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm2d that trains on batch statistics by a :class:`GlobalBatchNorm2d` in place.

    Layers frozen by :func:`freeze_partial_bn` are left alone (they use running statistics). Returns how
    many were replaced.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d and not getattr(child, "_partial_bn_frozen", False):
                new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.to(next(child.buffers()).device)
                setattr(module, child_name, new)
                replaced += 1
    return replaced


def trainable_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on conv and linear weights only, none on biases and BN
    parameters (tsn-pytorch ``get_optim_policies``). Frozen parameters are left out."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# One epoch, evaluation
# ----------------------------------------------------------------------------------------------------------

def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _to_input(x: Tensor, device: torch.device, normalize: Callable[[Tensor], Tensor]) -> Tensor:
    x = normalize(x.to(device, non_blocking=True))
    # channels_last on CUDA (faster convolutions with AMP); one fixed layout on CPU, where the layout
    # picks the kernel and so the last bits of the result.
    return x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)


def global_batch_sizes(loader: Iterable) -> Iterator[int] | None:
    """The global batch size of every step of this epoch when ``loader`` draws its batches from an
    :class:`EpochBatches` (known on every rank without a collective), else None. Call after ``set_epoch``."""
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, EpochBatches):
        return iter([len(b) for b in sampler.global_batches()])
    return None


def global_batch_size(b: int, known: Iterator[int] | None, world: int) -> int:
    """This step's global batch: ``b`` alone, the next of ``known`` (:func:`global_batch_sizes`), or a sum
    over ranks of a CPU tensor (gloo: no wait on the GPU's stream)."""
    if world <= 1:
        return b
    if known is not None:
        return next(known)
    n = torch.tensor([b], dtype=torch.int64)
    dist.all_reduce(n)
    return int(n[0])


def loss_scale(numerator: int, global_b: int) -> float:
    """``numerator / global_b`` rounded as float32 division rounds it (the value the loss scaling always had
    when it divided on the device), as a Python number: multiplying by it needs no host-to-device copy."""
    return float(torch.tensor(float(numerator)) / torch.tensor(float(global_b)))


def train_one_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer, *,
                    device: torch.device, normalize: Callable[[Tensor], Tensor], amp: bool = False,
                    progress: Callable[[int], Any] | None = None) -> dict[str, float]:
    """One pass of SGD over ``loader`` with segment average consensus (TSN).

    Each batch is ``{"input": (B, N, C, H, W) uint8, "label": (B,)}``; the network scores the B*N
    frames/stacks, the N scores of a sample are averaged and the cross-entropy of that average is the loss.
    Under DDP the loss of each rank is ``sum / global_batch * world_size`` so that DDP's gradient average is
    the gradient of the global batch's mean loss, however the batch is split. The global batch comes from
    the loader's :class:`EpochBatches` when it has one (no collective per step).

    The loss and accuracy sums stay on the device during the epoch (no host sync per step) and are read
    once at its end.

    Returns:
        ``loss`` and ``acc`` over the epoch (every rank's samples), ``samples`` (global), ``seconds``,
        ``data_seconds`` (waiting for the loader) and ``frames`` (global B*N summed).
    """
    world = _world()
    known = global_batch_sizes(loader) if world > 1 else None
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.int64, device=device)
    samples = frames = 0
    t0 = time.perf_counter()
    data_s = 0.0
    t_wait = time.perf_counter()
    for batch in loader:
        data_s += time.perf_counter() - t_wait
        x, y = batch["input"], batch["label"].to(device, non_blocking=True)
        b, n = x.shape[:2]
        x = _to_input(x.flatten(0, 1), device, normalize)
        scale = loss_scale(world, global_batch_size(b, known, world))
        with autocast(device, amp):
            logits = model(x).float().view(b, n, -1).mean(1)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
        loss = loss_sum * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_acc += loss_sum.detach().double()
            correct_acc += (logits.argmax(1) == y).sum()
        samples += b
        frames += b * n
        if progress is not None:
            progress(b)
        t_wait = time.perf_counter()
    totals = torch.tensor([loss_acc.item(), correct_acc.item(), samples, frames], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    samples = max(totals[2].item(), 1.0)
    check_finite_loss(totals[0].item() / samples, "this epoch")
    return {"loss": totals[0].item() / samples, "acc": totals[1].item() / samples, "samples": int(totals[2]),
            "frames": int(totals[3]), "seconds": time.perf_counter() - t0, "data_seconds": data_s}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], num_videos: int, num_classes: int, *,
             device: torch.device, normalize: Callable[[Tensor], Tensor], amp: bool = False,
             chunk: int = 32, progress: Callable[[int], Any] | None = None) -> dict[str, Tensor]:
    """Score videos from per-video view batches; views are averaged (two-stream test protocol).

    ``loader`` yields ``{"input": (T, C, H, W) uint8, "index": int}`` per video (``batch_size=None``); on
    each rank it covers that rank's share of the ``num_videos`` videos. The per-video results are summed
    over ranks (each video is scored by exactly one rank).

    Returns:
        ``probs``: (V, C) float32 softmax scores averaged over the T views (the two-stream fusion input,
        Simonyan & Zisserman 2014); ``logits``: (V, C) float32 raw scores averaged over views (TSN's test
        output); ``scored``: (V,) bool, videos that were scored.
    """
    was_training = model.training
    model.eval()
    out = torch.zeros(num_videos, 2 * num_classes + 1, dtype=torch.float64)
    for item in loader:
        x = item["input"]
        logits = []
        for i in range(0, x.shape[0], chunk):
            with autocast(device, amp):
                logits.append(model(_to_input(x[i:i + chunk], device, normalize)).float())
        lg = torch.cat(logits).cpu()  # one copy back per video
        idx = int(item["index"])
        out[idx, :num_classes] = lg.softmax(1).mean(0).double()
        out[idx, num_classes:-1] = lg.mean(0).double()
        out[idx, -1] = 1
        if progress is not None:
            progress(1)
    if _world() > 1:
        out_dev = out.to(device) if device.type == "cuda" else out
        dist.all_reduce(out_dev)
        out = out_dev.cpu()
    model.train(was_training)
    return {"probs": out[:, :num_classes].float(), "logits": out[:, num_classes:-1].float(),
            "scored": out[:, -1] > 0}


def accuracy_metrics(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_classes: int) -> dict:
    """Top-1 accuracy, mean class accuracy (TSN reports it) and the confusion matrix (rows: true class).

    Mean class accuracy averages the per-class recall over the classes present in ``labels``.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0] or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (V, {num_classes}) for {labels.shape[0]} labels, got {scores.shape}")
    pred = scores.argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    present = cm.sum(1) > 0
    per_class = np.diag(cm)[present] / cm.sum(1)[present]
    return {"top1": float((pred == labels).mean()) if len(labels) else float("nan"),
            "mean_class_acc": float(per_class.mean()) if present.any() else float("nan"), "confusion": cm}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain values only) on the CPU."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (no 'model' entry)")
    return obj


def resume_checkpoint(path: Path, meta: dict, keys: tuple[str, ...], *, is_main: bool = True, log=None) -> dict | None:
    """The ``last.pt`` a killed run left, checked against this run's ``meta`` on ``keys``; None when absent.

    Every rank reads it before its first collective, so rank 0 cannot have replaced it yet. A checkpoint of
    another architecture, class list, ... is refused with a message naming the file.
    """
    from pipeline.stage import StageError

    if not path.exists():
        return None
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise StageError(str(e)) from None
    for k in keys:
        if ckpt.get(k) != meta[k]:
            raise StageError(f"{path}: checkpoint has {k} {ckpt.get(k)!r}, this run needs {meta[k]!r}; remove "
                             "the file (or run with --force) to start over")
    if is_main and log is not None:
        log.info("resuming from %s (epoch %d%s)", path, ckpt["epoch"], ", training finished" if ckpt["done"] else "")
    return ckpt


def end_epoch(row: dict, history: list[dict], best: dict, *, epoch: int, decays: int, lr: float, scheduler,
              optimizer: torch.optim.Optimizer, max_epochs: int, max_decays: int) -> tuple[int, int, dict, bool, bool]:
    """Bookkeeping after one epoch of a plateau-scheduled run ([STFN] §4.2: lr divided by 10 when the
    validation error saturates; TSN stops after ``max_decays`` divisions).

    ``row`` holds ``val_acc`` / ``val_loss`` (None without a validation set, then the training loss is
    monitored) and ``train_loss``; it is appended to ``history``. Returns (epoch, decays, best, improved, done).
    """
    if row["val_acc"] is not None:
        monitored = 1.0 - row["val_acc"]
        improved = (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])
    else:
        monitored, improved = row["train_loss"], True
    scheduler.step(monitored)
    epoch += 1
    if optimizer.param_groups[0]["lr"] < lr:
        decays += 1
    done = epoch >= max_epochs or decays > max_decays
    history.append(row)
    if improved:
        best = {"epoch": epoch, "val_acc": row["val_acc"] if row["val_acc"] is not None else -1.0,
                "val_loss": row["val_loss"] if row["val_loss"] is not None else math.inf}
    return epoch, decays, best, improved, done


def save_epoch(out: Path, state: dict, last_extra: dict, history: list[dict], *, improved: bool) -> None:
    """Rank 0 after each epoch: ``best.pt`` when it improved, ``last.pt`` (``state`` + optimizer etc. in
    ``last_extra``, enough to resume) and ``history.csv``, each written atomically."""
    if improved:
        save_checkpoint(out / "best.pt", state)
    save_checkpoint(out / "last.pt", {**state, **last_extra, "history": history})
    tmp = out / ".tmp-history.csv"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    tmp.replace(out / "history.csv")
