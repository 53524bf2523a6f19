"""Command line -> head module: the options reach the built nn.Module (issue 10's mapping tests).

Each case parses real train-head arguments with the command's own Click parser, builds the params as the
CLI does (defaults < config < options), takes the stage's path (effective options -> make_head) and asserts
on the module itself: its type, the fusion it computes (against the element-wise formulas of [STFN] eq. 4-6),
which path receives the fused features (Fig. 5), its segment count, its Res-Inc blocks (§3.2, Fig. 4), and
the widths, weights and dropout it was built with.
"""
import pytest
import torch
from torch import nn

from pipeline.models.baselines import ConcatHead, LateFusionHead, SingleStreamHead, TSNHead
from pipeline.models.stcb import STCBHead, STCBTemporalHead
from pipeline.models.stfn import STFN
from pipeline.models.stmultiplier import STMultiplierHead
from pipeline.stage import StageError
from pipeline.stage import config as cfg
from stages import load_command
from stages.train_head import TrainHeadParams, effective_options, head_name, make_head

D, C = 8, 3


def params_from_cli(*args) -> TrainHeadParams:
    """TrainHeadParams exactly as `pipeline train-head ARGS` builds them."""
    ctx = load_command("train-head").make_context("train-head", [str(a) for a in args])
    overrides = {k: v for k, v in ctx.params.items()
                 if k not in ("config_path", "cache_dir", "allow_failures", "force", "verbose")}
    return cfg.build_params(TrainHeadParams, {}, "train-head", overrides)


def build(*args, rgb_dim=D, flow_dim=D):
    p = params_from_cli(*args)
    return make_head(p, effective_options(p), num_classes=C, rgb_dim=rgb_dim, flow_dim=flow_dim)


def _inputs(n, b=4, da=D, dm=D):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, n, da, generator=g), torch.randn(b, n, dm, generator=g)


def _dropouts(head: nn.Module) -> set[float]:
    return {m.p for m in head.modules() if isinstance(m, nn.Dropout)}


@pytest.mark.parametrize("args, kind", [
    ((), STFN), (("--head", "stfn"), STFN), (("--head", "rgb"), SingleStreamHead),
    (("--head", "flow"), SingleStreamHead), (("--head", "late"), LateFusionHead), (("--head", "tsn"), TSNHead),
    (("--head", "concat"), ConcatHead), (("--head", "stcb", "--stcb-dim", 16), STCBHead),
    (("--head", "stcb_temporal", "--stcb-dim", 16), STCBTemporalHead),
    (("--head", "stmultiplier"), STMultiplierHead),
])
def test_head_type(args, kind):
    assert type(build(*args)) is kind


@pytest.mark.parametrize("head, stream", [("rgb", "rgb"), ("flow", "flow")])
def test_single_stream_reads_its_stream(head, stream):
    h = build("--head", head, rgb_dim=8, flow_dim=12)
    assert h.stream == stream and h.scores.fc.in_features == (8 if stream == "rgb" else 12)


@pytest.mark.parametrize("fusion, formula", [
    ("avg", lambda a, m: (a + m) / 2),  # eq. 4
    ("mul", lambda a, m: a * m),  # eq. 5
    ("max", lambda a, m: torch.maximum(a, m)),  # eq. 6
])
@pytest.mark.parametrize("arch", ["a", "b"])
def test_fusion_operation(arch, fusion, formula):
    h = build("--arch", arch, "--fusion", fusion)
    a, m = _inputs(3)
    torch.testing.assert_close(h.fuse(a, m), formula(a, m))


def test_stcb_fusion():
    h = build("--fusion", "stcb", "--stcb-dim", 32)
    assert h.stcb.output_dim == 32 and h.fuse(*_inputs(3)).shape == (4, 3, 32)


@pytest.mark.parametrize("flag", ["--direction", "--dir"])
@pytest.mark.parametrize("direction, fused_a, fused_m", [("bi", True, True), ("a2m", False, True),
                                                          ("m2a", True, False)])
def test_direction(flag, direction, fused_a, fused_m):
    """Fig. 5: A->M feeds the fused features to the motion path only, A<-M to the appearance path only."""
    h = build(flag, direction, "--fusion", "mul").eval()
    rgb, flow = _inputs(3)
    with torch.no_grad():
        pa, pm = h.stream_a(rgb), h.stream_m(flow)
        in_a, in_m = h.path_inputs(rgb, flow)
    torch.testing.assert_close(in_a, pa * pm if fused_a else pa)
    torch.testing.assert_close(in_m, pa * pm if fused_m else pm)


@pytest.mark.parametrize("head", ["stfn", "tsn", "rgb", "concat", "stmultiplier"])
@pytest.mark.parametrize("n", [3, 7])
def test_segments(head, n):
    h = build("--head", head, "--segments", n)
    assert h.num_segments == n
    assert h(*_inputs(n)).shape == (4, C)
    with pytest.raises(ValueError):
        h(*_inputs(n + 1))


@pytest.mark.parametrize("arch, blocks", [("a", 1), ("a", 2), ("b", 1), ("b", 3), ("c", 1), ("c", 2)])
def test_arch_and_blocks(arch, blocks):
    """Fig. 4: a = Res-Inc before and after fusion, b = before only, c = one path on the concatenation."""
    h = build("--arch", arch, "--blocks", blocks)
    assert h.arch == arch
    if arch == "c":
        assert not hasattr(h, "stream_a") and len(h.path.blocks) == blocks and h.path.d == 2 * D
        return
    assert len(h.stream_a.blocks) == len(h.stream_m.blocks) == blocks
    follow = blocks if arch == "a" else 0
    assert len(h.follow_a.blocks) == len(h.follow_m.blocks) == follow


def test_stfn_defaults_are_the_papers():
    """[STFN] §4.2: arch a, average fusion, bi-directional, one block per path, N = 5, dropout 0.5."""
    h = build()
    a, m = _inputs(5)
    torch.testing.assert_close(h.fuse(a, m), (a + m) / 2)
    assert (h.arch, h.direction, len(h.stream_a.blocks), h.num_segments) == ("a", "bi", 1, 5)
    assert _dropouts(h) == {0.5}


@pytest.mark.parametrize("head, weight", [("tsn", None), ("late", None), ("tsn", 2.0), ("late", 0.5)])
def test_flow_weight(head, weight):
    h = build("--head", head, *(("--flow-weight", weight) if weight is not None else ()))
    assert h.flow_weight == (weight if weight is not None else {"tsn": 1.5, "late": 1.0}[head])


@pytest.mark.parametrize("head", ["stfn", "tsn", "rgb", "concat", "stcb", "stmultiplier"])
def test_dropout(head):
    extra = ("--stcb-dim", 16) if head == "stcb" else ()
    assert _dropouts(build("--head", head, "--dropout", 0.2, *extra)) == {0.2}


def test_fused_dim_projects_both_streams():
    h = build("--fused-dim", 8, rgb_dim=8, flow_dim=12)
    assert isinstance(h.proj_a, nn.Identity) and h.proj_m.in_features == 12 and h.proj_m.out_features == 8


@pytest.mark.parametrize("args, option, head", [
    (("--head", "tsn", "--fusion", "max"), "--fusion", "tsn"),
    (("--head", "rgb", "--arch", "b"), "--arch", "rgb"),
    (("--head", "concat", "--dir", "a2m"), "--direction", "concat"),
    (("--head", "tsn", "--blocks", 2), "--blocks", "tsn"),
    (("--head", "stmultiplier", "--stcb-dim", 64), "--stcb-dim", "stmultiplier"),
    (("--head", "rgb", "--flow-weight", 2), "--flow-weight", "rgb"),
    (("--head", "tsn", "--fused-dim", 8), "--fused-dim", "tsn"),
    (("--arch", "c", "--fusion", "max"), "--fusion", "stfn"),
    (("--arch", "c", "--direction", "m2a"), "--direction", "stfn"),
    (("--arch", "c", "--fusion", "avg"), "--fusion", "stfn"),  # given, even at the default: refused
    (("--fusion", "avg", "--stcb-dim", 64), "--stcb-dim", "stfn"),
    (("--fusion", "stcb", "--fused-dim", 8), "--fused-dim", "stfn"),
])
def test_option_that_does_not_apply_is_an_error(args, option, head):
    with pytest.raises(StageError, match=rf"^{option}: option \S+ does not apply to head {head}\b"):
        params_from_cli(*args)


@pytest.mark.parametrize("a, b, same", [
    ((), ("--head", "stfn", "--arch", "a", "--fusion", "avg", "--direction", "bi", "--blocks", 1,
          "--dropout", 0.5), True),
    (("--head", "tsn"), ("--head", "tsn", "--flow-weight", 1.5), True),
    (("--head", "stcb"), ("--head", "stcb", "--stcb-dim", 4096), True),
    (("--dir", "m2a"), ("--direction", "m2a"), True),
    (("--arch", "c"), ("--arch", "c", "--blocks", 1), True),
    ((), ("--fusion", "max"), False), ((), ("--direction", "a2m"), False), ((), ("--arch", "b"), False),
    ((), ("--blocks", 2), False), ((), ("--dropout", 0.3), False), ((), ("--fused-dim", 8), False),
    ((), ("--segments", 7), False), ((), ("--seed", 1), False),
    (("--head", "tsn"), ("--head", "tsn", "--flow-weight", 2), False),
    (("--head", "stcb"), ("--head", "stcb", "--stcb-dim", 64), False),
    (("--fusion", "stcb"), ("--fusion", "stcb", "--stcb-dim", 64), False),
    (("--arch", "c"), ("--arch", "c", "--blocks", 2), False),
    (("--head", "tsn"), ("--head", "late"), False),
])
def test_name_changes_iff_effective_options_change(a, b, same):
    pa, pb = params_from_cli(*a), params_from_cli(*b)
    effective = lambda p: (p.head, effective_options(p), p.segments, p.seed)  # noqa: E731
    assert (effective(pa) == effective(pb)) is same
    assert (head_name(pa) == head_name(pb)) is same


def test_default_name_and_toml_key():
    assert head_name(params_from_cli()) == "stfn-a-avg-bi-n5-s0"
    p = cfg.build_params(TrainHeadParams, {"train-head": {"direction": "a2m"}}, "train-head", {})
    assert effective_options(p)["direction"] == "a2m"
    # The old TOML key `dir` is refused by name, and the message lists the new one.
    with pytest.raises(cfg.ConfigError, match=r"unknown parameter 'dir'.*\bdirection\b"):
        cfg.build_params(TrainHeadParams, {"train-head": {"dir": "a2m"}}, "train-head", {})
