"""SCI score fusion ([FstCN] §2.4, eq. 5-7) and plain averaging, against hand-computed values."""

import pytest
import torch

from pipeline.eval.scores import average_scores, fuse_scores, sci, sci_fuse


def test_sci_eq5_by_hand():
    # C = 3: (3 * max / sum - 1) / 2
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    torch.testing.assert_close(sci(p), torch.tensor([0.25, 0.0, 1.0, 0.25]))


def test_sci_fuse_eq6_by_hand():
    scores = torch.tensor([[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]])  # SCI 0.25 and 1
    # (0.25 * p1 + 1 * p2) / 1.25
    torch.testing.assert_close(sci_fuse(scores), torch.tensor([[0.9, 0.06, 0.04]]))
    torch.testing.assert_close(average_scores(scores), torch.tensor([[0.75, 0.15, 0.1]]))


def test_sci_fuse_all_uniform_falls_back_to_mean():
    scores = torch.full((2, 3, 4), 0.25)
    torch.testing.assert_close(sci_fuse(scores), torch.full((2, 4), 0.25))


def test_bad_scores_refused():
    with pytest.raises(ValueError, match="non-negative"):
        sci_fuse(torch.tensor([[[-0.1, 1.1]]]))
    with pytest.raises(ValueError, match=r"\(V, views, C\)"):
        average_scores(torch.ones(3, 4))
    with pytest.raises(ValueError, match="valid: mean, sci"):
        fuse_scores(torch.ones(1, 2, 3), "max")
