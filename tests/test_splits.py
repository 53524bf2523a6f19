"""Splits and backbones side by side in one cache: the run cache's per-scope keys (pipeline.io.artifacts)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import artifacts
from pipeline.eval.results import load_test_scores
from pipeline.stage import StageError, run_stage, status
from stages import all_stages
from stages.decode import STAGE as DECODE, DecodeParams
from stages.finetune import STAGE as FINETUNE, FinetuneParams
from tests.fakes import FAKE_FLOW_STAGE, FakeFlowParams
from tests.videos import make_csv_dataset

TINY = dict(arch="resnet18", input_size=32, weights="none", batch_size=4, segments=2, val_frames=2,
            num_test_frames=2, workers=0, dropout=0.0, epochs=1)


@pytest.fixture(scope="module")
def two_split_cache(tmp_path_factory):
    """A UCF101-layout dataset with two official splits (4 groups per class; split 1 tests group 4, split 2
    tests group 1), decoded once."""
    root = tmp_path_factory.mktemp("splits")
    data = make_csv_dataset(root / "UCF-101", videos_per_class=4, num_frames=8, size=(40, 32))
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Alpha\n2 Beta\n")
    for split, test_group in ((1, 4), (2, 1)):
        train, test = [], []
        for c, cls in enumerate(("Alpha", "Beta")):
            for g in range(1, 5):
                rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
                (test if g == test_group else train).append((rel, c + 1))
        (lists / f"trainlist0{split}.txt").write_text("".join(f"{r} {c}\n" for r, c in train))
        (lists / f"testlist0{split}.txt").write_text("".join(f"{r}\n" for r, _ in test))
    cache = root / "cache"
    run_stage(DECODE, DecodeParams(dataset="ucf101", root=data, splits=lists, short_side=0, val_fraction=0.34,
                                   workers=1), cache)
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), cache)
    return cache


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("log.txt",)}


def test_finetune_split_1_then_2_then_1_keeps_both_and_recomputes_nothing(two_split_cache):
    cache = two_split_cache
    one = run_stage(FINETUNE, FinetuneParams(stream="rgb", split=1, **TINY), cache)
    out1 = cache / artifacts.finetune_key("rgb", 1, "resnet18")
    assert one.key == "finetune/split1-resnet18/rgb" and (out1 / "best.pt").is_file()
    before = _digest(out1)
    two = run_stage(FINETUNE, FinetuneParams(stream="rgb", split=2, **TINY), cache)
    out2 = cache / artifacts.finetune_key("rgb", 2, "resnet18")
    assert not two.skipped and (out2 / "best.pt").is_file()
    assert _digest(out1) == before  # split 1's network is untouched by split 2's run
    again = run_stage(FINETUNE, FinetuneParams(stream="rgb", split=1, **TINY), cache)
    assert again.skipped and "fresh" in again.message and _digest(out1) == before
    # Each network is tested on its own split's test list: group 4 for split 1, group 1 for split 2.
    ids1 = load_test_scores(out1 / artifacts.SCORES).video_ids
    ids2 = load_test_scores(out2 / artifacts.SCORES).video_ids
    assert sorted(ids1) == ["Alpha/v_Alpha_g04_c01", "Beta/v_Beta_g04_c01"]
    assert sorted(ids2) == ["Alpha/v_Alpha_g01_c01", "Beta/v_Beta_g01_c01"]
    rows = {r.key: r.state for r in status(cache, all_stages())}
    assert rows["decode"] == "fresh" and rows[one.key] == "fresh" and rows[two.key] == "fresh"


def test_a_stage_reading_a_scope_that_has_no_output_names_the_ones_there(two_split_cache):
    from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams

    # finetune ran for resnet18 only (a no-op when the test above ran): extract-features with the default
    # backbone is told what exists.
    run_stage(FINETUNE, FinetuneParams(stream="rgb", split=1, **TINY), two_split_cache)
    with pytest.raises(StageError, match=r"finetune/split1-resnet101/rgb.*finetune has outputs for "
                                         r"split1-resnet18"):
        run_stage(FEATURES, ExtractFeaturesParams(positions=4, flow_weights="none"), two_split_cache)


def test_old_layout_outputs_are_named_with_what_to_do(tmp_path):
    """A cache from before per-split keys: status names each old folder and the move that keeps it."""
    from pipeline.io.atomic import write_json
    from pipeline.stage import CACHE_FORMAT

    old = tmp_path / "finetune" / "rgb"
    old.mkdir(parents=True)
    write_json(old / "run.json", {"cache_format": CACHE_FORMAT, "fingerprint": "f" * 64})
    write_json(old / "manifest.json", {"cache_format": CACHE_FORMAT, "stage": "finetune", "key": "finetune/rgb",
                                       "fingerprint": "f" * 64, "complete": True, "version": "1",
                                       "params": {"split": 2, "arch": "resnet50", "stream": "rgb"}})
    row = next(r for r in status(tmp_path, all_stages()) if r.key == "finetune/rgb")
    assert row.state == "old layout" and "mv finetune/rgb finetune/split2-resnet50/rgb" in row.reason


def test_scope_keys_parse_back():
    key = artifacts.head_key("stfn-a-avg-bi-n5-s0", 3, "inception_v3")
    assert key == "train-head/split3-inception_v3/stfn-a-avg-bi-n5-s0"
    parts = artifacts.key_parts(key)
    assert (parts.stage, parts.split, parts.backbone, parts.name) == ("train-head", 3, "inception_v3",
                                                                      "stfn-a-avg-bi-n5-s0")
    assert artifacts.key_parts("decode").split is None
    assert artifacts.evaluate_key((1, 2, 3), "resnet101") == "evaluate/splits1-2-3-resnet101"
    assert np.all([artifacts.parse_scope(s) is None for s in ("rgb", "split-x", "splitA-resnet")])


def test_a_network_of_another_split_is_refused(two_split_cache):
    """The "100 %" trap: split 1's network scoring split 2, whose test videos include split 1's training
    videos. Given as a weights file (no key to tell), it is refused by the split recorded in it."""
    from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams

    run_stage(FINETUNE, FinetuneParams(stream="rgb", split=1, **TINY), two_split_cache)
    weights = two_split_cache / artifacts.finetune_key("rgb", 1, "resnet18") / artifacts.BEST
    with pytest.raises(StageError, match="fine-tuned on split 1.*split 2 would score test videos it was trained"):
        run_stage(FEATURES, ExtractFeaturesParams(arch="resnet18", split=2, positions=4, rgb_weights=str(weights),
                                                  flow_weights="none"), two_split_cache)
    assert not (two_split_cache / artifacts.features_key(2, "resnet18")).exists()
