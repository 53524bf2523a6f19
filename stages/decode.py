"""``decode``: videos to frames.

Every video of the dataset (train, test and unused in any split, so one decode serves all three official
splits) is decoded with PyAV, resized so the short side is ``short_side`` (256 by default, [STFN] §4.2:
"resized to make the smaller side as 256"), and stored as one container per video in ``<out>/frames/``
(JPEG-in-array by default, see docs/formats.md for the measurement behind that choice). Videos are spread
over ``workers`` processes; each worker writes its video's container atomically and the main process
journals it, so a killed run resumes where it stopped. A worker process that dies (the kernel's out-of-memory
killer on a large video, say) breaks the pool: it is restarted, and the videos it had in flight are retried one
at a time in a process of their own; one that dies again is a per-video failure naming the signal. The frames'
bytes are only known once compressed, so the free space is checked against a projection from the videos done
(:class:`pipeline.stage.space.SpaceGuard`), and a full disk stops the run at once.
"""
from __future__ import annotations

import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from pipeline.data import annotations
from pipeline.data.annotations.rawframes import LABEL_SOURCES
from pipeline.interop import rawframes
from pipeline.io import artifacts
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, param
from pipeline.stage.space import SpaceGuard, is_disk_full, path_size
from pipeline.io.store import BACKENDS, IMAGE_CODECS, VideoStore
from pipeline.data.splits import mark_validation
from pipeline.data.table import VideoTable

VERSION = "1"


@dataclass(frozen=True)
class DecodeParams:
    dataset: str = param("demo", "Dataset layout: ucf101, hmdb51, folder (a folder per class), csv "
                         "(path,label[,split[,group]] list), list (mmaction2 / TSN 'path label' or "
                         "'dir num_frames label' lists), kinetics (the official annotation CSVs), ssv2 "
                         "(Something-Something v2 JSONs), demo (the built-in synthetic dataset) or rawframes "
                         "(frames already extracted by mmaction2 / TSN / denseflow, see docs/rawframes.md).",
                         choices=tuple(annotations.KINDS))
    root: Path | None = param(None, "Dataset root folder (for demo: where to generate it; default "
                              "<cache>/demo-data).")
    splits: Path | None = param(None, "Folder with the official split files (ucf101: classInd.txt, "
                                "trainlist0N.txt, testlist0N.txt; hmdb51: <class>_test_splitN.txt). "
                                "Default: looked for in and beside the root.")
    list: Path | None = param(None, "CSV list for --dataset csv (default <root>/list.csv); the train split's "
                              "annotation file for list (mmaction2 list), kinetics (train CSV) and ssv2 (train "
                              "JSON).")
    test_list: Path | None = param(None, "For --dataset list, kinetics, ssv2: the test split's annotation file "
                                   "(mmaction2 test list, Kinetics validation CSV, SSv2 validation JSON).",
                                   omit_default=True)
    test_fraction: float = param(0.3, "For --dataset folder: fraction of groups held out as the test split "
                                 "(0 puts every video in train).", min=0.0, max=1.0, max_exclusive=True)
    val_fraction: float = param(0.1, "Fraction of each split's training videos held out for validation, by "
                                "whole groups per class; every later stage validates on them (docs/architecture.md).",
                                min=0.0, max=1.0, max_exclusive=True)
    val_seed: int = param(0, "Seed of the validation hold-out.")
    short_side: int = param(256, "Resize frames so the short side has this many pixels, aspect kept "
                            "([STFN] §4.2); 0 keeps the source size.", min=16, also=(0,))
    frame_codec: str = param("jpeg", "How frames are stored: jpeg (JPEG-in-array, much smaller) or raw "
                             "(lossless uint8 chunks, faster to read). See docs/formats.md.", choices=IMAGE_CODECS)
    jpeg_quality: int = param(95, "JPEG quality for --frame-codec jpeg.", min=1, max=100)
    store: str = param("zarr", "Frame store: zarr (a folder per video) or h5 (an HDF5 file per video).",
                       choices=BACKENDS)
    max_frames: int = param(0, "Decode at most this many frames per video (0: all).", min=0)
    demo_seed: int = param(0, "Seed of the synthetic demo dataset (--dataset demo).")
    allow_missing: bool = param(False, "Accept split lists that name videos missing on disk (they are listed "
                                "and skipped) instead of stopping.")
    labels: str = param("names", "For --dataset csv: the label column holds class names or 0-based class "
                        "indices.", choices=annotations.LABEL_KINDS)
    classes: Path | None = param(None, "For --dataset csv, list, kinetics: class list (one name per line, or "
                                 "classInd.txt '<index> <name>' lines) giving the classes and their order; for "
                                 "ssv2: its labels JSON (required).")
    truncation_tolerance: float = param(0.05, "Fraction of its declared frames a video may lack before it "
                                        "counts as truncated.", min=0.0, max=1.0, max_exclusive=True)
    allow_truncated: bool = param(False, "Store truncated videos (marked 'truncated' in the journal and "
                                  "their attributes) instead of failing them.")
    rawframes_layout: str = param("mmaction2", "For --dataset rawframes: the tree's layout (docs/rawframes.md).",
                                  choices=tuple(rawframes.LAYOUTS), omit_default=True)
    rawframes_labels: str = param("lists", "For --dataset rawframes: labels from the rawframe lists (--rawframes-"
                                  "train-list / --rawframes-test-list) or the official ucf101 / hmdb51 split files "
                                  "(--splits).", choices=LABEL_SOURCES,
                                  omit_default=True)
    rawframes_train_list: Path | None = param(None, "For --dataset rawframes: mmaction2 / TSN train list "
                                              "('frame_dir total_frames label', label 0-based).",
                                              omit_default=True)
    rawframes_test_list: Path | None = param(None, "For --dataset rawframes: mmaction2 / TSN test list.",
                                             omit_default=True)
    workers: int = param(0, "Decoding processes (0: one per CPU core).", fingerprint=False, min=0)

    def validate(self) -> None:
        """The checks across parameters (each parameter's own are declared with it)."""
        if self.dataset != "demo" and self.root is None:
            raise StageError(f"--root is required for --dataset {self.dataset}")
        if self.dataset != "rawframes" and (self.rawframes_train_list or self.rawframes_test_list
                                            or self.rawframes_labels != "lists"):
            raise StageError(f"--rawframes-* options apply to --dataset rawframes only (got --dataset {self.dataset})")
        if self.dataset == "rawframes" and (self.list is not None or self.test_list is not None):
            raise StageError("--dataset rawframes takes its lists as --rawframes-train-list / --rawframes-test-list, "
                             "not --list / --test-list")


def demo_root(params: DecodeParams, cache_root: Path) -> Path:
    return Path(params.root) if params.root is not None else Path(cache_root) / "demo-data"


def load_tables(params: DecodeParams, cache_root: Path) -> VideoTable:
    """Read the dataset (every split it defines) into a :class:`VideoTable` without frame information."""
    kind = params.dataset
    if kind == "demo":
        from pipeline.data.demo import make_demo

        root = demo_root(params, cache_root)
        make_demo(root, seed=params.demo_seed)
    else:
        root = Path(params.root)
    split_ids = annotations.OFFICIAL_SPLITS if annotations.KINDS[kind].official_splits else (1,)
    loaded: dict[int, annotations.Dataset] = {}
    for sid in split_ids:
        try:
            loaded[sid] = load_dataset(kind, root, split=sid, **dataset_options(params))
        except annotations.MissingSplitFile as e:
            if sid == 1:
                raise StageError(str(e)) from None
            # Splits 2 and 3 are optional: a user may have only the first split's lists (and rawframe lists
            # define split 1 alone).
        except annotations.DatasetError as e:
            raise StageError(str(e)) from None
    first = loaded[1]
    records = {v.video_id: v for d in loaded.values() for v in d.videos}
    ids = sorted(records)
    for sid, d in loaded.items():
        if d.classes != first.classes:
            raise StageError(f"split {sid} of {root} defines different classes than split 1")
    split_of = {str(sid): {v.video_id: v.split for v in d.videos} for sid, d in loaded.items()}
    labels, groups = [records[i].label for i in ids], [records[i].group for i in ids]
    return VideoTable(
        dataset=kind, root=str(root), classes=list(first.classes), video_ids=ids, labels=labels, groups=groups,
        sources=[str(records[i].path) for i in ids],
        splits={sid: mark_validation([m.get(i, "unused") for i in ids], groups, labels, params.val_fraction,
                                     seed=params.val_seed) for sid, m in split_of.items()},
        missing={str(sid): list(d.missing) for sid, d in loaded.items() if d.missing},
    )


#: decode's flag for each option of the dataset kinds (:data:`pipeline.data.annotations.OPTIONS`; ``seed`` has
#: none), named in the error for an option the kind does not take. ``--list`` is the CSV of csv and the train
#: split's file of the kinds with one file per split.
OPTION_FLAGS = {"splits_dir": "--splits", "csv": "--list", "train_list": "--list", "test_list": "--test-list",
                "classes_file": "--classes", "labels": "--labels", "test_fraction": "--test-fraction",
                "allow_missing": "--allow-missing", "layout": "--rawframes-layout",
                "label_source": "--rawframes-labels"}


def load_dataset(kind: str, root: Path, **options) -> annotations.Dataset:
    """:func:`pipeline.data.annotations.load_dataset`, an option the kind does not take named by its flag too."""
    return annotations.load_dataset(kind, root, option_names=OPTION_FLAGS, **options)


def dataset_options(params: DecodeParams) -> dict:
    """decode's dataset options as :func:`pipeline.data.annotations.load_dataset`'s keywords, each one given only
    when set, so that load_dataset refuses an option the kind does not take. ``--list`` is the CSV of csv and
    the train split's file of the kinds with one file per split; rawframes takes its lists, layout and label
    source from the ``--rawframes-*`` options."""
    options = {"splits_dir": params.splits, "classes_file": params.classes,
               "labels": None if params.labels == "names" else params.labels, "allow_missing": params.allow_missing}
    if params.dataset == "rawframes":
        return {**options, "layout": rawframes.layout(params.rawframes_layout), "label_source": params.rawframes_labels,
                "train_list": params.rawframes_train_list, "test_list": params.rawframes_test_list}
    list_key = "csv" if params.dataset in ("csv", "demo") else "train_list"
    options.update({list_key: params.list, "test_list": params.test_list})
    if params.dataset == "folder":  # --test-fraction has a default value: passed to folder alone
        options["test_fraction"] = params.test_fraction or None
    return options


def _import_one(source: str, video_id: str, store_root: str, store_kind: str, short_side: int, codec: str,
                quality: int, max_frames: int, layout: str) -> dict:
    """Worker for --dataset rawframes: check a frame folder and commit its container, the JPEG bytes copied
    as they are (decoded to raw uint8 for --frame-codec raw); raises RawframesError naming the folder."""
    import cv2
    import numpy as np

    t0 = time.perf_counter()
    blobs, total, (h, w) = rawframes.read_frame_jpegs(Path(source), rawframes.layout(layout), max_frames)
    if short_side and min(h, w) != short_side:
        raise rawframes.RawframesError(f"{source}: frames are {w}x{h} (short side {min(h, w)}), --short-side is "
                                       f"{short_side}; frames are imported as they are, pass --short-side 0 "
                                       f"or {min(h, w)}")
    store = VideoStore(Path(store_root), store_kind)
    with store.writer(video_id) as c:
        if codec == "jpeg":
            c.write_encoded_images("frames", blobs)
        else:
            rgb = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                         cv2.COLOR_BGR2RGB) for b in blobs])
            c.write_images("frames", rgb, codec=codec, quality=quality)
        c.set_attrs({"num_frames": len(blobs), "fps": 0.0, "height": h, "width": w, "source": source,
                     "source_frames": total, "rawframes_layout": layout})
    return {"num_frames": len(blobs), "fps": 0.0, "height": h, "width": w, "source_frames": total,
            "seconds": time.perf_counter() - t0}


def _decode_one(source: str, video_id: str, store_root: str, store_kind: str, short_side: int, codec: str,
                quality: int, max_frames: int, tolerance: float = 0.05, allow_truncated: bool = False) -> dict:
    """Worker: decode one video and commit its container. Returns its info or raises VideoDecodeError
    (VideoTruncated when it is short of its declared frames and truncated videos are not allowed). The info
    of a stored truncated video has ``truncated``: why, e.g. "decoded 13 of 60 declared frames (frame count)"."""
    from pipeline.data.video import decode_video

    t0 = time.perf_counter()
    video = decode_video(source, short_side=short_side, max_frames=max_frames, truncation_tolerance=tolerance,
                         allow_truncated=allow_truncated)
    n, h, w, _ = video.frames.shape
    extra = {"declared_frames": video.declared}
    if video.truncated:
        extra["truncated"] = video.truncated
    if video.size_changes:  # stored at the first frame's size, never silently
        extra["size_changes"] = video.size_changes
    store = VideoStore(Path(store_root), store_kind)
    with store.writer(video_id) as c:
        c.write_images("frames", video.frames, codec=codec, quality=quality)
        c.set_attrs({"num_frames": n, "fps": video.fps, "height": h, "width": w, "source": source,
                     "source_size": list(video.source_size), "source_codec": video.codec, **extra})
    return {"num_frames": n, "fps": video.fps, "height": h, "width": w, **extra,
            "seconds": time.perf_counter() - t0}


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _pool_pass(queue: deque, work, args: tuple, workers: int, finish) -> list[tuple[str, str]]:
    """Decode the videos of ``queue`` (taken from its left) in a pool of ``workers`` processes, calling
    ``finish(vid, info, error)`` for each; returns the videos the pool had in flight when a worker process
    died (the kernel's out-of-memory killer, say), which the caller retries alone. A bounded number of videos
    is in flight, so a kill loses little work."""
    suspects: list[tuple[str, str]] = []
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    pending: dict = {}

    def submit() -> None:
        while queue and len(pending) < 4 * workers and not suspects:
            vid, src = queue[0]
            try:
                fut = pool.submit(work, src, vid, *args)
            except BrokenProcessPool:
                return
            queue.popleft()
            pending[fut] = (vid, src)

    try:
        submit()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                vid, src = pending.pop(fut)
                error = fut.exception()
                if isinstance(error, BrokenProcessPool):
                    suspects.append((vid, src))
                else:
                    finish(vid, fut.result() if error is None else None, error)
            submit()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if not suspects and queue and not pending:
        raise StageError("decode: the worker pool stopped before decoding any video; re-run with --workers 1")
    return suspects


def _run_alone(work, args: tuple) -> tuple[dict | None, BaseException | str | None]:
    """``work(*args)`` in a process of its own: (its result, None), (None, the exception it raised), or
    (None, how it died: "worker killed by SIGKILL (out of memory?)")."""
    mp = get_context("spawn")
    receive, send = mp.Pipe(duplex=False)
    proc = mp.Process(target=_alone, args=(send, work, args), daemon=True)
    proc.start()
    send.close()
    try:
        ok, payload = receive.recv()
    except EOFError:  # it died before answering
        ok, payload = None, None
    finally:
        receive.close()
        proc.join()
    if ok is None:
        return None, _death(proc.exitcode)
    return (payload, None) if ok else (None, payload)


def _alone(conn, work, args: tuple) -> None:
    try:
        result = (True, work(*args))
    except Exception as e:  # noqa: BLE001 - sent back to the parent, which records it for the video
        result = (False, e)
    try:
        conn.send(result)
    except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as its text
        conn.send((False, f"{type(result[1]).__name__}: {result[1]}"))
    conn.close()


def _death(exitcode: int | None) -> str:
    """Why a worker process ended without a result, from its exit code (negative: the signal)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"worker exited with status {exitcode} before finishing the video"


def report_missing(table: VideoTable, stage_dir: Path, log) -> int:
    """One summary line for the listed videos absent on disk (count, first few), the full list in
    ``<stage_dir>/missing.txt``; returns the count."""
    from pipeline.io.atomic import write_text

    names = sorted({m for missing in table.missing.values() for m in missing})
    if not names:
        return 0
    path = write_text(Path(stage_dir) / "missing.txt", "".join(f"{n}\n" for n in names))
    first = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    log.warning("%d videos listed in the split files are missing on disk (or unreadable: %s); full list in %s",
                len(names), first, path)
    return len(names)


def plan(params: DecodeParams, upstream: Upstream) -> Plan:
    table = load_tables(params, upstream.cache_root)
    if not table.video_ids:
        raise StageError(f"dataset {params.dataset} at {table.root} has no videos")
    stats = []
    for vid, src in zip(table.video_ids, table.sources):
        try:
            st = os.stat(src)
        except OSError as e:  # gone since the dataset was listed (the kinds report dangling links themselves)
            raise StageError(f"{src}: cannot read video {vid} ({e.strerror})") from None
        stats.append((vid, st.st_size, st.st_mtime_ns))
    # The input digest covers the dataset's content as the split files and the disk describe it.
    inputs = digest({"classes": table.classes, "labels": table.labels, "splits": table.splits,
                     "groups": table.groups, "files": stats})
    missing = sum(len(m) for m in table.missing.values())
    describe = f"{len(table)} videos, {len(table.classes)} classes, splits {', '.join(table.splits)}" + \
               (f", {missing} listed videos missing" if missing else "")
    return Plan(inputs, table, describe)


def run(ctx: StageContext, plan: Plan) -> dict:
    p: DecodeParams = ctx.params
    table: VideoTable = plan.data
    store_root = ctx.dir / artifacts.FRAMES_DIR
    store = VideoStore(store_root, p.store)
    if store.clean_temporary():
        ctx.log.info("removed unfinished containers left by an interrupted run")
    todo = [(vid, src) for vid, src in zip(table.video_ids, table.sources) if not ctx.journal.is_done(vid)]
    n_missing = report_missing(table, ctx.dir, ctx.log)
    workers = p.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    frames = 0
    bar = ctx.progress(len(table), "decode", initial=len(table) - len(todo))
    args = (str(store_root), p.store, p.short_side, p.frame_codec, p.jpeg_quality, p.max_frames,
            p.truncation_tolerance, p.allow_truncated)
    work = _decode_one
    if p.dataset == "rawframes":  # frames already extracted: checked and copied (pipeline/interop/rawframes.py)
        work, args = _import_one, (*args[:6], p.rawframes_layout)

    # Free space: the output's size is only known once compressed, so it is projected from the videos done,
    # per byte of source video (pipeline/stage/space.py).
    source_bytes = {vid: _file_size(src) if p.dataset != "rawframes" else 1 for vid, src in todo}
    ctx.space = SpaceGuard(ctx.upstream.cache_root, "decode", sum(source_bytes.values()), len(todo), "frames")

    def finish(vid: str, info: dict | None = None, error: BaseException | str | None = None) -> None:
        nonlocal frames
        if error is not None:
            if isinstance(error, BaseException) and is_disk_full(error):
                if isinstance(error, OSError) and not error.filename:
                    error.filename = str(store.path(vid))
                raise error  # the first ENOSPC stops the run (the runner names the path and the space needed)
            ctx.journal.record_failure(vid, error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        else:
            for change in info.get("size_changes", [])[:3]:
                ctx.log.warning("decode: %s: frame size changes mid-stream: %s", vid, change)
            ctx.journal.record_ok(vid, **info)
            frames += info["num_frames"]
        bar.update(1)
        bar.set_postfix_str(f"{frames / max(time.perf_counter() - t0, 1e-9):.0f} frames/s")
        if error is None:
            ctx.space.add(path_size(store.path(vid)), source_bytes.get(vid, 0))

    if workers == 1 or len(todo) <= 1:
        for vid, src in todo:
            try:
                info = work(src, vid, *args)
            except Exception as e:  # noqa: BLE001 - a per-video failure is recorded, not fatal
                finish(vid, error=e)
            else:
                finish(vid, info)
    else:
        queue = deque(todo)
        while queue:
            suspects = _pool_pass(queue, work, args, workers, finish)
            if suspects:
                ctx.log.warning("decode: a worker process died; %d video(s) it had in flight are retried one at a "
                                "time, each in a process of its own, then a new pool goes on", len(suspects))
            for vid, src in suspects:
                info, error = _run_alone(work, (src, vid, *args))
                finish(vid, info, error)
    bar.close()
    seconds = time.perf_counter() - t0

    # The table downstream stages read: every decoded video with its frame information.
    ok = [i for i, vid in enumerate(table.video_ids) if vid in ctx.journal.done]
    rec = [ctx.journal.done[table.video_ids[i]] for i in ok]
    out = VideoTable(
        dataset=table.dataset, root=table.root, classes=table.classes,
        video_ids=[table.video_ids[i] for i in ok], labels=[table.labels[i] for i in ok],
        groups=[table.groups[i] for i in ok], sources=[table.sources[i] for i in ok],
        splits={s: [m[i] for i in ok] for s, m in table.splits.items()},
        num_frames=[r["num_frames"] for r in rec], fps=[r["fps"] for r in rec],
        sizes=[[r["height"], r["width"]] for r in rec], missing=table.missing,
    )
    out.save(ctx.dir)
    total_frames = sum(out.num_frames)
    truncated = {table.video_ids[i]: r["truncated"] for i, r in zip(ok, rec) if r.get("truncated")}
    for vid, why in list(truncated.items())[:20]:
        ctx.log.warning("stored truncated (--allow-truncated): %s: %s", vid, why)
    line = (f"decode: {len(ok)} videos ({len(ctx.journal.failed)} failed"
            + (f", {len(truncated)} stored truncated" if truncated else "")
            + (f", {n_missing} missing" if n_missing else "")
            + f"), {frames} frames {'imported' if p.dataset == 'rawframes' else 'decoded'} in {seconds:.1f} s "
            f"({frames / max(seconds, 1e-9):.0f} frames/s, "
            f"{workers} workers); {total_frames} frames stored")
    ctx.log.info(line)
    return {"line": line, "videos": len(ok), "frames": total_frames, "frames_this_run": frames,
            "seconds": seconds, "frames_per_s": frames / max(seconds, 1e-9), "workers": workers,
            "classes": len(out.classes), "truncated": truncated, "missing": n_missing}


def imported(recorded: dict) -> str:
    """What a decode run with these recorded parameters imported: the rawframes tree (docs/rawframes.md)."""
    if recorded.get("dataset") != "rawframes":
        return ""
    return f"the {recorded.get('rawframes_layout') or 'mmaction2'} frames of {recorded.get('root')}"


STAGE = Stage(
    name=artifacts.DECODE, version=VERSION, params_type=DecodeParams, plan=plan, run=run, imported=imported,
    help="Decode videos to frames (UCF101, HMDB51, folder per class, CSV list, mmaction2 / TSN lists, Kinetics, "
         "Something-Something v2, or the built-in demo).",
)

