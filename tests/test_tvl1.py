"""TV-L1 in PyTorch against OpenCV's DualTVL1OpticalFlow and its building blocks."""
import dataclasses
import warnings

import cv2
import numpy as np
import pytest
import torch

from pipeline.flow import tvl1 as T
from pipeline.flow.flo import read_flo
from pipeline.flow.tvl1 import TVL1Params, opencv_tvl1_flow, pyramid_sizes, rgb_to_gray, to_gray, tvl1_flow


def _epe(a, b) -> float:
    """Mean endpoint distance between two (..., 2, H, W) flows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).sum(axis=-3)).mean())


def _video_gray(path, n, size):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        assert ok, f"could not decode {n} frames from {path}"
        frames.append(to_gray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)))
    cap.release()
    return frames


# ---------------------------------------------------------------------------------------------------------
# Parameters and grayscale conversion


def test_params_defaults_match_opencv():
    algo = cv2.optflow.DualTVL1OpticalFlow_create()
    p = TVL1Params()
    assert (p.tau, p.lambda_, p.theta, p.gamma, p.epsilon, p.scale_step) == pytest.approx(
        (algo.getTau(), algo.getLambda(), algo.getTheta(), algo.getGamma(), algo.getEpsilon(), algo.getScaleStep())
    )
    assert (p.nscales, p.warps, p.inner_iterations, p.outer_iterations, p.median_filtering) == (
        algo.getScalesNumber(), algo.getWarpingsNumber(), algo.getInnerIterations(),
        algo.getOuterIterations(), algo.getMedianFiltering(),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tau = 0.1


@pytest.mark.parametrize(
    "kwargs, field",
    [({"tau": 0}, "tau"), ({"nscales": 0}, "nscales"), ({"warps": 1.5}, "warps"), ({"scale_step": 1.0}, "scale_step"),
     ({"median_filtering": 7}, "median_filtering"), ({"epsilon": -1}, "epsilon")],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TVL1Params(**kwargs)


def test_opencv_backend_uses_our_parameters():
    # The Python binding misspells one keyword; check the positional mapping through the getters.
    p = TVL1Params(tau=0.2, lambda_=0.1, theta=0.4, nscales=3, warps=2, epsilon=0.02, inner_iterations=7,
                   outer_iterations=4, scale_step=0.6, gamma=0.1, median_filtering=3)
    algo = cv2.optflow.DualTVL1OpticalFlow_create(
        p.tau, p.lambda_, p.theta, p.nscales, p.warps, p.epsilon, p.inner_iterations, p.outer_iterations,
        p.scale_step, p.gamma, p.median_filtering, False)
    assert (algo.getInnerIterations(), algo.getOuterIterations(), algo.getMedianFiltering(), algo.getScalesNumber()) \
        == (7, 4, 3, 3)
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 256, (40, 48), dtype=np.uint8), (5, 5), 2)
    b = np.roll(a, 1, axis=1)
    np.testing.assert_array_equal(opencv_tvl1_flow(a, b, p), algo.calc(a, b, None).transpose(2, 0, 1))


def test_to_gray_matches_cv2_exactly():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    # every value of every channel, against the two others at random
    img[0, :, 0] = np.arange(131) * 2 % 256
    img[1, :, 1] = np.arange(131) * 2 % 256
    img[2, :, 2] = np.arange(131) * 2 % 256
    np.testing.assert_array_equal(to_gray(img), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(to_gray(torch.from_numpy(img)).numpy(), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    frames = torch.from_numpy(rng.integers(0, 256, (3, 3, 20, 30), dtype=np.uint8))  # (T, 3, H, W) RGB
    gray = rgb_to_gray(frames)
    assert gray.dtype == torch.float32 and gray.shape == (3, 20, 30)
    for t in range(3):
        rgb = frames[t].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(gray[t].numpy(), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_gray(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        rgb_to_gray(frames[0])


# ---------------------------------------------------------------------------------------------------------
# Building blocks against OpenCV


def test_pyramid_sizes_follow_opencv_resize():
    shape, expected = (384, 512), [(384, 512)]
    img = np.zeros(shape, np.float32)
    for _ in range(4):
        img = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
        expected.append(img.shape)
    assert pyramid_sizes(384, 512, 5, 0.8) == expected
    # 30 px: 24 -> 19 -> 15 (< 16, dropped with everything after it)
    assert pyramid_sizes(30, 200, 5, 0.8) == [(30, 200), (24, 160), (19, 128)]


def test_resize_warp_median_gradient_match_opencv():
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur((rng.random((41, 53)) * 255).astype(np.float32), (5, 5), 1.5)
    t = torch.from_numpy(img)
    down = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(T._resize_linear(t, down.shape, (1.25, 1.25)).numpy(), down, atol=1e-3)
    up = cv2.resize(img, (70, 50), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(T._resize_linear(t, (50, 70)).numpy(), up, atol=1e-3)

    flow = (rng.standard_normal((2, 41, 53)) * 4).astype(np.float32)  # many samples fall outside
    xs, ys = np.meshgrid(np.arange(53, dtype=np.float32), np.arange(41, dtype=np.float32))
    ref = cv2.remap(img, xs + flow[0], ys + flow[1], cv2.INTER_CUBIC)  # BORDER_CONSTANT 0
    ours = T._warp_bicubic(t[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)

    noise = rng.standard_normal((41, 53)).astype(np.float32)
    for k in (3, 5):
        np.testing.assert_array_equal(T._median_filter(torch.from_numpy(noise)[None, None], k)[0, 0].numpy(),
                                      cv2.medianBlur(noise, k))

    # OpenCV centeredGradient: 0.5 * central difference inside, 0.5 * one-sided difference on the border
    dx, dy = T._centered_gradient(t)
    exp_dx = np.empty_like(img)
    exp_dx[:, 1:-1] = 0.5 * (img[:, 2:] - img[:, :-2])
    exp_dx[:, 0] = 0.5 * (img[:, 1] - img[:, 0])
    exp_dx[:, -1] = 0.5 * (img[:, -1] - img[:, -2])
    np.testing.assert_allclose(dx.numpy(), exp_dx, atol=1e-4)
    np.testing.assert_allclose(dy.numpy(), T._centered_gradient(t.T)[0].T.numpy(), atol=1e-4)


def test_divergence_is_adjoint_of_forward_gradient():
    # <grad u, p> = -<u, div p>, the discrete duality the scheme relies on (Zach et al. 2007, Sec. 3), for
    # p vanishing on the last column (p1) / row (p2), as the dual iterates do (grad u is 0 there).
    g = torch.Generator().manual_seed(3)
    u, p1, p2 = (torch.randn(1, 9, 11, generator=g, dtype=torch.float64) for _ in range(3))
    p1[..., -1] = 0
    p2[..., -1, :] = 0
    ux, uy = T._forward_gradient(u)
    assert (ux * p1 + uy * p2).sum().item() == pytest.approx(-(u * T._divergence(p1, p2)).sum().item())


# ---------------------------------------------------------------------------------------------------------
# Whole algorithm against OpenCV


@pytest.mark.slow
def test_flyingchairs_aee_within_5_percent_of_opencv(shared_data):
    """Pair 1 at full 512x384 with default parameters against OpenCV's AEE on the same gray input.

    OpenCV 5.0's figure (1.174) is the one stated in shared/data/README.md; bench/flow.py recomputes it and
    prints the table for all five pairs.
    """
    root = shared_data / "flow" / "flyingchairs"
    a = to_gray(cv2.imread(str(root / "0000001-img0.ppm")))
    b = to_gray(cv2.imread(str(root / "0000001-img1.ppm")))
    gt = read_flo(root / "0000001-gt.flo")
    ours = tvl1_flow(torch.from_numpy(a).float(), torch.from_numpy(b).float(), fast=False)
    assert ours.shape == (2, 384, 512) and ours.dtype == torch.float32
    aee_ours, aee_opencv = _epe(ours.numpy(), gt), 1.174
    assert aee_ours <= 1.05 * aee_opencv, aee_ours


@pytest.fixture(scope="module")
def video_pairs(shared_data):
    """Consecutive gray frames of two real clips at 128x96: list of (I0, I1) uint8 pairs."""
    pairs = []
    for clip in ("ucf101/v_BaseballPitch_g01_c01.avi", "kinetics/arm_wrestling_demo.mp4"):
        frames = _video_gray(shared_data / "clips" / clip, 3, (128, 96))
        pairs += list(zip(frames[:-1], frames[1:]))
    return pairs


def test_real_video_close_to_opencv(video_pairs):
    I0 = torch.from_numpy(np.stack([a for a, _ in video_pairs])).float()
    I1 = torch.from_numpy(np.stack([b for _, b in video_pairs])).float()
    ours = tvl1_flow(I0, I1, fast=False).numpy()
    ref = np.stack([opencv_tvl1_flow(a, b) for a, b in video_pairs])
    for k in range(len(video_pairs)):
        # Measured: mean endpoint difference 0.004-0.03 px (flows of 0.3-1.5 px mean magnitude).
        assert _epe(ours[k], ref[k]) < 0.1, k
        assert _epe(ours[k], ref[k]) < 0.1 * np.sqrt((ref[k] ** 2).sum(0)).mean() + 0.02, k


def test_batched_equals_single_and_independent_of_batch_mates(video_pairs):
    I0 = torch.from_numpy(np.stack([a for a, _ in video_pairs[:3]])).float()[:, :64, :80]
    I1 = torch.from_numpy(np.stack([b for _, b in video_pairs[:3]])).float()[:, :64, :80]
    params = TVL1Params(nscales=3, warps=2)
    batched = tvl1_flow(I0, I1, params, fast=False)
    for k in range(3):
        torch.testing.assert_close(batched[k], tvl1_flow(I0[k], I1[k], params, fast=False), rtol=0, atol=1e-5)
    # Pair 0 next to a pair that never converges quickly (noise) gives the same pair-0 result.
    noise = torch.rand(1, *I0.shape[1:], generator=torch.Generator().manual_seed(0)) * 255
    mixed = tvl1_flow(torch.cat((I0[:1], noise)), torch.cat((I1[:1], noise.flip(-1))), params, fast=False)
    torch.testing.assert_close(mixed[0], batched[0], rtol=0, atol=1e-5)


def test_gamma_runs_and_matches_opencv(video_pairs):
    a, b = video_pairs[0]
    params = TVL1Params(gamma=0.1, nscales=3)
    ours = tvl1_flow(torch.from_numpy(a).float(), torch.from_numpy(b).float(), params, fast=False).numpy()
    assert _epe(ours, opencv_tvl1_flow(a, b, params)) < 0.1


# ---------------------------------------------------------------------------------------------------------
# Fast (compiled) path


# Both fast-path tests use one shape (B = 2, 48 x 64, one level) so that they share one compilation.
_FAST_PARAMS = TVL1Params(nscales=1)
_FAST_SHAPE = (2, 48, 64)


@pytest.mark.slow
def test_fast_step_and_median_match_eager():
    g = torch.Generator().manual_seed(4)
    b, h, w = _FAST_SHAPE
    u = torch.randn(b, 2, h, w, generator=g)
    p = torch.randn(b, 2, 2, h, w, generator=g) * 0.2
    coef = torch.randn(b, 2, h, w, generator=g) * 5
    grad = (coef * coef).sum(1, keepdim=True)
    rho_c = torch.randn(b, 1, h, w, generator=g) * 3
    active = torch.tensor([True, False])
    prm = _FAST_PARAMS
    scaled_eps = float(np.float32(prm.epsilon * prm.epsilon * h * w))
    args = (u, p, active, coef, grad, rho_c, prm.lambda_ * prm.theta, prm.theta, prm.tau / prm.theta, scaled_eps)
    kernels = T._Kernels("compile")
    assert kernels.compiled
    for fast_out, eager_out in zip(kernels.run_step(*args), T._tvl1_step(*args)):
        torch.testing.assert_close(fast_out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.run_step(*args)[0][1], u[1], rtol=0, atol=0)  # inactive pair frozen
    torch.testing.assert_close(kernels.run_median(u, 5), T._median_filter(u, 5), rtol=0, atol=0)
    assert kernels.compiled  # no silent fallback to eager


@pytest.mark.slow
def test_fast_flow_agrees_with_eager(video_pairs):
    b, h, w = _FAST_SHAPE
    I0 = torch.from_numpy(np.stack([a for a, _ in video_pairs[:b]])).float()[:, :h, :w]
    I1 = torch.from_numpy(np.stack([b for _, b in video_pairs[:b]])).float()[:, :h, :w]
    fast = tvl1_flow(I0, I1, _FAST_PARAMS, fast=True)
    eager = tvl1_flow(I0, I1, _FAST_PARAMS, fast=False)
    # The iteration amplifies float rounding differences (fused vs unfused arithmetic) at a few pixels.
    assert _epe(fast.numpy(), eager.numpy()) < 0.02


@pytest.mark.slow
def test_fast_pair_alone_equals_pair_in_batch(video_pairs):
    """The compiled path too: a pair's flow and iteration count do not depend on its batch mates (the batch
    shrinks to B = 1 as pairs converge, so both compiled graphs, B = 1 and dynamic B, are exercised)."""
    b, h, w = _FAST_SHAPE
    I0 = torch.from_numpy(np.stack([a for a, _ in video_pairs[:3]])).float()[:, :h, :w]
    I1 = torch.from_numpy(np.stack([b for _, b in video_pairs[:3]])).float()[:, :h, :w]
    batch_stats = {}
    batched = tvl1_flow(I0, I1, _FAST_PARAMS, kernel="compile", stats=batch_stats)
    for k in range(len(I0)):
        alone_stats = {}
        alone = tvl1_flow(I0[k], I1[k], _FAST_PARAMS, kernel="compile", stats=alone_stats)
        torch.testing.assert_close(batched[k], alone, rtol=0, atol=1e-4)
        assert int(alone_stats["pair_iterations"][0]) == int(batch_stats["pair_iterations"][k]), k
    assert batch_stats["rows"] == int(batch_stats["pair_iterations"].sum())


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, key):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(T, "_compiled", broken)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(20, 24, generator=g) * 255
    b = torch.roll(a, 1, dims=1)
    params = TVL1Params(nscales=1, warps=1, outer_iterations=2)
    with pytest.warns(RuntimeWarning, match="eagerly"):
        flow = tvl1_flow(a, b, params, fast=True)
    torch.testing.assert_close(flow, tvl1_flow(a, b, params, fast=False), rtol=0, atol=0)


def test_recompile_limit_fallback_names_its_cause(monkeypatch):
    def limit_hit(fn, key):
        def call(*args):
            raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")
        return call

    monkeypatch.setattr(T, "_compiled", limit_hit)
    g = torch.Generator().manual_seed(7)
    a = torch.rand(20, 24, generator=g) * 255
    params = TVL1Params(nscales=1, warps=1, outer_iterations=2)
    with pytest.warns(RuntimeWarning, match="recompile limit.*runs eagerly") as record:
        flow = tvl1_flow(a, torch.roll(a, 1, dims=1), params, kernel="compile")
    assert not any("unavailable" in str(w.message) for w in record)
    torch.testing.assert_close(flow, tvl1_flow(a, torch.roll(a, 1, dims=1), params, fast=False), rtol=0, atol=0)


def _random_step_args(b, h, w, seed, prm=TVL1Params()):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, 2, h, w, generator=g)
    p = torch.randn(b, 2, 2, h, w, generator=g) * 0.2
    coef = torch.randn(b, 2, h, w, generator=g) * 5
    grad = (coef * coef).sum(1, keepdim=True)
    rho_c = torch.randn(b, 1, h, w, generator=g) * 3
    active = torch.ones(b, dtype=torch.bool)
    scaled_eps = float(np.float32(prm.epsilon * prm.epsilon * h * w))
    return (u, p, active, coef, grad, rho_c, prm.lambda_ * prm.theta, prm.theta, prm.tau / prm.theta, scaled_eps)


@pytest.mark.slow
def test_many_frame_sizes_stay_compiled(monkeypatch):
    """Regression: all sizes shared one code object's cache, so the 7th frame size hit the recompile limit
    and later sizes ran eagerly. Now each shape has its own compiled copy: with the limit lowered to 2,
    8 sizes (and two batch sizes each) all compile, without a warning, and equal the eager step."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    kernels = T._Kernels("compile")
    sizes = [(8, 10 + k) for k in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for k, (h, w) in enumerate(sizes):
            for b in (2, 3):
                args = _random_step_args(b, h, w, seed=k)
                for fast_out, eager_out in zip(kernels.run_step(*args), T._tvl1_step(*args)):
                    torch.testing.assert_close(fast_out, eager_out, rtol=1e-5, atol=1e-5)
    assert kernels.compiled and not kernels._failed
    for h, w in sizes:
        compiled = T._compiled(T._tvl1_step, ("step", 2, h, w))
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(compiled._torchdynamo_orig_callable)
        assert 1 <= len(entries) <= 2, (h, w, len(entries))


# ---------------------------------------------------------------------------------------------------------
# Converged pairs leave the batch


def test_pair_alone_equals_pair_in_batch_and_work_is_the_sum(video_pairs):
    I0 = torch.from_numpy(np.stack([a for a, _ in video_pairs[:3]])).float()[:, :48, :64]
    I1 = torch.from_numpy(np.stack([b for _, b in video_pairs[:3]])).float()[:, :48, :64]
    noise = torch.rand(1, 48, 64, generator=torch.Generator().manual_seed(8)) * 255
    I0, I1 = torch.cat((I0, noise)), torch.cat((I1, noise.flip(-1)))  # a slow pair beside fast ones
    params = TVL1Params(nscales=2, warps=2, outer_iterations=4)
    batch_stats = {}
    batched = tvl1_flow(I0, I1, params, fast=False, stats=batch_stats)
    counts = batch_stats["pair_iterations"]
    for k in range(len(I0)):
        alone_stats = {}
        alone = tvl1_flow(I0[k], I1[k], params, fast=False, stats=alone_stats)
        torch.testing.assert_close(batched[k], alone, rtol=0, atol=1e-5)
        assert int(alone_stats["pair_iterations"][0]) == int(counts[k]), k
    # The work of the batch is the sum of its pairs' iterations (CPU checks every step), not B x the slowest.
    assert batch_stats["rows"] == int(counts.sum())
    assert int(counts.max()) > int(counts.min())  # the test means something: the pairs differ
    assert batch_stats["rows"] < len(I0) * int(counts.max())


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise():
    a = torch.rand(32, 32) * 255
    with pytest.raises(ValueError, match="differ in shape"):
        tvl1_flow(a, torch.rand(32, 33))
    with pytest.raises(ValueError, match="NaN"):
        tvl1_flow(a, torch.full((32, 32), float("nan")))
    with pytest.raises(ValueError, match="floating-point"):
        tvl1_flow(a.to(torch.uint8), a.to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        tvl1_flow(a[None, None], a[None, None])
    with pytest.raises(ValueError, match="torch.Tensor"):
        tvl1_flow(a.numpy(), a.numpy())
    with pytest.raises(ValueError, match="at least 3x3"):
        tvl1_flow(a[:2], a[:2])
    with pytest.raises(ValueError, match="uint8"):
        opencv_tvl1_flow(a.numpy(), a.numpy())


def test_small_images_use_fewer_levels_with_warning():
    g = torch.Generator().manual_seed(6)
    a = torch.rand(20, 40, generator=g) * 255
    b = torch.roll(a, 1, dims=1)
    params = TVL1Params(nscales=5, warps=1, outer_iterations=2)
    with pytest.warns(UserWarning, match="only 2 of nscales=5"):
        flow = tvl1_flow(a, b, params, fast=False)
    assert flow.shape == (2, 20, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tvl1_flow(a, b, dataclasses.replace(params, nscales=2), fast=False)  # no warning when it fits
