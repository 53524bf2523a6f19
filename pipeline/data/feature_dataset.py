"""``FeatureDataset``: a feature store (``features.zarr`` / ``features.h5`` of ``extract-features``) as a lazy
torch ``Dataset``, one video per item, for training your own heads or feeding other tools.

A 10-view UCF101 store is ~50 GB in float16, so nothing is read up front but the small per-video tables (ids,
labels, split membership, groups, positions); an item reads that video's rows of each stream. The file is
opened on first use in each process (DataLoader workers open their own handle). Example in docs/formats.md.

Many videos at once: :meth:`FeatureDataset.read` (any videos, optionally at given positions and one view)
reads each chunk of the store once, and :meth:`FeatureDataset.array` is one stream of some videos as a lazy
``(V, P, D)`` / ``(V, P, views, D)`` :class:`FeatureArray` (what train-head streams from when the features do not
fit its memory budget, docs/train-head.md). Both return the stored dtype (float16 by default).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.io.store import ContainerReader, StoreError, decode_strings, open_feature_store, reading

__all__ = ["FeatureArray", "FeatureDataset"]


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
        self.shapes = {s: tuple(int(x) for x in r[f"streams/{s}"].shape) for s in self.streams}
        self.chunk_rows = {s: max(1, int((r[f"streams/{s}"].chunks or (len(ids),))[0])) for s in self.streams}
        self.stored_dtype = {s: np.dtype(r[f"streams/{s}"].dtype) for s in self.streams}
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

    def read(self, stream: str, items: Sequence[int] | np.ndarray, positions: np.ndarray | None = None,
             view: int | None = None) -> np.ndarray:
        """Stream ``stream`` of the videos ``items`` (indices of this dataset, any order, repeats allowed) in the
        stored dtype: ``(len(items), P, views, D)``; at ``view`` ``(len(items), P, D)``; with ``positions``
        (``(len(items), K)`` position indices per video) only those: ``(len(items), K, [views,] D)``.

        The videos are read grouped by the store's chunks, each chunk once; memory holds the result and one chunk.
        A damaged chunk is a StoreError naming the file."""
        store_rows = self.rows[np.asarray(items, dtype=np.int64).reshape(-1)]
        arr = self._open()[f"streams/{stream}"]
        _, P, views, D = self.shapes[stream]
        K = P if positions is None else np.asarray(positions).shape[1]
        out = np.empty((len(store_rows), K, *(() if view is not None else (views,)), D), self.stored_dtype[stream])
        chunk = store_rows // self.chunk_rows[stream]
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for members in np.split(order, bounds) if len(order) else []:
            rows = store_rows[members]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            with reading(self.path, f"streams/{stream} rows {lo}-{hi - 1}"):
                block = np.asarray(arr[lo:hi, :, view] if view is not None else arr[lo:hi])
            block = block[rows - lo]
            if positions is not None:
                block = block[np.arange(len(rows))[:, None], np.asarray(positions)[members]]
            out[members] = block
        return out

    def array(self, stream: str, view: int | None = None, items: Sequence[int] | np.ndarray | None = None
              ) -> "FeatureArray":
        """Stream ``stream`` of the videos ``items`` (default: all of this dataset) at ``view`` (None: every view)
        as a lazy array, read on demand."""
        if stream not in self.streams:
            raise StoreError(f"{self.path}: no stream {stream!r} among {self.streams}")
        return FeatureArray(self, stream, np.arange(len(self)) if items is None else np.asarray(items, np.int64),
                            view)


class FeatureArray:
    """One stream of some videos of a feature store, read on demand: ``shape`` ``(V, P, D)`` at one view or
    ``(V, P, views, D)``, ``dtype`` the stored one (as a torch dtype). Indexing is by position in ``items``.

    ``rows(lo, hi)`` and ``take(videos, positions)`` return CPU tensors in the stored dtype; ``load()`` reads it all.
    """

    def __init__(self, dataset: FeatureDataset, stream: str, items: np.ndarray, view: int | None):
        self.dataset, self.stream, self.items, self.view = dataset, stream, items, view
        _, P, views, D = dataset.shapes[stream]
        self.shape = (len(items), P, D) if view is not None else (len(items), P, views, D)
        self.ndim = len(self.shape)
        self.dtype = torch.from_numpy(np.zeros(0, dataset.stored_dtype[stream])).dtype
        self.itemsize = dataset.stored_dtype[stream].itemsize
        self.nbytes = int(np.prod(self.shape)) * self.itemsize
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Videos ``lo .. hi - 1``: ``(hi - lo, P, [views,] D)``."""
        return torch.from_numpy(self.dataset.read(self.stream, self.items[lo:hi], view=self.view))

    def take(self, videos: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Videos ``videos`` (B,) at positions ``positions`` (B, K): ``(B, K, [views,] D)``, each chunk read once."""
        return torch.from_numpy(self.dataset.read(self.stream, self.items[np.asarray(videos, np.int64)],
                                                  np.asarray(positions, np.int64), view=self.view))

    def load(self) -> torch.Tensor:
        """Every video: ``(V, P, [views,] D)`` in memory."""
        return self.rows(0, len(self))
