"""Multi-scale corner crops, flips of quantized flow, test views: against manual slicing and numpy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data import transforms as T


def _frames(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _quantize(f, bound):
    """Flow quantization of the store (denseflow / TSN): round((f + b) * 255 / (2b)), clipped."""
    return np.clip(np.round((f + bound) * 255.0 / (2 * bound)), 0, 255).astype(np.uint8)


def _bilinear_reference(x, size):
    """Independent resize: float bilinear with antialias via torch.nn.functional.interpolate."""
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]).float(), size=size, mode="bilinear", antialias=True)
    return y.round().clamp(0, 255).reshape(*lead, x.shape[-3], *size)


# ---------------------------------------------------------------- crop parameters


def test_crop_sizes_paper_and_scaled():
    assert T.crop_sizes(256) == [256, 224, 192, 168]
    assert T.crop_sizes(128) == [128, 112, 96, 84]  # demo frames: scaled by 128 / 256


def test_sample_crop_params_positions_scales_and_flip():
    height, width = 256, 340
    sizes = {256, 224, 192, 168}
    seen_positions, seen_flip, seen_w, seen_h, aspect = set(), set(), set(), set(), False
    for seed in range(400):
        p = T.sample_crop_params(height, width, np.random.default_rng(seed))
        assert p.h in sizes and p.w in sizes
        corners = {
            "tl": (0, 0),
            "tr": (0, width - p.w),
            "bl": (height - p.h, 0),
            "br": (height - p.h, width - p.w),
            "c": ((height - p.h) // 2, (width - p.w) // 2),
        }
        hits = [name for name, tl in corners.items() if tl == (p.top, p.left)]
        assert hits, p
        seen_positions.update(hits)
        seen_flip.add(p.flip)
        seen_w.add(p.w)
        seen_h.add(p.h)
        aspect |= p.w != p.h
    assert seen_positions == {"tl", "tr", "bl", "br", "c"}
    assert seen_flip == {True, False}
    assert seen_w == sizes and seen_h == sizes
    assert aspect  # width and height drawn independently


def test_sample_crop_params_flip_probability_half():
    flips = [T.sample_crop_params(256, 256, np.random.default_rng(s)).flip for s in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_sample_crop_params_small_frames_stay_inside():
    for seed in range(100):
        p = T.sample_crop_params(96, 128, np.random.default_rng(seed))
        assert p.h in {96, 84, 72, 63} and p.w in {96, 84, 72, 63}
        assert 0 <= p.top and p.top + p.h <= 96 and 0 <= p.left and p.left + p.w <= 128


# ---------------------------------------------------------------- apply_crop


def test_apply_crop_without_resize_is_the_slice_for_every_frame():
    x = _frames((4, 3, 20, 30))
    params = T.CropParams(top=5, left=7, h=12, w=12, flip=False)
    out = T.apply_crop(x, params, input_size=12)
    assert out.shape == (4, 3, 12, 12) and out.dtype == torch.uint8
    for t in range(4):
        assert torch.equal(out[t], x[t, :, 5:17, 7:19])


def test_apply_crop_resizes_every_frame_with_the_same_box():
    x = _frames((5, 3, 48, 64), seed=1)
    params = T.CropParams(top=6, left=20, h=42, w=36, flip=True)
    out = T.apply_crop(x, params, input_size=24)
    assert out.shape == (5, 3, 24, 24)
    for t in range(5):
        ref = _bilinear_reference(x[t, :, 6:48, 20:56], (24, 24)).flip(-1)
        assert (out[t].float() - ref).abs().max() <= 1


def test_apply_crop_rejects_bad_input():
    params = T.CropParams(top=0, left=0, h=10, w=10, flip=False)
    with pytest.raises(ValueError, match="uint8"):
        T.apply_crop(torch.zeros(2, 3, 16, 16), params, 8)
    with pytest.raises(ValueError, match="does not fit"):
        T.apply_crop(_frames((2, 3, 8, 16)), params, 8)


# ---------------------------------------------------------------- flow flips


def test_flow_flip_negates_x_and_keeps_y():
    x = _frames((10, 2, 16, 16), seed=2)
    params = T.CropParams(top=2, left=3, h=12, w=12, flip=True)
    out = T.apply_crop(x, params, input_size=12, is_flow=True)
    crop = x[..., 2:14, 3:15].numpy()
    np.testing.assert_array_equal(out[:, 0].numpy(), 255 - crop[:, 0, :, ::-1])
    np.testing.assert_array_equal(out[:, 1].numpy(), crop[:, 1, :, ::-1])


def test_flow_flip_interleaved_channels():
    x = _frames((20, 6, 5), seed=3)  # (2L, H, W): x0, y0, x1, y1, ...
    out = T.flip_horizontal(x, is_flow=True).numpy()
    ref = x.numpy()[..., ::-1]
    np.testing.assert_array_equal(out[0::2], 255 - ref[0::2])
    np.testing.assert_array_equal(out[1::2], ref[1::2])


def test_flow_flip_equals_quantized_negated_flow():
    bound = 20.0
    rng = np.random.default_rng(0)
    fx = rng.uniform(-25, 25, size=(64, 64))  # beyond the bound too: clipping is symmetric
    q = torch.from_numpy(np.stack([_quantize(fx, bound), _quantize(fx, bound)])[None])
    flipped = T.flip_horizontal(q, is_flow=True)[0, 0].numpy()
    expected = _quantize(-fx, bound)[:, ::-1]
    np.testing.assert_array_equal(flipped, expected)
    # The documented exception: zero flow sits on a rounding tie (127.5 -> 128) and flips to 127.
    zero = torch.full((1, 2, 1, 1), int(_quantize(np.array(0.0), bound)), dtype=torch.uint8)
    assert zero[0, 0, 0, 0] == 128 and T.flip_horizontal(zero, is_flow=True)[0, 0, 0, 0] == 127


def test_flow_flip_rejects_odd_channels():
    with pytest.raises(ValueError, match="pairs"):
        T.flip_horizontal(_frames((3, 4, 4)), is_flow=True)


# ---------------------------------------------------------------- test views


def _manual_ten(x, s):
    a = x.numpy()
    H, W = a.shape[-2:]
    boxes = [(0, 0), (0, W - s), (H - s, 0), (H - s, W - s), ((H - s) // 2, (W - s) // 2)]
    views = [a[..., t : t + s, l : l + s] for t, l in boxes]
    return views + [v[..., ::-1] for v in views]


def test_ten_crop_rgb_matches_manual_slicing():
    x = _frames((2, 3, 8, 10), seed=4)
    out = T.ten_crop(x, input_size=5)
    assert out.shape == (10, 2, 3, 5, 5)
    for v, ref in enumerate(_manual_ten(x, 5)):
        np.testing.assert_array_equal(out[v].numpy(), ref)
    # hand check of the centre view: top (8 - 5) // 2 = 1, left (10 - 5) // 2 = 2
    assert torch.equal(out[4], x[..., 1:6, 2:7])


def test_ten_crop_flow_inverts_x_on_flipped_views_only():
    x = _frames((3, 2, 9, 9), seed=5)
    out = T.ten_crop(x, input_size=6, is_flow=True).numpy()
    refs = _manual_ten(x, 6)
    for v in range(5):
        np.testing.assert_array_equal(out[v], refs[v])
    for v in range(5, 10):
        np.testing.assert_array_equal(out[v][:, 0], 255 - refs[v][:, 0])
        np.testing.assert_array_equal(out[v][:, 1], refs[v][:, 1])


def test_ten_crop_too_small():
    with pytest.raises(ValueError, match="cannot take"):
        T.ten_crop(_frames((1, 3, 100, 300)), 224)


def test_resize_short_side_and_center_view():
    x = _frames((2, 3, 60, 80), seed=6)
    r = T.resize_short_side(x, 48)
    assert r.shape == (2, 3, 48, 64)
    assert (r.float() - _bilinear_reference(x, (48, 64))).abs().max() <= 1
    v = T.center_view(x, input_size=42, short_side=48)
    assert torch.equal(v, r[..., 3:45, 11:53])  # (48 - 42) // 2 = 3, (64 - 42) // 2 = 11
    assert T.center_view(_frames((1, 3, 256, 340)), 224).shape == (1, 3, 224, 224)


def test_center_crop_too_small():
    with pytest.raises(ValueError, match="cannot take"):
        T.center_crop(_frames((3, 10, 20)), 11)


def test_multiscale_corner_crop_object():
    crop = T.MultiScaleCornerCrop(input_size=32, is_flow=True)
    x = _frames((4, 2, 64, 80), seed=7)
    out = crop(x, np.random.default_rng(3))
    params = T.sample_crop_params(64, 80, np.random.default_rng(3))
    assert out.shape == (4, 2, 32, 32)
    top, left, h, w, flip = params
    ref = _bilinear_reference(x[..., top : top + h, left : left + w], (32, 32))
    if flip:
        ref = ref.flip(-1)
        ref[:, 0] = 255 - ref[:, 0]
    assert (out.float() - ref).abs().max() <= 1
