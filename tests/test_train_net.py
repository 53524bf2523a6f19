"""train-net: the network registry, and the stage on a tiny demo-like cache (resume after a kill, learning above
chance, evaluate's row, predict, options from the command line to the network, options refused).

Upstream outputs come from the real decode, extract-flow (a light TV-L1) and finetune stages on two classes that
differ by their motion only, as the demo's RedHorizontal / RedVertical (docs/demo.md): a texture translating
horizontally or vertically (tests/videos.py ``moving_texture``; a flip keeps the axis), 12 clips per class of
16 frames at 64x48. (The demo's own discs cover ~2 % of a 64x48 frame: ResNet-18 streams trained from scratch
at 32 px on a dozen clips stay at chance on them; the translating texture lets them learn in seconds.)
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.data.transforms import EVAL_SPACES
from pipeline.eval.results import load_test_scores
from pipeline.io import artifacts
from pipeline.models import stmult_net
from pipeline.models.networks import (NETWORKS, NetworkOptionError, Source, create_network,
                                      load_network_checkpoint, network_options, network_output_name, option_fields)
from pipeline.stage import StageError, run_stage
from pipeline.training import loop as T
from stages.cli import main
from stages.decode import STAGE as DECODE, DecodeParams
from stages.extract_flow import STAGE as FLOW, FlowParams
from stages.finetune import STAGE as FINETUNE, FinetuneParams
from stages.train_net import STAGE, TrainNetParams
from tests.test_refine import coded_stores  # noqa: F401  (a fixture: frames and flow coded by where they come from)
from tests.videos import moving_texture, write_frames

ARCH = "resnet18"
CLASSES = {"Horizontal": "x", "Vertical": "y"}
# The streams: ResNet-18 from scratch at 32 px, 4 TSN segments per video so that BatchNorm sees 16 inputs.
FINETUNE_TINY = dict(arch=ARCH, input_size=32, weights="none", batch_size=4, segments=4, lr=0.01, dropout=0.0,
                     val_frames=2, num_test_frames=3, workers=0, device="cpu", epochs=8)
# A lighter TV-L1 than the demo's (2 scales, few iterations): it underestimates the 2 px/frame motion (~0.7 px)
# but keeps its axis.
LIGHT_FLOW = dict(nscales=2, warps=1, inner_iterations=5, outer_iterations=1, fast=False, device="cpu")
# train-net at demo-like settings: steps of 4 videos in micro-batches of 2 (BatchNorm on 2 x 5 frames), dropout
# 0 as the streams were trained, the test protocol cut to 6 frames (+ flips) in chunks of 3 and validation to 3.
TINY = dict(backbone=ARCH, batch_size=4, micro_batch=2, lr=1e-3, workers=0, device="cpu", dropout=0.0,
            test_frames=6, test_chunk=3, val_frames=3, schedule="step", lr_steps=(4,))
NAME = network_output_name("stmult", {k: v for k, v in TINY.items() if k in option_fields()})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """decode (2 classes x 12 clips, the first 4 of each test; decode holds one training group in four out for
    validation), extract-flow and both finetune streams."""
    root = tmp_path_factory.mktemp("train_net")
    rows, k = ["path,label,split"], 0
    for cls, axis in CLASSES.items():
        for i in range(12):
            rel = f"{cls}/v_{cls}_g{i + 1:02d}_c01.avi"
            write_frames(root / "data" / rel, moving_texture(axis, 16, (64, 48), seed=k, speed=2))
            rows.append(f"{rel},{cls},{'test' if i < 4 else 'train'}")
            k += 1
    (root / "data" / "list.csv").write_text("\n".join(rows) + "\n")
    cache = root / "cache"
    run_stage(DECODE, DecodeParams(dataset="csv", root=root / "data", short_side=0, val_fraction=0.25, workers=1),
              cache)
    run_stage(FLOW, FlowParams(**LIGHT_FLOW), cache)
    for stream in ("rgb", "flow"):
        run_stage(FINETUNE, FinetuneParams(stream=stream, **FINETUNE_TINY), cache)
    return cache, root / "data"


def fresh_cache(upstream, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(parents=True)
    for key in ("decode", "extract-flow", "finetune"):
        (cache / key).symlink_to(upstream[0] / key, target_is_directory=True)
    return cache


def _out(cache, name=NAME):
    return cache / artifacts.net_key(name, 1, ARCH)


# ------------------------------------------------------------------------------------------ the registry

def test_registry_options_are_the_model_modules():
    """The registry reads stmult's options from the model module (declared once): the same names and defaults,
    which are the constructor's own defaults (an independent reference: its signature)."""
    spec = NETWORKS["stmult"]
    assert spec.model_options is stmult_net.OPTIONS
    defaults = {k: v for k, v in spec.options.items() if k in stmult_net.OPTIONS}
    assert defaults == {k: d for k, (d, _) in stmult_net.OPTIONS.items()}
    init = inspect.signature(stmult_net.STMultiplierNet.__init__).parameters
    assert {k: init[k].default for k in stmult_net.OPTIONS} == defaults
    # The sampling options are [ST-Mult] §4.1-4.2's numbers.
    assert {k: spec.options[k] for k in ("clip_frames", "min_stride", "max_stride", "test_frames", "test_chunk")} \
        == {"clip_frames": 5, "min_stride": 5, "max_stride": 35, "test_frames": 25, "test_chunk": 25}
    assert network_output_name("stmult") == "stmult-s0"
    assert spec.checks["test_view"]["choices"] == EVAL_SPACES
    assert network_output_name("stmult", {"temporal_init": "avg", "dropout": 0.5, "checkpointing": True}, seed=2) \
        == "stmult-init_avg-p0.5-s2"  # checkpointing changes no result: not in the name


@pytest.mark.parametrize("option, value, attribute", [
    ("gate_appearance", "post_relu", lambda n: n.gate.appearance),
    ("temporal_placement", "conv5", lambda n: (tuple(n.appearance.residual_temporal), tuple(n.motion.skip_temporal))),
    ("temporal_init", "avg", lambda n: n.temporal_init),
    ("temporal_pool", "avg", lambda n: n.temporal_pool),
    ("dropout", 0.3, lambda n: (n.appearance.backbone.head_drop.p, n.motion.backbone.head_drop.p)),
    ("fusion", "softmax", lambda n: n.fusion),
    ("flow_weight", 3.0, lambda n: n.flow_weight),
    ("checkpointing", True, lambda n: (n.appearance.checkpointing, n.motion.checkpointing)),
])
def test_each_option_reaches_the_network(option, value, attribute):
    expect = {"temporal_placement": (("layer4",), ()), "dropout": (0.3, 0.3), "checkpointing": (True, True)}
    sources = {"rgb": Source(ARCH, 3), "flow": Source(ARCH, 20)}
    with torch.device("meta"):
        net = create_network("stmult", num_classes=3, sources=sources, **{option: value})
        default = create_network("stmult", num_classes=3, sources=sources)
    assert attribute(net) == expect.get(option, value) and attribute(default) != attribute(net)


def test_an_option_of_another_network_is_refused(monkeypatch, upstream, tmp_path):
    """A second network with its own option: giving it to stmult is refused naming both, from Python and from
    the command line (train-net's options come from the registry, so the stage gets the flag unedited)."""
    toy = dataclasses.replace(NETWORKS["stmult"], model_options={"tau": (3, "a toy network's option")},
                              sampling_options={}, checks={"tau": {"min": 1}}, tags={}, validate=lambda o: None)
    monkeypatch.setitem(NETWORKS, "toy", toy)
    with pytest.raises(NetworkOptionError, match=r"option tau does not apply to network stmult \(it takes: "):
        network_options("stmult", {"tau": 2})
    assert network_options("toy", {"tau": 2}) == {"tau": 2}
    assert "network default: toy 3" in option_fields()["tau"]["help"]
    import stages.train_net as mod

    try:
        mod = importlib.reload(mod)
        from stages.cli import make_stage_command

        cache = fresh_cache(upstream, tmp_path)
        res = CliRunner().invoke(make_stage_command(mod.STAGE), ["--net", "stmult", "--tau", "2", "--cache-dir",
                                                                 str(cache)])
        assert res.exit_code == 2 and "--tau: option tau does not apply to network stmult" in res.output, res.output
        assert not (cache / artifacts.TRAIN_NET).exists()
    finally:
        monkeypatch.delitem(NETWORKS, "toy")
        importlib.reload(mod)
    with pytest.raises(StageError, match="--dropout: 1.0 must be < 1.0"):
        run_stage(STAGE, TrainNetParams(**{**TINY, "dropout": 1.0}), tmp_path / "c2")
    with pytest.raises(StageError, match="test_chunk 4 does not divide test_frames 6"):
        run_stage(STAGE, TrainNetParams(**{**TINY, "test_chunk": 4}), tmp_path / "c2")


def test_a_network_option_name_must_mean_one_thing(monkeypatch):
    clash = dataclasses.replace(NETWORKS["stmult"], model_options={"dropout": ("0.5", "dropout as text")},
                                sampling_options={}, checks={})
    monkeypatch.setitem(NETWORKS, "clash", clash)
    with pytest.raises(ValueError, match="option dropout is declared by networks clash and stmult"):
        option_fields()


# ------------------------------------------------------------------------------------------ samples and views

def test_a_training_sample_has_one_crop_and_flip_for_all_its_frames_and_stacks(coded_stores):
    """stmult's clip (5 frames at a stride of 5..35, capped) read with one crop and flip for all 5 frames and all
    their flow fields: the coded stores tell where each was cut (green = 5 x column) and which frame it is
    (red = 10 t; flow x = 10 + 5 i, 255 - that when flipped)."""
    from pipeline.data.clips import VideoList
    from pipeline.data.sampling import flow_stack_indices, stmult_train_indices
    from pipeline.training.networks import Inputs, NetworkClips
    from tests.test_refine import H as CH, T as CT

    frames, flows = coded_stores
    inputs = Inputs({"frames": frames, "flow": flows}, flow_length=4, flow_bound=20.0, flow_step=1)
    options = network_options("stmult")
    ds = NetworkClips(NETWORKS["stmult"], options, inputs, VideoList(("v",), (1,), (CT,)), input_size=CH, seed=3,
                      scales=(256,), base_size=256)
    flips = set()
    for epoch in range(8):
        s = ds[(0, epoch)]
        rgb, flow = s["rgb"].numpy().astype(int), s["flow"].numpy().astype(int)
        assert rgb.shape == (5, 3, CH, CH) and flow.shape == (5, 8, CH, CH) and s["label"] == 1
        want = stmult_train_indices(CT, np.random.default_rng([3, epoch, 0]))  # the sample's first draws
        assert [int(rgb[k, 0, 0, 0]) // 10 for k in range(5)] == want
        cols = rgb[0, 1, 0] // 5
        flipped = bool(cols[0] > cols[-1])
        for k in range(5):
            np.testing.assert_array_equal(rgb[k, 1, 0] // 5, cols)
            for j in range(4):
                np.testing.assert_array_equal(flow[k, 2 * j + 1, 0] // 5, cols)
                xq = flow[k, 2 * j, 0, 0]
                assert ((255 - xq) if flipped else xq) - 10 == 5 * flow_stack_indices(want[k], CT - 1, 4)[j]
        flips.add(flipped)
    assert flips == {True, False}


def test_test_views_are_the_whole_frame_and_its_mirror():
    """[ST-Mult] §4.2: the whole frame, short side 256 for 224 crops (here 8 px crops: short side round(8 * 256 /
    224) = 9), and its horizontal flip; a flow view's flip negates x (255 - x)."""
    from pipeline.data.transforms import eval_short_side, eval_spatial_views

    assert (eval_short_side(224), eval_short_side(48), eval_short_side(8)) == (256, 55, 9)
    x = torch.arange(2 * 4 * 9 * 12, dtype=torch.int64).reshape(2, 4, 9, 12).to(torch.uint8)  # short side 9: no resize
    v = eval_spatial_views(x, "full", 8, is_flow=True)
    assert v.shape == (2, 2, 4, 9, 12)
    assert torch.equal(v[0], x)
    assert torch.equal(v[1, :, 1::2], x[:, 1::2].flip(-1)) and torch.equal(v[1, :, 0::2], 255 - x[:, 0::2].flip(-1))
    assert eval_spatial_views(x, "full", 8, flips=False).shape == (1, 2, 4, 9, 12)
    assert eval_spatial_views(x, "center", 8).shape == (2, 2, 4, 8, 8)
    assert eval_spatial_views(x, "ten_crop", 8).shape == (10, 2, 4, 8, 8)


# ------------------------------------------------------------------------------------------ the stage

def _train(cache, epochs=2, **over):
    return run_stage(STAGE, TrainNetParams(epochs=epochs, **{**TINY, **over}), cache)


def test_kill_and_resume_gives_the_same_weights(upstream, tmp_path, monkeypatch):
    full = fresh_cache(upstream, tmp_path / "full")
    _train(full, epochs=2)
    killed = fresh_cache(upstream, tmp_path / "killed")

    class Killed(BaseException):
        pass

    save_epoch = T.save_epoch

    def kill_after_epoch_1(out, state, *a, **kw):
        save_epoch(out, state, *a, **kw)
        if state["epoch"] == 1:
            raise Killed  # as a kill right after epoch 1's checkpoint: nothing else of the run happens

    monkeypatch.setattr(T, "save_epoch", kill_after_epoch_1)
    with pytest.raises(Killed):
        _train(killed, epochs=2)
    monkeypatch.setattr(T, "save_epoch", save_epoch)
    assert not torch.load(_out(killed) / "last.pt", weights_only=True)["done"]
    res = _train(killed, epochs=2)
    assert res.manifest["resumed"]
    for name in ("last.pt", "best.pt"):
        a = torch.load(_out(full) / name, weights_only=True)
        b = torch.load(_out(killed) / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and set(a["model"]) == set(b["model"])
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    np.testing.assert_array_equal(load_test_scores(_out(full) / "test_scores.npz").scores,
                                  load_test_scores(_out(killed) / "test_scores.npz").scores)
    r = json.loads((_out(killed) / "results.json").read_text())
    assert r["epochs"] == 2 and len(r["history"]) == 2
    assert _train(killed, epochs=2).skipped  # fresh now


def test_learns_above_chance_and_evaluate_shows_its_row(upstream, tmp_path):
    """The two classes differ by motion only (chance 50%): the network, trained end to end from the finetune
    streams, classifies the 8 test clips better than chance, and evaluate lists it like every row. Centre-crop
    test views here: at 32 px the streams' last maps are 1 x 1 in training, the whole 64x48 frame changes that."""
    cache = fresh_cache(upstream, tmp_path)
    res = _train(cache, epochs=5, test_view="center")
    name = NAME.replace("-s0", "-view_center-s0")
    ts = load_test_scores(_out(cache, name) / "test_scores.npz")
    assert ts.scores.shape == (8, 2) and sorted(ts.class_names) == sorted(CLASSES)
    np.testing.assert_allclose(ts.scores.sum(1), 1.0, atol=1e-5)
    top1 = float((ts.scores.argmax(1) == ts.labels).mean())
    assert top1 == pytest.approx(res.manifest.summary["top1"]) and top1 >= 0.75, top1
    r = json.loads((_out(cache, name) / "results.json").read_text())
    assert r["net"] == "stmult" and r["net_options"]["temporal_init"] == "center" and r["seconds_per_epoch"] > 0
    # The step schedule: lr 1e-3 divided by 10 after epoch 4 (--lr-steps 4).
    assert [h["lr"] for h in r["history"]] == pytest.approx([1e-3] * 4 + [1e-4]) and r["lr_decays"] == 1
    assert (_out(cache, name) / "curves.png").is_file() and (_out(cache, name) / "confusion.png").is_file()
    from stages.evaluate import STAGE as EVALUATE, EvaluateParams

    out = run_stage(EVALUATE, EvaluateParams(backbone=ARCH), cache)
    rows = {row["name"]: row for row in json.loads((cache / out.key / "results.json").read_text())["rows"]}
    assert rows[f"train-net {name}"]["source"] == artifacts.net_key(name, 1, ARCH)
    assert rows[f"train-net {name}"]["top1"] == pytest.approx(top1)
    assert {"rgb stream", "flow stream"} <= set(rows)


def test_cli_flags_reach_the_network_and_predict_scores_with_it(upstream, tmp_path):
    """--temporal-init avg --dropout 0.5 from the command line: the output is named by them, its checkpoint
    rebuilds a network with average-initialised temporal filters (eq. 9: I x [1/3, 1/3, 1/3]; a learning rate of
    1e-9 leaves them there) and dropout 0.5; predict scores a test clip with it exactly as the stage's test did."""
    cache = fresh_cache(upstream, tmp_path)
    args = ["train-net", "--net", "stmult", "--temporal-init", "avg", "--dropout", "0.5", "--epochs", "1",
            "--lr", "1e-9", "--cache-dir", str(cache)]
    args += [a for k, v in TINY.items() if k not in ("lr", "dropout") for a in (f"--{k.replace('_', '-')}",
                                                             ",".join(map(str, v)) if isinstance(v, tuple) else str(v))]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    name = NAME.replace("stmult-p0-", "stmult-init_avg-p0.5-")
    model, ckpt = load_network_checkpoint(_out(cache, name) / "best.pt")
    assert ckpt["net_options"]["temporal_init"] == "avg" and model.appearance.backbone.head_drop.p == 0.5
    for stream in (model.appearance, model.motion):
        for tc in stream.residual_temporal.values():
            w = tc.conv.weight.detach()
            c = w.shape[0]
            want = torch.eye(c)[:, :, None, None, None] * torch.full((3,), 1 / 3)[None, None, :, None, None]
            torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    # predict --net: the new video through decode and extract-flow with the dataset's settings, then the
    # network's test protocol: the stage's own test score for that clip.
    ts = load_test_scores(_out(cache, name) / "test_scores.npz")
    vid = str(ts.video_ids[0])
    video = upstream[1] / f"{vid}.avi"
    res = CliRunner().invoke(main, ["predict", str(video), "--net", name, "--backbone", ARCH, "--top-k", "2",
                                    "--device", "cpu", "--json", str(tmp_path / "p.json"), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "p.json").read_text())[0]
    assert rec["net"] == name and len(rec["top_k"]) == 2
    expected = dict(zip(ts.class_names, ts.scores[0].tolist()))
    for t in rec["top_k"]:
        assert t["prob"] == pytest.approx(expected[t["label"]], abs=1e-5)


def test_missing_finetune_and_mismatched_streams_are_named(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    with pytest.raises(StageError, match=r"finetune/split1-resnet34/flow.*missing.*run `pipeline finetune` first"):
        _train(cache, flow_arch="resnet34")
    assert STAGE.output_key(TrainNetParams(rgb_arch="resnet50", flow_arch="resnet152")) == \
        "train-net/split1-resnet50+resnet152/stmult-s0"


def test_an_unreadable_video_is_a_recorded_failure_not_a_crash(upstream, tmp_path):
    import shutil

    from pipeline.stage import StageFailures
    from pipeline.data.table import VideoTable

    cache = fresh_cache(upstream, tmp_path)
    (cache / "extract-flow").unlink()
    shutil.copytree(upstream[0] / "extract-flow", cache / "extract-flow", symlinks=True)
    table = VideoTable.load(cache / "decode")
    vid = table.video_ids[table.indices(1, "test")[0]]
    flow = artifacts.flow_store(cache / "extract-flow")
    shutil.rmtree(flow.path(vid))
    with pytest.raises(StageFailures, match=rf"{vid}: flow of .* unreadable"):
        _train(cache, epochs=1)
    res = run_stage(STAGE, TrainNetParams(epochs=1, **TINY), cache, allow_failures=True)
    assert list(res.manifest.failures) == [vid]
    ts = load_test_scores(_out(cache) / "test_scores.npz")
    assert len(ts.video_ids) == 7 and vid not in ts.video_ids.tolist()
    assert json.loads((_out(cache) / "results.json").read_text())["videos"]["failed"] == 1


def _ddp_step(rank: int, world: int, init_file: str, out: str) -> None:
    """One step of the network on this rank's half of a fixed batch, micro-batches of 1 video, under DDP (gloo)."""
    from pipeline.training.networks import network_loss

    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _tiny_network()
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = _fixed_batch()
    part = {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()} if world > 1 else batch
    T.train_one_epoch(net, [part], opt, device=torch.device("cpu"),
                      loss_fn=network_loss(model, {"rgb": "rgb", "flow": "flow"}), micro_batch=1)
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.named_parameters()}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def _tiny_network():
    torch.manual_seed(0)
    return create_network("stmult", num_classes=2, sources={"rgb": Source(ARCH, 3), "flow": Source(ARCH, 4)},
                          dropout=0.0)


def _fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8, generator=g),
            "flow": torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8, generator=g),
            "label": torch.tensor([0, 1, 0, 1])}


def test_two_ranks_step_like_one_process(tmp_path):
    """2 ranks x 2 micro-batches of 1 video = 1 process x 4 micro-batches of 1 video: the same BatchNorm batches,
    and (loss weighting, DDP's average) the gradient of the 4 videos' mean loss; every parameter of the network
    gets a gradient (DDP without find_unused_parameters needs that)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_step, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2)
    _ddp_step(0, 1, "", str(tmp_path / "single.pt"))  # the reference: one process, here
    start = dict(_tiny_network().named_parameters())
    ddp, single = (torch.load(tmp_path / f, weights_only=True) for f in ("ddp.pt", "single.pt"))
    for k, q in single.items():
        step = q - start[k].detach()
        err = (ddp[k] - start[k].detach() - step).norm() / step.norm().clamp_min(1e-12)
        assert err < 1e-4 or step.norm() < 1e-9, (k, float(err))
    unused = [k for k in single if not bool((single[k] != start[k]).any())]
    assert not unused, unused
