"""The cache layout's one reader: manifest.json (format check, torn files), run.json, which outputs are
finished, and the finetune checkpoint helper that checks a network against the video table."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.io import artifacts
from pipeline.stage import (CACHE_FORMAT, ArtifactError, Stage, StageError, finished_outputs, param, read_manifest,
                            read_run_info, run_stage)
from pipeline.stage.manifest import peek_manifest

FP = "ab" * 32


def _write(folder: Path, manifest: dict | None = None, run_info: bool = True, text: str | None = None) -> Path:
    """A stage folder by hand: run.json, and manifest.json as ``manifest`` (or raw ``text``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if run_info:
        (folder / "run.json").write_text(json.dumps({"cache_format": CACHE_FORMAT, "fingerprint": FP}))
    if text is not None:
        (folder / "manifest.json").write_text(text)
    elif manifest is not None:
        (folder / "manifest.json").write_text(json.dumps({"cache_format": CACHE_FORMAT, "fingerprint": FP,
                                                          **manifest}))
    return folder


def test_manifest_fields_by_name(tmp_path):
    d = _write(tmp_path / "train-head" / "split1-resnet18" / "x", {
        "stage": "train-head", "version": "3", "complete": True, "params": {"split": 1, "lr": 0.1},
        "upstream": {"extract-features/split1-resnet18": "cd" * 32}, "done": 4, "failed": 1,
        "failures": {"v1": "bad"}, "summary": {"line": "ok"}, "finished": "2026-12-07T10:00:00+00:00"})
    m = read_manifest(d)
    assert (m.complete, m.fingerprint, m.stage, m.version) == (True, FP, "train-head", "3")
    assert m.params == {"split": 1, "lr": 0.1} and m.upstream == {"extract-features/split1-resnet18": "cd" * 32}
    assert (m.done, m.failed, m.failures, m.summary["line"]) == (4, 1, {"v1": "bad"}, "ok")
    assert m.path == d / "manifest.json" and m["finished"] == "2026-12-07T10:00:00+00:00"  # any field by name
    # A minimal manifest (an older or hand-made one): the absent fields read as empty, not as errors.
    m = read_manifest(_write(tmp_path / "decode", {}))
    assert (m.complete, m.params, m.upstream, m.done, m.damaged) == (False, {}, {}, 0, [])
    assert read_manifest(tmp_path / "nothing") is None


@pytest.mark.parametrize("text, match", [
    ('{"cache_format": 1, "fingerp', r"unreadable manifest"),  # torn (a kill mid-write of a copy)
    ("[1, 2]", r"not a manifest \(a JSON list\)"),
    (json.dumps({"cache_format": 0, "fingerprint": FP, "complete": True}),
     rf"written by cache format 0, this pipeline uses {CACHE_FORMAT}"),
    (json.dumps({"cache_format": CACHE_FORMAT, "complete": True}), r"not a manifest \(no fingerprint\)"),
])
def test_a_bad_manifest_is_refused_naming_the_file(tmp_path, text, match):
    d = _write(tmp_path / "decode", text=text)
    with pytest.raises(StageError, match=match) as e:
        read_manifest(d)
    assert str(d / "manifest.json") in str(e.value)


def test_peek_lists_any_format_and_run_info_tolerates_a_torn_file(tmp_path):
    old = _write(tmp_path / "old", text=json.dumps({"cache_format": 0, "fingerprint": "f", "complete": True}))
    assert peek_manifest(old).complete and peek_manifest(old).fingerprint == "f"
    assert peek_manifest(_write(tmp_path / "torn", text="{")) is None
    (tmp_path / "torn" / "run.json").write_text('{"fingerprint": "a')
    assert read_run_info(tmp_path / "torn") is None
    assert read_run_info(old) == {"cache_format": CACHE_FORMAT, "fingerprint": FP}


@dataclass(frozen=True)
class CountParams:
    n: int = param(3, "items")


def _count(ctx, plan):
    for i in range(ctx.params.n):
        ctx.journal.record_ok(f"v{i}")
    return {"line": "counted"}


COUNT = Stage("count", "7", CountParams, run=_count)


def test_the_manifest_a_run_writes_reads_back_as_written(tmp_path):
    r = run_stage(COUNT, CountParams(n=3), tmp_path)
    on_disk = json.loads((tmp_path / "count" / "manifest.json").read_text())
    m = read_manifest(tmp_path / "count")
    assert dict(m) == on_disk == dict(r.manifest)
    assert (m.complete, m.fingerprint, m.version, m.done, m.params) == (True, r.fingerprint, "7", 3, {"n": 3})


def test_finished_outputs_over_a_cache(tmp_path):
    done = {"complete": True}
    _write(tmp_path / "decode", done)
    _write(tmp_path / "extract-flow", {"complete": False, "failed": 2})  # failures not allowed
    for stream in ("rgb", "flow"):
        _write(tmp_path / "finetune" / "split1-resnet18" / stream, done)
    _write(tmp_path / "finetune" / "split2-resnet18" / "rgb", done)
    _write(tmp_path / "finetune" / "rgb", done)  # the layout before per-scope keys: not an output any more
    heads = tmp_path / "train-head" / "split1-resnet18"
    _write(heads / "a", done)
    _write(heads / "b", text='{"complete": tr')  # torn
    _write(heads / "c")  # run.json only: running or interrupted
    _write(heads / "d", {"complete": True, "cache_format": 0})  # another cache format
    _write(heads / "e" / "inner", done)  # a stage folder's own sub-folders are never keys ...
    _write(heads / "e", done)  # ... once the folder itself is one
    _write(heads / ".tmp-f", done)  # an atomic write in progress
    _write(tmp_path / ".runs" / "train-head" / "split1-resnet18" / "g" / FP, done)  # a kept run
    assert list(finished_outputs(tmp_path, "decode")) == ["decode"]
    assert finished_outputs(tmp_path, "extract-flow") == {}
    assert list(finished_outputs(tmp_path, "finetune")) == [
        "finetune/split1-resnet18/flow", "finetune/split1-resnet18/rgb", "finetune/split2-resnet18/rgb"]
    assert list(finished_outputs(tmp_path, "finetune", "split2-resnet18")) == ["finetune/split2-resnet18/rgb"]
    assert list(finished_outputs(tmp_path, "train-head", "split1-resnet18")) == [
        "train-head/split1-resnet18/a", "train-head/split1-resnet18/e"]
    assert finished_outputs(tmp_path, "train-head", "split3-resnet18") == {}
    assert finished_outputs(tmp_path, "refine") == {}
    m = finished_outputs(tmp_path, "train-head")["train-head/split1-resnet18/a"]
    assert m.complete and m.path == heads / "a" / "manifest.json"


# ----------------------------------------------------------------------------------------------------------
# A finetune checkpoint against the video table
# ----------------------------------------------------------------------------------------------------------

def _finetune_output(folder: Path, classes: list[str], **over) -> Path:
    folder.mkdir(parents=True)
    ckpt = {"model": {"fc.weight": torch.zeros(len(classes), 4)}, "arch": "resnet18", "num_classes": len(classes),
            "in_channels": 3, "classes": classes, **over}
    torch.save(ckpt, folder / "best.pt")
    return folder


def test_finetune_checkpoint_is_read_when_it_fits_the_table(tmp_path):
    d = _finetune_output(tmp_path / "rgb", ["Alpha", "Beta"])
    path, ckpt = artifacts.finetune_checkpoint(d, ["Alpha", "Beta"])
    assert path == d / "best.pt" and ckpt["arch"] == "resnet18" and ckpt["model"]["fc.weight"].shape == (2, 4)


@pytest.mark.parametrize("table, over, match", [
    (["Alpha", "Beta", "Gamma"], {}, r"a 2-way classifier, the video table has 3 classes"),
    (["Beta", "Alpha"], {}, r"its classes \['Alpha', 'Beta'\] differ from the video table's \['Beta', 'Alpha'\]"),
    (["Alpha", "Beta"], {"classes": None, "num_classes": None}, r"no 'num_classes', 'classes' entry"),
])
def test_finetune_checkpoint_of_other_classes_is_refused_naming_the_file(tmp_path, table, over, match):
    d = _finetune_output(tmp_path / "rgb", ["Alpha", "Beta"])
    if over:  # a checkpoint that does not record its classes is not a finetune checkpoint
        ckpt = torch.load(d / "best.pt", weights_only=True)
        torch.save({k: v for k, v in ckpt.items() if k not in over}, d / "best.pt")
    with pytest.raises(ArtifactError, match=match) as e:
        artifacts.finetune_checkpoint(d, table)
    assert str(d / "best.pt") in str(e.value) and isinstance(e.value, StageError)


def test_missing_or_foreign_finetune_checkpoint_names_the_file(tmp_path):
    (tmp_path / "rgb").mkdir()
    with pytest.raises(ArtifactError, match=r"rgb/best.pt: the finetune stage finished but its best.pt is missing"):
        artifacts.finetune_checkpoint(tmp_path / "rgb", ["Alpha"])
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "rgb" / "best.pt")  # a plain state dict
    with pytest.raises(ArtifactError, match=r"rgb/best.pt: not a checkpoint of this pipeline.*expected a finetune"):
        artifacts.finetune_checkpoint(tmp_path / "rgb", ["Alpha"])


def test_check_classes_accepts_a_checkpoint_without_names_of_the_right_width(tmp_path):
    # A train-head checkpoint of an older run records num_classes only: its width is all that can be checked.
    artifacts.check_classes(tmp_path / "best.pt", {"num_classes": 2}, ["a", "b"], "train-head")
    with pytest.raises(ArtifactError, match=r"re-run `pipeline train-head`"):
        artifacts.check_classes(tmp_path / "best.pt", {"num_classes": 3}, ["a", "b"], "train-head")
