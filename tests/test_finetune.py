"""The finetune stage: outputs and test scores recomputed independently, resume after SIGKILL, 2 ranks vs 1,
bad input before work, and the training utilities (partial BN, global BN, batch order, metrics)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.training import loop as T
from pipeline.io import artifacts
from pipeline.stage import StageError, run_stage
from stages.cli import main
from pipeline.models.backbones import create_backbone, normalize_rgb
from pipeline.data.sampling import eval_indices
from pipeline.io.store import VideoStore, read_frames
from pipeline.data.table import VideoTable
from pipeline.data.transforms import center_view
from stages.decode import STAGE as DECODE, DecodeParams
from stages.finetune import STAGE, FinetuneParams
from tests.curves import assert_curves_match_history
from tests.fakes import FAKE_FLOW_STAGE, FakeFlowParams
from tests.videos import make_csv_dataset

REPO = Path(__file__).resolve().parents[1]

# Tiny problems: 2 classes x 5 clips of 12 frames at 48x32, one test clip per class, one validation group per
# class -> 6 training, 2 validation, 2 test videos; resnet18 at 32 px.
# Dropout off unless a test turns it on: with it, ranks draw their own masks (by design), so a 2-rank run
# cannot repeat a 1-process one. Partial BN is off (auto with --weights none).
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
TINY = dict(arch="resnet18", input_size=32, weights="none", batch_size=4, segments=2,
            val_frames=2, num_test_frames=3, workers=0, dropout=0.0)
TINY_CLI = ["--arch", "resnet18", "--input-size", "32", "--weights", "none", "--batch-size", "4", "--segments", "2",
            "--val-frames", "2", "--num-test-frames", "3", "--dropout", "0"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """decode + (Farneback) extract-flow outputs of the tiny dataset, shared read-only by the tests."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_csv_dataset(root / "data", videos_per_class=5, num_frames=12, size=(48, 32))
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, val_fraction=0.25, workers=1), root / "cache")
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), root / "cache")
    return root / "cache"


def fresh_cache(upstream: Path, tmp_path: Path) -> Path:
    """A cache root whose decode / extract-flow are the shared ones (symlinked)."""
    cache = tmp_path / "cache"
    cache.mkdir(parents=True)
    for key in ("decode", "extract-flow"):
        (cache / key).symlink_to(upstream / key, target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def rgb_run(upstream, tmp_path_factory):
    """One single-process RGB run (2 epochs, one thread like the subprocesses), shared by several tests."""
    cache = fresh_cache(upstream, tmp_path_factory.mktemp("rgb-run"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_stage(STAGE, FinetuneParams(stream="rgb", epochs=2, tensorboard=HAVE_TENSORBOARD, **TINY), cache)
    finally:
        torch.set_num_threads(threads)
    return cache, result


def test_tensorboard_curves_equal_the_history(rgb_run):
    cache, _ = rgb_run
    out = cache / artifacts.finetune_key("rgb", 1, "resnet18")
    assert_curves_match_history(out, list(csv.DictReader(open(out / "history.csv"))))


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------------------------------------- end to end

def test_rgb_outputs_and_test_scores_recomputed(rgb_run):
    cache, r = rgb_run
    out = cache / artifacts.finetune_key("rgb", 1, "resnet18")
    for name in ("best.pt", "last.pt", "history.csv", "curves.png", "confusion.png", "test_scores.npz"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(h["epoch"]) for h in rows] == [1, 2] and all(float(h["lr"]) == 1e-3 for h in rows)

    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)  # plain tensors and values only
    for key in ("model", "optimizer", "scheduler", "epoch", "arch", "num_classes", "in_channels", "classes",
                "params", "metrics"):
        assert key in ckpt, key
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 2 and ckpt["in_channels"] == 3 and ckpt["epoch"] == 2

    table = VideoTable.load(cache / "decode")
    test_rows = [i for i, s in enumerate(table.splits["1"]) if s == "test"]
    s = np.load(out / "test_scores.npz")
    assert list(s["video_ids"]) == [table.video_ids[i] for i in test_rows]
    assert list(s["labels"]) == [table.labels[i] for i in test_rows] and list(s["class_names"]) == table.classes
    assert s["scores"].shape == (2, 2) and s["scores"].dtype == np.float32

    # Independent recomputation: best.pt through create_backbone, 3 uniformly spaced centre views, softmax
    # averaged over the views.
    model = create_backbone("resnet18", num_classes=2, weights=out / "best.pt").eval()
    frames = VideoStore(cache / "decode" / "frames")
    for k, i in enumerate(test_rows):
        x = read_frames(frames, table.video_ids[i], eval_indices(table.num_frames[i], 3)).permute(0, 3, 1, 2)
        with torch.no_grad():
            p = model(normalize_rgb(center_view(x, 32))).softmax(1).mean(0)
        np.testing.assert_allclose(s["scores"][k], p.numpy(), atol=1e-5)
        logits = model(normalize_rgb(center_view(x, 32))).mean(0).detach()
        np.testing.assert_allclose(s["logits"][k], logits.numpy(), atol=1e-4)

    summary = r.manifest["summary"]
    pred = s["scores"].argmax(1)
    assert summary["top1"] == pytest.approx(float((pred == s["labels"]).mean()))
    per_class = [float((pred[s["labels"] == c] == c).mean()) for c in np.unique(s["labels"])]
    assert summary["mean_class_acc"] == pytest.approx(float(np.mean(per_class)))
    assert summary["train_videos"] == 6 and summary["val_videos"] == 2 and summary["test_videos"] == 2
    # The one hold-out: finetune validates on the videos decode marked "val" in the video table.
    assert sorted(summary["val_video_ids"]) == sorted(table.video_ids[i] for i in table.indices(1, "val"))
    assert r.manifest["done"] == 2 and "test top-1" in r.message
    assert run_stage(STAGE, FinetuneParams(stream="rgb", epochs=2, **TINY), cache).skipped


def test_flow_stream_trains_on_20_channel_stacks(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    r = run_stage(STAGE, FinetuneParams(stream="flow", epochs=1, **TINY), cache)
    ckpt = torch.load(cache / artifacts.finetune_key("flow", 1, "resnet18") / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["in_channels"] == 20 and ckpt["model"]["trunk.conv1.weight"].shape == (64, 20, 7, 7)
    assert r.manifest["upstream"].keys() == {"decode", "extract-flow"}
    assert np.load(cache / artifacts.finetune_key("flow", 1, "resnet18") / "test_scores.npz")["scores"].shape == (2, 2)
    # TSN's dropout by stream: 0.7 for flow
    assert r.manifest["summary"]["epochs"] == 1 and FinetuneParams(stream="flow").drop == 0.7


# ---------------------------------------------------------------------------------------------- bad input

# The fingerprints 7e8f4a7 computed (stages.finetune before the RGB fingerprint fix) for the upstream and plan of
# _fingerprint below, with the old code's --flow-bound / --flow-step equal to the flow store's: a cache written
# then stays fresh where the result is unchanged.
OLD_FINGERPRINTS = {
    "rgb": "dc386d8175cd1bee42460d3b9c8905b25dd1f53bf9719bb49a0bd29c5870ace1",
    "flow": "a9bfe8342d6c8a21b3275fa89e5a863215db4ef23c4bb42df7dd25016a8bcd51",
    "flow L=5": "99b19c732b9d0e4fe0413d54ba50508ba3768f46262eb342ec221d20a58a66b0",
    "flow bound 15, step 2": "2b87e566f1910f3a4b72c4976b7ef079d0991c714c9c37e09590c5fc09044c4f",
    "rgb resnet18, lr 0.01": "cd0d329b311d8a1699aec794edb2515fc337ae6a903578f34358e428a9bffb18",
}


def _fingerprint(bound: float = 20.0, step: int = 1, **kw) -> str:
    from pipeline.stage import Plan, Upstream, compute_fingerprint
    from pipeline.stage.manifest import Manifest

    root = Path("/nowhere")
    up = {"decode": Manifest(root / "decode", {"fingerprint": "d" * 64, "complete": True, "params": {}})}
    if kw.get("stream") == "flow":
        up["extract-flow"] = Manifest(root / "extract-flow", {
            "fingerprint": "f" * 64, "complete": True, "params": {"bound": bound, "step": step, "backend": "torch"}})
    return compute_fingerprint(STAGE, FinetuneParams(**kw), Upstream(root, up), Plan("a" * 64))


def test_fingerprints_of_both_streams_equal_the_old_codes():
    assert _fingerprint() == OLD_FINGERPRINTS["rgb"]
    assert _fingerprint(stream="flow") == OLD_FINGERPRINTS["flow"]
    assert _fingerprint(stream="flow", flow_length=5) == OLD_FINGERPRINTS["flow L=5"]
    assert _fingerprint(15.0, 2, stream="flow") == OLD_FINGERPRINTS["flow bound 15, step 2"]
    assert _fingerprint(arch="resnet18", lr=0.01) == OLD_FINGERPRINTS["rgb resnet18, lr 0.01"]


def test_flow_settings_are_in_the_flow_streams_fingerprint_only():
    rgb = _fingerprint()
    for change in ({"flow_length": 5}, {"flow_bound": 30.0}, {"flow_step": 2}):
        assert _fingerprint(**change) == rgb, change  # an RGB network never depends on a flow setting
    flow = _fingerprint(stream="flow")
    assert _fingerprint(stream="flow", flow_length=5) != flow
    assert _fingerprint(30.0, stream="flow") != flow and _fingerprint(step=2, stream="flow") != flow  # the store's
    assert _fingerprint(stream="flow", flow_bound=30.0, flow_step=2) == flow  # the ignored options are ignored


def test_an_rgb_network_stays_fresh_when_a_flow_setting_changes(rgb_run):
    cache, first = rgb_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_stage(STAGE, FinetuneParams(stream="rgb", epochs=2, flow_length=5, flow_bound=30.0, flow_step=2,
                                                **TINY), cache)
    finally:
        torch.set_num_threads(threads)
    assert again.skipped and again.fingerprint == first.fingerprint


def test_flow_bound_and_step_come_from_extract_flows_manifest(upstream, tmp_path, caplog):
    """--flow-bound / --flow-step are not asked again: the flow store's are read from its manifest, the options
    are accepted (one release), ignored with a warning, and every container is checked against the manifest."""
    from stages.finetune import plan

    from pipeline.stage import load_upstream
    from pipeline.stage.manifest import Manifest

    cache = fresh_cache(upstream, tmp_path)
    up = load_upstream(cache, ("decode", "extract-flow"), "finetune")
    with caplog.at_level("WARNING", logger="pipeline"):
        data = plan(FinetuneParams(stream="flow", flow_bound=10.0, flow_step=2, **TINY), up).data
    assert data.flow == {"flow_bound": 20.0, "flow_step": 1} and "are ignored" in caplog.text
    manifest = json.loads((upstream / "extract-flow" / "manifest.json").read_text())
    wrong = {**up.manifests, "extract-flow": Manifest(cache / "extract-flow", {
        **manifest, "params": {**manifest["params"], "bound": 10.0}})}
    with pytest.raises(StageError, match=r"stored with bound 20\.0, but extract-flow's manifest records 10\.0"):
        plan(FinetuneParams(stream="flow", **TINY), type(up)(cache, wrong))


def test_unknown_arch_is_refused(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    with pytest.raises(StageError, match="--arch.*'vgg16'.*resnet101"):
        run_stage(STAGE, FinetuneParams(stream="rgb", **{**TINY, "arch": "vgg16"}), cache)
    res = CliRunner().invoke(main, ["finetune", "--arch", "vgg16", "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "vgg16" in res.output and "resnet18" in res.output


def test_missing_imagenet_weights_name_the_file(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        with pytest.raises(StageError, match=r"resnet18-f37072fd\.pth.*empty-hub"):
            run_stage(STAGE, FinetuneParams(stream="rgb", **{**TINY, "weights": "imagenet"}), cache)
    finally:
        torch.hub.set_dir(old)
    assert not (cache / artifacts.finetune_key("rgb", 1, "resnet18")).exists()


def test_weights_of_other_arch_or_class_count_are_refused(upstream, tmp_path):
    cache = fresh_cache(upstream, tmp_path)
    other = create_backbone("resnet34", num_classes=2)
    torch.save({"model": other.state_dict(), "arch": "resnet34"}, tmp_path / "r34.pt")
    with pytest.raises(StageError, match="resnet34 backbone, not resnet18"):
        run_stage(STAGE, FinetuneParams(stream="rgb", **{**TINY, "weights": str(tmp_path / "r34.pt")}), cache)
    three = create_backbone("resnet18", num_classes=3)
    torch.save({"model": three.state_dict(), "arch": "resnet18"}, tmp_path / "c3.pt")
    with pytest.raises(StageError, match="3-way classifier"):
        run_stage(STAGE, FinetuneParams(stream="rgb", **{**TINY, "weights": str(tmp_path / "c3.pt")}), cache)


def test_incompatible_last_checkpoint_is_refused(upstream, rgb_run, tmp_path):
    import shutil

    cache = fresh_cache(upstream, tmp_path)
    out = cache / artifacts.finetune_key("rgb", 1, "resnet18")
    shutil.copytree(rgb_run[0] / artifacts.finetune_key("rgb", 1, "resnet18"), out)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    ckpt["arch"], ckpt["done"] = "resnet34", False
    torch.save(ckpt, out / "last.pt")
    (out / "manifest.json").unlink()  # an unfinished run (same fingerprint) with a foreign checkpoint
    with pytest.raises(StageError, match=r"last\.pt: checkpoint has arch 'resnet34', this run needs 'resnet18'"):
        run_stage(STAGE, FinetuneParams(stream="rgb", epochs=2, **TINY), cache)


def test_test_classes_absent_from_training_are_refused(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=2, classes=("Alpha", "Beta", "Gamma"),
                            num_frames=6, size=(32, 24))
    rows = (data / "list.csv").read_text().splitlines()
    (data / "list.csv").write_text("\n".join(r.replace(",train", ",test") if "Gamma" in r else r for r in rows) + "\n")
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, val_fraction=0.25, workers=1), tmp_path / "cache")
    with pytest.raises(StageError, match="1 class.*no training video.*Gamma"):
        run_stage(STAGE, FinetuneParams(stream="rgb", **TINY), tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- resume, DDP

def _cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(upstream, tmp_path):
    """Exact equality: CPU kernels are deterministic for a fixed thread count (1 here) and input layout, the
    data order and augmentation are functions of (seed, epoch, video), dropout is re-seeded per epoch, and
    last.pt holds the model, optimizer and schedule; so the resumed run performs the same float operations.
    The killed run loads data in a worker process, the clean one in the main process: same result."""
    killed = fresh_cache(upstream, tmp_path)
    cmd = [sys.executable, "-m", "stages", "finetune", "--stream", "rgb", "--epochs", "2", "--cache-dir",
           str(killed), *TINY_CLI, "--workers", "1", "--dropout", "0.5"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = killed / artifacts.finetune_key("rgb", 1, "resnet18") / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 2:  # epoch 1 checkpointed
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = killed / artifacts.finetune_key("rgb", 1, "resnet18")
    assert not (out / "manifest.json").exists(), "the run must be killed before it finishes"
    epochs_before = len(history.read_text().splitlines()) - 1
    assert epochs_before == 1
    res = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {out / 'last.pt'} (epoch {epochs_before}" in res.stderr

    torch.set_num_threads(1)
    try:
        clean_root = fresh_cache(upstream, tmp_path / "clean")
        clean = run_stage(STAGE, FinetuneParams(stream="rgb", epochs=2, **{**TINY, "dropout": 0.5}), clean_root)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    a, b = model_state(out / "last.pt"), model_state(clean_root / artifacts.finetune_key("rgb", 1, "resnet18") / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.load(out / "test_scores.npz")["scores"],
                          np.load(clean_root / artifacts.finetune_key("rgb", 1, "resnet18") / "test_scores.npz")["scores"])
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["resumed"] and resumed["summary"]["top1"] == clean.manifest["summary"]["top1"]
    assert list(csv.DictReader(open(out / "history.csv")))[-1]["train_loss"] == \
        list(csv.DictReader(open(clean_root / artifacts.finetune_key("rgb", 1, "resnet18") / "history.csv")))[-1]["train_loss"]
    # Downstream sees the same thing: extract-features of the resumed and of the uninterrupted network have
    # one fingerprint (it digests the weights, not best.pt's bookkeeping of timings and resumes).
    from pipeline.stage import load_upstream
    from pipeline.stage.runner import compute_fingerprint
    from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams

    def features_fingerprint(cache: Path) -> str:
        fp = ExtractFeaturesParams(arch="resnet18", flow_weights="none", positions=4)
        up = load_upstream(cache, FEATURES.upstream_keys(fp, cache), FEATURES.name)
        return compute_fingerprint(FEATURES, fp, up, FEATURES.plan(fp, up))

    assert features_fingerprint(killed) == features_fingerprint(clean_root)


@pytest.mark.slow
def test_two_ranks_match_one_process(upstream, rgb_run, tmp_path):
    """2 CPU ranks (gloo) with global batch 4 = one process with batch 4. Differences come only from the
    order of float32 sums (gradient all-reduce, global BN statistics as E[x^2] - E[x]^2): ~1e-6 relative
    per step, so after 2 epochs weights agree to 1e-4 and scores to 1e-4. Dropout is off (each rank draws
    its own masks by design) and BN is fully trained (partial BN is off with --weights none), so every BN
    layer is a global one."""
    extra = ["--epochs", "2", "--workers", "0"]
    ddp = fresh_cache(upstream, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "stages",
           "finetune", "--stream", "rgb", "--cache-dir", str(ddp), *TINY_CLI, *extra]
    res = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((ddp / artifacts.finetune_key("rgb", 1, "resnet18") / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["summary"]["world_size"] == 2
    single = rgb_run[0]
    a, b = model_state(ddp / artifacts.finetune_key("rgb", 1, "resnet18") / "last.pt"), model_state(single / artifacts.finetune_key("rgb", 1, "resnet18") / "last.pt")
    changed = 0
    init = create_backbone("resnet18", num_classes=2, weights="none").state_dict()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
            changed += int(not torch.allclose(a[k], init[k]))
        else:
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked: the same number of steps
    assert changed > 40  # the comparison is between trained networks, not two copies of the init
    np.testing.assert_allclose(np.load(ddp / artifacts.finetune_key("rgb", 1, "resnet18") / "test_scores.npz")["scores"],
                               np.load(single / artifacts.finetune_key("rgb", 1, "resnet18") / "test_scores.npz")["scores"], atol=1e-4)


# ---------------------------------------------------------------------------------------------- utilities

def test_epoch_batches_split_global_batches_between_ranks():
    perm = np.random.default_rng([3, 5]).permutation(10)
    one = T.EpochBatches(10, 4, seed=3)
    one.set_epoch(5)
    assert [[i for i, _ in b] for b in one] == [list(perm[0:4]), list(perm[4:8]), list(perm[8:10])]
    assert all(e == 5 for b in one for _, e in b)
    ranks = [T.EpochBatches(10, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(5)
    r0, r1 = ([[i for i, _ in b] for b in r] for r in ranks)
    assert r0 == [list(perm[0:2]), list(perm[4:6]), [perm[8]]] and r1 == [list(perm[2:4]), list(perm[6:8]), [perm[9]]]
    # 9 videos: the last global batch (1 video) cannot be split over 2 ranks and is dropped there only.
    assert len(T.EpochBatches(9, 4, world_size=2)) == 2 and len(T.EpochBatches(9, 4)) == 3


def test_partial_bn_freezes_all_but_the_first_batchnorm():
    torch.manual_seed(0)
    model = create_backbone("resnet18", num_classes=3)
    assert T.freeze_partial_bn(model) == 19  # resnet18 has 20 BatchNorm2d layers
    T.set_train_mode(model, True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[0] is model.trunk.bn1 and bns[0].training and bns[0].weight.requires_grad
    assert not any(m.training or m.weight.requires_grad for m in bns[1:])
    before = [m.running_mean.clone() for m in bns]
    opt = torch.optim.SGD(T.trainable_param_groups(model, 5e-4), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before[0], bns[0].running_mean)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before[1:], bns[1:]))
    groups = T.trainable_param_groups(model, 5e-4)
    decay = {id(p) for p in groups[0]["params"]}
    assert id(model.fc.weight) in decay and id(model.trunk.conv1.weight) in decay
    assert id(model.fc.bias) not in decay and id(bns[0].weight) not in decay


def test_global_batchnorm_equals_batchnorm_in_a_one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = nn.BatchNorm2d(5)
        nn.init.uniform_(ref.weight), nn.init.uniform_(ref.bias)
        glob = T.GlobalBatchNorm2d(5)
        glob.load_state_dict(ref.state_dict())
        x = torch.randn(6, 5, 7, 3) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), glob(xb)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        (ya * torch.arange(ya.numel()).view_as(ya).sin()).sum().backward()
        (yb * torch.arange(yb.numel()).view_as(yb).sin()).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(glob.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(glob.running_var, ref.running_var)
        torch.testing.assert_close(glob.running_mean, ref.running_mean)
    finally:
        dist.destroy_process_group()


def test_finetune_metrics_hand_computed():
    from pipeline.eval.metrics import accuracy_metrics

    scores = np.array([[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0, 0.1, 0.9], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1, 2, 2])
    m = accuracy_metrics(scores, labels, ["a", "b", "c"])
    assert m.top1 == pytest.approx(3 / 5)
    assert m.mean_class_accuracy == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert m.confusion.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]


def test_checkpoint_save_is_atomic_and_load_is_clear(tmp_path):
    from pipeline.io.atomic import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(tmp_path / "a.pt")["epoch"] == 3 and not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"b\.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "b.pt")
