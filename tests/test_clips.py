"""Clip datasets: TSN segment frames, flow stacks (centred, clamped), one crop + flip per sample, flow flip sign.

Frames and flow are synthetic with values that encode where they came from, so every expectation is
computed by hand from the documented rules: TSN segments (``k * d + U{0..d-1}``), the L = 10 window
``c - 5 .. c + 4`` shifted into range, the draw order (segment offsets, crop width, height, position,
flip), and ``255 - x`` for flipped quantized flow.
"""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from pipeline.data.clips import EvalViews, TrainClips, VideoList, input_channels, input_normalizer, read_flow_stacks
from pipeline.io.store import VideoStore
from tests.fakes import farneback_flow, quantize

H, W = 48, 64


# ------------------------------------------------------------------------------------------------ fixtures

def coded_frames(T: int) -> np.ndarray:
    """Frame t: red = 4 t (which frame), green = 3 x (horizontal ramp), blue = 3 y (vertical ramp)."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([np.stack([np.full_like(x, 4 * t), 3 * x, 3 * y], -1) for t in range(T)]).astype(np.uint8)


def flow_u(i):  # x component of flow field i, pixels
    return 0.5 * (i % 7) - 1.5


def flow_v(i):  # y component: encodes the index (bound 20 -> steps of 0.75 px are > 4 codes apart)
    return -15.0 + 0.75 * i


def coded_flow(num_flows: int, bound: float = 20.0) -> np.ndarray:
    """Flow field i is uniform: (u_i, v_i), quantized."""
    f = np.zeros((num_flows, H, W, 2), np.float32)
    for i in range(num_flows):
        f[i, ..., 0], f[i, ..., 1] = flow_u(i), flow_v(i)
    return quantize(f, bound)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    frames, flow = VideoStore(root / "frames"), VideoStore(root / "flow")
    for vid, T in (("a/v1", 30), ("b/v2", 7)):
        with frames.writer(vid) as c:
            c.write_images("frames", coded_frames(T), codec="raw")
        with flow.writer(vid) as c:
            c.write_images("flow", coded_flow(T - 1), codec="raw")
            c.set_attrs({"num_flows": T - 1, "num_frames": T, "step": 1, "bound": 20.0})
    videos = VideoList(("a/v1", "b/v2"), (0, 1), (30, 7))
    return frames, flow, videos


def expected_draws(seed, epoch, index, num_frames, segments, short_side=H):
    """The documented draw order: segment offsets, crop width, crop height, position, flip."""
    rng = np.random.default_rng([seed, epoch, index])
    d = num_frames // segments
    frames = [k * d + int(o) for k, o in enumerate(rng.integers(d, size=segments))] if d else [0] * segments
    sizes = [min(max(round(s * short_side / 256), 1), short_side) for s in (256, 224, 192, 168)]
    w, h = sizes[int(rng.integers(4))], sizes[int(rng.integers(4))]
    pos = ("top_left", "top_right", "bottom_left", "bottom_right", "center")[int(rng.integers(5))]
    flip = bool(rng.random() < 0.5)
    top = {"top_left": 0, "top_right": 0, "bottom_left": H - h, "bottom_right": H - h, "center": (H - h) // 2}[pos]
    left = {"top_left": 0, "top_right": W - w, "bottom_left": 0, "bottom_right": W - w, "center": (W - w) // 2}[pos]
    return frames, (top, left, h, w), flip


def expected_stack(center, num_flows, L=10):
    start = min(max(center - L // 2, 0), max(num_flows - L, 0))
    return [min(start + j, num_flows - 1) for j in range(L)]


# ------------------------------------------------------------------------------------------------ RGB

@pytest.mark.parametrize("epoch,index", [(0, 0), (1, 0), (3, 0), (0, 1)])
def test_rgb_segments_and_one_crop_flip_for_all_frames(stores, epoch, index):
    frames, _, videos = stores
    ds = TrainClips(frames, videos, "rgb", num_segments=3, input_size=32, seed=5)
    x = ds[(index, epoch)]["input"]
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    want_frames, (top, left, h, w), flip = expected_draws(5, epoch, index, videos.num_frames[index], 3)
    # The red channel is constant per frame (4 t), so resizing keeps it exactly: it names the frame.
    assert [int(v) for v in x[:, 0].reshape(3, -1).unique(dim=1).flatten()] == [4 * t for t in want_frames]
    # One crop and flip for every frame: the ramps are identical across the segments.
    assert torch.equal(x[0, 1:], x[1, 1:]) and torch.equal(x[0, 1:], x[2, 1:])
    green = x[0, 1].float()
    # Horizontal ramp 3x: increasing left to right unless flipped; its ends near the crop's columns.
    row = green[16]
    assert (row[-1] < row[0]) == flip
    lo, hi = (row[-1], row[0]) if flip else (row[0], row[-1])
    px = w / 32  # source pixels per output pixel
    assert abs(lo - 3 * (left + px / 2 - 0.5)) <= 3 * px and abs(hi - 3 * (left + w - px / 2 - 0.5)) <= 3 * px
    col = x[0, 2].float()[:, 16]
    assert abs(col[0] - 3 * (top + h / 64 - 0.5)) <= 3 * h / 32 and abs(col[-1] - 3 * (top + h - 0.5)) <= 3 * h / 32


def test_short_video_repeats_frame_zero(stores):
    frames, _, videos = stores
    ds = TrainClips(frames, videos, "rgb", num_segments=8, input_size=16, seed=0)
    x = ds[(1, 0)]["input"]  # 7 frames < 8 segments: TSN's fallback, frame 0 for every segment
    assert x.shape == (8, 3, 16, 16) and int(x[:, 0].max()) == 0


def test_sample_is_a_function_of_seed_epoch_index(stores):
    frames, _, videos = stores
    ds = TrainClips(frames, videos, "rgb", num_segments=3, input_size=24, seed=1)
    assert torch.equal(ds[(0, 2)]["input"], ds[(0, 2)]["input"])
    assert not all(torch.equal(ds[(0, e)]["input"], ds[(0, 2)]["input"]) for e in range(6))
    other = TrainClips(frames, videos, "rgb", num_segments=3, input_size=24, seed=2)
    assert not all(torch.equal(other[(0, e)]["input"], ds[(0, e)]["input"]) for e in range(6))


def test_rgb_test_views_are_uniform_centre_crops(stores):
    frames, _, videos = stores
    ds = EvalViews(frames, videos, "rgb", num_frames=5, input_size=40)
    item = ds[0]
    x = item["input"]
    assert x.shape == (5, 3, 40, 40) and item["label"] == 0 and item["index"] == 0
    # 30 frames, 5 views: frames (30 (2k + 1)) // 10 = 3, 9, 15, 21, 27.
    assert [int(v) for v in x[:, 0, 0, 0]] == [4 * t for t in (3, 9, 15, 21, 27)]
    # centre view: short side 48 -> round(40 * 256 / 224) = 46 (width 61), central 40 x 40, no flip.
    green = x[0, 1].float()[20]
    assert green[-1] > green[0]
    scale = 48 / 46
    assert abs(green[0] - 3 * ((61 - 40) // 2 + 0.5) * scale) < 4 and abs(green[-1] - 3 * (W - 1 - 10 * scale)) < 5


# ------------------------------------------------------------------------------------------------ flow

def test_flow_test_stacks_centred_and_clamped(stores):
    _, flow, videos = stores
    ds = EvalViews(flow, videos, "flow", num_frames=3, input_size=32, flow_length=10)
    x = ds[0]["input"]
    assert x.shape == (3, 20, 32, 32)
    # 30 frames (29 flows), 3 views: centres 5, 15, 25 -> flows 0..9, 10..19 and (clamped) 19..28.
    want = [list(range(0, 10)), list(range(10, 20)), list(range(19, 29))]
    for view, idx in enumerate(want):
        assert idx == expected_stack((5, 15, 25)[view], 29)
        ys = x[view, 1::2, 0, 0].numpy()  # channels x0, y0, x1, y1, ...: y is odd
        xs = x[view, 0::2, 0, 0].numpy()
        assert np.array_equal(ys, quantize(np.array([flow_v(i) for i in idx]), 20))
        assert np.array_equal(xs, quantize(np.array([flow_u(i) for i in idx]), 20))


def test_flow_stack_shorter_video_repeats_last_flow(stores):
    _, flow, videos = stores
    x = read_flow_stacks(flow, "b/v2", [3], 10)  # 6 flows < L = 10: all of them, then the last repeated
    idx = [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert x.shape == (1, 20, H, W)
    assert np.array_equal(x[0, 1::2, 0, 0].numpy(), quantize(np.array([flow_v(i) for i in idx]), 20))


@pytest.mark.parametrize("epoch", range(4))
def test_flow_training_stack_flip_negates_x_only(stores, epoch):
    _, flow, videos = stores
    ds = TrainClips(flow, videos, "flow", num_segments=2, input_size=24, flow_length=10, seed=3)
    x = ds[(0, epoch)]["input"]
    assert x.shape == (2, 20, 24, 24)
    centres, _, flip = expected_draws(3, epoch, 0, 30, 2)
    for s, c in enumerate(centres):
        idx = expected_stack(c, 29)
        qu = quantize(np.array([flow_u(i) for i in idx]), 20)
        qv = quantize(np.array([flow_v(i) for i in idx]), 20)
        # Uniform fields: every pixel holds the code; a flip turns x into 255 - x, y unchanged.
        assert (x[s, 0::2] == torch.from_numpy(255 - qu if flip else qu)[:, None, None]).all()
        assert (x[s, 1::2] == torch.from_numpy(qv)[:, None, None]).all()
        # Dequantized, the flipped x flow is the negated flow (to half a quantization step).
        u = input_normalizer("flow")(x[s, 0::2, 0, 0]) * 20
        want = -np.array([flow_u(i) for i in idx]) if flip else np.array([flow_u(i) for i in idx])
        assert np.abs(u.numpy() - want).max() <= 20 / 255 + 1e-5


def test_flow_bound_mismatch_names_the_file(stores):
    _, flow, videos = stores
    with pytest.raises(ValueError, match=r"v1\.zarr.*bound 20.*bound 10"):
        read_flow_stacks(flow, "a/v1", [5], 10, bound=10)
    with pytest.raises(ValueError, match="step"):
        read_flow_stacks(flow, "a/v1", [5], 10, step=2)


def test_input_channels_and_normalizers():
    assert input_channels("rgb") == 3 and input_channels("flow", 10) == 20 and input_channels("flow", 5) == 10
    with pytest.raises(ValueError, match="stream"):
        input_channels("depth")
    q = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(input_normalizer("flow")(q), torch.tensor([[[[-1.0, 1.0]]]]))


def test_farneback_helper_recovers_a_translation():
    # The test flow helper is itself checked: a texture shifted by 2 px right gives u ~ 2, v ~ 0.
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (H, W + 8), dtype=np.uint8), (5, 5), 1.5)
    frames = np.stack([np.repeat(tex[:, 4 - 2 * t:4 - 2 * t + W, None], 3, -1) for t in range(2)])
    q = farneback_flow(frames)[0, 12:-12, 12:-12].astype(np.float32) * 40 / 255 - 20
    assert abs(np.median(q[..., 0]) - 2) < 0.3 and abs(np.median(q[..., 1])) < 0.3
