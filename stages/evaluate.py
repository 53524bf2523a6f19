"""``evaluate``: the results table of everything finished in the cache.

Rows, each with top-1 and mean class accuracy on the test split (TSN reports the latter):

- per stream, from ``finetune/<stream>/test_scores.npz`` ([STFN] Table 5 "Appear." / "Motion"), and their
  two-stream late fusion (rgb + w flow) / (1 + w), ``--flow-weight`` w = 1.5 by default as in TSN;
- every finished ``train-head/<name>`` (including the rows ``pipeline ablate`` trained);
- every finished ``refine/<name>`` that wrote ``test_scores.npz``.

``--streams`` restricts the table to the finetune rows. ``--external-scores FILE`` (``.npz`` with
``video_ids``, ``scores`` [, ``class_names``], or ``.csv`` with a ``video_id,<class>...`` header) adds two
columns: each row's scores averaged with the external ones ([STFN] §4.8, the "+MIFS" column of Table 6),
``--external-weight`` w giving (ours + w external) / (1 + w). Videos are matched by id (or by the id's last
path component); a test video without external scores, or other classes, is an error naming the file.

Outputs in ``<cache>/evaluate/``: ``results.md`` (the table, a per-class accuracy table, notes),
``results.json`` (every figure, per-class accuracies and confusion matrices), ``confusion/<row>.png``.

The stage's upstream is whatever it reads: its plan lists the finished outputs above and records their
fingerprints as its upstream, so re-running with nothing changed is a no-op, a changed or new head makes it
recompute, and ``pipeline status`` shows it stale when one of the outputs it read changed.

Examples::

    pipeline evaluate
    pipeline evaluate --streams --flow-weight 1.0
    pipeline evaluate --external-scores mifs_ucf101_split1.csv --external-name MIFS
"""
from __future__ import annotations

import json

import re
from dataclasses import dataclass
from pathlib import Path


from pipeline.eval.results import (ResultRow, ResultsError, TestScores, combine_scores, finished_outputs,
                                   late_fusion, load_test_scores, match_external, per_class_markdown,
                                   read_external_scores, results_markdown)
from pipeline.io import artifacts
from pipeline.io.artifacts import SCORES
from pipeline.io.atomic import write_json, write_text
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, file_sha256, param

VERSION = "1"
#: The stages whose finished outputs become rows.
SOURCES = (artifacts.FINETUNE, artifacts.TRAIN_HEAD, artifacts.REFINE)


@dataclass(frozen=True)
class EvaluateParams:
    streams: bool = param(False, "Only the finetune rows: each stream and their late fusion ([STFN] Table 5).")
    flow_weight: float = param(1.5, "Late fusion weight of the flow stream (rgb 1 : flow w; TSN uses 1.5).")
    external_scores: Path | None = param(None, "Another model's per-video test scores (.npz or .csv) to average "
                                         "with ours, as the paper's +MIFS column.")
    external_weight: float = param(1.0, "Weight w of the external scores: (ours + w external) / (1 + w).")
    external_name: str = param("external", "Column label of the external scores (e.g. MIFS).")
    per_class: str = param("", "Comma-separated row names for the per-class accuracy table (default: every "
                           "row when there are at most 20 classes, else the best row by top-1).")

    def validate(self) -> None:
        if self.flow_weight < 0:
            raise StageError(f"--flow-weight must be >= 0 (got {self.flow_weight})")
        if self.external_weight < 0:
            raise StageError(f"--external-weight must be >= 0 (got {self.external_weight})")
        if self.external_scores is not None and not Path(self.external_scores).is_file():
            raise StageError(f"--external-scores {self.external_scores}: file not found")


def _sources(params: EvaluateParams, cache_root: Path) -> list[tuple[str, dict]]:
    prefixes = (artifacts.FINETUNE,) if params.streams else SOURCES
    return [(k, m) for k, m in finished_outputs(cache_root, prefixes) if (cache_root / k / SCORES).is_file()]


def plan(params: EvaluateParams, upstream: Upstream) -> Plan:
    found = _sources(params, upstream.cache_root)
    if not found:
        what = "finetune/*" if params.streams else "finetune/*, train-head/* or refine/*"
        raise StageError(f"nothing to evaluate: no finished {what} output with {SCORES} in "
                         f"{upstream.cache_root} (run `pipeline finetune` / `pipeline train-head` first)")
    ext = ""
    if params.external_scores is not None:
        ext = file_sha256(Path(params.external_scores))
    return Plan(ext, [k for k, _ in found], f"{len(found)} finished outputs")


def _row_name(key: str) -> str:
    stage, rest = artifacts.split_key(key)
    return {artifacts.FINETUNE: f"{rest} stream", artifacts.REFINE: f"refine {rest}"}.get(stage, rest)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "row"


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot

    p: EvaluateParams = ctx.params
    root = ctx.upstream.cache_root
    keys: list[str] = plan.data
    manifests = ctx.upstream.manifests
    external = None
    if p.external_scores is not None:
        try:
            external = read_external_scores(Path(p.external_scores))
        except ResultsError as e:
            raise StageError(str(e)) from None

    rows: list[ResultRow] = []
    scores_of: dict[str, TestScores] = {}

    def add(name: str, source: str, ts: TestScores, description: str = "") -> None:
        ext_eval = None
        if external is not None:
            try:
                ext = match_external(ts, *external, path=p.external_scores)
            except ResultsError as e:
                raise StageError(f"{e} (while combining with {source})") from None
            ext_eval = combine_scores(ts, ext, p.external_weight).evaluate()
        rows.append(ResultRow(name, source, ts.evaluate(), description, ext_eval))
        scores_of[name] = ts

    def load(key: str) -> TestScores:
        try:
            return load_test_scores(root / key / SCORES)
        except ResultsError as e:
            raise StageError(str(e)) from None

    streams = {k: load(k) for k in keys if artifacts.split_key(k)[0] == artifacts.FINETUNE}
    for key, ts in streams.items():
        add(_row_name(key), key, ts, "fine-tuned CNN, test frames averaged")
    for key, rgb in streams.items():
        tail = artifacts.split_key(key)[1]
        flow_key = artifacts.finetune_key(tail.replace("rgb", "flow"))
        if "rgb" in tail and flow_key in streams:
            try:
                fused = late_fusion(rgb, streams[flow_key], p.flow_weight)
            except ResultsError as e:
                raise StageError(f"late fusion of {key} and {flow_key}: {e}") from None
            add(f"late fusion {tail.replace('rgb', 'rgb+flow')} (1:{p.flow_weight:g})", f"{key} + {flow_key}",
                fused, "two-stream late fusion of the fine-tuned CNNs")
    for key in keys:
        if artifacts.split_key(key)[0] == artifacts.FINETUNE:
            continue
        params = dict(manifests[key].get("params", {}))
        results = ctx.upstream.dir(key) / artifacts.RESULTS
        if results.is_file():  # the head's effective options, as train-head and refine record them
            params.update(json.loads(results.read_text()).get("head_options") or {})
        desc = ", ".join(f"{k}={v}" for k, v in params.items()
                         if k in ("head", "arch", "fusion", "direction", "segments", "blocks", "seed") and v is not None)
        add(_row_name(key), key, load(key), desc)

    # Per-class table: chosen rows, or all of them for up to 20 classes, else the best row.
    class_names = rows[0].evaluation.class_names
    comparable = [r for r in rows if r.evaluation.class_names == class_names]
    if p.per_class:
        wanted = [w.strip() for w in p.per_class.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {r.name for r in rows}]
        if unknown:
            raise StageError(f"--per-class: no row named {unknown}; rows: {[r.name for r in rows]}")
        chosen = [r for w in wanted for r in comparable if r.name == w]
    elif len(class_names) <= 20:
        chosen = comparable
    else:
        chosen = [max(comparable, key=lambda r: r.evaluation.top1)]

    conf_dir = ctx.dir / "confusion"
    conf_dir.mkdir(exist_ok=True)
    for r in rows:
        confusion_matrix_plot(r.evaluation.confusion, r.evaluation.class_names, conf_dir / f"{_safe(r.name)}.png",
                              title=f"{r.name}: top-1 {100 * r.evaluation.top1:.1f}%")

    ext_name = p.external_name if external is not None else None
    table = results_markdown(rows, ext_name)
    notes = []
    if external is not None:
        notes.append(f"+{p.external_name}: our scores averaged with {p.external_scores} "
                     f"(weight {p.external_weight:g}: (ours + w external) / (1 + w)).")
    if streams and not any(r.name.startswith("late fusion") for r in rows):
        notes.append("No late fusion row: it needs both a finetune/rgb and a finetune/flow output.")
    text = ("# Results\n\nTest split; top-1 and mean class accuracy (%). Cache: "
            f"`{root}`.\n\n{table}\n## Per-class accuracy (%)\n\n{per_class_markdown(chosen, class_names)}"
            + ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))
    write_text(ctx.dir / "results.md", text)
    write_json(ctx.dir / artifacts.RESULTS, {
        "rows": [r.as_dict() for r in rows], "flow_weight": p.flow_weight,
        "external": {"file": str(p.external_scores), "weight": p.external_weight, "name": p.external_name}
        if external is not None else None,
    })
    line = f"{table}\n{len(rows)} rows; written to {ctx.dir / 'results.md'} and {conf_dir}/"
    ctx.log.info("evaluate: %d rows written to %s", len(rows), ctx.dir / "results.md")
    return {"line": line, "rows": len(rows),
            "best": max(rows, key=lambda r: r.evaluation.top1).name}


STAGE = Stage(
    name=artifacts.EVALUATE, version=VERSION, params_type=EvaluateParams, plan=plan, run=run,
    # What evaluate reads is discovered in the cache, so that every finished head's fingerprint enters its
    # own fingerprint and manifest (and `pipeline status` tells when one of them changed).
    upstream=lambda params, cache_root: tuple(k for k, _ in _sources(params, cache_root)),
    help="Results table of every finished stream, head and refined model in the cache (+ external scores).",
)
