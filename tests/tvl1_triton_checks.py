"""Checks of the Triton TV-L1 iteration under Triton's CPU interpreter; run by tests/test_tvl1_triton.py in a
subprocess with TRITON_INTERPRET=1 (the interpreter must be on before triton is first imported: triton.jit
decorates its own library functions, tl.sum included, at import). Not collected by the main run (the name
does not start with test_). Sizes are tiny because the interpreter executes every program in numpy.
"""
import os

import numpy as np
import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_tvl1_triton.py (TRITON_INTERPRET=1)"

from pipeline.flow import tvl1 as T  # noqa: E402
from pipeline.flow import tvl1_triton  # noqa: E402
from pipeline.flow.tvl1 import TVL1Params, tvl1_flow  # noqa: E402


@pytest.fixture
def interpreted():
    return tvl1_triton


def _args(u, p, coef, grad, rho_c, active, prm=TVL1Params()):
    h, w = u.shape[-2:]
    scaled_eps = float(np.float32(prm.epsilon * prm.epsilon * h * w))
    return (u, p, active, coef, grad, rho_c, prm.lambda_ * prm.theta, prm.theta, prm.tau / prm.theta, scaled_eps)


def _random_args(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, c, h, w, generator=g)
    p = torch.randn(b, c, 2, h, w, generator=g) * 0.2
    coef = torch.randn(b, c, h, w, generator=g) * 5
    if c == 3:
        coef[:, 2] = 0.1  # gamma
    grad = (coef[:, :2] * coef[:, :2]).sum(1, keepdim=True)
    grad[:, :, 0, :3] = 0  # the "gradient is zero" branch
    rho_c = torch.randn(b, 1, h, w, generator=g) * 3
    return u, p, coef, grad, rho_c


def _real_level_inputs(shared_data, size=(40, 30)):
    """coef, grad, rho_c of the first warp of a real pair (u = 0), as _solve_level builds them."""
    import cv2

    frames = []
    cap = cv2.VideoCapture(str(shared_data / "clips" / "ucf101" / "v_BaseballPitch_g01_c01.avi"))
    for _ in range(2):
        ok, frame = cap.read()
        assert ok
        frames.append(T.to_gray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)))
    cap.release()
    I0, I1 = (torch.from_numpy(f).float()[None] for f in frames)
    I1x, I1y = T._centered_gradient(I1)
    u = torch.zeros(1, 2, *I0.shape[1:])
    warped = T._warp_bicubic(torch.stack((I1, I1x, I1y), dim=1), u)
    I1w, I1wx, I1wy = warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
    return I0, I1, torch.cat((I1wx, I1wy), 1), I1wx * I1wx + I1wy * I1wy, I1w - I0.unsqueeze(1)


@pytest.mark.parametrize("c", [2, 3])
def test_one_step_matches_eager_on_random_input(interpreted, c):
    u, p, coef, grad, rho_c = _random_args(3, c, 9, 13, seed=c)
    active = torch.tensor([True, False, True])
    args = _args(u, p, coef, grad, rho_c, active)
    ref = T._tvl1_step(*args)
    out = interpreted.triton_step(*args)
    for name, a, b in zip(("u", "p"), out[:2], ref[:2]):
        assert (a - b).abs().max().item() <= 1e-5, name
    torch.testing.assert_close(out[0][1], u[1], rtol=0, atol=0)  # inactive pair untouched
    assert torch.equal(out[2], ref[2])


def test_one_step_matches_eager_on_real_input(interpreted, shared_data):
    _, _, coef, grad, rho_c = _real_level_inputs(shared_data)
    g = torch.Generator().manual_seed(11)
    u = torch.randn(1, 2, *coef.shape[-2:], generator=g) * 0.5
    p = torch.randn(1, 2, 2, *coef.shape[-2:], generator=g) * 0.1
    args = _args(u, p, coef, grad, rho_c, torch.tensor([True]))
    for a, b in zip(interpreted.triton_step(*args)[:2], T._tvl1_step(*args)[:2]):
        assert (a - b).abs().max().item() <= 1e-5


def test_device_side_stopping_matches_eager_iteration_counts(interpreted, shared_data):
    """One warp of a real pair and a random pair, from u = 0: the same iterations per pair as the eager loop."""
    _, _, coef, grad, rho_c = _real_level_inputs(shared_data)
    _, _, rcoef, rgrad, rrho = _random_args(1, 2, *coef.shape[-2:], seed=12)
    coef, grad, rho_c = torch.cat((coef, rcoef)), torch.cat((grad, rgrad)), torch.cat((rho_c, rrho))
    u = torch.zeros(2, 2, *coef.shape[-2:])
    p = torch.zeros(2, 2, 2, *coef.shape[-2:])
    params = TVL1Params(outer_iterations=3, inner_iterations=30)
    h, w = coef.shape[-2:]
    eps = float(np.float32(params.epsilon ** 2 * h * w))
    counts = {}
    for name, fn in (("eager", T._iterate_warp), ("triton", interpreted.iterate_warp)):
        stats = T._Stats(2, "cpu")
        uo, po = fn(u, p, coef, grad, rho_c, params, T._Kernels("eager"), eps, stats)
        counts[name] = (stats.pair_iterations.tolist(), uo, po)
    assert counts["triton"][0] == counts["eager"][0]
    assert counts["eager"][0][0] < params.outer_iterations * params.inner_iterations  # pair 0 stopped early
    assert (counts["triton"][1] - counts["eager"][1]).abs().max().item() < 1e-3


def test_small_pair_whole_flow_matches_eager(interpreted, shared_data):
    I0, I1, *_ = _real_level_inputs(shared_data, size=(32, 24))
    params = TVL1Params(nscales=2, warps=2, outer_iterations=3)
    s_eager, s_triton = {}, {}
    eager = tvl1_flow(I0, I1, params, kernel="eager", stats=s_eager)
    ours = tvl1_flow(I0, I1, params, kernel="triton", stats=s_triton)
    assert s_triton["kernel"] == "triton"
    epe = torch.sqrt(((ours - eager) ** 2).sum(1)).mean().item()
    assert epe < 0.02, epe
    assert (ours - eager).abs().max().item() < 1e-3  # measured 6e-6
    assert torch.equal(s_triton["pair_iterations"], s_eager["pair_iterations"])
