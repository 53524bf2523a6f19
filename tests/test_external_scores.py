"""evaluate --external-scores with other tools' saved scores: tsn-pytorch ``--save_scores`` .npz and mmaction2
``--out`` / ``--dump`` .pkl, ordered by the test list they were made from (:mod:`pipeline.interop.scores`).

The files are built here the way those tools write them (tsn-pytorch's test_models.py reorders its outputs
into the sorted order of the list's first column and saves (segments, 1, C) logits per video); expected
probabilities are computed by hand with the softmax formula."""
import pickle

import numpy as np
import pytest
import torch

from pipeline.eval.results import ResultsError, read_external_scores
from test_evaluate import FLOW, RGB, finetune_output, invoke, rows_of

# The test list in the tool's order (not sorted), rawframe lines "frame_dir num_frames label".
LIST_LINES = ["/data/rawframes/b/v3 30 1", "/data/rawframes/a/v1 30 0", "/data/rawframes/b/v4 28 1",
              "/data/rawframes/a/v2 31 0"]
# Per list line: logits of 3 segments, 2 classes.
LOGITS = {
    "v3": [[0.0, 2.0], [0.5, 1.5], [1.0, 1.0]],  # mean (0.5, 1.5)
    "v1": [[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]],  # mean (2, 0)
    "v4": [[0.0, 0.0], [0.0, 0.3], [0.0, 0.0]],  # mean (0, 0.1)
    "v2": [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # mean (1, 0)
}
LABELS = {"v1": 0, "v2": 0, "v3": 1, "v4": 1}


def softmax2(a: float, b: float) -> list[float]:
    ea, eb = np.exp(a), np.exp(b)
    return [ea / (ea + eb), eb / (ea + eb)]


EXPECTED = {"v1": softmax2(2, 0), "v2": softmax2(1, 0), "v3": softmax2(0.5, 1.5), "v4": softmax2(0, 0.1)}


def write_list(path, lines=LIST_LINES):
    path.write_text("\n".join(lines) + "\n")
    return path


def tsn_save_scores(path, list_lines=LIST_LINES, labels=LABELS):
    """What tsn-pytorch's test_models.py --save_scores writes (old numpy made an object array (V, 2))."""
    name_list = [x.split()[0] for x in list_lines]
    order = {e: i for i, e in enumerate(sorted(name_list))}
    out = np.empty((len(name_list), 2), dtype=object)
    reorder_label = [None] * len(name_list)
    for name in name_list:
        vid = name.rsplit("/", 1)[-1]
        out[order[name], 0] = np.asarray(LOGITS[vid], dtype=np.float32).reshape(3, 1, 2)
        out[order[name], 1] = labels[vid]
        reorder_label[order[name]] = labels[vid]
    np.savez(path, scores=out, labels=np.asarray(reorder_label))
    return path


def by_video(ids, scores) -> dict:
    return {str(v).rsplit("/", 1)[-1]: list(s) for v, s in zip(ids, scores)}


def test_tsn_save_scores_reordered_by_the_sorted_list(tmp_path):
    lst = write_list(tmp_path / "test_list.txt")
    ids, scores, names = read_external_scores(tsn_save_scores(tmp_path / "tsn.npz"), lst)
    assert names is None
    got = by_video(ids, scores)
    assert set(got) == set(EXPECTED)
    for v in EXPECTED:
        assert got[v] == pytest.approx(EXPECTED[v], abs=1e-6), v
    # Without the list the file cannot be ordered: the error says what to give.
    with pytest.raises(ResultsError, match=r"tsn\.npz.*--external-list"):
        read_external_scores(tmp_path / "tsn.npz")


def test_tsn_scores_from_another_list_are_an_error(tmp_path):
    npz = tsn_save_scores(tmp_path / "tsn.npz")
    # Same videos, other labels: not the list these scores were made from.
    other = write_list(tmp_path / "other.txt", [line[:-1] + ("0" if line.endswith("1") else "1")
                                                for line in LIST_LINES])
    with pytest.raises(ResultsError, match=r"tsn\.npz: its labels differ from .*other\.txt"):
        read_external_scores(npz, other)
    short = write_list(tmp_path / "short.txt", LIST_LINES[:3])
    with pytest.raises(ResultsError, match=r"tsn\.npz: 4 score rows but .*short\.txt lists 3 videos"):
        read_external_scores(npz, short)
    bad = write_list(tmp_path / "bad.txt", ["/data/a/v1 30 zero"])
    with pytest.raises(ResultsError, match=r"bad\.txt:1: the last column 'zero' is not an integer label"):
        read_external_scores(npz, bad)


def test_mmaction2_0x_out_pickle_in_list_order(tmp_path):
    # 0.x tools/test.py --out results.pkl: one (C,) array per video, annotation order, logits (score averaging).
    lines = [line.split()[0] + ".mp4 " + line.split()[-1] for line in LIST_LINES]  # a video list this time
    lst = write_list(tmp_path / "val_list_videos.txt", lines)
    pkl = tmp_path / "results.pkl"
    with open(pkl, "wb") as f:
        pickle.dump([np.asarray(LOGITS[ln.split()[0].rsplit("/", 1)[-1]], np.float32).mean(0) for ln in LIST_LINES],
                    f)
    ids, scores, _ = read_external_scores(pkl, lst)
    assert [str(v) for v in ids] == ["/data/rawframes/b/v3", "/data/rawframes/a/v1", "/data/rawframes/b/v4",
                                     "/data/rawframes/a/v2"]  # the video suffix dropped
    for v, s in by_video(ids, scores).items():
        assert s == pytest.approx(EXPECTED[v], abs=1e-6), v
    with pytest.raises(ResultsError, match=r"results\.pkl: the mmaction2 results do not name their videos"):
        read_external_scores(pkl)


@pytest.mark.parametrize("version", ["1.x", "1.0"])
def test_mmaction2_1x_dump_named_by_frame_dir_or_filename(tmp_path, version):
    probs = {"v1": [0.9, 0.1], "v2": [0.6, 0.4], "v3": [0.2, 0.8], "v4": [0.45, 0.55]}
    samples = []
    for v in ["v2", "v4", "v1", "v3"]:
        if version == "1.x":  # 1.1+: pred_score / gt_label tensors, rawframe datasets put frame_dir
            samples.append({"pred_score": torch.tensor(probs[v]), "gt_label": torch.tensor([LABELS[v]]),
                            "frame_dir": f"data/ucf/rawframes/x/{v}", "num_classes": 2})
        else:  # 1.0: LabelData as dicts, video datasets put filename
            samples.append({"pred_scores": {"item": torch.tensor(probs[v])},
                            "gt_labels": {"item": torch.tensor([LABELS[v]])}, "filename": f"videos/x/{v}.avi"})
    pkl = tmp_path / "dump.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(samples, f)
    ids, scores, _ = read_external_scores(pkl)
    got = by_video(ids, scores)
    assert [str(v).rsplit("/", 1)[-1] for v in ids] == ["v2", "v4", "v1", "v3"]
    for v in probs:  # already probabilities: kept as they are
        assert got[v] == pytest.approx(probs[v], abs=1e-6)
    # With a list whose labels disagree with gt_label: an error naming both files.
    wrong = write_list(tmp_path / "wrong.txt", ["x/v2 5 1", "x/v4 5 1", "x/v1 5 0", "x/v3 5 1"])
    with pytest.raises(ResultsError, match=r"dump\.pkl: its labels differ from .*wrong\.txt's at 1 videos"):
        read_external_scores(pkl, wrong)


class _Evil:
    def __reduce__(self):
        import builtins
        return (builtins.open, ("PWNED", "w"))


def test_a_pickle_naming_another_callable_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump([np.zeros(2), _Evil()], f)
    with pytest.raises(ResultsError, match=r"evil\.pkl: not a readable scores pickle \(refused to build "
                                           r"(io|builtins)\.open"):
        read_external_scores(pkl, write_list(tmp_path / "l.txt", ["a 0", "b 1"]))
    assert not (tmp_path / "PWNED").exists()


def test_evaluate_with_tsn_scores_equals_the_same_probabilities_as_npz(tmp_path):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB)
    finetune_output(root, "flow", FLOW)
    lst = write_list(tmp_path / "ucf101_rawframes_val_split_1.txt")
    tsn = tsn_save_scores(tmp_path / "tsn.npz")
    res = invoke("evaluate", "--streams", "--external-scores", tsn, "--external-list", lst, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    foreign = rows_of(root)
    # The reference: the hand-computed probabilities as a plain external .npz.
    ref = tmp_path / "ref.npz"
    np.savez(ref, video_ids=np.array(list(EXPECTED)), scores=np.array(list(EXPECTED.values())))
    assert invoke("evaluate", "--streams", "--external-scores", ref, "--cache-dir", root).exit_code == 0
    plain = rows_of(root)
    for name in ("rgb stream", "flow stream"):
        assert foreign[name]["external"] == plain[name]["external"]
    # rgb + TSN by hand: v1 (.6+.881)/2 a ok; v2 (.4+.731)/2=.566 a ok; v3 (.7+.269)/2=.484 -> b ok;
    # v4 (.2+.475)/2=.338 -> b ok.
    assert foreign["rgb stream"]["external"]["top1"] == pytest.approx(1.0)


def test_external_list_needs_foreign_scores_and_scores(tmp_path):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB)
    lst = write_list(tmp_path / "list.txt")
    res = invoke("evaluate", "--external-list", lst, "--cache-dir", root)
    assert res.exit_code == 2 and "give both" in res.output
    csv_scores = tmp_path / "ext.csv"
    csv_scores.write_text("video_id,a,b\nv1,1,0\nv2,1,0\nv3,0,1\nv4,0,1\n")
    res = invoke("evaluate", "--external-scores", csv_scores, "--external-list", lst, "--cache-dir", root)
    assert res.exit_code == 2 and "ext.csv: names its videos" in res.output, res.output
