"""Res-Inc block ([STFN] §3.2, Fig. 3, eq. 3) against closed forms and a hand-built reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.resinc import ResIncBlock, ResIncStack, same_padding



def test_parameter_count_d2048_closed_form():
    # Branches k=2..5: k * 2048 * 512 weights + BN (gamma, beta) 2 * 512 each;
    # skip: 2 * 2048 * 2048 weights + BN 2 * 2048. Computed by hand: 5.5 d^2 + 4 d.
    d = 2048
    expected = (2 + 3 + 4 + 5) * d * (d // 4) + 4 * 2 * (d // 4) + 2 * d * d + 2 * d
    assert expected == 23_076_864
    block = ResIncBlock(d)
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize("n", range(1, 10))
def test_output_length_equals_input_length(n):
    block = ResIncBlock(16).eval()
    assert block(torch.randn(2, n, 16)).shape == (2, n, 16)
    stack = ResIncStack(16, blocks=2).eval()
    assert stack(torch.randn(2, n, 16)).shape == (2, n, 16)


def test_padding_table():
    assert [same_padding(k) for k in (2, 3, 4, 5)] == [(0, 1), (1, 1), (1, 2), (2, 2)]


def test_d_not_divisible_by_four_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResIncBlock(10)


def _np_conv_same(x, w, k):
    """x (d, N), w (out, d, k): zero padding (k-1)//2 left, k//2 right, correlation (torch)."""
    left, right = (k - 1) // 2, k // 2
    xp = np.pad(x, ((0, 0), (left, right)))
    n = x.shape[1]
    return np.stack([np.einsum("oik,ik->o", w, xp[:, t : t + k]) for t in range(n)], axis=1)


def test_forward_matches_numpy_reference_eval_mode():
    torch.manual_seed(0)
    d, n = 8, 6
    block = ResIncBlock(d)
    # Non-trivial BN statistics and affine parameters.
    for bn in list(block.branch_bns) + [block.skip_bn]:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    block.eval()
    x = torch.randn(1, n, d)
    got = block(x)[0].T.detach().numpy()  # (d, N)

    def bn_np(y, bn):
        m, v = bn.running_mean.numpy()[:, None], bn.running_var.numpy()[:, None]
        return (y - m) / np.sqrt(v + bn.eps) * bn.weight.detach().numpy()[:, None] + bn.bias.detach().numpy()[:, None]

    xs = x[0].T.numpy().astype(np.float64)
    parts = []
    for k, conv, bn in zip((2, 3, 4, 5), block.branches, block.branch_bns):
        y = _np_conv_same(xs, conv.conv.weight.detach().numpy().astype(np.float64), k)
        parts.append(np.maximum(bn_np(y, bn), 0))
    skip = bn_np(_np_conv_same(xs, block.skip.conv.weight.detach().numpy().astype(np.float64), 2), block.skip_bn)
    expected = np.maximum(np.concatenate(parts, axis=0) + skip, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_kernel2_is_causal_to_the_right():
    # Kernel 2 padded (0, 1): output t reads inputs t and t+1 only, never t-1.
    block = ResIncBlock(4).eval()
    x = torch.zeros(1, 5, 4, requires_grad=True)
    y = F.pad(x.transpose(1, 2), (block._pad, block._pad))
    out = block.skip(y, 5)  # (1, 4, 5)
    out[0, :, 2].sum().backward()
    touched = (x.grad[0].abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert set(touched) <= {2, 3}
