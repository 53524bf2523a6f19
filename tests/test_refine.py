"""The refine stage: paired sampling (one crop + flip for frames and flow), the head's test frames, the
two-stream segment model, gradient checkpointing, the stage end to end (reproduces train-head's test scores
before training, comparison row), resume after SIGKILL, and bad input.

Upstream outputs are built with the real decode, extract-features and train-head stages, and with tiny
test-only ``extract-flow`` (Farneback) and ``finetune`` (random resnet18 backbones) stages.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.io import artifacts
from pipeline.stage import Stage, StageError, param, run_stage
from pipeline.data.clips import VideoList
from pipeline.models.backbones import create_backbone, normalize_flow, normalize_rgb
from pipeline.models.heads import create_head
from pipeline.data.paired import PairedClips, PairedTestSequences, sequence_frames
from pipeline.models.two_stream import TwoStreamSegmentNet, enable_gradient_checkpointing, load_two_stream_checkpoint
from pipeline.eval.results import load_test_scores
from pipeline.data.sampling import flow_stack_indices, train_indices
from pipeline.io.store import VideoStore
from pipeline.data.table import VideoTable
from stages.decode import STAGE as DECODE, DecodeParams
from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams
from pipeline.training.end_to_end import two_stream_loss
from pipeline.training.loop import EpochBatches, micro_batches, train_one_epoch
from stages.refine import STAGE, RefineParams
from stages.train_head import STAGE as TRAIN_HEAD, TrainHeadParams
from tests.curves import assert_curves_match_history
from tests.fakes import FAKE_FLOW_STAGE as FLOW_STAGE
from tests.fakes import FakeFlowParams as FlowParams
from tests.videos import make_csv_dataset

ARCH = "resnet18"  # the fake finetune's backbone: every later stage runs in the scope split1-resnet18

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # network input side of the tiny backbones


@dataclass(frozen=True)
class FakeFinetuneParams:
    stream: str = param("rgb", "stream")
    arch: str = param("resnet18", "arch")
    input_size: int = param(SIZE, "input size")
    split: int = param(1, "split")
    weights: str = param("none", "weights")
    partial_bn: str = param("auto", "partial BN")
    flow_length: int = param(10, "L")
    flow_bound: float = param(20.0, "bound")
    flow_step: int = param(1, "step")
    seed: int = param(0, "seed")


def _finetune_run(ctx, plan):
    """A finetune output in the stage's checkpoint format: a seeded random backbone with a C-way classifier."""
    p = ctx.params
    table = VideoTable.load(ctx.upstream.dir("decode"))
    in_ch = 3 if p.stream == "rgb" else 2 * p.flow_length
    torch.manual_seed(p.seed + (0 if p.stream == "rgb" else 1))
    model = create_backbone(p.arch, num_classes=len(table.classes), in_channels=in_ch)
    torch.save({"model": model.state_dict(), "arch": p.arch, "stream": p.stream, "num_classes": len(table.classes),
                "in_channels": in_ch, "classes": list(table.classes), "input_size": p.input_size,
                "params": {"input_size": p.input_size, "flow_length": p.flow_length}}, ctx.dir / "best.pt")
    return {"line": f"test finetune/{p.stream}"}


FINETUNE_STAGE = Stage("finetune", "test", FakeFinetuneParams, run=_finetune_run, key=lambda p: artifacts.finetune_key(p.stream, 1, p.arch),
                       upstream=lambda p: ("decode",) if p.stream == "rgb" else ("decode", "extract-flow"))


@dataclass(frozen=True)
class FakeHeadParams:
    name: str = param("bad", "output name")
    rgb_dim: int = param(512, "rgb width")
    flow_dim: int = param(512, "flow width")
    num_classes: int = param(2, "classes")


def _head_run(ctx, plan):
    p = ctx.params
    head = create_head("concat", num_classes=p.num_classes, rgb_dim=p.rgb_dim, flow_dim=p.flow_dim, num_segments=3)
    torch.save({"model": head.state_dict(), "head": "concat", "head_kwargs": {}, "num_classes": p.num_classes,
                "rgb_dim": p.rgb_dim, "flow_dim": p.flow_dim, "num_segments": 3,
                "classes": ["Alpha", "Beta"][:p.num_classes] + [f"C{i}" for i in range(2, p.num_classes)]},
               ctx.dir / "best.pt")
    (ctx.dir / "results.json").write_text(json.dumps({"positions": 6, "top1": 0.5, "mean_class_accuracy": 0.5}))
    return {"line": "test head"}


HEAD_STAGE = Stage("train-head", "test", FakeHeadParams, run=_head_run, key=lambda p: artifacts.head_key(p.name, 1, ARCH),
                   upstream=lambda p: (artifacts.features_key(1, ARCH),))

HEAD = TrainHeadParams(backbone=ARCH, head="stfn", segments=3, max_epochs=3, batch_size=4, device="cpu")
HEAD_NAME = "stfn-a-avg-bi-n3-s0"
# Tiny refine: 6 training videos (2 validation); one step of 4 videos per epoch (the incomplete last batch is
# dropped), accumulated over 2 micro-batches of 2.
TINY = dict(backbone=ARCH, head_name=HEAD_NAME, batch_size=4, micro_batch=2, workers=0, device="cpu")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """decode, extract-flow, finetune/{rgb,flow}, extract-features (P = 6) and train-head (STFN, N = 3)."""
    root = tmp_path_factory.mktemp("refine")
    data = make_csv_dataset(root / "data", videos_per_class=5, num_frames=12, size=(48, 32))
    cache = root / "cache"
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, val_fraction=0.25, workers=1), cache)
    run_stage(FLOW_STAGE, FlowParams(), cache)
    for stream in ("rgb", "flow"):
        run_stage(FINETUNE_STAGE, FakeFinetuneParams(stream=stream), cache)
    run_stage(FEATURES, ExtractFeaturesParams(arch=ARCH, positions=6, workers=1, batch_size=16, device="cpu"), cache)
    run_stage(TRAIN_HEAD, HEAD, cache)
    return cache


def fresh_cache(upstream: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(parents=True)
    for key in ("decode", "extract-flow", "finetune", "extract-features", "train-head"):
        (cache / key).symlink_to(upstream / key, target_is_directory=True)
    return cache


# ------------------------------------------------------------------------------------------ sampling

def test_sequence_frames_hand_computed():
    # 100 frames, P = 25: position k is frame floor(100 (2k + 1) / 50) = 2 + 4k. N = 5 segments of 5 positions;
    # sequence j takes offset floor((2j + 1) 5 / 10) = j in every segment: position 5s + j.
    got = sequence_frames(100, 25, 5, 5)
    want = np.array([[2 + 4 * (5 * s + j) for s in range(5)] for j in range(5)])
    np.testing.assert_array_equal(got, want)
    # P = 6, N = 3 (the stage test's setting), 12 frames: positions 1, 3, 5, 7, 9, 11; two per segment, the 5
    # sequences take offsets floor((2j + 1) 2 / 10) = 0, 0, 1, 1, 1.
    np.testing.assert_array_equal(sequence_frames(12, 6, 3, 5)[:, 0], [1, 1, 3, 3, 3])
    np.testing.assert_array_equal(sequence_frames(12, 6, 3, 5)[4], [3, 7, 11])


H, W, T = 24, 40, 20


@pytest.fixture(scope="module")
def coded_stores(tmp_path_factory):
    """Frames: red = 10 t (frame), green = 5 x (column), blue = 9 y. Flow field i: x = 10 + 5 i (constant, so a
    flip shows as 255 - x), y = 5 x (column). Raw codecs, so the values come back exactly."""
    root = tmp_path_factory.mktemp("coded")
    frames, flows = VideoStore(root / "frames"), VideoStore(root / "flow")
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([np.stack([np.full_like(x, 10 * t), 5 * x, 9 * y], -1) for t in range(T)]).astype(np.uint8)
    flow = np.stack([np.stack([np.full_like(x, 10 + 5 * i), 5 * x], -1) for i in range(T - 1)]).astype(np.uint8)
    with frames.writer("v") as c:
        c.write_images("frames", rgb, codec="raw")
    with flows.writer("v") as c:
        c.write_images("flow", flow, codec="raw")
        c.set_attrs({"num_flows": T - 1, "num_frames": T, "step": 1, "bound": 20.0})
    return frames, flows


def test_paired_clips_share_frames_crop_and_flip(coded_stores):
    frames, flows = coded_stores
    videos = VideoList(("v",), (1,), (T,))
    # One crop scale equal to the short side and input = short side: no resize, the crop is a 24 x 24 window at a
    # corner or the centre (left 0, 16 or 8), so the column codes tell where each stream was cut and whether flipped.
    ds = PairedClips(frames, flows, videos, num_segments=3, rgb_size=H, flow_size=H, flow_length=4, seed=5,
                     scales=(256,), base_size=256)
    seen = set()
    for epoch in range(12):
        s = ds[(0, epoch)]
        rgb, flow = s["rgb"].numpy().astype(int), s["flow"].numpy().astype(int)
        assert rgb.shape == (3, 3, H, H) and flow.shape == (3, 8, H, H) and s["label"] == 1
        # Segments: TSN frames of this sample's generator (first draws), red = 10 t.
        want_frames = train_indices(T, 3, np.random.default_rng([5, epoch, 0]))
        assert [int(rgb[k, 0, 0, 0]) // 10 for k in range(3)] == want_frames
        cols_rgb = rgb[0, 1, 0] // 5                      # source column of every output column
        flipped = bool(cols_rgb[0] > cols_rgb[-1])
        left = int(cols_rgb.min())
        assert left in (0, 8, 16) and sorted(cols_rgb) == list(range(left, left + H))
        for k in range(3):
            np.testing.assert_array_equal(rgb[k, 1, 0] // 5, cols_rgb)   # same window for every frame
            for j in range(4):
                np.testing.assert_array_equal(flow[k, 2 * j + 1, 0] // 5, cols_rgb)  # ... and every flow field
                # x channel: field index of the stack centred on the segment's frame; 255 - x when flipped.
                xq = flow[k, 2 * j, 0, 0]
                field = ((255 - xq) if flipped else xq) - 10
                assert field == 5 * flow_stack_indices(want_frames[k], T - 1, 4)[j]
        seen.add((left, flipped))
    assert len({f for _, f in seen}) == 2 and len({left for left, _ in seen}) >= 2  # both flips, several crops


def test_paired_test_sequences_read_the_head_frames(coded_stores):
    frames, flows = coded_stores
    ds = PairedTestSequences(frames, flows, VideoList(("v",), (0,), (T,)), num_segments=2, num_positions=10,
                             num_test=5, rgb_size=16, flow_size=16, flow_length=4)
    item = ds[0]
    seq = item["sequences"].numpy()
    # P = 10 over 20 frames: position k is frame 2k + 1; N = 2 segments of 5 positions; sequence j: position j
    # and 5 + j -> frames 2j + 1 and 2j + 11.
    want = np.array([[2 * j + 1, 2 * j + 11] for j in range(5)])
    got = item["rgb"][:, 0, 0, 0].numpy().astype(int)[seq] // 10
    np.testing.assert_array_equal(got, want)
    assert item["rgb"].shape == (10, 3, 16, 16) and item["flow"].shape == (10, 8, 16, 16)
    # Flow: the stack centred on the frame, unflipped.
    first = item["flow"][:, 0, 0, 0].numpy().astype(int)[seq]
    np.testing.assert_array_equal(first, 10 + 5 * np.vectorize(lambda c: flow_stack_indices(c, T - 1, 4)[0])(want))


# ------------------------------------------------------------------------------------------ model

class RecordingHead(nn.Module):
    """A head that records its inputs and returns uniform log-probabilities plus a term using them."""

    def __init__(self, n, da, dm, c=3):
        super().__init__()
        self.num_segments, self.rgb_dim, self.flow_dim, self.c = n, da, dm, c
        self.fc = nn.Linear(da + dm, c)
        self.seen = []

    def forward(self, a, m):
        self.seen.append((a.detach().clone(), m.detach().clone()))
        return torch.log_softmax(self.fc(torch.cat([a, m], -1)).mean(1), -1)

    def loss(self, a, m, y):
        return nn.functional.nll_loss(self(a, m), y)


def test_model_feeds_per_segment_backbone_features_to_head():
    torch.manual_seed(0)
    rgb_net = create_backbone("resnet18", num_classes=0, in_channels=3).eval()
    flow_net = create_backbone("resnet18", num_classes=0, in_channels=4).eval()
    head = RecordingHead(3, 512, 512)
    model = TwoStreamSegmentNet(rgb_net, flow_net, head).eval()
    rgb = torch.randint(0, 256, (2, 3, 3, SIZE, SIZE), dtype=torch.uint8)
    flow = torch.randint(0, 256, (2, 3, 4, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        out = model(rgb, flow)
        a, m = head.seen[-1]
        assert a.shape == (2, 3, 512) and m.shape == (2, 3, 512) and out.shape == (2, 3)
        for b in range(2):
            for n in range(3):  # every segment through the same backbone, one input at a time
                ra = rgb_net.forward_features(normalize_rgb(rgb[b, n][None]))[0]
                rm = flow_net.forward_features(normalize_flow(flow[b, n][None]))[0]
                torch.testing.assert_close(a[b, n], ra, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(m[b, n], rm, rtol=1e-4, atol=1e-5)
    # The loss reaches both backbones and the head.
    model.train()
    model(rgb, flow, torch.tensor([0, 2])).backward()
    for part in (rgb_net, flow_net, head):
        assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in part.parameters())
    with pytest.raises(ValueError, match="rgb 256-d"):
        TwoStreamSegmentNet(rgb_net, flow_net, RecordingHead(3, 256, 512))


def test_gradient_checkpointing_matches_plain_backward():
    x = torch.randn(4, 3, SIZE, SIZE)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net = create_backbone("resnet18", num_classes=0, in_channels=3).train()
        if checkpointed:
            assert enable_gradient_checkpointing(net) == 4  # layer1..layer4
            assert set(net.state_dict()) == set(create_backbone("resnet18", num_classes=0).state_dict())
        net.forward_features(x).square().sum().backward()
        results.append(({k: q.grad.clone() for k, q in net.named_parameters()},
                         {k: b.clone() for k, b in net.named_buffers()}))
    (g0, b0), (g1, b1) = results
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)
    for k in b0:  # running statistics updated once, not twice, by the recomputation
        torch.testing.assert_close(b1[k], b0[k], rtol=0, atol=0)


def test_loss_decreases_on_a_fixed_batch():
    model, batch = _tiny_model(), _fixed_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    losses = [train_one_epoch(model, [batch], opt, device=torch.device("cpu"), loss_fn=two_stream_loss, micro_batch=2)["loss"]
              for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("b, micro, sizes", [(10, 4, [3, 3, 4]), (8, 4, [4, 4]), (3, 4, [3]), (5, 1, [1] * 5),
                                            (7, 3, [2, 2, 3])])
def test_micro_batches(b, micro, sizes):
    chunks = micro_batches(b, micro)
    assert [c.stop - c.start for c in chunks] == sizes and chunks[0].start == 0 and chunks[-1].stop == b
    assert all(a.stop == c.start for a, c in zip(chunks, chunks[1:]))


def test_full_batches_drop_the_incomplete_last_batch():
    assert [len(b) for b in EpochBatches(10, 4, drop_last=True).global_batches()] == [4, 4]
    assert [len(b) for b in EpochBatches(3, 4, drop_last=True).global_batches()] == [3]  # a single short batch is kept
    seen = np.concatenate(EpochBatches(12, 4, seed=3, drop_last=True).global_batches())
    assert sorted(seen.tolist()) == list(range(12))


def _tiny_model(seed: int = 0) -> TwoStreamSegmentNet:
    torch.manual_seed(seed)
    return TwoStreamSegmentNet(create_backbone("resnet18", num_classes=0, in_channels=3),
                               create_backbone("resnet18", num_classes=0, in_channels=4),
                               create_head("stfn", num_classes=2, rgb_dim=512, flow_dim=512, num_segments=2,
                                           dropout=0.0))


def _fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randint(0, 256, (4, 2, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
            "flow": torch.randint(0, 256, (4, 2, 4, SIZE, SIZE), dtype=torch.uint8, generator=g),
            "label": torch.tensor([0, 1, 0, 1])}


def _ddp_step(rank: int, world: int, init_file: str, out: str) -> None:
    """One SGD step on this rank's half of the fixed batch, micro-batches of 1 video, under DDP (gloo)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _tiny_model()
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    half = {k: v[2 * rank:2 * rank + 2] for k, v in _fixed_batch().items()}
    train_one_epoch(net, [half], opt, device=torch.device("cpu"), loss_fn=two_stream_loss, micro_batch=1)
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.named_parameters()}, out)
    torch.distributed.destroy_process_group()


def _single_step(_: int, out: str) -> None:
    """The same step in one process: the whole fixed batch, micro-batches of 1 video."""
    torch.set_num_threads(1)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, [_fixed_batch()], opt, device=torch.device("cpu"), loss_fn=two_stream_loss, micro_batch=1)
    torch.save({k: v.detach() for k, v in model.named_parameters()}, out)


def test_two_ranks_with_accumulation_step_like_one_process(tmp_path):
    """2 ranks x 2 micro-batches of 1 video = 1 process x 4 micro-batches of 1 video: the same BatchNorm batches
    and, with the loss weighting and DDP's average, the gradient of the 4 videos' mean loss."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_step, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2)
    # The single-process reference runs in a fresh process too, so that both sides run with the same
    # library state (the test process has run hundreds of other tests by now).
    mp.spawn(_single_step, args=(str(tmp_path / "single.pt"),), nprocs=1)
    model = _tiny_model()
    model.load_state_dict(torch.load(tmp_path / "single.pt", weights_only=True), strict=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = dict(_tiny_model().named_parameters())
    for k, q in model.named_parameters():
        step = (q - start[k]).detach()
        assert step.abs().max() > 0 or k.startswith("head")  # every backbone parameter moved
        err = (ddp[k] - start[k].detach() - step).norm() / step.norm().clamp_min(1e-12)
        assert err < 1e-4 or step.norm() < 1e-9, (k, float(err))  # float summation order only


# ------------------------------------------------------------------------------------------ the stage

def test_untrained_refine_reproduces_train_head_scores(upstream, tmp_path):
    """--epochs 0 tests the starting networks: the same frames, crops, flow stacks and head as extract-features
    + train-head, so the same test scores up to the feature store's float16."""
    cache = fresh_cache(upstream, tmp_path)
    res = run_stage(STAGE, RefineParams(epochs=0, **TINY), cache)
    out = cache / artifacts.refine_key(HEAD_NAME, 1, ARCH)
    ours = load_test_scores(out / "test_scores.npz")
    theirs = load_test_scores(upstream / artifacts.head_key(HEAD_NAME, 1, ARCH) / "test_scores.npz")
    assert ours.video_ids.tolist() == theirs.video_ids.tolist() and ours.scores.shape == (2, 2)
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=5e-3)
    r = json.loads((out / "results.json").read_text())
    head_r = json.loads((upstream / artifacts.head_key(HEAD_NAME, 1, ARCH) / "results.json").read_text())
    assert r["comparison"]["head_only"]["top1"] == head_r["top1"]
    assert r["comparison"]["refined"]["top1"] == r["top1"] == float((ours.scores.argmax(1) == ours.labels).mean())
    assert "head only -> refined" in res.message and r["epochs"] == 0
    assert {"per_class_accuracy", "confusion", "mean_class_accuracy"} <= set(r)
    assert (out / "confusion.png").is_file() and (out / "best.pt").is_file()
    model, ckpt = load_two_stream_checkpoint(out / "best.pt")
    assert ckpt["num_segments"] == 3 and model.head.num_segments == 3


def _train_cmd(cache: Path) -> list[str]:
    code = ("import sys, torch; torch.set_num_threads(1); from pathlib import Path; from pipeline.stage import "
            "run_stage; from stages.refine import STAGE, RefineParams; "
            f"run_stage(STAGE, RefineParams(epochs=3, **{TINY!r}), Path(sys.argv[1]))")
    return [sys.executable, "-c", code, str(cache)]


def test_kill_and_resume_gives_the_same_model(upstream, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    full = fresh_cache(upstream, tmp_path / "full")
    # One thread, as the subprocess; --tensorboard changes nothing but the curves it writes.
    run_stage(STAGE, RefineParams(epochs=3, tensorboard=True, **TINY), full)
    killed = fresh_cache(upstream, tmp_path / "killed")
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not torch.load(last, weights_only=True)["done"]  # killed while training
    res = run_stage(STAGE, RefineParams(epochs=3, **TINY), killed)
    assert res.manifest["resumed"]
    for name in ("last.pt", "best.pt"):
        a = torch.load(full / artifacts.refine_key(HEAD_NAME, 1, ARCH) / name, weights_only=True)
        b = torch.load(killed / artifacts.refine_key(HEAD_NAME, 1, ARCH) / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    r = json.loads((killed / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "results.json").read_text())
    assert r["epochs"] == 3 and len(r["history"]) == 3 and r["history"][0]["train_loss"] > 0
    assert (killed / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "curves.png").is_file()
    np.testing.assert_array_equal(load_test_scores(full / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "test_scores.npz").scores,
                                  load_test_scores(killed / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "test_scores.npz").scores)
    # Fresh now: a second run does nothing.
    assert run_stage(STAGE, RefineParams(epochs=3, **TINY), killed).skipped
    full_r = json.loads((full / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "results.json").read_text())
    assert_curves_match_history(full / artifacts.refine_key(HEAD_NAME, 1, ARCH), full_r["history"])


def test_single_stream_head_trains_only_its_backbone(upstream, tmp_path):
    import dataclasses

    cache = fresh_cache(upstream, tmp_path)
    (cache / "train-head").unlink()
    run_stage(TRAIN_HEAD, dataclasses.replace(HEAD, head="rgb"), cache)
    run_stage(STAGE, RefineParams(epochs=1, **{**TINY, "head_name": "rgb-n3-s0"}), cache)
    refined = torch.load(cache / artifacts.refine_key("rgb-n3-s0", 1, ARCH) / "last.pt", weights_only=True)["model"]
    for stream, moved in (("rgb", True), ("flow", False)):
        start = torch.load(cache / artifacts.finetune_key(stream, 1, ARCH) / "best.pt", weights_only=True)["model"]
        same = [torch.equal(refined[f"{stream}.{k}"], v) for k, v in start.items() if k.startswith("trunk.")]
        assert (not all(same)) if moved else all(same), stream


def test_missing_head_lists_the_available_ones(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    with pytest.raises(StageError, match=rf"stfn-nope.*available train-head outputs: {HEAD_NAME}"):
        run_stage(STAGE, RefineParams(**{**TINY, "head_name": "stfn-nope"}), cache)
    from stages.cli import make_stage_command

    res = CliRunner().invoke(make_stage_command(STAGE), ["--head-name", "stfn-nope", "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "available train-head outputs" in res.output


@pytest.mark.parametrize("head, match", [
    (FakeHeadParams(name="wide", rgb_dim=1024), r"rgb 1024-d.*finetune/rgb \(resnet18\) gives 512-d"),
    (FakeHeadParams(name="classes", num_classes=5), r"5-way classifier, the video table has 2 classes"),
])
def test_head_that_does_not_fit_the_backbones(upstream, tmp_path, head, match):
    cache = fresh_cache(upstream, tmp_path)
    (cache / "train-head").unlink()
    (cache / "train-head").mkdir()
    run_stage(HEAD_STAGE, head, cache)
    with pytest.raises(StageError, match=match):
        run_stage(STAGE, RefineParams(**{**TINY, "head_name": head.name}), cache)


def test_bad_parameters():
    from pipeline.stage.validate import validate_params

    for bad, match in ((dict(micro_batch=0), "--micro-batch"),
                       (dict(head_name="a/b"), "--head-name")):
        with pytest.raises(StageError, match=match):
            validate_params(RefineParams(**bad))


def test_one_holdout_feature_store_train_head_and_refine_validate_on_the_same_videos(upstream, tmp_path):
    """decode records the hold-out (one group per class at --val-fraction 0.25 with 4 training groups per
    class); the feature store copies it, train-head and refine validate on exactly those videos."""
    from pipeline.data.table import VideoTable
    from pipeline.io.store import read_feature_store

    table = VideoTable.load(upstream / "decode")
    val = sorted(table.video_ids[i] for i in table.indices(1, "val"))
    assert len(val) == 2 and {v.split("/")[0] for v in val} == {"Alpha", "Beta"}
    assert not set(val) & {table.video_ids[i] for i in table.indices(1, "train")}
    fs = read_feature_store(upstream / artifacts.features_key(1, ARCH) / "features.zarr", ["rgb"])
    assert sorted(np.asarray(fs.video_ids)[np.asarray(fs.split).astype(str) == "val"].astype(str)) == val
    head_r = json.loads((upstream / artifacts.head_key(HEAD_NAME, 1, ARCH) / "results.json").read_text())
    assert sorted(head_r["val_video_ids"]) == val
    cache = fresh_cache(upstream, tmp_path)
    run_stage(STAGE, RefineParams(epochs=0, **TINY), cache)
    r = json.loads((cache / artifacts.refine_key(HEAD_NAME, 1, ARCH) / "results.json").read_text())
    assert sorted(r["val_video_ids"]) == val
