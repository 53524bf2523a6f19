"""The Spatiotemporal Pyramid Network ([STPN] §3, Table 6) against numpy references, and its sampling rules.

References: STCB is recomputed from the module's sketch buffers by explicit count-sketch loops and an explicit
circular convolution (Pham & Pagh), no FFT; convolutions of 1 x 1 as matrix products; softmax and the
signed square root + L2 in numpy.
"""

import inspect
import math

import numpy as np
import pytest
import torch

from pipeline.data import sampling as S
from pipeline.models import stpn as P
from pipeline.models.backbones import create_backbone

torch.manual_seed(0)


# ----------------------------------------------------------------------------- numpy references

def _sketch(x, h, s, d):
    out = np.zeros(d)
    for j in range(len(x)):
        out[h[j]] += s[j] * x[j]
    return out


def _circular(a, b):
    d = len(a)
    return np.array([sum(a[i] * b[(k - i) % d] for i in range(d)) for k in range(d)])


def np_stcb(op, *vectors):
    """STCB of 1-D numpy vectors with the sketches of ``op`` (a CompactBilinear)."""
    d = op.output_dim
    sketches = [_sketch(v, getattr(op, f"h{i}").numpy(), getattr(op, f"s{i}").numpy(), d)
                for i, v in enumerate(vectors)]
    out = sketches[0]
    for sk in sketches[1:]:
        out = _circular(out, sk)
    return out


# float32 FFT round-off (~1e-8) in a sketch bin that is exactly 0 becomes ~1e-4 after the signed square root
ATOL = 5e-4


def np_norm(z):
    z = np.sign(z) * np.sqrt(np.abs(z) + 1e-12)
    return z / max(np.linalg.norm(z), 1e-12)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_linear(fc, x):
    return fc.weight.detach().double().numpy() @ x + fc.bias.detach().double().numpy()


def _np(t):
    return t.detach().double().numpy()


def _maps(b=2, ca=5, cm=4, k=3, h=3, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ca, h, w, generator=g), torch.randn(b, k, cm, h, w, generator=g)


def _net(model, **kw):
    kw = {"num_classes": 4, "rgb_channels": 5, "flow_channels": 4, "stcb_dim": 16, "temporal_dim": 12,
          "attention_dim": 8, "attention_hidden": 3, "dropout": 0.0, "model": model, **kw}
    torch.manual_seed(1)
    return P.build_stpn(**kw).eval()


# ----------------------------------------------------------------------------- STCB per location

@pytest.mark.parametrize("normalize", [True, False])
def test_spatial_stcb_equals_loop_over_locations(normalize):
    op = P.SpatialSTCB([5, 4], 16, normalize=normalize, seed=3)
    a, m = _maps(k=1)
    m = m[:, 0]
    got = op(a, m)
    assert got.shape == (2, 16, 3, 3)
    for b in range(2):
        for y in range(3):
            for x in range(3):
                ref = np_stcb(op.stcb, _np(a[b, :, y, x]), _np(m[b, :, y, x]))
                np.testing.assert_allclose(_np(got[b, :, y, x]), np_norm(ref) if normalize else ref,
                                           rtol=1e-4, atol=ATOL)
    # the channel-last entry point is the same map, channel-last
    torch.testing.assert_close(op.channels_last(a.permute(0, 2, 3, 1), m.permute(0, 2, 3, 1)), got.permute(0, 2, 3, 1))


def test_temporal_fusion_one_path_is_identity_and_k_paths_fuse_per_location():
    _, m = _maps(k=1)
    one = P.TemporalFusion(4, 1, 12)
    assert one.out_channels == 4 and torch.equal(one(m), m[:, 0])
    _, m3 = _maps(k=3)
    three = P.TemporalFusion(4, 3, 12, seed=2)
    got = three(m3)
    assert three.out_channels == 12 and got.shape == (2, 12, 3, 3)
    ref = np_norm(np_stcb(three.stcb.stcb, *[_np(m3[1, k, :, 2, 0]) for k in range(3)]))
    np.testing.assert_allclose(_np(got[1, :, 2, 0]), ref, rtol=1e-4, atol=ATOL)
    with pytest.raises(ValueError, match=r"\(B, 3, C, H, W\)"):
        three(m3[:, :2])


# ----------------------------------------------------------------------------- attention (level 2)

def _attention(**kw):
    torch.manual_seed(0)
    return P.SpatiotemporalAttention(5, 4, 8, hidden=3, **kw)


def test_attention_weights_are_a_softmax_over_locations():
    att = _attention()
    a, m = _maps(b=3, k=1, h=3, w=4)
    attended, alpha = att(a, m[:, 0])
    assert alpha.shape == (3, 3, 4) and attended.shape == (3, 5)
    assert torch.all(alpha > 0)
    torch.testing.assert_close(alpha.sum(dim=(1, 2)), torch.ones(3))  # (Softmax2d on one channel would give 12)
    for b in range(3):
        assert alpha[b].max() - alpha[b].min() > 1e-4  # a non-constant map is not attended uniformly
        ref = (_np(a[b]) * _np(alpha[b])[None]).sum(axis=(1, 2))  # weighted sum of the ORIGINAL appearance map
        np.testing.assert_allclose(_np(attended[b]), ref, rtol=1e-5, atol=1e-6)


def test_attention_with_last_conv_zeroed_is_uniform_average_pooling():
    att = _attention()
    with torch.no_grad():
        att.conv2.weight.zero_()
        att.conv2.bias.zero_()
    a, m = _maps(b=2, k=1, h=3, w=3)
    attended, alpha = att(a, m[:, 0])
    np.testing.assert_allclose(_np(alpha), np.full((2, 3, 3), 1 / 9), rtol=1e-6)
    np.testing.assert_allclose(_np(attended), _np(a).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_attention_kernel_and_activation_options():
    a, m = _maps(b=2, k=1, h=3, w=3)
    att = _attention(kernel_size=3, activation="none")
    assert att.conv1.kernel_size == (3, 3) and att.conv2.padding == (1, 1) and isinstance(att.act, torch.nn.Identity)
    torch.testing.assert_close(att(a, m[:, 0])[1].sum(dim=(1, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="odd"):
        _attention(kernel_size=2)
    with pytest.raises(ValueError, match="activation"):
        _attention(activation="tanh")


# ----------------------------------------------------------------------------- models A-D (Table 6)

def test_model_a_is_the_two_stream_average_of_the_streams_classifiers():
    net = _net("A")
    a, m = _maps()
    out = net({"rgb_map": a, "flow_maps": m})
    for b in range(2):
        p_rgb = np_softmax(np_linear(net.fc_rgb, _np(a[b]).mean(axis=(1, 2))))
        p_flow = np_softmax(np_linear(net.fc_flow, _np(m[b, 1]).mean(axis=(1, 2))))  # the stack at t
        np.testing.assert_allclose(_np(net.class_scores(out)[b]), (p_rgb + p_flow) / 2, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 3])
    ce = sum(-np.log(np_softmax(_np(out[k][b]))[labels[b]]) for k in ("rgb_logits", "flow_logits") for b in range(2))
    # each stream's mean cross-entropy, the two summed
    np.testing.assert_allclose(float(net.loss(out, labels).detach()), ce / 2, rtol=1e-5)
    # the side paths play no part
    m2 = m.clone()
    m2[:, [0, 2]] = torch.randn(2, 2, 4, 3, 3)
    torch.testing.assert_close(net({"rgb_map": a, "flow_maps": m2})["logits"], out["logits"])


def test_model_b_is_stcb_of_pooled_appearance_and_centre_flow():
    net = _net("B")
    a, m = _maps()
    out = net({"rgb_map": a, "flow_maps": m})
    assert not hasattr(net, "temporal") and not hasattr(net, "attention") and net.top.input_dims == (5, 4)
    for b in range(2):
        z = np_norm(np_stcb(net.top, _np(a[b]).mean(axis=(1, 2)), _np(m[b, 1]).mean(axis=(1, 2))))
        np.testing.assert_allclose(_np(out["features"][b]), z, rtol=1e-4, atol=ATOL)
        np.testing.assert_allclose(_np(out["logits"][b]), np_linear(net.fc, z), rtol=1e-4, atol=ATOL)
    labels = torch.tensor([1, 2])
    ref = np.mean([-np.log(np_softmax(_np(out["logits"][b]))[labels[b]]) for b in range(2)])
    np.testing.assert_allclose(float(net.loss(out, labels).detach()), ref, rtol=1e-5)  # one loss


def test_model_c_fuses_the_paths_first():
    net = _net("C")
    a, m = _maps()
    out = net({"rgb_map": a, "flow_maps": m})
    assert net.top.input_dims == (5, 12)
    for b in range(2):
        t = np.stack([[np_norm(np_stcb(net.temporal.stcb.stcb, *[_np(m[b, k, :, y, x]) for k in range(3)]))
                       for x in range(3)] for y in range(3)])  # (H, W, temporal_dim)
        z = np_norm(np_stcb(net.top, _np(a[b]).mean(axis=(1, 2)), t.mean(axis=(0, 1))))
        np.testing.assert_allclose(_np(out["logits"][b]), np_linear(net.fc, z), rtol=1e-4, atol=ATOL)


def test_model_c_with_one_path_is_model_b():
    b_net, c_net = _net("B", num_paths=1), _net("C", num_paths=1)
    c_net.load_state_dict(b_net.state_dict())  # same parameters and sketches: level 1 is the identity
    a, m = _maps(k=1)
    torch.testing.assert_close(c_net({"rgb_map": a, "flow_maps": m})["logits"],
                               b_net({"rgb_map": a, "flow_maps": m})["logits"])


def test_model_d_is_the_full_pyramid():
    net = _net("D")
    a, m = _maps()
    out = net({"rgb_map": a, "flow_maps": m})
    assert net.top.input_dims == (5, 12, 5) and out["features"].shape == (2, 16)
    att = net.attention
    w1, b1 = _np(att.conv1.weight)[:, :, 0, 0], _np(att.conv1.bias)
    w2, b2 = _np(att.conv2.weight)[:, :, 0, 0], _np(att.conv2.bias)
    for b in range(2):
        t = np.stack([[np_norm(np_stcb(net.temporal.stcb.stcb, *[_np(m[b, k, :, y, x]) for k in range(3)]))
                       for x in range(3)] for y in range(3)])
        s = np.stack([[np_norm(np_stcb(att.stcb.stcb, _np(a[b, :, y, x]), t[y, x])) for x in range(3)]
                      for y in range(3)])  # (H, W, attention_dim)
        scores = (np.maximum(s @ w1.T + b1, 0) @ w2.T + b2)[..., 0]  # 1 x 1 convs, ReLU between
        alpha = np_softmax(scores.ravel()).reshape(3, 3)
        np.testing.assert_allclose(_np(out["attention"][b]), alpha, rtol=1e-4, atol=1e-6)
        attended = (_np(a[b]) * alpha[None]).sum(axis=(1, 2))
        z = np_norm(np_stcb(net.top, _np(a[b]).mean(axis=(1, 2)), t.mean(axis=(0, 1)), attended))
        np.testing.assert_allclose(_np(out["logits"][b]), np_linear(net.fc, z), rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("model", ["B", "C", "D"])
@pytest.mark.parametrize("normalize", [True, False])
def test_level_3_has_the_configured_width(model, normalize):
    net = _net(model, stcb_dim=24, normalize=normalize)
    a, m = _maps()
    z = net({"rgb_map": a, "flow_maps": m})["features"]
    assert z.shape == (2, 24) and net.fc.in_features == 24
    if normalize:
        torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("model", ["C", "D"])
def test_gradients_reach_every_input_and_parameter(model):
    net = _net(model).train()
    a, m = _maps()
    a.requires_grad_(True)
    m.requires_grad_(True)
    out = net({"rgb_map": a, "flow_maps": m})
    net.loss(out, torch.tensor([0, 1])).backward()
    assert a.grad.abs().sum() > 0
    for k in range(3):
        assert m.grad[:, k].abs().sum() > 0, f"no gradient reaches flow path {k}"
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_maps_and_options_are_refused():
    net = _net("D")
    a, m = _maps()
    with pytest.raises(ValueError, match=r"flow_maps must be \(B, 3, 4, H, W\)"):
        net({"rgb_map": a, "flow_maps": m[:, :2]})
    with pytest.raises(ValueError, match="map size"):
        net({"rgb_map": a[..., :2], "flow_maps": m})
    with pytest.raises(ValueError, match=r"rgb_map must be \(B, 5, H, W\)"):
        net({"rgb_map": a[:, :4], "flow_maps": m})
    with pytest.raises(ValueError, match="unknown STPN model 'E'"):
        _net("E")
    with pytest.raises(ValueError, match=r"unknown STPN option\(s\) \['paths'\]"):
        _net("D", paths=3)
    with pytest.raises(ValueError, match="no stream classifiers"):
        net.load_stream_classifiers({}, {})


def test_options_defaults_are_the_constructor_and_paper_defaults():
    sig = inspect.signature(P.STPN)
    for name, (default, help_text) in P.OPTIONS.items():
        assert sig.parameters[name].default == default, name
        assert help_text
    # [STPN]: the final model D (Table 6), 3 paths (Table 4), d = 4096 (Table 3), 64 attention channels (§3.3)
    assert (P.OPTIONS["model"][0], P.OPTIONS["num_paths"][0], P.OPTIONS["stcb_dim"][0],
            P.OPTIONS["attention_hidden"][0]) == ("D", 3, 4096, 64)


@pytest.mark.parametrize("option, value, read", [
    ("model", "C", lambda n: n.model),
    ("num_paths", 5, lambda n: n.temporal.num_paths),
    ("stcb_dim", 20, lambda n: n.top.output_dim),
    ("temporal_dim", 10, lambda n: n.temporal.out_channels),
    ("attention_dim", 6, lambda n: n.attention.stcb.output_dim),
    ("attention_hidden", 7, lambda n: n.attention.conv1.out_channels),
    ("attention_kernel", 3, lambda n: n.attention.conv2.kernel_size[0]),
    ("attention_activation", "none", lambda n: "none" if isinstance(n.attention.act, torch.nn.Identity) else "relu"),
    ("normalize", False, lambda n: n.normalize),
    ("dropout", 0.25, lambda n: n.dropout.p),
])
def test_each_option_reaches_the_network(option, value, read):
    net = _net(value) if option == "model" else _net("D", **{option: value})
    assert read(net) == value and read(_net("D")) != value


# ----------------------------------------------------------------------------- end to end

L = 2  # flow fields per stack: 2L = 4 input channels, small for the test


@pytest.fixture(scope="module")
def finetuned():
    """State dicts as finetune saves them (``Backbone.state_dict()``), 3 classes, with non-trivial classifiers."""
    torch.manual_seed(0)
    rgb = create_backbone("resnet18", num_classes=3, in_channels=3).eval()
    flow = create_backbone("resnet18", num_classes=3, in_channels=2 * L).eval()
    for bb in (rgb, flow):
        torch.nn.init.normal_(bb.fc.weight, std=0.2)
        torch.nn.init.normal_(bb.fc.bias, std=0.2)
    return rgb, flow


def _clip(b=2, k=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(b, 3, size, size, generator=g),
            "flow": torch.randn(b, k, 2 * L, size, size, generator=g)}


def test_end_to_end_model_a_is_the_finetuned_two_stream_network(finetuned):
    rgb, flow = finetuned
    net = P.STPNEndToEnd.from_finetuned(rgb.state_dict(), flow.state_dict(), rgb_arch="resnet18",
                                        flow_arch="resnet18", num_classes=3, flow_in_channels=2 * L,
                                        model="A").eval()
    batch = _clip()
    with torch.no_grad():
        ref = (torch.softmax(rgb(batch["rgb"]), -1) + torch.softmax(flow(batch["flow"][:, 1]), -1)) / 2
        torch.testing.assert_close(net.class_scores(net(batch)), ref, rtol=1e-5, atol=1e-6)


def test_end_to_end_model_d_maps_and_gradients(finetuned):
    rgb, flow = finetuned
    net = P.STPNEndToEnd.from_finetuned(rgb.state_dict(), flow.state_dict(), rgb_arch="resnet18",
                                        flow_arch="resnet18", num_classes=3, flow_in_channels=2 * L,
                                        stcb_dim=64, temporal_dim=64, attention_dim=32, seed=5)
    assert net.pyramid.model == "D" and net.pyramid.top.input_dims == (512, 64, 512)
    torch.testing.assert_close(net.flow.trunk.layer4[0].conv1.weight, flow.trunk.layer4[0].conv1.weight)
    batch = {k: v.requires_grad_(True) for k, v in _clip().items()}
    out = net(batch)
    assert out["logits"].shape == (2, 3) and out["attention"].shape == (2, 2, 2)  # 64 px -> 2 x 2 layer4 map
    net.loss(out, torch.tensor([0, 2])).backward()
    assert batch["rgb"].grad.abs().sum() > 0
    for k in range(3):
        assert batch["flow"].grad[:, k].abs().sum() > 0, f"no gradient reaches flow stack {k}"


def test_end_to_end_bad_state_dicts_are_clear(finetuned):
    rgb, flow = finetuned
    with pytest.raises(ValueError, match="holds no backbone weights"):
        P.STPNEndToEnd.from_finetuned({"fc.weight": torch.zeros(3, 512)}, flow.state_dict(), rgb_arch="resnet18",
                                      flow_arch="resnet18", num_classes=3, flow_in_channels=2 * L)
    with pytest.raises(ValueError, match="does not fit resnet18 with in_channels=20"):
        P.STPNEndToEnd.from_finetuned(rgb.state_dict(), flow.state_dict(), rgb_arch="resnet18",
                                      flow_arch="resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"no \(5, 512\) classifier"):
        P.STPNEndToEnd.from_finetuned(rgb.state_dict(), flow.state_dict(), rgb_arch="resnet18",
                                      flow_arch="resnet18", num_classes=5, flow_in_channels=2 * L, model="A")


# ----------------------------------------------------------------------------- sampling ([STPN] §3.2, §4.7)

@pytest.mark.parametrize("k, expected", [(1, [0]), (2, [0, 1]), (3, [-1, 0, 1]), (4, [-1, 0, 1, 2]),
                                         (5, [-2, -1, 0, 1, 2])])
def test_path_multipliers(k, expected):
    assert S.path_multipliers(k) == expected


@pytest.mark.parametrize("t, tau, n, k, expected", [
    (50, 7, 100, 3, [43, 50, 57]),           # t - tau, t, t + tau
    (2, 5, 100, 3, [0, 2, 7]),               # clamped at the start
    (98, 5, 100, 3, [93, 98, 99]),           # clamped at the end
    (50, 3, 100, 5, [44, 47, 50, 53, 56]),   # five paths
    (0, 10, 1, 3, [0, 0, 0]),                # a one-frame video
    (5, 1, 10, 1, [5]),                      # one path: the stack at t
])
def test_path_centres(t, tau, n, k, expected):
    assert S.path_centres(t, tau, n, k) == expected


def test_path_centres_refuse_bad_input():
    with pytest.raises(ValueError, match="outside"):
        S.path_centres(10, 1, 10)
    with pytest.raises(ValueError, match="tau must be a positive int"):
        S.path_centres(5, 0, 10)


def test_train_sample_draws_frame_then_tau_uniformly():
    seen_t, seen_tau = set(), set()
    for seed in range(400):
        ref = np.random.default_rng(seed)
        t, tau = int(ref.integers(20)), int(ref.integers(1, 11))  # the documented draws, in order
        got = S.stpn_train_sample(20, np.random.default_rng(seed))
        assert (got.frame, got.tau) == (t, tau)
        assert got.centres == [min(max(t + j * tau, 0), 19) for j in (-1, 0, 1)]
        seen_t.add(got.frame)
        seen_tau.add(got.tau)
    assert seen_t == set(range(20)) and seen_tau == set(range(1, 11))  # U{0..19} and U{1..10}


def test_test_snippets_are_ten_uniform_frames_each_with_a_tau():
    snippets = S.stpn_test_snippets(100, np.random.default_rng(0))
    assert [s.frame for s in snippets] == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]  # centres of 10 equal parts
    taus = np.random.default_rng(0).integers(1, 11, size=10)
    assert [s.tau for s in snippets] == taus.tolist()
    assert snippets[0].centres == [max(5 - taus[0], 0), 5, 5 + taus[0]]


@pytest.mark.parametrize("offsets, k, expected", [
    ((-5, 0, 5), 3, [5]),
    ((-10, -5, 0, 5, 10), 3, [5, 10]),
    ((-10, -5, 0, 5, 10), 5, [5]),
    ((-6, -3, 0, 3, 6, 9), 3, [3, 6]),       # 9 lacks -9
    ((0, 5), 2, [5]),                        # two paths: t, t + tau
    ((-5, 0, 5), 1, [0]),                    # one path: the stack at the position
])
def test_cached_taus(offsets, k, expected):
    assert S.cached_taus(offsets, k) == expected


@pytest.mark.parametrize("offsets, k, message", [
    ((-5, 5), 3, "lack 0"),
    ((-5, 0, 5), 5, "no tau with all of 5 paths"),
    ((0, 0, 5), 3, "distinct"),
])
def test_cached_taus_refuse(offsets, k, message):
    with pytest.raises(ValueError, match=message):
        S.cached_taus(offsets, k)


def test_cached_train_sample_draws_position_then_tau_among_cached():
    offsets = (-10, -5, 0, 5, 10)
    seen = set()
    for seed in range(200):
        ref = np.random.default_rng(seed)
        position, tau = int(ref.integers(25)), [5, 10][int(ref.integers(2))]
        got = S.stpn_cached_train_sample(25, offsets, np.random.default_rng(seed))
        assert (got.position, got.tau) == (position, tau)
        assert got.paths == {5: [1, 2, 3], 10: [0, 2, 4]}[tau]  # indices of -tau, 0, +tau in offsets
        seen.add((got.position, got.tau))
    assert {p for p, _ in seen} == set(range(25)) and {t for _, t in seen} == {5, 10}
    assert S.stpn_cached_train_sample(25, S.STPN_CACHED_OFFSETS, np.random.default_rng(0)).paths == [0, 1, 2]


def test_cached_test_snippets_positions():
    snippets = S.stpn_cached_test_snippets(25, S.STPN_CACHED_OFFSETS, np.random.default_rng(0))
    assert [s.position for s in snippets] == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23]  # centres of 10 parts of 25
    assert all(s.tau == 5 and s.paths == [0, 1, 2] for s in snippets)


def test_paper_sampling_constants():
    assert S.STPN_MAX_TAU == 10 and S.STPN_TEST_SNIPPETS == 10  # [STPN] §3.2, §4.7
    assert math.isclose(np.mean(range(1, S.STPN_MAX_TAU + 1)), 5.5) and 0 in S.STPN_CACHED_OFFSETS
