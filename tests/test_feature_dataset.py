"""FeatureDataset: per-video items of a feature store, checked against plain h5py / zarr reads."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipeline.data.feature_dataset import FeatureDataset
from pipeline.io.store import FeatureSet, StoreError, write_feature_store


def _feature_set(v: int = 7) -> FeatureSet:
    rng = np.random.default_rng(0)
    return FeatureSet(
        streams={"rgb": rng.standard_normal((v, 5, 2, 8)).astype(np.float16),
                 "flow": rng.standard_normal((v, 5, 2, 6)).astype(np.float16)},
        positions=np.tile(np.linspace(0, 40, 5, dtype=np.float32), (v, 1)),
        video_ids=np.array([f"c{i % 3}/v{i:02d}" for i in range(v)]), labels=np.arange(v) % 3,
        split=np.array(["train", "val", "test", "train", "test", "unused", "train"][:v]),
        groups=np.array([f"g{i}" for i in range(v)]), class_names=np.array(["c0", "c1", "c2"]),
        attrs={"P": 5})


def _plain(path, key, row):
    """The same rows read with the storage library itself, not through the pipeline."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            return np.asarray(f[key][row])
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")[key][row])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_items_equal_plain_reads(tmp_path, suffix):
    path = tmp_path / f"features{suffix}"
    write_feature_store(path, _feature_set())
    ds = FeatureDataset(path, subset=("train", "test"))
    assert ds.video_ids == ["c0/v00", "c2/v02", "c0/v03", "c1/v04", "c0/v06"] and len(ds) == 5
    assert ds.class_names == ["c0", "c1", "c2"] and ds.labels.tolist() == [0, 2, 0, 1, 0]
    for i, row in enumerate([0, 2, 3, 4, 6]):
        item = ds[i]
        for s in ("rgb", "flow"):
            assert item[s].dtype == torch.float32
            np.testing.assert_array_equal(item[s].numpy(), _plain(path, f"streams/{s}", row).astype(np.float32))
        assert item["label"] == row % 3 and item["video_id"] == f"c{row % 3}/v{row:02d}"
    # Workers get a picklable copy that opens its own handle; DataLoader batches stack the features.
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[1]["rgb"].numpy(), ds[1]["rgb"].numpy())
    batch = next(iter(torch.utils.data.DataLoader(FeatureDataset(path, ["flow"]), batch_size=4)))
    assert batch["flow"].shape == (4, 5, 2, 6) and "rgb" not in batch


def test_missing_stream_and_file_are_named(tmp_path):
    path = tmp_path / "features.h5"
    write_feature_store(path, _feature_set())
    with pytest.raises(StoreError, match=r"features\.h5: no stream\(s\) \['depth'\]"):
        FeatureDataset(path, ["depth"])
    with pytest.raises(StoreError, match="not found"):
        FeatureDataset(tmp_path / "nothing.zarr")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_read_many_videos_at_positions_and_views_equals_plain_reads(tmp_path, suffix, monkeypatch):
    """read / FeatureArray: videos in any order (repeats too), optionally at per-video positions and one view,
    in the stored dtype, from a store of 2 videos per chunk (one call spans several chunks)."""
    import pipeline.io.store as store_mod

    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 2 * 5 * 2 * 8 * 2)  # 2 videos per chunk
    path = tmp_path / f"features{suffix}"
    write_feature_store(path, _feature_set())
    ds = FeatureDataset(path, subset=("train", "test"), dtype=None)  # rows 0 2 3 4 6
    assert ds.chunk_rows == {"rgb": 2, "flow": 2}
    plain = _plain(path, "streams/flow", slice(None))                  # (7, 5, 2, 6)
    items = [4, 0, 2, 0]                                                # store rows 6, 0, 3, 0
    got = ds.read("flow", items)
    assert got.dtype == np.float16 and np.array_equal(got, plain[[6, 0, 3, 0]])
    pos = np.array([[4, 0], [1, 1], [2, 3], [0, 4]])
    np.testing.assert_array_equal(ds.read("flow", items, pos, view=1),
                                  np.stack([plain[r, pos[k], 1] for k, r in enumerate([6, 0, 3, 0])]))
    arr = ds.array("rgb", view=0, items=[1, 2, 3])                      # store rows 2 3 4
    rgb = _plain(path, "streams/rgb", slice(None))
    assert arr.shape == (3, 5, 8) and arr.dtype == torch.float16 and arr.nbytes == 3 * 5 * 8 * 2
    assert torch.equal(arr.load(), torch.from_numpy(rgb[[2, 3, 4], :, 0]))
    assert torch.equal(arr.rows(1, 3), torch.from_numpy(rgb[[3, 4], :, 0]))
    assert torch.equal(arr.take(np.array([2, 0]), np.array([[1, 2], [3, 3]])),
                       torch.from_numpy(np.stack([rgb[4, [1, 2], 0], rgb[2, [3, 3], 0]])))
    assert ds.array("flow").shape == (5, 5, 2, 6)
