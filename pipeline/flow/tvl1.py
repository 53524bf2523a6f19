"""TV-L1 optical flow in PyTorch, batched, on CPU or CUDA.

The algorithm is the duality-based TV-L1 of Zach, Pock and Bischof (2007, "A Duality Based Approach for
Realtime TV-L1 Optical Flow"), with the refinements of OpenCV's ``cv::optflow::DualTVL1OpticalFlow``
(opencv_contrib ``modules/optflow/src/tvl1flow.cpp``, itself after Sanchez Perez et al.'s IPOL code),
mirrored step by step so that the two agree closely:

* pyramid: level ``s`` is level ``s-1`` resized by ``scale_step`` with bilinear interpolation (OpenCV
  ``resize(..., fx=scale_step, INTER_LINEAR)``: output size rounded, no anti-aliasing); levels narrower or
  shorter than 16 pixels are dropped (OpenCV does this silently, we warn);
* coarse to fine: flow starts at zero on the coarsest level and is carried to the next finer level by a
  bilinear resize to that level's size, multiplied by ``1 / scale_step``;
* per level, ``warps`` times: warp ``I1`` and its centred gradient by the current flow with bicubic
  interpolation (``remap(..., INTER_CUBIC)``: A = -0.75, at the exact float position as in OpenCV 5, taps
  outside the image read as 0), then linearise the data term;
* per warp, up to ``outer_iterations`` x ``inner_iterations`` iterations of: thresholding step for ``v``
  (three cases), ``u = v + theta * div(p)``, dual step ``p = (p + tau/theta * grad u) / (1 + tau/theta * |grad u|)``;
  a 5x5 median filter of ``u`` before each outer iteration; a pair stops iterating in this warp once
  ``sum |u_new - u_old|^2 <= epsilon^2 * H_s * W_s``;
* ``gamma > 0`` adds OpenCV's illumination variable ``u3`` (a third flow channel with data-term weight gamma).

Batched: all pairs of a batch share every kernel launch; a pair that has met the stopping rule is frozen by
masks, so its result does not depend on which other pairs share its batch.

``fast=True`` runs the inner iteration through ``torch.compile`` (one fused kernel per step instead of ~40
elementwise passes); ``fast=False`` is the plain eager reference.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TVL1Params",
    "tvl1_flow",
    "opencv_tvl1_flow",
    "to_gray",
    "rgb_to_gray",
    "pyramid_sizes",
]

# OpenCV drops pyramid levels whose width or height falls below this (tvl1flow.cpp, calc()).
MIN_LEVEL_SIZE = 16
# std::numeric_limits<float>::epsilon(), the "gradient is zero" guard of OpenCV's estimateV.
_FLT_EPSILON = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class TVL1Params:
    """Parameters of TV-L1, named and defaulted as OpenCV's ``DualTVL1OpticalFlow`` (CPU version).

    tau: time step of the numerical scheme (Zach et al. 2007, Sec. 3; stable for tau <= 1/8 in theory,
        0.25 in practice as in OpenCV).
    lambda_: weight of the L1 data term (lambda in Zach et al., eq. 1); smaller gives smoother flow.
    theta: coupling between ``u`` and the auxiliary ``v`` (theta in Zach et al., eq. 4).
    nscales: number of pyramid levels (fewer if the image gets smaller than 16 px, see ``pyramid_sizes``).
    warps: number of warpings per level.
    epsilon: stopping threshold: iterate while ``mean |u_new - u_old|^2 > epsilon^2``.
    inner_iterations: iterations between median filterings.
    outer_iterations: number of median-filter rounds per warp.
    scale_step: size ratio between consecutive pyramid levels.
    gamma: weight of the illumination variable (0 disables it).
    median_filtering: median filter size applied to the flow before each outer iteration (OpenCV's
        ``medianBlur`` on float images allows 3 or 5; 0 or 1 disables it).
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5

    def __post_init__(self) -> None:
        for name in ("tau", "lambda_", "theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TVL1Params.{name} must be > 0, got {getattr(self, name)}")
        for name in ("nscales", "warps", "inner_iterations", "outer_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TVL1Params.{name} must be an integer >= 1, got {value!r}")
        if not self.epsilon >= 0:
            raise ValueError(f"TVL1Params.epsilon must be >= 0, got {self.epsilon}")
        if not 0 < self.scale_step < 1:
            raise ValueError(f"TVL1Params.scale_step must be in (0, 1), got {self.scale_step}")
        if not self.gamma >= 0:
            raise ValueError(f"TVL1Params.gamma must be >= 0, got {self.gamma}")
        if self.median_filtering not in (0, 1, 3, 5):
            raise ValueError(
                "TVL1Params.median_filtering must be 0 or 1 (off), 3 or 5 (OpenCV's medianBlur on float "
                f"images), got {self.median_filtering!r}"
            )


# ----------------------------------------------------------------------------------------------------------
# Grayscale conversion


# cv2.cvtColor(BGR2GRAY) on 8-bit images: 15-bit fixed point, round(0.299/0.587/0.114 * 2^15)
# (OpenCV imgproc color_rgb: R2Y = 9798, G2Y = 19235, B2Y = 3735, shift 15).
_R2Y, _G2Y, _B2Y, _GRAY_SHIFT = 9798, 19235, 3735, 15


def _gray_fixed_point(r: Tensor, g: Tensor, b: Tensor) -> Tensor:
    y = r.int() * _R2Y + g.int() * _G2Y + b.int() * _B2Y + (1 << (_GRAY_SHIFT - 1))
    return y >> _GRAY_SHIFT


def to_gray(img_bgr_uint8: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """BGR uint8 image (H, W, 3) -> uint8 gray (H, W), bit-identical to ``cv2.cvtColor(img, COLOR_BGR2GRAY)``.

    Accepts a numpy array or a tensor and returns the same kind.
    """
    is_numpy = isinstance(img_bgr_uint8, np.ndarray)
    img = torch.from_numpy(img_bgr_uint8) if is_numpy else img_bgr_uint8
    if not isinstance(img, Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(
            f"to_gray expects a uint8 BGR image of shape (H, W, 3), got "
            f"{getattr(img, 'dtype', type(img))} {tuple(getattr(img, 'shape', ()))}"
        )
    gray = _gray_fixed_point(img[..., 2], img[..., 1], img[..., 0]).to(torch.uint8)
    return gray.numpy() if is_numpy else gray


def rgb_to_gray(frames: Tensor) -> Tensor:
    """uint8 RGB frames (T, 3, H, W), as the frame store keeps them -> float32 gray (T, H, W) in 0..255.

    Values equal OpenCV's 8-bit ``cvtColor`` gray of the same frames (integers in 0..255), the input that
    ``cv2.optflow.DualTVL1OpticalFlow`` sees in the usual denseflow/TSN extraction.
    """
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"rgb_to_gray expects uint8 RGB frames of shape (T, 3, H, W), got "
            f"{getattr(frames, 'dtype', type(frames))} {tuple(getattr(frames, 'shape', ()))}"
        )
    return _gray_fixed_point(frames[:, 0], frames[:, 1], frames[:, 2]).float()


# ----------------------------------------------------------------------------------------------------------
# Building blocks (all batched over the leading dimensions, images last two dims)


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """Sizes (h, w) of the pyramid levels, finest first, by OpenCV's rule.

    Each level is the previous one times ``scale_step``, rounded (``cv::resize`` with ``fx = fy =
    scale_step``); the first level narrower or shorter than 16 px and all after it are dropped.
    """
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = sizes[-1]
        # cv::resize: dsize = Size(saturate_cast<int>(w * fx), saturate_cast<int>(h * fy)), round half even
        nh, nw = round(h * scale_step), round(w * scale_step)
        if nh < MIN_LEVEL_SIZE or nw < MIN_LEVEL_SIZE:
            break
        sizes.append((nh, nw))
    return sizes


@lru_cache(maxsize=64)
def _linear_resize_matrix_np(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) matrix of OpenCV's INTER_LINEAR resize along one axis; ``scale`` = source/dest step."""
    m = np.zeros((n_out, n_in), np.float32)
    for d in range(n_out):
        x = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(x)
        a = float(x - s)
        if s < 0:
            s, a = 0, 0.0
        if s >= n_in - 1:
            s, a = n_in - 1, 0.0
        m[d, s] += 1.0 - a
        if a:
            m[d, s + 1] += a
    return m


def _resize_linear(x: Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None) -> Tensor:
    """OpenCV ``resize(INTER_LINEAR)`` of (..., H, W) to (..., h, w) as two small matrix products.

    ``scale`` is OpenCV's source-per-destination step (``1/fx``, ``1/fy``); by default the size ratio.
    """
    h_in, w_in = x.shape[-2:]
    h, w = size
    sy, sx = scale if scale is not None else (h_in / h, w_in / w)
    my = torch.from_numpy(_linear_resize_matrix_np(h_in, h, sy)).to(x.device)
    mx = torch.from_numpy(_linear_resize_matrix_np(w_in, w, sx)).to(x.device)
    return my @ x @ mx.T


def _centered_gradient(img: Tensor) -> tuple[Tensor, Tensor]:
    """Centred differences of (..., H, W); at the borders 0.5 * one-sided difference (OpenCV centeredGradient)."""
    # Replicate padding turns the border rule 0.5 * (f[1] - f[0]) into the same centred formula.
    h, w = img.shape[-2:]
    pad = F.pad(img.reshape(-1, 1, h, w), (1, 1, 1, 1), mode="replicate").reshape(*img.shape[:-2], h + 2, w + 2)
    dx = 0.5 * (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2])
    dy = 0.5 * (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1])
    return dx, dy


def _forward_gradient(u: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences of (..., H, W), zero on the last column / row (OpenCV forwardGradient)."""
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def _divergence(p1: Tensor, p2: Tensor) -> Tensor:
    """Backward-difference divergence of (p1, p2), (..., H, W), the adjoint of ``-_forward_gradient``.

    OpenCV divergence: ``p1[x] - p1[x-1] + p2[y] - p2[y-1]`` with ``p[-1] = 0``.
    """
    return (p1 - F.pad(p1[..., :, :-1], (1, 0, 0, 0))) + (p2 - F.pad(p2[..., :-1, :], (0, 0, 1, 0)))


def _batcher_network(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j) of Batcher's odd-even merge sort for ``n`` (a power of two) wires."""
    comparators = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return comparators


def _median_plan(n_in: int) -> tuple[tuple[tuple[int, int, bool, bool], ...], int, int, int]:
    """Median-selection network for ``n_in`` (odd) values: a sorting network pruned to the middle output.

    The values are padded to a power of two with ``lo`` -inf and ``hi`` +inf wires (constants, folded
    away when the network is applied) so that sorted wire ``mid`` holds the median. Each kept comparator
    is (i, j, min needed, max needed).
    """
    n = 1
    while n < n_in:
        n *= 2
    lo = (n - n_in) // 2
    hi = n - n_in - lo
    mid = lo + n_in // 2
    needed, plan = {mid}, []
    for i, j in reversed(_batcher_network(n)):
        need_i, need_j = i in needed, j in needed
        if need_i or need_j:
            plan.append((i, j, need_i, need_j))
            needed |= {i, j}
    return tuple(reversed(plan)), lo, hi, mid


_MEDIAN_PLANS = {ksize: _median_plan(ksize * ksize) for ksize in (3, 5)}


def _median_filter(u: Tensor, ksize: int) -> Tensor:
    """``cv2.medianBlur`` of (..., H, W) float with a ksize x ksize window and replicated borders.

    Elementwise min/max over the ksize^2 shifted copies (a pruned sorting network, as OpenCV's
    ``medianBlur_SortNet``); 212 min/max for 5x5, fused into one kernel under ``torch.compile``.
    """
    h, w = u.shape[-2:]
    r = ksize // 2
    padded = F.pad(u.reshape(-1, 1, h, w), (r, r, r, r), mode="replicate").reshape(*u.shape[:-2], h + 2 * r, w + 2 * r)
    return _median_of_padded(padded, ksize)


def _median_of_padded(padded: Tensor, ksize: int) -> Tensor:
    """Median over ksize x ksize windows of an already border-padded (..., H + k - 1, W + k - 1) tensor."""
    h, w = padded.shape[-2] - ksize + 1, padded.shape[-1] - ksize + 1
    plan, lo, hi, mid = _MEDIAN_PLANS[ksize]
    wires: list = [padded[..., dy:dy + h, dx:dx + w] for dy in range(ksize) for dx in range(ksize)]
    wires += [-math.inf] * lo + [math.inf] * hi
    for i, j, need_i, need_j in plan:
        a, b = wires[i], wires[j]
        if isinstance(a, float) and isinstance(b, float):
            wires[i], wires[j] = min(a, b), max(a, b)
        elif isinstance(a, float):  # a constant: -inf stays low, +inf goes high
            wires[i], wires[j] = (a, b) if a < 0 else (b, a)
        elif isinstance(b, float):
            wires[i], wires[j] = (b, a) if b < 0 else (a, b)
        else:
            wires[i] = torch.minimum(a, b) if need_i else None
            wires[j] = torch.maximum(a, b) if need_j else None
    return wires[mid]


def _warp_bicubic(images: Tensor, flow: Tensor) -> Tensor:
    """Sample (B, C, H, W) at ``x + flow`` with OpenCV's ``remap(INTER_CUBIC, BORDER_CONSTANT=0)``.

    flow: (B, 2, H, W) in pixels. Each of the 4x4 taps that falls outside the image reads 0. (OpenCV 5's
    remap interpolates at the exact float position; 4.x rounded positions to 1/32 px.)
    """
    b, _, h, w = images.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    # align_corners=True maps -1..1 onto pixel centres 0..W-1
    gx = (xs + flow[:, 0]) * (2.0 / (w - 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / (h - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


# ----------------------------------------------------------------------------------------------------------
# The inner iteration (the hot path)


def _tvl1_step(
    u: Tensor,
    p: Tensor,
    active: Tensor,
    coef: Tensor,
    grad: Tensor,
    rho_c: Tensor,
    l_t: float,
    theta: float,
    taut: float,
    scaled_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One TV-L1 iteration for every pair whose ``active`` flag is set; the others are returned unchanged.

    u: (B, C, H, W) flow (C = 2, or 3 with the illumination variable), p: (B, C, 2, H, W) dual variables,
    active: (B,) bool, coef: (B, C, H, W) data-term coefficients (I1wx, I1wy[, gamma]),
    grad: (B, 1, H, W) |grad I1w|^2, rho_c: (B, 1, H, W) constant part of the residual.
    Returns the new (u, p, active); a pair stays active while its squared update exceeds ``scaled_eps``.
    """
    # Thresholding step TH (Zach et al. eq. 11; OpenCV estimateV): three cases of the residual rho.
    rho = rho_c + (coef * u).sum(dim=1, keepdim=True)
    thresh = l_t * grad
    fi = torch.where(
        rho < -thresh,
        l_t,
        torch.where(rho > thresh, -l_t, torch.where(grad > _FLT_EPSILON, -rho / grad, 0.0)),
    )
    v = u + fi * coef
    # u = v + theta * div p (OpenCV estimateU)
    u_new = v + theta * _divergence(p[:, :, 0], p[:, :, 1])
    error = (u_new - u).square().sum(dim=(1, 2, 3))
    # Dual step (Zach et al. eq. 12; OpenCV estimateDualVariables)
    grad_u = torch.stack(_forward_gradient(u_new), dim=2)  # (B, C, 2, H, W)
    norm = 1.0 + taut * grad_u.square().sum(dim=2, keepdim=True).sqrt()
    p_new = (p + taut * grad_u) / norm
    keep = active.view(-1, 1, 1, 1)
    u_out = torch.where(keep, u_new, u)
    p_out = torch.where(keep.unsqueeze(-1), p_new, p)
    return u_out, p_out, active & (error > scaled_eps)


# Image sizes are compiled as static shapes (inductor's CPU code for symbolic H, W was ~30x slower);
# the batch dimension is dynamic, so each pyramid level compiles once for B = 1 and once for B > 1.
# Allow enough specialisations for several resolutions.
_RECOMPILE_LIMIT = 64


def _mark_shapes(tensors) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.mark_static(t, t.ndim - 1)  # positive indices: negative ones are silently ignored
        torch._dynamo.mark_static(t, t.ndim - 2)


class _Kernels:
    """The hot functions, compiled with ``torch.compile`` when ``fast`` (falling back to eager, with a
    ``RuntimeWarning``, if compilation is unavailable or fails), else the eager reference."""

    def __init__(self, fast: bool):
        self.step, self.median = _tvl1_step, _median_of_padded
        self.compiled = False
        if fast:
            try:
                limit = getattr(torch._dynamo.config, "recompile_limit", None)
                if limit is not None and limit < _RECOMPILE_LIMIT:
                    torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT
                self.step = _compiled(_tvl1_step)
                self.median = _compiled(_median_of_padded)
                self.compiled = True
            except Exception as exc:  # no inductor backend on this platform
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {exc}); TV-L1 runs eagerly",
                      RuntimeWarning, stacklevel=4)
        self.step, self.median, self.compiled = _tvl1_step, _median_of_padded, False

    def run_step(self, *args):
        if self.compiled:
            try:
                _mark_shapes(args[:6])
                return self.step(*args)
            except Exception as exc:  # inductor errors surface at the first call, e.g. no C++ compiler
                self._fall_back(exc)
        return _tvl1_step(*args)

    def run_median(self, u: Tensor, ksize: int) -> Tensor:
        if self.compiled:
            h, w = u.shape[-2:]
            r = ksize // 2
            padded = F.pad(u.reshape(-1, 1, h, w), (r, r, r, r), mode="replicate")[:, 0]
            try:
                _mark_shapes((padded,))
                return self.median(padded, ksize).reshape(u.shape)
            except Exception as exc:
                self._fall_back(exc)
        return _median_filter(u, ksize)


@lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=None, fullgraph=True)


# ----------------------------------------------------------------------------------------------------------
# One pyramid level and the full coarse-to-fine scheme


def _solve_level(I0: Tensor, I1: Tensor, u: Tensor, params: TVL1Params, kernels: _Kernels) -> Tensor:
    """Refine flow ``u`` (B, C, h, w) on one pyramid level (OpenCV procOneScale). I0, I1: (B, h, w)."""
    b, c, h, w = u.shape
    scaled_eps = float(np.float32(params.epsilon * params.epsilon * h * w))
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    # Check for convergence every iteration on CPU (cheap); on CUDA every few iterations to avoid a host
    # sync per step. Frozen pairs are masked, so this only changes wasted work, never results.
    sync_every = 1 if u.device.type == "cpu" else 5

    I1x, I1y = _centered_gradient(I1)
    I1_stack = torch.stack((I1, I1x, I1y), dim=1)  # (B, 3, h, w)
    p = u.new_zeros(b, c, 2, h, w)
    for _ in range(params.warps):
        warped = _warp_bicubic(I1_stack, u[:, :2])
        I1w, I1wx, I1wy = warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
        grad = I1wx * I1wx + I1wy * I1wy
        rho_c = I1w - I1wx * u[:, 0:1] - I1wy * u[:, 1:2] - I0.unsqueeze(1)
        coef = torch.cat((I1wx, I1wy), dim=1)
        if c == 3:
            coef = torch.cat((coef, torch.full_like(I1wx, params.gamma)), dim=1)

        active = torch.ones(b, dtype=torch.bool, device=u.device)
        for _ in range(params.outer_iterations):
            if not bool(active.any()):
                break
            if params.median_filtering > 1:
                filtered = kernels.run_median(u[:, :2], params.median_filtering)
                u = torch.cat((torch.where(active.view(-1, 1, 1, 1), filtered, u[:, :2]), u[:, 2:]), dim=1)
            for n in range(params.inner_iterations):
                if n % sync_every == 0 and n > 0 and not bool(active.any()):
                    break
                u, p, active = kernels.run_step(u, p, active, coef, grad, rho_c, l_t, params.theta, taut, scaled_eps)
    return u


def _check_images(I0: Tensor, I1: Tensor) -> tuple[Tensor, Tensor, bool]:
    for name, img in (("I0", I0), ("I1", I1)):
        if not isinstance(img, Tensor):
            raise ValueError(f"tvl1_flow: {name} must be a torch.Tensor, got {type(img).__name__}")
        if not img.dtype.is_floating_point:
            raise ValueError(
                f"tvl1_flow: {name} must be a floating-point gray image in 0..255, got dtype {img.dtype} "
                "(convert uint8 frames with rgb_to_gray or .float())"
            )
        if img.ndim not in (2, 3):
            raise ValueError(f"tvl1_flow: {name} must have shape (H, W) or (B, H, W), got {tuple(img.shape)}")
    if I0.shape != I1.shape:
        raise ValueError(f"tvl1_flow: I0 and I1 differ in shape: {tuple(I0.shape)} vs {tuple(I1.shape)}")
    if I0.device != I1.device:
        raise ValueError(f"tvl1_flow: I0 and I1 are on different devices: {I0.device} vs {I1.device}")
    unbatched = I0.ndim == 2
    if unbatched:
        I0, I1 = I0.unsqueeze(0), I1.unsqueeze(0)
    if I0.shape[0] == 0:
        raise ValueError("tvl1_flow: empty batch")
    h, w = I0.shape[-2:]
    if h < 3 or w < 3:
        raise ValueError(f"tvl1_flow: images must be at least 3x3 pixels, got {h}x{w}")
    if not bool(torch.isfinite(I0).all() & torch.isfinite(I1).all()):
        raise ValueError("tvl1_flow: input images contain NaN or infinite values")
    return I0.float(), I1.float(), unbatched


def tvl1_flow(I0: Tensor, I1: Tensor, params: TVL1Params = TVL1Params(), *, fast: bool = True) -> Tensor:
    """TV-L1 optical flow from ``I0`` to ``I1``, matching OpenCV's ``DualTVL1OpticalFlow``.

    Args:
        I0, I1: grayscale float images in the 0..255 range (as OpenCV uses 8-bit gray after conversion to
            float), shape (B, H, W) for a batch of pairs of one size, or (H, W) for one pair; CPU or CUDA.
        params: algorithm parameters (OpenCV's names and defaults).
        fast: run the inner iteration through ``torch.compile``; ``False`` runs the eager reference. If
            compilation is unavailable the eager path is used with a ``RuntimeWarning``.

    Returns:
        Flow (B, 2, H, W) float32 (or (2, H, W) for unbatched input): channel 0 is the x (column)
        displacement, channel 1 the y (row) displacement, in pixels, such that ``I0(x) ~ I1(x + flow(x))``.

    Pyramid levels smaller than 16 px in either dimension are dropped, as OpenCV does; we also warn
    (``UserWarning``) when fewer than ``params.nscales`` levels are used.

    Raises:
        ValueError: non-tensor, non-float, wrongly shaped, differently sized or NaN/inf input, or images
        smaller than 3x3.
    """
    I0, I1, unbatched = _check_images(I0, I1)
    b, h, w = I0.shape
    sizes = pyramid_sizes(h, w, params.nscales, params.scale_step)
    if len(sizes) < params.nscales:
        warnings.warn(
            f"tvl1_flow: {h}x{w} images allow only {len(sizes)} of nscales={params.nscales} pyramid levels "
            f"(levels below {MIN_LEVEL_SIZE} px are dropped, as in OpenCV)",
            UserWarning,
            stacklevel=2,
        )
    kernels = _Kernels(fast)
    inv = 1.0 / params.scale_step
    I0s, I1s = [I0], [I1]
    for size in sizes[1:]:
        I0s.append(_resize_linear(I0s[-1], size, (inv, inv)))
        I1s.append(_resize_linear(I1s[-1], size, (inv, inv)))

    channels = 3 if params.gamma != 0 else 2
    u = I0.new_zeros(b, channels, *sizes[-1])
    for level in range(len(sizes) - 1, -1, -1):
        u = _solve_level(I0s[level], I1s[level], u, params, kernels)
        if level == 0:
            break
        u = _resize_linear(u, sizes[level - 1])
        # Scale the displacement (not the illumination channel) to the finer grid.
        u = torch.cat((u[:, :2] * inv, u[:, 2:]), dim=1)
    flow = u[:, :2].contiguous()
    return flow[0] if unbatched else flow


# ----------------------------------------------------------------------------------------------------------
# OpenCV reference backend


def opencv_tvl1_flow(I0_gray_u8: np.ndarray, I1_gray_u8: np.ndarray, params: TVL1Params = TVL1Params()) -> np.ndarray:
    """Flow from OpenCV's CPU ``cv2.optflow.DualTVL1OpticalFlow`` with the same parameters: (2, H, W) float32.

    I0_gray_u8, I1_gray_u8: (H, W) uint8 gray images (e.g. from ``to_gray``). Also the ``--backend opencv``
    fallback of the flow stage.
    """
    import cv2

    for name, img in (("I0_gray_u8", I0_gray_u8), ("I1_gray_u8", I1_gray_u8)):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(
                f"opencv_tvl1_flow: {name} must be a (H, W) uint8 numpy array, got "
                f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}"
            )
    if I0_gray_u8.shape != I1_gray_u8.shape:
        raise ValueError(f"opencv_tvl1_flow: images differ in shape: {I0_gray_u8.shape} vs {I1_gray_u8.shape}")
    # Positional arguments: the Python binding spells one keyword "innnerIterations" (OpenCV 4.x/5.0).
    # A new object per call: OpenCV's calc() lowers its own nscales when an image is too small.
    algo = cv2.optflow.DualTVL1OpticalFlow_create(
        params.tau, params.lambda_, params.theta, params.nscales, params.warps, params.epsilon,
        params.inner_iterations, params.outer_iterations, params.scale_step, params.gamma,
        params.median_filtering, False,
    )
    flow = algo.calc(I0_gray_u8, I1_gray_u8, None)  # (H, W, 2)
    return np.ascontiguousarray(flow.transpose(2, 0, 1))
