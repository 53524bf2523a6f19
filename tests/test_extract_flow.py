"""The extract-flow stage and the flow tools, against OpenCV's TV-L1 and hand-checked layouts."""
import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.stage import StageError, StageFailures, run_stage
from stages.cli import main
from pipeline.flow.flo import read_flo
from pipeline.flow.tvl1 import TVL1Params, opencv_tvl1_flow, to_gray, tvl1_flow
from pipeline.io.store import read_frames
from pipeline.data.table import VideoTable
from pipeline.flow.stored import pair_flow, read_flow
from pipeline.io.artifacts import flow_store, frame_store
from stages.decode import STAGE as DECODE, DecodeParams
from stages.extract_flow import STAGE as FLOW, FlowParams
from tests.videos import make_csv_dataset

# Small TV-L1 settings keep the test fast; the algorithm's accuracy is tested in test_tvl1.py.
QUICK = dict(nscales=2, warps=2, inner_iterations=10, outer_iterations=2, fast=False)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    data = make_csv_dataset(tmp / "data", videos_per_class=2, num_frames=9, size=(64, 48))
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=48, workers=1, frame_codec="raw"),
              tmp / "cache")
    return tmp / "cache"


def test_flow_store_layout_and_values_match_library(decoded):
    r = run_stage(FLOW, FlowParams(codec="zstd", **QUICK), decoded)  # lossless: only the quantization error
    assert r.manifest["done"] == 4 and r.manifest["complete"]
    table = VideoTable.load(decoded / "decode")
    store = flow_store(decoded / "extract-flow")
    vid = table.video_ids[0]
    with store.reader(vid) as c:
        attrs = c.attrs
        q = c.read_images("flow").numpy()
    assert q.shape == (8, 48, 64, 2) and q.dtype == np.uint8  # 9 frames -> 8 flows, (H, W, x|y)
    assert attrs["num_flows"] == 8 and attrs["step"] == 1 and attrs["bound"] == 20.0 and attrs["codec"] == "zstd"
    # Flow 3 goes from frame 3 to frame 4: recompute it with the library on the stored frames.
    frames = read_frames(frame_store(decoded / "decode"), vid, [3, 4]).numpy()
    gray = [torch.from_numpy(to_gray(np.ascontiguousarray(f[..., ::-1]))).float() for f in frames]
    params = TVL1Params(**{k: v for k, v in QUICK.items() if k != "fast"})
    ref = tvl1_flow(gray[0], gray[1], params, fast=False).numpy()
    got = read_flow(store, vid, [3])[0].transpose(2, 0, 1)
    step = 2 * 20.0 / 255
    assert np.abs(got - np.clip(ref, -20, 20)).max() <= step / 2 + 1e-4  # only quantization error


def test_opencv_backend_agrees_with_torch(decoded, tmp_path):
    run_stage(FLOW, FlowParams(**QUICK), decoded)
    torch_flow = read_flow(flow_store(decoded / "extract-flow"), "Alpha/v_Alpha_g01_c01")
    # A second cache with the same frames: copy the decode output, run the OpenCV backend there.
    import shutil

    shutil.copytree(decoded / "decode", tmp_path / "decode")
    run_stage(FLOW, FlowParams(backend="opencv", **QUICK), tmp_path)
    cv_flow = read_flow(flow_store(tmp_path / "extract-flow"), "Alpha/v_Alpha_g01_c01")
    epe = np.sqrt(((torch_flow - cv_flow) ** 2).sum(-1)).mean()
    assert epe < 0.1, epe


def test_step_and_rerun(decoded):
    r = run_stage(FLOW, FlowParams(step=2, **QUICK), decoded)
    assert not r.skipped
    with flow_store(decoded / "extract-flow").reader("Beta/v_Beta_g02_c01") as c:
        assert c.num_images("flow") == 7 and c.attrs["step"] == 2
    again = run_stage(FLOW, FlowParams(step=2, **{**QUICK, "fast": True}), decoded)  # execution knob only
    assert again.skipped
    # The kernel is an execution knob too (each computes the eager reference's flow to float rounding).
    for kernel in ("compile", "triton", "auto"):
        assert run_stage(FLOW, FlowParams(step=2, **{**QUICK, "fast": True, "kernel": kernel}), decoded).skipped


def test_kernel_option_is_checked():
    with pytest.raises(StageError, match="--no-fast.*--kernel compile"):
        FlowParams(**{**QUICK, "kernel": "compile"}).validate()
    FlowParams(**{**QUICK, "kernel": "eager"}).validate()


def test_too_short_video_is_a_recorded_failure(tmp_path):
    data = make_csv_dataset(tmp_path / "data", videos_per_class=1, num_frames=2)
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=32, workers=1), tmp_path)
    with pytest.raises(StageFailures, match="too short: 2 frame"):
        run_stage(FLOW, FlowParams(step=2, **QUICK), tmp_path)


def test_flow_needs_decode(tmp_path):
    res = CliRunner().invoke(main, ["extract-flow", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "run `pipeline decode` first" in res.output


def test_flow_pair_cli_matches_opencv(tmp_path, shared_data):
    chairs = shared_data / "flow" / "flyingchairs"
    a, b = chairs / "0000000-img0.ppm", chairs / "0000000-img1.ppm"
    # Downscale for speed: the command reads any image OpenCV reads.
    for src, dst in ((a, tmp_path / "a.png"), (b, tmp_path / "b.png")):
        cv2.imwrite(str(dst), cv2.resize(cv2.imread(str(src)), (128, 96), interpolation=cv2.INTER_AREA))
    args = ["--nscales", "3", "--warps", "2", "--inner-iterations", "10", "--outer-iterations", "3"]
    res = CliRunner().invoke(main, ["flow-pair", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                                    str(tmp_path / "ab.flo"), "--vis", str(tmp_path / "ab.png"), "--no-fast", *args])
    assert res.exit_code == 0, res.output
    ours = read_flo(tmp_path / "ab.flo")
    g = [to_gray(cv2.imread(str(tmp_path / n))) for n in ("a.png", "b.png")]
    ref = opencv_tvl1_flow(g[0], g[1], TVL1Params(nscales=3, warps=2, inner_iterations=10, outer_iterations=3))
    assert ours.shape == (2, 96, 128)
    assert np.sqrt(((ours - ref) ** 2).sum(0)).mean() < 0.2
    assert cv2.imread(str(tmp_path / "ab.png")).shape == (96, 128, 3)


def test_flow_pair_bad_input(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((21, 30, 3), np.uint8))
    (tmp_path / "c.png").write_bytes(b"not an image")
    runner = CliRunner()
    res = runner.invoke(main, ["flow-pair", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                               str(tmp_path / "o.flo")])
    assert res.exit_code == 2 and "same size" in res.output
    res = runner.invoke(main, ["flow-pair", str(tmp_path / "a.png"), str(tmp_path / "c.png"), "-o",
                               str(tmp_path / "o.flo")])
    assert res.exit_code == 2 and "c.png: cannot read" in res.output
    assert not (tmp_path / "o.flo").exists()


def test_show_flow_writes_colour_frames(decoded, tmp_path):
    run_stage(FLOW, FlowParams(**QUICK), decoded)
    runner = CliRunner()
    res = runner.invoke(main, ["show-flow", "Alpha/v_Alpha_g01_c01", "-o", str(tmp_path / "pngs"),
                               "--cache-dir", str(decoded)])
    assert res.exit_code == 0, res.output
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(pngs) == 8 and cv2.imread(str(pngs[0])).shape == (48, 64, 3)
    res = runner.invoke(main, ["show-flow", "Alpha/v_Alpha_g01_c01", "-o", str(tmp_path / "f.mp4"),
                               "--cache-dir", str(decoded)])
    assert res.exit_code == 0 and cv2.VideoCapture(str(tmp_path / "f.mp4")).read()[0]
    res = runner.invoke(main, ["show-flow", "Nope/v", "-o", str(tmp_path / "x"), "--cache-dir", str(decoded)])
    assert res.exit_code == 2 and "Nope/v" in res.output


def test_both_backends_on_the_shared_real_clips(tmp_path, shared_data):
    clips = sorted((shared_data / "clips").rglob("*.avi")) + sorted((shared_data / "clips").rglob("*.mp4"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.csv").write_text(
        "path,label,split\n" + "".join(f"{p},{p.parent.name},train\n" for p in clips))
    for backend in ("torch", "opencv"):
        cache = tmp_path / backend
        run_stage(DECODE, DecodeParams(dataset="csv", root=tmp_path / "data", short_side=64, max_frames=6,
                                       workers=1), cache)
        r = run_stage(FLOW, FlowParams(backend=backend, **QUICK), cache)
        assert r.manifest["done"] == len(clips)
    ids = VideoTable.load(tmp_path / "torch" / "decode").video_ids
    for vid in ids:
        a = read_flow(flow_store(tmp_path / "torch" / "extract-flow"), vid)
        b = read_flow(flow_store(tmp_path / "opencv" / "extract-flow"), vid)
        assert a.shape == b.shape and a.shape[0] == 5
        assert np.sqrt(((a - b) ** 2).sum(-1)).mean() < 0.1, vid


def test_pair_flow_recomputes_any_pair_in_float(decoded):
    run_stage(FLOW, FlowParams(codec="zstd", **QUICK), decoded)  # lossless store: quantization error only
    vid = "Beta/v_Beta_g01_c01"
    f = pair_flow(decoded, vid, 2)  # the stored pair 2 -> 3, unquantized
    stored = read_flow(flow_store(decoded / "extract-flow"), vid, [2])[0].transpose(2, 0, 1)
    assert f.dtype == np.float32 and f.shape == (2, 48, 64)
    assert np.abs(np.clip(f, -20, 20) - stored).max() <= 20.0 / 255 + 1e-4
    frames = read_frames(frame_store(decoded / "decode"), vid, [0, 5]).numpy()
    gray = [torch.from_numpy(to_gray(np.ascontiguousarray(x[..., ::-1]))).float() for x in frames]
    ref = tvl1_flow(gray[0], gray[1], TVL1Params(**{k: v for k, v in QUICK.items() if k != "fast"}), fast=False)
    np.testing.assert_allclose(pair_flow(decoded, vid, 0, 5), ref.numpy(), atol=1e-4)  # a pair never stored
