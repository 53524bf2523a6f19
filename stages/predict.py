"""``predict``: class scores of new videos with the cache's trained models.

A plain command, not a stage. Each video (any size, frame rate or container) goes through the real
``decode``, ``extract-flow`` and ``extract-features`` stages in a work cache of its own (``--work-dir``, else
a temporary folder), with the parameters the dataset's cache recorded for those stages and the dataset's
fine-tuned backbones as weights files; the trained head then scores it with ``train-head``'s test protocol
([STFN] §4.2: 5 test sequences of N segments, scores averaged). The dataset's cache is only read.
See :mod:`pipeline.predict`.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from pipeline.io import artifacts
from pipeline.io.atomic import write_json, write_text
from pipeline.predict import PredictError, find_models, timeline_probabilities, top_k, video_probabilities
from pipeline.stage import Manifest, StageError, param, run_stage
from pipeline.stage import config as cfg

#: decode parameters that describe the dataset, not how a video becomes frames (not copied to the work cache).
DATASET_PARAMS = {"dataset", "root", "splits", "list", "test_list", "labels", "classes", "test_fraction",
                  "val_fraction", "val_seed", "demo_seed", "allow_missing", "workers", "rawframes_layout",
                  "rawframes_labels", "rawframes_train_list", "rawframes_test_list"}


@dataclass(frozen=True)
class PredictParams:
    head: str | None = param(None, "train-head output to use (default: the STFN head at its paper defaults).")
    net: str | None = param(None, "Score with an end-to-end network instead of a head: a train-net output "
                            "(stmult-s0) or a network's name (stmult: its default output).")
    split: int = param(1, "Split of the models.", scope="split")
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of the models (finetune --arch).",
                          scope="backbone")
    top_k: int = param(5, "Classes listed per video.", min=1)
    device: str = param("auto", "Device of flow and features: auto, cpu, cuda, cuda:N.")


def _copied(manifest: Manifest, params_type, exclude=frozenset(), **over):
    """Params of ``params_type`` from a finished stage's recorded parameters (those it has), then ``over``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(params_type)}
    table = {k: v for k, v in manifest.params.items()
             if k in names and k not in exclude and v is not None}
    return cfg.build_params(params_type, {"x": table}, "x", over)


def _video_list(videos: list[Path], classes: list[str], folder: Path) -> tuple[Path, Path]:
    """A CSV list of the videos (every one a test video; the label column is a placeholder) and the class
    list, so that decode keeps the dataset's classes."""
    missing = [str(v) for v in videos if not Path(v).is_file()]
    if missing:
        raise StageError(f"video file(s) not found: {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"] + [f"{Path(v).resolve()},{classes[0]},test" for v in videos]
    write_text(folder / "list.csv", "\n".join(lines) + "\n")
    write_text(folder / "classes.txt", "\n".join(classes) + "\n")
    return folder / "list.csv", folder / "classes.txt"


def _decode_and_flow(models, videos: list[Path], classes: list[str], work: Path, p: PredictParams):
    """The new videos through decode and extract-flow in the work cache, with the dataset's recorded parameters:
    (the work cache's video table, or None when nothing could be decoded; why each video that gets no score
    failed, the first stage that failed it: a video too short for flow is "too short", not a later stage's
    missing flow container)."""
    from pipeline.data.table import VideoTable
    from stages.decode import STAGE as DECODE, DecodeParams
    from stages.extract_flow import STAGE as FLOW, FlowParams

    list_csv, class_file = _video_list([Path(v) for v in videos], classes, work / "videos")
    dp = _copied(models.manifests[artifacts.DECODE], DecodeParams, DATASET_PARAMS, dataset="csv",
                 root=work / "videos", list=list_csv, classes=class_file, val_fraction=0.0)
    decoded = run_stage(DECODE, dp, work / "cache", allow_failures=True)
    failures = {v: f"cannot be read: {why}" for v, why in decoded.manifest.failures.items()}
    if not decoded.manifest.done:
        return None, failures
    table = VideoTable.load(work / "cache" / artifacts.DECODE)
    flow_m = models.manifests[artifacts.FLOW]
    # Flow imported from a rawframes tree (import-rawframes): new videos get our TV-L1 with the same bound.
    imported = {"backend": "torch"} if flow_m.params.get("backend") == "import" else {}
    flow_p = _copied(flow_m, FlowParams, {"workers", "flow_start_index"}, device=p.device, **imported)
    flowed = run_stage(FLOW, flow_p, work / "cache", allow_failures=True)
    for v, why in flowed.manifest.failures.items():
        failures.setdefault(v, why if why.startswith("too short") else f"no flow: {why}")
    return table, failures


@contextlib.contextmanager
def _work_folder(work_dir: Path | None):
    """``--work-dir``, or a temporary folder of our own, removed afterwards (never a user's folder)."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="pipeline-predict-"))
    try:
        yield work
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _unreadable(videos: list[Path], failures: dict) -> list[dict]:
    return [{"video": str(v), "error": _failure(failures, v)} for v in videos]


def predict(videos: list[Path], cache_root: Path, p: PredictParams, *, work_dir: Path | None = None,
            timeline: Path | None = None, echo=lambda s: None) -> list[dict]:
    """Top-k classes of each video (and failures), with the models' fingerprints; see the module docstring."""
    from pipeline.data.table import VideoTable
    from pipeline.io.store import read_feature_store
    from pipeline.models.heads import load_head_checkpoint
    from stages.extract_features import STAGE as FEATURES, ExtractFeaturesParams

    if p.net is not None:
        if timeline is not None:
            raise StageError("--timeline plots a head's windows over time; an end-to-end network (--net) has none")
        return _predict_network(videos, cache_root, p, work_dir=work_dir)
    try:
        models = find_models(cache_root, p.split, p.backbone, p.head)
    except PredictError as e:
        raise StageError(str(e)) from None
    head, ckpt = load_head_checkpoint(models.dir(models.head_key) / artifacts.BEST)
    head.eval()
    classes = [str(c) for c in VideoTable.load(models.dir(artifacts.DECODE)).classes]
    if ckpt.get("classes") is not None and [str(c) for c in ckpt["classes"]] != classes:
        raise StageError(f"{models.dir(models.head_key)}: the head's classes differ from the dataset's")
    n = int(ckpt["num_segments"])
    num_test = int((models.params(models.head_key)).get("num_test") or 5)
    fusion = str(models.params(models.head_key).get("test_fusion") or "mean")

    with _work_folder(work_dir) as work:
        table, failures = _decode_and_flow(models, videos, classes, work, p)
        if table is None:
            return _unreadable(videos, failures)
        weights = {s: str(models.dir(artifacts.finetune_key(s, p.split, p.backbone)) / artifacts.BEST)
                   for s in ("rgb", "flow")}
        fp = _copied(models.manifests[artifacts.features_key(p.split, p.backbone)], ExtractFeaturesParams,
                     {"workers", "include_unused"}, split=1, rgb_weights=weights["rgb"], flow_weights=weights["flow"],
                     device=p.device)
        feats = run_stage(FEATURES, fp, work / "cache", allow_failures=True)
        for v, why in feats.manifest.failures.items():
            # A temporary work cache is gone when the message is read: it is not named.
            failures.setdefault(v, f"no features: {why}" if work_dir else
                                f"no features: {why}".replace(str(work), "<temporary work folder>"))
        fs = None
        if feats.manifest.done:
            fs = read_feature_store(artifacts.feature_store_file(work / "cache" / FEATURES.output_key(fp)))

    by_id = {str(v): i for i, v in enumerate(fs.video_ids)} if fs is not None else {}
    if by_id:
        probs = video_probabilities(head, fs.streams["rgb"], fs.streams["flow"], n, num_test, fusion)
    out = []
    for video in videos:
        vid = _video_id(table, video)
        rec = {"video": str(video), "head": models.head_name, "scope": artifacts.scope(p.split, p.backbone),
               "models": models.fingerprints()}
        if vid is None or vid not in by_id:
            out.append({**rec, "error": _failure(failures, video)})
            continue
        i = by_id[vid]
        rec["top_k"] = top_k(probs[i], classes, p.top_k)
        if timeline is not None:
            rec["timeline"] = str(_timeline(head, fs, i, n, table, vid, classes, _timeline_path(timeline, video,
                                                                                           len(videos))))
        out.append(rec)
    return out


def _predict_network(videos: list[Path], cache_root: Path, p: PredictParams, *,
                     work_dir: Path | None = None) -> list[dict]:
    """Top-k classes of each video with a train-net network (``--net``): decode and extract-flow on the new
    videos, then the network's own test protocol on their frames and flow (no features, no head)."""
    from pipeline import dist
    from pipeline.data.clips import VideoList
    from pipeline.data.table import VideoTable
    from pipeline.flow.stored import flow_settings
    from pipeline.models.networks import load_network_checkpoint
    from pipeline.predict import find_network, network_probabilities
    from pipeline.stage import read_manifest

    try:
        models = find_network(cache_root, p.split, p.backbone, p.net)
    except PredictError as e:
        raise StageError(str(e)) from None
    try:
        model, ckpt = load_network_checkpoint(models.dir(models.head_key) / artifacts.BEST)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{models.dir(models.head_key) / artifacts.BEST}: cannot load the network ({e})") from None
    classes = [str(c) for c in VideoTable.load(models.dir(artifacts.DECODE)).classes]
    if [str(c) for c in ckpt["classes"]] != classes:
        raise StageError(f"{models.dir(models.head_key)}: the network's classes differ from the dataset's")
    with _work_folder(work_dir) as work:
        table, failures = _decode_and_flow(models, videos, classes, work, p)
        if table is None:
            return _unreadable(videos, failures)
        flows = artifacts.flow_store(work / "cache" / artifacts.FLOW)
        have = [i for i, v in enumerate(table.video_ids) if flows.exists(v)]
        listed = VideoList.of(table, have)
        probs, scored, unread = network_probabilities(
            model, ckpt, artifacts.frame_store(work / "cache" / artifacts.DECODE), flows, listed,
            flow_settings(read_manifest(work / "cache" / artifacts.FLOW), work / "cache" / artifacts.FLOW),
            device=dist.device(p.device))
    by_id = {v: i for i, v in enumerate(listed.video_ids) if scored[i]}
    out = []
    for video in videos:
        vid = _video_id(table, video)
        rec = {"video": str(video), "net": models.head_name, "scope": artifacts.scope(p.split, p.backbone),
               "models": models.fingerprints()}
        if vid is None or vid not in by_id:
            i = listed.video_ids.index(vid) if vid in listed.video_ids else None
            why = unread.get(i) if i is not None else None
            out.append({**rec, "error": f"cannot be read: {why}" if why else _failure(failures, video)})
            continue
        rec["top_k"] = top_k(probs[by_id[vid]], classes, p.top_k)
        out.append(rec)
    return out


def _video_id(table, video: Path) -> str | None:
    """The decode id of ``video`` (decode names a video outside the list's folder by its absolute path
    without the leading ``/`` and the extension); None when decode did not keep it."""
    vid = str(Path(video).resolve().with_suffix("")).lstrip("/")
    return vid if vid in table.video_ids else None


def _failure(failures: dict, video: Path) -> str:
    return failures.get(str(Path(video).resolve().with_suffix("")).lstrip("/"), "cannot be read: not decoded")


def _timeline_path(timeline: Path, video: Path, count: int) -> Path:
    timeline = Path(timeline)
    return timeline if count == 1 else timeline.with_name(f"{timeline.stem}-{Path(video).stem}{timeline.suffix}")


def _timeline(head, fs, i: int, n: int, table, vid: str, classes: list[str], path: Path) -> Path:
    from pipeline.eval.plots import timeline_plot

    centres, probs = timeline_probabilities(head, fs.streams["rgb"][i], fs.streams["flow"][i], n)
    positions = np.asarray(fs.positions[i], dtype=np.float64)
    frames = np.interp(centres, np.arange(len(positions)), positions)
    row = table.video_ids.index(vid)
    fps = float(table.fps[row]) if table.fps and table.fps[row] else 0.0
    times, xlabel = (frames / fps, "time (s)") if fps > 0 else (frames, "frame")
    return timeline_plot(times, probs, classes, path, title=f"{Path(vid).name}: windows of {n} positions",
                         xlabel=xlabel)


@click.command("predict")
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--head", default=None, help="train-head output name (default: the STFN head, paper defaults).")
@click.option("--net", default=None, help="Score with a train-net network instead (an output name, e.g. "
              "stmult-s0, or a network name: its default output).")
@click.option("--top-k", type=int, default=None, help="Classes per video. [default: 5]")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results here.")
@click.option("--timeline", type=click.Path(path_type=Path), default=None,
              help="PNG of class probabilities over time (one per video: -<video> added for several).")
@click.option("--split", type=int, default=None, help="Split of the models. [default: 1]")
@click.option("--backbone", default=None, help="Backbone of the models. [default: resnet101]")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N. [default: auto]")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the new videos' frames, flow and features here (re-running is then instant).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root of the models.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def predict_command(videos, head, net, top_k, json_path, timeline, split, backbone, device, work_dir, config_path,
                    cache_dir, verbose):
    """Top-k classes of new videos with the cache's trained models (docs/predict.md).

    \b
    Examples:
      pipeline predict clip.mp4 --config configs/demo.toml
      pipeline predict a.avi b.mp4 --head stcb-n5-s0 --json out.json --timeline out.png
    """
    from stages.cli import config_tables, resolve_cache_dir, setup_logging

    setup_logging(verbose)
    try:
        conf = cfg.load_config(config_path, config_tables())
        p = cfg.build_params(PredictParams, conf, "predict", {"head": head, "net": net, "top_k": top_k,
                                                               "split": split, "backbone": backbone,
                                                               "device": device},
                             config_path=config_path)
        root = resolve_cache_dir(cache_dir, conf)
        results = predict(list(videos), root, p, work_dir=work_dir, timeline=timeline)
    except (StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    for r in results:
        if "error" in r:
            click.echo(f"{r['video']}: {r['error']}")
            continue
        click.echo(f"{r['video']} ({r.get('head') or r.get('net')}, {r['scope']}):")
        for t in r["top_k"]:
            click.echo(f"  {100 * t['prob']:5.1f}%  {t['label']}")
    if json_path is not None:
        write_json(json_path, results)
        click.echo(f"written to {json_path}")
    failed = sum("error" in r for r in results)
    click.echo(f"predict: {len(results) - failed} video(s) scored" + (f", {failed} not scored" if failed else ""))
    if failed:
        sys.exit(1)
