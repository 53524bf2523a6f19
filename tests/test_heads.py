"""Head registry, the common output convention, baselines by hand, ST-Multiplier identity init."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.baselines import LateFusionHead, TSNHead
from pipeline.models.heads import create_head, list_heads
from pipeline.models.stmultiplier import IdentityTemporalConv, STMultiplierHead


SMALL = {"stcb": {"stcb_dim": 64}, "stcb_temporal": {"stcb_dim": 64}}


def test_registry_names():
    assert list_heads() == sorted(
        ["stfn", "rgb", "flow", "late", "tsn", "concat", "stcb", "stcb_temporal", "stmultiplier"]
    )


def test_unknown_head_lists_valid_names():
    with pytest.raises(ValueError, match="valid heads: concat, flow, late"):
        create_head("lstm", num_classes=3, rgb_dim=8, flow_dim=8, num_segments=3)


def test_unknown_option_refused():
    with pytest.raises(TypeError):
        create_head("tsn", num_classes=3, rgb_dim=8, flow_dim=8, num_segments=3, arch="a")


def _separable(seed, v=48, n=3, d=8, c=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(v) % c
    centres = 2.0 * torch.randn(c, d, generator=g)
    rgb = centres[labels][:, None, :] + torch.randn(v, n, d, generator=g)
    flow = centres.flip(0)[labels][:, None, :] + torch.randn(v, n, d, generator=g)
    return rgb.relu(), flow.relu(), labels


@pytest.mark.parametrize("name", list_heads())
def test_every_head_learns_a_separable_problem(name):
    torch.manual_seed(0)
    rgb, flow, labels = _separable(1)
    head = create_head(name, num_classes=3, rgb_dim=8, flow_dim=8, num_segments=3, **SMALL.get(name, {}))
    out = head(rgb, flow)
    assert out.shape == (48, 3)
    torch.testing.assert_close(torch.logsumexp(out, dim=-1), torch.zeros(48), atol=1e-5, rtol=0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    head.train()
    losses = []
    for _ in range(25):
        loss = head.loss(rgb, flow, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    head.eval()
    assert (head(rgb, flow).argmax(-1) == labels).float().mean() > 0.9


def test_late_fusion_by_hand():
    torch.manual_seed(0)
    head = LateFusionHead(4, 6, 5, 3, flow_weight=1.5, dropout=0.0)
    rgb, flow = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    pa = F.softmax(rgb @ head.scores_a.fc.weight.T + head.scores_a.fc.bias, -1).mean(1)
    pm = F.softmax(flow @ head.scores_m.fc.weight.T + head.scores_m.fc.bias, -1).mean(1)
    torch.testing.assert_close(head(rgb, flow).exp(), (pa + 1.5 * pm) / 2.5)


def test_tsn_consensus_before_softmax_by_hand():
    torch.manual_seed(0)
    head = TSNHead(4, 6, 5, 3, flow_weight=1.5, dropout=0.0)
    rgb, flow = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    ga = (rgb @ head.scores_a.fc.weight.T + head.scores_a.fc.bias).mean(1)
    gm = (flow @ head.scores_m.fc.weight.T + head.scores_m.fc.bias).mean(1)
    expected = (F.softmax(ga, -1) + 1.5 * F.softmax(gm, -1)) / 2.5
    torch.testing.assert_close(head(rgb, flow).exp(), expected)
    # Trained per stream: the loss is the sum of the two streams' cross-entropies.
    target = torch.tensor([1, 3])
    torch.testing.assert_close(head.loss(rgb, flow, target),
                               F.cross_entropy(ga, target) + F.cross_entropy(gm, target))


@pytest.mark.parametrize("kernel", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_identity_temporal_conv_leaves_input_unchanged(kernel, n):
    conv = IdentityTemporalConv(6, kernel, init="identity")
    x = torch.randn(2, n, 6)
    torch.testing.assert_close(conv(x), x)


def test_average_temporal_init_is_moving_average():
    conv = IdentityTemporalConv(2, 3, init="average")
    x = torch.tensor([[[3.0, 0.0], [6.0, 3.0], [0.0, 9.0]]])
    # zero padding (1, 1): t0 = (0+3+6)/3, t1 = (3+6+0)/3, t2 = (6+0+0)/3 on channel 0.
    expected = torch.tensor([[[3.0, 1.0], [3.0, 4.0], [2.0, 4.0]]])
    torch.testing.assert_close(conv(x), expected)


def test_stmultiplier_gate_and_max_pool():
    # At identity init with BN in eval mode at default statistics, the appearance unit is
    # relu(x_a) + (x_a * relu(x_m)) / sqrt(1 + eps); max over time then a linear classifier.
    head = STMultiplierHead(3, 4, 4, 2, dropout=0.0).eval()
    rgb, flow = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    eps = head.unit_a.bn.eps
    xa = rgb.relu() + rgb * flow.relu() / (1 + eps) ** 0.5
    xm = flow.relu() + flow.relu() / (1 + eps) ** 0.5
    pa = F.softmax(head.fc_a(xa.amax(1)), -1)
    pm = F.softmax(head.fc_m(xm.amax(1)), -1)
    torch.testing.assert_close(head(rgb, flow).exp(), (pa + pm) / 2)
    with pytest.raises(ValueError, match="equal widths"):
        STMultiplierHead(3, 4, 8, 2)


def test_stmultiplier_loss_is_one_cross_entropy_per_stream():
    """[ST-Mult] §5.1: two loss layers; the head's loss is the sum of its two classifiers' cross-entropies,
    computed here by hand from their logits (log-sum-exp minus the true class's logit)."""
    torch.manual_seed(0)
    head = STMultiplierHead(3, 8, 8, 4, dropout=0.0).eval()
    rgb, flow, y = torch.randn(5, 4, 8), torch.randn(5, 4, 8), torch.tensor([0, 2, 1, 1, 0])
    za, zm = head.stream_logits(rgb, flow)
    by_hand = sum((z.logsumexp(1) - z[torch.arange(5), y]).mean() for z in (za, zm))
    torch.testing.assert_close(head.loss(rgb, flow, y), by_hand)
    # The prediction is still the average of the two streams' softmaxes (as a log-probability).
    torch.testing.assert_close(head(rgb, flow).exp(), (za.softmax(1) + zm.softmax(1)) / 2)
