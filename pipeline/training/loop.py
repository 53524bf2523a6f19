"""The one training loop of the backbones: ``finetune`` (one stream) and ``refine`` (both streams + a head).

Plain functions with explicit arguments (torchvision's ``references/`` style). :func:`fit` is the epoch loop
of both stages ([STFN] §4.2: SGD, learning rate divided by 10 when the validation error saturates), with
resume from ``last.pt``, ``best.pt`` on every validation improvement, ``history.csv``, a progress bar, one log
line per epoch and optional TensorBoard curves; :func:`train_one_epoch` is one pass of SGD whose loss comes
from a ``loss_fn`` (:func:`segment_consensus_loss` for one stream, the two-stream network's own loss for
refine), in micro-batches whose gradients accumulate when asked. Nothing here knows about stages or the cache.

Distributed training (``torchrun --nproc-per-node K``; the process group, gloo for CPU tensors and nccl for
CUDA ones, is set up by :mod:`pipeline.dist`): :class:`EpochBatches` gives every rank its slice of each *global* batch, and
:func:`train_one_epoch` scales each rank's loss so that DDP's gradient average equals the gradient of the
mean loss over the global batch; BatchNorm layers that use batch statistics are made global
(:class:`~pipeline.training.batchnorm.GlobalBatchNorm2d`). So K ranks with global batch B compute what one
process with batch B computes, up to floating-point summation order.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.dist import device as rank_device, local_rank, world_size as _world
from pipeline.io.atomic import atomic_write, load_checkpoint, save_checkpoint
from pipeline.stage.keys import BEST, HISTORY, LAST
from pipeline.training import check_finite_loss
from pipeline.training.batchnorm import (GlobalBatchNorm2d, freeze_partial_bn,  # noqa: F401  (re-exported)
                                        set_train_mode, sync_batchnorm)
from pipeline.training.tensorboard import EpochScalars

__all__ = [
    "DistInfo", "EpochBatches", "FitResult", "GlobalBatchNorm2d", "Schedule", "autocast", "auto_workers",
    "fit", "global_batch_size", "global_batch_sizes", "freeze_partial_bn", "load_checkpoint", "loss_scale",
    "check_plan", "make_loader", "micro_batches", "predict_videos",
    "resume_checkpoint", "save_checkpoint", "segment_consensus_loss", "seed_epoch", "set_train_mode",
    "sum_over_ranks", "sync_batchnorm", "train_one_epoch", "trainable_param_groups",
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
    cannot step on nothing); with ``K = 1`` no sample is dropped. ``drop_last``: the last, incomplete global
    batch is dropped too when there are complete ones (TSN's training loader; refine uses it: a step on a few
    videos would take BatchNorm statistics from one or two videos per rank). Call :meth:`set_epoch` before
    iterating.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the number of ranks {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            part = np.array_split(batch, self.world_size)[self.rank]
            yield [(int(i), self.epoch) for i in part]

    def __len__(self) -> int:
        return len(self.global_batches())


def trainable_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on convolution (2-D backbones, the heads' 1-D) and linear weights
    only, none on biases and BN parameters (tsn-pytorch ``get_optim_policies``). Frozen parameters are left
    out."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------

def auto_workers(workers: int, world_size: int = 1) -> int:
    """DataLoader worker processes per rank: ``workers`` when >= 0, else the cores per rank less one (<= 8)."""
    if workers >= 0:
        return workers
    return max(0, min(8, (os.cpu_count() or 1) // world_size - 1))


def make_loader(dataset, *, workers: int, device: torch.device, **kw):
    """A DataLoader with pinned memory on CUDA and persistent workers."""
    from torch.utils.data import DataLoader

    # Its own generator: creating an iterator must not draw from the global one (dropout's, seeded per epoch).
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator(), **kw)


def rank_share(n: int, info: DistInfo) -> list[int]:
    """The indices of ``range(n)`` this rank scores at test time (every ``world_size``-th)."""
    return list(range(info.rank, n, info.world_size))


# ----------------------------------------------------------------------------------------------------------
# One epoch, prediction
# ----------------------------------------------------------------------------------------------------------

def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _to_input(x: Tensor, device: torch.device, normalize: Callable[[Tensor], Tensor]) -> Tensor:
    x = normalize(x.to(device, non_blocking=True))
    # channels_last on CUDA (faster convolutions with AMP); one fixed layout on CPU, where the layout
    # picks the kernel and so the last bits of the result.
    return x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)


#: ``loss_fn(net, batch, device) -> (loss_sum, correct, frames)`` for one (micro-)batch dict of CPU tensors:
#: the summed loss of its samples (a scalar tensor), how many it classified right (a tensor, or None when
#: the network gives no per-sample prediction) and how many frames / stacks it fed the network.
LossFn = Callable[[nn.Module, dict, torch.device], tuple[Tensor, "Tensor | None", int]]


def segment_consensus_loss(normalize: Callable[[Tensor], Tensor], amp: bool = False) -> LossFn:
    """TSN's segment consensus for one stream: a batch is ``{"input": (B, N, C, H, W) uint8, "label": (B,)}``;
    the network scores the B*N frames / stacks, the N scores of a sample are averaged and the cross-entropy
    of that average is the loss."""

    def loss_fn(net: nn.Module, batch: dict, device: torch.device):
        x, y = batch["input"], batch["label"].to(device, non_blocking=True)
        b, n = x.shape[:2]
        x = _to_input(x.flatten(0, 1), device, normalize)
        with autocast(device, amp):
            logits = net(x).float().view(b, n, -1).mean(1)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
        return loss_sum, (logits.argmax(1) == y).sum(), b * n

    return loss_fn


def micro_batches(b: int, micro_batch: int) -> list[slice]:
    """``ceil(b / micro_batch)`` contiguous slices of ``range(b)`` of near-equal sizes (at most ``micro_batch``):
    10 videos in micro-batches of 4 are 3 + 3 + 4, not 4 + 4 + 2, so no micro-batch's BatchNorm statistics come
    from needlessly few videos. ``micro_batch`` 0: one slice."""
    if micro_batch <= 0 or micro_batch >= b:
        return [slice(0, b)]
    k = -(-b // micro_batch)
    edges = [(i * b) // k for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


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


def train_one_epoch(net: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer, *,
                    device: torch.device, loss_fn: LossFn, micro_batch: int = 0,
                    progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """One pass of SGD over ``loader``; every step is one global batch, each rank's slice in micro-batches.

    Each batch is a dict of CPU tensors with a ``"label"`` (B,) entry; it is cut by :func:`micro_batches`
    (``micro_batch`` 0: not cut) and ``loss_fn`` scores each part. Under DDP the summed loss of a part is
    weighted by ``world / global batch`` and the gradients accumulate (DDP synchronises on the last
    micro-batch only), so DDP's gradient average is the gradient of the global batch's mean loss, however the
    batch is split over ranks and micro-batches. The global batch comes from the loader's
    :class:`EpochBatches` when it has one (no collective per step), and the running sums stay on the device:
    one host sync per epoch.

    Returns:
        ``loss`` and ``acc`` (None when ``loss_fn`` gives no predictions) over the epoch (every rank's
        samples), ``samples`` (global), ``frames`` (global), ``seconds``, ``data_seconds`` (waiting for the
        loader).
    """
    world = _world()
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    known = global_batch_sizes(loader) if world > 1 else None
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    samples = frames = 0
    scored = False
    t0 = t_wait = time.perf_counter()
    data_s = 0.0
    for batch in loader:
        data_s += time.perf_counter() - t_wait
        b = batch["label"].shape[0]
        scale = loss_scale(world, global_batch_size(b, known, world))
        optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(b, micro_batch)
        for k, sl in enumerate(parts):
            part = batch if len(parts) == 1 else {key: v[sl] if isinstance(v, Tensor) else v
                                                   for key, v in batch.items()}
            sync = contextlib.nullcontext() if (not ddp or k == len(parts) - 1) else net.no_sync()
            with sync:
                loss_sum, correct, n_frames = loss_fn(net, part, device)
                (loss_sum * scale).backward()
            with torch.no_grad():
                sums[0] += loss_sum.detach().double()
                if correct is not None:
                    sums[1] += correct.double()
                    scored = True
            frames += n_frames
        samples += b
        optimizer.step()
        if progress is not None:
            progress(b)
        t_wait = time.perf_counter()
    totals = torch.cat([sums.cpu(), torch.tensor([samples, frames], dtype=torch.float64)])  # the one host sync
    if world > 1:
        dist.all_reduce(totals)
    samples = max(totals[2].item(), 1.0)
    check_finite_loss(totals[0].item() / samples, "this epoch")
    return {"loss": totals[0].item() / samples, "acc": totals[1].item() / samples if scored else None,
            "samples": int(totals[2]), "frames": int(totals[3]), "seconds": time.perf_counter() - t0,
            "data_seconds": data_s}


def sum_over_ranks(out: Tensor, device: torch.device) -> Tensor:
    """``out`` (CPU) summed over the ranks (through ``device``: NCCL reduces CUDA tensors only); itself
    outside a process group."""
    if _world() > 1:
        out_dev = out.to(device) if device.type == "cuda" else out
        dist.all_reduce(out_dev)
        out = out_dev.cpu()
    return out


@torch.no_grad()
@torch.no_grad()
def predict_videos(model: nn.Module, loader: Iterable[dict], num_videos: int, num_classes: int, *,
                   device: torch.device, normalize: Callable[[Tensor], Tensor], amp: bool = False,
                   chunk: int = 32, progress: Callable[[int], Any] | None = None) -> dict[str, Tensor]:
    """Score videos from per-video view batches; views are averaged (two-stream test protocol).

    ``loader`` yields ``{"input": (T, C, H, W) uint8, "index": int}`` per video (``batch_size=None``); on
    each rank it covers that rank's share of the ``num_videos`` videos. The views of consecutive videos go
    through the network together, ``chunk`` views per forward pass (a video's views may span two passes), so
    short videos do not pay one pass each; memory holds at most ``chunk`` views plus one video's. The per-video
    results are summed over ranks (each video is scored by exactly one rank).

    Returns:
        ``probs``: (V, C) float32 softmax scores averaged over the T views (the two-stream fusion input,
        Simonyan & Zisserman 2014); ``logits``: (V, C) float32 raw scores averaged over views (TSN's test
        output); ``scored``: (V,) bool, videos that were scored.
    """
    was_training = model.training
    model.eval()
    out = torch.zeros(num_videos, 2 * num_classes + 1, dtype=torch.float64)
    queued: list[Tensor] = []            # views not yet run, on the device
    videos: list[tuple[int, int]] = []   # (index, views) of the videos not yet complete, in order
    logits = torch.zeros(0, num_classes)  # CPU logits of their views already run

    def run(n: int) -> None:
        nonlocal queued, logits
        x = torch.cat(queued) if len(queued) > 1 else queued[0]
        queued = [x[n:]] if n < x.shape[0] else []
        with autocast(device, amp):
            lg = model(_to_input(x[:n], device, normalize)).float()
        logits = torch.cat([logits, lg.cpu()])  # one copy back per forward pass
        done = 0
        while videos and videos[0][1] <= logits.shape[0] - done:
            idx, t = videos.pop(0)
            lv = logits[done:done + t]
            out[idx, :num_classes] = lv.softmax(1).mean(0).double()
            out[idx, num_classes:-1] = lv.mean(0).double()
            out[idx, -1] = 1
            done += t
            if progress is not None:
                progress(1)
        logits = logits[done:]

    pending = 0
    for item in loader:
        x = item["input"]
        videos.append((int(item["index"]), x.shape[0]))
        queued.append(x.to(device, non_blocking=True))
        pending += x.shape[0]
        while pending >= chunk:
            run(chunk)
            pending -= chunk
    if pending:
        run(pending)
    out = sum_over_ranks(out, device)
    model.train(was_training)
    return {"probs": out[:, :num_classes].float(), "logits": out[:, num_classes:-1].float(),
            "scored": out[:, -1] > 0}


def val_metrics(probs: Tensor, labels: Sequence[int]) -> tuple[float, float]:
    """(accuracy, NLL) of (V, C) class probabilities: what the plateau schedule monitors."""
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    return (float((probs.argmax(1) == y).float().mean()), float(F.nll_loss(probs.clamp_min(1e-12).log(), y)))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (the files themselves: pipeline.io.atomic.save_checkpoint / load_checkpoint)
# ----------------------------------------------------------------------------------------------------------

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


def check_plan(*, tensorboard: bool, batch_size: int) -> None:
    """What a stage training end to end (refine, train-net) checks in its plan, before any work: TensorBoard is
    installed when asked for, and the global batch has a video for every rank. StageError otherwise."""
    from pipeline.stage import StageError
    from pipeline.training.tensorboard import TensorBoardMissing, check_available

    if tensorboard:
        try:
            check_available()
        except TensorBoardMissing as e:
            raise StageError(str(e)) from None
    if batch_size < _world():
        raise StageError(f"--batch-size {batch_size} is smaller than the {_world()} ranks")


def start_run(ctx, device: str, meta: dict, resume_keys: tuple[str, ...]) -> tuple[DistInfo, torch.device, dict | None]:
    """What a training stage's ``run`` starts with: this process's rank, its device (``pipeline.dist.device``
    of ``device``) and the ``last.pt`` of a killed run in the stage folder ``ctx.dir`` to resume from
    (:func:`resume_checkpoint`)."""
    info = DistInfo(ctx.rank, ctx.world_size, local_rank())
    ckpt = resume_checkpoint(ctx.dir / LAST, meta, resume_keys, is_main=info.is_main, log=ctx.log)
    return info, torch.device(rank_device(device)), ckpt


def end_epoch(row: dict, history: list[dict], best: dict, *, epoch: int, decays: int, lr: float, scheduler,
              optimizer: torch.optim.Optimizer, max_epochs: int, max_decays: int) -> tuple[int, int, dict, bool, bool]:
    """Bookkeeping after one epoch of a plateau-scheduled run ([STFN] §4.2: lr divided by 10 when the
    validation error saturates; TSN stops after ``max_decays`` divisions) or a step-scheduled one (the lr
    divided at fixed epochs, :attr:`Schedule.milestones`).

    ``row`` holds ``val_acc`` / ``val_loss`` (None without a validation set, then the training loss is
    monitored) and ``train_loss``; it is appended to ``history``. Returns (epoch, decays, best, improved, done).
    """
    if row["val_acc"] is not None:
        monitored = 1.0 - row["val_acc"]
        improved = (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])
    else:
        monitored, improved = row["train_loss"], True
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:  # a step schedule: the epoch alone decides
        scheduler.step()
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
        save_checkpoint(out / BEST, state)
    save_checkpoint(out / LAST, {**state, **last_extra, "history": history})
    with atomic_write(out / HISTORY, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


# ----------------------------------------------------------------------------------------------------------
# The epoch loop
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The plateau schedule of [STFN] §4.2 as finetune and refine run it: SGD with momentum, the learning rate
    divided by 10 after ``patience`` epochs without a lower validation error, stopping at the first plateau
    after ``lr_decays`` divisions or after ``epochs`` epochs; ``seed`` seeds the data order and dropout.

    With ``milestones`` (epoch counts, increasing) it is a step schedule instead: the learning rate divided by
    10 after each of those epochs ([ST-Mult] §4.1: after 20, then after 10 more, ``(20, 30)``), ``epochs``
    epochs in all; ``patience`` and ``lr_decays`` are unused. Validation still picks ``best.pt``."""

    lr: float
    momentum: float
    weight_decay: float
    patience: int
    lr_decays: int
    epochs: int
    seed: int = 0
    milestones: tuple[int, ...] = ()

    def scheduler(self, optimizer: torch.optim.Optimizer):
        """The learning-rate scheduler of this schedule (stepped once per epoch by :func:`end_epoch`)."""
        if self.milestones:
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.milestones), gamma=0.1)
        # [STFN] §4.2: divide the learning rate by 10 when the validation error saturates.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=self.patience)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    epochs: int = 0
    decays: int = 0
    extra: dict = field(default_factory=dict)  # the ``last_extra`` entries of the checkpoint resumed from


def fit(model: nn.Module, train: Callable[[torch.optim.Optimizer, Callable[[int], Any] | None], dict], *, schedule: Schedule,
        batches: EpochBatches, validate: Callable[[], tuple[float, float]] | None, out: Path, meta: dict,
        ckpt: dict | None, info: DistInfo, log, net: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None, train_mode: Callable[[], None] | None = None,
        best: dict | None = None, last_extra: dict | None = None,
        rate: tuple[str, str, str] = ("frames_per_s", "frames", "frames"), desc: str = "train",
        unit: str = "sample", tensorboard: bool = False) -> FitResult:
    """Train ``model`` (from ``ckpt`` when resuming a killed run) on the plateau or step ``schedule``; rank 0 writes
    ``best.pt`` on every validation improvement, ``last.pt`` and ``history.csv`` after every epoch.

    ``train(optimizer, progress)`` runs one epoch (:func:`train_one_epoch` with the stage's loader and loss) and returns
    its statistics; ``validate()`` gives (accuracy, NLL) on the validation videos (None: no validation set,
    the training loss is monitored). ``net`` is what trains (``model`` wrapped in DDP; default ``model``),
    ``train_mode()`` puts it in training mode (default :func:`set_train_mode`). ``best`` is the starting point's
    validation (refine scores its starting networks; default: nothing yet); ``last_extra`` goes into
    ``last.pt`` too (returned as ``extra`` when resuming). ``rate`` is (row key, statistics key, unit) of the
    throughput logged per epoch. With ``tensorboard`` the rows also go to ``<out>/tensorboard/`` (rank 0).
    After training every rank loads ``best.pt``'s weights into ``model``.
    """
    main = info.is_main
    net = model if net is None else net
    if optimizer is None:
        optimizer = torch.optim.SGD(trainable_param_groups(model, schedule.weight_decay), lr=schedule.lr,
                                    momentum=schedule.momentum)
    scheduler = schedule.scheduler(optimizer)
    history: list[dict] = []
    best = dict(best) if best is not None else {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf}
    start, decays, done = 0, 0, schedule.epochs == 0
    extra = dict(last_extra or {})
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, best = list(ckpt["history"]), dict(ckpt["best"])
        start, decays, done = int(ckpt["epoch"]), int(ckpt["lr_decays"]), bool(ckpt["done"])
        extra = {k: ckpt[k] for k in extra if k in ckpt}
    bar = None
    if main and not done:
        from tqdm import tqdm

        bar = tqdm(total=(schedule.epochs - start) * sum(len(b) for b in batches.global_batches()), desc=desc,
                   unit=unit, dynamic_ncols=True, file=sys.stderr, disable=None)
    if main and not done:  # before the first epoch: room for best.pt and last.pt (weights + momentum)
        from pipeline.stage.space import require_free

        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        require_free(out, 3 * weights, f"{desc}'s checkpoints (best.pt, and last.pt with the optimizer state)")
    curves = EpochScalars(out, tensorboard and main)
    rate_key, rate_count, rate_unit = rate
    epoch = start
    try:
        while not done and epoch < schedule.epochs:
            seed_epoch(schedule.seed, epoch, info.rank)
            batches.set_epoch(epoch)
            (train_mode or (lambda: set_train_mode(net, True)))()
            lr = optimizer.param_groups[0]["lr"]
            st = train(optimizer, (lambda k: bar.update(k * info.world_size)) if bar is not None else None)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": st["loss"]}
            if st.get("acc") is not None:
                row["train_acc"] = st["acc"]
            row.update({"val_loss": None, "val_acc": None, "seconds": round(st["seconds"], 3),
                        "data_seconds": round(st["data_seconds"], 3),
                        rate_key: round(st[rate_count] / max(st["seconds"], 1e-9), 3)})
            if validate is not None:
                row["val_acc"], row["val_loss"] = validate()
            epoch, decays, best, improved, done = end_epoch(
                row, history, best, epoch=epoch, decays=decays, lr=lr, scheduler=scheduler, optimizer=optimizer,
                max_epochs=schedule.epochs,
                max_decays=len(schedule.milestones) if schedule.milestones else schedule.lr_decays)
            if main:
                save_epoch(out, {**meta, "model": model.state_dict(), "epoch": epoch, "metrics": row},
                           {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best": best,
                            "lr_decays": decays, "done": done, **extra}, history, improved=improved)
                curves.epoch(epoch, row)
                acc = f" acc {row['train_acc']:.3f}" if "train_acc" in row else ""
                val = (f", val acc {row['val_acc']:.3f} loss {row['val_loss']:.3f}" if row["val_acc"] is not None
                       else "")
                log.info("epoch %d: lr %.0e, train loss %.3f%s%s, %.3g %s/s (%.0f%% waiting for data)", epoch, lr,
                         st["loss"], acc, val, row[rate_key], rate_unit,
                         100 * st["data_seconds"] / max(st["seconds"], 1e-9))
    finally:
        if bar is not None:
            bar.close()
        curves.close()

    # Test with the best weights (written by rank 0; the other ranks wait for the file).
    if info.distributed:
        dist.barrier()
    model.load_state_dict(load_checkpoint(out / BEST)["model"])
    return FitResult(history=history, best=best, epochs=epoch, decays=decays, extra=extra)
