"""Running the two backbones on stored videos: the input pipeline and forward pass of ``extract-features``.

What the ``extract-features`` stage (and ``pipeline predict``, through that stage) computes for one video:

* :func:`resolve_source`: which network, weights file, input size and flow length each stream uses, with
  every check against the video table before any work ([STFN] §4.2 backbones, TSN's L = 10 flow stacks);
* :func:`video_inputs`: the RGB frames at the P positions (:func:`pipeline.data.sampling.feature_positions`)
  and the L-field flow stacks centred on them, read from the frame and flow stores and cropped into
  ``views`` test views (:func:`make_views`: the centre crop or TSN's 10 crops);
* :func:`video_features`: both backbones' pooled features ``(P, views, D)`` per stream, refusing non-finite
  values; :func:`features_of_video` is both steps for one video;
* :func:`extract`: many videos, the next ones read by threads while the networks run; :func:`write_part`
  commits one video's features; :func:`consolidate` writes the parts into the feature store(s), one chunk of
  videos at a time.

Every video's batches are formed from that video alone, so its features do not depend on which other videos
ran beside it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.streams import STREAMS
from pipeline.data.sampling import feature_positions, flow_stack_indices
from pipeline.data.transforms import center_view, resize_short_side, ten_crop
from pipeline.interop.checkpoints import convert_foreign
from pipeline.io import artifacts
from pipeline.io.atomic import weights_sha256
from pipeline.io.store import StoreError, VideoStore
from pipeline.models.backbones import (Backbone, create_backbone, imagenet_weights_path,
                                       normalize_flow, normalize_rgb)
from pipeline.stage import StageError, Upstream, file_sha256

#: Names of the view axis for --views 10, torchvision's ten_crop order (pipeline.data.transforms.ten_crop).
TEN_VIEW_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip", "center_flip")
#: [STFN] §4.2 / TSN: L = 10 flow fields per stack when no checkpoint says otherwise.
DEFAULT_FLOW_LENGTH = 10


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


def resolve_source(stream: str, p: Any, upstream: Upstream, classes: Sequence[str],
                   splits: Sequence[str] = ()) -> StreamSource:
    """Decide arch, weights file, input size and flow length of ``stream``; refuse what does not fit.
    ``splits``: the split ids the video table defines (a network of another of them is refused)."""
    weights = p.rgb_weights if stream == "rgb" else p.flow_weights
    ckpt: dict | None = None
    path: Path | None = None
    up_fp = None
    if weights == "finetune":
        key = artifacts.finetune_key(stream, p.split, p.arch)
        up_fp = upstream.manifests[key].fingerprint
        path, ckpt = artifacts.finetune_checkpoint(upstream.dir(key), classes)
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
                                weights=src.weights if src.weights in ("imagenet", "none") else src.path,
                                convert=convert_foreign)
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
        outs.append(y.float())
    return torch.cat(outs).cpu()  # one copy back (one host sync) per call, not per chunk


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


def consolidate(parts: VideoStore, video_ids: Sequence[str], paths: Sequence[Path], *, labels: Sequence[int],
                split: Sequence[str], groups: Sequence[str], class_names: Sequence[str],
                shapes: dict[str, tuple[int, int, int]], dtype: str, attrs: dict) -> None:
    """Write the parts of ``video_ids`` (in that order) into the feature store(s) ``paths`` (``features.zarr`` /
    ``features.h5``), one chunk of videos at a time.

    ``shapes``: stream -> (P, views, D) of every part. Each chunk's parts are read into one block and written to
    every store (:func:`pipeline.io.store.feature_store_writer`), so memory holds one chunk of rows (at most
    :data:`pipeline.io.store.FEATURE_CHUNK_BYTES` per stream) whatever the number of videos. A store is renamed
    into place only when complete; temporaries left by a killed consolidation are removed first, and the parts
    stay until the caller removes them, so the next run writes the same stores again.
    """
    from contextlib import ExitStack

    from pipeline.io.atomic import TMP_PREFIX, remove_path
    from pipeline.io.store import feature_store_writer

    for path in map(Path, paths):
        for stale in path.parent.glob(f"{TMP_PREFIX}*-{path.name}"):
            remove_path(stale)
    P = next(iter(shapes.values()))[0]
    with ExitStack() as stack:
        writers = [stack.enter_context(feature_store_writer(
            path, video_ids=video_ids, labels=labels, split=split, groups=groups, class_names=class_names,
            attrs=attrs, streams={s: (shape, dtype) for s, shape in shapes.items()}, num_positions=P))
            for path in paths]
        step = writers[0].chunk_rows if writers else 1
        for lo in range(0, len(video_ids), step):
            ids = video_ids[lo:lo + step]
            block = {s: np.empty((len(ids), *shape), dtype) for s, shape in shapes.items()}
            positions = np.empty((len(ids), P), np.float32)
            for k, vid in enumerate(ids):
                with parts.reader(vid) as r:
                    try:
                        for s in shapes:
                            block[s][k] = r[s][...]
                        positions[k] = r["positions"][...]
                    except (ValueError, KeyError) as e:
                        raise StoreError(f"{parts.path(vid)}: not a part of ({P} positions, "
                                         f"{', '.join(f'{s} {shape}' for s, shape in shapes.items())}): {e}") from e
            for w in writers:
                w.write(lo, block, positions)


def restore_parts(store_path: Path, parts: VideoStore, wanted: set[str]) -> int:
    """Re-create the parts of ``wanted`` videos from a consolidated feature store (after ``pipeline verify``
    marked some of its videos damaged: the others need no recompute). A chunk that fails its checksum is
    skipped (its videos are recomputed). Returns how many parts were written."""
    from pipeline.io.store import decode_strings, open_feature_store

    store_path = Path(store_path)
    if not wanted or not store_path.exists():
        return 0
    r = open_feature_store(store_path)
    written = 0
    try:
        streams = list(r.attrs.get("streams", []))
        ids = decode_strings(r["video_ids"][...]).ravel().tolist()
        step = max(1, int(r[f"streams/{streams[0]}"].chunks[0])) if streams else 1
        for lo in range(0, len(ids), step):
            rows = [k for k in range(lo, min(lo + step, len(ids))) if ids[k] in wanted]
            if not rows:
                continue
            try:
                block = {s: np.asarray(r[f"streams/{s}"][lo:lo + step]) for s in streams}
                pos = np.asarray(r["positions"][lo:lo + step])
            except Exception:  # noqa: BLE001 - a damaged chunk: those videos are recomputed
                continue
            for k in rows:
                write_part(parts, VideoFeatures(ids[k], pos[k - lo], {s: block[s][k - lo] for s in streams}, 0))
                written += 1
    finally:
        r.close()
    return written


def features_of_video(video_id: str, num_frames: int, frames: VideoStore, flows: VideoStore,
                      sources: dict[str, StreamSource], models: dict[str, Backbone], *, num_positions: int,
                      views: int = 1, dtype: str = "float16", device: str = "cpu", batch_size: int = 64,
                      amp: bool = True) -> VideoFeatures:
    """One video's ``(P, views, D)`` features per stream: :func:`video_inputs` then :func:`video_features`."""
    vi = video_inputs(video_id, num_frames, frames, flows, sources, num_positions, views, device)
    return video_features(vi, models, views, dtype, batch_size, amp)

