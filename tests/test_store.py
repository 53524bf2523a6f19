"""Frame and feature stores: round trips against the written arrays, read back with plain h5py / zarr."""
import json

import h5py
import numpy as np
import pytest
import zarr

from pipeline.io.store import (FORMAT_VERSION, FeatureSet, StoreError, VideoStore, read_feature_store, read_frames,
                            write_feature_store)


def smooth_frames(t=6, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([x * 4, y * 6, np.full_like(x, 30 * k)], -1) for k in range(t)]).astype(np.uint8)


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_raw_frames_round_trip_exact(tmp_path, backend):
    store = VideoStore(tmp_path, backend)
    frames = np.random.default_rng(0).integers(0, 256, (7, 10, 12, 3), dtype=np.uint8)
    with store.writer("Class/v_a") as w:
        w.write_images("frames", frames, codec="raw")
        w.set_attrs({"num_frames": 7, "fps": 25.0})
    assert store.video_ids() == ["Class/v_a"]
    np.testing.assert_array_equal(read_frames(store, "Class/v_a").numpy(), frames)
    np.testing.assert_array_equal(read_frames(store, "Class/v_a", [6, 0, 6]).numpy(), frames[[6, 0, 6]])


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_jpeg_frames_close_to_source_and_plain_readable(tmp_path, backend):
    store = VideoStore(tmp_path, backend)
    frames = smooth_frames()
    with store.writer("v") as w:
        w.write_images("frames", frames, codec="jpeg", quality=95)
    out = read_frames(store, "v", [5, 1]).numpy()
    assert out.shape == (2, 32, 48, 3)
    assert np.abs(out.astype(int) - frames[[5, 1]]).mean() < 2.0  # JPEG q95 on smooth content
    # Plain library access, as documented in docs/formats.md: decode frame 3 with OpenCV.
    import cv2

    if backend == "h5":
        with h5py.File(store.path("v")) as f:
            data, offsets = f["frames/jpeg"][...], f["frames/jpeg"].attrs["offsets"]
    else:
        g = zarr.open_group(str(store.path("v")), mode="r")
        data, offsets = g["frames/jpeg"][...], g["frames/jpeg"].attrs["offsets"]
    bgr = cv2.imdecode(data[offsets[3]:offsets[4]], cv2.IMREAD_COLOR)
    assert np.abs(bgr[..., ::-1].astype(int) - frames[3]).mean() < 2.0


def test_failed_write_leaves_nothing_and_keeps_previous(tmp_path):
    store = VideoStore(tmp_path, "zarr")
    with store.writer("v") as w:
        w.write_images("frames", smooth_frames(2), codec="raw")
    with pytest.raises(RuntimeError):
        with store.writer("v") as w:
            w.write_images("frames", smooth_frames(3), codec="raw")
            raise RuntimeError("killed mid-write")
    assert read_frames(store, "v").shape[0] == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_incompatible_format_is_refused(tmp_path):
    store = VideoStore(tmp_path, "zarr")
    with store.writer("v") as w:
        w.write_images("frames", smooth_frames(2), codec="raw")
    g = zarr.open_group(str(store.path("v")), mode="a")
    g.attrs["format_version"] = FORMAT_VERSION + 100
    with pytest.raises(StoreError, match="store format"):
        read_frames(store, "v")


def test_bad_video_id_and_missing_video(tmp_path):
    store = VideoStore(tmp_path, "h5")
    with pytest.raises(ValueError):
        store.path("../escape")
    with pytest.raises(StoreError, match="no stored data"):
        read_frames(store, "absent")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_feature_store_round_trip_and_plain_access(tmp_path, suffix):
    rng = np.random.default_rng(1)
    fs = FeatureSet(
        streams={"rgb": rng.standard_normal((3, 5, 1, 8)).astype(np.float16),
                 "flow": rng.standard_normal((3, 5, 1, 8)).astype(np.float16)},
        positions=np.tile(np.arange(5, dtype=np.float32), (3, 1)),
        video_ids=np.array(["A/v1", "A/v2", "B/v3"]), labels=np.array([0, 0, 1]),
        split=np.array(["train", "train", "test"]), groups=np.array(["A_g01", "A_g02", "B_g01"]),
        class_names=np.array(["A", "B"]), attrs={"backbone": "resnet18", "dtype": "float16"},
    )
    path = tmp_path / f"features{suffix}"
    write_feature_store(path, fs)
    back = read_feature_store(path)
    np.testing.assert_array_equal(back.streams["flow"], fs.streams["flow"])
    assert list(back.video_ids) == ["A/v1", "A/v2", "B/v3"] and list(back.class_names) == ["A", "B"]
    assert back.attrs["backbone"] == "resnet18"
    if suffix == ".h5":
        with h5py.File(path) as f:
            rgb = f["streams/rgb"][...]
            ids = [s.decode() for s in f["video_ids"][...]]
            attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    else:
        g = zarr.open_group(str(path), mode="r")
        rgb, ids, attrs = g["streams/rgb"][...], list(g["video_ids"][...]), dict(g.attrs)
    np.testing.assert_array_equal(rgb, fs.streams["rgb"])
    assert ids == ["A/v1", "A/v2", "B/v3"] and attrs["streams"] == ["rgb", "flow"]


def test_consolidate_refuses_a_part_of_another_shape_naming_it(tmp_path):
    """A part whose features are not (P, views, D) stops the consolidation with the part's path; no store is
    left, not even a temporary."""
    from pipeline.features import VideoFeatures, consolidate, write_part

    parts = VideoStore(tmp_path / "parts", "h5")
    for vid, d in (("a/v1", 4), ("a/v2", 3)):
        write_part(parts, VideoFeatures(vid, np.arange(2, dtype=np.float32),
                                        {s: np.ones((2, 1, d), np.float16) for s in ("rgb", "flow")}, 0))
    out = tmp_path / "features.zarr"
    with pytest.raises(StoreError, match=r"parts/a/v2\.h5: not a part of \(2 positions"):
        consolidate(parts, ["a/v1", "a/v2"], [out], labels=[0, 0], split=["train", "test"], groups=["g", "g"],
                    class_names=["a"], shapes={"rgb": (2, 1, 4), "flow": (2, 1, 4)}, dtype="float16", attrs={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_all_zero_feature_chunks_are_stored_and_not_taken_for_missing_ones(tmp_path):
    """Zarr skips writing an all-zero chunk unless told otherwise, and a chunk file that is absent reads as zeros:
    verify takes an absent chunk file for lost data, so the feature store must write every chunk (labels of
    class 0, zero positions and ReLU-zero features are all-zero chunks in real stores)."""
    from pipeline.io.store import FeatureSet, damaged_feature_videos, write_feature_store

    V = 300
    fs = FeatureSet(streams={"rgb": np.zeros((V, 3, 1, 4), np.float16), "flow": np.ones((V, 3, 1, 4), np.float16)},
                    positions=np.zeros((V, 3), np.float32), video_ids=np.array([f"v{i}" for i in range(V)]),
                    labels=np.zeros(V, np.int64), split=np.array(["train"] * V), groups=np.array(["g"] * V),
                    class_names=np.array(["a", "b"]), attrs={"streams": ["rgb", "flow"]})
    path = tmp_path / "features.zarr"
    write_feature_store(path, fs)
    assert damaged_feature_videos(path) == {}
    chunk_files = {p.relative_to(path).parts[0] for p in path.rglob("c/*") if p.is_file() or p.is_dir()}
    assert {"labels", "positions"} <= chunk_files
