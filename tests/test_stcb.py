"""STCB ([STPN] §3.1, Algorithm 1) against the Tensor Sketch definition, and its heads."""

import io

import numpy as np
import pytest
import torch

from pipeline.models.stcb import CompactBilinear, STCBHead, STCBTemporalHead, _neighbour_paths



def _buffers(op, i):
    return getattr(op, f"h{i}").numpy(), getattr(op, f"s{i}").numpy()


def test_matches_count_sketch_of_outer_product():
    # Pham & Pagh: circular convolution of count sketches = count sketch of the outer product
    # with hash (h1(i) + h2(j)) mod d and sign s1(i) s2(j). Reference by explicit loops.
    torch.manual_seed(0)
    p, q, d = 6, 5, 16
    op = CompactBilinear([p, q], d, seed=3)
    x, y = torch.randn(2, p, dtype=torch.float64), torch.randn(2, q, dtype=torch.float64)
    got = op(x.float(), y.float()).numpy()
    (h1, s1), (h2, s2) = _buffers(op, 0), _buffers(op, 1)
    for b in range(2):
        ref = np.zeros(d)
        for i in range(p):
            for j in range(q):
                ref[(h1[i] + h2[j]) % d] += s1[i] * s2[j] * x[b, i].item() * y[b, j].item()
        np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-5)


def test_three_inputs_match_reference():
    p, d = 4, 8
    op = CompactBilinear([p, p, p], d, seed=1)
    xs = [torch.randn(p, dtype=torch.float64) for _ in range(3)]
    got = op(*[x.float() for x in xs]).numpy()
    hs = [_buffers(op, i) for i in range(3)]
    ref = np.zeros(d)
    for i in range(p):
        for j in range(p):
            for k in range(p):
                idx = (hs[0][0][i] + hs[1][0][j] + hs[2][0][k]) % d
                ref[idx] += hs[0][1][i] * hs[1][1][j] * hs[2][1][k] * float(xs[0][i] * xs[1][j] * xs[2][k])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_inner_product_unbiased_over_sketch_draws():
    # E_{h,s}[<Phi(x,y), Phi(x',y')>] = <x,x'><y,y'> (Tensor Sketch). Fixed seeds make the
    # test deterministic; the tolerance is 4 standard errors of the mean over the draws, and
    # the standard error is checked to be small against the true value so the test has power.
    g = torch.Generator().manual_seed(0)
    p, d, draws = 16, 256, 300
    x, y = torch.randn(p, generator=g), torch.randn(p, generator=g)
    x2 = x + 0.5 * torch.randn(p, generator=g)
    y2 = y + 0.5 * torch.randn(p, generator=g)
    truth = float(x @ x2) * float(y @ y2)
    est = []
    for seed in range(draws):
        op = CompactBilinear([p, p], d, seed=seed)
        est.append(float(op(x, y).double() @ op(x2, y2).double()))
    est = np.asarray(est)
    se = est.std(ddof=1) / np.sqrt(draws)
    assert se < 0.05 * abs(truth)
    assert abs(est.mean() - truth) < 4 * se


def test_sketch_buffers_survive_state_dict_round_trip():
    a = STCBHead(3, 8, 8, 2, stcb_dim=32, seed=0)
    b = STCBHead(3, 8, 8, 2, stcb_dim=32, seed=1)
    assert not torch.equal(a.stcb.h0, b.stcb.h0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    for name in ("h0", "s0", "h1", "s1"):
        assert torch.equal(getattr(a.stcb, name), getattr(b.stcb, name))
    a.eval(), b.eval()
    rgb, flow = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    torch.testing.assert_close(a(rgb, flow), b(rgb, flow))
    assert "stcb.h0" in a.state_dict() and "stcb.s1" in a.state_dict()


def test_sketch_values_are_valid():
    op = CompactBilinear([100, 50], 64, seed=0)
    assert op.h0.min() >= 0 and op.h0.max() < 64 and op.h0.dtype == torch.int64
    assert set(op.s1.unique().tolist()) == {-1.0, 1.0}


def test_wrong_input_count_or_width_refused():
    op = CompactBilinear([4, 6], 8)
    with pytest.raises(ValueError, match="2 inputs"):
        op(torch.randn(4))
    with pytest.raises(ValueError, match="last dimension 6"):
        op(torch.randn(4), torch.randn(5))


def test_neighbour_paths_mapping():
    x = torch.arange(5.0).reshape(1, 5, 1)
    paths = [p[0, :, 0].tolist() for p in _neighbour_paths(x, 3)]
    assert paths == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 4]]


def test_heads_normalised_and_shaped():
    head = STCBHead(4, 8, 6, 3, stcb_dim=32, dropout=0.0)
    z = head.fuse(torch.randn(2, 3, 8), torch.randn(2, 3, 6))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2, 3))
    t = STCBTemporalHead(4, 8, 6, 3, stcb_dim=32, paths=3)
    assert t.temporal_stcb.input_dims == (6, 6, 6) and t.stcb.input_dims == (8, 32)
    assert t(torch.randn(2, 3, 8), torch.randn(2, 3, 6)).shape == (2, 4)
