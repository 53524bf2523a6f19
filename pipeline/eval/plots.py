"""Plots written next to stage outputs: training curves, confusion matrices, bar charts (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    tmp.replace(path)
    return path


def training_curves(history: Sequence[Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch. ``history`` rows hold ``epoch`` and any of ``train_loss``, ``val_loss``,
    ``train_acc``, ``val_acc``, ``lr``."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("train_loss", "val_loss"):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            axes[0].plot(epochs, vals, marker=".", label=key.replace("_", " "))
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("loss"), axes[0].legend()
    for key in ("train_acc", "val_acc"):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            axes[1].plot(epochs, vals, marker=".", label=key.replace("_", " "))
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel("accuracy"), axes[1].set_ylim(0, 1), axes[1].legend()
    lrs = [h.get("lr") for h in history]
    if any(v is not None for v in lrs):
        ax2 = axes[0].twinx()
        ax2.plot(epochs, lrs, color="grey", ls=":", label="lr")
        ax2.set_yscale("log"), ax2.set_ylabel("learning rate", color="grey")
    if title:
        fig.suptitle(title)
    path = _save(fig, path)
    plt.close(fig)
    return path


def confusion_matrix_plot(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    size = min(max(4.0, 0.35 * n + 2), 30.0)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    path = _save(fig, path)
    plt.close(fig)
    return path


def bar_chart(values: Mapping[str, float], path: Path, *, errors: Mapping[str, float] | None = None,
              title: str = "", ylabel: str = "top-1 accuracy") -> Path:
    """One bar per row (e.g. per head), optional error bars (std over seeds)."""
    plt = _plt()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 4))
    ax.bar(range(len(names)), [values[k] for k in names],
           yerr=[errors.get(k, 0) for k in names] if errors else None, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel(ylabel), ax.set_ylim(0, 1)
    if title:
        ax.set_title(title)
    path = _save(fig, path)
    plt.close(fig)
    return path


def timeline_plot(times: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path, *,
                  top: int = 5, title: str = "", xlabel: str = "time (s)") -> Path:
    """Class probabilities over time (``pipeline predict --timeline``): one line per class among the ``top``
    classes by their largest probability. times (W,), probs (W, C)."""
    plt = _plt()
    order = np.argsort(-probs.max(axis=0), kind="stable")[:top]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for c in order:
        ax.plot(times, probs[:, c], label=str(class_names[c]), lw=1.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
