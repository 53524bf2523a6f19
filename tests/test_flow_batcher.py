"""extract-flow's pair batcher (pipeline/flow/batcher.py) on its own: pairs of many videos in batches."""
import threading

import numpy as np
import pytest
import torch

from pipeline.flow.batcher import (PairVideo, VideoFailed, VideoFlows, flows_by_video, pair_batches, pair_frames,
                                   read_ahead)


def _video(k: int, frames: int, step: int = 1, size=(2, 3)) -> PairVideo:
    """Frame t of video k holds the value 1000 k + t everywhere, so a pair says which frames it took."""
    values = 1000.0 * k + torch.arange(frames, dtype=torch.float32)
    return PairVideo(f"v{k}", values[:, None, None].expand(frames, *size).clone(), step)


def _pairs(batch):
    return [(p.video.video_id, i) for p in batch for i in range(p.start, p.stop)]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 100])
def test_batches_hold_every_pair_once_in_order(batch_size):
    rng = np.random.default_rng(batch_size)
    lengths = [int(n) for n in rng.integers(3, 12, size=9)]
    videos = [_video(k, n, step=1 + k % 2) for k, n in enumerate(lengths)]
    batches = list(pair_batches(iter(videos), batch_size))
    want = [(v.video_id, i) for v in videos for i in range(len(v.frames) - v.step)]
    assert [x for b in batches for x in _pairs(b)] == want  # every pair of every video, once, in order
    sizes = [len(_pairs(b)) for b in batches]
    assert all(s == batch_size for s in sizes[:-1])  # full batches ...
    assert 1 <= sizes[-1] <= batch_size  # ... and the last partial one flushed
    assert sum(sizes) == sum(n - (1 + k % 2) for k, n in enumerate(lengths))


def test_a_new_frame_size_starts_a_new_batch():
    videos = [_video(0, 3), _video(1, 3, size=(4, 4)), _video(2, 6, size=(4, 4)), _video(3, 2)]
    batches = list(pair_batches(videos, 4))
    assert [_pairs(b) for b in batches] == [
        [("v0", 0), ("v0", 1)],  # flushed: v1 has another size
        [("v1", 0), ("v1", 1), ("v2", 0), ("v2", 1)],
        [("v2", 2), ("v2", 3), ("v2", 4)],  # flushed: v3 has another size
        [("v3", 0)],
    ]
    first, second = pair_frames(batches[1])
    assert first[:, 0, 0].tolist() == [1000, 1001, 2000, 2001] and second[:, 0, 0].tolist() == [1001, 1002, 2001, 2002]
    with pytest.raises(ValueError, match="v9: 1 frames give no pair"):
        list(pair_batches([_video(9, 1)], 4))


def test_each_video_completes_once_after_its_last_pair():
    videos = [_video(k, n, step=2 if k == 2 else 1) for k, n in enumerate([3, 9, 5, 2, 4])]
    log, computed = [], set()

    def compute(batch):
        first, second = pair_frames(batch)
        computed.update(_pairs(batch))
        log.append(("batch", len(first)))
        return torch.stack([first[:, 0, 0], second[:, 0, 0]], 1).numpy()

    out = []
    for event in flows_by_video(iter(videos), 4, compute, on_batch=lambda n: log.append(("progress", n))):
        assert isinstance(event, VideoFlows)
        v = videos[int(event.video_id[1:])]
        assert {(v.video_id, i) for i in range(len(v.frames) - v.step)} <= computed  # all its pairs computed
        log.append(("done", event.video_id))
        out.append(event)
    assert [e.video_id for e in out] == ["v0", "v1", "v2", "v3", "v4"]
    for e, v in zip(out, videos):
        k, n = int(v.video_id[1:]), len(v.frames) - v.step
        np.testing.assert_array_equal(e.codes, [[1000 * k + i, 1000 * k + i + v.step] for i in range(n)])
    # v0's 2 pairs and v1's first 2 make batch 1; v0 completes before batch 2 is computed (no waiting).
    assert log[:4] == [("batch", 4), ("progress", 4), ("done", "v0"), ("batch", 4)]
    assert [x for x in log if x[0] == "batch"] == [("batch", 4)] * 4 + [("batch", 1)]  # 2 + 8 + 3 + 1 + 3 pairs


def test_a_failing_batch_fails_its_videos_and_skips_their_later_pairs():
    videos = [_video(0, 3), _video(1, 8), _video(2, 3), _video(3, 3)]
    seen = []

    def compute(batch):
        seen.append(_pairs(batch))
        if len(seen) == 1:
            raise RuntimeError("out of memory")
        return np.zeros((len(_pairs(batch)), 1))

    events = list(flows_by_video(videos, 4, compute))
    assert [(type(e), e.video_id) for e in events] == [(VideoFailed, "v0"), (VideoFailed, "v1"),
                                                       (VideoFlows, "v2"), (VideoFlows, "v3")]
    assert events[0].reason == "RuntimeError: out of memory"
    assert all(vid not in ("v0", "v1") for b in seen[1:] for vid, _ in b)  # v1's later pairs never computed


def test_read_ahead_keeps_order_passes_errors_and_loads_ahead():
    started = []
    gate = threading.Event()

    def load(k):
        started.append(k)
        if k == "b":
            raise OSError("unreadable")
        if k == "a":
            gate.wait(5)
        return k.upper()

    it = read_ahead(["a", "b", "c", "d"], load, depth=2)
    first = None

    def take():
        nonlocal first
        first = next(it)

    t = threading.Thread(target=take)
    t.start()
    for _ in range(100):  # while "a" is still loading, the next ones load beside it, but not all of them
        if "c" in started:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    assert sorted(started) == ["a", "b", "c"]  # depth 2: "d" waits until "a" is taken
    gate.set()
    t.join(5)
    rest = list(it)
    assert first == ("a", "A")
    assert rest[0][0] == "b" and isinstance(rest[0][1], OSError)
    assert rest[1:] == [("c", "C"), ("d", "D")]
