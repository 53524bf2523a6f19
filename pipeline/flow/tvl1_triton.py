"""One TV-L1 inner iteration as one Triton kernel, with the convergence test on the device.

``tvl1_flow(..., kernel="triton")`` (the default on CUDA) runs the inner iterations of every warp here; the
rest of the algorithm (pyramid, warping, median filter) is ``tvl1.py``'s. The arithmetic is that of the
eager reference ``tvl1._tvl1_step`` (OpenCV's ``estimateV`` / ``estimateU`` / ``estimateDualVariables``), in
fp32:

* ``_step_kernel``, one program per (block of ``BLOCK`` pixels, pair): the thresholding step, the primal step
  ``u_new = v + theta div p`` and the dual step ``p = (p + taut grad u_new) / (1 + taut |grad u_new|)`` in one
  pass. The forward gradient needs ``u_new`` at the right and lower neighbours; they are recomputed in the
  same program instead of a second pass over memory. Each program writes its block's sum of
  ``|u_new - u|^2`` to ``partial[pair, block]``. Programs of a converged pair return before loading.
* ``_finish_kernel``, one program per pair: sums the pair's partials in a fixed order (deterministic: a
  pair's error, hence its stopping and its flow, never depends on its batch mates), flips the pair's
  buffer parity and counts its iteration if it was active, and clears its ``active`` flag once
  ``error <= epsilon^2 h w`` (OpenCV's rule, as the eager path).
* ``u`` and ``p`` live in ping-pong buffers (2, B, ...) with a parity per pair: an active pair reads buffer
  ``parity`` and writes the other; a converged pair is never touched, so nothing is copied for it.

The host launches the two kernels per inner iteration without reading anything back; it syncs once per
outer iteration (to skip the rest of a warp when every pair has converged) and for the median filter.

Tested on CPU under ``TRITON_INTERPRET=1`` (tests/test_tvl1_triton.py): one step against the eager step,
the device-side stopping against the eager stopping (same iteration counts per pair), and whole flows.
GPU speed: unmeasured (no GPU was available to the session that wrote it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


__all__ = ["triton_step", "iterate_warp"]

# std::numeric_limits<float>::epsilon(), as tvl1._FLT_EPSILON
_FLT_EPSILON = tl.constexpr(1.1920928955078125e-07)


@triton.jit
def _u_new_at(u_ptr, p_ptr, coef_ptr, grad_ptr, rho_ptr, q, m, x, y, W, HW, l_t, theta, C: tl.constexpr):
    """u_new (channels 0, 1, 2; 2 is 0 unless C == 3) and u at the flat pixel indices ``q`` of one pair.

    u_ptr: the pair's u (C, HW), p_ptr: its p (C, 2, HW), coef_ptr (C, HW), grad_ptr and rho_ptr (HW).
    """
    g = tl.load(grad_ptr + q, mask=m, other=0.0)
    rc = tl.load(rho_ptr + q, mask=m, other=0.0)
    u0 = tl.load(u_ptr + q, mask=m, other=0.0)
    u1 = tl.load(u_ptr + HW + q, mask=m, other=0.0)
    c0 = tl.load(coef_ptr + q, mask=m, other=0.0)
    c1 = tl.load(coef_ptr + HW + q, mask=m, other=0.0)
    u2 = u0 * 0.0
    c2 = u0 * 0.0
    s = c0 * u0 + c1 * u1
    if C == 3:
        u2 = tl.load(u_ptr + 2 * HW + q, mask=m, other=0.0)
        c2 = tl.load(coef_ptr + 2 * HW + q, mask=m, other=0.0)
        s = s + c2 * u2
    rho = rc + s
    thresh = l_t * g
    safe_g = tl.where(g > _FLT_EPSILON, g, 1.0)
    fi = tl.where(rho < -thresh, l_t, tl.where(rho > thresh, -l_t, tl.where(g > _FLT_EPSILON, -rho / safe_g, 0.0)))
    ml = m & (x > 0)
    mu = m & (y > 0)
    # div p_c = (p1[x] - p1[x-1]) + (p2[y] - p2[y-1]), p[-1] = 0 (backward differences)
    d0 = (tl.load(p_ptr + q, mask=m, other=0.0) - tl.load(p_ptr + q - 1, mask=ml, other=0.0)) + (
        tl.load(p_ptr + HW + q, mask=m, other=0.0) - tl.load(p_ptr + HW + q - W, mask=mu, other=0.0))
    d1 = (tl.load(p_ptr + 2 * HW + q, mask=m, other=0.0) - tl.load(p_ptr + 2 * HW + q - 1, mask=ml, other=0.0)) + (
        tl.load(p_ptr + 3 * HW + q, mask=m, other=0.0) - tl.load(p_ptr + 3 * HW + q - W, mask=mu, other=0.0))
    n0 = (u0 + fi * c0) + theta * d0
    n1 = (u1 + fi * c1) + theta * d1
    n2 = u0 * 0.0
    if C == 3:
        d2 = (tl.load(p_ptr + 4 * HW + q, mask=m, other=0.0) - tl.load(p_ptr + 4 * HW + q - 1, mask=ml, other=0.0)) + (
            tl.load(p_ptr + 5 * HW + q, mask=m, other=0.0) - tl.load(p_ptr + 5 * HW + q - W, mask=mu, other=0.0))
        n2 = (u2 + fi * c2) + theta * d2
    return n0, n1, n2, u0, u1, u2


@triton.jit
def _step_kernel(U, P, COEF, GRAD, RHO, PARITY, ACTIVE, PARTIAL, B, H, W, NBLK, l_t, theta, taut,
                 C: tl.constexpr, BLOCK: tl.constexpr):
    """One inner iteration for block ``program_id(0)`` of pair ``program_id(1)`` (see the module docstring)."""
    blk = tl.program_id(0)
    pair = tl.program_id(1)
    act = tl.load(ACTIVE + pair)
    if act == 0:
        return
    par = tl.load(PARITY + pair)
    HW = H * W
    src_u = U + (par * B + pair) * (C * HW)
    dst_u = U + ((1 - par) * B + pair) * (C * HW)
    src_p = P + (par * B + pair) * (2 * C * HW)
    dst_p = P + ((1 - par) * B + pair) * (2 * C * HW)
    coef = COEF + pair * (C * HW)
    grad = GRAD + pair * HW
    rho = RHO + pair * HW
    q = blk * BLOCK + tl.arange(0, BLOCK)
    m = q < HW
    y = q // W
    x = q - y * W
    a0, a1, a2, u0, u1, u2 = _u_new_at(src_u, src_p, coef, grad, rho, q, m, x, y, W, HW, l_t, theta, C)
    mr = m & (x < W - 1)
    r0, r1, r2, _r0, _r1, _r2 = _u_new_at(src_u, src_p, coef, grad, rho, q + 1, mr, x + 1, y, W, HW, l_t, theta, C)
    md = m & (y < H - 1)
    b0, b1, b2, _b0, _b1, _b2 = _u_new_at(src_u, src_p, coef, grad, rho, q + W, md, x, y + 1, W, HW, l_t, theta, C)

    e0 = a0 - u0
    e1 = a1 - u1
    err = e0 * e0 + e1 * e1
    if C == 3:
        e2 = a2 - u2
        err = err + e2 * e2
    err = tl.where(m, err, 0.0)
    tl.store(PARTIAL + pair * NBLK + blk, tl.sum(err, axis=0))

    tl.store(dst_u + q, a0, mask=m)
    tl.store(dst_u + HW + q, a1, mask=m)
    # forward differences, 0 on the last column / row
    ux = tl.where(mr, r0 - a0, 0.0)
    uy = tl.where(md, b0 - a0, 0.0)
    norm = 1.0 + taut * tl.sqrt(ux * ux + uy * uy)
    tl.store(dst_p + q, (tl.load(src_p + q, mask=m, other=0.0) + taut * ux) / norm, mask=m)
    tl.store(dst_p + HW + q, (tl.load(src_p + HW + q, mask=m, other=0.0) + taut * uy) / norm, mask=m)
    ux = tl.where(mr, r1 - a1, 0.0)
    uy = tl.where(md, b1 - a1, 0.0)
    norm = 1.0 + taut * tl.sqrt(ux * ux + uy * uy)
    tl.store(dst_p + 2 * HW + q, (tl.load(src_p + 2 * HW + q, mask=m, other=0.0) + taut * ux) / norm, mask=m)
    tl.store(dst_p + 3 * HW + q, (tl.load(src_p + 3 * HW + q, mask=m, other=0.0) + taut * uy) / norm, mask=m)
    if C == 3:
        tl.store(dst_u + 2 * HW + q, a2, mask=m)
        ux = tl.where(mr, r2 - a2, 0.0)
        uy = tl.where(md, b2 - a2, 0.0)
        norm = 1.0 + taut * tl.sqrt(ux * ux + uy * uy)
        tl.store(dst_p + 4 * HW + q, (tl.load(src_p + 4 * HW + q, mask=m, other=0.0) + taut * ux) / norm, mask=m)
        tl.store(dst_p + 5 * HW + q, (tl.load(src_p + 5 * HW + q, mask=m, other=0.0) + taut * uy) / norm, mask=m)


@triton.jit
def _finish_kernel(ACTIVE, PARITY, ITERS, PARTIAL, NBLK, scaled_eps, BLOCK_N: tl.constexpr):
    """Per pair: the error from the partial sums (fixed order), parity flip, iteration count, stopping test."""
    pair = tl.program_id(0)
    act = tl.load(ACTIVE + pair)
    if act == 0:
        return
    offs = tl.arange(0, BLOCK_N)
    err = tl.sum(tl.load(PARTIAL + pair * NBLK + offs, mask=offs < NBLK, other=0.0), axis=0)
    tl.store(PARITY + pair, 1 - tl.load(PARITY + pair))
    tl.store(ITERS + pair, tl.load(ITERS + pair) + 1)
    tl.store(ACTIVE + pair, (err > scaled_eps).to(tl.int32))


# ----------------------------------------------------------------------------------------------------------
# Host side


def _block(hw: int) -> int:
    return min(1024, triton.next_power_of_2(hw))


class _State:
    """Ping-pong buffers and per-pair flags of one warp's iterations (all on the images' device)."""

    def __init__(self, u: Tensor, p: Tensor, coef: Tensor, grad: Tensor, rho_c: Tensor, active: Tensor | None = None):
        b, c, h, w = u.shape
        self.b, self.c, self.h, self.w = b, c, h, w
        self.U = torch.empty((2, b, c, h, w), dtype=torch.float32, device=u.device)
        self.P = torch.empty((2, b, c, 2, h, w), dtype=torch.float32, device=u.device)
        self.U[0] = u
        self.P[0] = p
        self.coef, self.grad, self.rho = (t.contiguous().float() for t in (coef, grad, rho_c))
        self.parity = torch.zeros(b, dtype=torch.int32, device=u.device)
        self.active = (torch.ones(b, dtype=torch.int32, device=u.device) if active is None
                       else active.to(torch.int32).contiguous())
        self.iters = torch.zeros(b, dtype=torch.int32, device=u.device)
        self.block = _block(h * w)
        self.nblk = triton.cdiv(h * w, self.block)
        self.partial = torch.zeros((b, self.nblk), dtype=torch.float32, device=u.device)
        self.rows = torch.arange(b, device=u.device)

    def step(self, l_t: float, theta: float, taut: float, scaled_eps: float) -> None:
        """One inner iteration of every active pair: two launches, no host sync."""
        _step_kernel[(self.nblk, self.b)](
            self.U, self.P, self.coef, self.grad, self.rho, self.parity, self.active, self.partial,
            self.b, self.h, self.w, self.nblk, float(l_t), float(theta), float(taut),
            C=self.c, BLOCK=self.block)
        _finish_kernel[(self.b,)](self.active, self.parity, self.iters, self.partial, self.nblk, float(scaled_eps),
                                  BLOCK_N=triton.next_power_of_2(self.nblk))

    def current(self) -> tuple[Tensor, Tensor]:
        """(u, p) as (B, C, H, W), (B, C, 2, H, W): each pair's buffer by its parity."""
        par = self.parity.long()
        return self.U[par, self.rows], self.P[par, self.rows]

    def set_u(self, u: Tensor) -> None:
        self.U[self.parity.long(), self.rows] = u


def triton_step(u: Tensor, p: Tensor, active: Tensor, coef: Tensor, grad: Tensor, rho_c: Tensor, l_t: float,
                theta: float, taut: float, scaled_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``tvl1._tvl1_step`` through the Triton kernels (same arguments and results; for tests)."""
    st = _State(u.float(), p.float(), coef, grad, rho_c, active)
    st.step(l_t, theta, taut, scaled_eps)
    u_out, p_out = st.current()
    return u_out, p_out, st.active.bool()


def iterate_warp(u: Tensor, p: Tensor, coef: Tensor, grad: Tensor, rho_c: Tensor, params, kernels,
                 scaled_eps: float, stats=None) -> tuple[Tensor, Tensor]:
    """``tvl1._iterate_warp`` with device-side stopping: the outer (median) and inner iterations of one warp.

    Each inner iteration is two kernel launches that read the per-pair ``active`` flags on the device; the
    host syncs once per outer iteration (all converged?) and applies the median filter to the active pairs.
    """
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    st = _State(u, p, coef, grad, rho_c)
    launches = 0
    for outer in range(params.outer_iterations):
        if outer > 0 and not bool(st.active.any()):
            break
        if params.median_filtering > 1:
            cur, _ = st.current()
            filtered = kernels.run_median(cur[:, :2], params.median_filtering)
            keep = st.active.bool().view(-1, 1, 1, 1)
            st.set_u(torch.cat((torch.where(keep, filtered, cur[:, :2]), cur[:, 2:]), dim=1))
        for _ in range(params.inner_iterations):
            st.step(l_t, params.theta, taut, scaled_eps)
            launches += 1
    if stats is not None:
        stats.pair_iterations += st.iters.long()
        stats.rows += int(st.iters.sum())  # converged pairs' programs return at once: no work for them
        stats.steps += launches
    return st.current()
