"""The HTML report of a cache: one self-contained page, ``<cache>/report/index.html`` (``pipeline report``).

What the page shows, each part read from the finished outputs through :mod:`pipeline.io.artifacts`:

- the results table of every ``evaluate`` output (``evaluate/<scope>/results.json``), with the papers' published
  figures beside ours (:mod:`pipeline.eval.published`);
- per-class accuracy and the confusion matrices of the single-split ``evaluate`` outputs, as coloured tables;
- the training curves (``curves.png``) of every finetune, train-head and refine output;
- the ablation tables and chart of ``pipeline ablate`` (``ablate/<scope>/ablate.json``, ``ablate.png``);
- a few colour-coded flow frames of one or two videos of the extract-flow store (the Middlebury colour wheel
  of :func:`pipeline.flow.flo.flow_to_color`), beside their RGB frames.

Every image is embedded as a ``data:`` URI, so the page alone can be moved, mailed or opened offline; no script
or style comes from the network. The files a part shows are linked relatively (they open when the page sits in
the cache). A part the cache lacks (no ablation yet, no flow) is a sentence in the page; a cache with none of
them is an error. A small inline script checks, once the page has loaded, that every image decoded and every
table has rows, and writes the outcome at the foot of the page (``#page-check``; ``tests/test_report.py``
reads it in headless Chromium). The page is written atomically (:func:`pipeline.io.atomic.write_text`).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import numpy as np

from pipeline.eval.published import DATASETS, Figure, published_figure
from pipeline.eval.results import fmt_pct
from pipeline.io import artifacts
from pipeline.io.atomic import write_text
from pipeline.stage import finished_outputs

__all__ = ["ReportError", "Report", "build_report", "default_output_dir"]

#: The stages whose outputs have training curves, in pipeline order.
CURVE_STAGES = (artifacts.FINETUNE, artifacts.TRAIN_HEAD, artifacts.REFINE, artifacts.TRAIN_NET)
#: Up to this many classes a confusion matrix shows its counts and every row gets one; beyond, the best row's
#: matrix alone, colour only (a 101 x 101 table of numbers is unreadable; results.json holds them all).
CONFUSION_COUNTS_MAX = 30
#: Up to this many classes the per-class table has a column per class (as results.md, per_class_markdown).
PER_CLASS_COLUMNS_MAX = 20


class ReportError(ValueError):
    """The cache has nothing to report, or is not there; the message names the folder."""


@dataclass
class Report:
    """What :func:`build_report` wrote: the page, its parts (title -> found) and how many images and tables."""

    path: Path
    parts: dict[str, bool]
    images: int
    tables: int


def default_output_dir(cache_root: Path) -> Path:
    """``<cache>/report/``."""
    return Path(cache_root) / artifacts.REPORT


# ------------------------------------------------------------------------------------------------ HTML helpers

def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _encode(image_rgb: np.ndarray, ext: str = ".png") -> str:
    """An RGB uint8 image (H, W, 3) as a data URI (PNG, or JPEG with ``ext=".jpg"``)."""
    import cv2

    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image_rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
    if not ok:
        raise ValueError(f"cannot encode a {image_rgb.shape} image as {ext}")
    return _data_uri(buf.tobytes(), "image/jpeg" if ext == ".jpg" else "image/png")


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{src}" alt="{_e(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


class _Page:
    """The page being built: links relative to its folder, and a count of what it holds."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir).resolve()
        self.images = 0
        self.tables = 0

    def link(self, target: Path, text: str | None = None) -> str:
        """A relative link to a file or folder of the cache (it opens when the page sits in the cache)."""
        target = Path(target).resolve()
        rel = Path(os.path.relpath(target, self.out_dir)).as_posix() + ("/" if target.is_dir() else "")
        return f'<a href="{_e(quote(rel))}">{_e(text if text is not None else target.name)}</a>'

    def image_file(self, path: Path, alt: str) -> str:
        self.images += 1
        return _img(_data_uri(Path(path).read_bytes(), "image/png"), alt)

    def image(self, rgb: np.ndarray, alt: str, ext: str = ".png", cls: str = "") -> str:
        self.images += 1
        return _img(_encode(rgb, ext), alt, cls)

    def table(self, header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "",
              raw_header: bool = False) -> str:
        """A table; cells are HTML already (escape text with :func:`_e`); ``header`` is escaped unless raw."""
        self.tables += 1
        head = "".join(f"<th>{h if raw_header else _e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(c if c.startswith("<td") or c.startswith("<th") else f"<td>{c}</td>"
                                        for c in r) + "</tr>" for r in rows)
        return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _num(x: float | None) -> str:
    return f'<td class="num">{_e(fmt_pct(x))}</td>'


def _accuracy_cell(x: float | None) -> str:
    """A per-class accuracy, coloured red (0 %) to green (100 %)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '<td class="num">–</td>'
    return f'<td class="num" style="background:hsl({120 * float(x):.0f},65%,82%)">{_e(fmt_pct(x))}</td>'


# ------------------------------------------------------------------------------------------------ reading

@dataclass
class _Cache:
    """The cache being reported, with what has been read of it (results.json of the sources, once each)."""

    root: Path
    dataset: str | None = None
    _results: dict[str, dict | None] = field(default_factory=dict)

    def source_results(self, key: str) -> dict | None:
        """``results.json`` of a train-head, refine or train-net output (None where it has none or it is
        unreadable)."""
        if key not in self._results:
            try:
                self._results[key] = artifacts.read_results(self.root / key, key)
            except artifacts.ArtifactError:
                self._results[key] = None
        return self._results[key]

    def figure(self, source: str, backbone: str | None, across_splits: bool = False) -> Figure | None:
        """The published figure for the row computed from ``source`` (a key, or ``rgb + flow`` keys)."""
        if " + " in source:  # evaluate's late fusion of the two fine-tuned streams
            return published_figure(artifacts.FINETUNE, stream="late", backbone=backbone, across_splits=across_splits)
        parts = artifacts.key_parts(source)
        backbone = parts.backbone or backbone
        if parts.stage == artifacts.FINETUNE:
            return published_figure(parts.stage, stream=parts.name, backbone=backbone, across_splits=across_splits)
        r = self.source_results(source) or {}
        if parts.stage == artifacts.TRAIN_NET:
            return published_figure(parts.stage, net=r.get("net"), options=r.get("net_options") or {},
                                    backbone=backbone, across_splits=across_splits)
        if not r.get("head"):
            return None
        options = r.get("head_options") or r.get("head_kwargs") or {}  # train-head records both, refine the kwargs
        return published_figure(parts.stage, head=r["head"], options=options,
                                segments=r.get("segments"), backbone=backbone, across_splits=across_splits)


def _dataset(root: Path) -> str | None:
    """decode's ``--dataset`` (None without a readable decode manifest)."""
    try:
        return artifacts.manifest_params(root / artifacts.DECODE).get("dataset")
    except artifacts.ArtifactError:
        return None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")) if folder.is_dir() else []


def _finished(root: Path, stage: str, scope_name: str) -> set[str]:
    """Names of the complete outputs of ``stage`` in one scope (the stream, the head name)."""
    return {artifacts.key_parts(k).name for k in finished_outputs(root, stage, scope_name)}


# ------------------------------------------------------------------------------------------------ parts

def _paper_header(cache: _Cache) -> list[str]:
    if cache.dataset in DATASETS:
        return [f"paper {DATASETS[cache.dataset]} (%)", "paper source"]
    return [f"paper {name} (%)" for name in DATASETS.values()] + ["paper source"]


def _paper_cells(cache: _Cache, fig: Figure | None) -> list[str]:
    keys = [cache.dataset] if cache.dataset in DATASETS else list(DATASETS)
    if fig is None:
        return ['<td class="num">–</td>'] * len(keys) + ["<td></td>"]
    return ([f'<td class="num paper">{_e("–" if fig.value(k) is None else f"{fig.value(k):.1f}")}</td>' for k in keys]
            + [f'<td class="src">{_e(fig.source)}</td>'])


def _paper_note(cache: _Cache) -> str:
    if cache.dataset in DATASETS:
        return (f"The paper column is the published top-1 on {DATASETS[cache.dataset]} for the row's setting "
                "(docs/report.md lists the tables); the source names the table, split and backbone.")
    what = f"this cache holds {_e(cache.dataset)}" if cache.dataset else "this cache's dataset is unknown"
    return ("The paper columns are the published top-1 on UCF101 and HMDB51 for the row's setting, for reference "
            f"only: {what}, so they are not comparable with ours.")


def _single_split_table(page: _Page, cache: _Cache, res: dict) -> str:
    backbone = res.get("backbone")
    ext = res.get("external")
    header = ["row", "from", "videos", "top-1 (%)", "top-5 (%)", "mean class acc. (%)"]
    if ext:
        header += [f"+{ext.get('name', 'external')} top-1 (%)", f"+{ext.get('name', 'external')} mean class (%)"]
    header += _paper_header(cache)
    body = []
    for row in res.get("rows", []):
        sources = [s.strip() for s in str(row.get("source", "")).split(" + ")]
        links = " + ".join(page.link(cache.root / s, s) if (cache.root / s).is_dir() else _e(s) for s in sources)
        videos = int(np.asarray(row.get("confusion") or [[0]]).sum())
        cells = [_e(row.get("name", "")), links, f'<td class="num">{videos}</td>', _num(row.get("top1")),
                 _num(row.get("top5")), _num(row.get("mean_class_accuracy"))]
        if ext:
            e = row.get("external") or {}
            cells += [_num(e.get("top1")), _num(e.get("mean_class_accuracy"))]
        body.append(cells + _paper_cells(cache, cache.figure(str(row.get("source", "")), backbone)))
    return page.table(header, body, "results")


def _across_splits_table(page: _Page, cache: _Cache, res: dict) -> str:
    splits = [str(s) for s in res.get("splits", [])]
    sources = {r.get("name"): r.get("source", "") for rows in (res.get("per_split") or {}).values() for r in rows}

    def mean_std(rec: dict, metric: str) -> str:
        m = rec.get(metric)
        return '<td class="num">–</td>' if not m else \
            f'<td class="num">{100 * m["mean"]:.1f} ± {100 * m["std"]:.1f}</td>'

    header = ["row", *(f"split {s} top-1 (%)" for s in splits), "top-1 mean ± std", "mean class acc. mean ± std",
              "top-5 mean ± std", *_paper_header(cache)]
    body = []
    for rec in res.get("summary", []):
        fig = cache.figure(sources.get(rec.get("name"), ""), res.get("backbone"), across_splits=True)
        body.append([_e(rec.get("name", "")), *(_num((rec.get("splits", {}).get(s) or {}).get("top1")) for s in splits),
                     mean_std(rec, "top1"), mean_std(rec, "mean_class_accuracy"), mean_std(rec, "top5"),
                     *_paper_cells(cache, fig)])
    return page.table(header, body, "results")


def _evaluate_outputs(cache: _Cache) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(folder, results.json) of every evaluate output, and a sentence per unreadable one."""
    found, problems = [], []
    for folder in _subfolders(cache.root / artifacts.EVALUATE):
        if not (folder / artifacts.RESULTS).is_file():
            continue
        try:
            found.append((folder, artifacts.read_results(folder, f"{artifacts.EVALUATE}/{folder.name}")))
        except artifacts.ArtifactError as e:
            problems.append(_e(e))
    return found, problems


def _results_part(page: _Page, cache: _Cache, outputs, problems) -> tuple[str, bool]:
    if not outputs:
        return _note("No results yet: no <code>evaluate</code> output in the cache (run "
                     "<code>pipeline evaluate</code>).") + "".join(_note(p) for p in problems), False
    out = [_note(_paper_note(cache))]
    for folder, res in outputs:
        key = f"{artifacts.EVALUATE}/{folder.name}"
        files = [page.link(folder / name) for name in (artifacts.RESULTS_MD, artifacts.RESULTS)
                 if (folder / name).is_file()]
        out.append(f"<h3>{_e(key)}</h3><p>{_e(_evaluate_caption(res))} Files: {', '.join(files)}.</p>")
        out.append(_across_splits_table(page, cache, res) if "summary" in res
                   else _single_split_table(page, cache, res))
    return "".join(out + [_note(p) for p in problems]), True


def _evaluate_caption(res: dict) -> str:
    if "summary" in res:
        return (f"Backbone {res.get('backbone')}, splits {', '.join(map(str, res.get('splits', [])))}: top-1 per "
                "split, then the mean ± sample std over the splits ([STFN] Table 6).")
    return (f"Split {res.get('split')}, backbone {res.get('backbone')}: test top-1, top-5 and mean class accuracy "
            "(%).")


def _single_split_rows(outputs) -> Iterable[tuple[Path, str, list[str], list[dict]]]:
    """(folder, heading, class names, rows with those classes) of every single-split evaluate output."""
    for folder, res in outputs:
        rows = [] if "summary" in res else res.get("rows") or []
        if rows:
            names = list(rows[0].get("class_names") or [])
            heading = f"<h3>{_e(artifacts.EVALUATE + '/' + folder.name)}</h3>"
            yield folder, heading, names, [r for r in rows if list(r.get("class_names") or []) == names]


def _per_class_part(page: _Page, outputs) -> tuple[str, bool]:
    out = []
    for _, heading, names, rows in _single_split_rows(outputs):
        acc = [[(r.get("per_class_accuracy") or {}).get(c) for c in names] for r in rows]
        out.append(heading)
        if len(names) <= PER_CLASS_COLUMNS_MAX:
            out.append(page.table(["row", *names], [[_e(r["name"]), *map(_accuracy_cell, a)] for r, a in zip(rows, acc)],
                                  "per-class"))
        else:
            out.append(page.table(["class", *(r["name"] for r in rows)],
                                  [[_e(c), *(_accuracy_cell(a[i]) for a in acc)] for i, c in enumerate(names)],
                                  "per-class"))
    if not out:
        return _note("No per-class accuracy: no single-split <code>evaluate</code> output in the cache."), False
    return _note("Test accuracy (%) of each class (the recall), red 0 % to green 100 %.") + "".join(out), True


def _confusion_table(page: _Page, names: Sequence[str], cm: np.ndarray) -> str:
    counts = len(names) <= CONFUSION_COUNTS_MAX
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    body = []
    for i, true in enumerate(names):
        cells = [f'<th class="cls">{_e(true)}</th>']
        for j, pred in enumerate(names):
            p = float(norm[i, j])
            style = f"background:rgba(31,119,180,{p:.3f})" + (";color:#fff" if p > 0.5 else "")
            text = str(int(cm[i, j])) if counts and cm[i, j] else ""
            cells.append(f'<td class="cm" style="{style}" title="{_e(true)} → {_e(pred)}: {int(cm[i, j])}">'
                         f"{text}</td>")
        body.append(cells)
    header = ["true \\ predicted", *(f'<span class="vert">{_e(n)}</span>' for n in names)]
    return page.table([_e(header[0]), *header[1:]], body, "confusion" + ("" if counts else " dense"), raw_header=True)


def _confusion_part(page: _Page, outputs) -> tuple[str, bool]:
    out = []
    for folder, heading, names, rows in _single_split_rows(outputs):
        best = max(rows, key=lambda r: r.get("top1") or 0.0)
        shown = rows if len(names) <= CONFUSION_COUNTS_MAX else [best]
        out.append(heading)
        if len(shown) < len(rows):
            out.append(_note(f"{len(names)} classes: the best row's matrix only, in colour; every row's counts are "
                             f"in {page.link(folder / artifacts.RESULTS)}."))
        for r in shown:
            cm = np.asarray(r.get("confusion"), dtype=np.float64)
            summary = f"{_e(r['name'])}: top-1 {_e(fmt_pct(r.get('top1')))} %"
            out.append(f"<details{' open' if r is best else ''}><summary>{summary}</summary>"
                       f'<div class="scroll">{_confusion_table(page, names, cm)}</div></details>')
    if not out:
        return _note("No confusion matrices: no single-split <code>evaluate</code> output in the cache."), False
    return (_note("Rows: true class, columns: predicted class; counts of test videos, shaded by the row's fraction. "
                  "The best row is open.") + "".join(out), True)


def _curves_part(page: _Page, cache: _Cache) -> tuple[str, bool]:
    out = []
    for stage in CURVE_STAGES:
        cards = []
        for scope_dir in _subfolders(cache.root / stage):
            finished = _finished(cache.root, stage, scope_dir.name)
            for d in _subfolders(scope_dir):
                curves = d / artifacts.CURVES
                if not curves.is_file():
                    continue
                key = f"{stage}/{scope_dir.name}/{d.name}"
                links = [page.link(d / n) for n in (artifacts.CURVES, artifacts.HISTORY, artifacts.RESULTS)
                         if (d / n).is_file()] + [page.link(d, "folder")]
                state = "" if d.name in finished else ' <span class="warn">(not finished: no complete manifest)</span>'
                cards.append(f'<figure class="card">{page.image_file(curves, f"training curves of {key}")}'
                             f"<figcaption><b>{_e(key)}</b>{state}<br>{' · '.join(links)}</figcaption></figure>")
        if cards:
            out.append(f"<h3>{_e(stage)}</h3><div class=\"grid\">{''.join(cards)}</div>")
    if not out:
        return _note("No training curves: no finetune, train-head or refine output with "
                     f"<code>{artifacts.CURVES}</code> in the cache."), False
    return _note("Loss and accuracy per epoch of every training output (its <code>curves.png</code>); the epochs "
                 "are in <code>history.csv</code> (finetune, refine) or <code>results.json</code> (train-head).") \
        + "".join(out), True


def _table_title(folder: Path, stem: str) -> str:
    """The heading of ablate's ``<stem>.md`` (``# Table 1: ...``), or the stem."""
    try:
        first = (folder / f"{stem}.md").read_text().splitlines()[0]
    except (OSError, IndexError):
        return stem
    return first.lstrip("# ").strip() or stem


def _ablation_part(page: _Page, cache: _Cache) -> tuple[str, bool]:
    out, problems = [], []
    for folder in _subfolders(cache.root / artifacts.ABLATE):
        path = folder / artifacts.ABLATE_JSON
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            tables = dict(data["tables"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{_e(path)}: unreadable ({_e(e)}); re-run <code>pipeline ablate</code>.")
            continue
        parsed = artifacts.parse_scope(folder.name)
        backbone = parsed[1] if parsed else None
        out.append(f"<h3>{_e(artifacts.ABLATE + '/' + folder.name)}</h3>"
                   f"<p>Grid <code>{_e(data.get('grid'))}</code>, {_e(data.get('seeds'))} seed(s) per row. Files: "
                   f"{page.link(path)}" + "".join(", " + page.link(folder / f"{s}.md") for s in tables
                                                   if (folder / f"{s}.md").is_file()) + ".</p>")
        chart = folder / artifacts.ABLATE_CHART
        if chart.is_file():
            out.append(f'<figure class="chart">{page.image_file(chart, "ablation chart: top-1 per row")}'
                       f"<figcaption>{page.link(chart)}: top-1 of every row</figcaption></figure>")
        header = ["setting", "head", "top-1 (%)", "mean class acc. (%)", "seeds", "train-head", *_paper_header(cache)]
        for stem, recs in tables.items():
            body = []
            for rec in recs:
                keys = list(rec.get("keys") or [])
                outputs = ", ".join(page.link(cache.root / k, artifacts.key_parts(k).name)
                                    if (cache.root / k).is_dir() else _e(k) for k in keys)
                head = _e((rec.get("params") or {}).get("head", ""))
                if "skipped" in rec:
                    body.append([_e(rec.get("label", "")), head, '<td colspan="3" class="warn">skipped: '
                                 f'{_e(rec["skipped"])}</td>', outputs, *_paper_cells(cache, None)])
                    continue
                fig = cache.figure(keys[0], backbone) if keys else None
                body.append([_e(rec.get("label", "")), head, _mean_std_cell(rec, "top1"),
                             _mean_std_cell(rec, "mean_class_accuracy"), f'<td class="num">{len(keys)}</td>',
                             outputs, *_paper_cells(cache, fig)])
            out.append(f"<h4>{_e(_table_title(folder, stem))}</h4>" + page.table(header, body, "ablation"))
    if not out:
        return _note("No ablation yet: no <code>ablate</code> output in the cache (run <code>pipeline ablate</code>)."
                     ) + "".join(_note(p) for p in problems), False
    return _note(_paper_note(cache)) + "".join(out) + "".join(_note(p) for p in problems), True


def _mean_std_cell(rec: dict, metric: str) -> str:
    values = rec.get(metric) or []
    if len(values) <= 1:
        return _num(values[0] if values else None)
    m, s = rec.get(f"{metric}_mean_std") or (float(np.mean(values)), float(np.std(values, ddof=1)))
    return f'<td class="num">{100 * m:.1f} ± {100 * s:.1f}</td>'


def _pick_videos(video_ids: Sequence[str], n: int) -> list[str]:
    """The first video of each of the first ``n`` classes (folders of the ids), or the first ``n`` ids."""
    chosen, classes = [], set()
    for vid in video_ids:
        cls = vid.rsplit("/", 1)[0] if "/" in vid else None
        if cls is None or cls not in classes:
            chosen.append(vid)
            classes.add(cls)
        if len(chosen) == n:
            break
    return chosen


def _colour_wheel(size: int = 65) -> np.ndarray:
    """The colour key: flow (x, y) pointing from the centre to each pixel, white outside the disc."""
    from pipeline.flow.flo import flow_to_color

    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = x - c, y - c
    img = flow_to_color(np.stack([u, v]), max_flow=c)
    img[np.hypot(u, v) > c] = 255
    return img


def _flow_part(page: _Page, cache: _Cache, videos: int, pairs: int) -> tuple[str, bool]:
    from pipeline.flow.flo import flow_to_color
    from pipeline.flow.stored import read_flow
    from pipeline.io.store import StoreError, read_frames

    flow_dir = cache.root / artifacts.FLOW
    if not flow_dir.is_dir():
        return _note("No optical flow: no <code>extract-flow</code> output in the cache (run "
                     "<code>pipeline extract-flow</code>)."), False
    try:
        store = artifacts.flow_store(flow_dir)
        step = int(artifacts.manifest_params(flow_dir).get("step") or 1)
        ids = store.video_ids()
    except (artifacts.ArtifactError, StoreError, OSError, ValueError) as e:
        return _note(f"No optical flow shown: {_e(e)}"), False
    if not ids:
        return _note(f"No optical flow: the flow store {page.link(store.root)} holds no video yet."), False
    try:
        frames = artifacts.frame_store(cache.root / artifacts.DECODE)
    except artifacts.ArtifactError:
        frames = None
    out = []
    for vid in _pick_videos(ids, videos):
        try:
            with store.reader(vid) as r:
                n = r.num_images("flow")
            idx = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(pairs, n))}) if n else []
            flows = read_flow(store, vid, idx) if idx else np.zeros((0, 1, 1, 2), np.float32)
        except (StoreError, OSError, ValueError, KeyError) as e:
            out.append(_note(f"{_e(vid)}: flow unreadable ({_e(e)})."))
            continue
        rgb = None
        if frames is not None and idx:
            try:
                rgb = read_frames(frames, vid, idx).numpy()
            except (StoreError, OSError, ValueError, KeyError, IndexError):
                rgb = None
        peak = float(np.sqrt((np.asarray(flows, np.float64) ** 2).sum(-1)).max()) if len(idx) else 0.0
        cells = []
        for k, i in enumerate(idx):
            colour = flow_to_color(np.asarray(flows[k]).transpose(2, 0, 1), max_flow=peak or 1.0)
            pics = (page.image(rgb[k], f"{vid} frame {i}", ".jpg") if rgb is not None else "") + \
                page.image(colour, f"{vid} flow {i}→{i + step}", ".jpg")
            cells.append(f'<figure class="pair">{pics}<figcaption>frames {i} → {i + step}</figcaption></figure>')
        out.append(f"<h3>{_e(vid)}</h3><p>{len(idx)} of {n} flows, full saturation at {peak:.2f} px; container "
                   f"{page.link(store.path(vid))}; the whole video: <code>pipeline show-flow {_e(vid)} -o "
                   f"flow.mp4</code>.</p><div class=\"flow\">{''.join(cells)}</div>")
    key = (f'<figure class="wheel">{page.image(_colour_wheel(), "flow colour key", ".png")}<figcaption>colour key: '
           "hue = direction, saturation = magnitude, white = no motion</figcaption></figure>")
    return (_note("TV-L1 flow as stored by <code>extract-flow</code> (quantized), colour-coded with the Middlebury "
                  "colour wheel, beside the first frame of each pair.") + key + "".join(out), True)


# ------------------------------------------------------------------------------------------------ the page

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;
color:#1d1d1f}
h1{margin:18px 0 4px}h2{margin-top:32px;border-bottom:2px solid #ddd;padding-bottom:4px}h3{margin:18px 0 6px}
nav a{margin-right:12px}code{background:#f3f3f3;padding:0 3px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 6px;text-align:left;vertical-align:top}
thead th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.paper{color:#6a3d9a}td.src{color:#555;font-size:12px}.note{color:#444}.warn{color:#b00}
table.confusion td.cm{text-align:center;min-width:18px;padding:2px}
table.confusion.dense{font-size:8px}table.confusion.dense td.cm{min-width:4px;padding:0;border:none}
.scroll{overflow-x:auto}
table.confusion th.cls{white-space:nowrap;font-weight:normal}
span.vert{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:normal}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
figure{margin:0}.card{border:1px solid #ddd;padding:6px;border-radius:4px}.card img,.chart img{max-width:100%}
figcaption{font-size:12px;color:#444;margin-top:4px}.flow{display:flex;flex-wrap:wrap;gap:10px}
.pair img{width:160px;image-rendering:pixelated;margin-right:2px}.wheel img{width:65px}
details{margin:4px 0}summary{cursor:pointer}footer{margin:32px 0 24px;color:#555;border-top:1px solid #ddd}
"""

#: Once loaded (the load event waits for every image): every image complete with a size, every table with body
#: rows and a width; the outcome goes to #page-check.
_CHECK = """
window.addEventListener("load", () => {
  const out = document.getElementById("page-check");
  const imgs = Array.from(document.images);
  const badImgs = imgs.filter(i => !i.complete || !(i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40));
  const tables = Array.from(document.querySelectorAll("table"));
  const badTables = tables.filter(t => !t.tBodies.length || !t.tBodies[0].rows.length
                                   || (!t.closest("details:not([open])") && !(t.offsetWidth > 0)));
  const good = !badImgs.length && !badTables.length;
  out.dataset.status = good ? "ok" : "failed";
  out.dataset.images = imgs.length;
  out.dataset.tables = tables.length;
  out.textContent = good ? `Page check: all ${imgs.length} images and ${tables.length} tables rendered.`
    : `Page check FAILED: images not loaded: ${badImgs.join(", ") || "none"}; empty tables: ${badTables.length}.`;
});
"""


def build_report(cache_root: Path, out_dir: Path | None = None, *, flow_videos: int = 2,
                 flow_pairs: int = 4) -> Report:
    """Write the report of ``cache_root`` to ``<out_dir>/index.html`` (default ``<cache>/report/``).

    ``flow_videos`` videos of the flow store (the first of each of the first classes) show ``flow_pairs`` flows
    each. Raises :class:`ReportError` when the cache folder is missing or holds none of the parts."""
    root = Path(cache_root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such cache folder (give --cache-dir, or run the pipeline first)")
    if flow_videos < 0 or flow_pairs < 1:
        raise ReportError(f"flow videos must be >= 0 and flow pairs >= 1 (got {flow_videos}, {flow_pairs})")
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(root)
    page = _Page(out_dir)
    cache = _Cache(root, _dataset(root))
    outputs, problems = _evaluate_outputs(cache)
    parts = [("results", "Results", _results_part(page, cache, outputs, problems)),
             ("per-class", "Per-class accuracy", _per_class_part(page, outputs)),
             ("confusion", "Confusion matrices", _confusion_part(page, outputs)),
             ("curves", "Training curves", _curves_part(page, cache)),
             ("ablation", "Ablation", _ablation_part(page, cache)),
             ("flow", "Optical flow",
              _flow_part(page, cache, flow_videos, flow_pairs) if flow_videos else
              (_note("Flow frames not asked for (--flow-videos 0)."), False))]
    if not any(found for _, _, (_, found) in parts):
        raise ReportError(f"{root}: nothing to report: no evaluate, finetune, train-head, refine, ablate or "
                          "extract-flow output in this cache (run ./run_all.sh or the stages first)")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dataset = f"dataset <code>{_e(cache.dataset)}</code>" if cache.dataset else "dataset unknown (no decode output)"
    missing = [title for _, title, (_, found) in parts if not found]
    body = [f"<h1>stfn-pipeline report</h1><p>Cache <code>{_e(root.resolve())}</code>, {dataset}; written {when} by "
            "<code>pipeline report</code>." + (f" Not in the cache yet: {_e(', '.join(missing))}." if missing else "")
            + "</p><nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in parts) + "</nav>"]
    body += [f'<section id="{a}"><h2>{_e(t)}</h2>{text}</section>' for a, t, (text, _) in parts]
    body.append('<footer><p id="page-check" data-status="pending">Page check: pending (it runs in the browser once '
                "the page has loaded).</p><p>Made by <code>pipeline report</code> (docs/report.md). Images are "
                "embedded; links open the cache's files when this page sits in the cache.</p></footer>")
    text = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>stfn-pipeline report: {_e(root.name)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{_CHECK}</script>\n</body></html>\n")
    path = write_text(out_dir / artifacts.REPORT_PAGE, text)
    return Report(path, {t: found for _, t, (_, found) in parts}, page.images, page.tables)
