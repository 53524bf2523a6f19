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
process. At the end the parts are consolidated into ``features.zarr`` / ``features.h5`` (docs/formats.md),
written atomically, and removed. Non-finite features (NaN, inf, or float16 overflow) are per-video
failures and are never stored.

Examples::

\b
    pipeline extract-features --format zarr
    pipeline extract-features --rgb-weights imagenet --flow-weights imagenet --arch resnet50 --views 10
    torchrun --nproc-per-node 4 -m stages extract-features --format h5
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.io import artifacts
from pipeline import dist
from pipeline.io.atomic import weights_sha256
from pipeline.stage import (Journal, Plan, Stage, StageContext, StageError, Upstream, digest, file_sha256, param,
                            read_manifest)
from pipeline.models.backbones import (
    Backbone,
    create_backbone,
    imagenet_weights_path,
    list_backbones,
    normalize_flow,
    normalize_rgb,
)
from pipeline.data.sampling import feature_positions, flow_stack_indices
from pipeline.io.store import (
    BACKENDS,
    FeatureSet,
    StoreError,
    VideoStore,
    feature_store_path,
    write_feature_store,
)
from pipeline.data.table import VideoTable
from pipeline.data.transforms import center_view, resize_short_side, ten_crop

VERSION = "1"
from pipeline.data import STREAMS  # noqa: E402,F401
FORMATS = ("zarr", "h5", "both")
DTYPES = ("float16", "float32")
VIEWS = (1, 10)
#: Names of the view axis for --views 10, torchvision's ten_crop order (pipeline.data.transforms.ten_crop).
TEN_VIEW_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip", "center_flip")
#: [STFN] §4.2 / TSN: L = 10 flow fields per stack when no checkpoint says otherwise.
DEFAULT_FLOW_LENGTH = 10
DEFAULT_ARCH = "resnet101"
PARTS = "parts"


@dataclass(frozen=True)
class ExtractFeaturesParams:
    split: int = param(1, "Split whose train / test membership is stored beside the features (a split id "
                       "of the video table: 1, 2, 3 for UCF101 / HMDB51, 1 otherwise).", scope="split")
    positions: int = param(45, "P, temporal positions per video. A head with N segments needs P >= 5 N "
                           "(5 test positions per segment, [STFN] §4.2): 45 covers N up to 9; 25 / 35 "
                           "cover the paper's N = 5 / 7.")
    views: int = param(1, "Spatial views per position: 1 (centre crop) or 10 (TSN's 4 corners + centre and "
                       "their mirrors), stored as an extra axis.")
    rgb_weights: str = param("finetune", "Appearance backbone: finetune (<cache>/finetune/<scope>/rgb/best.pt), "
                             "imagenet, none (random, seeded by --seed) or a weights file.")
    flow_weights: str = param("finetune", "Motion backbone: finetune (<cache>/finetune/<scope>/flow/best.pt), "
                              "imagenet (cross-modality first conv), none or a weights file.")
    arch: str = param(DEFAULT_ARCH, "Backbone of both streams (resnet18/34/50/101/152, inception_v3): reads "
                      "finetune's outputs of this backbone; a weights file of another arch is refused.",
                      aliases=("--backbone",), scope="backbone")
    input_size: int = param(0, "Network input side in pixels; 0: the checkpoint's input_size, else the "
                            "backbone's native size (224 ResNet, 299 Inception-V3).")
    flow_length: int = param(0, "L, flow fields per stack (2L input channels); 0: the flow checkpoint's, "
                             "else 10 ([STFN] §4.2).")
    dtype: str = param("float16", "Stored feature dtype.", choices=DTYPES)
    format: str = param("zarr", "Feature store: features.zarr, features.h5 or both.", choices=FORMATS)
    include_unused: bool = param(False, "Also extract the videos that are in neither the train nor the test "
                                 "list of --split.")
    seed: int = param(0, "Seed of the random initialisation for --*-weights none.")
    device: str = param("auto", "auto (this rank's GPU if any, else cpu), cpu, cuda or cuda:N.",
                        fingerprint=False)
    batch_size: int = param(64, "Network inputs per forward pass (batches never mix videos).", fingerprint=False)
    workers: int = param(4, "Reader threads (read + decode + crop of the next videos while the GPU runs).",
                         fingerprint=False)
    amp: bool = param(True, "On CUDA: bfloat16 autocast and channels_last.", fingerprint=False)

    def validate(self) -> None:
        if self.positions < 1:
            raise StageError(f"--positions must be at least 1 (got {self.positions})")
        if self.views not in VIEWS:
            raise StageError(f"--views must be 1 (centre crop) or 10 (TSN 10-crop), got {self.views}")
        if self.input_size < 0 or 0 < self.input_size < 16:
            raise StageError(f"--input-size must be 0 (automatic) or at least 16 (got {self.input_size})")
        if self.flow_length < 0:
            raise StageError(f"--flow-length must be 0 (automatic) or positive (got {self.flow_length})")
        if self.arch not in list_backbones():
            raise StageError(f"--arch {self.arch!r} is unknown; choose one of {', '.join(list_backbones())}")
        if self.batch_size < 1 or self.workers < 1:
            raise StageError("--batch-size and --workers must be at least 1")


# ----------------------------------------------------------------------------------------------------------
# Sources: which network and weights each stream uses
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StreamSource:
    """A stream's resolved backbone: what :func:`build_backbone` builds and what the store's attrs record."""

    stream: str
    arch: str
    weights: str            # finetune | imagenet | none | file
    path: str | None        # the weights file (None for none)
    sha256: str | None      # of the weights file's bytes (provenance, recorded in the store's attributes)
    in_channels: int
    input_size: int
    flow_length: int        # L (flow stream; 0 for rgb)
    num_features: int
    seed: int = 0
    upstream_fingerprint: str | None = None  # finetune/<stream>'s fingerprint for finetune weights
    weights_sha256: str | None = None  # of the weights tensors alone (pipeline.io.atomic.weights_sha256)

    def identity(self) -> dict:
        """What determines the features: the weights' tensors, not the file's bytes or path (a resumed
        finetune rewrites best.pt with other timings and the same weights)."""
        d = asdict(self)
        if self.weights_sha256:
            d.pop("sha256"), d.pop("path")
        d.pop("upstream_fingerprint")  # finetune's fingerprint is already an upstream fingerprint
        return d


def _num_features(arch: str, in_channels: int) -> int:
    with torch.device("meta"):
        return create_backbone(arch, num_classes=0, in_channels=in_channels, weights="none").num_features


def _native_size(arch: str) -> int:
    with torch.device("meta"):
        return create_backbone(arch, num_classes=0, weights="none").input_size


def _load_checkpoint(path: Path) -> dict | None:
    """Our checkpoint dict (with a ``model`` entry) or None for a plain state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a clear error naming it
        raise StageError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    return None


def resolve_source(stream: str, p: ExtractFeaturesParams, upstream: Upstream, classes: Sequence[str],
                   splits: Sequence[str] = ()) -> StreamSource:
    """Decide arch, weights file, input size and flow length of ``stream``; refuse what does not fit.
    ``splits``: the split ids the video table defines (a network of another of them is refused)."""
    weights = p.rgb_weights if stream == "rgb" else p.flow_weights
    ckpt: dict | None = None
    path: Path | None = None
    up_fp = None
    if weights == "finetune":
        key = artifacts.finetune_key(stream, p.split, p.arch)
        path = upstream.dir(key) / "best.pt"
        up_fp = upstream.manifests[key]["fingerprint"]
        if not path.is_file():
            raise StageError(f"{path}: the {key} stage finished but its best.pt checkpoint is missing; re-run "
                             f"`pipeline finetune --stream {stream}` (or pass --{stream}-weights)")
        ckpt = _load_checkpoint(path)
        if ckpt is None:
            raise StageError(f"{path}: not a finetune checkpoint (no 'model' entry)")
        if ckpt.get("num_classes") != len(classes):
            raise StageError(f"{path}: checkpoint has a {ckpt.get('num_classes')}-way classifier, the video "
                             f"table has {len(classes)} classes; it was fine-tuned on another dataset")
        if ckpt.get("classes") is not None and list(ckpt["classes"]) != list(classes):
            raise StageError(f"{path}: checkpoint classes differ from the video table's (first: "
                             f"{list(ckpt['classes'])[:3]} vs {list(classes)[:3]})")
    elif weights in ("imagenet", "none"):
        pass
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise StageError(f"--{stream}-weights: weights file {path} does not exist (or pass finetune, "
                             "imagenet or none)")
        ckpt = _load_checkpoint(path)

    ck_arch = ckpt.get("arch") if ckpt else None
    if ck_arch is not None and ck_arch != p.arch:
        raise StageError(f"{path}: checkpoint holds a {ck_arch} backbone but --arch {p.arch} was asked")
    arch = p.arch
    ck_params = (ckpt.get("params") or {}) if ckpt else {}
    trained = ck_params.get("split")
    if trained is not None and int(trained) != int(p.split) and str(trained) in {str(s) for s in splits}:
        raise StageError(f"{path}: this {stream} network was fine-tuned on split {ck_params['split']}; its "
                         f"features for split {p.split} would score test videos it was trained on. Use the "
                         f"split {p.split} network (or --split {ck_params['split']})")

    if stream == "rgb":
        L, in_channels = 0, 3
    else:
        ck_in = ckpt.get("in_channels") if ckpt else None
        L = p.flow_length or ck_params.get("flow_length") or (ck_in // 2 if ck_in else 0) or DEFAULT_FLOW_LENGTH
        in_channels = 2 * int(L)
    if ckpt is not None and ckpt.get("in_channels") not in (None, in_channels):
        raise StageError(f"{path}: checkpoint takes {ckpt['in_channels']} input channels, the {stream} stream "
                         f"needs {in_channels}" + (f" (L = {L} flow fields)" if stream == "flow" else ""))
    size = p.input_size or int(ck_params.get("input_size") or 0) or _native_size(arch)

    if weights == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            raise StageError(f"ImageNet weights for {arch} not found at {path}; this pipeline never downloads "
                             "(copy the torchvision file there, or use the finetune checkpoints)")
    kind = weights if weights in ("finetune", "imagenet", "none") else "file"
    return StreamSource(stream, arch, kind, str(path) if path else None, file_sha256(path) if path else None,
                        in_channels, int(size), int(L), _num_features(arch, in_channels), p.seed, up_fp,
                        weights_sha256(ckpt["model"]) if ckpt is not None else None)


def build_backbone(src: StreamSource, device: str | torch.device = "cpu") -> Backbone:
    """The feature extractor of ``src`` in eval mode on ``device`` (no classifier)."""
    if src.weights == "none":
        torch.manual_seed(src.seed + (0 if src.stream == "rgb" else 1))
    try:
        model = create_backbone(src.arch, num_classes=0, in_channels=src.in_channels,
                                weights=src.weights if src.weights in ("imagenet", "none") else src.path)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(f"{src.stream} backbone: {e}") from e
    return model.eval().to(device)


# ----------------------------------------------------------------------------------------------------------
# Per-video inputs
# ----------------------------------------------------------------------------------------------------------

class VideoFailure(RuntimeError):
    """A video's features cannot be computed; recorded as a per-video failure."""


_GPU_DECODE_LOCK = threading.Lock()


def make_views(x: torch.Tensor, input_size: int, views: int, *, is_flow: bool) -> torch.Tensor:
    """``(U, C, H, W)`` uint8 -> ``(U * views, C, S, S)`` uint8 test views, view index fastest.

    views = 1: :func:`center_view` (short side ``round(S * 256 / 224)``, central square). views = 10: the
    same short-side resize, then :func:`ten_crop` (flipped flow views get ``255 - x`` on x channels).
    """
    if views == 1:
        return center_view(x, input_size)
    scaled = resize_short_side(x, round(input_size * 256 / 224))
    v = ten_crop(scaled, input_size, is_flow=is_flow)            # (10, U, C, S, S)
    return v.transpose(0, 1).reshape(-1, *v.shape[2:])


@dataclass
class VideoInputs:
    video_id: str
    positions: np.ndarray          # (P,) frame index of each position
    inverse: np.ndarray            # (P,) row of each position among the unique positions
    inputs: dict[str, torch.Tensor]  # stream -> (U * views, C, S, S) uint8 on the device


def _read(reader, name: str, indices: Sequence[int], device: str) -> torch.Tensor:
    if device.startswith("cuda") and reader.image_codec(name) == "jpeg":
        with _GPU_DECODE_LOCK:  # nvJPEG through torchvision, one batch at a time
            return reader.read_images(name, indices, device=device)
    return reader.read_images(name, indices).to(device, non_blocking=True)


def video_inputs(video_id: str, num_frames: int, frames: VideoStore, flows: VideoStore,
                 sources: dict[str, StreamSource], num_positions: int, views: int,
                 device: str = "cpu") -> VideoInputs:
    """Read, decode and crop one video's network inputs for both streams.

    RGB: the frames at the P positions; flow: the L-field stacks centred on them. Repeated positions
    (videos shorter than P frames) are computed once.
    """
    pos = feature_positions(num_frames, num_positions).astype(np.int64)
    uniq, inverse = np.unique(pos, return_inverse=True)
    out: dict[str, torch.Tensor] = {}
    with frames.reader(video_id) as r:
        n = r.num_images("frames")
        if n != num_frames:
            raise VideoFailure(f"{frames.path(video_id)} holds {n} frames, the video table says {num_frames}")
        x = _read(r, "frames", uniq.tolist(), device)                  # (U, H, W, 3)
    out["rgb"] = make_views(x.permute(0, 3, 1, 2), sources["rgb"].input_size, views, is_flow=False)

    if not flows.exists(video_id):
        raise VideoFailure(f"no flow for this video: {flows.path(video_id)} is missing (extract-flow did not "
                           "produce it)")
    L = sources["flow"].flow_length
    with flows.reader(video_id) as r:
        nf = r.num_images("flow")
        attrs = r.attrs
        if attrs.get("num_frames") not in (None, num_frames):
            raise VideoFailure(f"{flows.path(video_id)} was computed from {attrs['num_frames']} frames, the "
                               f"frame store has {num_frames}; re-run extract-flow")
        stacks = np.array([flow_stack_indices(int(min(c, nf)), nf, L) for c in uniq])  # (U, L)
        need, where = np.unique(stacks, return_inverse=True)
        f = _read(r, "flow", need.tolist(), device)                    # (K, H, W, 2)
    f = f[torch.as_tensor(where.reshape(stacks.shape), device=f.device)]  # (U, L, H, W, 2)
    u, _, h, w, _ = f.shape
    f = f.permute(0, 1, 4, 2, 3).reshape(u, 2 * L, h, w)               # channels x0, y0, x1, y1, ...
    out["flow"] = make_views(f, sources["flow"].input_size, views, is_flow=True)
    return VideoInputs(video_id, pos, inverse, out)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------

_NORMALIZE = {"rgb": normalize_rgb, "flow": normalize_flow}


@torch.inference_mode()
def forward_features(model: Backbone, x: torch.Tensor, stream: str, batch_size: int, amp: bool) -> torch.Tensor:
    """``(B, C, S, S)`` uint8 -> ``(B, D)`` float32 CPU pooled features, in chunks of ``batch_size``."""
    cuda = x.device.type == "cuda"
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = _NORMALIZE[stream](x[i:i + batch_size])
        if cuda and amp:
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model.forward_features(xb)
        else:
            y = model.forward_features(xb)
        outs.append(y.float().cpu())
    return torch.cat(outs)


@dataclass
class VideoFeatures:
    video_id: str
    positions: np.ndarray                # (P,)
    features: dict[str, np.ndarray]      # stream -> (P, views, D) in the stored dtype
    inputs: int                          # network inputs computed (both streams)


def video_features(vi: VideoInputs, models: dict[str, Backbone], views: int, dtype: str, batch_size: int,
                   amp: bool) -> VideoFeatures:
    """Run both backbones on one video's inputs; raise VideoFailure on NaN / inf (also after the dtype cast)."""
    feats = {}
    count = 0
    for stream in STREAMS:
        x = vi.inputs[stream]
        y = forward_features(models[stream], x, stream, batch_size, amp).numpy()   # (U * views, D)
        count += x.shape[0]
        y = y.reshape(-1, views, y.shape[-1])[vi.inverse]                         # (P, views, D)
        with np.errstate(over="ignore"):  # float16 overflow becomes inf, reported below
            stored = y.astype(dtype)
        bad = ~np.isfinite(stored).all(axis=(1, 2))
        if bad.any():
            kind = "NaN" if np.isnan(y).any() else "inf" if not np.isfinite(y).all() else \
                f"values beyond the {dtype} range (max |x| {np.abs(y).max():.3g})"
            raise VideoFailure(f"non-finite {stream} features ({kind}) at {int(bad.sum())} of {len(bad)} "
                               f"positions (e.g. position {int(np.flatnonzero(bad)[0])}); not stored")
        feats[stream] = stored
    return VideoFeatures(vi.video_id, vi.positions, feats, count)


def extract(jobs: Sequence[tuple[str, int]], frames: VideoStore, flows: VideoStore, sources: dict[str, StreamSource],
            models: dict[str, Backbone], *, num_positions: int, views: int, dtype: str, device: str,
            batch_size: int, workers: int, amp: bool) -> Iterator[tuple[str, VideoFeatures | None, str | None, float]]:
    """Features of ``jobs`` ((video_id, num_frames), in order): yields (video_id, features, error, seconds).

    ``workers`` threads read, decode and crop the next videos while this thread runs the networks.
    """
    def prepare(job):
        t0 = time.perf_counter()
        try:
            return video_inputs(job[0], job[1], frames, flows, sources, num_positions, views, device), None, t0
        except (VideoFailure, StoreError, OSError, IndexError, KeyError, ValueError, RuntimeError) as e:
            return None, f"{type(e).__name__}: {e}" if not isinstance(e, VideoFailure) else str(e), t0

    with ThreadPoolExecutor(workers) as pool:
        queue: deque = deque()
        it = iter(jobs)
        for job in it:  # bounded look-ahead: memory for 2 * workers videos' inputs
            queue.append((job[0], pool.submit(prepare, job)))
            if len(queue) >= 2 * workers:
                break
        while queue:
            vid, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt[0], pool.submit(prepare, nxt)))
            vi, err, t0 = fut.result()
            if vi is None:
                yield vid, None, err, time.perf_counter() - t0
                continue
            try:
                vf = video_features(vi, models, views, dtype, batch_size, amp)
            except VideoFailure as e:
                yield vid, None, str(e), time.perf_counter() - t0
            else:
                yield vid, vf, None, time.perf_counter() - t0


def write_part(parts: VideoStore, vf: VideoFeatures) -> None:
    """Commit one video's features atomically (``parts/<video_id>.h5``)."""
    with parts.writer(vf.video_id) as c:
        for stream, arr in vf.features.items():
            c.create(stream, arr, compress=False)
        c.create("positions", vf.positions.astype(np.float32), compress=False)


# ----------------------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------------------

def upstream_keys(p: ExtractFeaturesParams) -> tuple[str, ...]:
    keys = ["decode", "extract-flow"]
    keys += [artifacts.finetune_key(s, p.split, p.arch) for s in STREAMS
             if (p.rgb_weights if s == "rgb" else p.flow_weights) == "finetune"]
    return tuple(keys)


def flow_store(flow_dir: Path) -> VideoStore:
    """The flow store extract-flow wrote: ``flow/``, back end from its manifest's ``store`` parameter."""
    m = read_manifest(Path(flow_dir)) or {}
    backend = (m.get("params") or {}).get("store")
    if backend not in BACKENDS:
        raise StageError(f"{flow_dir}/manifest.json does not name the flow store's back end (params.store); "
                         "re-run `pipeline extract-flow`")
    return VideoStore(Path(flow_dir) / "flow", backend)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


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
    from pipeline.io.artifacts import frame_store

    p.validate()
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
    frames = frame_store(upstream.dir("decode"))
    flows = flow_store(upstream.dir("extract-flow"))
    first = table.video_ids[rows[0]]
    for store in (frames, flows):
        if store.exists(first):
            try:
                with store.reader(first):
                    pass
            except StoreError as e:
                raise StageError(str(e)) from None

    # Disk: the parts and the consolidated store(s) exist side by side until the parts are removed.
    itemsize = np.dtype(p.dtype).itemsize
    per_video = p.positions * p.views * itemsize * sum(s.num_features for s in sources.values()) + 4 * p.positions
    copies = 1 + (2 if p.format == "both" else 1)
    estimate = int(len(rows) * per_video * copies * 1.05) + (16 << 20)
    root = upstream.cache_root
    free = _free_bytes(root if root.exists() else root.parent)
    if free < estimate:
        raise StageError(f"not enough disk space in {root}: extracting {len(rows)} videos needs about "
                         f"{estimate / 2**20:.0f} MiB ({p.positions} positions x {p.views} view(s), {p.dtype}, "
                         f"parts + {p.format}), {free / 2**20:.0f} MiB free")

    outputs = ["zarr", "h5"] if p.format == "both" else [p.format]
    inputs = digest({"videos": [table.video_ids[i] for i in rows],
                     "sources": {s: src.identity() for s, src in sources.items()}})
    describe = (f"{len(rows)} videos of split {p.split}, P = {p.positions}, {p.views} view(s); " +
                ", ".join(f"{s}: {src.arch} ({src.weights}, {src.input_size}px"
                          + (f", L = {src.flow_length}" if s == "flow" else "") + ")" for s, src in sources.items()))
    return Plan(inputs, FeaturePlan(table, rows, sources, upstream.dir("decode"), upstream.dir("extract-flow"),
                                    estimate, outputs), describe)


def _consolidate(ctx: StageContext, fp: FeaturePlan, done: list[int], parts: VideoStore) -> list[Path]:
    p: ExtractFeaturesParams = ctx.params
    t = fp.table
    ids = [t.video_ids[i] for i in done]
    P, views = p.positions, p.views
    streams = {s: np.empty((len(ids), P, views, src.num_features), dtype=p.dtype) for s, src in fp.sources.items()}
    positions = np.empty((len(ids), P), np.float32)
    for k, vid in enumerate(ids):
        with parts.reader(vid) as r:
            for s in STREAMS:
                streams[s][k] = r[s][...]
            positions[k] = r["positions"][...]
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
    fs = FeatureSet(streams=streams, positions=positions, video_ids=np.array(ids, dtype=str),
                    labels=np.array([t.labels[i] for i in done], np.int64),
                    split=np.array([membership[i] for i in done], dtype=str),
                    groups=np.array([t.groups[i] for i in done], dtype=str),
                    class_names=np.array(t.classes, dtype=str), attrs=attrs)
    written = []
    for backend in fp.outputs:
        path = feature_store_path(ctx.dir, backend)
        write_feature_store(path, fs)
        written.append(path)
    return written


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.io.artifacts import frame_store

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
        # A journaled video whose part is gone (removed after consolidation, then killed) is redone.
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
    frames, flows = frame_store(fp.frames_dir), flow_store(fp.flow_dir)

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

    journal = Journal(ctx.dir / "journal.jsonl")  # every rank's records
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


def feature_store(stage_dir: Path) -> Path:
    """The feature store a finished extract-features wrote (Zarr when both formats were written)."""
    m = json.loads((Path(stage_dir) / "manifest.json").read_text())
    fmt = m["params"]["format"]
    return feature_store_path(Path(stage_dir), "zarr" if fmt == "both" else fmt)


__all__ = ["ExtractFeaturesParams", "STAGE", "StreamSource", "VideoFailure", "build_backbone", "extract",
           "feature_store", "flow_store", "make_views", "resolve_source", "video_features", "video_inputs",
           "write_part"]
