"""The README's ``tensorboard --logdir cache/``: the event files a training writes open in TensorBoard, and the
``tensorboard`` command of the environment starts (>= 2.21: earlier versions import ``pkg_resources``, gone
from setuptools >= 82, and fail before serving anything; tensorflow/tensorboard#7096)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.io import artifacts
from pipeline.stage.config import tomllib  # tomli before Python 3.11
from tests.test_train_head import FAST, build_upstream, invoke, make_features

REPO = Path(__file__).resolve().parents[1]
FLOOR = Version("2.21")


def test_extras_ask_for_a_tensorboard_that_starts_with_new_setuptools():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("tensorboard", "test"):
        req = next(Requirement(r) for r in extras[extra] if Requirement(r).name == "tensorboard")
        assert not req.specifier.contains("2.20.0") and req.specifier.contains("2.21.0"), (extra, str(req))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> tuple[Path, str, list[dict]]:
    """A cache where one tiny train-head ran with --tensorboard: (cache root, its key, its history)."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed "
                                              "(pip install 'stfn-pipeline[tensorboard]')")
    base = tmp_path_factory.mktemp("tensorboard")
    root = base / "cache"
    build_upstream(root, make_features())
    config = base / "fast.toml"
    config.write_text(FAST.replace("max_epochs = 30", "max_epochs = 3"))
    res = invoke("train-head", "--head", "tsn", "--tensorboard", "--config", config, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    key = artifacts.head_key("tsn-p0-n4-s0")
    history = json.loads((root / key / artifacts.RESULTS).read_text())["history"]["epochs"]
    assert len(history) == 3
    return root, key, history


def test_logdir_of_the_cache_finds_every_run_and_its_scalars(logdir):
    """What ``tensorboard --logdir cache/`` loads: runs found under the cache root (named by their stage key),
    read with TensorBoard's own multiplexer and accumulator, equal to the stage's history."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.util.tensor_util import make_ndarray

    root, key, history = logdir
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    run = f"{key}/tensorboard"
    assert list(mux.Runs()) == [run]
    events = mux.GetAccumulator(run)  # the server's reader: scalars as tensors (TensorBoard's data format)

    def curve(tag):
        return [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]

    assert {"loss/train", "loss/val", "error/val", "lr"} <= set(events.Tags()["tensors"])
    assert [s for s, _ in curve("loss/train")] == [h["epoch"] for h in history]
    assert [v for _, v in curve("loss/train")] == pytest.approx([h["train_loss"] for h in history], rel=1e-6)
    assert [v for _, v in curve("lr")] == pytest.approx([h["lr"] for h in history])


def _tensorboard_cli() -> Path:
    exe = Path(sys.executable).parent / "tensorboard"
    if not exe.is_file():
        pytest.skip(f"no tensorboard command beside {sys.executable} (pip install 'stfn-pipeline[tensorboard]')")
    return exe


def test_tensorboard_command_starts():
    res = subprocess.run([str(_tensorboard_cli()), "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pkg_resources" not in res.stderr
    assert Version(res.stdout.strip().split()[-1]) >= FLOOR, res.stdout


@pytest.mark.slow
def test_tensorboard_serves_the_cache(logdir, tmp_path):
    """``tensorboard --logdir <cache>`` starts a server whose scalars API returns the training's loss curve."""
    root, key, history = logdir
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(_tensorboard_cli()), "--logdir", str(root), "--host", "127.0.0.1", "--port", "0",
                                 "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        url, deadline = None, time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", log.read_text())
            url = m.group(1) if m else time.sleep(0.5)
        assert url, log.read_text()[-2000:]
        run = f"{key}/tensorboard"
        query = urllib.parse.urlencode({"run": run, "tag": "loss/train"})
        points = None
        while points is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/scalars/scalars?{query}", timeout=10) as r:
                    points = json.loads(r.read())
            except OSError:  # the run is not loaded yet (400) or the server is starting
                time.sleep(0.5)
        assert points is not None, log.read_text()[-2000:]
        assert [p[1] for p in points] == [h["epoch"] for h in history]
        assert [p[2] for p in points] == pytest.approx([h["train_loss"] for h in history], rel=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
