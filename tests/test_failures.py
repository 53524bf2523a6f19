"""What goes wrong on a real machine (issue 27, items 6-14): a full disk, a read-only cache, a dangling symlink or a
fifo among the videos, a video too short for flow, a decode worker killed by the out-of-memory killer, a frame size
that changes mid-stream, a quoted number in a TOML file, and the wording of `status` and `runs`. Tiny synthetic
videos (tests/videos.py); predict's cases are in test_predict.py, the kept import in test_rawframes.py."""
from __future__ import annotations

import builtins
import errno
import os
import re
import stat
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.data.annotations import DatasetError, load_dataset
from pipeline.data.table import VideoTable
from pipeline.data.video import VideoDecodeError, decode_video
from pipeline.io import artifacts
from pipeline.io.store import ContainerWriter, read_frames
from pipeline.stage import StageError, StageFailures, read_records, run_stage, runcache, status
from pipeline.stage.errors import CacheReadOnly, DiskFull
from pipeline.stage.journal import journal_files
from pipeline.stage.lock import StageLock
from pipeline.stage.verify import VerifyReport, mark_for_redo
from stages import all_stages
from stages.cli import main
from stages.decode import STAGE as DECODE, DecodeParams
from stages.extract_flow import STAGE as FLOW, FlowParams
from stages.finetune import STAGE as FINETUNE, FinetuneParams
from tests.videos import make_csv_dataset, write_video

# A light TV-L1 (one scale, few iterations): the flow only needs to exist.
LIGHT_FLOW = dict(nscales=1, warps=1, inner_iterations=3, outer_iterations=1, fast=False, device="cpu")
ROOT_SKIP = ("running as root (or with CAP_DAC_OVERRIDE): chmod a-w does not stop this process writing; "
             "test_a_cache_that_refuses_every_write covers the logic")


def dataset(tmp_path: Path, per_class: int = 3, frames: int = 6, size=(32, 24)) -> Path:
    return make_csv_dataset(tmp_path / "data", videos_per_class=per_class, num_frames=frames, size=size)


def ids_of(data: Path) -> list[str]:
    """The decode ids of a CSV dataset's videos (their paths without extension), in decode's order."""
    return sorted(str(p.relative_to(data).with_suffix("")) for p in data.rglob("*.avi"))


def params(data: Path, **kw) -> DecodeParams:
    return DecodeParams(dataset="csv", root=data, short_side=0, **{"workers": 1, **kw})


def decode_cli(data: Path, cache: Path, *extra: str):
    return CliRunner().invoke(main, ["decode", "--dataset", "csv", "--root", str(data), "--short-side", "0",
                                     "--workers", "1", "--cache-dir", str(cache), *extra])


def disk_size(path: Path) -> int:
    """Bytes on disk of a folder (du's figure: allocated blocks)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------------------------------------
# 6. A full disk
# ----------------------------------------------------------------------------------------------------------

def test_disk_full_stops_at_the_first_enospc_and_the_rerun_resumes(tmp_path, monkeypatch):
    data, cache = dataset(tmp_path), tmp_path / "cache"
    ids = ids_of(data)
    real, writes = ContainerWriter.write_images, []

    def full_on_the_third(self, *a, **kw):
        writes.append(1)
        if len(writes) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(ContainerWriter, "write_images", full_on_the_third)
    with pytest.raises(DiskFull) as err:
        run_stage(DECODE, params(data), cache)
    msg = str(err.value)
    assert "errno 28" in msg and f"decode/frames/{ids[2]}.zarr" in msg, msg  # the path being written
    assert "the rest of the run needs about" in msg and "`pipeline gc --yes`" in msg, msg
    assert len(writes) == 3  # stopped at once: the three other videos were never tried
    done, failed = read_records(journal_files(cache / "decode"))
    assert sorted(done) == ids[:2] and failed == {}  # no per-video failure for the videos after it

    monkeypatch.undo()  # space freed: the re-run resumes and matches an uninterrupted run
    r = run_stage(DECODE, params(data), cache)
    assert r.manifest.complete and r.manifest.done == 6 and r.manifest["resumed"]
    run_stage(DECODE, params(data), tmp_path / "reference")
    ours, ref = artifacts.frame_store(cache / "decode"), artifacts.frame_store(tmp_path / "reference" / "decode")
    for vid in ids:
        np.testing.assert_array_equal(read_frames(ours, vid).numpy(), read_frames(ref, vid).numpy())


def test_free_space_is_checked_before_work_but_not_for_a_fresh_output(tmp_path, monkeypatch):
    data, cache = dataset(tmp_path), tmp_path / "cache"
    monkeypatch.setattr("pipeline.stage.space.free_bytes", lambda path: 1000)
    res = decode_cli(data, cache)
    assert res.exit_code == 2, res.output
    assert f"not enough disk space in {cache}: decode needs about 16.0 MiB, 1000 B free" in res.output
    assert "`pipeline gc`" in res.output and not (cache / "decode").exists()  # nothing started
    monkeypatch.undo()
    assert run_stage(DECODE, params(data), cache).manifest.complete
    monkeypatch.setattr("pipeline.stage.space.free_bytes", lambda path: 0)
    assert run_stage(DECODE, params(data), cache).skipped  # a fresh output writes nothing and needs no space


def test_zero_bytes_free_is_a_clear_error_not_a_traceback_from_the_lock(tmp_path, monkeypatch):
    data, cache = dataset(tmp_path, per_class=1), tmp_path / "cache"

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)  # the lock file's "pid N on host since ..." line
    monkeypatch.setattr("pipeline.stage.space.free_bytes", lambda path: 0)
    with StageLock(tmp_path / "x.lock", "x"):  # held without its line
        assert (tmp_path / "x.lock").read_text() == ""
    res = decode_cli(data, cache)
    assert res.exit_code == 2 and "not enough disk space" in res.output and "0 B free" in res.output, res.output
    assert isinstance(res.exception, SystemExit)  # an error message, no traceback


def test_the_projection_stops_decode_before_the_disk_fills(tmp_path, monkeypatch):
    """After two videos, what they took per byte of source video times the source bytes left exceeds the free
    space: decode stops there, naming the bytes the rest needs (computed here from the files on disk)."""
    data, cache = dataset(tmp_path), tmp_path / "cache"
    ids = ids_of(data)
    asked = []

    def free(path):  # plenty for the check before work, then one byte
        asked.append(path)
        return 10 ** 12 if len(asked) == 1 else 1

    monkeypatch.setattr("pipeline.stage.space.free_bytes", free)
    with pytest.raises(DiskFull, match=r"for the rest of decode: the frames of the 4 video\(s\) left need about") \
            as err:
        run_stage(DECODE, params(data), cache)
    done, failed = read_records(journal_files(cache / "decode"))
    assert sorted(done) == ids[:2] and not failed
    src = {v: (data / f"{v}.avi").stat().st_size for v in ids}
    written = sum(disk_size(cache / "decode" / "frames" / f"{v}.zarr") for v in ids[:2])
    expected = written / (src[ids[0]] + src[ids[1]]) * sum(src[v] for v in ids[2:])
    shown = re.search(r"need about ([\d.]+) KiB", str(err.value))
    assert shown and float(shown.group(1)) == pytest.approx(expected / 1024, abs=0.06), str(err.value)


# ----------------------------------------------------------------------------------------------------------
# 7. A read-only cache
# ----------------------------------------------------------------------------------------------------------

def _decoded_with_flow(tmp_path: Path) -> tuple[Path, Path]:
    data, cache = dataset(tmp_path, per_class=2), tmp_path / "cache"
    run_stage(DECODE, params(data), cache)
    run_stage(FLOW, FlowParams(**LIGHT_FLOW), cache)
    return data, cache


def _damage_a_chunk(cache: Path) -> str:
    vid = VideoTable.load(cache / "decode").video_ids[0]
    chunk = next(p for p in (cache / "decode" / "frames" / f"{vid}.zarr").rglob("c/*") if p.is_file())
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    return vid


def _check_read_only_cache(data: Path, cache: Path, damaged: str) -> None:
    """status, verify's listing and fresh no-ops work; a run that must write says the cache is read-only."""
    rows = {r.key: r for r in status(cache, all_stages())}
    assert rows["decode"].state == "fresh" and rows["extract-flow"].state == "fresh"
    assert run_stage(DECODE, params(data), cache).skipped
    assert run_stage(FLOW, FlowParams(**LIGHT_FLOW), cache).skipped
    res = CliRunner().invoke(main, ["verify", "--stage", "decode", "--cache-dir", str(cache)])
    assert res.exit_code == 1 and f"{damaged}: " in res.output and "cache is read-only" in res.output, res.output
    with pytest.raises(CacheReadOnly, match=r"cache is read-only: .*decode\.lock.*decode is not fresh"):
        run_stage(DECODE, params(data, max_frames=3), cache)
    res = CliRunner().invoke(main, ["status", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and "fresh" in res.output


def _chmod_stops_writes(folder: Path) -> bool:
    """Whether a file made read-only by chmod refuses this process's writes (not for root, nor CAP_DAC_OVERRIDE)."""
    probe = folder / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        with open(probe, "a"):
            return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o644)
        probe.unlink()


def test_a_chmod_read_only_cache(tmp_path):
    if not _chmod_stops_writes(tmp_path):
        pytest.skip(ROOT_SKIP)
    data, cache = _decoded_with_flow(tmp_path)
    vid = _damage_a_chunk(cache)
    paths = [cache, *cache.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        _check_read_only_cache(data, cache, vid)
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_cache_that_refuses_every_write(tmp_path, monkeypatch, code):
    """Every open for writing under the cache (lock files included) fails as on a read-only mount (EROFS) or
    without permission (EACCES); reading works."""
    data, cache = _decoded_with_flow(tmp_path)
    vid = _damage_a_chunk(cache)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    under = str(cache)

    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))

    def guarded_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(under) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *a, **kw)

    def guarded_os_open(path, flags, *a, **kw):
        if str(path).startswith(under) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **kw)

    def guarded_mkdir(path, *a, **kw):
        if str(path).startswith(under):
            refuse(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    _check_read_only_cache(data, cache, vid)


# ----------------------------------------------------------------------------------------------------------
# 8. A dangling symlink, a fifo
# ----------------------------------------------------------------------------------------------------------

def test_dangling_symlink_and_fifo_in_a_folder_dataset(tmp_path):
    root, cache = tmp_path / "videos", tmp_path / "cache"
    for cls in ("Alpha", "Beta"):
        for g in (1, 2):
            write_video(root / cls / f"v_{cls}_g{g:02d}_c01.avi", num_frames=4, size=(32, 24))
    os.symlink(tmp_path / "gone.avi", root / "Alpha" / "v_Alpha_g03_c01.avi")
    os.mkfifo(root / "Beta" / "v_Beta_g03_c01.avi")
    with pytest.raises(StageError) as err:
        run_stage(DECODE, DecodeParams(dataset="folder", root=root, short_side=0, workers=1), cache)
    msg = str(err.value)
    assert f"Alpha/v_Alpha_g03_c01.avi (dangling symlink -> {tmp_path / 'gone.avi'})" in msg, msg
    assert "Beta/v_Beta_g03_c01.avi (not a regular file (a fifo))" in msg and "--allow-missing" in msg, msg
    r = run_stage(DECODE, DecodeParams(dataset="folder", root=root, short_side=0, workers=1, allow_missing=True),
                  cache)
    assert r.manifest.complete and r.manifest.done == 4
    listed = (cache / "decode" / "missing.txt").read_text()
    assert "dangling symlink ->" in listed and "not a regular file (a fifo)" in listed
    # A fifo named by a CSV list is not a regular file either (not "file not found"), nor to the decoder.
    (root / "list.csv").write_text("path,label,split\nAlpha/v_Alpha_g01_c01.avi,Alpha,train\n"
                                   "Beta/v_Beta_g03_c01.avi,Beta,test\n")
    with pytest.raises(DatasetError, match=r"Beta/v_Beta_g03_c01\.avi \(not a regular file \(a fifo\)\)"):
        load_dataset("csv", root)
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        decode_video(root / "Beta" / "v_Beta_g03_c01.avi")


# ----------------------------------------------------------------------------------------------------------
# 9. A video too short for flow, in finetune --stream flow
# ----------------------------------------------------------------------------------------------------------

def test_finetune_flow_leaves_out_the_videos_extract_flow_failed(tmp_path):
    data, cache = dataset(tmp_path, frames=6, size=(48, 32)), tmp_path / "cache"
    write_video(data / "Alpha" / "v_Alpha_g09_c01.avi", num_frames=1, size=(48, 32), seed=9)
    with open(data / "list.csv", "a") as f:
        f.write("Alpha/v_Alpha_g09_c01.avi,Alpha,train\n")
    run_stage(DECODE, params(data), cache)
    flow = run_stage(FLOW, FlowParams(**LIGHT_FLOW), cache, allow_failures=True)  # the failure accepted
    assert list(flow.manifest.failures) == ["Alpha/v_Alpha_g09_c01"]
    r = run_stage(FINETUNE, FinetuneParams(stream="flow", arch="resnet18", input_size=32, weights="none",
                                           batch_size=4, segments=2, val_frames=2, num_test_frames=2, workers=0,
                                           dropout=0.0, epochs=1, device="cpu"), cache)
    assert r.manifest.complete and not r.manifest.failures  # no --allow-failures needed
    left = r.manifest.summary["left_out"]
    assert list(left) == ["Alpha/v_Alpha_g09_c01"] and left["Alpha/v_Alpha_g09_c01"].startswith("too short: 1 frame")
    assert "1 video(s) without flow left out" in r.manifest.summary["line"]
    log = (cache / r.key / "log.txt").read_text()
    assert "Alpha/v_Alpha_g09_c01: left out, it has no flow (extract-flow: too short" in log


# ----------------------------------------------------------------------------------------------------------
# 12. A decode worker killed by the out-of-memory killer
# ----------------------------------------------------------------------------------------------------------

def test_a_killed_worker_is_retried_alone_then_recorded_naming_the_signal(tmp_path, monkeypatch):
    import stages.decode
    from tests.fakes import decode_or_die

    data, cache = dataset(tmp_path, per_class=2), tmp_path / "cache"
    write_video(data / "Beta" / "v_oom_g05_c01.avi", num_frames=6, size=(32, 24), seed=5)
    with open(data / "list.csv", "a") as f:
        f.write("Beta/v_oom_g05_c01.avi,Beta,train\n")
    monkeypatch.setattr(stages.decode, "_decode_one", decode_or_die)  # SIGKILLs its worker on v_oom
    with pytest.raises(StageFailures, match=r"Beta/v_oom_g05_c01: worker killed by SIGKILL \(out of memory\?\)"):
        run_stage(DECODE, params(data, workers=2), cache)
    done, failed = read_records(journal_files(cache / "decode"))
    assert sorted(done) == [v for v in ids_of(data) if "oom" not in v]  # the others decoded, the run went on
    assert failed == {"Beta/v_oom_g05_c01": "worker killed by SIGKILL (out of memory?)"}
    assert "a worker process died" in (cache / "decode" / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------------------
# 14. Smaller ones
# ----------------------------------------------------------------------------------------------------------

def write_size_change(path: Path, sizes=((64, 48), (32, 32)), per_size: int = 4) -> None:
    """An MJPEG AVI whose frames are ``per_size`` frames of each size in turn (each JPEG has its own size), frame
    ``i`` a uniform grey of value 40 * (i % per_size)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = sizes[0][0], sizes[0][1], "yuvj420p"
        t = 0
        for w, h in sizes:
            enc = av.CodecContext.create("mjpeg", "w")
            enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuvj420p", Fraction(1, 10)
            for i in range(per_size):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")
                for pkt in enc.encode(frame.reformat(format="yuvj420p")):
                    pkt.stream, pkt.pts, pkt.dts = s, t, t
                    c.mux(pkt)
                t += 1


def test_a_frame_size_change_mid_stream_is_recorded(tmp_path, caplog):
    data = tmp_path / "data"
    (data / "Alpha").mkdir(parents=True)
    write_size_change(data / "Alpha" / "v_Alpha_g01_c01.avi")
    video = decode_video(data / "Alpha" / "v_Alpha_g01_c01.avi", short_side=0)
    assert video.frames.shape == (8, 48, 64, 3)  # every frame at the first frame's size
    assert np.abs(video.frames[6].astype(int) - 80).max() <= 3  # the 32x32 grey frame, stretched
    assert video.size_changes == ["frame 4: 64x48 -> 32x32 (stored at 64x48, the first frame's)"]
    (data / "list.csv").write_text("path,label,split\nAlpha/v_Alpha_g01_c01.avi,Alpha,train\n")
    with caplog.at_level("WARNING", logger="pipeline"):
        run_stage(DECODE, params(data), tmp_path / "cache")
    assert "frame size changes mid-stream: frame 4: 64x48 -> 32x32" in caplog.text
    done, _ = read_records(journal_files(tmp_path / "cache" / "decode"))
    assert done["Alpha/v_Alpha_g01_c01"]["size_changes"] == video.size_changes
    with artifacts.frame_store(tmp_path / "cache" / "decode").reader("Alpha/v_Alpha_g01_c01") as r:
        assert list(r.attrs["size_changes"]) == video.size_changes


@pytest.mark.parametrize("table,line,key", [("decode", 'max_frames = "3"', "max_frames"),
                                            ("decode", 'jpeg-quality = "90"', "jpeg-quality"),
                                            ("pipeline", 'split = "1"', "split")])
def test_a_quoted_number_in_toml_is_refused_naming_the_key_and_file(tmp_path, table, line, key):
    config = tmp_path / "c.toml"
    config.write_text(f"[{table}]\n{line}\n")
    cmd = ["decode"] if table == "decode" else ["extract-features"]
    res = CliRunner().invoke(main, [*cmd, "--config", str(config), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and f"in {config} [{table}] {key})" in res.output, res.output
    assert "is a string" in res.output and "without quotes" in res.output


def test_status_says_videos_damaged_by_verify(tmp_path):
    data, cache = dataset(tmp_path, per_class=1), tmp_path / "cache"
    run_stage(DECODE, params(data), cache)
    vid = ids_of(data)[0]
    mark_for_redo(cache, VerifyReport("decode", 2, {vid: "frames/jpeg: checksum mismatch"}))
    row = {r.key: r for r in status(cache, all_stages())}["decode"]
    assert row.state == "incomplete" and row.reason.startswith("1 videos missing/damaged (found by verify)")
    assert "failures not allowed" not in row.reason


def test_runs_shows_output_parameters_only_and_no_unset_without_a_current_run(tmp_path):
    data, cache = dataset(tmp_path, per_class=1), tmp_path / "cache"
    run_stage(DECODE, params(data, workers=1), cache)
    run_stage(DECODE, params(data, workers=2, max_frames=4), cache)
    out = CliRunner().invoke(main, ["runs", "decode", "--cache-dir", str(cache)]).output
    kept = [ln for ln in out.splitlines() if ln.startswith("  decode")]
    assert len(kept) == 1 and kept[0].endswith("max_frames 4 -> 0"), out  # workers changes no output
    runcache.stash(cache, "decode")  # no current run
    out = CliRunner().invoke(main, ["runs", "decode", "--cache-dir", str(cache)]).output
    assert "<unset>" not in out and out.count("no current run to compare with") == 2, out
