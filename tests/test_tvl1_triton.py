"""The Triton TV-L1 iteration (pipeline/flow/tvl1_triton.py) against the eager reference.

The kernel checks (one step vs the eager step on random and real input, device-side vs eager stopping,
a whole small flow vs eager) live in tests/tvl1_triton_checks.py and run here in a subprocess under Triton's
CPU interpreter (TRITON_INTERPRET=1), so they need no GPU, only the triton package. The CUDA test compiles
the real kernels and is skipped without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package does not import here")

from pipeline.flow import tvl1 as T  # noqa: E402
from pipeline.flow.tvl1 import TVL1Params, tvl1_flow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/tvl1_triton_checks.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


def test_triton_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tvl1_flow(torch.rand(20, 24) * 255, torch.rand(20, 24) * 255, kernel="triton")
    with pytest.raises(ValueError, match="kernel must be one of"):
        tvl1_flow(torch.rand(20, 24) * 255, torch.rand(20, 24) * 255, kernel="fused")
    assert T.resolve_kernel("auto", "cpu") == "compile"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (unmeasured on GPU here)")
def test_cuda_triton_flow_matches_cpu_eager(shared_data):
    import cv2

    cap = cv2.VideoCapture(str(shared_data / "clips" / "ucf101" / "v_BaseballPitch_g01_c01.avi"))
    frames = [T.to_gray(cv2.resize(cap.read()[1], (340, 256), interpolation=cv2.INTER_AREA)) for _ in range(5)]
    I0 = torch.from_numpy(np.stack(frames[:-1])).float()
    I1 = torch.from_numpy(np.stack(frames[1:])).float()
    params = TVL1Params()
    eager = tvl1_flow(I0, I1, params, kernel="eager")
    cuda = tvl1_flow(I0.cuda(), I1.cuda(), params, kernel="triton").cpu()
    epe = torch.sqrt(((cuda - eager) ** 2).sum(1)).mean().item()
    assert epe < 0.02, epe
