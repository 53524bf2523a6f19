"""Head training loop: fit_head, predict, the metrics, the split column (the sampling tables of [STFN] §4.2
are in test_sampling.py)."""

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.data.sampling import eval_sequences, segment_positions
from pipeline.eval.metrics import accuracy_metrics
from pipeline.training.heads import (
    fit_head,
    gather_segments,
    predict,
    predict_views,
    split_indices,
)
from pipeline.models.heads import create_head
from pipeline.training import heads as H



def test_gather_segments_by_hand():
    feats = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # value = 4 v + p
    out = gather_segments(feats, torch.tensor([1, 0]), torch.tensor([[0, 3], [2, 1]]))
    assert out[..., 0].tolist() == [[4.0, 7.0], [2.0, 1.0]]


def _order_problem(v, seed, p=8, d=8, noise=0.5):
    """Two classes built from the same two patterns, differing only in their temporal order:
    class 0 shows pattern A in the first half of the video and B in the second, class 1 the
    reverse. The time-averaged feature has the same distribution for both classes, so TSN's
    average consensus is at chance while a temporal model separates them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(v) % 2
    a, b = 2 * torch.eye(d)[0], 2 * torch.eye(d)[1]
    first = torch.where(labels[:, None] == 0, a, b)
    second = torch.where(labels[:, None] == 0, b, a)
    seq = torch.cat([first[:, None].expand(v, p // 2, d), second[:, None].expand(v, p - p // 2, d)], 1)
    rgb = (seq + noise * torch.randn(v, p, d, generator=g)).relu()
    flow = (seq + noise * torch.randn(v, p, d, generator=g)).relu()
    return rgb, flow, labels


def _fit(name, seed=0, **kw):
    train, val = _order_problem(64, 0), _order_problem(32, 1)
    torch.manual_seed(seed)
    head = create_head(name, num_classes=2, rgb_dim=8, flow_dim=8, num_segments=4, dropout=0.0)
    records = []
    hist = fit_head(head, train, val, lr=3e-3, min_lr=3e-6, patience=2, batch_size=16,
                    device="cpu", seed=seed, log=records.append, **kw)
    return head, hist, records


def test_stfn_learns_temporal_order_tsn_cannot():
    test = _order_problem(64, 2)
    stfn, hist, records = _fit("stfn", max_epochs=10)
    tsn, _, _ = _fit("tsn", max_epochs=10)
    acc_stfn = accuracy_metrics(predict(stfn, test[0], test[1], 4), test[2]).top1
    acc_tsn = accuracy_metrics(predict(tsn, test[0], test[1], 4), test[2]).top1
    assert acc_stfn >= 0.95
    assert acc_tsn <= 0.7  # chance is 0.5
    assert acc_stfn > acc_tsn + 0.25
    assert records == hist.epochs and len(records) >= 1
    # The best epoch's weights are the ones returned.
    val = _order_problem(32, 1)
    probs = predict(stfn, val[0], val[1], 4)
    assert math.isclose(accuracy_metrics(probs, val[2]).top1, 1 - hist.best_val_error)


def test_fit_is_deterministic_for_a_seed():
    h1, hist1, _ = _fit("concat", max_epochs=3)
    h2, hist2, _ = _fit("concat", max_epochs=3)
    assert [r["train_loss"] for r in hist1.epochs] == [r["train_loss"] for r in hist2.epochs]
    for a, b in zip(h1.state_dict().values(), h2.state_dict().values()):
        assert torch.equal(a, b)


def test_lr_divided_by_ten_down_to_min_then_stop():
    # Random labels: validation never improves for long, so the schedule runs to its floor.
    g = torch.Generator().manual_seed(0)
    feats = lambda v: (torch.randn(v, 4, 8, generator=g), torch.randn(v, 4, 8, generator=g),  # noqa: E731
                       torch.randint(0, 2, (v,), generator=g))
    head = create_head("concat", num_classes=2, rgb_dim=8, flow_dim=8, num_segments=2, dropout=0.0)
    hist = fit_head(head, feats(32), feats(16), lr=1e-4, min_lr=1e-7, patience=1, batch_size=8,
                    max_epochs=200, device="cpu", seed=0)
    lrs = [r["lr"] for r in hist.epochs]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    distinct = sorted(set(lrs), reverse=True)
    np.testing.assert_allclose(distinct, [1e-4, 1e-5, 1e-6, 1e-7][: len(distinct)], rtol=1e-9)
    assert len(distinct) == 4 and "minimum learning rate" in hist.stop_reason


def test_predict_views_shape_and_mean():
    rgb, flow, _ = _order_problem(6, 3)
    head = create_head("stfn", num_classes=2, rgb_dim=8, flow_dim=8, num_segments=4).eval()
    views = predict_views(head, rgb, flow, 4, num_test=5, batch_size=4)
    assert views.shape == (6, 5, 2)
    torch.testing.assert_close(views.sum(-1), torch.ones(6, 5))
    torch.testing.assert_close(predict(head, rgb, flow, 4), views.mean(1))
    # Each view is the head applied to the hand-picked positions of that test sequence.
    seq = torch.from_numpy(eval_sequences(8, 4)[2])
    with torch.no_grad():
        direct = head(rgb[:, seq], flow[:, seq]).exp()
    torch.testing.assert_close(views[:, 2], direct)
    assert not head.training


def test_evaluate_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1, 2, 0])
    ev = accuracy_metrics(scores, labels, ["a", "b", "c"])
    assert ev.top1 == pytest.approx(4 / 5)
    np.testing.assert_allclose(ev.per_class_accuracy, [1.0, 0.5, 1.0])
    assert ev.mean_class_accuracy == pytest.approx(2.5 / 3)
    assert ev.confusion.tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 1]]
    d = ev.as_dict()
    assert d["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    absent = accuracy_metrics(np.eye(3)[[0, 0]], np.array([0, 0]))
    assert math.isnan(absent.per_class_accuracy[1]) and absent.mean_class_accuracy == 1.0
    with pytest.raises(ValueError, match="class names"):
        accuracy_metrics(scores, labels, ["a"])


def test_top5_by_hand():
    # 6 classes, 3 videos. Video 0: true class 5 ranks 6th (scores 0.6 > 0.5 > ... > 0.1 > 0.05) -> miss.
    # Video 1: true class 4 ranks 5th -> hit. Video 2: true class 0 ranks 1st -> hit. top-5 = 2/3, top-1 = 1/3.
    scores = np.array([[0.6, 0.5, 0.4, 0.3, 0.1, 0.05],
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],
                       [0.7, 0.1, 0.1, 0.05, 0.03, 0.02]])
    ev = accuracy_metrics(scores, np.array([5, 4, 0]))
    assert ev.top5 == pytest.approx(2 / 3) and ev.top1 == pytest.approx(1 / 3)
    assert ev.as_dict()["top5"] == pytest.approx(2 / 3)
    # A tie at the 5th score: the lower class index is ranked first (as argmax), so class 4 is in, 5 is out.
    tie = np.array([[0.5, 0.5, 0.5, 0.5, 0.2, 0.2]] * 2)
    assert accuracy_metrics(tie, np.array([4, 5])).top5 == pytest.approx(0.5)
    # Fewer than 5 classes: top-5 is undefined (NaN, None in JSON), never a trivial 1.0.
    few = accuracy_metrics(np.eye(3), np.array([0, 1, 2]))
    assert math.isnan(few.top5) and few.as_dict()["top5"] is None


def test_split_indices_from_the_split_column():
    parts = split_indices(["train", "val", "test", "unused", "train", "test"])
    assert parts["train"].tolist() == [0, 4] and parts["val"].tolist() == [1] and parts["test"].tolist() == [2, 5]
    with pytest.raises(ValueError, match="--val-fraction > 0"):
        split_indices(["train", "test", "train"], "f.zarr")
    with pytest.raises(ValueError, match="no test videos"):
        split_indices(["train", "val"])


def test_head_epoch_equals_a_plain_loop_bit_for_bit():
    """Indices moved to the device once per epoch, loss read once: the same steps as drawing and reading
    them per batch (reference written out here: randperm, then train_positions, from one generator)."""
    from pipeline.models.heads import create_head

    g = torch.Generator().manual_seed(5)
    v, p, d, n, bs = 11, 9, 8, 3, 4
    rgb, flow = torch.randn(v, p, d, generator=g), torch.randn(v, p, d, generator=g)
    labels = torch.randint(0, 4, (v,), generator=g)
    torch.manual_seed(0)
    a = create_head("stfn", num_classes=4, rgb_dim=d, flow_dim=d, num_segments=n)
    b = copy.deepcopy(a)
    oa, ob = torch.optim.RMSprop(a.parameters(), lr=1e-2), torch.optim.RMSprop(b.parameters(), lr=1e-2)
    torch.manual_seed(1)  # dropout
    loss = H.train_head_epoch(a, oa, rgb, flow, labels, num_segments=n, batch_size=bs,
                              generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    order = torch.randperm(v, generator=gen)
    bounds = segment_positions(p, n)
    u = torch.rand((v, n), generator=gen, dtype=torch.float64)
    length = torch.from_numpy(bounds[:, 1] - bounds[:, 0])
    pos = torch.from_numpy(bounds[:, 0]) + torch.minimum((u * length).long(), length - 1)
    b.train()
    torch.manual_seed(1)
    total = 0.0
    for i in range(0, v, bs):
        idx = order[i:i + bs]
        ra = rgb[idx[:, None], pos[idx]]
        fa = flow[idx[:, None], pos[idx]]
        step = b.loss(ra, fa, labels[idx])
        ob.zero_grad()
        step.backward()
        ob.step()
        total += step.item() * len(idx)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert loss == pytest.approx(total / v, rel=1e-6)


# ----------------------------------------------------------------------------- streamed from a store

@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_streamed_features_give_the_in_memory_weights_and_scores(tmp_path, monkeypatch, backend):
    """fit_head and eval_scores on FeatureArrays read from a feature store (store chunks of 3 videos, training
    epochs read one batch at a time, test scored in blocks of 4 videos) give bit-identical weights, history and
    scores to the same features in memory, as float32 (the former path) or as the stored float16."""
    import pipeline.io.store as store_mod
    from pipeline.data.feature_dataset import FeatureDataset
    from pipeline.eval.scores import fuse_scores
    from pipeline.io.store import FeatureSet, write_feature_store

    p, d, views = 8, 8, 2
    parts = {"train": _order_problem(48, 0), "val": _order_problem(20, 1), "test": _order_problem(22, 2)}
    split = np.array([k for k in parts for _ in range(len(parts[k][2]))])
    perm = np.random.default_rng(0).permutation(len(split))  # interleaved rows: no part is contiguous
    split = split[perm]
    streams = {}
    for i, s in enumerate(("rgb", "flow")):
        x = torch.cat([parts[k][i] for k in parts]).numpy()[perm]                      # (V, P, D)
        streams[s] = np.stack([x, x[:, ::-1] * 0.5], axis=2).astype(np.float16)       # (V, P, 2 views, D)
    labels = torch.cat([parts[k][2] for k in parts]).numpy()[perm]
    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 3 * p * views * d * 2)
    path = tmp_path / f"features.{backend}"
    write_feature_store(path, FeatureSet(streams, np.zeros((len(split), p), np.float32),
                                         np.array([f"v{i}" for i in range(len(split))]), labels, split,
                                         np.array(["g"] * len(split)), np.array(["a", "b"]), {}))
    idx = {k: np.flatnonzero(split == k) for k in parts}
    ds = FeatureDataset(path, dtype=None)
    assert ds.chunk_rows == {"rgb": 3, "flow": 3}

    def run(kind):
        if kind == "streamed":
            fit = {k: (ds.array("rgb", 0, idx[k]), ds.array("flow", 0, idx[k])) for k in ("train", "val")}
            test = (ds.array("rgb", None, idx["test"]), ds.array("flow", None, idx["test"]))
        else:
            dtype = np.float32 if kind == "float32" else np.float16
            fit = {k: tuple(torch.from_numpy(streams[s][idx[k], :, 0].astype(dtype)) for s in ("rgb", "flow"))
                   for k in ("train", "val")}
            test = tuple(torch.from_numpy(streams[s][idx["test"]].astype(dtype)) for s in ("rgb", "flow"))
        torch.manual_seed(3)
        head = create_head("stfn", num_classes=2, rgb_dim=d, flow_dim=d, num_segments=4, dropout=0.5)
        y = torch.from_numpy(labels)
        hist = fit_head(head, (*fit["train"], y[idx["train"]]), (*fit["val"], y[idx["val"]]), lr=3e-3,
                        min_lr=3e-5, patience=1, batch_size=8, max_epochs=3, device="cpu", seed=5,
                        max_bytes=1 if kind == "streamed" else None)
        views_scores = H.eval_scores(head, *test, 4, fusion="sci", batch_size=4,
                                     max_bytes=1 if kind == "streamed" else None)
        return head.state_dict(), [(r["train_loss"], r["val_loss"]) for r in hist.epochs], views_scores

    ref_state, ref_hist, ref_scores = run("float32")
    for kind in ("float16", "streamed"):
        state, hist, scores = run(kind)
        assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state), kind
        assert hist == ref_hist and torch.equal(scores, ref_scores), kind
    # The scores are those of every view's 5 sequences, SCI-fused: against predict_views view by view.
    head = create_head("stfn", num_classes=2, rgb_dim=d, flow_dim=d, num_segments=4)
    head.load_state_dict(ref_state)
    rgb, flow = (torch.from_numpy(streams[s][idx["test"]].astype(np.float32)) for s in ("rgb", "flow"))
    by_view = torch.cat([predict_views(head, rgb[:, :, k], flow[:, :, k], 4) for k in range(views)], dim=1)
    torch.testing.assert_close(ref_scores, fuse_scores(by_view, "sci"))


def test_streamed_epoch_reads_the_store_once_per_window_of_batches(tmp_path, monkeypatch):
    """A streamed training epoch reads each stream once per window of batches that fits ``max_bytes`` (once for
    the whole epoch when it fits), not once per batch (a read goes through each store chunk once)."""
    import pipeline.io.store as store_mod
    from pipeline.data.feature_dataset import FeatureDataset
    from pipeline.io.store import FeatureSet, write_feature_store

    rgb, flow, labels = _order_problem(40, 0)
    monkeypatch.setattr(store_mod, "FEATURE_CHUNK_BYTES", 4 * 8 * 8 * 2)  # 4 videos per chunk: 10 chunks
    path = tmp_path / "features.zarr"
    streams = {"rgb": rgb[:, :, None].numpy().astype(np.float16), "flow": flow[:, :, None].numpy().astype(np.float16)}
    write_feature_store(path, FeatureSet(streams, np.zeros((40, 8), np.float32), np.array([f"v{i}" for i in range(40)]),
                                         labels.numpy(), np.array(["train"] * 40), np.array(["g"] * 40),
                                         np.array(["a", "b"]), {}))
    ds = FeatureDataset(path, dtype=None)
    reads = []
    real = FeatureDataset.read
    monkeypatch.setattr(FeatureDataset, "read", lambda self, s, items, *a, **k: reads.append((s, len(items)))
                        or real(self, s, items, *a, **k))
    head = create_head("tsn", num_classes=2, rgb_dim=8, flow_dim=8, num_segments=4)
    opt = torch.optim.RMSprop(head.parameters(), lr=1e-3)
    train = (ds.array("rgb", 0), ds.array("flow", 0), labels)
    H.train_head_epoch(head, opt, *train, num_segments=4, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert reads == [("rgb", 40), ("flow", 40)]
    reads.clear()
    H.train_head_epoch(head, opt, *train, num_segments=4, batch_size=8, generator=torch.Generator().manual_seed(0),
                       max_bytes=2 * 8 * 4 * 16 * 2)  # two batches' segments (8 videos x 4 x 16 values x 2 B)
    assert reads == [("rgb", 16), ("flow", 16)] * 2 + [("rgb", 8), ("flow", 8)]
