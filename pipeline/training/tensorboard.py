"""Per-epoch curves for TensorBoard (optional: ``pip install 'stfn-pipeline[tensorboard]'``).

``--tensorboard`` of finetune, train-head and refine writes the loss, accuracy and learning rate of every
epoch as TensorBoard scalars into ``<stage folder>/tensorboard/``; ``tensorboard --logdir <cache>`` shows every
run of the cache side by side (its folders are the stage keys). Without the option nothing is imported.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.stage.keys import TENSORBOARD_DIR


class TensorBoardMissing(RuntimeError):
    """``--tensorboard`` was asked but the ``tensorboard`` package is not installed."""


def check_available() -> None:
    """Raise :class:`TensorBoardMissing` (with the install command) unless TensorBoard can be written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise TensorBoardMissing("--tensorboard needs the tensorboard package: pip install "
                                 f"'stfn-pipeline[tensorboard]' (or pip install tensorboard); {e}") from None


class EpochScalars:
    """Writes ``{name: value}`` per epoch under ``<folder>/tensorboard/``; a no-op when not ``enabled``.

    Use as a context manager; :meth:`epoch` takes the epoch number (1-based) and any scalars (None and NaN
    values are skipped). Tags are grouped: ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``,
    ``lr``, from the usual row keys ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``, ``lr``.
    """

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
            "val_acc": "accuracy/val", "val_error": "error/val", "lr": "lr"}

    def __init__(self, folder: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            check_available()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(folder) / TENSORBOARD_DIR))

    def epoch(self, epoch: int, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            tag = self.TAGS.get(key)
            if tag is None or value is None or not isinstance(value, (int, float)) or math.isnan(float(value)):
                continue
            self.writer.add_scalar(tag, float(value), int(epoch))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "EpochScalars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
