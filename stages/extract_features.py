"""``extract-features``: pooled RGB and flow backbone features at dense temporal positions.

[STFN] §4.2 ("STFN"): "we retain only convolutional layers and global pooling layer of each network ...
The feature maps for STFN are extracted from the output of the global pooling layer" (2048-d for ResNet-101
and Inception-V3). For every video of the chosen split this stage runs both streams' backbones
(``Backbone.forward_features``) at ``P`` positions and stores ``(P, views, D)`` per stream:

\b
* position ``k`` is frame ``feature_positions(num_frames, P)[k] = floor(num_frames (2k + 1) / (2P))``;
  the RGB input is that frame, the flow input the ``L``-field stack centred on it
  (:func:`pipeline.data.sampling.flow_stack_indices`, the finetune stage's rule);
* a head with ``N`` segments uses positions ``floor(sP/N) .. floor((s+1)P/N) - 1`` for segment ``s``: one
  at random when training, 5 uniformly spaced ones when testing (§4.2). That needs ``P >= 5 N``: the
  default ``P = 45`` covers N = 3, 5, 7 and 9 (Table 4 of [STFN]); the paper's N = 5 / 7 alone need
  25 / 35;
* views: the centre crop (``--views 1``) or TSN's 10 crops (4 corners + centre and their mirrors,
  ``--views 10``), an extra axis of the same array.

Sources: by default the fine-tuned checkpoints ``<cache>/finetune/{rgb,flow}/best.pt`` (their arch, class
list, input size and flow length are checked against the video table and the parameters); or, with
``--rgb-weights / --flow-weights imagenet | none | PATH`` and ``--arch``, any torchvision backbone without
the finetune stage (``none`` is a random network seeded by ``--seed``, for testing the plumbing).

Each video's features are committed atomically to ``parts/<video_id>.h5`` and journaled, so a killed run
resumes where it stopped. Every video's batches are formed from that video alone, so its features do not
depend on which other videos ran beside it: a resumed run and a ``torchrun`` run (rank ``r`` takes videos
``r::world``; rank 0 waits for the others and consolidates) give the same bytes as one uninterrupted
process. At the end the parts are consolidated into ``features.zarr`` / ``features.h5`` (docs/formats.md) one
chunk of videos at a time (memory does not grow with the number of videos), each store renamed into place when
complete, and the parts removed (a run killed while consolidating writes the same stores again from them). Non-finite features (NaN, inf, or float16 overflow) are per-video
failures and are never stored.

Examples::

\b
    pipeline extract-features --store zarr
    pipeline extract-features --rgb-weights imagenet --flow-weights imagenet --arch resnet50 --views 10
    torchrun --nproc-per-node 4 -m stages extract-features --store h5
"""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.data.table import VideoTable
from pipeline.features import (TEN_VIEW_NAMES, StreamSource, build_backbone, consolidate, extract,
                               resolve_source, restore_parts, write_part)
from pipeline.io import artifacts
from pipeline.io.store import StoreError, VideoStore, feature_store_path
from pipeline.models.backbones import list_backbones
from pipeline.stage import Journal, Plan, Stage, StageContext, StageError, Upstream, digest, param
from pipeline.stage.space import Space

VERSION = "1"
from pipeline.streams import STREAMS  # noqa: E402,F401
FORMATS = ("zarr", "h5", "both")
DTYPES = ("float16", "float32")
VIEWS = (1, 10)
DEFAULT_ARCH = artifacts.DEFAULT_BACKBONE
PARTS = "parts"


def _one_or_ten_views(views: int) -> str | None:
    return None if views in VIEWS else "is neither 1 (centre crop) nor 10 (TSN 10-crop)"


@dataclass(frozen=True)
class ExtractFeaturesParams:
    split: int = param(1, "Split whose train / test membership is stored beside the features (a split id "
                       "of the video table: 1, 2, 3 for UCF101 / HMDB51, 1 otherwise).", scope="split", min=1)
    positions: int = param(45, "P, temporal positions per video. A head with N segments needs P >= 5 N "
                           "(5 test positions per segment, [STFN] §4.2): 45 covers N up to 9; 25 / 35 "
                           "cover the paper's N = 5 / 7.", min=1)
    views: int = param(1, "Spatial views per position: 1 (centre crop) or 10 (TSN's 4 corners + centre and "
                       "their mirrors), stored as an extra axis.", check=_one_or_ten_views)
    rgb_weights: str = param("finetune", "Appearance backbone: finetune (<cache>/finetune/<scope>/rgb/best.pt), "
                             "imagenet, none (random, seeded by --seed) or a weights file (ours, torchvision's, "
                             "mmaction2's or tsn-pytorch's TSN).")
    flow_weights: str = param("finetune", "Motion backbone: finetune (<cache>/finetune/<scope>/flow/best.pt), "
                              "imagenet (cross-modality first conv), none or a weights file (as --rgb-weights; "
                              "an mmaction2 flow TSN takes 10 channels: --flow-length 5 keeps its conv1).")
    arch: str = param(DEFAULT_ARCH, "Backbone of both streams (resnet18/34/50/101/152, inception_v3): reads "
                      "finetune's outputs of this backbone; a weights file of another arch is refused.",
                      aliases=("--backbone",), scope="backbone", choices=list_backbones())
    input_size: int = param(0, "Network input side in pixels; 0: the checkpoint's input_size, else the "
                            "backbone's native size (224 ResNet, 299 Inception-V3).", min=16, also=(0,))
    flow_length: int = param(0, "L, flow fields per stack (2L input channels); 0: the flow checkpoint's, "
                             "else 10 ([STFN] §4.2).", min=0)
    dtype: str = param("float16", "Stored feature dtype.", choices=DTYPES)
    store: str = param("zarr", "Feature store: features.zarr, features.h5 or both.", choices=FORMATS,
                       aliases=("--format",), recorded_as="format")
    include_unused: bool = param(False, "Also extract the videos that are in neither the train nor the test "
                                 "list of --split.")
    seed: int = param(0, "Seed of the random initialisation for --*-weights none.")
    device: str = param("auto", "auto (this rank's GPU if any, else cpu), cpu, cuda or cuda:N.",
                        fingerprint=False)
    batch_size: int = param(64, "Network inputs per forward pass (batches never mix videos).", fingerprint=False,
                            min=1)
    workers: int = param(4, "Reader threads (read + decode + crop of the next videos while the GPU runs).",
                         fingerprint=False, min=1)
    amp: bool = param(True, "On CUDA: bfloat16 autocast and channels_last.", fingerprint=False)


# ----------------------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------------------

def upstream_keys(p: ExtractFeaturesParams) -> tuple[str, ...]:
    keys = ["decode", "extract-flow"]
    keys += [artifacts.finetune_key(s, p.split, p.arch) for s in STREAMS
             if (p.rgb_weights if s == "rgb" else p.flow_weights) == "finetune"]
    return tuple(keys)


@dataclass
class FeaturePlan:
    table: VideoTable
    rows: list[int]                      # rows of the video table to extract, in table order
    sources: dict[str, StreamSource]
    frames_dir: Path
    flow_dir: Path
    estimate_bytes: int = 0
    outputs: list[str] = field(default_factory=list)


def plan(p: ExtractFeaturesParams, upstream: Upstream) -> Plan:
    try:
        table = VideoTable.load(upstream.dir("decode"))
        membership = table.split_of(p.split)
    except (FileNotFoundError, KeyError) as e:
        raise StageError(str(e).strip("'\"")) from None
    keep = ("train", "val", "test", "unused") if p.include_unused else ("train", "val", "test")
    rows = [i for i, s in enumerate(membership) if s in keep]
    if not rows:
        raise StageError(f"split {p.split} of {upstream.dir('decode')} has no train or test videos")
    sources = {s: resolve_source(s, p, upstream, table.classes, list(table.splits)) for s in STREAMS}

    # An incompatible frame or flow store is a clear error before any work, not a failure per video.
    try:
        frames = artifacts.frame_store(upstream.dir("decode"))
        flows = artifacts.flow_store(upstream.dir("extract-flow"))
    except artifacts.ArtifactError as e:
        raise StageError(str(e)) from None
    first = table.video_ids[rows[0]]
    for store in (frames, flows):
        if store.exists(first):
            try:
                with store.reader(first):
                    pass
            except StoreError as e:
                raise StageError(str(e)) from None

    # Disk: the parts and the consolidated store(s) exist side by side until the parts are removed. Checked by
    # the runner once it decided to run (a fresh output needs no space), the journaled videos' parts excluded.
    itemsize = np.dtype(p.dtype).itemsize
    per_video = int((p.positions * p.views * itemsize * sum(s.num_features for s in sources.values())
                     + 4 * p.positions) * 1.05)
    stores = (2 if p.store == "both" else 1) * per_video * len(rows)
    space = Space(f"{len(rows)} videos, {p.positions} positions x {p.views} view(s), {p.dtype}, parts + {p.store}",
                  {table.video_ids[i]: per_video for i in rows}, stores + (16 << 20))
    outputs = ["zarr", "h5"] if p.store == "both" else [p.store]
    inputs = digest({"videos": [table.video_ids[i] for i in rows],
                     "sources": {s: src.identity() for s, src in sources.items()}})
    describe = (f"{len(rows)} videos of split {p.split}, P = {p.positions}, {p.views} view(s); " +
                ", ".join(f"{s}: {src.arch} ({src.weights}, {src.input_size}px"
                          + (f", L = {src.flow_length}" if s == "flow" else "") + ")" for s, src in sources.items()))
    return Plan(inputs, FeaturePlan(table, rows, sources, upstream.dir("decode"), upstream.dir("extract-flow"),
                                    space.remaining(), outputs), describe, space)


def _consolidate(ctx: StageContext, fp: FeaturePlan, done: list[int], parts: VideoStore) -> list[Path]:
    """The parts of ``done`` (rows of the video table) into the store(s) of ``fp.outputs``, one chunk of videos
    at a time (:func:`pipeline.features.consolidate`); the parts are left for the caller to remove."""
    p: ExtractFeaturesParams = ctx.params
    t = fp.table
    P, views = p.positions, p.views
    membership = t.split_of(p.split)
    attrs = {
        "stage": "extract-features", "stage_version": VERSION, "fingerprint": ctx.fingerprint,
        "dataset": t.dataset, "split_id": p.split, "num_positions": P, "views": views,
        "view_names": ["center"] if views == 1 else list(TEN_VIEW_NAMES), "dtype": p.dtype,
        "positions_rule": "position k of P is frame floor(num_frames * (2k + 1) / (2P)) "
                          "(pipeline.data.sampling.feature_positions); flow: the L-field stack centred on it "
                          "(pipeline.data.sampling.flow_stack_indices)",
        "segments_rule": "segment s of N uses positions floor(s P / N) .. floor((s + 1) P / N) - 1; "
                         "needs P >= 5 N for 5 test positions per segment ([STFN] §4.2)",
        "max_segments": P // 5,
        "backbones": {s: asdict(src) for s, src in fp.sources.items()},
        "upstream": ctx.upstream.fingerprints(),
    }
    written = [feature_store_path(ctx.dir, backend) for backend in fp.outputs]
    consolidate(parts, [t.video_ids[i] for i in done], written, labels=[t.labels[i] for i in done],
                split=[membership[i] for i in done], groups=[t.groups[i] for i in done], class_names=list(t.classes),
                shapes={s: (P, views, src.num_features) for s, src in fp.sources.items()}, dtype=p.dtype, attrs=attrs)
    return written


def run(ctx: StageContext, plan: Plan) -> dict:
    p: ExtractFeaturesParams = ctx.params
    fp: FeaturePlan = plan.data
    t = fp.table
    parts = VideoStore(ctx.dir / PARTS, "h5")
    # Tags this run's journal records (for the inputs-per-run count); unique even for runs in the same second.
    run_token = uuid.uuid4().hex
    run_token = dist.broadcast_object(run_token) if ctx.world_size > 1 else run_token
    if ctx.rank == 0:
        if parts.clean_temporary():
            ctx.log.info("removed unfinished feature parts left by an interrupted run")
        # After `pipeline verify` found damaged videos in the consolidated store, the other journaled videos'
        # parts come back from it; a journaled video whose part is still gone is redone.
        missing = {t.video_ids[i] for i in fp.rows
                   if ctx.journal.is_done(t.video_ids[i]) and not parts.exists(t.video_ids[i])}
        for backend in fp.outputs:
            if missing and (n := restore_parts(feature_store_path(ctx.dir, backend), parts, missing)):
                ctx.log.info("%d videos' features taken back from %s (not recomputed)", n,
                             feature_store_path(ctx.dir, backend))
                missing = {v for v in missing if not parts.exists(v)}
        todo = [i for i in fp.rows if not (ctx.journal.is_done(t.video_ids[i]) and parts.exists(t.video_ids[i]))]
    else:
        todo = None
    # Rank 0 decides the work list before anyone writes, then every rank takes its round-robin share.
    todo = dist.broadcast_object(todo) if ctx.world_size > 1 else todo
    mine = ctx.shard(todo)

    device = dist.device(p.device)
    models = {s: build_backbone(src, device) for s, src in fp.sources.items()}
    if device.startswith("cuda") and p.amp:
        models = {s: m.to(memory_format=torch.channels_last) for s, m in models.items()}
    frames, flows = artifacts.frame_store(fp.frames_dir), artifacts.flow_store(fp.flow_dir)

    t0 = time.perf_counter()
    inputs = 0
    bar = ctx.progress(len(mine), "extract-features", initial=0)
    jobs = [(t.video_ids[i], t.num_frames[i]) for i in mine]
    for vid, vf, err, seconds in extract(jobs, frames, flows, fp.sources, models, num_positions=p.positions,
                                         views=p.views, dtype=p.dtype, device=device, batch_size=p.batch_size,
                                         workers=p.workers, amp=p.amp):
        if vf is None:
            ctx.journal.record_failure(vid, err)
        else:
            write_part(parts, vf)
            ctx.journal.record_ok(vid, inputs=vf.inputs, seconds=round(seconds, 4), rank=ctx.rank, run=run_token)
            inputs += vf.inputs
        bar.update(1)
        bar.set_postfix_str(f"{inputs / max(time.perf_counter() - t0, 1e-9):.0f} frames/s")
    bar.close()
    if ctx.world_size > 1:
        dist.barrier()  # every rank's parts are committed and journaled
    if ctx.rank != 0:
        return {}
    seconds = time.perf_counter() - t0

    journal = Journal(ctx.journal.path)  # rank 0's journal file, read with every rank's records
    journal.close()
    for k, i in enumerate(todo):  # a rank that stopped early (an error, not a per-video failure) left gaps
        vid = t.video_ids[i]
        if not journal.is_done(vid) and vid not in journal.failed:
            ctx.journal.record_failure(vid, f"no result: rank {k % ctx.world_size} stopped before processing "
                                            "this video")
            journal.failed[vid] = ctx.journal.failed[vid]
    done = [i for i in fp.rows if journal.is_done(t.video_ids[i])]
    failed = [t.video_ids[i] for i in fp.rows if t.video_ids[i] in journal.failed]
    this_run = [r for r in journal.done.values() if r.get("run") == run_token]
    total_inputs = sum(r.get("inputs", 0) for r in this_run)
    srcs = ", ".join(f"{s} {src.arch} [{src.weights}]" for s, src in fp.sources.items())
    speed = (f"{total_inputs} inputs (RGB frames + flow stacks) in {seconds:.1f} s = "
             f"{total_inputs / max(seconds, 1e-9):.0f} frames/s on {device}"
             + (f" x {ctx.world_size} ranks" if ctx.world_size > 1 else ""))
    if failed and not ctx.allow_failures:
        line = (f"extract-features: {len(done)} videos done, {len(failed)} failed; store not written "
                f"(parts kept for the next run); {speed}")
        ctx.log.info(line)
        return {"line": line, "videos": len(done), "failed": len(failed), "inputs_this_run": total_inputs}
    written = _consolidate(ctx, fp, done, parts)
    shutil.rmtree(ctx.dir / PARTS, ignore_errors=True)
    size = sum(_size(w) for w in written)
    line = (f"extract-features: {len(done)} videos ({len(failed)} failed) of split {p.split}, "
            f"P = {p.positions} x {p.views} view(s), {srcs} -> {', '.join(w.name for w in written)} "
            f"({size / 2**20:.1f} MiB); this run {speed}")
    ctx.log.info(line)
    return {"line": line, "videos": len(done), "failed": len(failed), "outputs": [str(w) for w in written],
            "inputs_this_run": total_inputs, "seconds": seconds,
            "frames_per_s": total_inputs / max(seconds, 1e-9), "device": device, "world_size": ctx.world_size,
            "num_features": {s: src.num_features for s, src in fp.sources.items()}}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


STAGE = Stage(
    name="extract-features", version=VERSION, params_type=ExtractFeaturesParams, plan=plan, run=run,
    upstream=upstream_keys, key=lambda p: artifacts.features_key(p.split, p.arch),
    help="Pooled RGB and flow backbone features at P positions per video ([STFN] §4.2) to Zarr / HDF5.",
)


__all__ = ["ExtractFeaturesParams", "STAGE", "plan", "run", "upstream_keys"]
