"""predict: new videos through the real decode / extract-flow / extract-features and a trained head."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.eval.results import load_test_scores
from pipeline.io import artifacts
from pipeline.stage import StageError, run_stage
from stages.cli import main
from stages.decode import STAGE as DECODE, DecodeParams
from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams
from stages.extract_flow import STAGE as FLOW, FlowParams
from stages.finetune import STAGE as FINETUNE, FinetuneParams
from stages.predict import PredictParams, predict
from stages.train_head import STAGE as TRAIN_HEAD, TrainHeadParams
from tests.conftest import SHARED_DATA
from tests.videos import make_csv_dataset, write_video

SHARED = SHARED_DATA / "clips"
CLIP = SHARED / "ucf101" / "v_ApplyEyeMakeup_g01_c01.avi"
ARCH = "resnet18"
TINY = dict(arch=ARCH, input_size=32, weights="none", batch_size=4, segments=2, val_frames=2, num_test_frames=2,
            workers=0, dropout=0.0, epochs=1)
# A light TV-L1 (one scale, few iterations): the models only need to exist, not to be good.
LIGHT_FLOW = dict(nscales=1, warps=1, inner_iterations=3, outer_iterations=1, fast=False, device="cpu")
HEAD = "stfn-a-avg-bi-n3-s0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """decode (3 classes x 4 synthetic clips, at most 12 frames each), real TV-L1, both ResNet-18 streams, features
    (P = 6) and an STFN head (N = 3): demo-sized models trained here."""
    root = tmp_path_factory.mktemp("predict")
    data = make_csv_dataset(root / "data", videos_per_class=4, classes=("Alpha", "Beta", "Gamma"), num_frames=10,
                            size=(48, 32))
    cache = root / "cache"
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, val_fraction=0.34, max_frames=12,
                                   workers=1), cache)
    run_stage(FLOW, FlowParams(**LIGHT_FLOW), cache)
    for stream in ("rgb", "flow"):
        run_stage(FINETUNE, FinetuneParams(stream=stream, **TINY), cache)
    run_stage(FEATURES, ExtractFeaturesParams(arch=ARCH, positions=6, workers=1, device="cpu"), cache)
    run_stage(TRAIN_HEAD, TrainHeadParams(backbone=ARCH, head="stfn", segments=3, max_epochs=2, batch_size=4,
                                          device="cpu"), cache)
    return cache, data


def test_a_dataset_video_gets_the_heads_own_test_scores(trained, tmp_path):
    cache, data = trained
    head_dir = cache / artifacts.head_key(HEAD, 1, ARCH)
    theirs = load_test_scores(head_dir / artifacts.SCORES)
    vid = str(theirs.video_ids[0])
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    out = predict([data / f"{vid}.avi"], cache, PredictParams(backbone=ARCH, top_k=3, device="cpu"))
    assert len(out) == 1 and "error" not in out[0], out
    rec = out[0]
    assert rec["head"] == HEAD and rec["models"][artifacts.head_key(HEAD, 1, ARCH)]
    probs = {t["label"]: t["prob"] for t in rec["top_k"]}
    expected = dict(zip(theirs.class_names, theirs.scores[0].tolist()))
    assert rec["top_k"][0]["label"] == max(expected, key=expected.get)
    for label, p in probs.items():
        assert p == pytest.approx(expected[label], abs=1e-5)
    # The dataset's cache is only read.
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(not CLIP.is_file(), reason=f"needs the shared real clips ({CLIP}); ../shared is absent")
def test_a_real_clip_json_and_timeline(trained, tmp_path):
    cache, _ = trained
    res = CliRunner().invoke(main, ["predict", str(CLIP), "--backbone", ARCH, "--top-k", "3", "--device", "cpu",
                                    "--json", str(tmp_path / "out.json"), "--timeline", str(tmp_path / "t.png"),
                                    "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out.json").read_text())[0]
    labels = [t["label"] for t in rec["top_k"]]
    probs = np.array([t["prob"] for t in rec["top_k"]])
    assert len(set(labels)) == 3 and set(labels) <= {"Alpha", "Beta", "Gamma"}
    assert np.all((0 <= probs) & (probs <= 1)) and probs.sum() <= 1 + 1e-6 and np.all(np.diff(probs) <= 0)
    assert rec["video"] == str(CLIP) and labels[0] in res.output
    assert (tmp_path / "t.png").stat().st_size > 0


def test_missing_model_and_unreadable_video_are_named(trained, tmp_path):
    cache, data = trained
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    res = CliRunner().invoke(main, ["predict", str(bad), "--backbone", ARCH, "--device", "cpu",
                                    "--cache-dir", str(cache)])
    assert res.exit_code == 1 and "broken.mp4: cannot be read" in res.output, res.output
    empty = tmp_path / "empty-cache"
    for key in ("decode", "extract-flow"):
        shutil.copytree(cache / key, empty / key)
    with pytest.raises(StageError, match="no finished STFN head.*run `pipeline train-head`"):
        predict([bad], empty, PredictParams(backbone=ARCH))
    with pytest.raises(StageError, match=r"finetune/split1-resnet18/rgb: no finished finetune rgb output; run "
                                         r"`pipeline finetune --stream rgb`"):
        shutil.copytree(cache / "train-head", empty / "train-head")
        predict([bad], empty, PredictParams(backbone=ARCH))


def test_a_video_too_short_to_score_is_named_too_short(trained, tmp_path):
    """A 1-frame video has no flow and so no features: alone, a per-video "too short" (no ValueError); beside a
    good video, the good one is scored and the short one named by its own path, not the deleted work folder."""
    cache, data = trained
    short = tmp_path / "one_frame.avi"
    write_video(short, num_frames=1, size=(48, 32))
    out = predict([short], cache, PredictParams(backbone=ARCH, device="cpu"))
    assert len(out) == 1 and out[0]["video"] == str(short)
    assert out[0]["error"].startswith("too short: 1 frame(s), flow with --step 1 needs at least 2"), out
    good = next(data.rglob("*.avi"))
    res = CliRunner().invoke(main, ["predict", str(short), str(good), "--backbone", ARCH, "--device", "cpu",
                                    "--cache-dir", str(cache)])
    assert res.exit_code == 1, res.output
    assert f"{short}: too short: 1 frame(s)" in res.output and f"{good} ({HEAD}" in res.output, res.output
    assert "pipeline-predict-" not in res.output and "1 video(s) scored, 1 not scored" in res.output


def test_without_models_in_the_scope_predict_names_the_scopes_that_have_heads(trained, tmp_path):
    cache, _ = trained
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "any.avi"), "--cache-dir", str(cache)])
    assert res.exit_code == 2, res.output
    assert "train-head/split1-resnet101" in res.output  # the default scope, which has no head
    assert f"split1-resnet18: {HEAD}" in res.output and "--split 1 --backbone resnet18" in res.output, res.output


def test_predict_reads_a_cache_it_cannot_write(trained, tmp_path, monkeypatch):
    """Every open for writing under the dataset's cache fails as on a read-only mount: predict still scores."""
    import builtins
    import errno
    import os

    cache, data = trained
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guarded_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(cache)) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *a, **kw)

    def guarded_os_open(path, flags, *a, **kw):
        if str(path).startswith(str(cache)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    out = predict([next(data.rglob("*.avi"))], cache, PredictParams(backbone=ARCH, top_k=2, device="cpu"))
    assert "error" not in out[0] and len(out[0]["top_k"]) == 2, out
