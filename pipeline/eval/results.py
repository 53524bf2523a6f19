"""Results: per-video test scores on disk, their accuracy figures, and markdown tables of them.

Every stage that evaluates on the test split (``finetune/<stream>``, ``train-head/<name>``, ``refine/...``)
writes ``test_scores.npz`` in its folder:

==============  ==============  ==========================================================
key             shape, dtype    what
==============  ==============  ==========================================================
``scores``      (V, C) float32  class probabilities per test video (views already fused)
``video_ids``   (V,) str        the store's video ids
``labels``      (V,) int64      true class index
``class_names`` (C,) str        index -> name
==============  ==============  ==========================================================

This module reads and writes that file, fuses scores (two-stream late fusion, averaging with another
model's scores: the "+MIFS" column of [STFN] Table 6) and formats rows of top-1 / mean class accuracy /
per-class accuracy as markdown. No Click, no training.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from pipeline.io.atomic import atomic_write
from pipeline.eval.metrics import Evaluation, accuracy_metrics

__all__ = [
    "TestScores", "save_test_scores", "load_test_scores", "late_fusion", "read_external_scores",
    "match_external", "combine_scores", "ResultRow", "mean_std", "fmt_pct",
    "fmt_mean_std", "markdown_table", "results_markdown", "per_class_markdown",
]


class ResultsError(ValueError):
    """Scores that cannot be read or combined; the message names the file."""


@dataclass
class TestScores:
    """Per-video class probabilities of one model on the test split."""

    __test__ = False  # not a pytest class

    scores: np.ndarray  # (V, C) float32
    video_ids: np.ndarray  # (V,) str
    labels: np.ndarray  # (V,) int64
    class_names: np.ndarray  # (C,) str

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.video_ids = np.asarray(self.video_ids).astype(str)
        self.labels = np.asarray(self.labels).astype(np.int64)
        self.class_names = np.asarray(self.class_names).astype(str)
        v = self.video_ids.shape[0]
        if self.scores.ndim != 2 or self.scores.shape != (v, self.class_names.shape[0]):
            raise ResultsError(f"scores must be (V={v}, C={self.class_names.shape[0]}), got {self.scores.shape}")
        if self.labels.shape != (v,):
            raise ResultsError(f"labels must be ({v},), got {self.labels.shape}")
        if len(set(self.video_ids.tolist())) != v:
            raise ResultsError("video ids are not unique")

    def metrics(self) -> Evaluation:
        """Top-1, top-5, mean class accuracy, ... of these scores (:func:`pipeline.eval.metrics.accuracy_metrics`)."""
        return accuracy_metrics(self.scores, self.labels, self.class_names.tolist())

    def aligned_to(self, other: "TestScores", what: str = "scores") -> "TestScores":
        """These scores reordered to ``other``'s videos; ValueError if videos, labels or classes differ."""
        if self.class_names.tolist() != other.class_names.tolist():
            raise ResultsError(f"{what}: classes differ ({self.class_names.tolist()[:5]}... vs "
                               f"{other.class_names.tolist()[:5]}...)")
        index = {v: i for i, v in enumerate(self.video_ids.tolist())}
        missing = [v for v in other.video_ids.tolist() if v not in index]
        if missing or len(index) != len(other.video_ids):
            raise ResultsError(f"{what}: test videos differ ({len(missing)} of {len(other.video_ids)} missing, "
                               f"e.g. {missing[:3]}; {len(index)} vs {len(other.video_ids)} videos)")
        order = np.array([index[v] for v in other.video_ids.tolist()], dtype=np.int64)
        if not np.array_equal(self.labels[order], other.labels):
            raise ResultsError(f"{what}: labels of the same videos differ")
        return TestScores(self.scores[order], other.video_ids, other.labels, other.class_names)


def save_test_scores(path: Path, ts: TestScores, **extra: np.ndarray) -> Path:
    """Write ``ts`` to ``path`` (.npz) atomically, with any ``extra`` arrays beside (finetune's ``logits``)."""
    with atomic_write(path) as f:
        np.savez(f, **extra, scores=ts.scores, video_ids=ts.video_ids, labels=ts.labels, class_names=ts.class_names)
    return Path(path)


def load_test_scores(path: Path) -> TestScores:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no test scores file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("scores", "video_ids", "labels", "class_names") if k not in z.files]
            if missing:
                raise ResultsError(f"{path}: missing arrays {missing} (has {z.files})")
            return TestScores(z["scores"], z["video_ids"], z["labels"], z["class_names"])
    except ResultsError as e:
        if str(path) in str(e):
            raise
        raise ResultsError(f"{path}: {e}") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable test scores ({e})") from None


def late_fusion(rgb: TestScores, flow: TestScores, flow_weight: float = 1.5) -> TestScores:
    """Two-stream late fusion (rgb + w flow) / (1 + w) of video scores (TSN weighs flow 1.5 : 1 rgb)."""
    if flow_weight < 0:
        raise ResultsError(f"flow weight must be >= 0, got {flow_weight}")
    flow = flow.aligned_to(rgb, "late fusion (flow vs rgb test scores)")
    fused = (rgb.scores + flow_weight * flow.scores) / (1.0 + flow_weight)
    return TestScores(fused, rgb.video_ids, rgb.labels, rgb.class_names)


def read_external_scores(path: Path, list_file: Path | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Another model's per-video scores: (video_ids (V,), scores (V, C) float64, class names or None).

    ``.npz``: arrays ``video_ids``, ``scores`` and optionally ``class_names``. ``.csv``: a header row
    ``video_id,<class 1>,...,<class C>`` (the class columns named by class name, any order, or by index
    0..C-1), then one row per video. tsn-pytorch's ``--save_scores`` ``.npz`` (no ``video_ids``) and
    mmaction2's ``.pkl`` results, in the order of the test list ``list_file`` they were made from:
    :mod:`pipeline.interop.scores`.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: external scores file not found")
    foreign = path.suffix in (".pkl", ".pickle") or (path.suffix == ".npz" and not _has_video_ids(path))
    if list_file is not None and not foreign:
        raise ResultsError(f"{path}: names its videos; a list file ({list_file}) is only for tsn-pytorch .npz and "
                           "mmaction2 .pkl scores")
    if foreign:
        from pipeline.interop.scores import ForeignScoresError, read_foreign_scores
        try:
            ids, scores, names = read_foreign_scores(path, list_file)
        except ForeignScoresError as e:
            raise ResultsError(str(e)) from None
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "video_ids" not in z.files or "scores" not in z.files:
                    raise ResultsError(f"{path}: an external scores .npz needs arrays video_ids and scores "
                                       f"(has {z.files})")
                ids, scores = z["video_ids"].astype(str), z["scores"].astype(np.float64)
                names = z["class_names"].astype(str) if "class_names" in z.files else None
        except (OSError, ValueError) as e:
            raise ResultsError(f"{path}: unreadable external scores ({e})") from None
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if len(rows) < 2:
            raise ResultsError(f"{path}: needs a header row (video_id, one column per class) and score rows")
        header = [c.strip() for c in rows[0]]
        if len(header) < 3:
            raise ResultsError(f"{path}: header {header} has fewer than 2 class columns")
        ids_list, values = [], []
        for line, r in enumerate(rows[1:], start=2):
            if len(r) != len(header):
                raise ResultsError(f"{path}, line {line}: {len(r)} columns, the header has {len(header)}")
            ids_list.append(r[0].strip())
            try:
                values.append([float(x) for x in r[1:]])
            except ValueError:
                raise ResultsError(f"{path}, line {line}: non-numeric score in {r[1:]}") from None
        ids, scores = np.asarray(ids_list), np.asarray(values, dtype=np.float64)
        names = np.asarray(header[1:])
        if all(n.isdigit() for n in names):
            if sorted(int(n) for n in names) != list(range(len(names))):
                raise ResultsError(f"{path}: numeric class columns must be 0..C-1, got {names.tolist()}")
            scores = scores[:, np.argsort([int(n) for n in names])]
            names = None
    else:
        raise ResultsError(f"{path}: external scores must be a .npz, .csv or mmaction2 .pkl file")
    if scores.ndim != 2 or scores.shape[0] != ids.shape[0]:
        raise ResultsError(f"{path}: scores {scores.shape} do not match {ids.shape[0]} video ids")
    if not np.isfinite(scores).all():
        raise ResultsError(f"{path}: scores contain NaN or inf")
    if len(set(ids.tolist())) != ids.shape[0]:
        raise ResultsError(f"{path}: duplicate video ids")
    return ids, scores, names


def _has_video_ids(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "video_ids" in z.files
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable external scores ({e})") from None


def match_external(ours: TestScores, ids: np.ndarray, scores: np.ndarray, names: np.ndarray | None,
                   path: Path | str = "external scores") -> np.ndarray:
    """The external scores (V, C) in the order of ``ours``' videos and classes.

    Videos match by id, or by the id's last path component (``Class/v_Class_g01_c01`` ==
    ``v_Class_g01_c01``) when that is unique. Every one of our test videos must be present (extra
    external videos are ignored); classes must be ours (by name, or C columns in our index order).
    """
    ours_names = ours.class_names.tolist()
    if names is not None:
        names = [str(n) for n in names]
        unknown = sorted(set(names) - set(ours_names))
        missing = sorted(set(ours_names) - set(names))
        if unknown or missing or len(names) != len(ours_names):
            raise ResultsError(f"{path}: classes differ from ours: unknown {unknown[:5]}, missing {missing[:5]} "
                               f"({len(names)} columns, we have {len(ours_names)} classes)")
        scores = scores[:, [names.index(n) for n in ours_names]]
    elif scores.shape[1] != len(ours_names):
        raise ResultsError(f"{path}: {scores.shape[1]} score columns, we have {len(ours_names)} classes")
    full = {v: i for i, v in enumerate(ids.tolist())}
    base: dict[str, int | None] = {}
    for v, i in full.items():
        key = v.rsplit("/", 1)[-1]
        base[key] = None if key in base else i
    rows, missing_videos = [], []
    for v in ours.video_ids.tolist():
        i = full.get(v)
        if i is None:
            i = base.get(v.rsplit("/", 1)[-1])
        if i is None:
            missing_videos.append(v)
        rows.append(i)
    if missing_videos:
        raise ResultsError(f"{path}: no scores for {len(missing_videos)} of our {len(rows)} test videos, "
                           f"e.g. {missing_videos[:3]}")
    return scores[np.asarray(rows, dtype=np.int64)]


def combine_scores(ours: TestScores, external: np.ndarray, weight: float = 1.0) -> TestScores:
    """(ours + w external) / (1 + w): [STFN] §4.8 "by averaging prediction scores" (w = 1)."""
    fused = (ours.scores.astype(np.float64) + weight * external) / (1.0 + weight)
    return TestScores(fused, ours.video_ids, ours.labels, ours.class_names)


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ResultRow:
    """One line of a results table."""

    name: str
    source: str  # the stage key(s) it comes from
    evaluation: Evaluation
    description: str = ""
    external: Evaluation | None = None  # our scores averaged with external ones
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"name": self.name, "source": self.source, "description": self.description,
               **self.evaluation.as_dict(), **self.extra}
        if self.external is not None:
            out["external"] = {"top1": self.external.top1,
                               "mean_class_accuracy": self.external.mean_class_accuracy}
        return out


def fmt_pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float]) -> str:
    """"83.3" for one value, "83.3 ± 1.2" (percent, sample std) for several."""
    if len(values) == 1:
        return fmt_pct(values[0])
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` one of l/r per column (default: first left, others right)."""
    header = [str(h) for h in header]
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(header) - 1)
    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_markdown(rows: Sequence[ResultRow], external_name: str | None = None) -> str:
    """Row | source | videos | top-1 | top-5 | mean class accuracy [| +external top-1 | +external mean class]."""
    header = ["row", "from", "videos", "top-1 (%)", "top-5 (%)", "mean class acc. (%)"]
    if external_name:
        header += [f"+{external_name} top-1 (%)", f"+{external_name} mean class (%)"]
    body = []
    for r in rows:
        line = [r.name, r.source, str(int(r.evaluation.confusion.sum())), fmt_pct(r.evaluation.top1),
                fmt_pct(r.evaluation.top5), fmt_pct(r.evaluation.mean_class_accuracy)]
        if external_name:
            ext = r.external
            line += [fmt_pct(ext.top1 if ext else None), fmt_pct(ext.mean_class_accuracy if ext else None)]
        body.append(line)
    return markdown_table(header, body, "lll" + "r" * (len(header) - 3))


def splits_summary(rows_of: Mapping[int, Sequence[ResultRow]]) -> list[dict]:
    """Rows matched by name across splits: each split's top-1 / top-5 / mean class accuracy and, for a row
    finished on every split, their mean and sample std ([STFN] Table 6 reports the mean over 3 splits)."""
    names: list[str] = []
    for rows in rows_of.values():
        names += [r.name for r in rows if r.name not in names]
    out = []
    for name in names:
        per = {split: next(r.evaluation for r in rows if r.name == name)
               for split, rows in rows_of.items() if any(r.name == name for r in rows)}
        rec: dict = {"name": name, "splits": {str(s): {"top1": e.top1, "mean_class_accuracy": e.mean_class_accuracy,
                                                      "top5": None if math.isnan(e.top5) else e.top5}
                                             for s, e in per.items()}}
        if len(per) == len(rows_of):
            for metric in ("top1", "mean_class_accuracy", "top5"):
                values = [getattr(e, metric) for e in per.values()]
                if not any(math.isnan(v) for v in values):
                    rec[metric] = dict(zip(("mean", "std"), mean_std(values)))
        out.append(rec)
    return out


def splits_markdown(summary: Sequence[dict], splits: Sequence[int]) -> str:
    """Row | top-1 of each split | mean ± std of top-1, mean class accuracy and top-5 (percent)."""
    def cell(rec: dict, metric: str) -> str:
        m = rec.get(metric)
        return "–" if m is None else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"

    header = ["row", *(f"split {s} top-1" for s in splits), "top-1 mean ± std", "mean class acc. mean ± std",
              "top-5 mean ± std"]
    body = [[rec["name"], *(fmt_pct((rec["splits"].get(str(s)) or {}).get("top1")) for s in splits),
             cell(rec, "top1"), cell(rec, "mean_class_accuracy"), cell(rec, "top5")] for rec in summary]
    return markdown_table(header, body)


def per_class_csv(evaluation: Evaluation) -> str:
    """The per-class report of one row as CSV: class, support, predicted, precision, recall, f1 (empty where
    undefined; :func:`pipeline.eval.metrics.per_class_report`)."""
    import io

    from pipeline.eval.metrics import per_class_report

    buf = io.StringIO()
    fields = ["class", "support", "predicted", "precision", "recall", "f1"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for rec in per_class_report(evaluation.confusion, evaluation.class_names):
        w.writerow({k: ("" if rec[k] is None else f"{rec[k]:.6f}" if isinstance(rec[k], float) else rec[k])
                    for k in fields})
    return buf.getvalue()


def per_class_markdown(rows: Sequence[ResultRow], class_names: Sequence[str]) -> str:
    """Per-class accuracy (%). Up to 20 classes: one line per result row, one column per class;
    more classes: one line per class, one column per result row."""
    if len(class_names) <= 20:
        header = ["row", *class_names]
        body = [[r.name, *(fmt_pct(float(a)) for a in r.evaluation.per_class_accuracy)] for r in rows]
    else:
        header = ["class", *(r.name for r in rows)]
        body = [[c, *(fmt_pct(float(r.evaluation.per_class_accuracy[i])) for r in rows)]
                for i, c in enumerate(class_names)]
    return markdown_table(header, body)
