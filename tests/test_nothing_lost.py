"""Nothing finished is lost or silently wrong (issue 27, items 1-5): a deletion killed half-way or racing a
stage leaves only trash, a kept run is checked against its own record before it is made current again,
``verify`` finds missing data (not only damaged data), a torn manifest is rebuilt from the journal, a kept run
without run.json or manifest stays visible, and the journal repairs a torn last line.

The outputs after each recovery are compared with an uninterrupted run's frames, read back with plain zarr.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.stage import Stage, StageLocked, param, read_records, run_stage, status
from pipeline.stage import runcache

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.videos import make_csv_dataset

    return make_csv_dataset(tmp_path_factory.mktemp("data"), videos_per_class=2, num_frames=6)


def _decode(data, cache, short_side=32, **kw):
    from stages.decode import STAGE, DecodeParams

    return run_stage(STAGE, DecodeParams(dataset="csv", root=data, workers=1, short_side=short_side), cache, **kw)


def plain_frames(decode_dir: Path) -> dict[str, np.ndarray]:
    """Every stored video's frames, read with plain zarr and OpenCV (docs/formats.md: JPEG-in-array, the byte
    offsets in the array's attributes), not with the pipeline's reader."""
    import cv2
    import zarr

    out = {}
    root = decode_dir / "frames"
    for path in sorted(root.rglob("*.zarr")):
        g = zarr.open_group(str(path), mode="r")
        data, offsets = np.asarray(g["frames/jpeg"][...]), g["frames/jpeg"].attrs["offsets"]
        out[path.relative_to(root).as_posix()[:-5]] = np.stack(
            [cv2.imdecode(data[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR) for i in range(len(offsets) - 1)])
    return out


def assert_same_frames(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for vid in want:
        np.testing.assert_array_equal(got[vid], want[vid], err_msg=vid)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def complete_but_missing(folder: Path) -> list[str]:
    """Independent check of a run folder: a manifest.json saying complete while a container of a video its
    journal lists, or videos.json, is gone."""
    m = folder / "manifest.json"
    if not m.exists() or not json.loads(m.read_text()).get("complete"):
        return []
    vids = [json.loads(line)["video"] for line in (folder / "journal.jsonl").read_text().splitlines()
            if line.strip()] if (folder / "journal.jsonl").exists() else []
    gone = [v for v in vids if not (folder / "frames" / f"{v}.zarr" / "zarr.json").exists()]
    return gone + ([] if (folder / "videos.json").exists() else ["videos.json"])


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 90) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the subprocess ended before pausing:\n{proc.stdout.read()}")
        if time.time() - t0 > seconds:
            proc.kill()
            raise AssertionError("the subprocess never paused")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------------------
# 1. a killed deletion; a restore checks the run's own record
# ------------------------------------------------------------------------------------------------------------

#: Runs in a subprocess: ``decode --force`` whose deletion of the run it replaces is killed (``os._exit``) after
#: a few files, with the folder's entries taken folders-first (the frames go before the manifest, a legal order
#: for ``shutil.rmtree``).
KILLED_FORCE = """
    import os, shutil, sys
    from pathlib import Path
    real_rmtree, real_unlink, real_scandir = shutil.rmtree, os.unlink, os.scandir
    count = [0]

    class FoldersFirst:
        def __init__(self, it):
            self.entries = sorted(it, key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
            it.close()
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def __iter__(self):
            return iter(self.entries)
        def close(self):
            pass

    def unlink(*a, **k):
        count[0] += 1
        if count[0] > 5:
            os._exit(9)  # killed part-way through the deletion
        return real_unlink(*a, **k)

    def rmtree(*a, **k):
        os.unlink, os.scandir = unlink, lambda *x, **y: FoldersFirst(real_scandir(*x, **y))
        try:
            return real_rmtree(*a, **k)
        finally:
            os.unlink, os.scandir = real_unlink, real_scandir

    shutil.rmtree = rmtree
    from pipeline.stage import run_stage
    from stages.decode import STAGE, DecodeParams
    run_stage(STAGE, DecodeParams(dataset="csv", root=Path(sys.argv[1]), workers=1, short_side=32),
              Path(sys.argv[2]), force=True)
"""


def test_a_killed_deletion_leaves_only_trash_and_the_run_comes_back_intact(data, tmp_path):
    cache = tmp_path / "cache"
    a = _decode(data, cache)
    want = plain_frames(cache / "decode")  # the uninterrupted run
    _decode(data, cache, short_side=24)
    assert _decode(data, cache).restored
    proc = _python(KILLED_FORCE, str(data), str(cache))
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 9, out  # killed inside the deletion
    # No kept folder is a "complete" run missing data: the run being deleted went to the trash first.
    for folder in (cache / ".runs" / "decode").iterdir():
        assert complete_but_missing(folder) == [], folder
    assert not (cache / ".runs" / "decode" / a.fingerprint).exists()
    trash = runcache.trash_folders(cache)
    assert len(trash) == 1 and trash[0].parent == cache / ".trash"
    from stages.cli import main

    listed = CliRunner().invoke(main, ["runs", "decode", "--cache-dir", str(cache)])
    assert listed.exit_code == 0 and ".trash" not in listed.output and len(listed.output.splitlines()) == 2
    # Switching away and back: the intact run comes back (the half-deleted one never does) and reads as before.
    _decode(data, cache, short_side=24)
    back = _decode(data, cache)
    assert back.fingerprint == a.fingerprint and (cache / "decode" / "videos.json").exists()
    assert_same_frames(plain_frames(cache / "decode"), want)
    # The next gc lists the trash, and --yes removes it.
    dry = CliRunner().invoke(main, ["gc", "--cache-dir", str(cache)])
    assert "trash left by interrupted deletions: 1 folder(s)" in dry.output and trash[0].exists()
    yes = CliRunner().invoke(main, ["gc", "--yes", "--cache-dir", str(cache)])
    assert yes.exit_code == 0 and not trash[0].exists(), yes.output
    assert_same_frames(plain_frames(cache / "decode"), want)


def _half_delete(run: Path) -> list[str]:
    """What the deletion of pipeline 7e8f4a7 left when killed: some containers and videos.json gone, the manifest
    (complete) and journal still there. Returns the videos removed."""
    frames = sorted(p for p in (run / "frames").rglob("*.zarr"))
    gone = [p.relative_to(run / "frames").as_posix()[:-5] for p in frames[:2]]
    for p in frames[:2]:
        shutil.rmtree(p)
    (run / "videos.json").unlink()
    return gone


def test_a_restore_prefers_an_intact_copy_and_resumes_a_run_missing_data(data, tmp_path, caplog):
    cache = tmp_path / "cache"
    a = _decode(data, cache)
    want = plain_frames(cache / "decode")
    b = _decode(data, cache, short_side=24)
    kept = cache / ".runs" / "decode" / a.fingerprint
    shutil.copytree(kept, kept.with_name(a.fingerprint + ".1"))  # an intact copy beside it (stash's <fp>.1)
    intact = mtimes(kept.with_name(a.fingerprint + ".1"))
    gone = _half_delete(kept)
    r = _decode(data, cache)
    assert r.restored and r.fingerprint == a.fingerprint
    assert mtimes(cache / "decode") == intact  # the intact copy, moved back: nothing recomputed
    assert_same_frames(plain_frames(cache / "decode"), want)

    # Only the half-deleted copy left: not restored as finished; resumed, the missing videos redone alone.
    _decode(data, cache, short_side=24)  # A kept again, as <fp>.1 beside the half-deleted <fp>
    runcache.discard(cache, kept.with_name(a.fingerprint + ".1"))
    before = mtimes(kept)
    caplog.set_level("INFO", logger="pipeline")
    r = _decode(data, cache)
    assert not r.restored and not r.skipped and r.manifest["complete"] and r.manifest["resumed"]
    assert "is missing data" in caplog.text and gone[0] in caplog.text
    after = mtimes(cache / "decode")
    redone = {k.split(".zarr")[0] for k in after if k.startswith("frames/") and before.get(k) != after[k]}
    assert redone == {f"frames/{v}" for v in gone}  # exactly the missing videos recomputed
    assert_same_frames(plain_frames(cache / "decode"), want)
    assert (cache / "decode" / "videos.json").exists() and b.fingerprint != a.fingerprint


@dataclass(frozen=True)
class HeadParams:
    lr: float = param(0.1, "learning rate")


head_runs: list[float] = []


def _head_run(ctx, plan):
    head_runs.append(ctx.params.lr)
    (ctx.dir / "best.pt").write_text(f"weights {ctx.params.lr}")
    (ctx.dir / "results.json").write_text(json.dumps({"top1": ctx.params.lr}))
    ctx.journal.record_ok("v0")
    return {}


#: A stage named like train-head (whose finished runs always hold best.pt and results.json), under a scoped key.
HEAD = Stage("train-head", "1", HeadParams, run=_head_run, key=lambda p: "train-head/split1-resnet18/h")


def test_a_kept_run_missing_its_checkpoint_is_recomputed_not_restored(tmp_path, caplog):
    key = "train-head/split1-resnet18/h"
    a = run_stage(HEAD, HeadParams(), tmp_path)
    run_stage(HEAD, HeadParams(lr=0.5), tmp_path)
    (tmp_path / ".runs" / key / a.fingerprint / "best.pt").unlink()
    head_runs.clear()
    caplog.set_level("INFO", logger="pipeline")
    r = run_stage(HEAD, HeadParams(), tmp_path)
    assert not r.restored and head_runs == [0.1] and "best.pt: missing" in caplog.text
    assert (tmp_path / key / "best.pt").read_text() == "weights 0.1"
    assert (tmp_path / ".runs" / key / a.fingerprint).exists()  # left kept (gc removes it), never deleted
    run_stage(HEAD, HeadParams(lr=0.5), tmp_path)  # the recomputed run is kept beside it, as <fp>.1 ...
    head_runs.clear()
    assert run_stage(HEAD, HeadParams(), tmp_path).restored and head_runs == []  # ... and is the one taken back
    assert (tmp_path / key / "best.pt").read_text() == "weights 0.1"


# ------------------------------------------------------------------------------------------------------------
# 2. gc racing a stage
# ------------------------------------------------------------------------------------------------------------

#: Runs ``gc --yes`` in a subprocess that pauses at the first call of ``PAUSE_AT`` (os.replace or os.unlink)
#: until the file ``go`` exists.
PAUSING_GC = """
    import os, time
    from pathlib import Path
    import sys
    cache, PAUSE_AT = Path(sys.argv[1]), sys.argv[2]
    real = getattr(os, PAUSE_AT)
    state = {"paused": False}

    def pausing(*a, **k):
        if not state["paused"]:
            state["paused"] = True
            (cache.parent / "paused").write_text("")
            while not (cache.parent / "go").exists():
                time.sleep(0.05)
        return real(*a, **k)

    from pipeline.stage import runcache
    setattr(os, PAUSE_AT, pausing)
    removed = runcache.gc(cache, yes=True)
    print("removed", len(removed))
"""


def _pausing_gc(cache: Path, at: str) -> subprocess.Popen:
    for f in ("paused", "go"):
        (cache.parent / f).unlink(missing_ok=True)
    return _python(PAUSING_GC, str(cache), at)


def test_gc_racing_a_stage_never_touches_the_current_run(data, tmp_path):
    cache = tmp_path / "cache"
    a = _decode(data, cache)
    want_a = plain_frames(cache / "decode")
    _decode(data, cache, short_side=24)
    want_b = plain_frames(cache / "decode")
    # gc paused inside the deletion of kept run A; meanwhile the stage asks for A.
    proc = _pausing_gc(cache, "unlink")
    _wait_for(cache.parent / "paused", proc)
    try:
        r = _decode(data, cache)
    except StageLocked:
        r = None  # refused while gc holds the lock: also safe
    (cache.parent / "go").write_text("")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    if r is None:
        r = _decode(data, cache)
    assert r.fingerprint == a.fingerprint and not r.restored  # the run being deleted is never taken back
    assert_same_frames(plain_frames(cache / "decode"), want_a)  # the current run is intact after both
    assert runcache.trash_folders(cache) == []

    # gc paused while it moves a kept run out (under the key's lock): a stage started then is refused.
    _decode(data, cache, short_side=24)  # current B, kept A
    proc = _pausing_gc(cache, "replace")
    _wait_for(cache.parent / "paused", proc)
    with pytest.raises(StageLocked, match="being written by pid"):
        _decode(data, cache)
    (cache.parent / "go").write_text("")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "removed 1" in out, out
    assert_same_frames(plain_frames(cache / "decode"), want_b)
    assert not (cache / ".runs" / "decode").exists()


# ------------------------------------------------------------------------------------------------------------
# 3. verify finds missing data
# ------------------------------------------------------------------------------------------------------------

def test_verify_finds_missing_videos_arrays_and_chunks_naming_each_file(data, tmp_path):
    from pipeline.io.artifacts import flow_store, frame_store
    from pipeline.io.store import StoreError, read_frames
    from stages.cli import main
    from tests.fakes import FAKE_FLOW_STAGE, FakeFlowParams

    cache = tmp_path / "cache"
    _decode(data, cache)
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), cache)
    want = plain_frames(cache / "decode")
    frames, flows = frame_store(cache / "decode"), flow_store(cache / "extract-flow")
    vids = frames.video_ids()
    gone_video, gone_array, gone_chunk = vids[0], vids[1], vids[2]
    shutil.rmtree(frames.path(gone_video))  # a deleted video folder
    shutil.rmtree(frames.path(gone_array) / "frames" / "jpeg")  # a deleted array
    chunk = next(p for p in flows.path(gone_chunk).rglob("*") if p.is_file() and "/c/" in p.as_posix())
    chunk.unlink()  # a deleted chunk: zarr reads it as zeros
    import zarr

    assert not np.asarray(zarr.open_group(str(flows.path(gone_chunk)), mode="r")["flow/raw"][...]).any()
    with pytest.raises(StoreError, match=str(frames.path(gone_array)).replace(".", r"\.")):
        read_frames(frames, gone_array)  # the read error names the file

    res = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache)])
    assert res.exit_code == 1, res.output
    assert "decode: 4 checked, 2 missing/damaged" in res.output
    assert "extract-flow: 4 checked, 1 missing/damaged" in res.output
    for path in (frames.path(gone_video), frames.path(gone_array), chunk):
        assert str(path) in res.output, (path, res.output)
    rows = {r.key: r for r in status(cache, [])}
    assert rows["decode"].state == "incomplete"
    assert "2 videos missing/damaged (found by verify)" in rows["decode"].reason
    assert "failures not allowed" not in rows["decode"].reason

    r = _decode(data, cache)  # redoes exactly the two videos
    assert r.manifest["complete"] and r.manifest["done"] == 4
    records = [json.loads(x) for x in (cache / "decode" / "journal.jsonl").read_text().splitlines()]
    assert sorted(x["video"] for x in records[-2:] if x.get("ok")) == sorted([gone_video, gone_array])
    assert_same_frames(plain_frames(cache / "decode"), want)
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), cache)
    res = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and "0 missing/damaged" in res.output, res.output


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_an_undecodable_jpeg_is_an_error_naming_the_file(tmp_path, backend):
    """Bytes with valid checksums that OpenCV cannot decode (written so by a buggy tool): the error names the
    container, not only "corrupt JPEG data"."""
    from pipeline.io.store import StoreError, VideoStore

    store = VideoStore(tmp_path / "frames", backend)
    with store.writer("v") as w:
        w.write_encoded_images("frames", [b"not a jpeg", b"nor this"])
    with store.reader("v") as r, pytest.raises(StoreError, match=str(store.path("v")).replace(".", r"\.")):
        r.read_images("frames", [1])


def test_verify_checks_both_feature_stores_and_a_deleted_feature_chunk(tmp_path, monkeypatch):
    import pipeline.io.store as store_mod
    from pipeline.io.store import write_feature_store
    from pipeline.stage.manifest import write_manifest
    from pipeline.stage.keys import CACHE_FORMAT
    from stages.cli import main
    from tests.test_storage_codecs import damage, small_feature_set

    folder = tmp_path / "extract-features" / "split1-resnet18"
    folder.mkdir(parents=True)
    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 256)
    fs = small_feature_set(V=6, D=64)  # v0 .. v5, two videos (2 x 128 B) per chunk of streams/rgb
    for kind in ("zarr", "h5"):
        write_feature_store(folder / f"features.{kind}", fs)
    record = {"cache_format": CACHE_FORMAT, "stage": "extract-features", "fingerprint": "f" * 64,
              "params": {"store": "both"}}
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "journal.jsonl").write_text("".join(json.dumps({"video": str(v), "ok": True}) + "\n"
                                                  for v in fs.video_ids))
    write_manifest(folder, {**record, "complete": True, "done": len(fs.video_ids)})
    (folder / "features.zarr" / "streams" / "rgb" / "c" / "1" / "0" / "0" / "0").unlink()  # v2, v3: zeros
    h5 = folder / "features.h5"
    import h5py

    with h5py.File(h5, "r") as f:
        info = f["streams/rgb"].id.get_chunk_info(2)  # v4, v5
    damage(h5, info.byte_offset, info.size, "flip")
    res = CliRunner().invoke(main, ["verify", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1, res.output
    lines = {line.split(":")[0].strip(): line for line in res.output.splitlines() if line.startswith("  v")}
    assert sorted(lines) == ["v2", "v3", "v4", "v5"], res.output
    assert str(folder / "features.zarr") in lines["v2"] and str(h5) in lines["v4"]
    journal, _ = read_records([folder / "journal.jsonl"])
    assert sorted(journal) == ["v0", "v1"]  # the others journaled for redo


# ------------------------------------------------------------------------------------------------------------
# 4. torn manifests, unknown kept runs
# ------------------------------------------------------------------------------------------------------------

def test_a_torn_manifest_is_rebuilt_from_the_journal_never_removed(data, tmp_path):
    from stages.cli import main

    cache = tmp_path / "cache"
    a = _decode(data, cache)
    want = plain_frames(cache / "decode")
    manifest = cache / "decode" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # torn (a power cut after the rename)
    rows = {r.key: r for r in status(cache, [])}
    assert rows["decode"].state == "incomplete" and "rebuild" in rows["decode"].reason
    assert "remove" not in rows["decode"].reason.replace("do not remove", "")
    res = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache)])  # no crash: the finding is listed
    assert res.exit_code == 1 and "unreadable manifest" in res.output and "4 checked" in res.output, res.output
    frames = mtimes(cache / "decode" / "frames")
    r = _decode(data, cache)
    assert r.fingerprint == a.fingerprint and r.manifest["complete"] and r.manifest["done"] == 4
    assert mtimes(cache / "decode" / "frames") == frames  # nothing recomputed
    assert_same_frames(plain_frames(cache / "decode"), want)

    # A torn manifest in the run cache: listed as such (not "partial"); restoring it rebuilds the manifest.
    b = _decode(data, cache, short_side=24)
    kept = cache / ".runs" / "decode" / a.fingerprint
    (kept / "manifest.json").write_text("{")
    listed = CliRunner().invoke(main, ["runs", "decode", "--cache-dir", str(cache)])
    line = next(x for x in listed.output.splitlines() if a.fingerprint[:12] in x)
    assert "torn" in line and "partial" not in line, listed.output
    frames = mtimes(kept / "frames")
    r = _decode(data, cache)
    assert r.fingerprint == a.fingerprint and r.manifest["complete"]
    assert mtimes(cache / "decode" / "frames") == frames
    assert_same_frames(plain_frames(cache / "decode"), want)

    # A kept run that lost run.json and manifest: still visible to status, runs and gc, which removes it.
    kept_b = cache / ".runs" / "decode" / b.fingerprint
    (kept_b / "run.json").unlink()
    (kept_b / "manifest.json").unlink()
    rows = {r.key: r for r in status(cache, [])}
    assert rows["decode"].kept == 1 and rows["decode"].kept_size > 0
    listed = CliRunner().invoke(main, ["runs", "decode", "--cache-dir", str(cache)])
    assert "unknown run" in listed.output and "KiB" in listed.output.splitlines()[-1], listed.output
    dry = CliRunner().invoke(main, ["gc", "--cache-dir", str(cache)])
    assert "would remove 1 run(s)" in dry.output and "unknown run" in dry.output, dry.output
    CliRunner().invoke(main, ["gc", "--yes", "--cache-dir", str(cache)])
    assert not kept_b.exists() and (cache / "decode" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------------------
# 5. the journal's torn last line
# ------------------------------------------------------------------------------------------------------------

def test_the_journal_repairs_a_torn_last_line_before_appending(tmp_path):
    from pipeline.stage import Journal

    path = tmp_path / "journal.jsonl"
    path.write_text('{"video": "a", "ok": true}\n{"video": "b", "ok": true}\n{"video": "c", "o')  # killed mid-write
    j = Journal(path)
    assert set(j.done) == {"a", "b"}
    j.record_ok("d")
    j.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["video"] for x in lines] == ["a", "b", "d"]  # every line is a whole record
    assert set(read_records([path])[0]) == {"a", "b", "d"}
