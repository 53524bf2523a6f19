import os
from pathlib import Path

import pytest

# ../shared beside the checkout, or $PIPELINE_SHARED (a worktree elsewhere).
SHARED = Path(os.environ.get("PIPELINE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real clips, split files, FlyingChairs pairs)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run small tensors on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    import torch

    torch.set_num_threads(1)
    yield
