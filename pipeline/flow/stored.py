"""Reading what ``extract-flow`` stored: the quantized flows of a video, and any pair recomputed in float
with the parameters of the finished run."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.io import artifacts
from pipeline.io.store import VideoStore, read_frames


def read_flow(store: VideoStore, video_id: str, indices: Sequence[int] | None = None, *, dequantize: bool = True):
    """Stored flows of a video: (k, H, W, 2) float32 pixels (or the uint8 codes with ``dequantize=False``)."""
    from pipeline.flow.quantize import dequantize_flow

    with store.reader(video_id) as r:
        q = r.read_images("flow", indices)
        bound = r.attrs["bound"]
    return dequantize_flow(q.numpy(), bound) if dequantize else q


def flow_settings(manifest: Mapping[str, Any], where: Any = "extract-flow") -> tuple[float, int]:
    """``(bound, step)`` of a finished extract-flow run, from its manifest's parameters: what every container of
    its flow store was written with (stages downstream read them here rather than asking for them again)."""
    params = manifest.get("params") or {}
    if params.get("bound") is None or params.get("step") is None:
        raise ValueError(f"{where}: the manifest records no flow bound / step; re-run `pipeline extract-flow`")
    return float(params["bound"]), int(params["step"])


def without_flow(videos, manifest: Mapping[str, Any], where: Any = "extract-flow"):
    """``(videos without the ones a finished extract-flow run failed, {video: why})`` for a
    :class:`~pipeline.data.clips.SplitVideos`. A complete manifest accepted those failures (too short for flow,
    frames it could not read; ``--allow-failures``): the stages that train on flow (finetune ``--stream flow``,
    refine) leave the videos out with a note rather than refusing the run, since re-running extract-flow cannot
    give them flow. ValueError naming ``where`` when no training or no test video is left."""
    failures = dict(manifest.get("failures") or {})
    used = [*videos.train.video_ids, *videos.val.video_ids, *videos.test.video_ids]
    left_out = {v: str(failures[v]) for v in used if v in failures}
    if not left_out:
        return videos, {}
    try:
        return videos.without(left_out), left_out
    except ValueError as e:
        raise ValueError(f"{where}: {len(left_out)} video(s) have no flow (extract-flow failures); {e}") from None


def note_without_flow(log, left_out: Mapping[str, str]) -> None:
    """A warning per video left out for want of flow (the first 20) and their count."""
    for vid, why in list(left_out.items())[:20]:
        log.warning("%s: left out, it has no flow (extract-flow: %s)", vid, why)
    if left_out:
        log.warning("%d video(s) without flow left out of training and testing (all listed in the manifest's "
                    "summary, left_out)", len(left_out))


def tvl1_params(values: Mapping[str, Any]):
    """The :class:`~pipeline.flow.tvl1.TVL1Params` among ``values`` (e.g. a stage's parameters)."""
    from pipeline.flow.tvl1 import TVL1Params

    return TVL1Params(**{f.name: values[f.name] for f in fields(TVL1Params) if f.name in values})


def pair_flow(cache_root: Path, video_id: str, i: int, j: int | None = None, *, device: str = "auto"):
    """Float TV-L1 flow (2, H, W) from stored frame ``i`` to frame ``j`` (default ``i + step``) of a video,
    computed with the parameters and backend of the finished extract-flow run (unquantized, any pair)."""
    import torch

    from pipeline import dist
    from pipeline.flow.tvl1 import opencv_tvl1_flow, rgb_to_gray, tvl1_flow

    cache_root = Path(cache_root)
    params = artifacts.manifest_params(cache_root / artifacts.FLOW)
    tv = tvl1_params(params)
    j = i + int(params.get("step", 1)) if j is None else j
    frames = artifacts.frame_store(cache_root / artifacts.DECODE)
    gray = rgb_to_gray(read_frames(frames, video_id, [i, j]).permute(0, 3, 1, 2))
    if params.get("backend") == "opencv":
        g = gray.to(torch.uint8).numpy()
        return opencv_tvl1_flow(g[0], g[1], tv)
    dev = dist.device(device)
    kernel = "eager" if not params.get("fast", True) else params.get("kernel", "auto")
    return tvl1_flow(gray[0].to(dev), gray[1].to(dev), tv, kernel=kernel).cpu().numpy()
