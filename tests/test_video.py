"""Decode completeness (issue 12): a cut download is a failure naming the file and the counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.video import VideoDecodeError, VideoTruncated, decode_video, shortfall


def _cut(src: Path, dst: Path, fraction: float = 0.3) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _mkv(path: Path, frames: int = 60, fps: int = 25) -> Path:
    """A 64x48 MPEG-4 Matroska file written with PyAV: its header declares a duration, not a frame count."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def _faststart_mp4(src: Path, path: Path, frames: int = 60) -> Path:
    """The first ``frames`` frames of a real clip as H.264 MP4 with its index (moov) at the front."""
    import av

    with av.open(str(src)) as inp, av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 160, 96, "yuv420p"
        s.options = {"preset": "ultrafast"}
        for n, frame in enumerate(inp.decode(video=0)):
            if n == frames:
                break
            frame = frame.reformat(width=160, height=96, format="yuv420p")
            frame.pts = None
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def test_shortfall_hand_cases():
    assert shortfall(60, 60, "frame count", None, tolerance=0.05) is None
    assert shortfall(57, 60, "frame count", None, tolerance=0.05) is None  # 3 <= 0.05 * 60
    assert shortfall(56, 60, "frame count", None, tolerance=0.05) == "decoded 56 of 60 declared frames (frame count)"
    assert shortfall(1, 60, "frame count", "InvalidDataError: x", tolerance=0.05) == \
        "decoded 1 of 60 declared frames (frame count) (decoding stopped at: InvalidDataError: x)"
    # duration x rate is an estimate: one frame of rounding slack on top of the tolerance
    assert shortfall(19, 20, "duration x rate", None, tolerance=0.0) is None
    assert shortfall(18, 20, "duration x rate", None, tolerance=0.0) is not None
    assert shortfall(10, 60, "frame count", None, tolerance=0.05, max_frames=10) is None  # asked for 10
    assert shortfall(8, 60, "frame count", None, tolerance=0.05, max_frames=10) == \
        "decoded 8 of 10 declared frames (frame count)"
    assert shortfall(5, 0, "", None, tolerance=0.05) is None  # nothing declared, nothing wrong met
    assert "declares no frame count" in shortfall(5, 0, "", "EOFError: cut", tolerance=0.05)


@pytest.mark.parametrize("name", ["kinetics/test.mp4", "kinetics/arm_wrestling_demo.mp4",
                                  "ucf101/v_ApplyEyeMakeup_g01_c01.avi", "ucf101/v_BaseballPitch_g01_c01.avi"])
def test_first_30_percent_of_a_real_clip_is_a_failure(shared_data, tmp_path, name):
    src = shared_data / "clips" / name
    full = decode_video(src, short_side=0)
    assert full.declared == len(full.frames)  # a whole file declares what it holds
    cut = _cut(src, tmp_path / src.name)
    with pytest.raises(VideoDecodeError, match=str(cut)):  # unreadable (index at the end) or truncated
        decode_video(cut, short_side=0)


def test_truncated_avi_names_the_counts(shared_data, tmp_path):
    src = shared_data / "clips" / "ucf101" / "v_ApplyEyeMakeup_g01_c01.avi"
    cut = _cut(src, tmp_path / src.name)
    with pytest.raises(VideoTruncated, match=r"v_ApplyEyeMakeup_g01_c01.avi: .*decoded \d+ of 164 declared frames"):
        decode_video(cut, short_side=0)  # the AVI header says 164 frames (OpenCV's count of the full clip)
    kept = decode_video(cut, short_side=0, allow_truncated=True)
    assert 0 < len(kept.frames) < 164 * 0.5 and kept.truncated.startswith(f"decoded {len(kept.frames)} of 164")


def test_truncated_faststart_mp4_and_mkv(shared_data, tmp_path):
    mp4 = _faststart_mp4(shared_data / "clips" / "kinetics" / "test.mp4", tmp_path / "fs.mp4")
    mkv = _mkv(tmp_path / "x.mkv")
    for path, how in ((mp4, "frame count"), (mkv, "duration x rate")):
        whole = decode_video(path, short_side=0)
        assert len(whole.frames) == 60 and whole.declared == 60 and whole.declared_from == how
        assert whole.truncated is None
        cut = _cut(path, tmp_path / f"cut{path.suffix}")
        with pytest.raises(VideoTruncated, match=rf"cut{path.suffix}: .*decoded \d+ of 60 declared frames \({how}\)"):
            decode_video(cut, short_side=0)
        kept = decode_video(cut, short_side=0, allow_truncated=True)
        assert len(kept.frames) < 0.5 * 60 and "of 60 declared frames" in kept.truncated
        # a tolerance that covers the loss accepts it
        assert decode_video(cut, short_side=0, truncation_tolerance=0.99).truncated is None


def test_bad_tolerance_is_refused(tmp_path):
    with pytest.raises(ValueError, match="truncation_tolerance"):
        decode_video(tmp_path / "x.mkv", truncation_tolerance=float("nan"))
