"""The run cache: every run of a stage key is kept under .runs/<key>/<fingerprint>/; switching back restores it
(no recompute, byte-identical) or resumes it; gc; status names what changed."""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.stage import Stage, StageLock, StageLocked, param, run_stage, stage_keys_in_cache, status
from pipeline.stage import runcache


@dataclass(frozen=True)
class P:
    n: int = param(4, "items")
    scale: int = param(1, "multiplier")
    stop_after: int = param(-1, "simulate a kill after this many items", fingerprint=False)


calls: list[tuple[int, str]] = []


class Killed(Exception):
    pass


def run(ctx, plan):
    for i in range(ctx.params.n):
        vid = f"v{i}"
        if ctx.journal.is_done(vid):
            continue
        if i == ctx.params.stop_after:
            raise Killed(vid)
        calls.append((ctx.params.scale, vid))
        (ctx.dir / f"{vid}.txt").write_text(str(i * ctx.params.scale))
        ctx.journal.record_ok(vid)
    return {"line": "items"}


ITEMS = Stage("items", "1", P, run=run)


@dataclass(frozen=True)
class SP:
    offset: int = param(0, "added")


def sum_run(ctx, plan):
    total = sum(int(p.read_text()) for p in ctx.upstream.dir("items").glob("v*.txt")) + ctx.params.offset
    (ctx.dir / "sum.txt").write_text(str(total))
    return {}


SUM = Stage("sum", "1", SP, run=sum_run, upstream=lambda p: ("items",))


@pytest.fixture(autouse=True)
def _reset():
    calls.clear()


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file except the log (appended by every run)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_b_a_restores_without_recompute_byte_identical(tmp_path):
    a = run_stage(ITEMS, P(), tmp_path)
    before = tree(tmp_path / "items")
    b = run_stage(ITEMS, P(scale=3), tmp_path)
    assert (tmp_path / "items" / "v2.txt").read_text() == "6"
    assert (tmp_path / ".runs" / "items" / a.fingerprint / "v2.txt").read_text() == "2"  # A kept, not deleted
    calls.clear()
    again = run_stage(ITEMS, P(), tmp_path)
    assert calls == [] and again.skipped and again.restored
    assert "restored from the run cache" in again.message and a.fingerprint[:12] in again.message
    assert tree(tmp_path / "items") == before
    assert (tmp_path / ".runs" / "items" / b.fingerprint / "v2.txt").read_text() == "6"  # B kept now
    assert stage_keys_in_cache(tmp_path) == ["items"]  # .runs is not a stage output


def test_killed_run_switch_and_switch_back_resumes(tmp_path):
    with pytest.raises(Killed):
        run_stage(ITEMS, P(stop_after=2), tmp_path)  # v0, v1 journaled, no manifest
    assert calls == [(1, "v0"), (1, "v1")]
    run_stage(ITEMS, P(scale=5), tmp_path)
    calls.clear()
    r = run_stage(ITEMS, P(), tmp_path)
    assert calls == [(1, "v2"), (1, "v3")]  # the killed run resumed: v0, v1 not recomputed
    assert r.manifest["complete"] and r.manifest["resumed"] and r.manifest["done"] == 4
    assert [(tmp_path / "items" / f"v{i}.txt").read_text() for i in range(4)] == ["0", "1", "2", "3"]


def test_force_recomputes_and_keeps_one_run_per_fingerprint(tmp_path):
    a = run_stage(ITEMS, P(), tmp_path)
    run_stage(ITEMS, P(scale=2), tmp_path)
    run_stage(ITEMS, P(), tmp_path)  # restored
    calls.clear()
    r = run_stage(ITEMS, P(), tmp_path, force=True)
    assert not r.skipped and len(calls) == 4 and r.fingerprint == a.fingerprint
    kept = [p.name for p in (tmp_path / ".runs" / "items").iterdir()]
    assert a.fingerprint not in kept and len(kept) == 1  # the superseded same-fingerprint run went away


def test_force_killed_leaves_the_finished_run_kept(tmp_path):
    a = run_stage(ITEMS, P(), tmp_path)
    with pytest.raises(Killed):
        run_stage(ITEMS, P(stop_after=1), tmp_path, force=True)
    assert (tmp_path / ".runs" / "items" / a.fingerprint / "manifest.json").exists()


def _three_runs(tmp_path):
    fps = []
    for scale in (1, 2, 3, 4):
        fps.append(run_stage(ITEMS, P(scale=scale), tmp_path).fingerprint)
    return fps  # current: scale 4; kept: 1, 2, 3


def test_gc_dry_run_lists_exactly_what_yes_removes_and_never_the_current(tmp_path):
    fps = _three_runs(tmp_path)
    # Make the kept runs' ages distinct and known: scale 1 oldest.
    for age_h, fp in ((30, fps[0]), (20, fps[1]), (10, fps[2])):
        m = tmp_path / ".runs" / "items" / fp / "manifest.json"
        d = json.loads(m.read_text())
        d["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age_h * 3600))
        m.write_text(json.dumps(d))
    dry = runcache.gc(tmp_path, keep_last=1)
    assert sorted(r.fingerprint for r in dry) == sorted(fps[:2])  # newest kept one (scale 3) stays
    assert all((tmp_path / ".runs" / "items" / fp).exists() for fp in fps[:3])  # dry run removed nothing
    assert [r.fingerprint for r in runcache.gc(tmp_path, older_than=runcache.parse_duration("25h"))] == [fps[0]]
    done = runcache.gc(tmp_path, keep_last=1, yes=True)
    assert [r.fingerprint for r in done] == [r.fingerprint for r in dry]
    assert sorted(p.name for p in (tmp_path / ".runs" / "items").iterdir()) == [fps[2]]
    runcache.gc(tmp_path, yes=True)
    assert not (tmp_path / ".runs" / "items").exists()
    assert (tmp_path / "items" / "v1.txt").read_text() == "4"  # the current run is never removed
    assert runcache.gc(tmp_path, yes=True) == []


def test_gc_refused_while_the_key_is_locked(tmp_path):
    fps = _three_runs(tmp_path)
    with StageLock(tmp_path / "items.lock", "items"):
        with pytest.raises(StageLocked, match="items"):
            runcache.gc(tmp_path, yes=True)
    assert all((tmp_path / ".runs" / "items" / fp).exists() for fp in fps[:3])


def test_status_names_the_upstream_parameter_change_and_counts_kept_runs(tmp_path):
    run_stage(ITEMS, P(scale=1), tmp_path)
    run_stage(SUM, SP(), tmp_path)
    run_stage(ITEMS, P(scale=2), tmp_path)
    rows = {r.key: r for r in status(tmp_path, [ITEMS, SUM])}
    assert rows["sum"].state == "stale" and rows["sum"].reason == "upstream items changed (scale 1 -> 2)"
    assert rows["items"].state == "fresh" and rows["items"].kept == 1 and rows["items"].kept_size > 0
    runcache.gc(tmp_path, yes=True)  # the old upstream run is gone: fall back to the fingerprints
    rows = {r.key: r for r in status(tmp_path, [ITEMS, SUM])}
    assert rows["sum"].state == "stale" and "->" in rows["sum"].reason and "scale" not in rows["sum"].reason
    assert rows["items"].kept == 0


def test_parse_duration():
    assert runcache.parse_duration("7d") == 7 * 86400 and runcache.parse_duration("12h") == 43200
    with pytest.raises(ValueError, match="--older-than"):
        runcache.parse_duration("7 days")


def test_cli_runs_and_gc(tmp_path):
    from stages.cli import main

    fps = _three_runs(tmp_path)
    res = CliRunner().invoke(main, ["runs", "items", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 4 and lines[0].startswith("* items") and "current" in lines[0]
    assert any("scale 4 -> 1" in line for line in lines[1:])
    st = CliRunner().invoke(main, ["status", "--cache-dir", str(tmp_path)])
    row = next(line for line in st.output.splitlines() if line.startswith("items "))
    assert st.exit_code == 0 and "  3 (" in row and "KiB" in row  # three kept runs and their size
    dry = CliRunner().invoke(main, ["gc", "--cache-dir", str(tmp_path)])
    assert dry.exit_code == 0 and "would remove 3 run(s)" in dry.output and "--yes" in dry.output
    bad = CliRunner().invoke(main, ["gc", "--older-than", "soon", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--older-than" in bad.output
    yes = CliRunner().invoke(main, ["gc", "--yes", "--stage", "items", "--cache-dir", str(tmp_path)])
    assert yes.exit_code == 0 and "removed 3 run(s)" in yes.output
    assert not any((tmp_path / ".runs" / "items" / fp).exists() for fp in fps)


# ------------------------------------------------------------------------------------------------------------
# decode, the real cheap stage
# ------------------------------------------------------------------------------------------------------------

def _decode(data, cache, **kw):
    from stages.decode import STAGE, DecodeParams

    return run_stage(STAGE, DecodeParams(dataset="csv", root=data, workers=1, **kw), cache)


def test_decode_a_b_a_and_lost_manifest(tmp_path):
    from tests.videos import make_csv_dataset

    data = make_csv_dataset(tmp_path / "data", videos_per_class=2, num_frames=6)
    cache = tmp_path / "cache"
    a = _decode(data, cache, short_side=32)
    before = tree(cache / "decode")
    mtimes = {p: p.stat().st_mtime_ns for p in (cache / "decode").rglob("*") if p.is_file()}
    _decode(data, cache, short_side=24)
    again = _decode(data, cache, short_side=32)
    assert again.restored and again.fingerprint == a.fingerprint
    assert tree(cache / "decode") == before  # byte-identical
    assert {p: p.stat().st_mtime_ns for p in (cache / "decode").rglob("*") if p.is_file()} == mtimes  # untouched
    # A lost manifest: run.json and the journal are intact; re-running rebuilds it and decodes nothing again.
    (cache / "decode" / "manifest.json").unlink()
    journal = (cache / "decode" / "journal.jsonl").read_bytes()
    frames = {p: p.stat().st_mtime_ns for p in (cache / "decode" / "frames").rglob("*") if p.is_file()}
    r = _decode(data, cache, short_side=32)
    assert r.manifest["resumed"] and r.manifest["done"] == 4 and r.fingerprint == a.fingerprint
    assert (cache / "decode" / "journal.jsonl").read_bytes() == journal  # no video journaled again
    assert {p: p.stat().st_mtime_ns for p in (cache / "decode" / "frames").rglob("*") if p.is_file()} == frames


# ------------------------------------------------------------------------------------------------------------
# a training-like stage: epochs journaled, a checkpoint per epoch, best.pt at the end
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TP:
    lr: float = param(0.1, "learning rate")
    epochs: int = param(3, "epochs")
    stop_after: int = param(-1, "simulate a kill after this many epochs", fingerprint=False)


epochs_run: list[tuple[float, int]] = []


def train_run(ctx, plan):
    import torch

    from pipeline.io.atomic import load_checkpoint, save_checkpoint

    last = ctx.dir / "last.pt"
    w = load_checkpoint(last)["model"] if last.exists() else torch.ones(3)
    for epoch in range(ctx.params.epochs):
        if ctx.journal.is_done(f"epoch{epoch}"):
            continue
        if epoch == ctx.params.stop_after:
            raise Killed(epoch)
        epochs_run.append((ctx.params.lr, epoch))
        w = w - ctx.params.lr * w  # gradient step of 0.5 |w|^2
        save_checkpoint(last, {"model": w, "epoch": epoch})
        ctx.journal.record_ok(f"epoch{epoch}")
    save_checkpoint(ctx.dir / "best.pt", {"model": w})
    return {}


TRAIN = Stage("train", "1", TP, run=train_run)


def test_training_like_stage_a_b_a_and_resume(tmp_path):
    import torch

    epochs_run.clear()
    with pytest.raises(Killed):
        run_stage(TRAIN, TP(stop_after=2), tmp_path)  # epochs 0, 1 done
    run_stage(TRAIN, TP(lr=0.5), tmp_path)
    epochs_run.clear()
    a = run_stage(TRAIN, TP(), tmp_path)
    assert epochs_run == [(0.1, 2)]  # resumed the killed run
    w = torch.load(tmp_path / "train" / "best.pt")["model"]
    assert torch.allclose(w, torch.full((3,), 0.9 ** 3))  # hand-computed: three steps of w <- 0.9 w
    best = (tmp_path / "train" / "best.pt").read_bytes()
    run_stage(TRAIN, TP(lr=0.5), tmp_path)
    assert torch.allclose(torch.load(tmp_path / "train" / "best.pt")["model"], torch.full((3,), 0.5 ** 3))
    epochs_run.clear()
    again = run_stage(TRAIN, TP(), tmp_path)
    assert again.restored and epochs_run == [] and again.fingerprint == a.fingerprint
    assert (tmp_path / "train" / "best.pt").read_bytes() == best
