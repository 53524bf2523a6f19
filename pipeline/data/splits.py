"""The one validation hold-out: which training videos every stage validates on.

The hold-out is decided once, when ``decode`` writes the video table, and recorded there as data: in each
split's membership list a held-out training video reads ``"val"`` instead of ``"train"``. ``finetune``,
``extract-features`` (which copies the membership into the feature store), ``train-head`` and ``refine``
all read that record, so a head never early-stops on videos its backbones were trained on, and every stage
validates on the same videos.

The rule (:func:`holdout_groups`): whole groups (the source video a clip was cut from) are held out, per
class, so that about ``fraction`` of each class's training videos is held out and no group sits on both
sides; each group belongs to the class most of its videos have (ties: the lower label); within a class the
groups are ordered by a keyed hash of ``(seed, group)`` and the prefix whose size is closest to the target
is held out, always leaving at least one group in training. It is deterministic for a seed and does not
depend on the order of the videos.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable, Sequence

#: Membership values of a split's per-video list.
TRAIN, VAL, TEST, UNUSED = "train", "val", "test", "unused"
MEMBERSHIP = (TRAIN, VAL, TEST, UNUSED)


def _group_rank(seed: int, group: str) -> bytes:
    # blake2b, not hash(): Python's string hash is salted per process.
    return hashlib.blake2b(f"{seed}\0{group}".encode(), digest_size=16).digest()


def holdout_groups(videos: Iterable, fraction: float, *, seed: int = 0) -> frozenset[str]:
    """Groups to hold out so that about ``fraction`` of each class's videos is held out.

    ``videos``: objects with ``.group`` and ``.label`` (a :class:`~pipeline.data.datasets.VideoRecord`),
    or ``(group, label)`` pairs. A group is held out or kept as a whole.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    sizes: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for video in videos:
        group, label = (video.group, video.label) if hasattr(video, "group") else video
        sizes[str(group)][int(label)] += 1
    by_class: dict[int, list[tuple[bytes, str, int]]] = defaultdict(list)
    for group, per_label in sizes.items():
        home = min(per_label, key=lambda label: (-per_label[label], label))
        by_class[home].append((_group_rank(seed, group), group, sum(per_label.values())))

    held: set[str] = set()
    for groups in by_class.values():
        groups.sort()
        target = fraction * sum(size for _, _, size in groups)
        best_k, best_err, total = 0, target, 0
        for k, (_, _, size) in enumerate(groups[:-1], start=1):
            total += size
            if abs(total - target) < best_err:
                best_k, best_err = k, abs(total - target)
        held.update(group for _, group, _ in groups[:best_k])
    return frozenset(held)


def mark_validation(membership: Sequence[str], groups: Sequence[str], labels: Sequence[int], fraction: float,
                    *, seed: int = 0) -> list[str]:
    """One split's membership list with the held-out training videos marked ``"val"``.

    Only ``"train"`` videos are considered (a ``"val"`` already present is first returned to training, so
    re-marking with another fraction or seed is well defined); test and unused videos are left as they are.
    """
    base = [TRAIN if m == VAL else m for m in membership]
    train = [i for i, m in enumerate(base) if m == TRAIN]
    held = holdout_groups([(groups[i], labels[i]) for i in train], fraction, seed=seed) if fraction > 0 else ()
    out = list(base)
    for i in train:
        if groups[i] in held:
            out[i] = VAL
    return out
