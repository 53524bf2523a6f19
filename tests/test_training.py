"""The backbone training loop stops on a diverging loss (NaN / inf), on every rank alike."""
import pytest
import torch
from torch import nn

from pipeline.stage import StageError
from pipeline.training import NonFiniteLoss, check_finite_loss
from pipeline.training import loop as T


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randint(0, 255, (2, 1, 3, 4, 4), generator=g, dtype=torch.uint8),
             "label": torch.tensor([0, 1])} for _ in range(n)]


def test_finite_training_returns_the_mean_loss():
    model = Tiny()
    st = T.train_one_epoch(model, _batches(), torch.optim.SGD(model.parameters(), lr=1e-3),
                           device=torch.device("cpu"), loss_fn=T.segment_consensus_loss(lambda x: x.float() / 255))
    assert st["samples"] == 6 and 0 < st["loss"] < 10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_stop_the_epoch_with_a_stage_error(bad):
    model = Tiny()
    with pytest.raises(NonFiniteLoss, match="training loss became (nan|inf)"):
        T.train_one_epoch(model, _batches(), torch.optim.SGD(model.parameters(), lr=1e-3),
                          device=torch.device("cpu"), loss_fn=T.segment_consensus_loss(lambda x: x.float() * bad))


def test_check_finite_loss():
    assert check_finite_loss(0.25, "epoch 1") == 0.25
    with pytest.raises(StageError, match="in epoch 3"):
        check_finite_loss(float("-inf"), "epoch 3")
