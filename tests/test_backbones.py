"""Backbones: shapes, cross-modality init, weight files and the offline ImageNet cache (no downloads)."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.models import Inception3, resnet18

from pipeline.interop.checkpoints import convert_foreign
from pipeline.models import backbones as B


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir; any attempt to download fails the test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"attempted a download: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    return resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory, tv_resnet18):
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(tv_resnet18.state_dict(), path)
    return path


def _pooled(tv_model, x):
    """torchvision's own forward with the classifier removed: the pooled features."""
    fc, tv_model.fc = tv_model.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return tv_model(x)
    finally:
        tv_model.fc = fc


# ---------------------------------------------------------------- registry and shapes


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="resnet101.*") as info:
        B.create_backbone("vgg16", num_classes=10)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "inception_v3"):
        assert name in str(info.value)


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("in_channels", [3, 20])
def test_resnet_feature_and_logit_shapes(arch, dim, in_channels):
    torch.manual_seed(0)
    model = B.create_backbone(arch, num_classes=7, in_channels=in_channels, dropout=0.5).eval()
    assert model.num_features == dim
    x = torch.randn(1, in_channels, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (1, dim) and logits.shape == (1, 7)
    assert torch.isfinite(feats).all()
    # eval: dropout is off, forward = linear layer on the pooled features
    torch.testing.assert_close(logits, feats @ model.fc.weight.T + model.fc.bias)


def test_resnet101_constructor_only():
    model = B.create_backbone("resnet101", num_classes=101, in_channels=20)
    assert model.num_features == 2048  # [STFN] §4.2: 2048-d for ResNet-101
    assert model.trunk.conv1.weight.shape == (64, 20, 7, 7)
    assert model.fc.weight.shape == (101, 2048)


def test_gradients_reach_first_conv_of_flow_stream():
    model = B.create_backbone("resnet18", num_classes=3, in_channels=20)
    model(torch.randn(2, 20, 64, 64)).sum().backward()
    assert model.trunk.conv1.weight.grad is not None and model.trunk.conv1.weight.grad.abs().sum() > 0


def test_reset_classifier_and_feature_mode():
    model = B.create_backbone("resnet18", num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 512)  # num_classes=0: forward gives features
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)
    # TSN's head initialisation: N(0, 0.001) weights, zero bias
    assert model.fc.weight.std() < 0.002 and torch.all(model.fc.bias == 0)
    assert torch.equal(model.forward_head(torch.ones(1, 512), pre_logits=True), torch.ones(1, 512))


@pytest.fixture(scope="module")
def tv_inception(tmp_path_factory):
    """A random torchvision Inception-V3 as its ImageNet builder makes it (aux head, transform_input)."""
    torch.manual_seed(0)
    tv = Inception3(aux_logits=True, init_weights=False, transform_input=True).eval()
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(tv.state_dict(), path)
    tv.fc = torch.nn.Identity()
    tv.dropout = torch.nn.Identity()
    return tv, path


@pytest.fixture(scope="module")
def inception_rgb(tv_inception):
    return B.create_backbone("inception_v3", num_classes=4, weights=tv_inception[1]).eval()


def test_inception_v3_at_minimum_size_reproduces_torchvision(tv_inception, inception_rgb):
    # 75 x 75 is the smallest input Inception-V3 accepts (native 299); the AuxLogits of the file
    # are dropped and torchvision's own forward gives the same pooled features.
    assert inception_rgb.num_features == 2048 and inception_rgb.input_size == 299
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        feats = inception_rgb.forward_features(x)
        assert feats.shape == (1, 2048)
        torch.testing.assert_close(feats, tv_inception[0](x))
        assert inception_rgb.forward_head(feats).shape == (1, 4)


def _hooked_output(module: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` outputs when ``module`` runs on ``x`` (a forward hook: the reference of forward_map)."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        module(x)
    finally:
        handle.remove()
    return seen[0]


def _check_forward_map(model, reference, layer, x, shape):
    """``model.forward_map(x)`` has ``shape``, equals what ``layer`` of the torchvision ``reference`` outputs,
    and its spatial mean is ``forward_features(x)``."""
    with torch.no_grad():
        fmap = model.forward_map(x)
        assert fmap.shape == shape
        torch.testing.assert_close(fmap, _hooked_output(reference, layer, x))
        torch.testing.assert_close(fmap.mean((2, 3)), model.forward_features(x))


def test_inception_v3_forward_map_is_mixed_7c(tv_inception, inception_rgb):
    # 139 x 139 leaves a 3 x 3 Mixed_7c map; torchvision's own forward (transform_input included) is the reference.
    tv = tv_inception[0]
    _check_forward_map(inception_rgb, tv, tv.Mixed_7c, torch.randn(1, 3, 139, 139), (1, 2048, 3, 3))


def test_resnet_forward_map_is_layer4(tv_resnet18, tv_resnet18_file):
    model = B.create_backbone("resnet18", num_classes=0, in_channels=3, weights=tv_resnet18_file).eval()
    _check_forward_map(model, tv_resnet18, tv_resnet18.layer4, torch.randn(2, 3, 96, 64), (2, 512, 3, 2))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, H, W\)"):
        model.forward_map(torch.randn(1, 4, 64, 64))


def test_inception_v3_below_minimum_size_is_clear(inception_rgb):
    with pytest.raises(ValueError, match="at least 75x75"):
        inception_rgb(torch.randn(1, 3, 74, 100))


def test_inception_v3_flow_stream_from_scratch():
    model = B.create_backbone("inception_v3", num_classes=4, in_channels=20).eval()
    assert model.trunk.Conv2d_1a_3x3.conv.weight.shape == (32, 20, 3, 3)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 20, 75, 75)).shape == (1, 2048)


def test_inception_v3_flow_stream_cross_modality(tv_inception):
    tv, path = tv_inception
    model = B.create_backbone("inception_v3", num_classes=4, in_channels=20, weights=path)
    assert torch.equal(model.trunk.Conv2d_1a_3x3.conv.weight[:, 19], tv.Conv2d_1a_3x3.conv.weight.mean(1))
    assert torch.equal(model.trunk.Mixed_7c.branch1x1.conv.weight, tv.Mixed_7c.branch1x1.conv.weight)


def test_wrong_input_channels_is_clear():
    model = B.create_backbone("resnet18", num_classes=2, in_channels=20)
    with pytest.raises(ValueError, match=r"\(B, 20, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- cross-modality initialisation


def test_cross_modality_init_exact():
    rgb = torch.randn(64, 3, 7, 7)
    out = B.cross_modality_init(rgb, 20)
    assert out.shape == (64, 20, 7, 7)
    mean = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3
    for c in range(20):
        torch.testing.assert_close(out[:, c], mean, rtol=0, atol=1e-6)
        assert torch.equal(out[:, c], rgb.mean(1))


def test_cross_modality_init_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"\(O, 3, kH, kW\)"):
        B.cross_modality_init(torch.randn(64, 20, 7, 7), 20)


def test_flow_backbone_from_rgb_file_uses_cross_modality_init(tv_resnet18, tv_resnet18_file):
    model = B.create_backbone("resnet18", num_classes=5, in_channels=20, weights=tv_resnet18_file)
    rgb_conv = tv_resnet18.conv1.weight
    for c in range(20):
        assert torch.equal(model.trunk.conv1.weight[:, c], rgb_conv.mean(1))
    assert torch.equal(model.trunk.layer3[1].conv2.weight, tv_resnet18.layer3[1].conv2.weight)
    assert torch.equal(model.trunk.bn1.running_var, tv_resnet18.bn1.running_var)
    assert model.fc.weight.shape == (5, 512)  # the 1000-way classifier is replaced


def test_rgb_backbone_from_file_reproduces_torchvision_features(tv_resnet18, tv_resnet18_file):
    model = B.create_backbone("resnet18", num_classes=5, weights=str(tv_resnet18_file)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), _pooled(tv_resnet18, x))


# ---------------------------------------------------------------- our checkpoints and bad files


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = B.create_backbone("resnet18", num_classes=6, in_channels=20)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "arch": "resnet18", "epoch": 3}, path)
    dst = B.create_backbone("resnet18", num_classes=6, in_channels=20, weights=path)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_own_checkpoint_with_ddp_prefix(tmp_path):
    src = B.create_backbone("resnet18", num_classes=2)
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = B.create_backbone("resnet18", num_classes=2, weights=path)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    assert torch.equal(dst.trunk.conv1.weight, src.trunk.conv1.weight)


def test_checkpoint_with_other_class_count_is_clear(tmp_path):
    path = tmp_path / "ckpt101.pt"
    torch.save({"model": B.create_backbone("resnet18", num_classes=101).state_dict()}, path)
    with pytest.raises(ValueError, match="ckpt101.pt.*101-way"):
        B.create_backbone("resnet18", num_classes=51, weights=path)


def test_checkpoint_of_other_arch_is_clear(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save({"model": B.create_backbone("resnet18", num_classes=2).state_dict(), "arch": "resnet18"}, path)
    with pytest.raises(ValueError, match="r18.pt holds a resnet18 backbone, not resnet34"):
        B.create_backbone("resnet34", num_classes=2, weights=path)


def test_state_dict_of_other_arch_is_clear(tv_resnet18_file):
    with pytest.raises(ValueError, match="resnet18_random.pth does not fit resnet34.*missing"):
        B.create_backbone("resnet34", num_classes=2, weights=tv_resnet18_file)


def test_flow_checkpoint_into_rgb_model_is_clear(tmp_path):
    path = tmp_path / "flow.pt"
    torch.save({"model": B.create_backbone("resnet18", num_classes=2, in_channels=20).state_dict()}, path)
    with pytest.raises(ValueError, match=r"flow.pt does not fit resnet18 with in_channels=3.*conv1.weight"):
        B.create_backbone("resnet18", num_classes=2, weights=path)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        B.create_backbone("resnet18", num_classes=2, weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pth"):
        B.create_backbone("resnet18", num_classes=2, weights=bad)


# ---------------------------------------------------------------- ImageNet weights, offline


def test_missing_imagenet_weights_error_names_file_path_and_url(hub_dir):
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(FileNotFoundError) as info:
        B.create_backbone("resnet18", num_classes=10, in_channels=20, weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not expected.exists()


def test_imagenet_weights_path_resnet101(hub_dir):
    assert B.imagenet_weights_path("resnet101") == hub_dir / "checkpoints" / "resnet101-cd907fc2.pth"


def test_imagenet_weights_found_in_hub_cache(hub_dir, tv_resnet18):
    target = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(tv_resnet18.state_dict(), target)
    model = B.create_backbone("resnet18", num_classes=10, in_channels=20, weights="imagenet")
    assert torch.equal(model.trunk.conv1.weight[:, 13], tv_resnet18.conv1.weight.mean(1))
    assert torch.equal(model.trunk.layer4[0].conv1.weight, tv_resnet18.layer4[0].conv1.weight)


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="weights must be"):
        B.create_backbone("resnet18", num_classes=2, weights=3)


# ---------------------------------------------------------------- input normalisation


def test_normalize_rgb_matches_torchvision_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    torch.testing.assert_close(B.normalize_rgb(x), ref)
    clip = torch.randint(0, 256, (2, 4, 3, 5, 6), dtype=torch.uint8)
    out = B.normalize_rgb(clip)
    assert out.shape == clip.shape and out.dtype == torch.float32
    ref = TF.normalize(clip[1, 2].float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(out[1, 2], ref)
    with pytest.raises(ValueError, match="normalize_rgb"):
        B.normalize_rgb(torch.zeros(2, 20, 5, 5, dtype=torch.uint8))


def test_normalize_rgb_stats_made_once_per_device_same_bits():
    x = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8)
    with torch.inference_mode():  # first use under inference mode (extract-features) ...
        first = B.normalize_rgb(x)
    ids = [id(t) for t in B._imagenet_stats(x.device)]
    assert [id(t) for t in B._imagenet_stats(x.device)] == ids   # cached, not rebuilt per call
    # ... bit-identical to building the constants on every call, as before the cache
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32).view(3, 1, 1)
    assert torch.equal(first, (x.float() / 255.0 - mean) / std)
    # ... and the cached tensors still work with autograd afterwards (not inference tensors)
    xf = x.float().requires_grad_()
    B.normalize_rgb(xf).sum().backward()
    torch.testing.assert_close(xf.grad[0], (1 / 255.0 / std).expand(3, 4, 5))


def test_normalize_flow_inverts_quantization():
    bound = 20.0
    f = torch.linspace(-bound, bound, 101)
    q = torch.clamp(torch.round((f + bound) * 255 / (2 * bound)), 0, 255).to(torch.uint8)
    out = B.normalize_flow(q)
    assert out.min() == -1 and out.max() == 1
    assert (out * bound - f).abs().max() <= bound / 255 + 1e-5  # half a step of 2*bound/255


# ---------------------------------------------------------------- foreign checkpoints (built here, nothing downloaded)


def _to_mmaction2(tv_state: dict) -> dict:
    """A torchvision ResNet state dict in mmaction2's names (ConvModule: <conv>.conv / <conv>.bn), written
    out rule by rule from mmaction2's ResNet independently of pipeline/interop/checkpoints.py."""
    out = {}
    for key, value in tv_state.items():
        parts = key.split(".")
        if parts[0] == "fc":
            out[f"cls_head.fc_cls.{parts[1]}"] = value
            continue
        if parts[0] == "conv1":
            new = ["conv1", "conv", *parts[1:]]
        elif parts[0] == "bn1":
            new = ["conv1", "bn", *parts[1:]]
        elif parts[2] == "downsample":
            new = parts[:3] + [{"0": "conv", "1": "bn"}[parts[3]]] + parts[4:]
        elif parts[2].startswith("conv"):
            new = parts[:3] + ["conv"] + parts[3:]
        else:  # layerA.B.bnK.p -> layerA.B.convK.bn.p
            new = parts[:2] + ["conv" + parts[2][2:], "bn"] + parts[3:]
        out["backbone." + ".".join(new)] = value
    return out


def _flow_conv_state(tv_state: dict, channels: int, seed: int = 3) -> dict:
    state = dict(tv_state)
    g = torch.Generator().manual_seed(seed)
    state["conv1.weight"] = torch.randn(64, channels, 7, 7, generator=g)
    return state


def test_mmaction2_rgb_checkpoint_reproduces_torchvision(tmp_path, tv_resnet18):
    state = tv_resnet18.state_dict()
    assert "backbone.layer1.0.conv1.bn.running_mean" in _to_mmaction2(state)
    path = tmp_path / "tsn_r18_mm.pth"
    torch.save({"meta": {"epoch": 75, "mmengine_version": "0.10.4"},
                "state_dict": {**_to_mmaction2(state), "data_preprocessor.mean": torch.zeros(3, 1, 1)}}, path)
    model = B.create_backbone("resnet18", num_classes=1000, weights=path, convert=convert_foreign).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), _pooled(tv_resnet18, x))
        torch.testing.assert_close(model(x), tv_resnet18(x))  # cls_head.fc_cls kept: same class count
    # another class count: a new head
    fresh = B.create_backbone("resnet18", num_classes=7, weights=path, convert=convert_foreign)
    assert fresh.fc.weight.shape == (7, 512) and fresh.fc.weight.abs().max() < 0.01
    # The model layer knows no foreign format: without the converter the file is refused, saying why.
    with pytest.raises(ValueError, match="is a dict, not a tensor .*another tool's checkpoint.*convert_foreign"):
        B.create_backbone("resnet18", num_classes=7, weights=path)


def test_mmaction2_flow_checkpoint_with_10_channels(tmp_path, tv_resnet18):
    state = _flow_conv_state(tv_resnet18.state_dict(), 10)  # mmaction2's TSN flow: clip_len 5 -> 10 channels
    path = tmp_path / "tsn_r18_flow_mm.pth"
    torch.save({"state_dict": _to_mmaction2(state)}, path)
    same = B.create_backbone("resnet18", num_classes=0, in_channels=10, weights=path, convert=convert_foreign)
    assert torch.equal(same.trunk.conv1.weight, state["conv1.weight"])
    model = B.create_backbone("resnet18", num_classes=0, in_channels=20, weights=path, convert=convert_foreign)
    want = state["conv1.weight"].mean(dim=1)  # TSN: average over the input channels, replicate to 2L
    assert model.trunk.conv1.weight.shape == (64, 20, 7, 7)
    for c in range(20):
        torch.testing.assert_close(model.trunk.conv1.weight[:, c], want)
    assert torch.equal(model.trunk.layer2[0].downsample[1].running_var, state["layer2.0.downsample.1.running_var"])


def test_tsn_pytorch_checkpoints(tmp_path, tv_resnet18):
    state = tv_resnet18.state_dict()
    trunk = {f"module.base_model.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    head = {"module.new_fc.weight": torch.randn(5, 512), "module.new_fc.bias": torch.randn(5)}
    rgb = tmp_path / "ucf101_rgb_checkpoint.pth.tar"
    torch.save({"epoch": 80, "arch": "resnet18", "best_prec1": 80.1, "state_dict": {**trunk, **head}}, rgb)
    model = B.create_backbone("resnet18", num_classes=5, weights=rgb, convert=convert_foreign).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), _pooled(tv_resnet18, x))
    assert torch.equal(model.fc.weight, head["module.new_fc.weight"])
    # the flow model (new_length 5 -> conv1 of 10 channels), re-initialised for L = 10
    flow_state = _flow_conv_state(state, 10, seed=4)
    flow = tmp_path / "ucf101_flow_checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {
        f"module.base_model.{k}": v for k, v in flow_state.items() if not k.startswith("fc.")}}, flow)
    m = B.create_backbone("resnet18", num_classes=5, in_channels=20, weights=flow, convert=convert_foreign)
    torch.testing.assert_close(m.trunk.conv1.weight[:, 13], flow_state["conv1.weight"].mean(1))
    with pytest.raises(ValueError, match="tsn-pytorch checkpoint .* holds a resnet18 backbone, not resnet34"):
        B.create_backbone("resnet34", num_classes=5, weights=rgb, convert=convert_foreign)


def test_foreign_checkpoint_mismatch_names_the_files_keys(tmp_path, tv_resnet18):
    mm = _to_mmaction2(tv_resnet18.state_dict())
    mm["backbone.layer4.1.conv2.bn.weight"] = torch.ones(7)
    mm["backbone.extra_conv.conv.weight"] = torch.ones(1)
    del mm["backbone.layer3.0.conv1.conv.weight"]
    path = tmp_path / "broken_mm.pth"
    torch.save({"state_dict": mm}, path)
    with pytest.raises(ValueError) as e:
        B.create_backbone("resnet18", num_classes=2, weights=path, convert=convert_foreign)
    msg = str(e.value)
    assert "broken_mm.pth (mmaction2 checkpoint) does not fit resnet18" in msg
    assert "backbone.layer4.1.conv2.bn.weight: file (7,) vs model (512,)" in msg
    assert "missing key(s), e.g. layer3.0.conv1.weight" in msg
    assert "unexpected key(s), e.g. backbone.extra_conv.conv.weight" in msg


def test_the_callers_resolving_weights_pass_the_converter(tmp_path, tv_resnet18):
    """finetune --weights and extract-features --*-weights take mmaction2 files: the caller passes
    pipeline.interop.checkpoints.convert_foreign to the backbone builder."""
    from pipeline.features import StreamSource, build_backbone
    from stages.finetune import FinetuneParams, build_model

    path = tmp_path / "tsn_r18_mm.pth"
    torch.save({"state_dict": _to_mmaction2(tv_resnet18.state_dict())}, path)
    x = torch.randn(1, 3, 64, 64)
    net = build_model(FinetuneParams(arch="resnet18", weights=str(path), dropout=0.0), 1000).eval()
    feats = build_backbone(StreamSource("rgb", "resnet18", "file", str(path), None, 3, 64, 0, 512))
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv_resnet18(x))
        torch.testing.assert_close(feats.forward_features(x), _pooled(tv_resnet18, x))
