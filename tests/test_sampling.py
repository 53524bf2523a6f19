"""Frame sampling: TSN segments, test frames, flow stacks, dense feature positions, a head's segments and test
sequences over them (hand-worked tables)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.data import sampling


# ---------------------------------------------------------------- train_indices


def test_train_indices_ten_frames_three_segments_draws_within_segments():
    # 10 frames, N = 3: d = 10 // 3 = 3, segments {0,1,2}, {3,4,5}, {6,7,8}; frame 9 is never drawn.
    segments = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]
    seen = [set(), set(), set()]
    for seed in range(200):
        idx = sampling.train_indices(10, 3, np.random.default_rng(seed))
        assert len(idx) == 3
        for k, i in enumerate(idx):
            assert i in segments[k]
            seen[k].add(i)
    assert seen == segments  # every frame of every segment can be drawn


def test_train_indices_uses_documented_draws():
    # Documented rule: frame k*d + rng.integers(d, size=N)[k].
    draws = np.random.default_rng(7).integers(3, size=3)
    expected = [0 + int(draws[0]), 3 + int(draws[1]), 6 + int(draws[2])]
    assert sampling.train_indices(10, 3, np.random.default_rng(7)) == expected


def test_train_indices_equal_frames_and_segments_is_every_frame():
    assert sampling.train_indices(5, 5, np.random.default_rng(0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_frames", [1, 3, 4])
def test_train_indices_fewer_frames_than_segments_is_tsn_zeros(num_frames):
    # TSN _sample_indices: average_duration == 0 -> offsets = zeros(num_segments).
    assert sampling.train_indices(num_frames, 5, np.random.default_rng(0)) == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("args", [(0, 3), (10, 0), (-1, 3)])
def test_train_indices_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="positive int"):
        sampling.train_indices(*args, np.random.default_rng(0))


# ---------------------------------------------------------------- eval_indices


def test_eval_indices_25_of_100_frames():
    # tick = 4: centres 2, 6, 10, ..., 98.
    assert sampling.eval_indices(100) == list(range(2, 100, 4))


@pytest.mark.parametrize(
    "num_frames, num_samples, expected",
    [
        (10, 3, [1, 5, 8]),  # tick 3.33: int(1.67), int(5.0), int(8.33)
        (3, 5, [0, 0, 1, 2, 2]),  # tick 0.6: int(0.3), int(0.9), int(1.5), int(2.1), int(2.7)
        (1, 4, [0, 0, 0, 0]),
        (7, 1, [3]),
    ],
)
def test_eval_indices_hand_worked(num_frames, num_samples, expected):
    assert sampling.eval_indices(num_frames, num_samples) == expected


def test_eval_indices_match_tsn_formula_in_exact_arithmetic():
    # TSN _get_test_indices: int(tick / 2 + tick * k), tick = num_frames / num_samples (0-based here).
    # In floats TSN lands 1 below where tick/2 + tick*k is an exact integer (6 frames, 7 samples,
    # k = 3: 2.9999... -> 2); the documented rule is the exact value.
    for num_frames in range(1, 120):
        for num_samples in (1, 3, 5, 7, 9, 25):
            tick = Fraction(num_frames, num_samples)
            exact = [math.floor(tick / 2 + tick * k) for k in range(num_samples)]
            assert sampling.eval_indices(num_frames, num_samples) == exact, (num_frames, num_samples)
            tsn_float = [int(float(tick) / 2.0 + float(tick) * k) for k in range(num_samples)]
            for e, t, k in zip(exact, tsn_float, range(num_samples)):
                assert e == t or (t == e - 1 and (tick / 2 + tick * k).denominator == 1)


# ---------------------------------------------------------------- feature_positions


def test_feature_positions_hand_worked():
    pos = sampling.feature_positions(7, 3)  # parts of 7/3 frames, centres 1.17, 3.5, 5.83 -> frames 1, 3, 5
    assert pos.dtype == np.float64
    np.testing.assert_array_equal(pos, [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(sampling.feature_positions(100, 25), np.arange(2, 100, 4))


def test_feature_positions_lie_in_their_part():
    for num_frames, p in [(13, 5), (100, 25), (3, 8), (250, 49)]:
        pos = sampling.feature_positions(num_frames, p)
        k = np.arange(p)
        centre = num_frames * (k + 0.5) / p
        # the chosen frame [i, i+1) contains the centre of part k
        assert np.all(pos <= centre) and np.all(centre < pos + 1)


# ---------------------------------------------------------------- flow stacks


def test_flow_stack_centred_window():
    # L = 10 around frame 20: flows 15..24, i.e. motion from frame 15 to frame 25.
    idx = sampling.flow_stack_indices(20, num_flows=100, L=10)
    assert idx == list(range(15, 25))
    assert min(idx) == 20 - 5 and max(idx) + 1 == 20 + 5


@pytest.mark.parametrize(
    "center, expected_start",
    [(0, 0), (2, 0), (5, 0), (6, 1), (94, 89), (95, 90), (97, 90), (100, 90)],
)
def test_flow_stack_clamped_at_both_ends(center, expected_start):
    # 101 frames -> 100 flows; start = c - 5 shifted into [0, 90].
    stack = sampling.flow_stack(center, num_flows=100, L=10)
    assert stack.start == expected_start
    assert stack.indices == list(range(expected_start, expected_start + 10))


def test_flow_stack_exactly_L_flows():
    for c in range(11):
        assert sampling.flow_stack_indices(c, num_flows=10, L=10) == list(range(10))


def test_flow_stack_shorter_than_L_repeats_last_flow():
    assert sampling.flow_stack_indices(2, num_flows=4, L=10) == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_flow_stack_odd_length():
    assert sampling.flow_stack_indices(10, num_flows=50, L=5) == [8, 9, 10, 11, 12]


@pytest.mark.parametrize("center", [-1, 101])
def test_flow_stack_rejects_centre_outside_video(center):
    with pytest.raises(ValueError, match="outside"):
        sampling.flow_stack_indices(center, num_flows=100)


def test_flow_stack_rejects_video_without_flow():
    with pytest.raises(ValueError, match="num_flows"):
        sampling.flow_stack_indices(0, num_flows=0)


# ---------------------------------------------------------------- a head's segments over P positions ([STFN] §4.2)

@pytest.mark.parametrize(
    "p, n, expected",
    [
        (25, 7, [[0, 3], [3, 7], [7, 10], [10, 14], [14, 17], [17, 21], [21, 25]]),
        (25, 5, [[0, 5], [5, 10], [10, 15], [15, 20], [20, 25]]),
        (10, 3, [[0, 3], [3, 6], [6, 10]]),
        (4, 4, [[0, 1], [1, 2], [2, 3], [3, 4]]),
        (25, 1, [[0, 25]]),
    ],
)
def test_segment_positions_table(p, n, expected):
    assert sampling.segment_positions(p, n).tolist() == expected


def test_too_few_positions_refused():
    with pytest.raises(ValueError, match="P >= N"):
        sampling.segment_positions(4, 5)
    with pytest.raises(ValueError, match=">= 1"):
        sampling.segment_positions(4, 0)


def test_eval_sequences_tables():
    # P=25, N=5: segments of 5 -> offsets floor((2j+1)*5/10) = j.
    assert sampling.eval_sequences(25, 5).tolist() == [[0 + j, 5 + j, 10 + j, 15 + j, 20 + j] for j in range(5)]
    # P=25, N=7, segment [0, 3): floor((2j+1)*3/10) = 0, 0, 1, 2, 2; segment [3, 7): 0, 1, 2, 2, 3.
    seqs = sampling.eval_sequences(25, 7)
    assert seqs.shape == (5, 7)
    assert seqs[:, 0].tolist() == [0, 0, 1, 2, 2]
    assert seqs[:, 1].tolist() == [3, 4, 5, 5, 6]


def test_train_positions_stays_in_segments_and_covers_them():
    g = torch.Generator().manual_seed(0)
    pos = sampling.train_positions(25, 7, g, num_videos=2000)
    bounds = torch.from_numpy(sampling.segment_positions(25, 7))
    assert pos.shape == (2000, 7) and pos.dtype == torch.int64
    assert ((pos >= bounds[:, 0]) & (pos < bounds[:, 1])).all()
    for s, (a, b) in enumerate(bounds.tolist()):
        assert sorted(pos[:, s].unique().tolist()) == list(range(a, b))
    again = sampling.train_positions(25, 7, torch.Generator().manual_seed(0), num_videos=2000)
    assert torch.equal(pos, again)
    assert sampling.train_positions(25, 7, g).shape == (7,)
