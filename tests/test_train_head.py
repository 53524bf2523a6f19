"""train-head and ablate: the CLI end to end on tiny synthetic feature stores (zarr and h5)."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.io import artifacts
from pipeline.stage import Plan, Stage, param, run_stage, status
from stages.cli import main
from pipeline.io.store import FeatureSet, feature_store_path, write_feature_store
from stages import all_stages
from stages.extract_features import VERSION as FEATURES_VERSION
from pipeline.models.heads import load_head_checkpoint

CLASSES = ("AThenB", "BThenA", "Steady")


def make_features(*, groups_per_class=5, clips_per_group=3, P=8, D=8, views=1, flow_dim=None,
                  streams=("rgb", "flow"), seed=0, val_groups=1) -> FeatureSet:
    """Three classes: two built from the same two patterns in opposite temporal order (only a temporal
    model separates them; TSN's average consensus sees identical bags), one steady pattern. Groups g01, g02
    of every class are the test split (as UCF101 split 1), the next ``val_groups`` the validation hold-out
    (as decode records it), the others train."""
    rng = np.random.default_rng(seed)
    ids, labels, groups, split = [], [], [], []
    for c, name in enumerate(CLASSES):
        for g in range(1, groups_per_class + 1):
            for k in range(1, clips_per_group + 1):
                ids.append(f"{name}/v_{name}_g{g:02d}_c{k:02d}")
                labels.append(c)
                groups.append(f"{name}_g{g:02d}")
                split.append("test" if g <= 2 else "val" if g <= 2 + val_groups else "train")
    labels = np.array(labels)
    v = len(ids)
    a, b, s = np.eye(D)[0] * 2, np.eye(D)[1] * 2, np.eye(D)[2] * 2
    first = np.where(labels[:, None] == 0, a, np.where(labels[:, None] == 1, b, s))
    second = np.where(labels[:, None] == 0, b, np.where(labels[:, None] == 1, a, s))
    seq = np.concatenate([np.repeat(first[:, None], P // 2, 1), np.repeat(second[:, None], P - P // 2, 1)], 1)
    out = {}
    for name in streams:
        d = flow_dim if (name == "flow" and flow_dim) else D
        base = seq if d == D else np.concatenate([seq, np.zeros((v, P, d - D))], -1)[..., :d]
        x = base[:, :, None] + 0.3 * rng.standard_normal((v, P, views, d))
        out[name] = np.maximum(x, 0).astype(np.float16)
    return FeatureSet(streams=out, positions=np.tile(np.arange(P, dtype=np.float32), (v, 1)),
                      video_ids=np.array(ids), labels=labels, split=np.array(split), groups=np.array(groups),
                      class_names=np.array(CLASSES), attrs={"split_id": "1",
                                                            "view_names": ["center"] if views == 1 else
                                                            [f"v{i}" for i in range(views)]})


HEADS_DIR = "train-head/" + artifacts.scope(1)  # train-head/split1-resnet101


@dataclass(frozen=True)
class FakeFeatureParams:
    backend: str = param("zarr", "store back end")
    tag: str = param("", "changes the fingerprint")


def build_upstream(root: Path, fs: FeatureSet, backend: str = "zarr", tag: str = "") -> Path:
    """A finished extract-features output holding ``fs`` (a test-only stage with the real stage's version)."""
    def run(ctx, plan):
        write_feature_store(feature_store_path(ctx.dir, ctx.params.backend), fs)
        return {}

    stage = Stage(name="extract-features", version=FEATURES_VERSION, params_type=FakeFeatureParams, run=run,
                  plan=lambda p, u: Plan(str(np.asarray(fs.streams["rgb"], dtype=np.float64).sum())),
                  key=lambda p: artifacts.features_key(1))
    run_stage(stage, FakeFeatureParams(backend, tag), root, force=True)
    return feature_store_path(root / artifacts.features_key(1), backend)


FAST = ('[train-head]\nlr = 3e-3\nmin_lr = 3e-5\npatience = 2\nmax_epochs = 30\nbatch_size = 16\n'
        'dropout = 0.0\nsegments = 4\ndevice = "cpu"\n')


def _config(tmp_path, text=FAST):
    path = tmp_path / "fast.toml"
    path.write_text(text)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _test_scores_by_hand(ckpt_dir: Path, fs: FeatureSet, n: int) -> np.ndarray:
    """Reference test scores: the checkpointed head on the 5 test sequences of [STFN] §4.2, positions
    computed here from the segment rule of docs/formats.md, probabilities averaged."""
    head, ckpt = load_head_checkpoint(ckpt_dir / "best.pt")
    head.eval()
    P = fs.positions.shape[1]
    test = np.flatnonzero(fs.split == "test")
    rgb = torch.from_numpy(fs.streams["rgb"][test, :, 0].astype(np.float32))
    flow = torch.from_numpy(fs.streams["flow"][test, :, 0].astype(np.float32))
    probs = []
    for j in range(5):
        pos = []
        for s in range(n):
            start, stop = (s * P) // n, ((s + 1) * P) // n
            pos.append(start + ((2 * j + 1) * (stop - start)) // 10)
        with torch.no_grad():
            probs.append(head(rgb[:, pos], flow[:, pos]).exp().numpy())
    return np.mean(probs, axis=0)


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_cli_end_to_end(tmp_path, backend):
    root = tmp_path / "cache"
    fs = make_features()
    build_upstream(root, fs, backend)
    cfg = _config(tmp_path)
    res = invoke("train-head", "--head", "stfn", "--fusion", "avg", "--dir", "bi", "--segments", 4,
                 "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    out = root / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0"
    assert f"{HEADS_DIR}/stfn-a-avg-bi-p0-n4-s0: top-1" in res.output
    for f in ("best.pt", "results.json", "test_scores.npz", "confusion.png", "curves.png", "manifest.json"):
        assert (out / f).is_file(), f
    r = json.loads((out / "results.json").read_text())
    with np.load(out / "test_scores.npz") as z:
        scores, labels, ids = z["scores"], z["labels"], z["video_ids"]
    test = fs.split == "test"
    assert ids.tolist() == fs.video_ids[test].tolist() and labels.tolist() == fs.labels[test].tolist()
    # Accuracy figures against numpy on the stored scores.
    pred = scores.argmax(1)
    assert r["top1"] == pytest.approx(float((pred == labels).mean()))
    per_class = [float((pred[labels == c] == c).mean()) for c in range(3)]
    assert [r["per_class_accuracy"][c] for c in CLASSES] == pytest.approx(per_class)
    assert r["mean_class_accuracy"] == pytest.approx(np.mean(per_class))
    assert np.array(r["confusion"]).sum() == test.sum() and np.trace(np.array(r["confusion"])) == (pred == labels).sum()
    assert r["videos"]["test"] == 18 and r["videos"]["train"] + r["videos"]["val"] == 27
    # The stored scores are the checkpointed head's on the 5 test sequences, averaged.
    np.testing.assert_allclose(scores, _test_scores_by_hand(out, fs, 4), atol=1e-5)
    # The temporal head solves the order-only pair.
    assert r["top1"] >= 0.9, r["per_class_accuracy"]
    # Unchanged re-run: a no-op.
    before = (out / "manifest.json").read_text()
    res = invoke("train-head", "--head", "stfn", "--segments", 4, "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0 and "nothing to do" in res.output
    assert (out / "manifest.json").read_text() == before


def test_stfn_beats_tsn_on_order_only_classes(tmp_path):
    root = tmp_path / "cache"
    build_upstream(root, make_features(), "h5")
    cfg = _config(tmp_path)
    acc = {}
    for head in ("stfn", "tsn"):
        lr = ("--lr", 3e-2) if head == "tsn" else ()  # a linear head: a larger step converges in a few epochs
        res = invoke("train-head", "--head", head, *lr, "--segments", 4, "--config", cfg, "--cache-dir", root)
        assert res.exit_code == 0, res.output
        key = "stfn-a-avg-bi-p0-n4-s0" if head == "stfn" else "tsn-p0-n4-s0"
        acc[head] = json.loads((root / HEADS_DIR / key / "results.json").read_text())["per_class_accuracy"]
    pair = lambda a: (a["AThenB"] + a["BThenA"]) / 2  # noqa: E731
    assert pair(acc["stfn"]) >= 0.9
    assert pair(acc["tsn"]) <= 0.75  # identical bags of features: chance within the pair is 0.5
    assert acc["tsn"]["Steady"] == 1.0


def test_changing_one_head_recomputes_only_that_head(tmp_path):
    root = tmp_path / "cache"
    build_upstream(root, make_features())
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 2"))
    common = ("--segments", 4, "--config", cfg, "--cache-dir", root)
    assert invoke("train-head", "--head", "stfn", *common).exit_code == 0
    assert invoke("train-head", "--head", "tsn", *common).exit_code == 0
    stfn, tsn = root / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0", root / HEADS_DIR / "tsn-p0-n4-s0"
    tsn_manifest = (tsn / "manifest.json").read_text()
    stfn_fp = json.loads((stfn / "manifest.json").read_text())["fingerprint"]
    # A training setting of one head: that head recomputes in place, the other is untouched.
    res = invoke("train-head", "--head", "stfn", "--lr", 2e-3, *common)
    assert res.exit_code == 0 and "nothing to do" not in res.output
    assert json.loads((stfn / "manifest.json").read_text())["fingerprint"] != stfn_fp
    assert (tsn / "manifest.json").read_text() == tsn_manifest
    # Giving a head option at its effective value changes nothing (same name, same fingerprint).
    res = invoke("train-head", "--head", "tsn", "--flow-weight", 1.5, "--dropout", 0.0, *common)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    # An option that does not apply to the head is an error naming it and the head, before any work.
    for bad, option in ((("--head", "tsn", "--fusion", "max"), "--fusion"),
                        (("--head", "stfn", "--arch", "c", "--dir", "m2a"), "--direction"),
                        (("--head", "stfn", "--stcb-dim", 64), "--stcb-dim")):
        res = invoke("train-head", *bad, *common)
        assert res.exit_code == 2 and option in res.output and "does not apply" in res.output, res.output
    assert (tsn / "manifest.json").read_text() == tsn_manifest
    # A structural option makes a new head beside the others.
    assert invoke("train-head", "--head", "stfn", "--fusion", "max", *common).exit_code == 0
    rows = {r.key: r.state for r in status(root, all_stages())}
    assert rows[f"{HEADS_DIR}/stfn-a-avg-bi-p0-n4-s0"] == rows[f"{HEADS_DIR}/tsn-p0-n4-s0"] == "fresh"
    assert rows[f"{HEADS_DIR}/stfn-a-max-bi-p0-n4-s0"] == "fresh"
    res = invoke("status", "--cache-dir", root)
    assert f"{HEADS_DIR}/tsn-p0-n4-s0" in res.output
    # New features make every head stale.
    build_upstream(root, make_features(seed=1))
    rows = {r.key: r for r in status(root, all_stages())}
    assert rows[f"{HEADS_DIR}/tsn-p0-n4-s0"].state == "stale" and "extract-features" in rows[f"{HEADS_DIR}/tsn-p0-n4-s0"].reason


def test_views_train_on_centre_and_test_on_all(tmp_path):
    root = tmp_path / "cache"
    fs = make_features(views=3)
    fs.attrs["view_names"] = ["left", "center", "right"]
    build_upstream(root, fs)
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 2"))
    res = invoke("train-head", "--head", "rgb", "--segments", 2, "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    out = root / HEADS_DIR / "rgb-p0-n2-s0"
    head, _ = load_head_checkpoint(out / "best.pt")
    head.eval()
    test = np.flatnonzero(fs.split == "test")
    feats = torch.from_numpy(fs.streams["rgb"][test].astype(np.float32))
    # P = 8, N = 2: segment [0, 4) and [4, 8); sequence j takes offset floor((2j + 1) 4 / 10) = 0, 1, 2, 2, 3.
    seqs = [[o, 4 + o] for o in (0, 1, 2, 2, 3)]
    with torch.no_grad():
        ref = np.mean([head(feats[:, s, k], feats[:, s, k]).exp().numpy() for k in range(3) for s in seqs], 0)
    with np.load(out / "test_scores.npz") as z:
        np.testing.assert_allclose(z["scores"], ref, atol=1e-5)
    assert json.loads((out / "results.json").read_text())["distinct_test_sequences"] == 4


@pytest.mark.parametrize("kind, fs_kwargs, args, message", [
    ("missing stream", {"streams": ("rgb",)}, (), "missing ['flow']"),
    ("mismatched dims", {"flow_dim": 12}, ("--head", "stfn"), "--fused-dim"),
    ("d not divisible by 4", {"D": 6}, ("--head", "stfn"), "divisible by 4"),
    ("segments > positions", {"P": 4}, ("--segments", 5), "cannot be split into --segments 5"),
    ("no validation rows", {"val_groups": 0}, (), "re-run `pipeline decode` with --val-fraction > 0"),
    ("option of another head", {}, ("--head", "rgb", "--flow-weight", 2), "--flow-weight: option flow_weight "
     "does not apply to head rgb"),
])
def test_bad_input_stops_before_training(tmp_path, kind, fs_kwargs, args, message):
    root = tmp_path / "cache"
    build_upstream(root, make_features(**fs_kwargs))
    res = invoke("train-head", *args, "--config", _config(tmp_path), "--cache-dir", root)
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert not (root / "train-head").exists()  # nothing was started


def test_mismatched_dims_train_with_fused_dim(tmp_path):
    root = tmp_path / "cache"
    build_upstream(root, make_features(flow_dim=12))
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 1"))
    res = invoke("train-head", "--fused-dim", 8, "--segments", 2, "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    assert (root / HEADS_DIR / "stfn-a-avg-bi-f8-p0-n2-s0" / "best.pt").is_file()


@pytest.mark.parametrize("args, message", [
    (("--head", "lstm"), "Invalid value for '--head'"),
    (("--fusion", "sum"), "Invalid value for '--fusion'"),
    (("--dir", "up"), "Invalid value for '--direction' / '--dir'"),
    (("--val-fraction", 0.2), "No such option '--val-fraction'"),
    (("--segments", 0), "--segments: 0 must be >= 1"),
    (("--name", "../x"), "plain folder name"),
])
def test_bad_options(tmp_path, args, message):
    res = invoke("train-head", *args, "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 2 and message in res.output, res.output


def test_missing_upstream(tmp_path):
    res = invoke("train-head", "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 2 and "extract-features" in res.output


def test_ablate_tables_chart_seeds_and_skipped_rows(tmp_path):
    root = tmp_path / "cache"
    build_upstream(root, make_features(P=4, groups_per_class=4, clips_per_group=2))
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 1").replace("segments = 4", "segments = 3")
                  + '[ablate]\ngrid = "reduced"\nseeds = 2\n')
    res = invoke("ablate", "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    out = root / "ablate" / artifacts.scope(1)
    stems = ("table1_architecture", "table2_fusion", "table3_direction", "table4_segments", "baselines")
    for stem in stems:
        assert (out / f"{stem}.md").is_file(), stem
    assert (out / "ablate.png").stat().st_size > 0
    # N = 5 does not fit 4 positions: reported as skipped with the reason, not dropped.
    t4 = (out / "table4_segments.md").read_text()
    assert "N = 5" in t4 and "skipped" in t4 and "cannot be split into --segments 5" in t4
    assert "row(s) skipped" in res.output
    # Every other row: mean ± sample std of the two seeds' results.
    t1 = (out / "table1_architecture.md").read_text()
    r0, r1 = (json.loads((root / HEADS_DIR / f"stfn-c-p0-n3-s{s}" / "results.json").read_text())["top1"]
              for s in (0, 1))
    expected = f"{100 * np.mean([r0, r1]):.1f} ± {100 * np.std([r0, r1], ddof=1):.1f}"
    line = next(ln for ln in t1.splitlines() if ln.startswith("| arch c"))
    assert expected in line, (line, expected)
    # Re-running recomputes nothing.
    manifests = {p: p.read_text() for p in (root / HEADS_DIR).glob("*/manifest.json")}
    # a-avg-bi (shared by every table), c, mul, m2a, rgb, flow, tsn at N = 3; x 2 seeds
    assert len(manifests) == 7 * 2
    res = invoke("ablate", "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0 and res.output.count("nothing to do") == 14
    assert all(p.read_text() == text for p, text in manifests.items())


def test_nonfinite_features_are_named_and_follow_allow_failures(tmp_path):
    fs = make_features()
    bad = [fs.video_ids[4], fs.video_ids[20]]  # a train and a val video of different classes
    fs.streams["rgb"][4, 1, 0, 3] = np.nan
    fs.streams["flow"][20, 0, 0, :2] = np.inf
    build_upstream(tmp_path, fs)
    args = ["train-head", "--cache-dir", str(tmp_path), "--config", str(_config(tmp_path))]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "2 video(s) have damaged or NaN/inf features" in res.output
    assert all(v in res.output for v in bad) and "rgb: 1 non-finite values" in res.output
    assert "flow: 2 non-finite values" in res.output
    assert not (tmp_path / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0" / "manifest.json").exists()
    res = CliRunner().invoke(main, args + ["--allow-failures"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0" / "manifest.json").read_text())
    assert m["complete"] and sorted(m["failures"]) == sorted(bad)
    r = json.loads((tmp_path / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0" / "results.json").read_text())
    assert r["videos"]["train"] + r["videos"]["val"] + r["videos"]["test"] == len(fs.video_ids) - 2


def test_diverging_loss_stops_the_run_without_a_manifest(tmp_path, monkeypatch):
    import pipeline.training.heads as H

    build_upstream(tmp_path, make_features())
    real = H.train_head_epoch
    calls = []

    def diverging(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(H, "train_head_epoch", diverging)
    res = CliRunner().invoke(main, ["train-head", "--cache-dir", str(tmp_path), "--config", str(_config(tmp_path))])
    assert res.exit_code == 2, res.output
    assert "training loss became nan in epoch 2" in res.output
    assert not (tmp_path / HEADS_DIR / "stfn-a-avg-bi-p0-n4-s0" / "manifest.json").exists()


def test_a_b_a_restores_the_first_head_from_the_run_cache(tmp_path):
    """lr A, then lr B, then lr A again: the third run is restored (no training) with byte-identical files."""
    import hashlib

    root = tmp_path / "cache"
    build_upstream(root, make_features())
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 2"))
    out = root / HEADS_DIR / "tsn-p0-n4-s0"

    def digest() -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
                if p.is_file() and p.name != "log.txt"}

    assert invoke("train-head", "--head", "tsn", "--config", cfg, "--cache-dir", root).exit_code == 0
    first = digest()
    res = invoke("train-head", "--head", "tsn", "--lr", "0.01", "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0 and "restored" not in res.output and digest() != first
    res = invoke("train-head", "--head", "tsn", "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0 and "restored from the run cache" in res.output, res.output
    assert digest() == first


def test_tensorboard_curves_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed "
                                              "(pip install 'stfn-pipeline[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "cache"
    build_upstream(root, make_features())
    cfg = _config(tmp_path, FAST.replace("max_epochs = 30", "max_epochs = 3"))
    res = invoke("train-head", "--head", "tsn", "--tensorboard", "--config", cfg, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    out = root / HEADS_DIR / "tsn-p0-n4-s0"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "error/val", "lr"} <= tags, tags
    history = json.loads((out / "results.json").read_text())["history"]["epochs"]
    losses = [e.value for e in events.Scalars("loss/train")]
    assert [e.step for e in events.Scalars("loss/train")] == [h["epoch"] for h in history]
    assert losses == pytest.approx([h["train_loss"] for h in history], rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([h["lr"] for h in history])


def test_the_device_comes_from_pipeline_dist(tmp_path, monkeypatch):
    """train-head and fit_head take this rank's device from pipeline.dist (the one device rule), not from
    torch.cuda themselves."""
    import pipeline.dist
    from pipeline.training.heads import fit_head
    from pipeline.models.heads import create_head
    from stages.train_head import STAGE, TrainHeadParams

    asked = []

    def device(name="auto"):
        asked.append(name)
        return "cpu"

    monkeypatch.setattr(pipeline.dist, "device", device)
    root = tmp_path / "cache"
    build_upstream(root, make_features())
    r = run_stage(STAGE, TrainHeadParams(head="tsn", segments=2, max_epochs=1), root)
    assert asked == ["auto"] and r.manifest["summary"]["line"].endswith(" on cpu)")
    x, y = torch.randn(6, 4, 8), torch.tensor([0, 1] * 3)
    fit_head(create_head("tsn", num_classes=2, rgb_dim=8, flow_dim=8, num_segments=2), (x, x, y), (x, x, y),
             max_epochs=1)
    assert asked == ["auto", "auto"]


def test_streamed_and_in_memory_features_give_identical_weights_and_scores(tmp_path):
    """--max-memory below the features' size reads them from the store as needed: the same seed gives the
    same weights (every state-dict tensor) and the same test scores as the in-memory path."""
    root = tmp_path / "cache"
    build_upstream(root, make_features(views=2))
    cfg = _config(tmp_path)
    runs = {}
    for name, budget in (("inmem", "auto"), ("streamed", "1K")):
        res = invoke("train-head", "--head", "stfn", "--segments", 4, "--dropout", "0.3", "--config", cfg,
                     "--max-memory", budget, "--name", name, "--cache-dir", root)
        assert res.exit_code == 0, res.output
        out = root / HEADS_DIR / name
        with np.load(out / "test_scores.npz") as z:
            scores = z["scores"]
        runs[name] = (torch.load(out / "best.pt", weights_only=True)["model"], scores,
                      json.loads((out / "results.json").read_text()))
    (w1, s1, r1), (w2, s2, r2) = runs["inmem"], runs["streamed"]
    assert r1["features_in_memory"] is True and r2["features_in_memory"] is False
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert np.array_equal(s1, s2) and r1["history"]["epochs"][-1]["val_loss"] == r2["history"]["epochs"][-1]["val_loss"]
    # Not fingerprinted: another budget is the same output.
    res = invoke("train-head", "--head", "stfn", "--segments", 4, "--dropout", "0.3", "--config", cfg,
                 "--max-memory", "3G", "--name", "inmem", "--cache-dir", root)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output


def test_max_memory_must_be_a_size(tmp_path):
    res = invoke("train-head", "--max-memory", "lots", "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 2 and "--max-memory" in res.output and "not a size" in res.output, res.output
