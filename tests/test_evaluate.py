"""evaluate: per-stream and late-fusion rows ([STFN] Table 5), external scores, re-runs, bad input."""
import csv
import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.io import artifacts
from pipeline.stage import Plan, Stage, param, run_stage, status
from stages.cli import main
from pipeline.eval.results import TestScores, save_test_scores
from stages import all_stages
from stages.finetune import VERSION as FINETUNE_VERSION

CLASSES = ["a", "b"]
IDS = ["a/v1", "a/v2", "b/v3", "b/v4"]
LABELS = [0, 0, 1, 1]
# Hand-made probabilities; predictions marked: rgb right on v1, v4 (top-1 0.5); flow right on v2, v3, v4.
RGB = [[0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]]
FLOW = [[0.3, 0.7], [0.8, 0.2], [0.45, 0.55], [0.1, 0.9]]


@dataclass(frozen=True)
class FakeFinetuneParams:
    stream: str = param("rgb", "stream")
    tag: str = param("", "changes the fingerprint")
    split: int = param(1, "split")


EVAL = artifacts.evaluate_key((1,))  # evaluate/split1-resnet101


def finetune_output(root: Path, stream: str, scores, ids=IDS, labels=LABELS, classes=CLASSES, tag="",
                    split=1, trained_on=None) -> None:
    """A finished finetune/<stream> output with the given test scores (test-only stage, real version)."""
    def run(ctx, plan):
        save_test_scores(ctx.dir / "test_scores.npz", TestScores(np.array(scores), ids, labels, classes))
        return {}

    stage = Stage(name="finetune", version=FINETUNE_VERSION, params_type=FakeFinetuneParams, run=run,
                  key=lambda p: artifacts.finetune_key(p.stream, split), plan=lambda p, u: Plan(json.dumps(scores)))
    run_stage(stage, FakeFinetuneParams(stream, tag, split if trained_on is None else trained_on), root)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows_of(root: Path) -> dict:
    return {r["name"]: r for r in json.loads((root / EVAL / "results.json").read_text())["rows"]}


def test_streams_and_late_fusion_by_hand(tmp_path):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB)
    finetune_output(root, "flow", FLOW)
    res = invoke("evaluate", "--streams", "--cache-dir", root)
    assert res.exit_code == 0, res.output
    rows = rows_of(root)
    assert rows["rgb stream"]["top1"] == pytest.approx(0.5)
    assert rows["flow stream"]["top1"] == pytest.approx(0.75)
    assert rows["flow stream"]["per_class_accuracy"] == {"a": 0.5, "b": 1.0}
    assert rows["flow stream"]["mean_class_accuracy"] == pytest.approx(0.75)
    # Late fusion 1 : 1.5, by hand: v1 (.6 + 1.5 * .3) / 2.5 = .42 -> b (wrong); v2 .64 -> a (right);
    # v3 .55 -> a (wrong); v4 .14 -> b (right).
    late = rows["late fusion rgb+flow (1:1.5)"]
    assert late["top1"] == pytest.approx(0.5) and late["confusion"] == [[1, 1], [1, 1]]
    text = (root / EVAL / "results.md").read_text()
    assert "| rgb stream | finetune/split1-resnet101/rgb | 4 | 50.0 | – | 50.0 |" in text  # top-5: < 5 classes
    assert "## Per-class accuracy" in text
    assert (root / EVAL / "confusion" / "flow_stream.png").is_file()
    # Per-class precision / recall / F1 of the flow stream, by hand: predicted b, a, b, b for a, a, b, b.
    # a: 1 of 2 found (recall .5), 1 predicted and right (precision 1), F1 2 * 1 * .5 / 1.5 = .6667;
    # b: 2 of 2 (recall 1), 3 predicted (precision .6667), F1 .8.
    with open(root / EVAL / "per_class" / "flow_stream.csv") as f:
        report = {r["class"]: r for r in csv.DictReader(f)}
    assert {k: float(report["a"][k]) for k in ("precision", "recall", "f1")} == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3}, abs=1e-6)
    assert {k: float(report["b"][k]) for k in ("precision", "recall", "f1")} == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8}, abs=1e-6)
    assert report["b"]["support"] == "2" and report["b"]["predicted"] == "3"
    assert "late fusion" in res.output and "75.0" in res.output  # the table is printed
    # Unchanged: a no-op; another flow weight: recomputed. With w = 0 late fusion is the rgb stream.
    assert "nothing to do" in invoke("evaluate", "--streams", "--cache-dir", root).output
    res = invoke("evaluate", "--streams", "--flow-weight", 0, "--cache-dir", root)
    assert res.exit_code == 0 and "nothing to do" not in res.output
    assert rows_of(root)["late fusion rgb+flow (1:0)"]["confusion"] == rows_of(root)["rgb stream"]["confusion"]


def test_external_scores_averaged_by_hand(tmp_path):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB)
    finetune_output(root, "flow", FLOW)
    # Classes in another column order, ids without the class folder (matched by their last component).
    ext = tmp_path / "mifs.csv"
    ext.write_text("video_id,b,a\nv1,0.1,0.9\nv2,0.1,0.9\nv3,0.9,0.1\nv4,0.15,0.85\nextra,0.5,0.5\n")
    res = invoke("evaluate", "--streams", "--external-scores", ext, "--external-name", "MIFS", "--cache-dir", root)
    assert res.exit_code == 0, res.output
    rows = rows_of(root)
    # rgb + MIFS: v1 (.75, .25) a ok; v2 (.65, .35) a ok; v3 (.4, .6) b ok; v4 (.525, .475) a wrong.
    assert rows["rgb stream"]["external"]["top1"] == pytest.approx(0.75)
    assert rows["rgb stream"]["external"]["mean_class_accuracy"] == pytest.approx(0.75)
    # flow + MIFS: v1 (.6, .4), v2 (.85, .15), v3 (.275, .725), v4 (.475, .525): all right.
    assert rows["flow stream"]["external"]["top1"] == pytest.approx(1.0)
    assert "+MIFS top-1 (%)" in (root / EVAL / "results.md").read_text()
    # The same scores as .npz, classes named: same figures.
    npz = tmp_path / "mifs.npz"
    np.savez(npz, video_ids=np.array(["v1", "v2", "v3", "v4"]), class_names=np.array(["b", "a"]),
             scores=np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.15, 0.85]]))
    assert invoke("evaluate", "--streams", "--external-scores", npz, "--cache-dir", root).exit_code == 0
    assert rows_of(root)["rgb stream"]["external"]["top1"] == pytest.approx(0.75)


@pytest.mark.parametrize("content, message", [
    ("video_id,a,b\nv1,1,0\nv2,1,0\nv3,0,1\n", "no scores for 1 of our 4 test videos"),
    ("video_id,a,c\nv1,1,0\nv2,1,0\nv3,0,1\nv4,0,1\n", "classes differ from ours"),
    ("video_id,a,b,c\nv1,1,0,0\nv2,1,0,0\nv3,0,1,0\nv4,0,1,0\n", "classes differ from ours"),
    ("video_id,a,b\nv1,1,x\n", "non-numeric score"),
])
def test_external_scores_mismatch_is_a_clear_error(tmp_path, content, message):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB)
    ext = tmp_path / "ext.csv"
    ext.write_text(content)
    res = invoke("evaluate", "--external-scores", ext, "--cache-dir", root)
    assert res.exit_code == 2 and message in res.output and "ext.csv" in res.output, res.output


def test_mismatched_stream_videos_and_nothing_to_evaluate(tmp_path):
    root = tmp_path / "cache"
    res = invoke("evaluate", "--cache-dir", root)
    assert res.exit_code == 2 and "nothing to evaluate" in res.output
    finetune_output(root, "rgb", RGB)
    finetune_output(root, "flow", FLOW[:3], ids=IDS[:3], labels=LABELS[:3])
    res = invoke("evaluate", "--streams", "--cache-dir", root)
    assert res.exit_code == 2 and "test videos differ" in res.output, res.output


def test_head_rows_and_staleness(tmp_path):
    from tests.test_train_head import build_upstream, make_features

    root = tmp_path / "cache"
    build_upstream(root, make_features())
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train-head]\nmax_epochs = 1\nsegments = 2\ndevice = "cpu"\n')
    assert invoke("train-head", "--head", "tsn", "--config", cfg, "--cache-dir", root).exit_code == 0
    res = invoke("evaluate", "--cache-dir", root)
    assert res.exit_code == 0, res.output
    row = rows_of(root)["tsn-n2-s0"]
    with np.load(root / artifacts.head_key("tsn-n2-s0") / "test_scores.npz") as z:
        assert row["top1"] == pytest.approx(float((z["scores"].argmax(1) == z["labels"]).mean()))
    # --streams with no finetune output: nothing to evaluate.
    assert "nothing to evaluate" in invoke("evaluate", "--streams", "--cache-dir", root).output
    # The head changes: evaluate is stale, then recomputes.
    assert invoke("train-head", "--head", "tsn", "--lr", 0.01, "--config", cfg, "--cache-dir", root).exit_code == 0
    state = {r.key: r for r in status(root, all_stages())}
    assert state[EVAL].state == "stale" and artifacts.head_key("tsn-n2-s0") in state[EVAL].reason
    res = invoke("evaluate", "--cache-dir", root)
    assert res.exit_code == 0 and "nothing to do" not in res.output
    assert {r.key: r.state for r in status(root, all_stages())}[EVAL] == "fresh"


# Three splits, 4 test videos each, hand-made so that each split's accuracies are known:
#   rgb top-1: split 1 2/4, split 2 3/4, split 3 4/4 -> mean 75.0, sample std 25.0
#   flow top-1: split 1 3/4, split 2 3/4, split 3 1/4 -> mean 58.3, sample std sqrt(((.75-.5833)^2 * 2 +
#   (.25-.5833)^2) / 2) = 28.9
SPLIT_SCORES = {
    1: (RGB, FLOW),
    2: ([[0.6, 0.4], [0.7, 0.3], [0.3, 0.7], [0.6, 0.4]], FLOW),
    3: ([[0.6, 0.4], [0.7, 0.3], [0.3, 0.7], [0.2, 0.8]], [[0.4, 0.6], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]]),
}


def test_three_splits_mean_and_std_by_hand(tmp_path):
    root = tmp_path / "cache"
    for split, (rgb, flow) in SPLIT_SCORES.items():
        finetune_output(root, "rgb", rgb, split=split)
        finetune_output(root, "flow", flow, split=split)
    res = invoke("evaluate", "--streams", "--splits", "1,2,3", "--cache-dir", root)
    assert res.exit_code == 0, res.output
    out = root / "evaluate" / "splits1-2-3-resnet101"
    summary = {r["name"]: r for r in json.loads((out / "results.json").read_text())["summary"]}
    rgb, flow = summary["rgb stream"], summary["flow stream"]
    assert [rgb["splits"][s]["top1"] for s in "123"] == pytest.approx([0.5, 0.75, 1.0])
    assert rgb["top1"]["mean"] == pytest.approx(0.75) and rgb["top1"]["std"] == pytest.approx(0.25)
    assert [flow["splits"][s]["top1"] for s in "123"] == pytest.approx([0.75, 0.75, 0.25])
    m = (0.75 + 0.75 + 0.25) / 3
    assert flow["top1"]["mean"] == pytest.approx(m)
    assert flow["top1"]["std"] == pytest.approx((((0.75 - m) ** 2 * 2 + (0.25 - m) ** 2) / 2) ** 0.5)
    # Mean class accuracy of split 3's flow: class a 0/2, class b 1/2 -> 25 %.
    assert flow["splits"]["3"]["mean_class_accuracy"] == pytest.approx(0.25)
    text = (out / "results.md").read_text()
    assert "| rgb stream | 50.0 | 75.0 | 100.0 | 75.0 ± 25.0 |" in text
    assert "| flow stream | 75.0 | 75.0 | 25.0 | 58.3 ± 28.9 |" in text
    # Each split's own evaluation is its own output; the three-split one only aggregates.
    assert invoke("evaluate", "--streams", "--split", 2, "--cache-dir", root).exit_code == 0
    assert rows_of_key(root, artifacts.evaluate_key((2,)))["rgb stream"]["top1"] == pytest.approx(0.75)


def rows_of_key(root: Path, key: str) -> dict:
    return {r["name"]: r for r in json.loads((root / key / "results.json").read_text())["rows"]}


def test_a_missing_split_is_named_and_a_model_of_another_split_is_refused(tmp_path):
    root = tmp_path / "cache"
    finetune_output(root, "rgb", RGB, split=1)
    res = invoke("evaluate", "--streams", "--splits", "1,2", "--cache-dir", root)
    assert res.exit_code == 2 and "split 2" in res.output and "split1-resnet101" in res.output, res.output
    # A split-1 network stored as split 2 (a copied folder): its test scores would include training videos.
    finetune_output(root, "rgb", RGB, split=2, trained_on=1)
    res = invoke("evaluate", "--streams", "--split", 2, "--cache-dir", root)
    assert res.exit_code == 2 and "trained on split 1" in res.output, res.output


def test_top5_and_per_class_report_by_hand():
    from pipeline.eval.metrics import accuracy_metrics, per_class_report

    # 6 classes, 3 videos. Video 0 (class 0): class 0 ranked 1st. Video 1 (class 1): ranked 5th (in the top 5).
    # Video 2 (class 2): ranked 6th (last, outside). Top-1 1/3, top-5 2/3.
    scores = np.array([[.9, .05, .02, .01, .01, .01],
                       [.30, .05, .25, .20, .15, .05 - 1e-3],
                       [.3, .2, .0, .2, .2, .1]])
    ev = accuracy_metrics(scores, np.array([0, 1, 2]), [f"c{i}" for i in range(6)])
    assert ev.top1 == pytest.approx(1 / 3) and ev.top5 == pytest.approx(2 / 3)
    # Confusion by hand for labels 0, 0, 1, 1, 2 and predictions 0, 1, 1, 1, 0.
    confusion = np.zeros((3, 3), int)
    for t, q in zip([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]):
        confusion[t, q] += 1
    r = per_class_report(confusion, ["x", "y", "z"])
    assert (r[0]["precision"], r[0]["recall"], r[0]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (r[1]["precision"], r[1]["recall"], r[1]["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert r[2]["precision"] is None and r[2]["recall"] == 0.0 and r[2]["f1"] is None
    assert [x["support"] for x in r] == [2, 2, 1] and [x["predicted"] for x in r] == [2, 3, 0]


def test_stmultiplier_head_rows_say_they_approximate_and_only_they_go_stale_on_its_version(tmp_path, monkeypatch):
    """The gated head on pooled features is labelled as the approximation of [ST-Mult] it is; a bump of its own
    version (its training changed: the paper's two losses) changes its fingerprint, so re-running it
    recomputes, and no other head's (a re-run of those does nothing)."""
    from pipeline.models import heads
    from tests.test_train_head import build_upstream, make_features

    root = tmp_path / "cache"
    build_upstream(root, make_features())
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train-head]\nmax_epochs = 1\nsegments = 2\ndevice = "cpu"\n')
    for head in ("tsn", "stmultiplier"):
        assert invoke("train-head", "--head", head, "--config", cfg, "--cache-dir", root).exit_code == 0
    assert invoke("evaluate", "--cache-dir", root).exit_code == 0
    assert set(rows_of(root)) == {"tsn-n2-s0", "stmultiplier-n2-s0 (pooled-feature approximation of [ST-Mult])"}
    monkeypatch.setitem(heads.HEADS, "stmultiplier", dataclasses.replace(heads.HEADS["stmultiplier"], version="3"))
    for head, recomputed in (("tsn", False), ("stmultiplier", True)):
        res = invoke("train-head", "--head", head, "--config", cfg, "--cache-dir", root)
        assert res.exit_code == 0 and ("nothing to do" not in res.output) == recomputed, (head, res.output)
