"""The stage contract with toy stages: fingerprints, no-op re-runs, resume, failures, lock, status."""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.stage import (CACHE_FORMAT, Plan, Stage, StageError, StageFailures, StageLock, StageLocked, param,
                            run_stage, status)


@dataclass(frozen=True)
class CountParams:
    n: int = param(5, "how many items")
    scale: int = param(1, "multiplier")
    workers: int = param(1, "not part of the fingerprint", fingerprint=False)
    fail: str = param("", "comma-separated item ids that fail")


calls: list[str] = []


def count_run(ctx, plan):
    for i in range(ctx.params.n):
        vid = f"v{i:04d}"
        if ctx.journal.is_done(vid):
            continue
        calls.append(vid)
        if vid in ctx.params.fail.split(","):
            ctx.journal.record_failure(vid, "bad item")
            continue
        (ctx.dir / f"{vid}.txt").write_text(str(i * ctx.params.scale))
        ctx.journal.record_ok(vid, value=i * ctx.params.scale)
    return {"line": f"count: {len(ctx.journal.done)} items"}


COUNT = Stage("count", "1", CountParams, run=count_run)


@dataclass(frozen=True)
class SumParams:
    offset: int = param(0, "added to the sum")


def sum_run(ctx, plan):
    src = ctx.upstream.dir("count")
    total = sum(int(p.read_text()) for p in src.glob("v*.txt")) + ctx.params.offset
    (ctx.dir / "sum.txt").write_text(str(total))
    return {"line": f"sum = {total}"}


SUM = Stage("sum", "1", SumParams, run=sum_run, upstream=lambda p: ("count",))


@pytest.fixture(autouse=True)
def _reset():
    calls.clear()


def test_rerun_unchanged_is_noop_and_param_change_recomputes(tmp_path):
    r1 = run_stage(COUNT, CountParams(), tmp_path)
    assert not r1.skipped and len(calls) == 5
    r2 = run_stage(COUNT, CountParams(workers=4), tmp_path)  # execution-only knob: same fingerprint
    assert r2.skipped and "nothing to do" in r2.message and len(calls) == 5
    r3 = run_stage(COUNT, CountParams(scale=2), tmp_path)
    assert not r3.skipped and r3.fingerprint != r1.fingerprint and len(calls) == 10
    assert (tmp_path / "count" / "v0004.txt").read_text() == "8"


def test_manifest_contents(tmp_path):
    run_stage(COUNT, CountParams(n=3), tmp_path)
    m = json.loads((tmp_path / "count" / "manifest.json").read_text())
    assert m["complete"] and m["done"] == 3 and m["failed"] == 0 and m["params"]["n"] == 3
    assert m["cache_format"] == CACHE_FORMAT and "torch" in m["versions"] and m["seconds"] >= 0


def test_resume_skips_journaled_items(tmp_path):
    # Simulate a killed run: run.json and a journal holding two finished items, no manifest.
    run_stage(COUNT, CountParams(n=2), tmp_path)
    out = tmp_path / "count"
    info = json.loads((out / "run.json").read_text())
    (out / "manifest.json").unlink()
    # Same fingerprint for n=2; now pretend the run was n=4 and was killed after 2 items.
    from pipeline.stage import Upstream, compute_fingerprint

    fp4 = compute_fingerprint(COUNT, CountParams(n=4), Upstream(tmp_path, {}), Plan())
    info["fingerprint"] = fp4
    (out / "run.json").write_text(json.dumps(info))
    calls.clear()
    r = run_stage(COUNT, CountParams(n=4), tmp_path)
    assert calls == ["v0002", "v0003"] and r.manifest["resumed"] and r.manifest["done"] == 4


def test_torn_journal_line_is_ignored(tmp_path):
    run_stage(COUNT, CountParams(n=2), tmp_path)
    out = tmp_path / "count"
    (out / "manifest.json").unlink()
    with open(out / "journal.jsonl", "a") as f:
        f.write('{"video": "v0002", "ok": tr')  # killed mid-write
    calls.clear()
    r = run_stage(COUNT, CountParams(n=2), tmp_path)
    assert calls == [] and r.manifest["done"] == 2


def test_failures_recorded_and_fatal_unless_allowed(tmp_path):
    with pytest.raises(StageFailures, match="v0001: bad item"):
        run_stage(COUNT, CountParams(n=3, fail="v0001"), tmp_path)
    m = json.loads((tmp_path / "count" / "manifest.json").read_text())
    assert not m["complete"] and m["failures"] == {"v0001": "bad item"} and m["done"] == 2
    # Downstream refuses an incomplete upstream.
    with pytest.raises(StageError, match="incomplete"):
        run_stage(SUM, SumParams(), tmp_path)
    # Re-running retries only the failed item; allowing failures completes the stage.
    calls.clear()
    r = run_stage(COUNT, CountParams(n=3, fail="v0001"), tmp_path, allow_failures=True)
    assert calls == ["v0001"] and r.manifest["complete"] and r.manifest["failed"] == 1


def test_missing_upstream_names_the_command(tmp_path):
    with pytest.raises(StageError, match="run `pipeline count` first"):
        run_stage(SUM, SumParams(), tmp_path)


def test_lock_refuses_second_run(tmp_path):
    with StageLock(tmp_path / "count.lock", "count"):
        with pytest.raises(StageLocked, match="being written by .*pid"):
            run_stage(COUNT, CountParams(), tmp_path)
    run_stage(COUNT, CountParams(), tmp_path)  # released


def test_status_downstream_stale_after_upstream_change(tmp_path):
    run_stage(COUNT, CountParams(), tmp_path)
    run_stage(SUM, SumParams(), tmp_path)
    rows = {r.key: r for r in status(tmp_path, [COUNT, SUM])}
    assert rows["count"].state == "fresh" and rows["sum"].state == "fresh"
    run_stage(COUNT, CountParams(scale=3), tmp_path)
    rows = {r.key: r for r in status(tmp_path, [COUNT, SUM])}
    assert rows["count"].state == "fresh"
    assert rows["sum"].state == "stale" and "upstream count changed" in rows["sum"].reason
    # Only the stale stage recomputes.
    r = run_stage(SUM, SumParams(), tmp_path)
    assert not r.skipped and (tmp_path / "sum" / "sum.txt").read_text() == str(3 * sum(range(5)))
    assert all(r.state == "fresh" for r in status(tmp_path, [COUNT, SUM]))


def test_status_missing_and_code_version_change(tmp_path):
    rows = {r.key: r for r in status(tmp_path, [COUNT, SUM])}
    assert rows["count"].state == rows["sum"].state == "missing"
    run_stage(COUNT, CountParams(), tmp_path)
    bumped = Stage("count", "2", CountParams, run=count_run)
    rows = {r.key: r for r in status(tmp_path, [bumped])}
    assert rows["count"].state == "stale" and "version changed" in rows["count"].reason


def test_incompatible_cache_format_is_refused(tmp_path):
    run_stage(COUNT, CountParams(), tmp_path)
    path = tmp_path / "count" / "manifest.json"
    m = json.loads(path.read_text())
    m["cache_format"] = CACHE_FORMAT + 7
    path.write_text(json.dumps(m))
    with pytest.raises(StageError, match="cache format"):
        run_stage(COUNT, CountParams(), tmp_path)


def test_noop_rerun_of_1000_videos_touches_nothing(tmp_path):
    run_stage(COUNT, CountParams(n=1000), tmp_path)
    out = tmp_path / "count"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    journal = (out / "journal.jsonl").read_bytes()
    calls.clear()
    r = run_stage(COUNT, CountParams(n=1000), tmp_path)
    assert r.skipped and calls == []  # the stage's run was not called
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # no file written or added
    assert (out / "journal.jsonl").read_bytes() == journal


def test_status_counts_journaled_videos_of_an_interrupted_run(tmp_path):
    run_stage(COUNT, CountParams(n=4, fail="v0003"), tmp_path, allow_failures=True)
    (tmp_path / "count" / "manifest.json").unlink()  # as if killed after journaling 3 successes, 1 failure
    row = {r.key: r for r in status(tmp_path, [COUNT])}["count"]
    assert row.state == "incomplete" and "resume" in row.reason
    assert (row.done, row.failed) == (3, 1)


def test_status_says_running_while_the_lock_is_held(tmp_path):
    import os
    import subprocess
    import sys

    run_stage(COUNT, CountParams(n=2), tmp_path)
    (tmp_path / "count" / "manifest.json").unlink()
    # Held in this process.
    with StageLock(tmp_path / "count.lock", "count"):
        row = {r.key: r for r in status(tmp_path, [COUNT])}["count"]
        assert row.state == "running" and f"running (pid {os.getpid()})" in row.reason and row.done == 2
        # Asking for the status must not drop our own lock (a POSIX lock is lost when any fd of it closes).
        with pytest.raises(StageLocked):
            run_stage(COUNT, CountParams(n=2), tmp_path)
    # Held by another process.
    code = ("import sys, time; from pathlib import Path; from pipeline.stage import StageLock\n"
            "with StageLock(Path(sys.argv[1]), 'count'):\n    print('held', flush=True); sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "count.lock")], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        row = {r.key: r for r in status(tmp_path, [COUNT])}["count"]
        assert row.state == "running" and f"running (pid {child.pid})" in row.reason
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    row = {r.key: r for r in status(tmp_path, [COUNT])}["count"]
    assert row.state == "incomplete"


TORCHRUN_SCRIPT = r'''
import sys, json
from dataclasses import dataclass
from pathlib import Path
from pipeline.stage import Stage, param, run_stage

@dataclass(frozen=True)
class P:
    n: int = param(10, "items")

def run(ctx, plan):
    for i in ctx.shard(range(ctx.params.n)):
        vid = f"v{i:03d}"
        if not ctx.journal.is_done(vid):
            (ctx.dir / f"{vid}.txt").write_text(f"{i * i} by rank {ctx.rank}")
            ctx.journal.record_ok(vid)
    return {"line": "toy done"}

r = run_stage(Stage("toy", "1", P, run=run), P(), Path(sys.argv[1]))
sys.stdout.write(f"RESULT {r.skipped} {r.manifest.get('done')}\n"); sys.stdout.flush()
'''


def test_torchrun_two_ranks_share_the_work(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "toy.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path / "cache")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("RESULT False 10") == 2
    out = tmp_path / "cache" / "toy"
    texts = {p.name: p.read_text() for p in out.glob("v*.txt")}
    assert len(texts) == 10 and texts["v003.txt"] == "9 by rank 1" and texts["v004.txt"] == "16 by rank 0"
    assert sorted(p.name for p in out.glob("journal*.jsonl")) == ["journal.jsonl", "journal.rank1.jsonl"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["done"] == 10 and m["world_size"] == 2
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and res.stdout.count("RESULT True 10") == 2  # fresh on every rank


def test_lock_is_held_across_processes_and_not_inherited_by_forked_children(tmp_path):
    import multiprocessing as mp

    def try_lock(path, q):
        try:
            with StageLock(path, "count"):
                q.put("acquired")
        except StageLocked:
            q.put("refused")

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    lock = StageLock(tmp_path / "count.lock", "count")
    lock.__enter__()
    p = ctx.Process(target=try_lock, args=(tmp_path / "count.lock", q))  # a forked child: another process
    p.start()
    p.join()
    assert q.get() == "refused"
    # A child forked while the lock is held (like a DataLoader worker) keeps no lock after the parent lets go.
    child = ctx.Process(target=time.sleep, args=(3,))
    child.start()
    lock.__exit__(None, None, None)
    p = ctx.Process(target=try_lock, args=(tmp_path / "count.lock", q))
    p.start()
    p.join()
    assert q.get() == "acquired"
    child.terminate()
