"""Flow codecs of the stores (jpeg, zstd, raw), checked against independent OpenCV / numpy references."""
import cv2
import numpy as np
import pytest

from pipeline.io.store import VideoStore

BOUND = 20.0


def smooth_flow_codes(T: int = 6, H: int = 48, W: int = 64, seed: int = 0) -> np.ndarray:
    """(T, H, W, 2) uint8 quantized-flow codes: smooth fields around 128, like real TV-L1 flow."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((T, H, W, 2), np.uint8)
    for t in range(T):
        for c in range(2):
            a, b, ph = rng.uniform(0.05, 0.2, 3)
            f = 128 + 40 * np.sin(a * xx + b * yy + ph * t) + rng.normal(0, 1, (H, W))
            out[t, ..., c] = np.clip(np.rint(f), 0, 255)
    return out


def cv2_roundtrip(plane: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(plane), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    assert ok
    return buf.tobytes(), cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


@pytest.mark.parametrize("backend", ["zarr", "h5"])
@pytest.mark.parametrize("quality", [95, 75])
def test_jpeg_flow_matches_an_independent_opencv_roundtrip(tmp_path, backend, quality):
    codes = smooth_flow_codes()
    store = VideoStore(tmp_path / "flow", backend)
    with store.writer("v") as w:
        w.write_images("flow", codes, codec="jpeg", quality=quality)
    with store.reader("v") as r:
        got = r.read_images("flow").numpy()
        some = r.read_images("flow", [4, 1, 1]).numpy()
        images = r.encoded_images("flow")
        assert r.num_images("flow") == len(codes) and r.jpeg_planes("flow") == 2
    want = np.empty_like(codes)
    want_bytes = []
    for t in range(len(codes)):
        for c in range(2):
            b, img = cv2_roundtrip(codes[t, ..., c], quality)
            want_bytes.append(b)
            want[t, ..., c] = img
    # Byte for byte what TSN / denseflow write with OpenCV (x then y per flow), and the same decoded values.
    assert images == want_bytes
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(some, want[[4, 1, 1]])
    # The stated bound at quality 95 on these noisy fields: mean error under one code (one 0.157 px quantization
    # step at bound 20), no value off by more than 8 codes. Real TV-L1 flow is smoother (docs/benchmarks.md).
    if quality == 95:
        err = np.abs(got.astype(int) - codes.astype(int))
        assert err.mean() < 1.0 and err.max() <= 8, (err.mean(), err.max())


@pytest.mark.parametrize("backend", ["zarr", "h5"])
@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_lossless_codecs_are_exact(tmp_path, backend, codec):
    codes = smooth_flow_codes(T=7)
    store = VideoStore(tmp_path / "flow", backend)
    with store.writer("v") as w:
        w.write_images("flow", codes, codec=codec)
    with store.reader("v") as r:
        np.testing.assert_array_equal(r.read_images("flow").numpy(), codes)
        np.testing.assert_array_equal(r.read_images("flow", [6, 0, 3, 4]).numpy(), codes[[6, 0, 3, 4]])


def test_zstd_is_smaller_than_lz4_and_jpeg_smaller_still(tmp_path):
    codes = smooth_flow_codes(T=8, H=120, W=160)
    sizes = {}
    for codec in ("raw", "zstd", "jpeg"):
        store = VideoStore(tmp_path / codec, "h5")
        with store.writer("v") as w:
            w.write_images("flow", codes, codec=codec)
        sizes[codec] = store.path("v").stat().st_size
    assert sizes["jpeg"] < sizes["zstd"] <= sizes["raw"], sizes


def test_read_flow_dequantizes_jpeg_flow_as_raw(tmp_path):
    """The float read has the same meaning whatever the codec: dequantized codes of what is stored."""
    from pipeline.flow.stored import read_flow

    codes = smooth_flow_codes(T=3)
    store = VideoStore(tmp_path / "flow", "zarr")
    with store.writer("v") as w:
        w.write_images("flow", codes, codec="jpeg")
        w.set_attrs({"bound": BOUND})
    decoded = np.stack([np.stack([cv2_roundtrip(c[..., a], 95)[1] for a in (0, 1)], -1) for c in codes])
    np.testing.assert_allclose(read_flow(store, "v"), decoded * (2 * BOUND / 255) - BOUND, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Checksums: a flipped byte or a truncated chunk is found on read, naming the file
# ----------------------------------------------------------------------------------------------------------

def chunk_files(container) -> list:
    """(path, offset, size) of every stored data chunk: zarr chunk files, or HDF5 chunks located with h5py."""
    import h5py

    if container.suffix == ".zarr":
        return [(f, 0, f.stat().st_size) for f in sorted(container.rglob("*"))
                if f.is_file() and "/c/" in str(f) and f.stat().st_size > 0]
    out = []
    with h5py.File(container, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    out.append((container, info.byte_offset, info.size, name))
        f.visititems(visit)
    return [(p, o, s) for p, o, s, *_ in sorted(out, key=lambda t: -t[2])]


def damage(path, offset: int, size: int, how: str) -> None:
    b = bytearray(path.read_bytes())
    if how == "flip":
        b[offset + size // 2] ^= 0x5A
        path.write_bytes(bytes(b))
    else:  # truncate the chunk: zarr file cut in half; HDF5 file cut inside the chunk
        path.write_bytes(bytes(b[:offset + size // 2]))


@pytest.mark.parametrize("backend", ["zarr", "h5"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("what,codec", [("frames", "jpeg"), ("frames", "raw"), ("flow", "jpeg"), ("flow", "zstd")])
def test_damaged_chunk_is_an_error_naming_the_file(tmp_path, backend, how, what, codec):
    from pipeline.io.store import StoreError

    rng = np.random.default_rng(1)
    images = (rng.integers(0, 255, (6, 32, 48, 3), dtype=np.uint8) if what == "frames"
              else smooth_flow_codes(6, 32, 48))
    store = VideoStore(tmp_path / what, backend)
    for vid in ("a", "b"):
        with store.writer(vid) as w:
            w.write_images(what, images, codec=codec)
    path, offset, size = chunk_files(store.path("a"))[0]
    damage(path, offset, size, how)
    with pytest.raises(StoreError, match=str(store.path("a")).replace(".", r"\.")):
        with store.reader("a") as r:
            r.read_images(what)
    with store.reader("b") as r:  # the other video is untouched
        assert r.read_images(what).shape[0] == 6


def _set_offsets(container, name: str, offsets) -> None:
    """Rewrite the ``offsets`` attribute of ``<name>/jpeg`` with plain h5py / zarr, leaving its CRC as it was."""
    import h5py
    import zarr

    if container.suffix == ".h5":
        with h5py.File(container, "r+") as f:
            f[f"{name}/jpeg"].attrs["offsets"] = np.asarray(offsets, dtype=np.int64)
    else:
        zarr.open_group(str(container), mode="r+")[f"{name}/jpeg"].attrs["offsets"] = [int(o) for o in offsets]


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_damaged_jpeg_offsets_are_an_error_naming_the_file(tmp_path, backend):
    """The offsets live in an attribute, which has no chunk checksum: their own CRC-32 catches a changed
    value (the bytes would otherwise be cut at the wrong places); verify lists the video."""
    from pipeline.io.store import StoreError, check_arrays

    store = VideoStore(tmp_path / "flow", backend)
    for vid in ("a", "b"):
        with store.writer(vid) as w:
            w.write_images("flow", smooth_flow_codes(6, 32, 48), codec="jpeg")
    with store.reader("a") as r:
        offsets = np.asarray(r["flow/jpeg"].attrs["offsets"]).copy()
    offsets[5] += 1  # a one-bit change of one image boundary
    _set_offsets(store.path("a"), "flow", offsets)
    with pytest.raises(StoreError, match=str(store.path("a")).replace(".", r"\.") + ".*CRC-32"):
        with store.reader("a") as r:
            r.read_images("flow", [0])
    with store.reader("a") as r:
        assert any("CRC-32" in p for p in check_arrays(r))
    with store.reader("b") as r:
        assert check_arrays(r) == [] and r.read_images("flow").shape == (6, 32, 48, 2)


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_format_2_jpeg_offsets_array_still_reads(tmp_path, backend):
    """A format-2 container kept a JPEG sequence's offsets in a ``<name>/offsets`` array (planes in its
    attributes); rebuilt here with plain h5py / zarr, it reads back the same images."""
    import h5py
    import zarr

    codes = smooth_flow_codes(5, 24, 32)
    store = VideoStore(tmp_path / "flow", backend)
    with store.writer("v") as w:
        w.write_images("flow", codes, codec="jpeg")
    with store.reader("v") as r:
        want = r.read_images("flow").numpy()
        offsets = np.asarray(r["flow/jpeg"].attrs["offsets"], dtype=np.int64)
    path = store.path("v")
    if backend == "h5":
        with h5py.File(path, "r+") as f:
            for k in ("offsets", "offsets_crc32", "planes"):
                del f["flow/jpeg"].attrs[k]
            f.create_dataset("flow/offsets", data=offsets).attrs["planes"] = 2
            f.attrs["format_version"] = "2"  # h5 container attributes are JSON text
    else:
        g = zarr.open_group(str(path), mode="r+")
        attrs = g["flow/jpeg"].attrs
        for k in ("offsets", "offsets_crc32", "planes"):
            del attrs[k]
        g["flow"].create_array("offsets", data=offsets).attrs["planes"] = 2
        g.attrs["format_version"] = 2
    with store.reader("v") as r:
        assert r.attrs["format_version"] == 2 and r.num_images("flow") == 5 and r.jpeg_planes("flow") == 2
        np.testing.assert_array_equal(r.read_images("flow", [4, 0]).numpy(), want[[4, 0]])


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_long_jpeg_sequence_offsets_fit_the_attributes(tmp_path, backend):
    """4,100 two-plane frames: 8,201 int64 offsets (64 KiB and more, past HDF5's compact attribute limit)."""
    T = 4100
    codes = np.zeros((T, 8, 8, 2), np.uint8)
    codes[:, 0, 0, 0] = np.arange(T) % 251  # a frame-dependent value that survives JPEG q95 exactly enough
    store = VideoStore(tmp_path / "flow", backend)
    with store.writer("long") as w:
        w.write_images("flow", codes, codec="jpeg")
    with store.reader("long") as r:
        assert r.num_images("flow") == T
        got = r.read_images("flow", [0, 2000, T - 1]).numpy()
    want = np.stack([cv2_roundtrip(codes[t, ..., 0], 95)[1] for t in (0, 2000, T - 1)])
    np.testing.assert_array_equal(got[..., 0], want)


def small_feature_set(V: int = 4, D: int = 1 << 21):
    """About 4 MiB of float16 per video: the store's 8 MiB chunks hold two videos each."""
    from pipeline.io.store import FeatureSet

    rng = np.random.default_rng(0)
    return FeatureSet(
        streams={"rgb": rng.standard_normal((V, 1, 1, D)).astype(np.float16)},
        positions=np.zeros((V, 1), np.float32), video_ids=np.array([f"v{i}" for i in range(V)]),
        labels=np.arange(V), split=np.array(["train"] * V), groups=np.array(["g"] * V),
        class_names=np.array([f"c{i}" for i in range(V)]), attrs={})


@pytest.mark.parametrize("backend", ["zarr", "h5"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_feature_chunk_is_found_naming_the_file_and_videos(tmp_path, backend, how):
    from pipeline.io.store import StoreError, damaged_feature_videos, read_feature_store, write_feature_store

    path = tmp_path / f"features.{backend}"
    write_feature_store(path, small_feature_set())
    if backend == "zarr":
        target = path / "streams" / "rgb" / "c" / "1" / "0" / "0" / "0"  # videos v2, v3
        damage(target, 0, target.stat().st_size, how)
        want = {"v2", "v3"}
    else:
        import h5py

        with h5py.File(path, "r") as f:
            info = f["streams/rgb"].id.get_chunk_info(0)  # videos v0, v1
        damage(path, info.byte_offset, info.size, "flip")  # an HDF5 file cut short cannot be opened at all
        want = {"v0", "v1"}
    with pytest.raises(StoreError, match=str(path).replace(".", r"\.")):
        read_feature_store(path)
    assert set(damaged_feature_videos(path)) == want


def test_verify_lists_exactly_the_damaged_videos_and_the_rerun_redoes_only_them(tmp_path):
    from click.testing import CliRunner

    from pipeline.io.artifacts import flow_store, frame_store
    from pipeline.stage import run_stage
    from stages.cli import main
    from stages.decode import STAGE as DECODE, DecodeParams
    from stages.extract_flow import STAGE as FLOW, FlowParams
    from tests.videos import make_csv_dataset

    data = make_csv_dataset(tmp_path / "data", videos_per_class=2, num_frames=6, size=(64, 48))
    cache = tmp_path / "cache"
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=48, workers=1), cache)
    run_stage(FLOW, FlowParams(nscales=1, warps=1, inner_iterations=2, outer_iterations=1, fast=False), cache)
    frames, flows = frame_store(cache / "decode"), flow_store(cache / "extract-flow")
    vids = frames.video_ids()
    assert len(vids) == 4
    bad_frame, bad_flow = vids[1], vids[2]
    damage(*chunk_files(frames.path(bad_frame))[0], "flip")
    damage(*chunk_files(flows.path(bad_flow))[0], "truncate")
    before = {v: flows.path(v).stat().st_mtime_ns for v in vids}
    frames_before = {v: frames.path(v).stat().st_mtime_ns for v in vids}

    res = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache)])
    assert res.exit_code == 1, res.output
    import re

    listed = re.findall(r"^  (\S+): /", res.output, flags=re.M)
    assert sorted(listed) == sorted([bad_frame, bad_flow]), res.output
    assert "decode: 4 checked, 1 missing/damaged" in res.output and "extract-flow: 4 checked, 1 missing/damaged" in res.output
    assert str(flows.path(bad_flow)) in res.output

    quick = dict(nscales=1, warps=1, inner_iterations=2, outer_iterations=1, fast=False)
    with pytest.raises(Exception, match=r"1 videos missing/damaged \(found by `pipeline verify`\)"):
        run_stage(FLOW, FlowParams(**quick), cache)  # decode first
    r = run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=48, workers=1), cache)
    assert not r.skipped and r.manifest["complete"]
    assert [v for v in vids if frames.path(v).stat().st_mtime_ns != frames_before[v]] == [bad_frame]
    r = run_stage(FLOW, FlowParams(**quick), cache)
    assert not r.skipped and r.manifest["complete"] and r.manifest["done"] == 4
    after = {v: flows.path(v).stat().st_mtime_ns for v in vids}
    assert [v for v in vids if after[v] != before[v]] == [bad_flow]  # only the damaged video recomputed
    res = CliRunner().invoke(main, ["verify", "--stage", "extract-flow", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and "extract-flow: 4 checked, 0 missing/damaged" in res.output, res.output


@pytest.mark.parametrize("codec", ["jpeg", "zstd", "raw"])
def test_sharded_zarr_reads_back_identical_arrays_in_few_files(tmp_path, codec):
    """One shard file per array: a video's flow is a handful of files whatever its length, and plain zarr
    reads the same values as the codes written (lossless) or as OpenCV's JPEG round trip."""
    import zarr

    codes = smooth_flow_codes(T=40, H=24, W=32)
    store = VideoStore(tmp_path / "flow", "zarr")
    with store.writer("v") as w:
        w.write_images("flow", codes, codec=codec)
    files = [f for f in store.path("v").rglob("*") if f.is_file()]
    data_files = [f for f in files if "/c/" in str(f)]
    assert len(data_files) == 1 and len(files) == 4, files  # one shard; zarr.json of root, group, array
    g = zarr.open_group(str(store.path("v")), mode="r")
    if codec == "jpeg":
        data, offsets = np.asarray(g["flow/jpeg"][...]), g["flow/jpeg"].attrs["offsets"]
        got = np.stack([np.stack([cv2.imdecode(data[offsets[2 * t + c]:offsets[2 * t + c + 1]], cv2.IMREAD_GRAYSCALE)
                                  for c in (0, 1)], -1) for t in range(len(codes))])
        want = np.stack([np.stack([cv2_roundtrip(c[..., a], 95)[1] for a in (0, 1)], -1) for c in codes])
    else:
        got, want = np.asarray(g["flow/raw"][...]), codes
    np.testing.assert_array_equal(got, want)
    with store.reader("v") as r:
        np.testing.assert_array_equal(r.read_images("flow", [39, 0, 17]).numpy(), want[[39, 0, 17]])


def test_old_format_containers_read_and_are_counted_by_verify(tmp_path):
    """A format-1 container (written before checksums) still reads with the same meaning; verify says it
    verify counts it as unchecked (stages/verify.py); an unknown format is refused naming the file."""
    import zarr

    from pipeline.io.store import StoreError

    store = VideoStore(tmp_path / "frames", "zarr")
    codes = smooth_flow_codes(T=2)
    with store.writer("old") as w:
        w.write_images("flow", codes, codec="raw")
    g = zarr.open_group(str(store.path("old")), mode="r+")
    g.attrs["format_version"] = 1
    with store.reader("old") as r:
        np.testing.assert_array_equal(r.read_images("flow").numpy(), codes)
    g.attrs["format_version"] = 99
    with pytest.raises(StoreError, match=r"old\.zarr: written by store format 99"):
        with store.reader("old"):
            pass


def test_train_head_sees_the_videos_of_a_damaged_feature_chunk_as_failures(tmp_path):
    """nonfinite_videos names the videos of a damaged chunk with the file, so train-head fails exactly them (and
    trains without them under --allow-failures, reading the other videos' rows)."""
    from pipeline.data.feature_dataset import FeatureDataset
    from pipeline.training.heads import nonfinite_videos
    from pipeline.io.store import StoreError, write_feature_store

    path = tmp_path / "features.zarr"
    fs = small_feature_set()
    fs.streams["rgb"][3, 0, 0, 5] = np.nan
    write_feature_store(path, fs)
    target = path / "streams" / "rgb" / "c" / "0" / "0" / "0" / "0"  # videos v0, v1
    damage(target, 0, target.stat().st_size, "flip")
    bad = nonfinite_videos(path, ["rgb"])
    assert sorted(bad) == ["v0", "v1", "v3"] and all(str(path) in bad[v] for v in ("v0", "v1"))
    assert bad["v3"] == "rgb: 1 non-finite values"
    ds = FeatureDataset(path, ["rgb"], dtype=None)
    np.testing.assert_array_equal(ds.read("rgb", [2, 3]), fs.streams["rgb"][2:])
    with pytest.raises(StoreError, match="features.zarr"):
        ds.read("rgb", [1])
