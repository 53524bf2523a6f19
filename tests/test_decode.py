"""The decode stage: real clips against OpenCV, official UCF101 splits, kill and resume, bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.stage import run_stage
from stages.cli import main
from pipeline.io.store import VideoStore, read_frames
from pipeline.data.table import VideoTable
from stages.decode import STAGE, DecodeParams
from tests.videos import make_csv_dataset, write_video

REPO = Path(__file__).resolve().parents[1]


def cv2_frames(path):
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            return out, cap.get(cv2.CAP_PROP_FPS)
        out.append(f)


def test_real_clips_against_opencv(tmp_path, shared_data):
    clips = sorted((shared_data / "clips").rglob("*.avi")) + sorted((shared_data / "clips").rglob("*.mp4"))
    lines = ["path,label,split"] + [f"{p},{p.parent.name},train" for p in clips]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.csv").write_text("\n".join(lines) + "\n")
    r = run_stage(STAGE, DecodeParams(dataset="csv", root=tmp_path / "data", short_side=128, workers=1,
                                      frame_codec="raw"), tmp_path / "cache")
    table = VideoTable.load(tmp_path / "cache" / "decode")
    store = VideoStore(tmp_path / "cache" / "decode" / "frames", "zarr")
    assert len(table) == len(clips) == r.manifest["done"]
    for vid, src, n, fps, (h, w) in zip(table.video_ids, table.sources, table.num_frames, table.fps, table.sizes):
        ref, ref_fps = cv2_frames(src)
        assert n == len(ref), src  # frame count from an independent decoder
        assert fps == pytest.approx(ref_fps, rel=1e-3)
        H, W = ref[0].shape[:2]
        assert min(h, w) == 128 and abs(w / h - W / H) < 0.02
        # Content: OpenCV's frame 10, resized the same way, agrees with ours up to resampling differences.
        ours = read_frames(store, vid, [10]).numpy()[0].astype(np.float32)
        theirs = cv2.resize(ref[10], (w, h), interpolation=cv2.INTER_AREA)[..., ::-1].astype(np.float32)
        assert np.abs(ours - theirs).mean() < 4.0, src


def test_ucf101_layout_with_official_split_files(tmp_path, shared_data):
    root = tmp_path / "UCF-101"
    for clip in (shared_data / "clips" / "ucf101").glob("*.avi"):
        cls = clip.stem.split("_")[1]
        (root / cls).mkdir(parents=True)
        shutil.copy(clip, root / cls / clip.name)
    splits = shared_data / "splits" / "ucf101"
    runner = CliRunner()
    args = ["decode", "--dataset", "ucf101", "--root", str(root), "--splits", str(splits), "--short-side", "64",
            "--cache-dir", str(tmp_path / "cache"), "--max-frames", "8", "--workers", "1"]
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "13318 videos" in res.output and "missing" in res.output
    assert "v_ApplyEyeMakeup_g" in res.output and "allow-missing" in res.output
    res = runner.invoke(main, args + ["--allow-missing"])
    assert res.exit_code == 0, res.output
    table = VideoTable.load(tmp_path / "cache" / "decode")
    assert table.video_ids == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "BaseballPitch/v_BaseballPitch_g01_c01"]
    assert len(table.classes) == 101 and table.labels == [0, 6]  # classInd: 1 ApplyEyeMakeup, 7 BaseballPitch
    assert set(table.splits) == {"1", "2", "3"}
    assert table.splits["1"] == ["test", "test"] and table.splits["2"] == ["train", "train"]
    assert len(table.missing["1"]) == 13320 - 2


def test_kill_and_resume_gives_identical_output(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=12, num_frames=30)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages", "decode", "--dataset", "csv", "--root", str(data),
           "--short-side", "32", "--workers", "1", "--cache-dir", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "killed" / "decode" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(journal.read_text().splitlines())
    assert 3 <= done_before < 24, "the run must be killed mid-stage"
    assert not (tmp_path / "killed" / "decode" / "manifest.json").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    clean = run_stage(STAGE, DecodeParams(dataset="csv", root=data, short_side=32, workers=1), tmp_path / "clean")
    assert clean.manifest["done"] == 24
    t_killed = VideoTable.load(tmp_path / "killed" / "decode")
    t_clean = VideoTable.load(tmp_path / "clean" / "decode")
    assert t_killed == t_clean
    a = VideoStore(tmp_path / "killed" / "decode" / "frames")
    b = VideoStore(tmp_path / "clean" / "decode" / "frames")
    assert a.video_ids() == b.video_ids() and len(a.video_ids()) == 24
    for vid in a.video_ids():
        assert np.array_equal(read_frames(a, vid).numpy(), read_frames(b, vid).numpy()), vid
    assert not list((tmp_path / "killed").rglob(".tmp-*"))


def test_bad_videos_are_recorded_and_the_rest_processed(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=2, num_frames=8)
    # An unreadable file, a truncated video (header only) and an empty file, all listed.
    (data / "Alpha" / "v_Alpha_g09_c01.avi").write_bytes(b"this is not a video")
    good = (data / "Beta" / "v_Beta_g01_c01.avi").read_bytes()
    (data / "Beta" / "v_Beta_g08_c01.avi").write_bytes(good[:400])
    (data / "Beta" / "v_Beta_g09_c01.avi").write_bytes(b"")
    with open(data / "list.csv", "a") as f:
        f.write("Alpha/v_Alpha_g09_c01.avi,Alpha,train\nBeta/v_Beta_g08_c01.avi,Beta,train\n"
                "Beta/v_Beta_g09_c01.avi,Beta,train\n")
    runner = CliRunner()
    args = ["decode", "--dataset", "csv", "--root", str(data), "--short-side", "32", "--workers", "1",
            "--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(main, args)
    assert res.exit_code == 1
    assert "3 video(s) failed" in res.output and "Alpha/v_Alpha_g09_c01" in res.output
    assert "--allow-failures" in res.output
    m = json.loads((tmp_path / "cache" / "decode" / "manifest.json").read_text())
    assert m["done"] == 4 and m["failed"] == 3 and not m["complete"]
    assert "v_Beta_g09_c01.avi" in m["failures"]["Beta/v_Beta_g09_c01"]  # the reason names the file
    res = runner.invoke(main, args + ["--allow-failures"])
    assert res.exit_code == 0 and "4 videos (3 failed)" in res.output


@pytest.mark.parametrize("case", ["missing_root", "missing_split_file", "unknown_dataset", "missing_csv"])
def test_bad_input_is_refused_before_work(tmp_path, case):
    runner = CliRunner()
    cache = tmp_path / "cache"
    if case == "missing_root":
        args, expect = ["--dataset", "folder", "--root", str(tmp_path / "nope")], "nope"
    elif case == "missing_split_file":
        (tmp_path / "ucf" / "ApplyEyeMakeup").mkdir(parents=True)
        (tmp_path / "splits").mkdir()
        args, expect = ["--dataset", "ucf101", "--root", str(tmp_path / "ucf"), "--splits",
                        str(tmp_path / "splits")], "classInd.txt"
    elif case == "unknown_dataset":
        args, expect = ["--dataset", "youtube8m", "--root", str(tmp_path)], "youtube8m"
    else:
        (tmp_path / "d").mkdir()
        args, expect = ["--dataset", "csv", "--root", str(tmp_path / "d")], "list.csv"
    res = runner.invoke(main, ["decode", *args, "--cache-dir", str(cache)])
    assert res.exit_code == 2 and expect in res.output
    assert not (cache / "decode").exists()  # nothing started


def test_incompatible_cache_and_config_file(tmp_path):
    make_csv_dataset(tmp_path / "data", videos_per_class=1, num_frames=6)
    conf = tmp_path / "c.toml"
    conf.write_text('[pipeline]\ncache_dir = "cache"\n\n[decode]\ndataset = "csv"\nroot = "data"\n'
                    'short-side = 32\nworkers = 1\n')
    runner = CliRunner()
    res = runner.invoke(main, ["decode", "--config", str(conf)])
    assert res.exit_code == 0, res.output
    table = VideoTable.load(tmp_path / "cache" / "decode")
    assert table.sizes[0] == [32, 42]  # 64x48 -> short side 32, width 42.67 -> even 42
    res = runner.invoke(main, ["decode", "--config", str(conf), "--short-side", "40"])  # CLI overrides config
    assert res.exit_code == 0 and VideoTable.load(tmp_path / "cache" / "decode").sizes[0] == [40, 52]
    m = tmp_path / "cache" / "decode" / "manifest.json"
    m.write_text(m.read_text().replace('"cache_format": 1', '"cache_format": 0'))
    res = runner.invoke(main, ["decode", "--config", str(conf)])
    assert res.exit_code == 2 and "cache format" in res.output
    conf.write_text('[decode]\nshort_sides = 3\n')
    res = runner.invoke(main, ["decode", "--config", str(conf)])
    assert res.exit_code == 2 and "unknown parameter 'short_sides'" in res.output


def test_status_command_reports_decode(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=1, num_frames=6)
    runner = CliRunner()
    base = ["--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(main, ["status", *base])
    assert res.exit_code == 0 and "decode" in res.output and "missing" in res.output
    runner.invoke(main, ["decode", "--dataset", "csv", "--root", str(data), "--workers", "1", "--short-side",
                         "32", *base])
    res = runner.invoke(main, ["status", *base])
    line = next(x for x in res.output.splitlines() if x.startswith("decode"))
    assert "fresh" in line and " 2 " in line


def test_decode_plan_for_1000_videos_opens_no_video(tmp_path, monkeypatch):
    # The no-op check of a finished decode costs one dataset listing plus a stat per file: no video is opened.
    root = tmp_path / "data"
    src = root / "A" / "v_A_g01_c01.avi"
    write_video(src, num_frames=4)
    rows = ["path,label,split"]
    for i in range(1000):
        p = root / "A" / f"v_A_g{i:03d}_c02.avi"
        os.link(src, p)
        rows.append(f"A/{p.name},A,train")
    (root / "list.csv").write_text("\n".join(rows))
    from pipeline.stage import Upstream
    import av

    opened, stats, real_stat = [], [], os.stat

    def counting_stat(path, *a, **kw):
        if str(path).endswith(".avi"):
            stats.append(str(path))
        return real_stat(path, *a, **kw)

    def no_open(*a, **kw):
        opened.append(a)
        raise AssertionError(f"plan opened a video: {a}")

    monkeypatch.setattr(av, "open", no_open)
    monkeypatch.setattr(cv2, "VideoCapture", no_open)
    monkeypatch.setattr(os, "stat", counting_stat)
    plan = STAGE.plan(DecodeParams(dataset="csv", root=root), Upstream(tmp_path, {}))
    monkeypatch.undo()
    assert len(plan.data) == 1000 and opened == []
    # The input digest sees every file: at least one stat each, and a changed file changes the digest.
    assert set(stats) >= {str(root / "A" / f"v_A_g{i:03d}_c02.avi") for i in range(1000)}
    (root / "A" / "v_A_g007_c02.avi").unlink()
    write_video(root / "A" / "v_A_g007_c02.avi", num_frames=5)
    again = STAGE.plan(DecodeParams(dataset="csv", root=root), Upstream(tmp_path, {}))
    assert again.inputs_digest != plan.inputs_digest


# ---------------------------------------------------------------- completeness and missing videos (issue 12)

def test_truncated_video_is_a_failure_or_stored_as_truncated(tmp_path, shared_data):
    src = shared_data / "clips" / "ucf101" / "v_BaseballPitch_g01_c01.avi"
    data = tmp_path / "data"
    data.mkdir()
    whole = src.read_bytes()
    (data / "cut.avi").write_bytes(whole[: int(len(whole) * 0.3)])
    shutil.copy(src, data / "whole.avi")
    (data / "list.csv").write_text("path,label\ncut.avi,Pitch\nwhole.avi,Pitch\n")
    args = ["decode", "--dataset", "csv", "--root", str(data), "--short-side", "32", "--workers", "1",
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    m = json.loads((tmp_path / "cache" / "decode" / "manifest.json").read_text())
    assert m["done"] == 1 and m["failed"] == 1
    assert re.search(r"cut\.avi: .*decoded \d+ of 107 declared frames", m["failures"]["cut"])  # header: 107
    res = CliRunner().invoke(main, args + ["--allow-truncated"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "cache" / "decode" / "manifest.json").read_text())
    assert m["failed"] == 0 and list(m["summary"]["truncated"]) == ["cut"]
    journal = [json.loads(line) for line in (tmp_path / "cache" / "decode" / "journal.jsonl").read_text().splitlines()]
    rec = [r for r in journal if r["video"] == "cut" and r.get("ok")][-1]
    assert "of 107 declared frames" in rec["truncated"] and rec["declared_frames"] == 107
    with VideoStore(tmp_path / "cache" / "decode" / "frames", "zarr").reader("cut") as c:
        assert c.attrs["truncated"] == rec["truncated"] and c.attrs["num_frames"] == rec["num_frames"] < 107
    assert "1 stored truncated" in res.output
    st = CliRunner().invoke(main, ["status", "--cache-dir", str(tmp_path / "cache")])
    row = next(line for line in st.output.splitlines() if line.startswith("decode "))
    assert "fresh" in row and "1 video(s) stored truncated (cut;" in row


def test_missing_videos_are_summarised_in_one_line_and_listed_in_a_file(tmp_path, caplog):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=1, num_frames=6)
    gone = [f"Alpha/v_Alpha_g{g:02d}_c01.avi" for g in range(20, 32)]
    with open(data / "list.csv", "a") as f:
        f.writelines(f"{g},Alpha,train\n" for g in gone)
    caplog.set_level("WARNING", logger="pipeline")
    run_stage(STAGE, DecodeParams(dataset="csv", root=data, short_side=32, workers=1, allow_missing=True),
              tmp_path / "cache")
    lines = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("12 videos listed in the split files are missing on disk")
    assert gone[0] in lines[0] and gone[-1] not in lines[0]  # the first few only
    assert (tmp_path / "cache" / "decode" / "missing.txt").read_text().split() == sorted(gone)


def test_csv_label_options_reach_the_loader(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=1, num_frames=6)
    rows = (data / "list.csv").read_text().splitlines()[1:]
    (data / "list.csv").write_text("".join(f"{r.split(',')[0]},{0 if 'Alpha' in r else 1}\n" for r in rows))
    (data / "classes.txt").write_text("Alpha\nBeta\n")
    r = run_stage(STAGE, DecodeParams(dataset="csv", root=data, short_side=32, workers=1, labels="indices",
                                      classes=data / "classes.txt"), tmp_path / "cache")
    assert VideoTable.load(tmp_path / "cache" / "decode").classes == ["Alpha", "Beta"] and r.manifest["done"] == 2
    res = CliRunner().invoke(main, ["decode", "--dataset", "demo", "--labels", "indices",
                                    "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "labels (--labels) do not apply to dataset kind 'demo'" in res.output
