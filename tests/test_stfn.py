"""STFN head ([STFN] eq. 1, 4-6, Fig. 4, 5): fusion ops by hand, direction wiring, variants."""

import math

import pytest
import torch
from torch import nn

from pipeline.models.fusion import fuse, log_mean_probs
from pipeline.models.resinc import ResIncStack
from pipeline.models.stfn import STFN



def test_fusion_ops_hand_computed():
    a = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]])
    m = torch.tensor([[[3.0, 4.0, -1.0, 0.5]]])
    assert fuse("avg", a, m).tolist() == [[[2.0, 1.0, 1.0, 0.5]]]  # eq. 4
    assert fuse("mul", a, m).tolist() == [[[3.0, -8.0, -3.0, 0.25]]]  # eq. 5
    assert fuse("max", a, m).tolist() == [[[3.0, 4.0, 3.0, 0.5]]]  # eq. 6
    with pytest.raises(ValueError, match="valid: avg, max, mul"):
        fuse("sum", a, m)


def test_log_mean_probs_is_log_of_normalised_sum():
    p1 = torch.tensor([[0.7, 0.2, 0.1]])
    p2 = torch.tensor([[0.1, 0.1, 0.8]])
    got = log_mean_probs([p1.log(), p2.log()]).exp()
    torch.testing.assert_close(got, torch.tensor([[0.4, 0.15, 0.45]]))
    got_w = log_mean_probs([p1.log(), p2.log()], [1.0, 3.0]).exp()
    torch.testing.assert_close(got_w, (p1 + 3 * p2) / 4)


class _Recorder(nn.Module):
    """Identity that remembers its input."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return x


def _wired(direction, fusion="avg", arch="a"):
    head = STFN(3, 4, 4, 2, arch=arch, fusion=fusion, direction=direction, dropout=0.0)
    head.stream_a, head.stream_m = nn.Identity(), nn.Identity()
    head.follow_a, head.follow_m = _Recorder(), _Recorder()
    return head


RGB = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]]])
FLOW = torch.tensor([[[3.0, 0.0, 1.0, 8.0], [2.0, 1.0, 4.0, 1.0]]])
AVG = torch.tensor([[[2.0, 1.0, 2.0, 6.0], [1.0, 1.0, 2.0, 1.0]]])


@pytest.mark.parametrize(
    "direction, expect_a, expect_m",
    [
        ("bi", AVG, AVG),  # A<->M: both follow-up blocks get the fused sequence
        ("m2a", AVG, FLOW),  # A<-M: motion injected into appearance (W_fa gets P')
        ("a2m", RGB, AVG),  # A->M: appearance injected into motion (W_fm gets P')
    ],
)
def test_direction_wiring(direction, expect_a, expect_m):
    head = _wired(direction)
    head(RGB, FLOW)
    torch.testing.assert_close(head.follow_a.seen, expect_a)
    torch.testing.assert_close(head.follow_m.seen, expect_m)


def test_max_and_mul_reach_follow_up_blocks():
    head = _wired("bi", fusion="max")
    head(RGB, FLOW)
    torch.testing.assert_close(head.follow_a.seen, torch.maximum(RGB, FLOW))
    head = _wired("m2a", fusion="mul")
    head(RGB, FLOW)
    torch.testing.assert_close(head.follow_a.seen, RGB * FLOW)


def test_output_is_log_of_mean_of_two_path_softmaxes():
    torch.manual_seed(0)
    head = STFN(5, 8, 8, 3, dropout=0.0).eval()
    rgb, flow = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    in_a, in_m = head.path_inputs(rgb, flow)
    pa = head.classifier_a(head.follow_a(in_a)).softmax(-1)
    pm = head.classifier_m(head.follow_m(in_m)).softmax(-1)
    torch.testing.assert_close(head(rgb, flow).exp(), (pa + pm) / 2)


def test_arch_variants_structure():
    a = STFN(4, 8, 8, 3, arch="a", blocks=2)
    b = STFN(4, 8, 8, 3, arch="b", blocks=2)
    c = STFN(4, 8, 12, 3, arch="c", blocks=2)
    assert len(a.follow_a.blocks) == len(a.follow_m.blocks) == 2 and len(a.stream_a.blocks) == 2
    assert len(b.follow_a.blocks) == len(b.follow_m.blocks) == 0
    assert isinstance(c.path, ResIncStack) and c.path.d == 20 and len(c.path.blocks) == 2
    assert not hasattr(c, "stream_a")
    for head, fd in ((a, 8), (b, 8), (c, 12)):
        out = head(torch.randn(2, 3, 8), torch.randn(2, 3, fd))
        assert out.shape == (2, 4)
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))


def test_arch_c_rejects_fusion_options():
    with pytest.raises(ValueError, match="concatenat"):
        STFN(4, 8, 8, 3, arch="c", fusion="max")
    with pytest.raises(ValueError, match="concatenat"):
        STFN(4, 8, 8, 3, arch="c", direction="m2a")


def test_unknown_options_list_valid_ones():
    with pytest.raises(ValueError, match="a, b, c"):
        STFN(4, 8, 8, 3, arch="d")
    with pytest.raises(ValueError, match="bi, a2m, m2a"):
        STFN(4, 8, 8, 3, direction="both")
    with pytest.raises(ValueError, match="avg, max, mul, stcb"):
        STFN(4, 8, 8, 3, fusion="sum")


def test_different_widths_need_fused_dim():
    with pytest.raises(ValueError, match="fused_dim"):
        STFN(4, 8, 12, 3)
    head = STFN(4, 8, 12, 3, fused_dim=8)
    assert isinstance(head.proj_a, nn.Identity) and isinstance(head.proj_m, nn.Linear)
    assert head(torch.randn(2, 3, 8), torch.randn(2, 3, 12)).shape == (2, 4)
    # STCB fuses any widths without projection.
    head = STFN(4, 8, 12, 3, fusion="stcb", stcb_dim=16, direction="m2a")
    assert head.follow_a.d == 16 and head.follow_m.d == 12
    assert head(torch.randn(2, 3, 8), torch.randn(2, 3, 12)).shape == (2, 4)


def test_input_shape_checked():
    head = STFN(4, 8, 8, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, 8\)"):
        head(torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def test_gradients_reach_both_inputs_in_every_direction():
    for direction in ("bi", "a2m", "m2a"):
        head = STFN(3, 8, 8, 4, direction=direction)
        rgb = torch.randn(2, 4, 8, requires_grad=True)
        flow = torch.randn(2, 4, 8, requires_grad=True)
        head.loss(rgb, flow, torch.tensor([0, 2])).backward()
        assert rgb.grad.abs().sum() > 0 and flow.grad.abs().sum() > 0
        assert math.isfinite(float(rgb.grad.sum()))
