"""``FeatureDataset``: a feature store (``features.zarr`` / ``features.h5`` of ``extract-features``) as a lazy
torch ``Dataset``, one video per item, for training your own heads or feeding other tools.

A 10-view UCF101 store is ~50 GB in float16, so nothing is read up front but the small per-video tables (ids,
labels, split membership, groups, positions); an item reads that video's rows of each stream. The file is
opened on first use in each process (DataLoader workers open their own handle). Example in docs/formats.md.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.io.store import ContainerReader, StoreError, decode_strings, open_feature_store, reading

__all__ = ["FeatureDataset"]


class FeatureDataset(Dataset):
    """Per-video features of a feature store.

    Args:
        path: ``features.zarr`` or ``features.h5``.
        streams: the streams to read (default: every stream of the store, ``rgb`` and ``flow``).
        subset: only the videos whose split membership is one of these (``"train"``, ``"val"``, ``"test"``,
            ``"unused"``); None: every video.
        dtype: the dtype of the returned feature tensors (float32 by default; None keeps the stored one).

    ``dataset[i]`` is ``{<stream>: (P, views, D) tensor, ..., "label": int, "video_id": str,
    "positions": (P,) float32 frame positions}``; ``class_names``, ``video_ids``, ``labels`` and ``attrs``
    describe the selected videos.
    """

    def __init__(self, path: Path, streams: Sequence[str] | None = None, *, subset: Sequence[str] | None = None,
                 dtype: torch.dtype | None = torch.float32) -> None:
        self.path = Path(path)
        self._reader = open_feature_store(self.path, check_format=True)
        self._pid = os.getpid()
        r = self._reader
        attrs = r.attrs
        held = list(attrs.get("streams", []))
        self.streams = held if streams is None else list(streams)
        missing = [s for s in self.streams if s not in held]
        if missing:
            raise StoreError(f"{self.path}: no stream(s) {missing}; it holds {held}")
        with reading(self.path, "video tables"):
            ids = decode_strings(r["video_ids"][...])
            split = decode_strings(r["split"][...])
            self.class_names = decode_strings(r["class_names"][...]).tolist()
            labels = np.asarray(r["labels"][...], dtype=np.int64)
            positions = np.asarray(r["positions"][...], dtype=np.float32)
        rows = np.arange(len(ids)) if subset is None else np.flatnonzero(np.isin(split, list(subset)))
        self.rows = rows
        self.video_ids = ids[rows].tolist()
        self.labels = labels[rows]
        self.split = split[rows]
        self._positions = positions[rows]
        self.attrs = dict(attrs)
        self.dtype = dtype
        self._close()

    def _open(self) -> ContainerReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = open_feature_store(self.path), os.getpid()
        return self._reader

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None  # each worker opens its own handle
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        r = self._open()
        item: dict = {}
        for s in self.streams:
            with reading(self.path, f"streams/{s} of video {self.video_ids[i]}"):
                x = torch.from_numpy(np.asarray(r[f"streams/{s}"][row]))
            item[s] = x if self.dtype is None else x.to(self.dtype)
        item.update(label=int(self.labels[i]), video_id=self.video_ids[i],
                    positions=torch.from_numpy(self._positions[i]))
        return item

