"""bench/gpu_check.py --smoke: every section runs (tiny, on the CPU), so the GPU check cannot rot.

The GPU machine's time is short; a check that breaks there on a renamed function costs a lease. Here every
section runs once in-process, and one section through the per-section subprocess the real check uses.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_runs_every_section_and_ends_with_the_goal_table(gpu_check, tmp_path, capsys):
    rc = gpu_check.main(["--smoke", "--inline", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, {k: v.get("error") for k, v in report["sections"].items()}
    assert set(report["sections"]) == set(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in report["sections"].values())
    r = report["sections"]
    assert r["flow"]["results"]["B2"]["pairs_per_s"] > 0
    assert r["features"]["results"]["end_to_end"]["inputs"] == 3 * 4 * 2  # videos x positions x streams
    assert r["features"]["results"]["threaded_vs_serial"]["identical"] is True
    assert r["finetune"]["results"]["flow"]["loader_per_s"] > 0
    assert r["heads"]["results"]["epoch"]["videos"] == 64
    assert r["train_net"]["results"]["plain"]["steps_per_s"] > 0 and r["train_net"]["results"]["test_video_s"] > 0
    assert "skipped" in r["tests"]["results"]["pytest"]["summary"]  # no GPU here: the CUDA tests skip
    # the goal table is the last thing printed, one row per goal, nothing judged in a smoke run
    table = out.rstrip().split("\n\n")[-1].splitlines()
    assert table[0] == "| goal | target | measured | verdict |"
    assert len(table) - 2 == len(report["goals"])
    assert not any(g["verdict"] in ("PASS", "FAIL") for g in report["goals"])
    assert (tmp_path / "gpu_check.md").read_text().endswith("\n".join(table) + "\n")


def test_a_failing_section_is_reported_and_the_others_still_run(gpu_check, tmp_path, monkeypatch, capsys):
    def boom(ctx):
        ctx.put("before", 1)
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.SECTIONS, "env", boom)
    rc = gpu_check.main(["--smoke", "--inline", "--sections", "env,heads", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1
    assert report["sections"]["env"]["status"] == "error" and "planted" in report["sections"]["env"]["error"]
    assert report["sections"]["env"]["results"] == {"before": 1}   # what it had recorded is kept
    assert report["sections"]["heads"]["status"] == "ok"
    assert {"goal": "section env", "target": "runs", "measured": "error", "verdict": "FAIL"} in report["goals"]


def test_sections_run_in_their_own_process(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections", "heads", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["heads"]["rc"] == 0
    assert report["sections"]["heads"]["results"]["epoch"]["train_videos_per_s"] > 0
    assert p.stdout.rstrip().splitlines()[-1].startswith("| CUDA tests")


def test_goal_verdicts_on_a_full_run(gpu_check):
    res = {"heads": {"status": "ok", "results": {"epoch": {"epoch_seconds_ucf101": 0.8}}},
           "finetune": {"status": "ok", "results": {"rgb": {"loader_over_model": 1.2},
                                                     "flow": {"loader_over_model": 2.0}}},
           "features": {"status": "timeout after 115 s", "results": {}}}
    rows = {g: (m, v) for g, t, m, v in gpu_check.goal_rows(res, smoke=False)}
    assert rows["STFN head epoch s (9,537 videos, N=7)"] == ("0.80", "PASS")
    assert rows["finetune rgb: loader / model rate"] == ("1.20", "FAIL")
    assert rows["finetune flow: loader / model rate"] == ("2.00", "PASS")
    assert rows["features end to end frames/s (R101 224, both streams)"] == ("not measured", "n/a")
    assert rows["section features"] == ("timeout after 115 s", "FAIL")


def test_flow_section_without_carried_data_uses_synthetic_pairs(gpu_check, tmp_path):
    rc = gpu_check.main(["--smoke", "--inline", "--sections", "flow", "--data", str(tmp_path / "absent.npz"),
                         "--out", str(tmp_path)])
    flow = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["flow"]
    assert rc == 0 and flow["results"]["data"].startswith("no ")
    assert "flyingchairs" not in flow["results"] and flow["results"]["B4"]["pairs_per_s"] > 0


def test_a_section_past_its_limit_is_killed_and_reported(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "SMOKE_LIMIT", 0.5)
    monkeypatch.setattr(gpu_check, "GRACE", 0)
    t0 = __import__("time").monotonic()
    rc = gpu_check.main(["--smoke", "--sections", "features", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and __import__("time").monotonic() - t0 < 30
    assert report["sections"]["features"]["status"].startswith("timeout after")
    assert {"goal": "section features", "target": "runs", "measured": report["sections"]["features"]["status"],
            "verdict": "FAIL"} in report["goals"]
