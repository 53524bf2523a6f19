"""The synthetic demo dataset: layout, splits, determinism, real decoding, idempotency, class design."""

import csv
import json
import re
import time
from collections import defaultdict
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from pipeline.data.demo import (
    DEMO_CLASSES,
    ORDER_PAIRS,
    DemoParams,
    make_demo,
    render_clip,
    render_demo_clip,
)

# A reduced demo: 4 clips per class in 4 one-clip groups -> 1 test group, 3 train groups per class.
SMALL = dict(seed=3, num_clips=4, clips_per_group=1, num_frames=16, fps=10, width=80, height=64)
T = 32  # frames of the rendered (not encoded) clips used by the class-design tests


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    csv_path = make_demo(root, **SMALL)
    return root, csv_path


def _rows(csv_path):
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def _decode(path):
    """(frames (T, H, W, 3) uint8 RGB, average rate) through PyAV, independent of the writer."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.average_rate


# ----------------------------------------------------------------------------- measuring frames


def _masks(frames):
    """Per-pixel red / cyan / green masks from chroma alone (the grey texture and background cancel)."""
    f = frames.astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    return {
        "red": r - np.maximum(g, b) > 60,
        "cyan": np.minimum(g, b) - r > 60,
        "green": g - np.maximum(r, b) > 60,
    }


def _track(frames):
    """Per frame: the object's colour name and centroid (x, y), measured from the pixels."""
    masks = _masks(frames)
    colours, centres = [], []
    for t in range(len(frames)):
        name = max(masks, key=lambda k: masks[k][t].sum())
        ys, xs = np.nonzero(masks[name][t])
        assert len(xs) > 50, f"frame {t}: object not found"
        colours.append(name)
        centres.append((xs.mean(), ys.mean()))
    return colours, np.array(centres)


# ----------------------------------------------------------------------------- layout and splits


def test_demo_classes():
    assert len(DEMO_CLASSES) == len(set(DEMO_CLASSES)) == 8
    assert all(re.fullmatch(r"(?:[A-Z][a-z]+)+", name) for name in DEMO_CLASSES)  # CamelCase


def test_layout_and_csv(small_demo):
    root, csv_path = small_demo
    assert csv_path == root / "list.csv"
    assert csv_path.read_text().splitlines()[0] == "path,label,split,group"
    rows = _rows(csv_path)
    assert len(rows) == len(DEMO_CLASSES) * SMALL["num_clips"]
    assert len({r["path"] for r in rows}) == len(rows)
    for row in rows:
        m = re.fullmatch(r"(\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.mp4", row["path"])
        assert m, row["path"]
        assert m[1] == m[2] == row["label"] and row["label"] in DEMO_CLASSES
        assert row["group"] == f"{row['label']}_g{m[3]}"
        assert row["split"] in ("train", "test")
        assert (csv_path.parent / row["path"]).is_file()
    meta = json.loads((root / "demo.json").read_text())
    assert meta["complete"] and meta["params"]["seed"] == SMALL["seed"] and meta["generator_version"]
    assert not [p for p in root.rglob(".*")], "temporary files left behind"


def test_split_by_group(small_demo):
    rows = _rows(small_demo[1])
    split_of_group = defaultdict(set)
    groups = defaultdict(lambda: defaultdict(set))
    for row in rows:
        split_of_group[row["group"]].add(row["split"])
        groups[row["label"]][row["split"]].add(row["group"])
    assert all(len(s) == 1 for s in split_of_group.values()), "a group straddles the splits"
    assert set(groups) == set(DEMO_CLASSES)
    for label, by_split in groups.items():
        assert len(by_split["test"]) >= 1, label
        assert len(by_split["train"]) >= 2, label  # room for a group-held-out validation set
    # the default dataset: 6 groups of 3 per class, round(0.3 * 6) = 2 of them test (1/3 of the clips)
    params = DemoParams()
    assert (params.num_groups, params.num_test_groups) == (6, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=81), "even"),
    (dict(num_frames=8), "num_frames"),
    (dict(num_clips=4, clips_per_group=2), "2 train groups"),
    (dict(test_fraction=1.0), "test_fraction"),
])
def test_bad_parameters_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_demo(tmp_path, **kwargs)
    assert not (tmp_path / "list.csv").exists()


# ----------------------------------------------------------------------------- frames and files


def test_render_clip_deterministic():
    for name in DEMO_CLASSES:
        a = render_clip(name, np.random.default_rng(11), num_frames=16)
        b = render_clip(name, np.random.default_rng(11), num_frames=16)
        assert a.shape == (16, 72, 96, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b), name
        assert not np.array_equal(a, render_clip(name, np.random.default_rng(12), num_frames=16)), name
    with pytest.raises(ValueError, match="unknown demo class"):
        render_clip("Juggling", np.random.default_rng(0))


def test_decoded_frames_match_rendered(small_demo):
    """Real H.264 round trip: frame count and rate as asked, pixels within a codec tolerance.

    Bound: mean |decoded - rendered| < 4 levels over the clip (measured ~2.2 at crf 12, mostly the
    sensor noise the codec smooths) and the object's mean colour within 12 levels.
    """
    root, csv_path = small_demo
    params = DemoParams(**SMALL)
    by_label = {}
    for row in _rows(csv_path):
        by_label.setdefault(row["label"], row["path"])
    for label in ("RedHorizontal", "LeftThenRight", "CyanThenRed"):
        path = root / by_label[label]
        m = re.search(r"_g(\d+)_c(\d+)\.mp4$", path.name)
        decoded, rate = _decode(path)
        rendered = render_demo_clip(params, label, int(m[1]), int(m[2]))
        assert decoded.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
        assert rate == Fraction(SMALL["fps"])
        diff = np.abs(decoded.astype(np.float64) - rendered)
        assert diff.mean() < 4.0, (label, diff.mean())
        for colour, mask in _masks(rendered).items():
            if mask.sum() > 100:
                err = np.abs(decoded[mask].mean(0) - rendered[mask].mean(0)).max()
                assert err < 12.0, (label, colour, err)


def test_idempotent_resume_and_regenerate(tmp_path):
    kwargs = dict(seed=1, num_clips=4, clips_per_group=1, num_frames=12, fps=8, width=64, height=48)
    csv_path = make_demo(tmp_path, **kwargs)
    videos = sorted(tmp_path.glob("*/*.mp4"))
    assert len(videos) == 4 * len(DEMO_CLASSES)
    stamps = {p: p.stat().st_mtime_ns for p in videos}

    start = time.perf_counter()
    assert make_demo(tmp_path, **kwargs) == csv_path
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in videos} == stamps

    # a run killed part-way (demo.json not complete, one video missing) resumes: only that video is written
    meta = json.loads((tmp_path / "demo.json").read_text())
    (tmp_path / "demo.json").write_text(json.dumps({**meta, "complete": False}))
    videos[0].unlink()
    make_demo(tmp_path, **kwargs)
    assert videos[0].is_file()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in videos[1:])
    assert json.loads((tmp_path / "demo.json").read_text())["complete"]

    # other parameters regenerate every video, and clips no longer listed are removed
    make_demo(tmp_path, **{**kwargs, "fps": 6, "num_clips": 3})
    remaining = sorted(tmp_path.glob("*/*.mp4"))
    assert len(remaining) == len(_rows(csv_path)) == 3 * len(DEMO_CLASSES)
    assert not any(p.name.endswith("_g04_c01.mp4") for p in remaining)
    assert all(p.stat().st_mtime_ns != stamps.get(p) for p in remaining)
    assert _decode(remaining[0])[1] == 6
    assert json.loads((tmp_path / "demo.json").read_text())["params"]["fps"] == 6


# ----------------------------------------------------------------------------- class design


@pytest.mark.parametrize("seed", [0, 1])
def test_class_semantics_measured_from_pixels(seed):
    """Each class does what its name says, measured from colour masks and centroids of the frames."""
    for name in DEMO_CLASSES:
        colours, centres = _track(render_clip(name, np.random.default_rng(seed), num_frames=T))
        step = np.diff(centres, axis=0)
        dx, dy = np.abs(step).mean(0)
        half = T // 2
        if name in ("RedHorizontal", "RedVertical", "CyanHorizontal", "CyanVertical"):
            assert set(colours) == {"red" if name.startswith("Red") else "cyan"}, name
            axis = 0 if name.endswith("Horizontal") else 1
            moving, still = np.abs(step).mean(0)[[axis, 1 - axis]]
            assert 0.8 < moving < 1.7 and still < 0.1, (name, dx, dy)
            assert np.all(np.sign(step[:, axis]) == np.sign(step[0, axis])), name  # one direction
        elif name in ("LeftThenRight", "RightThenLeft"):
            assert set(colours) == {"green"} and dy < 0.1, name
            first = -1 if name == "LeftThenRight" else 1
            assert np.all(np.sign(step[: half - 1, 0]) == first), name
            assert np.all(np.sign(step[half + 1:, 0]) == -first), name
        else:
            first, second = ("red", "cyan") if name == "RedThenCyan" else ("cyan", "red")
            switch = colours.index(second)
            assert colours == [first] * switch + [second] * (T - switch), name
            assert T // 3 - 1 <= switch <= 2 * T // 3 + 1, (name, switch)
            assert abs(dx - dy) < 0.1 and 0.5 < dx < 1.2, (name, dx, dy)  # diagonal


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_order_pairs_differ_only_in_order(seed):
    """From the same draws, an order pair's clips hold the same frames, only in another order.

    RightThenLeft is LeftThenRight rolled by T/2; CyanThenRed is RedThenCyan reversed. So every
    order-less statistic of frames (the mean image, per-frame colour counts, the set of per-frame
    speeds measured between neighbouring frames) is equal, while the sequence of motion or colour
    is not.
    """
    (lr, rl), (rc, cr) = ORDER_PAIRS
    frames = {name: render_clip(name, np.random.default_rng(seed), num_frames=T) for name in (lr, rl, rc, cr)}
    assert np.array_equal(frames[rl], np.roll(frames[lr], -T // 2, axis=0))
    assert np.array_equal(frames[cr], frames[rc][::-1])
    for a, b in ((lr, rl), (rc, cr)):
        assert np.array_equal(frames[a].mean(0), frames[b].mean(0))
        (ca, pa), (cb, pb) = _track(frames[a]), _track(frames[b])
        assert sorted(ca) == sorted(cb)
        speed_a = np.sort(np.hypot(*np.diff(pa, axis=0).T))
        speed_b = np.sort(np.hypot(*np.diff(pb, axis=0).T))
        assert np.allclose(speed_a, speed_b, atol=0.15), (a, b)  # RL trades LR's turn pair for the wrap pair
        assert ca != cb or not np.allclose(pa, pb, atol=0.5), "the pair should differ in order"


def test_red_and_cyan_have_the_same_grey_level():
    """A grey-level flow (TV-L1 on cv2's gray) sees no difference between red and cyan clips."""
    red = render_clip("RedHorizontal", np.random.default_rng(4), num_frames=12)
    cyan = render_clip("CyanHorizontal", np.random.default_rng(4), num_frames=12)
    assert not np.array_equal(red, cyan)
    gray = [np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip]).astype(int) for clip in (red, cyan)]
    assert np.abs(gray[0] - gray[1]).max() <= 1


def test_mpeg4_fallback_round_trip(tmp_path):
    """Without libx264 the demo is MPEG-4 part 2; that path must decode to the same frames too."""
    from pipeline.data.demo import _write_video

    frames = render_clip("CyanVertical", np.random.default_rng(2), num_frames=12, width=64, height=48)
    path = tmp_path / "v_CyanVertical_g01_c01.mp4"
    _write_video(path, frames, 10, 12, "mpeg4")
    decoded, rate = _decode(path)
    assert decoded.shape == frames.shape and rate == 10
    assert np.abs(decoded.astype(np.float64) - frames).mean() < 4.0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_generation_is_byte_reproducible(tmp_path):
    """Two generations with one seed write identical files (x264 runs single-threaded for this)."""
    import hashlib

    digests = []
    for name in ("a", "b"):
        make_demo(tmp_path / name, num_clips=9, clips_per_group=3)
        digests.append({p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).rglob("*.mp4"))})
    assert len(digests[0]) == 72 and digests[0] == digests[1]
