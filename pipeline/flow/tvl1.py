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

Batched: all pairs of a batch share every kernel launch; a pair that has met the stopping rule leaves the
working tensors at the next convergence check (frozen by masks until then), so a batch costs the sum of its
pairs' iterations and a pair's result does not depend on which other pairs share its batch.

``kernel="compile"`` (the CPU default) runs the inner iteration and the median through ``torch.compile``
(on CPU inductor emits ~6 C++/OpenMP loops per step instead of ~40 elementwise passes); ``kernel="triton"``
(the CUDA default) runs a hand-fused Triton iteration with device-side stopping (``tvl1_triton``);
``kernel="eager"`` (or ``fast=False``) is the plain eager reference.
"""
from __future__ import annotations

import math
import types
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
    "resolve_kernel",
    "KERNELS",
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
    my, mxt = _resize_matrices(h_in, w_in, h, w, sy, sx, x.device)
    return my @ x @ mxt


@lru_cache(maxsize=128)
def _resize_matrices(h_in: int, w_in: int, h: int, w: int, sy: float, sx: float,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """The two resize matrices (rows, columns transposed), built and copied to ``device`` once per size."""
    my = torch.from_numpy(_linear_resize_matrix_np(h_in, h, sy)).to(device)
    mxt = torch.from_numpy(_linear_resize_matrix_np(w_in, w, sx)).T.contiguous().to(device)
    return my, mxt


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


KERNELS = ("auto", "triton", "compile", "eager")


def _mark_shapes(tensors) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.mark_static(t, t.ndim - 1)  # positive indices: negative ones are silently ignored
        torch._dynamo.mark_static(t, t.ndim - 2)


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """The kernel that ``kernel`` selects on ``device``: ``auto`` is ``triton`` on CUDA when Triton imports,
    else ``compile``. Raises ValueError for an unknown name or ``triton`` without CUDA or Triton (the CPU
    interpreter, ``TRITON_INTERPRET=1``, is allowed for tests)."""
    if kernel not in KERNELS:
        raise ValueError(f"tvl1_flow: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    device = torch.device(device)
    if kernel == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "compile"
    if kernel == "triton":
        if not _triton_available():
            raise ValueError("tvl1_flow: kernel='triton' needs the triton package, which does not import here")
        if device.type != "cuda" and not _triton_interpreted():
            raise ValueError(f"tvl1_flow: kernel='triton' runs on CUDA (or on CPU under TRITON_INTERPRET=1), "
                             f"the images are on {device}")
    return kernel


@lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Kernels:
    """The hot functions: ``compile`` runs them through ``torch.compile``, one compiled copy per image shape
    (so each shape has its own recompile limit: see ``_compiled``), falling back to eager for a shape, with
    a ``RuntimeWarning`` naming the cause, if compilation fails; ``eager`` is the reference; ``triton``
    uses ``tvl1_triton`` for the inner iterations."""

    def __init__(self, mode: str, device: torch.device | str = "cpu"):
        self.mode = mode
        # The Triton path on CUDA still runs the median through torch.compile (212 min/max in one kernel).
        self.compiled = mode == "compile" or (mode == "triton" and torch.device(device).type == "cuda")
        self._failed: set = set()

    def _fall_back(self, key, exc: Exception) -> None:
        self._failed.add(key)
        if type(exc).__name__ == "FailOnRecompileLimitHit":
            cause = "torch.compile hit its recompile limit"
        else:
            cause = "torch.compile failed"
        warnings.warn(f"{cause} for TV-L1 {key[0]} at shape {key[1:]} ({type(exc).__name__}: {exc}); this shape "
                      "runs eagerly", RuntimeWarning, stacklevel=4)

    def _call(self, fn, eager, key, args, marked):
        if self.compiled and key not in self._failed:
            try:
                compiled = _compiled(fn, key)
                _mark_shapes(marked)
                return compiled(*args)
            except Exception as exc:  # inductor errors surface at the first call, e.g. no C++ compiler
                self._fall_back(key, exc)
        return eager(*args)

    def run_step(self, *args):
        return self._call(_tvl1_step, _tvl1_step, ("step", *args[0].shape[1:]), args, args[:6])

    def run_median(self, u: Tensor, ksize: int) -> Tensor:
        if not self.compiled:
            return _median_filter(u, ksize)
        h, w = u.shape[-2:]
        r = ksize // 2
        padded = F.pad(u.reshape(-1, 1, h, w), (r, r, r, r), mode="replicate")[:, 0]
        key = ("median", ksize, h, w)
        if key in self._failed:
            return _median_filter(u, ksize)
        return self._call(_median_of_padded, lambda x, k: _median_filter(u, k), key, (padded, ksize),
                          (padded,)).reshape(u.shape)


@lru_cache(maxsize=None)
def _compiled(fn, key):
    """``torch.compile`` of a copy of ``fn`` with its own code object, one per ``key`` (function, image shape).

    Dynamo keeps its compiled graphs and counts recompilations per code object: with one shared code object
    every frame size of every pyramid level added graphs to one list, and the 7th distinct frame size hit
    the recompile limit (``FailOnRecompileLimitHit`` under ``fullgraph=True``). A copy per shape holds only
    that shape's few graphs (B = 1 and dynamic B), within the default limit, and its guards stay short.
    """
    name = f"{fn.__name__}__{'_'.join(map(str, key[1:]))}"
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, dynamic=None, fullgraph=True)


# ----------------------------------------------------------------------------------------------------------
# One pyramid level and the full coarse-to-fine scheme


class _Stats:
    """Work counters of one ``tvl1_flow`` call (``stats=`` dict): per-pair iterations and rows processed."""

    def __init__(self, b: int, device):
        self.pair_iterations = torch.zeros(b, dtype=torch.int64, device=device)
        self.rows = 0  # sum over inner steps of the pairs in the working tensors
        self.steps = 0


def _iterate_warp(u: Tensor, p: Tensor, coef: Tensor, grad: Tensor, rho_c: Tensor, params: TVL1Params,
                  kernels: _Kernels, scaled_eps: float, stats: _Stats | None) -> tuple[Tensor, Tensor]:
    """The outer (median) and inner iterations of one warp for all pairs; returns the new (u, p).

    Converged pairs leave the working tensors at each convergence check (every iteration on CPU, every few on
    CUDA, where a check is a host sync), so a batch costs the sum of its pairs' iterations, not B times the
    slowest; between checks a converged pair is frozen by its ``active`` flag. Each pair's arithmetic only
    reads its own rows, so its flow does not depend on its batch mates.
    """
    b = u.shape[0]
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    sync_every = 1 if u.device.type == "cpu" else 5
    u_out, p_out = u.clone(), p.clone()
    idx = torch.arange(b, device=u.device)  # original pair index of each working row
    active = torch.ones(b, dtype=torch.bool, device=u.device)
    wu, wp, wcoef, wgrad, wrho = u, p, coef, grad, rho_c

    def compact():
        nonlocal idx, active, wu, wp, wcoef, wgrad, wrho
        keep = active.nonzero().squeeze(1)  # the host sync
        n = keep.numel()
        if n == idx.numel():
            return n
        drop = (~active).nonzero().squeeze(1)
        u_out.index_copy_(0, idx[drop], wu[drop])
        p_out.index_copy_(0, idx[drop], wp[drop])
        idx, active = idx[keep], active[keep]
        wu, wp, wcoef, wgrad, wrho = (t[keep] for t in (wu, wp, wcoef, wgrad, wrho))
        return n

    for _ in range(params.outer_iterations):
        if compact() == 0:
            break
        if params.median_filtering > 1:  # every working pair is active here
            wu = torch.cat((kernels.run_median(wu[:, :2], params.median_filtering), wu[:, 2:]), dim=1)
        for n in range(params.inner_iterations):
            if n % sync_every == 0 and n > 0 and compact() == 0:
                break
            if stats is not None:
                stats.pair_iterations.index_add_(0, idx, active.long())
                stats.rows += idx.numel()
                stats.steps += 1
            wu, wp, active = kernels.run_step(wu, wp, active, wcoef, wgrad, wrho, l_t, params.theta, taut,
                                              scaled_eps)
    u_out.index_copy_(0, idx, wu)
    p_out.index_copy_(0, idx, wp)
    return u_out, p_out


def _solve_level(I0: Tensor, I1: Tensor, u: Tensor, params: TVL1Params, kernels: _Kernels,
                 stats: _Stats | None = None) -> Tensor:
    """Refine flow ``u`` (B, C, h, w) on one pyramid level (OpenCV procOneScale). I0, I1: (B, h, w)."""
    b, c, h, w = u.shape
    scaled_eps = float(np.float32(params.epsilon * params.epsilon * h * w))
    if kernels.mode == "triton":
        from pipeline.flow.tvl1_triton import iterate_warp
    else:
        iterate_warp = _iterate_warp

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
        u, p = iterate_warp(u, p, coef, grad, rho_c, params, kernels, scaled_eps, stats)
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


def tvl1_flow(I0: Tensor, I1: Tensor, params: TVL1Params = TVL1Params(), *, fast: bool = True,
              kernel: str = "auto", stats: dict | None = None) -> Tensor:
    """TV-L1 optical flow from ``I0`` to ``I1``, matching OpenCV's ``DualTVL1OpticalFlow``.

    Args:
        I0, I1: grayscale float images in the 0..255 range (as OpenCV uses 8-bit gray after conversion to
            float), shape (B, H, W) for a batch of pairs of one size, or (H, W) for one pair; CPU or CUDA.
        params: algorithm parameters (OpenCV's names and defaults).
        fast: ``False`` runs the eager reference (the same as ``kernel="eager"``).
        kernel: ``auto`` (``triton`` on CUDA when Triton imports, else ``compile``), ``triton`` (the fused
            Triton iteration of ``tvl1_triton``, device-side stopping), ``compile`` (``torch.compile``; a
            shape whose compilation fails runs eagerly with a ``RuntimeWarning`` naming the cause) or
            ``eager``. All give the eager reference's results up to float rounding.
        stats: if a dict, filled with the work done: ``pair_iterations`` (B,) int64 inner iterations per
            pair (all levels and warps), ``rows`` (pair-iterations processed, including frozen pairs still in
            the working tensors), ``steps`` (inner-step launches) and ``kernel`` (the one used).

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
    if not fast:
        if kernel not in ("auto", "eager"):
            raise ValueError(f"tvl1_flow: fast=False is the eager reference, but kernel={kernel!r} was given")
        kernel = "eager"
    mode = resolve_kernel(kernel, I0.device)
    sizes = pyramid_sizes(h, w, params.nscales, params.scale_step)
    if len(sizes) < params.nscales:
        warnings.warn(
            f"tvl1_flow: {h}x{w} images allow only {len(sizes)} of nscales={params.nscales} pyramid levels "
            f"(levels below {MIN_LEVEL_SIZE} px are dropped, as in OpenCV)",
            UserWarning,
            stacklevel=2,
        )
    kernels = _Kernels(mode, I0.device)
    counters = _Stats(b, I0.device) if stats is not None else None
    inv = 1.0 / params.scale_step
    I0s, I1s = [I0], [I1]
    for size in sizes[1:]:
        I0s.append(_resize_linear(I0s[-1], size, (inv, inv)))
        I1s.append(_resize_linear(I1s[-1], size, (inv, inv)))

    channels = 3 if params.gamma != 0 else 2
    u = I0.new_zeros(b, channels, *sizes[-1])
    for level in range(len(sizes) - 1, -1, -1):
        u = _solve_level(I0s[level], I1s[level], u, params, kernels, counters)
        if level == 0:
            break
        u = _resize_linear(u, sizes[level - 1])
        # Scale the displacement (not the illumination channel) to the finer grid.
        u = torch.cat((u[:, :2] * inv, u[:, 2:]), dim=1)
    flow = u[:, :2].contiguous()
    if counters is not None:
        stats.update(pair_iterations=counters.pair_iterations.cpu(), rows=counters.rows, steps=counters.steps,
                     kernel=mode)
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
