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


# ---------------------------------------------------------------- no host sync per step, same results

def _reference_epoch(model, batches, optimizer, normalize):
    """Plain PyTorch: mean cross-entropy of the segment-averaged scores, read back after every step."""
    loss_sum = correct = samples = 0.0
    for batch in batches:
        x, y = batch["input"], batch["label"]
        b, n = x.shape[:2]
        logits = model(normalize(x.flatten(0, 1))).view(b, n, -1).mean(1)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        optimizer.zero_grad()
        (loss / b).backward()
        optimizer.step()
        loss_sum += loss.item()
        correct += (logits.argmax(1) == y).sum().item()
        samples += b
    return loss_sum / samples, correct / samples


def test_epoch_equals_a_plain_loop_bit_for_bit():
    norm = lambda x: x.float() / 255  # noqa: E731
    g = torch.Generator().manual_seed(1)
    batches = [{"input": torch.randint(0, 255, (3, 2, 3, 4, 4), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 2, (3,), generator=g)} for _ in range(4)]
    torch.manual_seed(0)
    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    st = T.train_one_epoch(a, batches, torch.optim.SGD(a.parameters(), lr=0.1), device=torch.device("cpu"),
                           loss_fn=T.segment_consensus_loss(norm))
    loss, acc = _reference_epoch(b, batches, torch.optim.SGD(b.parameters(), lr=0.1), norm)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert st["loss"] == loss and st["acc"] == acc and st["samples"] == 12 and st["frames"] == 24


def test_global_batch_sizes_come_from_the_epoch_batches():
    sampler = T.EpochBatches(10, 4, seed=3, rank=1, world_size=2)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_sampler=sampler)
    known = T.global_batch_sizes(loader)
    assert list(known) == [4, 4, 2]
    assert T.global_batch_sizes([{"input": None}]) is None
    it = iter([4, 2])
    assert [T.global_batch_size(2, it, 2), T.global_batch_size(1, it, 2)] == [4, 2]
    assert T.global_batch_size(3, None, 1) == 3


@pytest.mark.parametrize("num, den", [(1, 3), (2, 7), (4, 33), (8, 101)])
def test_loss_scale_is_the_float32_quotient(num, den):
    assert T.loss_scale(num, den) == (torch.tensor([float(num)]) / torch.tensor([float(den)]))[0].item()


def test_predict_videos_batches_several_videos_and_matches_one_at_a_time():
    """Views of consecutive videos share forward passes of ``chunk`` views (never more); every video's scores
    equal its own views run alone through the network (softmax averaged, logits averaged), by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    model.train()  # predict_videos switches to eval mode and back
    views = [3, 7, 1, 5, 9, 2]
    g = torch.Generator().manual_seed(1)
    items = [{"input": torch.randint(0, 256, (t, 3, 12, 12), dtype=torch.uint8, generator=g), "index": i}
             for i, t in zip([4, 0, 5, 2, 1, 3], views)]
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    normalize = lambda x: x.float() / 255 - 0.5  # noqa: E731
    done = []
    res = T.predict_videos(model, items, 6, 5, device=torch.device("cpu"), normalize=normalize, chunk=4,
                           progress=done.append)
    assert model.training and sizes == [4] * 6 + [3] and sum(done) == 6 and res["scored"].all()
    assert not res["probs"].requires_grad  # no autograd graph kept across forward passes
    model.eval()
    with torch.no_grad():  # float32 convolutions of another batch size round differently (~3e-8 here)
        for item in items:
            lg = model(normalize(item["input"]))
            torch.testing.assert_close(res["probs"][item["index"]], lg.softmax(1).mean(0), rtol=0, atol=1e-6)
            torch.testing.assert_close(res["logits"][item["index"]], lg.mean(0), rtol=0, atol=1e-6)
