"""Reading TensorBoard event files back with TensorBoard's own reader (the ``tensorboard`` extra)."""
from __future__ import annotations

from pathlib import Path

import pytest


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of the event files under ``folder/tensorboard``; skips the test when the
    ``tensorboard`` package is not installed."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed "
                                              "(pip install 'stfn-pipeline[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(folder) / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_curves_match_history(folder: Path, history: list[dict]) -> None:
    """The per-epoch scalars equal the stage's history rows (epoch, train loss, val accuracy, lr)."""
    scalars = tensorboard_scalars(folder)
    assert {"loss/train", "lr"} <= set(scalars), sorted(scalars)
    assert [s for s, _ in scalars["loss/train"]] == [int(h["epoch"]) for h in history]
    assert [v for _, v in scalars["loss/train"]] == pytest.approx([float(h["train_loss"]) for h in history], rel=1e-6)
    assert [v for _, v in scalars["lr"]] == pytest.approx([float(h["lr"]) for h in history])
    if history and history[0].get("val_acc") not in (None, ""):
        assert [v for _, v in scalars["accuracy/val"]] == pytest.approx([float(h["val_acc"]) for h in history],
                                                                        rel=1e-6)
