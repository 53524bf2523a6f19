"""import-rawframes and export --format mmaction2 on small rawframes trees made here from the shared UCF101
clips: frames decoded with OpenCV and written as JPEG, flows computed with OpenCV's Farneback and quantized with
the TSN formula (tests/fakes.py), each layout's file names written out by hand below."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from fakes import farneback_flow

T, W, H = 5, 64, 48  # frames per video and their size

#: Each layout's file names, as its tool writes them: (frame, flow x, flow y) templates, first frame / flow index.
NAMES = {
    "mmaction2": ("{v}/img_{i:05d}.jpg", "{v}/flow_x_{i:05d}.jpg", "{v}/flow_y_{i:05d}.jpg", 1, 1),
    "tsn": ("{v}/img_{i:05d}.jpg", "{v}/flow_x_{i:05d}.jpg", "{v}/flow_y_{i:05d}.jpg", 1, 1),
    "denseflow": ("{v}/img_{i:05d}.jpg", "{v}/flow_x_{i:05d}.jpg", "{v}/flow_y_{i:05d}.jpg", 1, 0),
    "twostreamfusion": ("jpegs_256/{v}/frame{i:06d}.jpg", "tvl1_flow/u/{v}/frame{i:06d}.jpg",
                        "tvl1_flow/v/{v}/frame{i:06d}.jpg", 1, 1),
}


@pytest.fixture(scope="module")
def clips(shared_data):
    """(name, class, (T, H, W, 3) RGB frames, (T - 1, H, W, 2) uint8 flow codes) of the two UCF101 clips."""
    out = []
    for path in sorted((shared_data / "clips" / "ucf101").glob("*.avi")):
        cap = cv2.VideoCapture(str(path))
        frames = []
        while len(frames) < T:
            ok, bgr = cap.read()
            assert ok, path
            frames.append(cv2.cvtColor(cv2.resize(bgr, (W, H), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
        cap.release()
        frames = np.stack(frames)
        out.append((path.stem, path.stem.split("_")[1], frames, farneback_flow(frames, 20.0)))
    assert len(out) == 2
    return out


def make_tree(root: Path, layout: str, clips, *, flat: bool = False):
    """A rawframes tree of ``layout`` and its lists; returns (train list, test list, expected) with expected[vid]
    = (label, frame JPEG bytes, flow codes as OpenCV reads the written files)."""
    fr_t, x_t, y_t, f0, fl0 = NAMES[layout]
    expected, lines = {}, []
    for label, (name, cls, frames, flow) in enumerate(clips):
        vid = name if flat else f"{cls}/{name}"
        blobs = []
        for i, f in enumerate(frames):
            p = root / fr_t.format(v=vid, i=f0 + i)
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            blobs.append(p.read_bytes())
        codes = np.empty_like(flow)
        for i, q in enumerate(flow):
            for axis, tmpl in enumerate((x_t, y_t)):
                p = root / tmpl.format(v=vid, i=fl0 + i)
                p.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(p), np.ascontiguousarray(q[..., axis]))
                codes[i, ..., axis] = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        expected[vid] = (label, blobs, codes)
        lines.append(f"{vid} {T} {label}\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(lines[0])
    (root / "test.txt").write_text(lines[1])
    return root / "train.txt", root / "test.txt", expected


def run_import(root, layout, cache, **kw):
    from stages.import_rawframes import import_rawframes

    if "dataset" not in kw:
        kw.setdefault("train_list", root / "train.txt")
        kw.setdefault("test_list", root / "test.txt")
    return import_rawframes(root, layout, cache, workers=1, **kw)


def stored_jpegs(cache: Path, vid: str) -> list[bytes]:
    from pipeline.io import artifacts

    with artifacts.frame_store(cache / "decode").reader(vid) as r:
        data, offsets = np.asarray(r["frames/jpeg"][...]), np.asarray(r["frames/jpeg"].attrs["offsets"])
    return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def stored_flow_jpegs(cache: Path, vid: str) -> list[bytes]:
    """The flow store's JPEG images of a video read with plain zarr (x0, y0, x1, y1, ...)."""
    import zarr

    g = zarr.open_group(str(cache / "extract-flow" / "flow" / f"{vid}.zarr"), mode="r")
    data, offsets = np.asarray(g["flow/jpeg"][...]), g["flow/jpeg"].attrs["offsets"]
    assert g["flow/jpeg"].attrs["planes"] == 2
    return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def stored_flow(cache: Path, vid: str) -> tuple[np.ndarray, dict]:
    from pipeline.io import artifacts

    with artifacts.flow_store(cache / "extract-flow").reader(vid) as r:
        return r.read_images("flow").numpy(), r.attrs


def check_imported(cache: Path, expected: dict, bound: float = 20.0) -> None:
    from pipeline.data.table import VideoTable

    table = VideoTable.load(cache / "decode")
    assert table.video_ids == sorted(expected)
    assert table.num_frames == [T, T] and table.sizes == [[H, W], [H, W]]
    for vid, (label, blobs, codes) in expected.items():
        assert table.labels[table.video_ids.index(vid)] == label
        assert stored_jpegs(cache, vid) == blobs  # the JPEG bytes, not re-encoded
        flow, attrs = stored_flow(cache, vid)
        assert flow.shape == (T - 1, H, W, 2)
        np.testing.assert_array_equal(flow, codes)
        assert attrs["bound"] == bound and attrs["step"] == 1 and attrs["num_flows"] == T - 1


@pytest.mark.parametrize("layout", list(NAMES))
def test_each_layout_is_imported_with_its_index_bases(tmp_path, clips, layout):
    from pipeline.stage import status
    from stages import all_stages
    from stages.import_rawframes import import_params
    from stages.extract_flow import STAGE as FLOW
    from pipeline.stage import run_stage

    root, cache = tmp_path / "tree", tmp_path / "cache"
    train, test, expected = make_tree(root, layout, clips)
    d, f, _ = run_import(root, layout, cache, flow_bound=15.0)
    assert not d.skipped and not f.skipped
    check_imported(cache, expected, bound=15.0)
    table = json.loads((cache / "decode" / "videos.json").read_text())
    assert table["splits"]["1"][1] == "test" and table["splits"]["1"][0] in ("train", "val")
    rows = {r.key: r.state for r in status(cache, all_stages())}
    assert rows["decode"] == "fresh" and rows["extract-flow"] == "fresh"
    # extract-flow with the import's parameters has nothing to compute; a second import does nothing.
    _, fp = import_params(root, layout, train_list=train, test_list=test, flow_bound=15.0, workers=1)
    assert run_stage(FLOW, fp, cache).skipped
    d2, f2, _ = run_import(root, layout, cache, flow_bound=15.0)
    assert d2.skipped and f2.skipped
    # Another bound is another extract-flow run (the fingerprint covers it); the frames stay fresh.
    d3, f3, _ = run_import(root, layout, cache, flow_bound=20.0)
    assert d3.skipped and not f3.skipped and f3.fingerprint != f.fingerprint
    check_imported(cache, expected, bound=20.0)


def test_cli_import_and_status(tmp_path, clips):
    from stages.cli import main

    root, cache = tmp_path / "tree", tmp_path / "cache"
    train, test, expected = make_tree(root, "mmaction2", clips)
    res = CliRunner().invoke(main, ["import-rawframes", "--root", str(root), "--layout", "mmaction2",
                                    "--train-list", str(train), "--test-list", str(test), "--cache-dir", str(cache),
                                    "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert 'backend = "import"' in res.output and 'dataset = "rawframes"' in res.output
    check_imported(cache, expected)
    res = CliRunner().invoke(main, ["status", "--cache-dir", str(cache)])
    lines = {ln.split()[0]: ln.split()[1] for ln in res.output.splitlines()[2:]}
    assert lines["decode"] == "fresh" and lines["extract-flow"] == "fresh"


def test_official_ucf101_splits_over_a_flat_tree(tmp_path, clips, shared_data):
    """--dataset ucf101: classInd labels and the trainlist/testlist membership, read from the official files
    (the lists name 13320 videos; the tree holds 2, so missing ones are allowed)."""
    from pipeline.data.table import VideoTable

    splits = shared_data / "splits" / "ucf101"
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _, _, expected = make_tree(root, "mmaction2", clips, flat=True)
    run_import(root, "mmaction2", cache, dataset="ucf101", splits=splits, allow_missing=True)
    table = VideoTable.load(cache / "decode")
    assert table.video_ids == sorted(expected)  # flat tree: the folder names are the ids
    index = {ln.split()[1]: int(ln.split()[0]) - 1 for ln in (splits / "classInd.txt").read_text().splitlines()
             if ln.strip()}
    for vid in table.video_ids:
        cls = vid.split("_")[1]
        assert table.labels[table.video_ids.index(vid)] == index[cls]
        for k in ("1", "2", "3"):
            tests = (splits / f"testlist0{k}.txt").read_text()
            want = "test" if f"/{vid}.avi" in tests else "train"
            got = table.splits[k][table.video_ids.index(vid)]
            assert got == want or (want == "train" and got == "val")
    assert table.classes[index["BaseballPitch"]] == "BaseballPitch"


def test_official_hmdb51_splits_over_a_nested_tree(tmp_path, clips, shared_data):
    """--dataset hmdb51: labels in class_list.txt order, tags 1 train / 2 test / 0 unused per split file."""
    from pipeline.data.table import VideoTable

    splits = shared_data / "splits" / "hmdb51"
    picks = []  # (class, clip stem, {split: tag}) of the first and the last line of two classes' split 1 files
    for cls in ("brush_hair", "wave"):
        line = (splits / f"{cls}_test_split1.txt").read_text().split("\n")[-2]
        stem = line.split()[0][:-4]
        tags = {k: next(ln.split()[1] for ln in (splits / f"{cls}_test_split{k}.txt").read_text().splitlines()
                        if ln.startswith(stem + ".avi")) for k in ("1", "2", "3")}
        picks.append((cls, stem, tags))
    renamed = [(stem, cls, c[2], c[3]) for (cls, stem, _), c in zip(picks, clips)]
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root, "tsn", renamed)
    run_import(root, "tsn", cache, dataset="hmdb51", splits=splits, allow_missing=True)
    table = VideoTable.load(cache / "decode")
    order = [c.strip() for c in (splits / "class_list.txt").read_text().splitlines() if c.strip()]
    assert table.classes == order
    names = {"1": "train", "2": "test", "0": "unused"}
    for cls, stem, tags in picks:
        i = table.video_ids.index(f"{cls}/{stem}")
        assert table.labels[i] == order.index(cls)
        for k, tag in tags.items():
            assert table.splits[k][i] == names[tag] or (tag == "1" and table.splits[k][i] == "val")


def _first(root: Path, layout: str, clips, kind: str, i: int) -> Path:
    name, cls = clips[0][0], clips[0][1]
    return root / NAMES[layout][{"frame": 0, "x": 1, "y": 2}[kind]].format(v=f"{cls}/{name}", i=i)


def _write_gray(path: Path, w: int, h: int) -> None:
    cv2.imwrite(str(path), np.full((h, w), 128, np.uint8))


#: (name, layout the tree is written in, layout imported as, mutation of the first video, expected text)
BROKEN = [
    ("x/y counts", "mmaction2", "mmaction2", lambda f: f("y", T - 1).unlink(), "4 x flow images but 3 y flow images"),
    ("flows = frames - step", "mmaction2", "mmaction2", lambda f: (f("x", T - 1).unlink(), f("y", T - 1).unlink()),
     "3 flows for 5 frames"),
    ("flow size", "twostreamfusion", "twostreamfusion", lambda f: _write_gray(f("x", 2), 32, 24),
     "flow image 32x24, the frames are 64x48"),
    ("frame size", "mmaction2", "mmaction2",
     lambda f: cv2.imwrite(str(f("frame", 3)), np.zeros((24, 32, 3), np.uint8)), "frame size 32x24"),
    ("truncated frame", "mmaction2", "mmaction2",
     lambda f: f("frame", 2).write_bytes(f("frame", 2).read_bytes()[:300]), "truncated JPEG"),
    ("grayscale frame", "tsn", "tsn", lambda f: _write_gray(f("frame", 4), W, H), "expected colour"),
    ("frame gap", "mmaction2", "mmaction2", lambda f: f("frame", 3).unlink(), "frame image index 3 missing"),
    ("flow index base", "denseflow", "mmaction2", lambda f: None, "start at index 0"),
    ("no flow folder", "twostreamfusion", "twostreamfusion", lambda f: __import__("shutil").rmtree(f("y", 1).parent),
     "no flow folder (y)"),
    ("unreadable flow", "denseflow", "denseflow", lambda f: f("x", 0).write_bytes(b"\xff\xd8garbage\xff\xd9"),
     "flow_x_00000.jpg: unreadable JPEG"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_failing_check_is_a_failure_naming_the_folder(tmp_path, clips, case):
    from pipeline.stage import StageFailures

    _, written, imported, mutate, text = case
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root, written, clips)
    mutate(lambda kind, i: _first(root, written, clips, kind, i))
    with pytest.raises(StageFailures):
        run_import(root, imported, cache)
    d, f, _ = run_import(root, imported, cache, allow_failures=True)
    failures = {**d.manifest["failures"], **f.manifest["failures"]}
    vid = f"{clips[0][1]}/{clips[0][0]}"
    assert text in failures[vid] and str(root / "") in failures[vid] and clips[0][0] in failures[vid], failures[vid]
    if imported != written:  # every video has the other index base; the hint names the option that fixes it
        assert len(failures) == 2 and "--flow-start-index 0" in failures[vid]
    else:
        assert list(failures) == [vid] and f.manifest["done"] == 1  # the other video is imported


def test_export_then_import_gives_identical_frames(tmp_path, clips):
    """export --format mmaction2 writes the tree and lists; importing them back gives the same stored frames
    (JPEG bytes copied both ways) and flows equal to OpenCV's JPEG round trip of the stored codes."""
    from stages.cli import main

    root, cache, out, cache2 = tmp_path / "tree", tmp_path / "cache", tmp_path / "out", tmp_path / "cache2"
    _, _, expected = make_tree(root, "twostreamfusion", clips)
    run_import(root, "twostreamfusion", cache)
    res = CliRunner().invoke(main, ["export", "--format", "mmaction2", "-o", str(out), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    vids = sorted(expected)
    for vid in vids:
        folder = out / "rawframes" / vid
        assert [(folder / f"img_{i:05d}.jpg").read_bytes() for i in range(1, T + 1)] == expected[vid][1]
        assert (folder / "flow_x_00004.jpg").is_file() and not (folder / "flow_x_00005.jpg").exists()
    assert (out / "rawframes_train_split_1_rawframes.txt").read_text() == f"{vids[0]} {T} 0\n"
    assert (out / "rawframes_val_split_1_rawframes.txt").read_text() == f"{vids[1]} {T} 1\n"
    run_import(out / "rawframes", "mmaction2", cache2, train_list=out / "rawframes_train_split_1_rawframes.txt",
               test_list=out / "rawframes_val_split_1_rawframes.txt")
    for vid in vids:
        assert stored_jpegs(cache2, vid) == stored_jpegs(cache, vid) == expected[vid][1]
        # Flow stored as JPEG (the default codec): the x / y bytes are copied by import and written as they
        # are by export, so the round trip is byte-identical to the tree made here.
        _, x_t, y_t, _, fl0 = NAMES["twostreamfusion"]
        written = [(root / t.format(v=vid, i=fl0 + i)).read_bytes() for i in range(T - 1) for t in (x_t, y_t)]
        assert stored_flow_jpegs(cache, vid) == stored_flow_jpegs(cache2, vid) == written
        np.testing.assert_array_equal(stored_flow(cache2, vid)[0], expected[vid][2])
    # A second export keeps what is there.
    res = CliRunner().invoke(main, ["export", "-o", str(out), "--cache-dir", str(cache), "--what", "frames"])
    assert res.exit_code == 0 and "0 video folders written (2 already there, kept)" in res.output


def test_export_features_per_video(tmp_path, clips):
    """--what features: <video>.npy (positions, D) float32 per stream, the centre view of a 10-view store."""
    from pipeline.io.store import FeatureSet, write_feature_store
    from pipeline.interop.mmaction2 import export_mmaction2
    from pipeline.stage import StageError

    root, cache, out = tmp_path / "tree", tmp_path / "cache", tmp_path / "out"
    _, _, expected = make_tree(root, "mmaction2", clips)
    run_import(root, "mmaction2", cache)
    vids = sorted(expected)
    with pytest.raises(StageError, match="no finished extract-features output"):
        export_mmaction2(cache, out, ["features"])
    rng = np.random.default_rng(0)
    views = ["top_left", "top_right", "bottom_left", "bottom_right", "center"] + [f"flip_{i}" for i in range(5)]
    streams = {s: rng.standard_normal((2, 3, 10, 4)).astype(np.float16) for s in ("rgb", "flow")}
    folder = cache / "extract-features" / "split1-resnet101"
    write_feature_store(folder / "features.zarr", FeatureSet(
        streams=streams, positions=np.zeros((2, 3), np.float32), video_ids=np.array(vids), labels=np.array([0, 1]),
        split=np.array(["train", "test"]), groups=np.array(vids), class_names=np.array(["a", "b"]),
        attrs={"view_names": views}))
    (folder / "manifest.json").write_text(json.dumps({"cache_format": 1, "complete": True, "fingerprint": "x"}))
    counts = export_mmaction2(cache, out, ["features"])
    assert counts["features"] == 4 and not (out / "rawframes").exists()
    for i, vid in enumerate(vids):
        for s in streams:
            got = np.load(out / "features" / "split1-resnet101" / s / f"{vid.split('/')[1]}.npy")
            assert got.dtype == np.float32 and got.shape == (3, 4)
            np.testing.assert_array_equal(got, streams[s][i, :, 4, :].astype(np.float32))


def test_bad_arguments_are_refused_before_any_work(tmp_path, clips, shared_data):
    from pipeline.stage import StageError
    from stages.decode import DecodeParams
    from stages.extract_flow import FlowParams, STAGE as FLOW
    from pipeline.stage import run_stage

    with pytest.raises(StageError, match="give the labels"):
        run_import(tmp_path, "mmaction2", tmp_path / "c", train_list=None, test_list=None)
    with pytest.raises(StageError, match="apply to --dataset rawframes only"):
        DecodeParams(dataset="csv", root=tmp_path, rawframes_labels="ucf101").validate()
    with pytest.raises(StageError, match="--flow-start-index"):
        FlowParams(flow_start_index=1).validate()
    (tmp_path / "bad.txt").write_text("Class/v_x 12\n")
    with pytest.raises(StageError, match=r"bad.txt:1: expected '<frame_dir> <total_frames> <label>'"):
        run_import(tmp_path, "mmaction2", tmp_path / "c", train_list=tmp_path / "bad.txt", test_list=None)
    # extract-flow --backend import needs a rawframes decode.
    from stages.decode import STAGE as DECODE

    clip = sorted((shared_data / "clips" / "ucf101").glob("*.avi"))[0]
    (tmp_path / "list.csv").write_text(f"{clip},a\n")
    run_stage(DECODE, DecodeParams(dataset="csv", root=tmp_path, list=tmp_path / "list.csv", max_frames=2,
                                   short_side=32, workers=1), tmp_path / "c2")
    with pytest.raises(StageError, match="reads the flow images of a rawframes tree"):
        run_stage(FLOW, FlowParams(backend="import"), tmp_path / "c2")


def test_later_stages_read_an_import_as_usual(tmp_path, clips):
    """finetune (flow stream) trains on the imported flow with its bound (read from extract-flow's manifest, as
    for a computed one), and reads the frames."""
    import torch

    from pipeline.data.clips import read_flow_stacks
    from pipeline.io import artifacts
    from pipeline.stage import load_upstream, run_stage
    from stages.finetune import STAGE as FINETUNE, FinetuneParams

    # Two classes x three groups: g01, g02 train, g03 test.
    many = [(name.replace("_g01_", f"_g0{g}_"), cls, frames, flow) for g in (1, 2, 3)
            for name, cls, frames, flow in clips]
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _, _, expected = make_tree(root, "mmaction2", many)
    label = {cls: i for i, (_, cls, _, _) in enumerate(clips)}
    rows = [(f"{cls}/{name} {T} {label[cls]}\n", "_g03_" in name) for name, cls, _, _ in many]
    (root / "train.txt").write_text("".join(r for r, test in rows if not test))
    (root / "test.txt").write_text("".join(r for r, test in rows if test))
    run_import(root, "mmaction2", cache, val_fraction=0.0, flow_bound=15.0)
    vid = f"{clips[0][1]}/{clips[0][0]}"
    stacks = read_flow_stacks(artifacts.flow_store(cache / "extract-flow"), vid, [1], 2, bound=15.0, step=1)
    codes = expected[vid][2]  # stack centred on frame 1: flows 0 and 1, channels x0, y0, x1, y1
    want = np.stack([codes[0, ..., 0], codes[0, ..., 1], codes[1, ..., 0], codes[1, ..., 1]])
    np.testing.assert_array_equal(stacks[0].numpy(), want)
    tiny = dict(arch="resnet18", input_size=32, weights="none", batch_size=4, segments=2, val_frames=2,
                num_test_frames=3, workers=0, dropout=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_stage(FINETUNE, FinetuneParams(stream="flow", epochs=1, **tiny), cache)
    finally:
        torch.set_num_threads(threads)
    assert r.manifest["upstream"].keys() == {"decode", "extract-flow"} and r.manifest["complete"]
    p = FinetuneParams(stream="flow", epochs=1, **tiny)
    up = load_upstream(cache, ("decode", "extract-flow"), "finetune")
    assert FINETUNE.plan(p, up).data.flow == {"flow_bound": 15.0, "flow_step": 1}
    assert FINETUNE.fingerprinted(p, up)["flow_bound"] == 15.0


def test_new_options_keep_the_fingerprints_of_earlier_runs():
    """The rawframes options are left out of decode's and extract-flow's fingerprints at their defaults, so a
    cache decoded before they existed stays fresh; set, they count."""
    from dataclasses import dataclass

    from pipeline.stage import param
    from pipeline.stage.declare import digest, params_dict
    from stages.decode import DecodeParams
    from stages.extract_flow import FlowParams

    @dataclass(frozen=True)
    class Before:
        a: int = param(1, "a")

    @dataclass(frozen=True)
    class After:
        a: int = param(1, "a")
        b: str | None = param(None, "b", omit_default=True)

    fingerprinted = lambda p: digest(params_dict(p, only_fingerprinted=True))  # noqa: E731
    assert fingerprinted(After()) == fingerprinted(Before())
    assert params_dict(After(b="x"), only_fingerprinted=True) == {"a": 1, "b": "x"}
    assert params_dict(After(), only_fingerprinted=False) == {"a": 1, "b": None}
    assert not [k for k in params_dict(DecodeParams(), only_fingerprinted=True) if k.startswith("rawframes")]
    assert "flow_start_index" not in params_dict(FlowParams(), only_fingerprinted=True)
    assert "rawframes_layout" in params_dict(DecodeParams(dataset="rawframes", root=Path("/x"),
                                                          rawframes_layout="tsn"), only_fingerprinted=True)


def test_an_import_stays_current_unless_a_named_parameter_differs(tmp_path, clips):
    """After import-rawframes, a plain `pipeline extract-flow` / `decode` (or run-all without the printed config
    tables) keeps the imported flow and frames: status and the commands say "imported"; an option that differs
    from the import's, or --force, recomputes (the import is kept in the run cache)."""
    from pipeline.stage import run_stage, runcache, status
    from stages import all_stages
    from stages.cli import main
    from stages.extract_flow import STAGE as FLOW, FlowParams
    from stages.workflow import RunAllParams, _steps

    root, cache = tmp_path / "tree", tmp_path / "cache"
    train, test, expected = make_tree(root, "mmaction2", clips)
    run_import(root, "mmaction2", cache)
    vid = sorted(expected)[0]
    manifests = {k: (cache / k / "manifest.json").read_bytes() for k in ("decode", "extract-flow")}
    for command in (["extract-flow", "--device", "cpu"], ["decode", "--workers", "1"]):
        res = CliRunner().invoke(main, [*command, "--cache-dir", str(cache)])
        assert res.exit_code == 0 and "imported from" in res.output and "--force" in res.output, res.output
    assert {k: (cache / k / "manifest.json").read_bytes() for k in manifests} == manifests  # nothing recomputed
    assert not runcache.keys_with_kept_runs(cache)
    rows = {r.key: r for r in status(cache, all_stages())}
    assert rows["extract-flow"].state == "fresh" and rows["extract-flow"].reason.startswith("imported (")
    assert rows["decode"].state == "fresh" and "imported (the mmaction2 frames of" in rows["decode"].reason
    # run-all without [decode] / [extract-flow] tables gives neither stage a parameter: both imports are kept.
    steps = {label: (stage, p, given) for label, stage, p, given in _steps({}, None, RunAllParams())}
    for label in ("decode", "extract-flow"):
        stage, p, given = steps[label]
        assert given == frozenset() and run_stage(stage, p, cache, given=given).skipped
    # From Python without `given` every parameter counts as given: the default torch backend recomputes.
    light = dict(nscales=1, warps=1, inner_iterations=3, outer_iterations=1, fast=False, device="cpu")
    r = run_stage(FLOW, FlowParams(**light), cache)
    assert not r.skipped and r.manifest.params["backend"] == "torch"
    assert runcache.keys_with_kept_runs(cache) == ["extract-flow"]  # the import kept, not deleted
    flow, attrs = stored_flow(cache, vid)
    assert attrs["backend"] == "torch"
    # A named parameter equal to the import's keeps it (restored from the run cache, then kept).
    res = CliRunner().invoke(main, ["import-rawframes", "--root", str(root), "--train-list", str(train),
                                    "--test-list", str(test), "--cache-dir", str(cache), "--workers", "1"])
    assert res.exit_code == 0 and "restored from the run cache" in res.output, res.output
    res = CliRunner().invoke(main, ["extract-flow", "--bound", "20", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and "imported from" in res.output, res.output
    # --force recomputes even with no parameter given.
    r = run_stage(FLOW, FlowParams(**light), cache, given=frozenset(), force=True)
    assert not r.skipped and r.manifest.params["backend"] == "torch" and "imported" not in r.manifest
