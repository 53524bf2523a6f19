"""``evaluate``: the results table of everything finished in the cache for a split and backbone.

Rows, each with top-1, top-5 and mean class accuracy on the test split (TSN reports the latter):

- per stream, from ``finetune/<scope>/<stream>/test_scores.npz`` ([STFN] Table 5 "Appear." / "Motion"), and
  their two-stream late fusion (rgb + w flow) / (1 + w), ``--flow-weight`` w = 1.5 by default as in TSN;
- every finished ``train-head/<scope>/<name>`` (including the rows ``pipeline ablate`` trained);
- every finished ``refine/<scope>/<name>`` that wrote ``test_scores.npz``;
- every finished ``train-net/<scope>/<name>`` (an end-to-end network: ``train-net stmult-s0``).

``<scope>`` is ``split<k>-<backbone>`` (:mod:`pipeline.io.artifacts`). With several splits (``--splits
1,2,3``) every row is evaluated on each split and the table gives each split's top-1 and the mean ± sample
std over the splits, as [STFN] Table 6 reports the mean over UCF101's and HMDB51's three splits.

``--streams`` restricts the table to the finetune rows. ``--external-scores FILE`` (``.npz`` with
``video_ids``, ``scores`` [, ``class_names``], or ``.csv`` with a ``video_id,<class>...`` header) adds two
columns: each row's scores averaged with the external ones ([STFN] §4.8, the "+MIFS" column of Table 6),
``--external-weight`` w giving (ours + w external) / (1 + w). Videos are matched by id (or by the id's last
path component); a test video without external scores, or other classes, is an error naming the file.
tsn-pytorch's ``--save_scores`` ``.npz`` and mmaction2's ``--out`` / ``--dump`` ``.pkl`` hold no (or not
always) video ids: ``--external-list`` gives the test list they were made from (:mod:`pipeline.interop.scores`).

Outputs in ``<cache>/evaluate/<scope>/`` (or ``evaluate/splits1-2-3-<backbone>/``): ``results.md`` (the
table, a per-class accuracy table, notes), ``results.json`` (every figure, per-class accuracies and
confusion matrices), ``confusion/<row>.png`` and ``per_class/<row>.csv`` (precision, recall and F1 per
class), the last two for one split.

The stage's upstream is whatever it reads: its plan lists the finished outputs above and records their
fingerprints as its upstream, so re-running with nothing changed is a no-op, a changed or new head makes it
recompute, and ``pipeline status`` shows it stale when one of the outputs it read changed.

Examples::

    pipeline evaluate
    pipeline evaluate --splits 1,2,3
    pipeline evaluate --streams --flow-weight 1.0
    pipeline evaluate --external-scores mifs_ucf101_split1.csv --external-name MIFS
    pipeline evaluate --external-scores tsn_flow.npz --external-list ucf101_rawframes_val_split_1.txt
"""
from __future__ import annotations

import json

import re
from dataclasses import dataclass
from pathlib import Path


from pipeline.eval.results import (ResultRow, ResultsError, TestScores, combine_scores, late_fusion,
                                   load_test_scores, match_external, per_class_markdown, per_class_csv, read_external_scores, results_markdown, splits_markdown,
                                   splits_summary)
from pipeline.io import artifacts
from pipeline.io.artifacts import SCORES
from pipeline.io.atomic import write_json, write_text
from pipeline.stage import (Manifest, Plan, Stage, StageContext, StageError, Upstream, file_sha256, finished_outputs,
                            param)
from pipeline.stage.validate import existing_file

VERSION = "2"
#: The stages whose finished outputs become rows.
SOURCES = (artifacts.FINETUNE, artifacts.TRAIN_HEAD, artifacts.REFINE, artifacts.TRAIN_NET)


def _distinct_splits(splits: tuple[int, ...]) -> str | None:
    if not splits or len(set(splits)) != len(splits):
        return "must list distinct split ids"
    return None


@dataclass(frozen=True)
class EvaluateParams:
    splits: tuple[int, ...] = param((1,), "Split(s) to evaluate, e.g. 1,2,3: every row on each split, then the "
                                    "mean ± std over splits ([STFN] Table 6).", aliases=("--split",),
                                    scope="split", min=1, check=_distinct_splits)
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of the rows (finetune / extract-features --arch).",
                          scope="backbone")
    streams: bool = param(False, "Only the finetune rows: each stream and their late fusion ([STFN] Table 5).")
    flow_weight: float = param(1.5, "Late fusion weight of the flow stream (rgb 1 : flow w; TSN uses 1.5).",
                               min=0.0)
    external_scores: Path | None = param(None, "Another model's per-video test scores (.npz, .csv, tsn-pytorch "
                                         "--save_scores .npz or mmaction2 .pkl) to average with ours, as the "
                                         "paper's +MIFS column (one split only).", check=existing_file)
    external_list: Path | None = param(None, "The test list a tsn-pytorch .npz or mmaction2 .pkl was made from "
                                       "(their order of videos).", omit_default=True, check=existing_file)
    external_weight: float = param(1.0, "Weight w of the external scores: (ours + w external) / (1 + w).",
                                   min=0.0)
    external_name: str = param("external", "Column label of the external scores (e.g. MIFS).")
    per_class: str = param("", "Comma-separated row names for the per-class accuracy table (default: every "
                           "row when there are at most 20 classes, else the best row by top-1).")

    def validate(self) -> None:
        """The checks across parameters (each parameter's own are declared with it)."""
        if self.external_list is not None and self.external_scores is None:
            raise StageError("--external-list orders the videos of --external-scores: give both")
        if self.external_scores is not None and len(self.splits) > 1:
            raise StageError("--external-scores scores one split's test videos: give one --split with it")


def _key(p: EvaluateParams) -> str:
    return artifacts.evaluate_key(p.splits, p.backbone)


def _sources(params: EvaluateParams, cache_root: Path, split: int) -> list[tuple[str, Manifest]]:
    """(key, manifest) of the finished outputs with test scores of one split and the backbone."""
    scope = artifacts.scope(split, params.backbone)
    return [(k, m) for stage in ((artifacts.FINETUNE,) if params.streams else SOURCES)
            for k, m in finished_outputs(cache_root, stage, scope).items() if (cache_root / k / SCORES).is_file()]


def _upstream(params: EvaluateParams, cache_root: Path) -> tuple[str, ...]:
    return tuple(k for split in params.splits for k, _ in _sources(params, cache_root, split))


def plan(params: EvaluateParams, upstream: Upstream) -> Plan:
    root = upstream.cache_root
    by_split = {}
    for split in params.splits:
        found = _sources(params, root, split)
        if not found:
            what = "finetune" if params.streams else "finetune, train-head, refine or train-net"
            scope = artifacts.scope(split, params.backbone)
            others = sorted({s for st in SOURCES for s in artifacts.scope_keys(root, st)} - {scope})
            raise StageError(f"nothing to evaluate for split {split} and backbone {params.backbone}: no finished "
                             f"{what} output with {SCORES} under {root}/*/{scope}/ (run `pipeline finetune` / "
                             f"`pipeline train-head` with --split {split} first)"
                             + (f"; the cache has outputs for {', '.join(others)}" if others else ""))
        for key, m in found:  # a model is only ever scored on the split it was trained on
            trained = m.params.get("split")
            if trained is not None and int(trained) != split:
                raise StageError(f"{root / key}: trained on split {trained} but stored as split {split}; "
                                 "its test scores would include videos it was trained on")
        by_split[split] = [k for k, _ in found]
    ext = ""
    if params.external_scores is not None:
        ext = file_sha256(Path(params.external_scores))
        if params.external_list is not None:
            ext += "+" + file_sha256(Path(params.external_list))
    n = sum(map(len, by_split.values()))
    return Plan(ext, by_split, f"{n} finished outputs over split(s) {', '.join(map(str, by_split))}")


def _row_name(key: str, params: dict | None = None) -> str:
    from pipeline.models.heads import HEADS

    parts = artifacts.key_parts(key)
    head = (params or {}).get("head")
    note = HEADS[head].note if parts.stage == artifacts.TRAIN_HEAD and head in HEADS else ""
    name = {artifacts.FINETUNE: f"{parts.name} stream", artifacts.REFINE: f"refine {parts.name}",
            artifacts.TRAIN_NET: f"train-net {parts.name}"}.get(parts.stage, parts.name)
    return name + (f" ({note})" if note else "")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "row"


def split_rows(root: Path, keys: list[str], manifests: dict[str, Manifest], p: EvaluateParams,
               external=None) -> tuple[list[ResultRow], list[str]]:
    """The rows of one split: each stream, their late fusion, every head and refined model (and notes)."""
    rows: list[ResultRow] = []

    def add(name: str, source: str, ts: TestScores, description: str = "") -> None:
        ext_eval = None
        if external is not None:
            try:
                ext = match_external(ts, *external, path=p.external_scores)
            except ResultsError as e:
                raise StageError(f"{e} (while combining with {source})") from None
            ext_eval = combine_scores(ts, ext, p.external_weight).metrics()
        rows.append(ResultRow(name, source, ts.metrics(), description, ext_eval))

    def load(key: str) -> TestScores:
        try:
            return load_test_scores(root / key / SCORES)
        except ResultsError as e:
            raise StageError(str(e)) from None

    streams = {k: load(k) for k in keys if artifacts.key_parts(k).stage == artifacts.FINETUNE}
    for key, ts in streams.items():
        add(_row_name(key), key, ts, "fine-tuned CNN, test frames averaged")
    for key, rgb in streams.items():
        parts = artifacts.key_parts(key)
        flow_key = artifacts.finetune_key("flow", parts.split, parts.backbone)
        if parts.name == "rgb" and flow_key in streams:
            try:
                fused = late_fusion(rgb, streams[flow_key], p.flow_weight)
            except ResultsError as e:
                raise StageError(f"late fusion of {key} and {flow_key}: {e}") from None
            add(f"late fusion rgb+flow (1:{p.flow_weight:g})", f"{key} + {flow_key}",
                fused, "two-stream late fusion of the fine-tuned CNNs")
    for key in keys:
        if artifacts.key_parts(key).stage == artifacts.FINETUNE:
            continue
        params = manifests[key].params
        results = root / key / artifacts.RESULTS
        if results.is_file():  # the effective options, as train-head and refine (head), train-net (net) record them
            recorded = json.loads(results.read_text())
            params.update(recorded.get("head_options") or recorded.get("net_options") or {})
        desc = ", ".join(f"{k}={v}" for k, v in params.items()
                         if k in ("head", "net", "arch", "fusion", "direction", "segments", "blocks", "seed")
                         and v is not None)
        add(_row_name(key, params), key, load(key), desc)
    notes = []
    if streams and not any(r.name.startswith("late fusion") for r in rows):
        notes.append("No late fusion row: it needs both a finetune rgb and a finetune flow output.")
    return rows, notes


def _per_class_rows(rows: list[ResultRow], p: EvaluateParams) -> tuple[list[ResultRow], list[str]]:
    """The rows of the per-class table: chosen rows, or all of them for up to 20 classes, else the best."""
    class_names = rows[0].evaluation.class_names
    comparable = [r for r in rows if r.evaluation.class_names == class_names]
    if p.per_class:
        wanted = [w.strip() for w in p.per_class.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {r.name for r in rows}]
        if unknown:
            raise StageError(f"--per-class: no row named {unknown}; rows: {[r.name for r in rows]}")
        return [r for w in wanted for r in comparable if r.name == w], class_names
    if len(class_names) <= 20:
        return comparable, class_names
    return [max(comparable, key=lambda r: r.evaluation.top1)], class_names


def run(ctx: StageContext, plan: Plan) -> dict:
    p: EvaluateParams = ctx.params
    root = ctx.upstream.cache_root
    by_split: dict[int, list[str]] = plan.data
    external = None
    if p.external_scores is not None:
        try:
            external = read_external_scores(Path(p.external_scores), p.external_list)
        except ResultsError as e:
            raise StageError(str(e)) from None
    rows_of = {}
    notes: list[str] = []
    for split, keys in by_split.items():
        rows_of[split], split_notes = split_rows(root, keys, ctx.upstream.manifests, p, external)
        notes += [n for n in split_notes if n not in notes]
    if len(by_split) == 1:
        return _one_split(ctx, next(iter(rows_of.values())), notes, external is not None)
    return _across_splits(ctx, rows_of, notes)


def _one_split(ctx: StageContext, rows: list[ResultRow], notes: list[str], with_external: bool) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot

    p: EvaluateParams = ctx.params
    chosen, class_names = _per_class_rows(rows, p)
    conf_dir = ctx.dir / "confusion"
    conf_dir.mkdir(exist_ok=True)
    for r in rows:
        confusion_matrix_plot(r.evaluation.confusion, r.evaluation.class_names, conf_dir / f"{_safe(r.name)}.png",
                              title=f"{r.name}: top-1 {100 * r.evaluation.top1:.1f}%")
    report_dir = ctx.dir / "per_class"
    report_dir.mkdir(exist_ok=True)
    for r in rows:  # precision / recall / F1 per class of every row
        write_text(report_dir / f"{_safe(r.name)}.csv", per_class_csv(r.evaluation))
    ext_name = p.external_name if with_external else None
    table = results_markdown(rows, ext_name)
    if with_external:
        notes = [f"+{p.external_name}: our scores averaged with {p.external_scores} "
                 f"(weight {p.external_weight:g}: (ours + w external) / (1 + w))."] + notes
    text = (f"# Results\n\nSplit {p.splits[0]}, backbone {p.backbone}: test top-1, top-5 and mean class "
            f"accuracy (%). Cache: `{ctx.upstream.cache_root}`.\n\n{table}\n## Per-class accuracy (%)\n\n"
            f"{per_class_markdown(chosen, class_names)}"
            + ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))
    write_text(ctx.dir / artifacts.RESULTS_MD, text)
    write_json(ctx.dir / artifacts.RESULTS, {
        "split": p.splits[0], "backbone": p.backbone, "rows": [r.as_dict() for r in rows],
        "flow_weight": p.flow_weight,
        "external": {"file": str(p.external_scores), "weight": p.external_weight, "name": p.external_name}
        if with_external else None,
    })
    line = f"{table}\n{len(rows)} rows; written to {ctx.dir / artifacts.RESULTS_MD} and {conf_dir}/"
    ctx.log.info("evaluate: %d rows written to %s", len(rows), ctx.dir / artifacts.RESULTS_MD)
    return {"line": line, "rows": len(rows), "best": max(rows, key=lambda r: r.evaluation.top1).name}


def _across_splits(ctx: StageContext, rows_of: dict[int, list[ResultRow]], notes: list[str]) -> dict:
    p: EvaluateParams = ctx.params
    summary = splits_summary(rows_of)
    table = splits_markdown(summary, list(rows_of))
    missing = [s["name"] for s in summary if len(s["splits"]) < len(rows_of)]
    if missing:
        notes.append(f"Rows not finished on every split (no mean): {', '.join(missing)}.")
    per_split = "\n".join(f"## Split {split}\n\n{results_markdown(rows)}" for split, rows in rows_of.items())
    text = (f"# Results over splits {', '.join(map(str, rows_of))}\n\nBackbone {p.backbone}. Top-1 per split, "
            "then the mean ± sample standard deviation over the splits of top-1, mean class accuracy and top-5 "
            f"(%), as [STFN] Table 6. Cache: `{ctx.upstream.cache_root}`.\n\n{table}\n{per_split}"
            + ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))
    write_text(ctx.dir / artifacts.RESULTS_MD, text)
    write_json(ctx.dir / artifacts.RESULTS, {
        "splits": list(rows_of), "backbone": p.backbone, "summary": summary, "flow_weight": p.flow_weight,
        "per_split": {str(s): [r.as_dict() for r in rows] for s, rows in rows_of.items()},
    })
    ctx.log.info("evaluate: %d rows over %d splits written to %s", len(summary), len(rows_of),
                 ctx.dir / artifacts.RESULTS_MD)
    return {"line": f"{table}\n{len(summary)} rows over splits {','.join(map(str, rows_of))}; written to "
                    f"{ctx.dir / artifacts.RESULTS_MD}", "rows": len(summary)}


STAGE = Stage(
    name=artifacts.EVALUATE, version=VERSION, params_type=EvaluateParams, plan=plan, run=run,
    # What evaluate reads is discovered in the cache, so that every finished head's fingerprint enters its
    # own fingerprint and manifest (and `pipeline status` tells when one of them changed).
    upstream=_upstream, key=_key,
    help="Results table of every finished stream, head, refined model and end-to-end network in the cache "
         "(+ external scores).",
)
