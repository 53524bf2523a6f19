"""FstCN ([FstCN]): the factorization it rests on (eq. 2-3), the T-P operator, shapes, LRN, the ResNet lower SCLs,
its options, SCI and eq. 7, V_diff from the frame store, the 3 x 3 grid of test views and the clip sampling rules,
against numpy formulas and hand-worked cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.frame_diff import frame_difference, read_fstcn_clip
from pipeline.data.sampling import (fstcn_clip, fstcn_scl_frame, fstcn_span, fstcn_test_clips, fstcn_train_clip,
                                    eval_indices)
from pipeline.data.transforms import GRID_POSITIONS, grid_crop, grid_offsets, sample_random_crop
from pipeline.eval.scores import sci, sci_max_fuse
from pipeline.io.store import VideoStore
from pipeline.models.backbones import create_backbone
from pipeline.models.fstcn import (OPTIONS, FstCN, LowerSCLs, ResNetLowerSCLs, SpatialConvLayer, TemporalConvLayer,
                                   TransformPermute, build_fstcn)

SMALL = {"fc1": 24, "fc2": 12, "fused_width": 10}


# ------------------------------------------------------------------------------------------------
# eq. 2-3: a 3-D kernel K_xy (x) k_t is a per-frame 2-D convolution, then a per-pixel 1-D convolution
# ------------------------------------------------------------------------------------------------

def test_factorized_3d_convolution_eq2_eq3():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 7, 9, 8, generator=g, dtype=torch.float64)  # (B, C_in, m_t, m_y, m_x)
    k_xy = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)  # (O, C_in, n_y, n_x)
    k_t = torch.randn(4, 5, generator=g, dtype=torch.float64)  # one temporal kernel per output map
    kernel = k_xy[:, :, None] * k_t[:, None, :, None, None]  # eq. 2: (O, C_in, n_t, n_y, n_x)
    f_st = F.conv3d(v, kernel, padding=(2, 1, 1))  # eq. 1, "same" padding

    # eq. 3: F_s(:, :, i_t) = V(:, :, i_t) * K_xy for every frame ...
    b, _, t, h, w = v.shape
    f_s = F.conv2d(v.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w), k_xy, padding=1).reshape(b, t, 4, h, w)
    # ... then F_st(i_x, i_y, :) = F_s(i_x, i_y, :) * k_t for every pixel.
    per_pixel = f_s.permute(0, 3, 4, 2, 1).reshape(b * h * w, 4, t)
    f_st2 = F.conv1d(per_pixel, k_t[:, None, :], padding=2, groups=4).reshape(b, h, w, 4, t).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(f_st2, f_st)


# ------------------------------------------------------------------------------------------------
# T-P operator
# ------------------------------------------------------------------------------------------------

def test_tp_with_identity_is_a_reshape():
    tp = TransformPermute(6, 6)
    with torch.no_grad():
        tp.P.copy_(torch.eye(6))
    x = torch.randn(2, 4, 6, 3, 5)  # (B, t, f, x, y)
    out = tp(x).detach().numpy()
    assert out.shape == (2, 15, 4, 6)
    xn = x.numpy()
    for b in range(2):
        for i in range(3):
            for j in range(5):
                # vectorised position i*y + j holds the (t, f) plane of pixel (i, j)
                np.testing.assert_array_equal(out[b, i * 5 + j], xn[b, :, :, i, j])


def test_tp_with_a_permutation_matrix_permutes_channels():
    perm = [2, 0, 5, 1, 4, 3]  # new channel g takes old channel perm[g]
    tp = TransformPermute(6, 6)
    with torch.no_grad():
        tp.P.zero_()
        for g, c in enumerate(perm):
            tp.P[c, g] = 1.0
    x = torch.randn(1, 3, 6, 2, 2)
    out = tp(x).detach()
    vec = x.reshape(1, 3, 6, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, vec[..., perm])


def test_tp_is_learned_gaussian():
    torch.manual_seed(0)
    tp = TransformPermute(128, 128)
    assert tp.P.requires_grad
    assert abs(tp.P.std().item() - 128 ** -0.5) < 0.01 and abs(tp.P.mean().item()) < 0.01


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------

def test_204_gives_the_4x4_map_and_the_tcl_keeps_time():
    torch.manual_seed(0)
    # By hand: conv 7/2 (204 - 7) // 2 + 1 = 99; pool 3/2 ceil 49; conv 5/2 pad 1 24; pool 3/2 ceil 12;
    # conv 3/1 pad 1 12 (twice); SCL conv 12, pool 3/3 ceil (12 - 3) / 3 + 1 = 4.
    lower = LowerSCLs()
    with torch.no_grad():
        low = lower(torch.randn(2, 3, 204, 204))
        assert low.shape == (2, 512, 12, 12)
        assert SpatialConvLayer(512)(low).shape == (2, 128, 4, 4)
    model = FstCN(num_classes=3, lower_scls=lower, **{"fc_widths": (24, 12), "fused_width": 10})
    assert model.map_size == 4
    tp_out = model.tp(torch.randn(2, 5, 128, 4, 4))
    assert tp_out.shape == (2, 16, 5, 128)
    assert model.tcl(tp_out).shape == (2, 64, 5, 128)  # 3x3 and 5x5, 32 each; l_t = 5 kept
    out = model({"diff": torch.randn(1, 5, 3, 204, 204), "frame": torch.randn(1, 3, 204, 204)})
    assert out["logits"].shape == (1, 3)


@pytest.mark.parametrize("size", [64, 100, 204])
def test_map_sizes_computed_without_running_match_the_layers(size):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for lower in (LowerSCLs(), ResNetLowerSCLs("resnet18", layers="layer3"), ResNetLowerSCLs("resnet18")):
            assert lower.eval()(x).shape[-1] == lower.output_size(size)


def test_tcl_has_no_temporal_pooling_and_local_support():
    tcl = TemporalConvLayer(4, kernels=(3, 5), filters=2).eval()
    x = torch.randn(1, 4, 9, 6)
    y = tcl(x)
    assert y.shape == (1, 4, 9, 6)
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change time step 0: the 5 x 5 branch reaches t <= 2 only
    y2 = tcl(x2)
    assert not torch.equal(y[:, :, :3], y2[:, :, :3])
    torch.testing.assert_close(y[:, :, 3:], y2[:, :, 3:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# LRN: Caffe's formula with [FstCN] §2.5's constants
# ------------------------------------------------------------------------------------------------

def _lrn_numpy(a: np.ndarray, k=2.0, n=5, alpha=5e-4, beta=0.75) -> np.ndarray:
    """Caffe ACROSS_CHANNELS: b_c = a_c / (k + alpha / n * sum_{c' in [c - 2, c + 2]} a_c'^2)^beta (= AlexNet's
    b = a / (k + 1e-4 * sum a^2)^beta)."""
    out = np.empty_like(a)
    channels = a.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels, c + n // 2 + 1)
        out[:, c] = a[:, c] / (k + alpha / n * (a[:, lo:hi] ** 2).sum(axis=1)) ** beta
    return out


def test_lrn_matches_caffe_formula_with_paper_constants():
    lower = LowerSCLs()
    a = np.random.default_rng(0).normal(0, 60, size=(2, 9, 3, 4))  # large enough for the sum to matter
    expected = _lrn_numpy(a)
    assert np.abs(expected - a / 2 ** 0.75).max() > 0.1  # the normalisation is not negligible here
    for norm in (lower.norm1, lower.norm2):
        got = norm(torch.from_numpy(a)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# The network: inputs, loss, scores, auxiliary classifier
# ------------------------------------------------------------------------------------------------

def _tiny(**options) -> FstCN:
    torch.manual_seed(0)
    return build_fstcn(num_classes=3, lower="resnet", backbone_arch="resnet18", input_size=64,
                       trunk_layers="layer3", **{**SMALL, **options})


def test_the_scl_path_takes_the_middle_clip_frame_at_test():
    model = _tiny().eval()
    clip, diff = torch.randn(2, 5, 3, 64, 64), torch.randn(2, 5, 3, 64, 64)
    with torch.no_grad():
        a = model({"diff": diff, "clip": clip})["logits"]
        b = model({"diff": diff, "frame": clip[:, 2]})["logits"]
        c = model({"diff": diff, "frame": clip[:, 0]})["logits"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    model.train()
    with pytest.raises(ValueError, match="random frame"):
        model({"diff": diff, "clip": clip})
    with pytest.raises(ValueError, match="l_t = 5"):
        model({"diff": diff[:, :4], "frame": clip[:, 0]})
    with pytest.raises(ValueError, match="input_size = 64"):
        model({"diff": torch.randn(2, 5, 3, 60, 60), "frame": clip[:, 0]})


def test_diff_feeds_the_tcl_and_the_frame_the_scl():
    tcl_only, scl_only = _tiny(paths="tcl").eval(), _tiny(paths="scl").eval()
    diff, frame = torch.randn(1, 5, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = tcl_only({"diff": diff})["logits"]
        torch.testing.assert_close(tcl_only({"diff": diff, "frame": frame + 1})["logits"], t)
        s = scl_only({"frame": frame})["logits"]
        torch.testing.assert_close(scl_only({"frame": frame, "diff": diff + 1})["logits"], s)


def test_loss_scores_and_gradients():
    model = _tiny(auxiliary=True)
    batch = {"diff": torch.randn(2, 5, 3, 64, 64), "frame": torch.randn(2, 3, 64, 64)}
    labels = torch.tensor([0, 2])
    out = model(batch)
    loss = model.loss(out, labels)
    torch.testing.assert_close(loss, F.nll_loss(F.log_softmax(out["logits"], -1), labels))
    torch.testing.assert_close(model.class_scores(out).sum(-1), torch.ones(2))
    loss.backward()
    assert model.tp.P.grad is not None and model.tp.P.grad.abs().sum() > 0
    assert model.aux.classifier.weight.grad is None  # one loss: the auxiliary classifier is not in it
    model.zero_grad(set_to_none=True)
    aux = model.forward_auxiliary(torch.randn(4, 3, 64, 64))
    assert aux["logits"].shape == (4, 3)
    model.loss(aux, torch.tensor([0, 1, 2, 0])).backward()
    trained = {id(p) for p in model.auxiliary_parameters()}
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in trained)


# ------------------------------------------------------------------------------------------------
# ResNet lower SCLs from a finetune checkpoint's state dict
# ------------------------------------------------------------------------------------------------

def test_resnet_lower_scls_are_the_finetuned_trunk():
    torch.manual_seed(1)
    backbone = create_backbone("resnet18", num_classes=3).eval()
    state = {f"module.{k}": v for k, v in backbone.state_dict().items()}  # as saved under DDP
    lower = ResNetLowerSCLs("resnet18", state).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lower(x).mean(dim=(2, 3)), backbone.forward_features(x))
    assert lower.out_channels == 512 and ResNetLowerSCLs("resnet18", layers="layer3").out_channels == 256
    net = FstCN.from_finetuned(backbone.state_dict(), rgb_arch="resnet18", num_classes=3, input_size=64, **SMALL)
    with torch.no_grad():
        torch.testing.assert_close(net.lower.eval()(x).mean(dim=(2, 3)), backbone.forward_features(x))


def test_resnet_lower_scls_refuse_what_does_not_fit():
    flow = create_backbone("resnet18", num_classes=3, in_channels=20).state_dict()
    with pytest.raises(ValueError, match="RGB"):
        ResNetLowerSCLs("resnet18", flow)
    with pytest.raises(ValueError, match="trunk"):
        ResNetLowerSCLs("resnet18", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ValueError, match="does not fit resnet34"):
        ResNetLowerSCLs("resnet34", create_backbone("resnet18", num_classes=3).state_dict())
    with pytest.raises(ValueError, match="backbone_arch"):
        build_fstcn(num_classes=3, lower="resnet")


# ------------------------------------------------------------------------------------------------
# Options -> model: every option in OPTIONS reaches the module it names
# ------------------------------------------------------------------------------------------------

def _kernels(m):
    return tuple(b[0].kernel_size[0] for b in m.tcl.branches)


PROBES = {
    "lower": ("paper", lambda m: type(m.lower).__name__, "LowerSCLs"),
    "trunk_layers": ("layer4", lambda m: m.map_size, 1),  # 64 px: layer4 2 x 2 -> 1 x 1 (layer3: 2 x 2)
    "l_t": (3, lambda m: m.tcl_fc[0][0].in_features, 64 * 3 * 128),
    "input_size": (100, lambda m: m.map_size, 3),  # layer3: 7 x 7 -> 3 x 3
    "tcl_kernels": ("5", _kernels, (5,)),
    "tcl_filters": (7, lambda m: m.tcl.out_channels, 14),
    "tcl_dropout": (0.25, lambda m: m.tcl.branches[1][2].p, 0.25),
    "scl_channels": (16, lambda m: (m.scl.out_channels, tuple(m.tp.P.shape)), (16, (16, 128))),
    "permuted_channels": (8, lambda m: tuple(m.tp.P.shape), (128, 8)),
    "fc1": (30, lambda m: m.scl_fc[0][0].out_features, 30),
    "fc2": (9, lambda m: (m.scl_fc[1][0].out_features, m.fuse_fc[0].in_features), (9, 18)),
    "fused_width": (11, lambda m: m.classifier.in_features, 11),
    "fc_dropout": (0.125, lambda m: m.fuse_fc[2].p, 0.125),
    "share_scl": (True, lambda m: m.tcl_scl is m.scl, True),
    "paths": ("tcl", lambda m: (hasattr(m, "scl"), m.classifier.in_features), (False, 12)),
    "auxiliary": (True, lambda m: type(m.aux).__name__, "AuxiliaryClassifier"),
}


def test_probes_cover_every_option():
    assert set(PROBES) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_option_reaches_the_model(name):
    value, probe, expected = PROBES[name]
    base = {"lower": "resnet", "trunk_layers": "layer3", "input_size": 64}
    options = {**SMALL, **base, name: value}
    if name == "lower":
        options.update(input_size=100)  # the paper's stack needs a larger input for a non-empty map
    torch.manual_seed(0)
    default = build_fstcn(num_classes=3, backbone_arch="resnet18",
                          **{**SMALL, **base, **({"input_size": 100} if name == "lower" else {})})
    model = build_fstcn(num_classes=3, backbone_arch="resnet18" if options["lower"] == "resnet" else None, **options)
    assert probe(model) == expected
    assert probe(default) != expected  # the default differs: the option, not chance, gave the value


def test_paper_defaults():
    assert {k: v for k, (v, _) in OPTIONS.items() if k in ("l_t", "input_size", "tcl_kernels", "tcl_filters",
            "scl_channels", "permuted_channels", "fc1", "fc2", "fused_width")} == {
        "l_t": 5, "input_size": 204, "tcl_kernels": "3,5", "tcl_filters": 32, "scl_channels": 128,
        "permuted_channels": 128, "fc1": 4096, "fc2": 2048, "fused_width": 2048}
    with pytest.raises(ValueError, match="unknown FstCN option"):
        build_fstcn(num_classes=3, widths=3)
    with pytest.raises(ValueError, match="odd"):
        TemporalConvLayer(4, kernels=(4,))


# ------------------------------------------------------------------------------------------------
# SCI (eq. 5) and eq. 7
# ------------------------------------------------------------------------------------------------

def test_sci_one_hot_is_one_uniform_is_zero():
    torch.testing.assert_close(sci(torch.eye(7)), torch.ones(7))
    torch.testing.assert_close(sci(torch.full((3, 7), 1 / 7)), torch.zeros(3), atol=1e-6, rtol=0)


def test_eq7_max_over_clips_after_sci_by_hand():
    clip1 = [[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]  # SCI 0.25, 1: (0.25 p1 + p2) / 1.25 = (0.9, 0.06, 0.04)
    clip2 = [[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]  # SCI 1, 0.25: (p1 + 0.25 p2) / 1.25 = (0, 0.9, 0.1)
    uniform = [[0.25, 0.25, 0.25, 0.25]] * 2
    scores = torch.tensor([[clip1, clip2], [clip2, clip1]])
    torch.testing.assert_close(sci_max_fuse(scores), torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1]]))
    torch.testing.assert_close(sci_max_fuse(torch.tensor([[uniform]])), torch.tensor([[0.25] * 4]))
    with pytest.raises(ValueError, match=r"\(V, M, views, C\)"):
        sci_max_fuse(torch.ones(2, 3, 4))


# ------------------------------------------------------------------------------------------------
# V_diff from the frame store (eq. 4)
# ------------------------------------------------------------------------------------------------

def _store_with_video(tmp_path, num_frames):
    frames = np.random.default_rng(3).integers(0, 256, size=(num_frames, 12, 16, 3), dtype=np.uint8)
    store = VideoStore(tmp_path / "frames")
    with store.writer("A/v1") as w:
        w.write_images("frames", frames, codec="raw")
    return store, frames.astype(np.int64).transpose(0, 3, 1, 2)  # (T, 3, H, W)


def test_vdiff_is_frame_t_minus_frame_t_plus_9_from_the_store(tmp_path):
    store, v = _store_with_video(tmp_path, 32)
    clip, diff = read_fstcn_clip(store, "A/v1", fstcn_clip(2, 32))
    assert clip.shape == diff.shape == (5, 3, 12, 16) and diff.dtype == torch.uint8
    for k, t in enumerate([2, 7, 12, 17, 22]):
        np.testing.assert_array_equal(clip[k].numpy(), v[t])
        np.testing.assert_array_equal(diff[k].numpy(), np.abs(v[t] - v[t + 9]))
    # One crop and flip for both: the cropped, mirrored |difference|.
    crop = sample_random_crop(12, 16, 8, np.random.default_rng(0))._replace(flip=True)
    c2, d2 = read_fstcn_clip(store, "A/v1", fstcn_clip(2, 32), crop=crop)
    box = (slice(None), slice(crop.top, crop.top + 8), slice(crop.left, crop.left + 8))
    for k, t in enumerate([2, 7, 12, 17, 22]):
        np.testing.assert_array_equal(c2[k].numpy(), v[t][box][..., ::-1])
        np.testing.assert_array_equal(d2[k].numpy(), np.abs(v[t] - v[t + 9])[box][..., ::-1])


def test_vdiff_in_a_short_video_clamps_the_partner(tmp_path):
    store, v = _store_with_video(tmp_path, 20)
    _, diff = read_fstcn_clip(store, "A/v1", fstcn_clip(0, 20))
    for k, (t, u) in enumerate([(0, 9), (5, 14), (10, 19), (15, 19), (19, 19)]):
        np.testing.assert_array_equal(diff[k].numpy(), np.abs(v[t] - v[u]))


def test_frame_difference_is_exact_on_uint8():
    a = torch.tensor([0, 255, 10, 200], dtype=torch.uint8)
    b = torch.tensor([255, 0, 12, 100], dtype=torch.uint8)
    assert frame_difference(a, b).tolist() == [255, 255, 2, 100]


# ------------------------------------------------------------------------------------------------
# The 3 x 3 grid of test views (Fig. 3)
# ------------------------------------------------------------------------------------------------

def test_grid_positions_by_hand():
    # 320 x 240 frames (UCF101), 204 crops: rows 0, 18, 36; columns 0, 58, 116.
    assert grid_offsets(240, 320, 204) == [(0, 0), (0, 58), (0, 116), (18, 0), (18, 58), (18, 116),
                                           (36, 0), (36, 58), (36, 116)]
    assert GRID_POSITIONS[5] == "middle_right"
    x = (torch.arange(2 * 3 * 7 * 9) % 256).reshape(2, 3, 7, 9).to(torch.uint8)  # (l_t, C, H, W)
    views = grid_crop(x, 5)
    assert views.shape == (18, 2, 3, 5, 5)
    # 7 x 9, 5 x 5 crops: rows 0, 1, 2; columns 0, 2, 4.
    for v, (top, left) in enumerate([(r, c) for r in (0, 1, 2) for c in (0, 2, 4)]):
        assert torch.equal(views[v], x[..., top:top + 5, left:left + 5])
        assert torch.equal(views[9 + v], x[..., top:top + 5, left:left + 5].flip(-1))
    with pytest.raises(ValueError, match="5x5"):
        grid_crop(x[..., :4, :], 5)


def test_random_crop_is_uniform_over_places():
    seen = {sample_random_crop(6, 7, 4, np.random.default_rng(s))[:2] for s in range(300)}
    assert seen == {(t, l) for t in range(3) for l in range(4)}


# ------------------------------------------------------------------------------------------------
# Sampling rules
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start, num_frames, frames, partners", [
    (0, 32, [0, 5, 10, 15, 20], [9, 14, 19, 24, 29]),
    (2, 32, [2, 7, 12, 17, 22], [11, 16, 21, 26, 31]),
    (0, 20, [0, 5, 10, 15, 19], [9, 14, 19, 19, 19]),  # short: clamped to the last frame
    (0, 1, [0] * 5, [0] * 5),
])
def test_fstcn_clip_table(start, num_frames, frames, partners):
    clip = fstcn_clip(start, num_frames)
    assert (clip.frames, clip.partners) == (frames, partners)


def test_fstcn_train_clip_fits_and_covers_every_start():
    assert fstcn_span() == 30
    starts = {fstcn_train_clip(32, np.random.default_rng(s)).start for s in range(200)}
    assert starts == {0, 1, 2}
    assert fstcn_train_clip(30, np.random.default_rng(0)).partners[-1] == 29
    assert fstcn_train_clip(12, np.random.default_rng(0)).start == 0


@pytest.mark.parametrize("num_frames, num_clips, starts", [
    (100, 5, [7, 21, 35, 49, 63]),  # 71 valid starts: (71 * (2k + 1)) // 10
    (32, 5, [0, 0, 1, 2, 2]),
    (30, 3, [0, 0, 0]),
    (12, 2, [0, 0]),
])
def test_fstcn_test_clips_table(num_frames, num_clips, starts):
    clips = fstcn_test_clips(num_frames, num_clips)
    assert [c.start for c in clips] == starts
    assert all(max(c.partners) < num_frames for c in clips)
    assert starts == eval_indices(max(num_frames - 29, 1), num_clips)


def test_scl_frame_middle_at_test_random_in_training():
    assert [fstcn_scl_frame(n) for n in (1, 4, 5, 7)] == [0, 1, 2, 3]
    assert {fstcn_scl_frame(5, np.random.default_rng(s)) for s in range(100)} == set(range(5))
