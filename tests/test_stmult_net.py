"""The Spatiotemporal Multiplier network ([ST-Mult]) against the paper's equations, hand computations, plain
torchvision ResNets and numpy; ResNet-18 streams on 2 x 3 x 3 x 64 x 64 clips so the file runs in seconds."""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from pipeline.data import sampling
from pipeline.models.backbones import create_backbone
from pipeline.models.stmult_net import (OPTIONS, MotionGate, STMultiplierNet, TemporalConv, build_stmult_net,
                                        gated_residual)

C = 5          # classes
L2 = 20        # 2L flow channels
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _finetuned_state(in_channels: int, seed: int) -> dict:
    """A finetune checkpoint's 'model' entry: a ResNet-18 Backbone with non-trivial BN statistics and head."""
    torch.manual_seed(seed)
    bb = create_backbone("resnet18", num_classes=C, in_channels=in_channels)
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        bb.fc.weight.normal_(0, 0.1)
        bb.fc.bias.normal_(0, 0.1)
    return copy.deepcopy(bb.state_dict())


@pytest.fixture(scope="module")
def states():
    return _finetuned_state(3, 0), _finetuned_state(L2, 1)


@pytest.fixture(scope="module")
def default_net(states):
    """The network with every option at its default (read only)."""
    return _net(states)


def _net(states, **options) -> STMultiplierNet:
    return STMultiplierNet.from_finetuned(states[0], states[1], rgb_arch="resnet18", flow_arch="resnet18",
                                          num_classes=C, flow_in_channels=L2, **options)


def _batch(b=2, t=3, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(b, t, 3, h, w, generator=g), "flow": torch.randn(b, t, L2, h, w, generator=g)}


def _plain_resnet(state: dict) -> nn.Module:
    """The finetuned appearance backbone as a plain torchvision ResNet-18 (its own forward)."""
    ref = resnet18(num_classes=C)
    ref.load_state_dict({k.removeprefix("trunk."): v for k, v in state.items()})
    return ref.eval()


class _ConstantMotion(nn.Module):
    """The gate with its motion input replaced by a constant (f(1) = 1, f(0) = 0)."""

    def __init__(self, gate: MotionGate, value: float) -> None:
        super().__init__()
        self.gate, self.value = gate, value

    def forward(self, xa, xm):
        return self.gate(xa, torch.full_like(xm, self.value))


# ---------------------------------------------------------------------------------------- eq. 6-7: gradients

@pytest.mark.parametrize("appearance", ["pre_relu", "post_relu"])
def test_gradients_of_the_gated_unit_follow_eq_6_and_7(appearance):
    # Toy linear residual F(z) = W z on (N, D) vectors, loss L = <g, x̂>; by the chain rule
    # dL/dxm = (Wᵀg) ⊙ a ⊙ 1[xm > 0], dL/dxa = g ⊙ 1[xa > 0] + (Wᵀg) ⊙ f(xm) ⊙ da/dxa with a = xa
    # (eq. 5) or f(xa) (post-ReLU): the residual's gradient is scaled by the motion signal f(xm) (eq. 6).
    rng = np.random.default_rng(3)
    n, d = 6, 4
    xa_np, xm_np = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w_np, g_np = rng.normal(size=(d, d)), rng.normal(size=(n, d))
    xa = torch.tensor(xa_np, requires_grad=True)
    xm = torch.tensor(xm_np, requires_grad=True)
    w = torch.tensor(w_np)
    out = gated_residual(MotionGate(appearance), lambda z: z @ w.T, xa, xm)
    (out * torch.tensor(g_np)).sum().backward()

    wtg = g_np @ w_np                       # rows: Wᵀ g
    relu_m, step_a, step_m = np.maximum(xm_np, 0), (xa_np > 0) * 1.0, (xm_np > 0) * 1.0
    a = xa_np if appearance == "pre_relu" else np.maximum(xa_np, 0)
    da = 1.0 if appearance == "pre_relu" else step_a
    np.testing.assert_allclose(xm.grad.numpy(), wtg * a * step_m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xa.grad.numpy(), g_np * step_a + wtg * relu_m * da, rtol=1e-12, atol=1e-12)
    # and the forward value of eq. 5
    np.testing.assert_allclose(out.detach().numpy(), np.maximum(xa_np, 0) + (a * relu_m) @ w_np.T, rtol=1e-12)


def test_gradients_flow_into_the_motion_stream(states):
    # eq. 7: the appearance loss alone reaches the motion stream's first conv through the gates.
    net = _net(states).train()
    out = net(_batch())
    F.cross_entropy(out["rgb_logits"], torch.tensor([1, 3])).backward()
    grad = net.motion.backbone.trunk.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert net.motion.backbone.fc.weight.grad is None  # the flow classifier is not on that path


# ------------------------------------------------------------------------------ identity at initialisation

@pytest.mark.parametrize("pool", ["max", "avg"])
def test_identity_at_init_equals_the_finetuned_appearance_resnet(states, pool):
    # Centre-initialised temporal filters + the gate's motion input replaced by ones (post-ReLU product:
    # f(xa) ⊙ 1 is exactly the input a plain unit gets) -> the appearance stream is the finetuned ResNet-18.
    net = _net(states, gate_appearance="post_relu", temporal_pool=pool).eval()
    net.gate = _ConstantMotion(net.gate, 1.0)
    ref = _plain_resnet(states[0])
    batch = _batch()
    frames = batch["rgb"].flatten(0, 1)
    with torch.no_grad():
        # per frame (T = 1): the logits of a plain torchvision forward on each frame
        per_frame = net({"rgb": frames[:, None], "flow": batch["flow"].flatten(0, 1)[:, None]})["rgb_logits"]
        torch.testing.assert_close(per_frame, ref(frames), rtol=1e-5, atol=1e-5)
        # whole clips: the temporal convs mix nothing across frames; max (eq. 10) or mean over time of the
        # plain per-frame feature maps, then the spatial mean and the classifier
        maps = nn.Sequential(*list(ref.children())[:-2])(frames).unflatten(0, (2, 3))
        pooled = maps.amax(dim=1) if pool == "max" else maps.mean(dim=1)
        expected = ref.fc(pooled.mean(dim=(-2, -1)))
        torch.testing.assert_close(net(batch)["rgb_logits"], expected, rtol=1e-5, atol=1e-5)


def test_temporal_conv_center_is_identity_and_avg_is_a_zero_padded_moving_average():
    b, t, c, h, w = 2, 4, 3, 2, 2
    x = torch.randn(b * t, c, h, w)
    torch.testing.assert_close(TemporalConv(c, init="center")(x, t), x, rtol=0, atol=0)
    xs = x.numpy().reshape(b, t, c, h, w)
    padded = np.concatenate([np.zeros_like(xs[:, :1]), xs, np.zeros_like(xs[:, :1])], axis=1)
    expected = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3.0   # y_t = (x_{t-1} + x_t + x_{t+1}) / 3
    conv = TemporalConv(c, init="avg").train()  # no BatchNorm after it: training mode changes nothing
    got = conv(x, t).detach().numpy().reshape(b, t, c, h, w)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # eq. 8-9's parameters: W = I ⊗ f (a (3, 1, 1) kernel), b = 0
    wt = conv.conv.weight.detach()
    assert wt.shape == (c, c, 3, 1, 1) and conv.conv.bias.abs().sum() == 0
    for o in range(c):
        for i in range(c):
            np.testing.assert_allclose(wt[o, i, :, 0, 0].numpy(), [1 / 3] * 3 if o == i else [0] * 3, atol=1e-7)


# ---------------------------------------------------------------------------- the gate is in the residual branch

def test_zero_motion_leaves_the_skip_path_unchanged(states):
    # Motion input zeroed: the gated unit is f(xa) + F(0) -- its skip path still carries the appearance.
    # Reference: the plain ResNet whose block b computes relu(x + F(0)), F written out from torchvision's
    # BasicBlock (conv1, bn1, relu, conv2, bn2).
    net = _net(states).eval()
    net.gate = _ConstantMotion(net.gate, 0.0)
    ref = _plain_resnet(states[0])

    class ZeroInputBranch(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x):
            blk, z = self.blk, torch.zeros_like(x)
            return torch.relu(x + blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(z))))))

    for s in STAGES:
        getattr(ref, s)[1] = ZeroInputBranch(getattr(ref, s)[1])
    batch = _batch(t=1)
    with torch.no_grad():
        torch.testing.assert_close(net(batch)["rgb_logits"], ref(batch["rgb"][:, 0]), rtol=1e-5, atol=1e-5)


def test_motion_reaches_appearance_only_through_the_residual_branches(states):
    # With the gated units' residual branches silenced (last BN's weight and bias 0: F(z) = 0 for any z), the
    # appearance logits no longer depend on the flow at all: nothing of the motion enters a skip path.
    net = _net(states).eval()
    for s in STAGES:
        bn = getattr(net.appearance.backbone.trunk, s)[1].bn2
        nn.init.zeros_(bn.weight), nn.init.zeros_(bn.bias)
    a, b = _batch(seed=0), _batch(seed=1)
    with torch.no_grad():
        la = net(a)["rgb_logits"]
        lb = net({"rgb": a["rgb"], "flow": b["flow"]})["rgb_logits"]
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    # ... while in the network as built the flow does change the appearance logits
    net2 = _net(states).eval()
    with torch.no_grad():
        assert not torch.allclose(net2(a)["rgb_logits"], net2({"rgb": a["rgb"], "flow": b["flow"]})["rgb_logits"])


# ------------------------------------------------------------------------------- logits, losses, scores

def _log_softmax_np(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_logits_can_be_negative_and_the_loss_is_two_cross_entropies(states):
    net = _net(states).eval()
    with torch.no_grad():
        out = net(_batch())
    ra, rm = out["rgb_logits"].numpy().astype(np.float64), out["flow_logits"].numpy().astype(np.float64)
    assert (ra < 0).any() and (rm < 0).any()  # no ReLU before the loss
    y = np.array([4, 0])
    expected = -_log_softmax_np(ra)[np.arange(2), y].mean() - _log_softmax_np(rm)[np.arange(2), y].mean()
    assert net.loss(out, torch.tensor(y)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fusion, w", [("logits", 1.0), ("logits", 3.0), ("softmax", 1.0), ("softmax", 3.0)])
def test_class_scores_fuse_the_two_streams(states, fusion, w):
    net = _net(states, fusion=fusion, flow_weight=w).eval()
    with torch.no_grad():
        out = net(_batch())
    ra, rm = out["rgb_logits"].numpy().astype(np.float64), out["flow_logits"].numpy().astype(np.float64)
    if fusion == "logits":  # §5.3 / the released test: the prediction layer outputs averaged, then softmax
        p = np.exp(_log_softmax_np((ra + w * rm) / (1 + w)))
    else:                   # the softmaxes averaged
        p = (np.exp(_log_softmax_np(ra)) + w * np.exp(_log_softmax_np(rm))) / (1 + w)
    np.testing.assert_allclose(net.class_scores(out).numpy(), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(F.softmax(out["logits"], dim=-1).numpy(), p, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- the released defaults

RELEASED = {  # option -> the released setting (feichtenhofer/st-resnet STMulNet.m) / the paper
    "gate_appearance": "pre_relu",     # fusionLayer {'res2a_relu' (motion), 'res2a' (appearance Sum)}
    "temporal_placement": "residual",  # addConv3D = 9: after every b_branch2b's ReLU (Table 3 ‡)
    "temporal_init": "center",         # addConv3D = 9: initParamsCtrTime, f = [0, 1, 0]
    "temporal_pool": "max",            # addPool3D = 2: max over time at res5c_relu (eq. 10)
    "dropout": 0.8,                    # opts.dropOutRatio = 0.8 (§4.1)
    "fusion": "logits",                # cnn_train_dag.m: the two prediction layers' outputs averaged (§5.3)
    "flow_weight": 1.0,                # §5.3: averaged predictions (3 is HMDB51's late fusion)
    "checkpointing": False,            # not a model setting: off unless asked
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_settings_are_the_defaults(name, default_net):
    assert set(OPTIONS) == set(RELEASED)
    default = RELEASED[name]
    assert OPTIONS[name][0] == default and OPTIONS[name][1]
    assert inspect.signature(STMultiplierNet).parameters[name].default == default
    assert getattr(default_net, name) == default


def _placements(net):
    return {s: (s in net.appearance.residual_temporal, s in net.appearance.skip_temporal) for s in STAGES}


@pytest.mark.parametrize("name, value, check", [
    ("gate_appearance", "post_relu", lambda n: n.gate.appearance == "post_relu"),
    ("temporal_placement", "conv5", lambda n: _placements(n) == {
        "layer1": (False, False), "layer2": (False, False), "layer3": (False, False), "layer4": (True, False)}),
    ("temporal_placement", "skip", lambda n: all(v == (False, True) for v in _placements(n).values())),
    ("temporal_placement", "residual+skip", lambda n: all(v == (True, True) for v in _placements(n).values())),
    ("temporal_placement", "none", lambda n: all(v == (False, False) for v in _placements(n).values())),
    ("temporal_init", "avg", lambda n: torch.allclose(n.motion.residual_temporal["layer2"].conv.weight[0, 0, :, 0, 0],
                                                      torch.full((3,), 1 / 3))),
    ("temporal_pool", "avg", lambda n: n.temporal_pool == "avg"),
    ("dropout", 0.5, lambda n: n.appearance.backbone.head_drop.p == 0.5 and n.motion.backbone.head_drop.p == 0.5),
    ("fusion", "softmax", lambda n: n.fusion == "softmax"),
    ("flow_weight", 3.0, lambda n: n.flow_weight == 3.0),
    ("checkpointing", True, lambda n: n.appearance.checkpointing and n.motion.checkpointing),
])
def test_each_option_reaches_the_network(states, default_net, name, value, check):
    assert check(_net(states, **{name: value}))
    assert not check(default_net)


def test_default_placement_and_widths():
    # ‡: one temporal conv in block b of every stage, after its 3x3 conv block, in both streams; channels =
    # the 3x3 conv's (ResNet-18: its first conv; ResNet-50/152: the bottleneck's middle conv).
    with torch.device("meta"):
        small = build_stmult_net(num_classes=C, rgb_arch="resnet18", flow_arch="resnet18")
        best = build_stmult_net(num_classes=101, temporal_placement="residual+skip")  # R50 + R152 (§5.3)
    for net, branch, skip in ((small, [64, 128, 256, 512], None), (best, [64, 128, 256, 512], [256, 512, 1024, 2048])):
        for stream in (net.appearance, net.motion):
            assert [stream.residual_temporal[s].conv.in_channels for s in STAGES] == branch
            if skip is not None:
                assert [stream.skip_temporal[s].conv.in_channels for s in STAGES] == skip
    assert best.appearance.backbone.arch == "resnet50" and best.motion.backbone.arch == "resnet152"
    with torch.device("meta"):  # the paper's best pair runs (shapes only)
        out = best({"rgb": torch.empty(1, 5, 3, 224, 224), "flow": torch.empty(1, 5, L2, 224, 224)})
    assert out["logits"].shape == (1, 101)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rgb_arch="resnet18", flow_arch="resnet50"), "stage widths"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", temporal_init="ones"), "temporal_init"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", temporal_placement="everywhere"), "temporal_placement"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", gate_appearance="both"), "gate_appearance"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", temporal_pool="sum"), "temporal_pool"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", dropout=1.0), "dropout"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", fusion="max"), "fusion"),
    (dict(rgb_arch="resnet18", flow_arch="resnet18", num_segments=3), "unknown ST-Multiplier option"),
    (dict(rgb_arch="inception_v3", flow_arch="resnet18"), "torchvision ResNet"),
])
def test_bad_settings_are_refused(kwargs, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        build_stmult_net(num_classes=C, **kwargs)


def test_finetuned_states_load_and_a_wrong_one_is_named(states):
    net = _net(states)
    for stream, state in ((net.appearance, states[0]), (net.motion, states[1])):
        got = stream.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="motion state dict does not fit resnet18 with in_channels=20"):
        build_stmult_net(num_classes=C, rgb_arch="resnet18", flow_arch="resnet18", flow_state=states[0])
    with pytest.raises(ValueError, match=r"appearance finetune state dict has no \(7, 512\) classifier"):
        build_stmult_net(num_classes=7, rgb_arch="resnet18", flow_arch="resnet18", rgb_state=states[0])
    with pytest.raises(ValueError, match="holds no backbone weights"):
        build_stmult_net(num_classes=C, rgb_arch="resnet18", flow_arch="resnet18",
                         rgb_state={k.removeprefix("trunk."): v for k, v in states[0].items()})


# ------------------------------------------------------------------------------------ shapes, checkpointing

@pytest.mark.parametrize("t, h, w", [(1, 64, 64), (4, 48, 80), (2, 33, 57)])
def test_fully_convolutional_in_space_and_time(states, t, h, w):
    net = _net(states).eval()
    with torch.no_grad():
        out = net(_batch(b=1, t=t, h=h, w=w))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (1, C) for k in ("rgb_logits", "flow_logits", "logits")}


def test_mismatched_inputs_are_refused(states):
    net = _net(states)
    b = _batch()
    with pytest.raises(ValueError, match="same B, T, H, W"):
        net({"rgb": b["rgb"], "flow": b["flow"][:, :2]})
    with pytest.raises(ValueError, match="flow 20"):
        net({"rgb": b["rgb"], "flow": b["flow"][:, :, :10]})


def test_checkpointing_gives_identical_gradients_and_statistics(states):
    base = _net(states).train()
    ckpt = copy.deepcopy(base)
    ckpt.set_checkpointing(True)
    batch, y = _batch(), torch.tensor([2, 1])
    calls = []
    ckpt.appearance.backbone.trunk.layer3[1].conv1.register_forward_hook(lambda *a: calls.append(1))
    for net in (base, ckpt):
        torch.manual_seed(5)  # the same dropout masks
        net.loss(net(batch), y).backward()
    assert len(calls) == 2  # the unit was recomputed in the backward pass
    gb, gc = dict(base.named_parameters()), dict(ckpt.named_parameters())
    for k, p in gb.items():
        torch.testing.assert_close(gc[k].grad, p.grad, rtol=1e-6, atol=1e-7, msg=k)
    sb, sc = base.state_dict(), ckpt.state_dict()
    for k, v in sb.items():  # BatchNorm running statistics updated once, as without checkpointing
        assert torch.equal(sc[k], v), k


# ------------------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("num_frames, strides, starts", [
    (200, range(5, 36), None),       # the paper's 5..35
    (41, range(5, 11), None),        # cap = 40 // 4 = 10
    (21, [5], [0]),                  # cap 5: exactly 0, 5, 10, 15, 20
    (13, [3], [0]),                  # cap 3 < 5: the largest stride that fits
    (5, [1], [0]),                   # every frame
])
def test_stmult_train_indices_table(num_frames, strides, starts):
    seen_strides, seen_starts = set(), set()
    for seed in range(400):
        idx = sampling.stmult_train_indices(num_frames, np.random.default_rng(seed))
        assert len(idx) == 5 and 0 <= idx[0] and idx[-1] < num_frames
        steps = {b - a for a, b in zip(idx, idx[1:])}
        assert len(steps) == 1
        seen_strides |= steps
        seen_starts.add(idx[0])
    assert seen_strides == set(strides)  # every allowed stride is drawn, no other
    if starts is not None:
        assert seen_starts == set(starts)


def test_stmult_train_indices_documented_draws():
    rng = np.random.default_rng(11)
    stride = int(rng.integers(5, 36))
    start = int(rng.integers(0, 300 - 4 * stride))
    assert sampling.stmult_train_indices(300, np.random.default_rng(11)) == [start + k * stride for k in range(5)]


@pytest.mark.parametrize("num_frames, expected", [(3, [0, 0, 1, 2, 2]), (1, [0] * 5), (4, [0, 1, 2, 2, 3])])
def test_stmult_train_indices_short_video_repeats_evenly_spaced_frames(num_frames, expected):
    # fewer frames than T = 5: the centres of 5 equal parts, (n * (2k + 1)) // 10 (hand-computed)
    assert sampling.stmult_train_indices(num_frames, np.random.default_rng(0)) == expected


@pytest.mark.parametrize("num_frames, chunk_size, expected", [
    (100, 25, [list(range(2, 100, 4))]),
    (100, 5, [list(range(2 + 20 * c, 20 * (c + 1), 4)) for c in range(5)]),
    (10, 25, [[(10 * (2 * k + 1)) // 50 for k in range(25)]]),
])
def test_stmult_test_chunks_table(num_frames, chunk_size, expected):
    assert sampling.stmult_test_chunks(num_frames, chunk_size=chunk_size) == expected


@pytest.mark.parametrize("call, match", [
    (lambda: sampling.stmult_test_chunks(100, chunk_size=7), "does not divide"),
    (lambda: sampling.stmult_train_indices(0, np.random.default_rng(0)), "positive int"),
    (lambda: sampling.stmult_train_indices(50, np.random.default_rng(0), min_stride=9, max_stride=3), "exceeds"),
])
def test_stmult_sampling_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
