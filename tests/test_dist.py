"""pipeline.dist.device: one CUDA device per local rank under torchrun, whatever --device says.

CUDA is simulated (``torch.cuda.is_available`` / ``device_count`` patched) and torchrun's variables are set
in the environment; the expected device is worked out by hand from LOCAL_RANK and the GPU count.
"""
from __future__ import annotations

import pytest
import torch

from pipeline import dist


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def _torchrun(monkeypatch, world: int, local: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local))
    monkeypatch.setenv("LOCAL_RANK", str(local))


@pytest.mark.parametrize("asked", ["auto", "cuda", "cuda:0", "cuda:1", "cuda:3"])
def test_each_local_rank_gets_its_own_gpu(monkeypatch, four_gpus, asked):
    seen = []
    for local in range(4):
        _torchrun(monkeypatch, 4, local)
        seen.append(dist.device(asked))
    assert seen == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_more_ranks_than_gpus_wrap_around(monkeypatch, four_gpus):
    _torchrun(monkeypatch, 6, 5)
    assert dist.device("cuda:2") == "cuda:1"


def test_single_process_keeps_the_asked_index(monkeypatch, four_gpus):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist.device("cuda:2") == "cuda:2"
    assert dist.device("cuda") == "cuda"
    assert dist.device("auto") == "cuda:0"


def test_cpu_stays_cpu_under_torchrun(monkeypatch, four_gpus):
    _torchrun(monkeypatch, 2, 1)
    assert dist.device("cpu") == "cpu"


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _torchrun(monkeypatch, 2, 1)
    with pytest.raises(ValueError, match="CUDA is not available"):
        dist.device("cuda:1")
    assert dist.device("auto") == "cpu"
