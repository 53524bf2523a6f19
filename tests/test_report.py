"""``pipeline report``: the page of a small real cache, read back as HTML and loaded in headless Chromium.

The cache: a tiny CSV dataset decoded for real, Farneback flow in the documented flow layout (tests/fakes.py),
a tiny RGB fine-tuning (curves, history), [STFN]'s reduced ablation grid trained on synthetic features (real
train-head outputs, ablate.json and chart) and the real ``evaluate`` over both scopes.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.eval.published import published_figure
from pipeline.eval.report import ReportError, build_report
from pipeline.flow.flo import flow_to_color
from pipeline.flow.stored import read_flow
from pipeline.io import artifacts
from pipeline.io.store import read_frames
from pipeline.stage import run_stage
from stages.cli import main
from stages.decode import STAGE as DECODE, DecodeParams
from stages.evaluate import STAGE as EVALUATE, EvaluateParams
from stages.finetune import STAGE as FINETUNE, FinetuneParams
from tests.fakes import FAKE_FLOW_STAGE, FakeFlowParams
from tests.test_train_head import FAST, build_upstream, make_features
from tests.videos import make_csv_dataset

TINY_FINETUNE = dict(arch="resnet18", input_size=32, weights="none", batch_size=4, segments=2, val_frames=2,
                     num_test_frames=3, workers=0, dropout=0.0, epochs=2)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small real cache with every part the report shows (built once; tests copy it before changing it)."""
    base = tmp_path_factory.mktemp("report")
    root = base / "cache"
    data = make_csv_dataset(base / "data", videos_per_class=5, num_frames=12, size=(48, 32))
    run_stage(DECODE, DecodeParams(dataset="csv", root=data, short_side=0, val_fraction=0.25, workers=1), root)
    run_stage(FAKE_FLOW_STAGE, FakeFlowParams(), root)
    run_stage(FINETUNE, FinetuneParams(stream="rgb", **TINY_FINETUNE), root)
    build_upstream(root, make_features(P=4, groups_per_class=4, clips_per_group=2))
    config = base / "fast.toml"
    config.write_text(FAST.replace("max_epochs = 30", "max_epochs = 2").replace("segments = 4", "segments = 3")
                      + '[ablate]\ngrid = "reduced"\n')
    res = invoke("ablate", "--config", config, "--cache-dir", root)
    assert res.exit_code == 0, res.output
    run_stage(EVALUATE, EvaluateParams(backbone="resnet18"), root)
    run_stage(EVALUATE, EvaluateParams(backbone="resnet101"), root)
    return root


class Page(HTMLParser):
    """The page as the tests read it: images (src, alt), links, tables (rows of cell texts), section texts."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.sections: dict[str, str] = {}
        self._section: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])
        elif tag == "section":
            self._section = a["id"]
            self.sections[self._section] = ""
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section] += data

    def row(self, first: str) -> list[str]:
        """The first table row whose first cell is ``first``."""
        return next(r for t in self.tables for r in t if r and r[0] == first)


def decode_data_uri(src: str) -> tuple[str, bytes]:
    head, _, payload = src.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head[:40]
    return head[5:-7], base64.b64decode(payload)


# ---------------------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def report(cache):
    rep = build_report(cache)
    return rep, Page(rep.path.read_text())


def test_page_in_the_cache_with_every_part(cache, report):
    rep, page = report
    assert rep.path == cache / "report" / "index.html"
    assert rep.parts == {"Results": True, "Per-class accuracy": True, "Confusion matrices": True,
                         "Training curves": True, "Ablation": True, "Optical flow": True}
    assert rep.images == len(page.images) and rep.tables == len(page.tables)
    assert not list(rep.path.parent.glob(".tmp-*"))  # written through the atomic write


def test_results_tables_hold_every_evaluate_row(cache, report):
    _, page = report
    for backbone in ("resnet18", "resnet101"):
        res = json.loads((cache / artifacts.evaluate_key((1,), backbone) / "results.json").read_text())
        assert res["rows"]
        for r in res["rows"]:
            cells = page.row(r["name"])
            assert cells[1] == r["source"]
            assert cells[2] == str(int(np.sum(r["confusion"])))
            assert cells[3] == f"{100 * r['top1']:.1f}" and cells[5] == f"{100 * r['mean_class_accuracy']:.1f}"


def test_paper_figures_beside_ours(report):
    """Published figures typed from the papers: [STFN] Table 4 (N = 3), Table 5 (Appear., ResNet-101) and
    Table 6 (TSN); a setting no table reports (arch c with N = 3) has none. The cache holds a CSV dataset, so
    both datasets' columns are shown and the page says they are not comparable."""
    _, page = report
    n3 = page.row("stfn-a-avg-bi-p0-n3-s0")
    assert n3[-3:] == ["93.2", "70.3", "[STFN] Table 4, segments 3 (split 1)"]
    assert page.row("stfn-c-p0-n3-s0")[-3:] == ["–", "–", ""]
    assert page.row("tsn-p0-n3-s0")[-3:-1] == ["94.9", "71.0"]
    rgb = page.row("rgb stream")
    assert rgb[-3:-1] == ["83.5", "48.2"] and "ours is resnet18" in rgb[-1]
    assert "this cache holds csv, so they are not comparable" in " ".join(page.sections["results"].split())


def test_published_figure_lookup():
    """Hand-copied from [STFN] Tables 1-6 and [STPN] Table 3."""
    def fig(*args, **kw):
        f = published_figure(*args, **kw)
        return None if f is None else (f.ucf101, f.hmdb51)

    assert fig("train-head", head="stfn", options={"arch": "a", "fusion": "avg", "direction": "bi"}, segments=5) \
        == (93.5, 70.4)
    assert fig("train-head", head="stfn", options={"fusion": "max"}, segments=5) == (92.9, 69.5)
    assert fig("refine", head="stfn", options={"direction": "a2m"}, segments=5) == (93.2, 70.1)
    assert fig("train-head", head="stfn", options={"arch": "c", "blocks": 1}, segments=5) == (92.0, 69.2)
    assert fig("train-head", head="stfn", options={"arch": "b"}, segments=9) is None  # two changes
    assert fig("train-head", head="stfn", options={"blocks": 2}, segments=5) is None
    assert fig("train-head", head="stfn", options={"fusion": "stcb"}, segments=5) is None
    assert fig("train-head", head="stcb") == (93.2, None)
    assert fig("train-head", head="concat") is None
    assert fig("finetune", stream="flow", backbone="inception_v3") == (88.1, 59.2)
    assert fig("finetune", stream="late", backbone="resnet101") == (91.8, 61.1)
    assert fig("finetune", stream="rgb", backbone="resnet101", across_splits=True) is None
    assert fig("train-head", head="stfn", backbone="inception_v3", across_splits=True) == (95.4, 72.1)
    assert fig("train-head", head="stmultiplier", across_splits=True) == (94.2, 68.9)
    # [ST-Mult] Table 3's best row is 6.00 / 30.98 % error; Table 5 94.2 / 68.9 % over splits.
    assert fig("train-net", net="stmult", options={"temporal_init": "center", "dropout": 0.0}) == (94.0, 69.02)
    assert fig("train-net", net="stmult", across_splits=True) == (94.2, 68.9)
    assert fig("train-net", net="stmult", options={"temporal_init": "avg"}) is None


def test_refined_row_gets_the_figure_of_its_head_options(cache, tmp_path):
    """refine records its head's options as head_kwargs (train-head as head_options too): an STFN with max
    fusion refined end to end is [STFN] Table 2's max row, not the default."""
    root = tmp_path / "cache"
    key = artifacts.evaluate_key((1,), "resnet101")
    shutil.copytree(cache / key, root / key)
    res = json.loads((root / key / "results.json").read_text())
    refined = artifacts.refine_key("stfn-a-max-bi-n5-s0")
    res["rows"][0].update(name="refine stfn-a-max-bi-n5-s0", source=refined)
    (root / key / "results.json").write_text(json.dumps(res))
    (root / refined).mkdir(parents=True)
    (root / refined / "results.json").write_text(json.dumps({"head": "stfn", "segments": 5, "head_kwargs": {
        "arch": "a", "fusion": "max", "direction": "bi", "blocks": 1, "dropout": 0.5, "seed": 0}}))
    page = Page(build_report(root).path.read_text())
    assert page.row("refine stfn-a-max-bi-n5-s0")[-3:] == ["92.9", "69.5", "[STFN] Table 2, fusion max (split 1)"]


def test_per_class_and_confusion_tables_match_results_json(cache, report):
    _, page = report
    res = json.loads((cache / artifacts.evaluate_key((1,), "resnet101") / "results.json").read_text())
    names = res["rows"][0]["class_names"]
    per_class = next(t for t in page.tables if t[0] == ["row", *names])
    for r in res["rows"]:
        line = next(x for x in per_class if x[0] == r["name"])
        assert line[1:] == [f"{100 * r['per_class_accuracy'][c]:.1f}" for c in names]
    # Every row's confusion matrix (3 classes): true class per line, counts per predicted class (empty for 0).
    for r in res["rows"]:
        cm = np.asarray(r["confusion"])
        matrices = [t for t in page.tables if t[0] == ["true \\ predicted", *names]
                    and [[int(c or 0) for c in line[1:]] for line in t[1:]] == cm.tolist()]
        assert matrices, r["name"]


def test_curves_and_chart_are_the_cache_files(cache, report):
    _, page = report
    embedded = {decode_data_uri(i["src"])[1] for i in page.images}
    curves = sorted(cache.glob("*/*/*/curves.png"))
    assert {p.parts[-4] for p in curves} == {"finetune", "train-head"} and len(curves) > 5
    for path in curves + sorted(cache.glob("ablate/*/ablate.png")):
        assert path.read_bytes() in embedded, path


def test_every_image_decodes_and_every_link_resolves(cache, report):
    rep, page = report
    assert page.images
    for img in page.images:
        mime, data = decode_data_uri(img["src"])
        assert mime in ("image/png", "image/jpeg")
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None, img["alt"]
    assert any(h.endswith("history.csv") for h in page.links) and any(h.endswith("ablate.json") for h in page.links)
    for href in page.links:
        assert (rep.path.parent / unquote(href)).exists(), href


def test_flow_frames_are_the_stored_flow(cache, report):
    """The first video's flow images equal the stored flow colour-coded (JPEG tolerance), beside its frames."""
    _, page = report
    store = artifacts.flow_store(cache / artifacts.FLOW)
    vid = store.video_ids()[0]
    flows = read_flow(store, vid)  # (11, H, W, 2): 12 frames
    idx = [0, 3, 7, 10]  # 4 pairs evenly spaced over 11 flows
    peak = float(np.sqrt((flows[idx].astype(np.float64) ** 2).sum(-1)).max())
    frames = read_frames(artifacts.frame_store(cache / artifacts.DECODE), vid).numpy()
    shown = {img["alt"]: cv2.cvtColor(cv2.imdecode(np.frombuffer(decode_data_uri(img["src"])[1], np.uint8),
                                                   cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for img in page.images}
    for i in idx:
        want = flow_to_color(flows[i].transpose(2, 0, 1), max_flow=peak).astype(np.float64)
        got = shown[f"{vid} flow {i}→{i + 1}"].astype(np.float64)
        assert got.shape == want.shape and np.abs(got - want).mean() < 4.0, i
        assert np.abs(shown[f"{vid} frame {i}"].astype(np.float64) - frames[i]).mean() < 4.0, i
    assert sum(1 for a in shown if " flow " in a) == 2 * len(idx)  # two videos (one per class)


# ---------------------------------------------------------------------------------------------- missing parts


def test_missing_parts_are_sentences(cache, tmp_path):
    """Only an evaluate output: the results are shown, every other part is a sentence, not an error."""
    root = tmp_path / "cache"
    key = artifacts.evaluate_key((1,), "resnet101")
    shutil.copytree(cache / key, root / key)
    rep = build_report(root)
    page = Page(rep.path.read_text())
    text = {k: " ".join(v.split()) for k, v in page.sections.items()}
    assert rep.parts["Results"] and not rep.parts["Ablation"] and not rep.parts["Optical flow"]
    assert "No ablation yet: no ablate output in the cache" in text["ablation"]
    assert "No optical flow: no extract-flow output in the cache" in text["flow"]
    assert "No training curves" in text["curves"]
    assert "dataset unknown" in rep.path.read_text()
    assert page.row("tsn-p0-n3-s0")[1] == "train-head/split1-resnet101/tsn-p0-n3-s0"  # its folder is absent: text


def test_empty_or_missing_cache_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=re.escape(f"{empty}: nothing to report")):
        build_report(empty)
    assert not (empty / "report").exists()
    res = invoke("report", "--cache-dir", tmp_path / "absent")
    assert res.exit_code == 2 and f"{tmp_path / 'absent'}: no such cache folder" in res.output


def test_cli_output_folder_and_flow_options(cache, tmp_path):
    config = tmp_path / "report.toml"
    config.write_text("[report]\nflow_videos = 1\nflow_pairs = 3\n")
    res = invoke("report", "--cache-dir", cache, "--config", config, "--flow-pairs", "2", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    path = tmp_path / "out" / "index.html"
    assert f"report: {path}" in res.output
    page = Page(path.read_text())
    flows = [i["alt"] for i in page.images if " flow " in i["alt"]]
    assert len(flows) == 2 and len({a.split(" flow ")[0] for a in flows}) == 1  # 1 video (config), 2 pairs (CLI)
    for href in page.links:  # links relative to the other folder
        assert (path.parent / unquote(href)).exists(), href
    res = invoke("report", "--cache-dir", cache, "--flow-pairs", "0", "-o", tmp_path / "bad")
    assert res.exit_code == 2 and "flow" in res.output and not (tmp_path / "bad" / "index.html").exists()


def test_run_all_ends_with_the_report(cache, tmp_path, monkeypatch):
    """run-all writes the page after its stages and prints its path (stages replaced by none here)."""
    import stages.workflow as workflow

    root = tmp_path / "cache"
    shutil.copytree(cache / "evaluate", root / "evaluate")
    monkeypatch.setattr(workflow, "_steps", lambda conf, path, params: [])
    lines = []
    workflow.run_all(None, root, echo=lines.append)
    assert lines[-1] == f"Report (open it in a browser): {root / 'report' / 'index.html'}"
    assert (root / "report" / "index.html").is_file()


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (skips without it, before the cache is built)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    return exe


def headless(exe: str, url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on ``url`` (no network, no first-run work); returns its stdout."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def page_check(dom: str) -> dict:
    """The attributes and the text of ``#page-check`` in a DOM dump."""
    found: dict = {}

    class Check(HTMLParser):
        inside = False

        def handle_starttag(self, tag, attrs):
            if dict(attrs).get("id") == "page-check":
                found.update(dict(attrs), text="")
                self.inside = True

        def handle_endtag(self, tag):
            self.inside = self.inside and tag != "p"

        def handle_data(self, data):
            if self.inside:
                found["text"] += data

    Check().feed(dom)
    assert found, "no #page-check in the page"
    return found


@pytest.mark.browser
def test_page_loads_in_headless_chromium(chromium, report, tmp_path):
    """Every image loads and every table renders in a real browser; a broken image is reported by name."""
    exe = chromium
    rep, page = report
    dom = headless(exe, rep.path.as_uri(), tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    check = page_check(dom)
    assert check["data-status"] == "ok", check
    assert int(check["data-images"]) == len(page.images) and int(check["data-tables"]) == len(page.tables)
    # The check can fail: an image whose bytes are no image, and one whose file is missing, are named.
    broken = tmp_path / "broken" / "index.html"
    broken.parent.mkdir()
    first, last = page.images[0], page.images[-1]
    broken.write_text(rep.path.read_text().replace(first["src"], "data:image/png;base64,AAAAAAAA", 1)
                      .replace(last["src"], "missing.png", 1))
    check = page_check(headless(exe, broken.as_uri(), tmp_path / "profile2", "--virtual-time-budget=10000",
                                "--dump-dom"))
    assert check["data-status"] == "failed", check
    assert first["alt"] in check["text"] and last["alt"] in check["text"], check
    # A screenshot of the page, as docs/report.png is made.
    shot = tmp_path / "report.png"
    headless(exe, rep.path.as_uri(), tmp_path / "profile3", "--hide-scrollbars", "--window-size=1000,800",
             f"--screenshot={shot}")
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (800, 1000) and image.std() > 10
