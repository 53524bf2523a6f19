"""extract-features: layout, values against an independent forward, views, resume after SIGKILL, 2 ranks,
non-finite features and bad input.

Upstream outputs come from the real decode stage and two test-only stages named "extract-flow" and
"finetune" (random uint8 flow; random-initialised ResNet-18 checkpoints with a fixed seed): the point is
the plumbing, so a random backbone is as good as a trained one, and the reference forward below is built
from plain torchvision, not from pipeline.models.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
import zarr
from click.testing import CliRunner

import pipeline.features
import stages.extract_features as ef
from pipeline.io import artifacts
from pipeline.stage import Plan, Stage, StageFailures, param, run_stage
from stages.cli import main
from pipeline.models.backbones import create_backbone
from pipeline.io.store import VideoStore, read_feature_store, read_frames
from pipeline.data.table import VideoTable
from stages.decode import STAGE as DECODE
from stages.decode import DecodeParams
from stages.extract_features import STAGE, ExtractFeaturesParams
from tests.fakes import FAKE_FLOW_STAGE, FakeFlowParams
from tests.videos import make_csv_dataset

REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES, L, SIZE = 12, 4, 64  # clips of 12 frames (64x48), flow stacks of 4 fields, 64-px network input


# ---------------------------------------------------------------------------------------------------------
# Test-only upstream stages
# ---------------------------------------------------------------------------------------------------------

def _table_plan(params, upstream):
    return Plan("", VideoTable.load(upstream.dir("decode")))


ARCH = "resnet18"  # the fake finetune's backbone: the scope split1-resnet18
FEATURES = artifacts.features_key(1, ARCH)


@dataclass(frozen=True)
class FinetuneParams:
    stream: str = param("rgb", "rgb or flow")
    num_classes: int = param(0, "0: the table's class count")
    seed: int = param(0, "init seed")


def _finetune_run(ctx, plan):
    p, table = ctx.params, plan.data
    torch.manual_seed(p.seed)
    c = p.num_classes or len(table.classes)
    model = create_backbone("resnet18", num_classes=c, in_channels=3 if p.stream == "rgb" else 2 * L)
    torch.save({"model": model.state_dict(), "arch": "resnet18", "num_classes": c,
                "in_channels": model.in_channels, "classes": list(table.classes)[:c] + ["x"] * (c - len(table.classes)),
                "params": {"arch": "resnet18", "input_size": SIZE, "flow_length": L, "split": 1}, "epoch": 1},
               ctx.dir / "best.pt")
    return {}


FAKE_FINETUNE = Stage("finetune", "test", FinetuneParams, run=_finetune_run, plan=_table_plan,
                      upstream=lambda p: ("decode",), key=lambda p: artifacts.finetune_key(p.stream, 1, ARCH))


@pytest.fixture(scope="module")
def upstream_cache(tmp_path_factory):
    """decode (6 real clips, 2 classes) + random flow + random ResNet-18 checkpoints for both streams."""
    base = tmp_path_factory.mktemp("ef")
    data = make_csv_dataset(base / "data", videos_per_class=3, num_frames=NUM_FRAMES)
    cache = base / "cache"
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, workers=1), cache)
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), cache)
    run_stage(FAKE_FINETUNE, FinetuneParams(stream="rgb", seed=1), cache)
    run_stage(FAKE_FINETUNE, FinetuneParams(stream="flow", seed=2), cache)
    return cache


@pytest.fixture
def cache(upstream_cache, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(upstream_cache, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# An independent reference: plain torchvision ResNet-18, crops with torchvision, hand-written normalisation
# ---------------------------------------------------------------------------------------------------------

def reference_model(checkpoint: Path) -> torch.nn.Module:
    ck = torch.load(checkpoint, weights_only=True)
    m = torchvision.models.resnet18()
    if ck["in_channels"] != 3:
        m.conv1 = torch.nn.Conv2d(ck["in_channels"], 64, 7, 2, 3, bias=False)
    m.fc = torch.nn.Identity()
    m.load_state_dict({k[len("trunk."):]: v for k, v in ck["model"].items() if k.startswith("trunk.")})
    return m.eval()


def hand_positions(n, P):
    return [(n * (2 * k + 1)) // (2 * P) for k in range(P)]


def rgb_reference(model, cache, vid, frames, view="center"):
    """Features of frames ``frames`` of ``vid``: resize the short side to round(64 * 256 / 224) = 73, crop."""
    store = VideoStore(cache / "decode" / "frames", "zarr")
    x = read_frames(store, vid, frames).permute(0, 3, 1, 2)
    x = TF.resize(x, [73], antialias=True)
    if view == "center":
        x = TF.center_crop(x, [SIZE])
    else:  # top-left corner, mirrored
        x = TF.horizontal_flip(x[..., :SIZE, :SIZE])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        return model((x.float() / 255 - mean) / std).numpy()


def flow_reference(model, cache, vid, centres, view="center"):
    """Features of the L-flow stacks centred on ``centres``, read with plain zarr."""
    raw = zarr.open_group(str(cache / "extract-flow" / "flow" / f"{vid}.zarr"), mode="r")["flow/raw"][...]
    nf = raw.shape[0]
    stacks = []
    for c in centres:
        start = min(max(c - L // 2, 0), nf - L)  # shifted, not truncated, at the ends
        s = raw[start:start + L]                 # (L, H, W, 2)
        stacks.append(s.transpose(0, 3, 1, 2).reshape(2 * L, *s.shape[1:3]))  # x0, y0, x1, y1, ...
    x = TF.resize(torch.from_numpy(np.stack(stacks)), [73], antialias=True)
    if view == "center":
        x = TF.center_crop(x, [SIZE])
    else:
        x = TF.horizontal_flip(x[..., :SIZE, :SIZE]).clone()
        x[:, 0::2] = 255 - x[:, 0::2]  # mirrored x-flow changes sign: q -> 255 - q
    with torch.no_grad():
        return model((x.float() - 127.5) / 127.5).numpy()


def assert_fp16_close(stored, ref):
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * scale)


# ---------------------------------------------------------------------------------------------------------

def test_layout_values_and_plain_readers(cache):
    P = 16  # more positions than the clips' 12 frames: positions repeat and are computed once
    r = run_stage(STAGE, ExtractFeaturesParams(arch=ARCH, positions=P, store="both", batch_size=7, workers=2), cache)
    out = cache / FEATURES
    assert r.manifest["complete"] and r.manifest["done"] == 6 and "frames/s" in r.message
    assert not (out / "parts").exists() and not list(out.rglob(".tmp-*"))

    with h5py.File(out / "features.h5", "r") as f:
        rgb, flow = f["streams/rgb"][...], f["streams/flow"][...]
        ids = [s.decode() for s in f["video_ids"][...]]
        h5 = {k: f[k][...] for k in ("positions", "labels")}
        split = [s.decode() for s in f["split"][...]]
        groups = [s.decode() for s in f["groups"][...]]
        classes = [s.decode() for s in f["class_names"][...]]
        attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    z = zarr.open_group(str(out / "features.zarr"), mode="r")
    assert rgb.shape == (6, P, 1, 512) and flow.shape == (6, P, 1, 512) and rgb.dtype == np.float16
    assert np.array_equal(z["streams/rgb"][...], rgb) and np.array_equal(z["streams/flow"][...], flow)
    assert [str(s) for s in z["video_ids"][...]] == ids and np.array_equal(z["labels"][...], h5["labels"])
    assert [str(s) for s in z["split"][...]] == split
    assert ids == [f"{c}/v_{c}_g{i:02d}_c01" for c in ("Alpha", "Beta") for i in (1, 2, 3)]
    assert h5["labels"].tolist() == [0, 0, 0, 1, 1, 1] and classes == ["Alpha", "Beta"]
    assert split == ["train", "train", "test"] * 2  # the CSV lists the last clip of each class as test
    assert len(set(groups)) == 6
    assert h5["positions"].dtype == np.float32
    assert h5["positions"].tolist() == [hand_positions(NUM_FRAMES, P)] * 6
    assert attrs["format_version"] == 3 and attrs["streams"] == ["rgb", "flow"] and attrs["num_positions"] == P
    assert attrs["max_segments"] == 3 and attrs["dtype"] == "float16" and attrs["split_id"] == 1
    for s in ("rgb", "flow"):
        b = attrs["backbones"][s]
        ck = cache / artifacts.finetune_key(s, 1, ARCH) / "best.pt"
        assert b["arch"] == "resnet18" and b["weights"] == "finetune" and b["input_size"] == SIZE
        assert b["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
        assert b["upstream_fingerprint"] == json.loads((ck.parent / "manifest.json").read_text())["fingerprint"]
    assert attrs["backbones"]["flow"]["flow_length"] == L and attrs["backbones"]["flow"]["in_channels"] == 2 * L

    # Values: an independent forward of the same weights on the same crops, for two videos, every position.
    rgb_model = reference_model(cache / artifacts.finetune_key("rgb", 1, ARCH) / "best.pt")
    flow_model = reference_model(cache / artifacts.finetune_key("flow", 1, ARCH) / "best.pt")
    pos = hand_positions(NUM_FRAMES, P)
    for v in (0, 4):
        assert_fp16_close(rgb[v, :, 0], rgb_reference(rgb_model, cache, ids[v], pos))
        assert_fp16_close(flow[v, :, 0], flow_reference(flow_model, cache, ids[v], pos))
    assert np.abs(rgb[0] - rgb[1]).max() > 0.01  # different videos, different features

    back = read_feature_store(out / "features.zarr")  # the library reader sees the same
    assert np.array_equal(back.streams["flow"], flow) and back.attrs["fingerprint"] == r.fingerprint
    assert run_stage(STAGE, ExtractFeaturesParams(arch=ARCH, positions=P, store="both"), cache).skipped


def test_ten_crop_views_float32(cache):
    r = run_stage(STAGE, ExtractFeaturesParams(arch=ARCH, positions=3, views=10, dtype="float32", store="h5"), cache)
    assert r.manifest["complete"]
    with h5py.File(cache / FEATURES / "features.h5", "r") as f:
        rgb, flow = f["streams/rgb"][...], f["streams/flow"][...]
        vid = f["video_ids"][2].decode()
        names = json.loads(f.attrs["view_names"])
    assert rgb.shape == (6, 3, 10, 512) and rgb.dtype == np.float32 and names[4] == "center"
    pos = hand_positions(NUM_FRAMES, 3)
    rgb_model = reference_model(cache / artifacts.finetune_key("rgb", 1, ARCH) / "best.pt")
    flow_model = reference_model(cache / artifacts.finetune_key("flow", 1, ARCH) / "best.pt")
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rgb[2, :, 4], rgb_reference(rgb_model, cache, vid, pos), **tol)
    np.testing.assert_allclose(rgb[2, :, 5], rgb_reference(rgb_model, cache, vid, pos, "tl_flip"), **tol)
    np.testing.assert_allclose(flow[2, :, 4], flow_reference(flow_model, cache, vid, pos), **tol)
    np.testing.assert_allclose(flow[2, :, 5], flow_reference(flow_model, cache, vid, pos, "tl_flip"), **tol)


def _read_h5(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("streams/rgb", "streams/flow", "positions", "labels", "video_ids", "split")}


def _assert_same_store(a, b):
    da, db = _read_h5(a), _read_h5(b)
    for k in da:
        assert np.array_equal(da[k], db[k]), k


def test_kill_and_resume_gives_identical_features(cache, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(cache, clean)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--positions", "16", "--input-size", "112", "--store", "h5", "--workers", "1"]
    cmd = [sys.executable, "-m", "stages", "extract-features", "--arch", ARCH, "--cache-dir", str(cache), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = cache / FEATURES / "journal.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 2):
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(journal.read_text().splitlines())
    assert 2 <= done_before < 6, f"the run must be killed mid-stage ({done_before} of 6 were done)"
    assert not (cache / FEATURES / "manifest.json").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr and f"{6 - done_before} inputs" not in res.stdout
    p = ExtractFeaturesParams(arch=ARCH, positions=16, input_size=112, store="h5", workers=1)
    assert run_stage(STAGE, p, clean).manifest["done"] == 6
    _assert_same_store(cache / FEATURES / "features.h5", clean / FEATURES / "features.h5")
    assert not list((cache / FEATURES).rglob(".tmp-*"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(cache, tmp_path):
    # Random seeded ResNet-18s from --weights none: no finetune upstream (decode + extract-flow only).
    for d in ("finetune",):
        shutil.rmtree(cache / d)
    single = tmp_path / "single"
    shutil.copytree(cache, single)
    args = ["--rgb-weights", "none", "--flow-weights", "none", "--arch", "resnet18", "--input-size", "32",
            "--flow-length", "2", "--positions", "8", "--store", "h5", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "stages", "extract-features", "--arch", ARCH, "--cache-dir", str(cache), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = cache / FEATURES
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["done"] == 6 and m["world_size"] == 2
    rank1 = [json.loads(x) for x in (out / "journal.rank1.jsonl").read_text().splitlines()]
    assert len(rank1) == 3 and all(r["rank"] == 1 for r in rank1)  # rank 1 took videos 1, 3, 5

    res = CliRunner().invoke(main, ["extract-features", "--arch", ARCH, "--cache-dir", str(single), *args])
    assert res.exit_code == 0, res.output
    _assert_same_store(out / "features.h5", single / FEATURES / "features.h5")
    with h5py.File(out / "features.h5", "r") as f:
        assert json.loads(f.attrs["backbones"])["rgb"]["weights"] == "none"


def _poisoned_backbones(monkeypatch):
    """RGB forward #2 returns a NaN, flow forward #3 values beyond float16 (one forward per video here).

    Video 1 fails in its RGB pass, so its flow pass never runs: flow forward #3 is video 3's.
    """
    real = pipeline.features.create_backbone

    def fake(arch, **kw):
        model = real(arch, **kw)
        orig, calls = model.forward_features, [0]
        rgb = kw.get("in_channels", 3) == 3

        def forward_features(x):
            y = orig(x)
            calls[0] += 1
            if rgb and calls[0] == 2:
                y = y.clone()
                y[1, 7] = float("nan")
            if not rgb and calls[0] == 3:
                y = y * 0 + 1e6
            return y

        model.forward_features = forward_features
        return model

    monkeypatch.setattr(pipeline.features, "create_backbone", fake)


def test_non_finite_features_are_failures_never_stored(cache, monkeypatch):
    _poisoned_backbones(monkeypatch)
    p = ExtractFeaturesParams(arch=ARCH, positions=8, store="zarr", workers=1)
    with pytest.raises(StageFailures) as e:
        run_stage(STAGE, p, cache)
    ids = VideoTable.load(cache / "decode").video_ids
    assert f"{ids[1]}: non-finite rgb features (NaN) at 1 of 8 positions" in str(e.value)
    assert f"{ids[3]}: non-finite flow features (values beyond the float16 range" in str(e.value)
    out = cache / FEATURES
    assert not (out / "features.zarr").exists()  # failures not allowed: nothing consolidated
    parts = VideoStore(out / "parts", "h5")
    assert parts.video_ids() == [ids[i] for i in (0, 2, 4, 5)]
    monkeypatch.undo()  # healthy networks: the re-run retries only the two failed videos
    r = run_stage(STAGE, p, cache)
    assert r.manifest["complete"] and r.manifest["summary"]["inputs_this_run"] == 2 * 2 * 8
    fs = read_feature_store(out / "features.zarr")
    assert list(fs.video_ids) == ids and np.isfinite(fs.streams["rgb"]).all()


def test_missing_flow_is_a_failure_of_that_video(cache):
    ids = VideoTable.load(cache / "decode").video_ids
    shutil.rmtree(cache / "extract-flow" / "flow" / f"{ids[2]}.zarr")
    res = CliRunner().invoke(main, ["extract-features", "--arch", ARCH, "--cache-dir", str(cache), "--positions", "4",
                                    "--workers", "1"])
    assert res.exit_code == 1 and f"{ids[2]}: no flow for this video" in res.output
    assert f"{ids[2]}.zarr is missing" in res.output
    res = CliRunner().invoke(main, ["extract-features", "--arch", ARCH, "--cache-dir", str(cache), "--positions", "4",
                                    "--workers", "1", "--allow-failures"])
    assert res.exit_code == 0, res.output
    fs = read_feature_store(cache / FEATURES / "features.zarr")
    assert ids[2] not in set(fs.video_ids) and len(fs.video_ids) == 5


@pytest.mark.parametrize("case", ["classes", "arch", "in_channels", "store_version", "disk", "views",
                                  "weights_file", "split"])
def test_bad_input_is_refused_before_work(cache, monkeypatch, case):
    args = ["--positions", "4"]
    if case == "classes":
        run_stage(FAKE_FINETUNE, FinetuneParams(stream="rgb", num_classes=5), cache)
        expect = "5-way classifier, the video table has 2 classes"
    elif case == "arch":
        args += ["--arch", "resnet50", "--rgb-weights", str(cache / artifacts.finetune_key("rgb", 1, ARCH) / "best.pt"),
                 "--flow-weights", "none"]
        expect = "holds a resnet18 backbone but --arch resnet50"
    elif case == "in_channels":
        args += ["--flow-length", "10"]
        expect = "checkpoint takes 8 input channels, the flow stream needs 20"
    elif case == "store_version":
        vid = VideoTable.load(cache / "decode").video_ids[0]
        g = zarr.open_group(str(cache / "decode" / "frames" / f"{vid}.zarr"), mode="r+")
        g.attrs["format_version"] = 99
        expect = "written by store format 99"
    elif case == "disk":
        monkeypatch.setattr("pipeline.stage.space.free_bytes", lambda path: 1000)
        expect = "not enough disk space"
    elif case == "views":
        args += ["--views", "5"]
        expect = "--views: 5 is neither 1 (centre crop) nor 10"
    elif case == "weights_file":
        args += ["--rgb-weights", str(cache / "nope.pt")]
        expect = "nope.pt does not exist"
    else:
        args += ["--split", "2"]
        expect = "finetune/split2-resnet18/rgb"  # no split-2 network: run finetune --split 2 first
    res = CliRunner().invoke(main, ["extract-features", "--arch", ARCH, "--cache-dir", str(cache), *args])
    assert res.exit_code == 2 and expect in res.output, res.output
    assert not (cache / FEATURES).exists()  # nothing started


def test_same_weights_give_the_same_fingerprint_whatever_the_bookkeeping(cache):
    """A resumed or forced finetune rewrites best.pt with other timings/epochs but the same weights: the
    extract-features fingerprint must not change; other weights must change it."""
    from pipeline.stage import load_upstream
    from pipeline.stage.runner import compute_fingerprint

    def fingerprint():
        p = ExtractFeaturesParams(arch=ARCH, positions=4)
        up = load_upstream(cache, STAGE.upstream_keys(p, cache), STAGE.name)
        return compute_fingerprint(STAGE, p, up, STAGE.plan(p, up))

    before = fingerprint()
    best = cache / artifacts.finetune_key("rgb", 1, ARCH) / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    torch.save({**ckpt, "epoch": 7, "seconds": 123.4, "history": [1.0, 2.0]}, best)  # other bytes, same weights
    assert best.read_bytes() != b"" and fingerprint() == before
    ckpt["model"] = {k: (v + 1 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, best)
    assert fingerprint() != before


def test_verify_then_rerun_recomputes_only_the_damaged_videos(cache, monkeypatch):
    """A damaged chunk of features.zarr: verify names its video, the re-run recomputes it alone (the other
    videos' features come back from the store) and the result equals the undamaged store."""
    import pipeline.io.store as store_mod

    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 1)  # one video per chunk
    p = ExtractFeaturesParams(arch=ARCH, positions=8, input_size=112, store="zarr", workers=1)
    run_stage(STAGE, p, cache)
    path = cache / FEATURES / "features.zarr"
    before = read_feature_store(path)
    chunk = path / "streams" / "flow" / "c" / "2" / "0" / "0" / "0"  # the third video
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 0x5A
    chunk.write_bytes(bytes(b))
    damaged = str(before.video_ids[2])
    res = CliRunner().invoke(main, ["verify", "--stage", "extract-features", "--cache-dir", str(cache)])
    assert res.exit_code == 1 and f"  {damaged}: {path}" in res.output and "1 missing/damaged" in res.output, res.output
    r = run_stage(STAGE, p, cache)
    assert not r.skipped and r.manifest["complete"] and r.manifest["done"] == 6
    runs = [json.loads(line) for line in (cache / FEATURES / "journal.jsonl").read_text().splitlines()]
    last = [x for x in runs if x.get("ok") and x.get("run") == runs[-1].get("run")]
    assert [x["video"] for x in last] == [damaged]  # recomputed: that video only
    after = read_feature_store(path)
    for s in before.streams:
        np.testing.assert_array_equal(after.streams[s], before.streams[s])


def _parts_by_h5py(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every per-video part, read with plain h5py: {video id: {"rgb", "flow", "positions"}}."""
    out = {}
    for f in sorted(folder.rglob("*.h5")):
        with h5py.File(f, "r") as h:
            out[str(f.relative_to(folder).with_suffix(""))] = {k: h[k][...] for k in ("rgb", "flow", "positions")}
    return out


def test_consolidation_writes_chunk_by_chunk_and_equals_the_parts(cache, monkeypatch):
    """The consolidation holds one chunk of videos at a time (2 here, of 6) and writes each chunk once, to both
    stores; read back with plain zarr / h5py, the stores equal the per-video parts."""
    import pipeline.io.store as store_mod

    per_video = 8 * 1 * 512 * 2  # P x views x D x float16
    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 2 * per_video)
    monkeypatch.setattr(ef.shutil, "rmtree", lambda *a, **k: None)  # keep the parts to compare with
    calls = []
    real = store_mod.FeatureStoreWriter.write

    def write(self, lo, streams, positions):
        calls.append((self.num_videos, lo, {s: a.shape[0] for s, a in streams.items()}, len(positions)))
        return real(self, lo, streams, positions)

    monkeypatch.setattr(store_mod.FeatureStoreWriter, "write", write)
    p = ExtractFeaturesParams(arch=ARCH, positions=8, input_size=112, store="both", workers=1)
    run_stage(STAGE, p, cache)
    blocks = [(0, {"rgb": 2, "flow": 2}, 2), (2, {"rgb": 2, "flow": 2}, 2), (4, {"rgb": 2, "flow": 2}, 2)]
    assert calls == [(6, *b) for b in blocks for _ in range(2)]  # zarr then h5, chunk by chunk
    parts = _parts_by_h5py(cache / FEATURES / "parts")
    z = zarr.open_group(str(cache / FEATURES / "features.zarr"), mode="r")
    assert z["streams/rgb"].chunks == (2, 8, 1, 512) and z["positions"].chunks == (2, 8)
    ids = [str(v) for v in z["video_ids"][...]]
    assert sorted(ids) == sorted(parts) and len(ids) == 6
    with h5py.File(cache / FEATURES / "features.h5", "r") as h:
        assert [v.decode() for v in h["video_ids"][...]] == ids
        for k, vid in enumerate(ids):
            for s in ("rgb", "flow"):
                np.testing.assert_array_equal(z[f"streams/{s}"][k], parts[vid][s])
                np.testing.assert_array_equal(h[f"streams/{s}"][k], parts[vid][s])
            np.testing.assert_array_equal(z["positions"][k], parts[vid]["positions"])
            np.testing.assert_array_equal(h["positions"][k], parts[vid]["positions"])


def test_killed_consolidation_resumes_to_the_same_store(cache, tmp_path, monkeypatch):
    """A run stopped in the middle of the consolidation (after its first chunk; a SIGKILL would also leave its
    temporary store, planted here) recomputes nothing on the next run and writes the same store as an
    uninterrupted run; no temporary is left."""
    import pipeline.io.store as store_mod

    clean = tmp_path / "clean"
    shutil.copytree(cache, clean)
    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 2 * 8 * 512 * 2)
    real = store_mod.FeatureStoreWriter.write

    def dies(self, lo, streams, positions):
        if lo > 0:
            raise KeyboardInterrupt("killed mid-consolidation")
        return real(self, lo, streams, positions)

    p = ExtractFeaturesParams(arch=ARCH, positions=8, input_size=112, store="h5", workers=1)
    monkeypatch.setattr(store_mod.FeatureStoreWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        run_stage(STAGE, p, cache)
    out = cache / FEATURES
    assert not (out / "features.h5").exists() and len(list((out / "parts").rglob("*.h5"))) == 6
    (out / ".tmp-99999-features.h5").write_bytes(b"half a store")  # what a SIGKILL leaves
    monkeypatch.setattr(store_mod.FeatureStoreWriter, "write", real)
    r = run_stage(STAGE, p, cache)
    assert r.manifest["done"] == 6 and r.manifest["complete"]
    records = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    assert len([x for x in records if x.get("ok")]) == 6  # nothing recomputed
    run_stage(STAGE, p, clean)
    _assert_same_store(out / "features.h5", clean / FEATURES / "features.h5")
    assert not list(out.rglob(".tmp-*")) and not (out / "parts").exists()
