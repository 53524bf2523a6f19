"""Datasets on disk -> a sorted list of videos with labels, split membership and groups.

Eight layouts ([STFN], Sec. 4.1 evaluates on the three official splits of UCF101 and HMDB51):

``ucf101``
    ``<root>/<Class>/v_<Class>_gGG_cCC.avi`` with the official ``classInd.txt``,
    ``trainlist0{1,2,3}.txt`` and ``testlist0{1,2,3}.txt`` (CRLF line endings are fine).
    Labels are the 1-based classInd indices minus one. The lists name
    ``HandstandPushups/v_HandStandPushups_*``; any listed path that does not exist exactly is
    resolved case-insensitively (and, failing that, by its stem with any video extension, so a
    dataset re-encoded to ``.mp4`` also loads) through one index of the root built up front.
``hmdb51``
    ``<root>/<class>/<clip>.avi`` with the official ``<class>_test_split{1,2,3}.txt`` files
    (tag 1 = train, 2 = test, 0 = unused). Class order: TSN's ``class_list.txt``
    (``pyActionRecog/benchmark_db.py``) when the splits folder has one, otherwise the sorted
    class names, as mmaction2 does. The two orders differ only by two swaps: TSN's list puts
    ``kick_ball`` before ``kick`` and ``sword_exercise`` before ``sword``.
``folder``
    ``<root>/<Class>/**/<name>.{avi,mp4,mkv,webm,mov}``, classes sorted; all videos are train
    unless ``test_fraction`` is given, in which case whole groups go to test
    (:func:`pipeline.data.splits.holdout_groups`, deterministic for a seed).
``csv``
    ``path,label[,split[,group]]`` rows with an optional header (see :func:`load_csv`).
``demo``
    the CSV layout read from ``<root>/list.csv`` (written by the demo generator).
``list``
    mmaction2 / TSN lists, one file per split: ``path label`` (a video list) or ``dir num_frames label``
    (a rawframe list, ``dir`` naming a video by its path without extension), labels 0-based
    (:func:`load_video_list`).
``kinetics``
    the official Kinetics-400 / 600 / 700 annotation CSVs ``label,youtube_id,time_start,time_end,split``,
    videos at ``<root>/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (:func:`load_kinetics`).
``ssv2``
    Something-Something v2: ``labels.json`` and the train / validation JSON lists, videos at
    ``<root>/<id>.webm`` (:func:`load_ssv2`).

Video ids: the video's path relative to the dataset root (the CSV's folder for ``csv`` and
``demo``) without its extension (for Kinetics ``<split>/<label>/<youtube_id>_<start>_<end>``, for
Something-Something v2 the id), with ``/`` separators, e.g.
``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``. An absolute CSV path outside that folder gives
its absolute path without the leading ``/`` and extension. Ids are unique within a dataset,
never empty, contain no ``.``/``..`` component, backslash or control character, and are
stable across runs as long as the files do not move.

Groups (for group-held-out validation, so that clips cut from one source video never sit on
both sides of a split):

* UCF-style names ``v_<X>_gGG_cCC`` give ``<X>_gGG`` (UCF101, folder and list layouts): the 25
  groups of a UCF101 class are the source videos its clips were cut from.
* HMDB51 names ``<title>_<action>_<body>_<camera>_<people>_<view>_<quality>_<idx>`` give
  ``<title>``, the source video's title, shared across classes: one film (e.g.
  ``TheBoondockSaints``) supplies clips to up to 18 classes, so grouping by title alone keeps
  its actors and scenes on one side. The official splits already keep each title on one side
  within a class.
* Kinetics: the YouTube id; Something-Something v2: the video id.
* Otherwise the CSV's ``group`` column, else the video id (each video its own group).
"""

from __future__ import annotations

import csv as _csv
import difflib
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from pipeline.data.splits import holdout_groups

__all__ = [
    "DATASET_KINDS",
    "LABEL_KINDS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "ListRow",
    "MissingSplitFile",
    "VideoRecord",
    "hmdb_group",
    "load_csv",
    "load_dataset",
    "load_folder",
    "load_hmdb51",
    "load_kinetics",
    "load_ssv2",
    "load_ucf101",
    "load_video_list",
    "read_video_list",
    "ucf_group",
]

DATASET_KINDS = ("ucf101", "hmdb51", "folder", "csv", "demo", "list", "kinetics", "ssv2")
LABEL_KINDS = ("names", "indices")  # what a CSV's label column holds
SPLITS = ("train", "test", "unused")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")
OFFICIAL_SPLITS = (1, 2, 3)  # [STFN], Sec. 4.1: "three training and testing splits"

_MAX_LISTED = 10
_UCF_NAME = re.compile(r"^v_(?P<name>.+)_g(?P<group>\d+)_c(?P<clip>\d+)$")
_HMDB_TAGS = {"0": "unused", "1": "train", "2": "test"}
_INT = re.compile(r"[+-]?\d+")
_COUNT = re.compile(r"[0-9]+")
log = logging.getLogger("pipeline")


class DatasetError(ValueError):
    """A dataset on disk, its split files or its list is missing or inconsistent."""


class MissingSplitFile(DatasetError):
    """A split file the requested official split needs is absent (the message names its path)."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset.

    ``video_id`` is the path relative to the dataset root without extension (module docstring).
    """

    video_id: str
    path: Path
    label: int
    class_name: str
    split: str
    group: str


@dataclass(frozen=True)
class Dataset:
    """A labelled, split list of videos, ``videos`` sorted by ``video_id``."""

    name: str
    root: Path
    classes: tuple[str, ...]
    videos: tuple[VideoRecord, ...]
    split_id: int | None
    missing: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        """Number of videos per split: ``{"train": .., "test": .., "unused": ..}``."""
        counts = dict.fromkeys(SPLITS, 0)
        for video in self.videos:
            counts[video.split] += 1
        return counts

    def subset(self, split: str) -> tuple[VideoRecord, ...]:
        """The videos of one split (``"train"``, ``"test"`` or ``"unused"``), in id order."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return tuple(v for v in self.videos if v.split == split)


# ----------------------------------------------------------------------------- groups


def ucf_group(stem: str) -> str | None:
    """``"v_ApplyEyeMakeup_g01_c01"`` -> ``"ApplyEyeMakeup_g01"``; ``None`` for other names."""
    match = _UCF_NAME.match(stem)
    if match is None:
        return None
    return f"{match['name']}_g{match['group']}"


def hmdb_group(stem: str, class_name: str) -> str | None:
    """Source title of an HMDB51 clip name, ``None`` when the name does not follow the pattern.

    ``"April_09_brush_hair_u_nm_np1_ba_goo_0"`` (class ``brush_hair``) -> ``"April_09"``: drop the
    six trailing meta fields (body, camera motion, people, viewpoint, quality, clip index) and
    the action name before them.
    """
    head = stem.split("_")
    if len(head) <= 6:
        return None
    head = "_".join(head[:-6])
    suffix = "_" + class_name
    if not head.endswith(suffix) or len(head) == len(suffix):
        return None
    return head[: -len(suffix)]


# ----------------------------------------------------------------------------- helpers


def _abs(path: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks (keeps the user's view of the tree)."""
    return Path(os.path.abspath(os.fspath(path)))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")


def _existing_file(path: str | os.PathLike | None, what: str) -> Path | None:
    """``path`` made absolute, which must exist; None stays None."""
    if path is None:
        return None
    path = _abs(path)
    _require_file(path, what)
    return path


def _check_split_id(split: int) -> int:
    if isinstance(split, bool) or not isinstance(split, int) or split not in OFFICIAL_SPLITS:
        raise DatasetError(f"split must be one of 1, 2, 3 (the official splits), got {split!r}")
    return split


def _is_video(name: str) -> bool:
    # Hidden files are skipped: macOS copies leave "._<name>.avi" AppleDouble files beside videos.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _video_id(rel: str) -> str:
    """``"Class/v_x.avi"`` -> ``"Class/v_x"``, checking the id is safe to use as a store key."""
    stem = os.path.splitext(rel)[0]
    parts = stem.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in stem or any(ord(c) < 32 for c in stem):
        raise DatasetError(
            f"cannot make a video id from path {rel!r} (empty, '.', '..', backslash or control character)"
        )
    return stem


def _id_under(root: Path, path: Path) -> str:
    """The video id of a listed file: its path relative to ``root`` without extension, or, outside ``root``,
    its absolute path without the leading ``/`` and extension."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    if rel.startswith("../"):
        rel = path.as_posix().lstrip("/")
    return _video_id(rel)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of non-blank lines; handles CRLF and a BOM."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _handle_missing(missing: list[str], allow_missing: bool, root: Path, source: str) -> tuple[str, ...]:
    if missing and not allow_missing:
        raise DatasetError(
            f"{len(missing)} videos named in {source} are missing under {root}: {_listing(missing)}; "
            "allow missing videos (--allow-missing, or allow_missing=True) to go on without them"
        )
    return tuple(missing)


def _finish(
    name: str,
    root: Path,
    classes: Sequence[str],
    records: list[VideoRecord],
    split_id: int | None,
    missing: tuple[str, ...],
) -> Dataset:
    if not records:
        raise DatasetError(f"dataset {name!r} at {root} has no videos (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    records.sort(key=lambda r: r.video_id)
    dups = sorted({a.video_id for a, b in zip(records, records[1:]) if a.video_id == b.video_id})
    if dups:
        paths = [str(r.path) for r in records if r.video_id in set(dups[:_MAX_LISTED])]
        raise DatasetError(
            f"dataset {name!r} at {root}: {len(dups)} duplicate video ids: {_listing(dups)} (paths: {_listing(paths)})"
        )
    return Dataset(name, root, tuple(classes), tuple(records), split_id, missing)


class _DiskIndex:
    """The videos at ``<root>/<folder>/<file>``, scanned once, for exact and case-insensitive lookup."""

    def __init__(self, root: Path):
        self.root = root
        self.files: set[str] = set()
        self.lower: dict[str, str] = {}
        self.stems: dict[str, list[str]] = defaultdict(list)
        with os.scandir(root) as top:
            folders = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
        for folder in folders:
            with os.scandir(root / folder) as entries:
                for entry in entries:
                    if _is_video(entry.name) and entry.is_file():
                        rel = f"{folder}/{entry.name}"
                        self.files.add(rel)
                        self.lower[rel.lower()] = rel
                        self.stems[os.path.splitext(rel)[0].lower()].append(rel)

    def resolve(self, rel: str) -> str | None:
        """The on-disk relative path for a listed one: exact, then case-insensitive, then by stem."""
        if rel in self.files:
            return rel
        found = self.lower.get(rel.lower())
        if found is not None:
            return found
        candidates = self.stems.get(os.path.splitext(rel)[0].lower(), [])
        return candidates[0] if len(candidates) == 1 else None


def _class_lookup(classes: Sequence[str]) -> dict[str, int]:
    """Class name -> index, with lower-case aliases for case-insensitive folder names."""
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    lookup.update({name: i for i, name in enumerate(classes)})
    return lookup


def _unused_records(
    index: _DiskIndex, used: set[str], lookup: dict[str, int], classes: Sequence[str], source: Path, group_of
) -> list[VideoRecord]:
    """Videos on disk that the split lists do not name."""
    records, strays = [], defaultdict(int)
    for rel in sorted(index.files - used):
        folder = rel.split("/", 1)[0]
        label = lookup.get(folder, lookup.get(folder.lower()))
        if label is None:
            strays[folder] += 1
            continue
        vid = _video_id(rel)
        stem = vid.rsplit("/", 1)[-1]
        records.append(
            VideoRecord(vid, index.root / rel, label, classes[label], "unused", group_of(stem, classes[label]) or vid)
        )
    if strays:
        listed = [f"{folder} ({n} videos)" for folder, n in sorted(strays.items())]
        raise DatasetError(
            f"folders under {index.root} hold videos but are not classes in {source}: {_listing(listed)}"
        )
    return records


def _default_splits_dir(root: Path, candidates: Sequence[str]) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


# ----------------------------------------------------------------------------- UCF101


def _read_class_ind(path: Path) -> list[str]:
    entries = []
    for n, line in _read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
        entries.append((int(parts[0]), parts[1]))
    indices = sorted(i for i, _ in entries)
    if indices != list(range(1, len(entries) + 1)):
        raise DatasetError(f"{path}: class indices must be 1..{len(entries)} without gaps or repeats")
    return [name for _, name in sorted(entries)]


def load_ucf101(
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """UCF101 with its official split ``split`` (1, 2 or 3).

    ``splits_dir`` holds ``classInd.txt``, ``trainlist0N.txt`` and ``testlist0N.txt``; by default
    ``<root>/ucfTrainTestlist`` when present, else ``root``. Videos on disk that the split's
    lists do not name are ``"unused"``. Listed videos missing on disk raise a
    :class:`DatasetError` unless ``allow_missing``, in which case they are dropped and recorded
    in ``Dataset.missing`` (as listed, without the label column). ``index`` replaces the scan of the root
    for video files (an object like ``_DiskIndex``: ``root``, ``files``, ``resolve``); the rawframes import
    passes one over frame folders (:mod:`pipeline.interop.rawframes`).
    """
    root = _abs(root)
    _require_dir(root, "UCF101 root")
    split = _check_split_id(split)
    splits_dir = _default_splits_dir(root, ["ucfTrainTestlist"]) if splits_dir is None else _abs(splits_dir)
    _require_dir(splits_dir, "UCF101 splits folder")
    class_ind = splits_dir / "classInd.txt"
    lists = {"train": splits_dir / f"trainlist{split:02d}.txt", "test": splits_dir / f"testlist{split:02d}.txt"}
    for path in (class_ind, *lists.values()):
        if not path.is_file():
            raise MissingSplitFile(f"UCF101 split file not found: {path}")

    classes = _read_class_ind(class_ind)
    lookup = _class_lookup(classes)
    index = _DiskIndex(root) if index is None else index
    records, missing, used = [], [], set()
    for subset, list_path in lists.items():
        for n, line in _read_lines(list_path):
            parts = line.split()
            listed = parts[0]
            folder = listed.split("/", 1)[0] if "/" in listed else ""
            label = lookup.get(folder, lookup.get(folder.lower()))
            if len(parts) > 2 or label is None:
                raise DatasetError(
                    f"{list_path}:{n}: expected '<Class>/<video>' with a class from {class_ind}, got {line!r}"
                )
            if len(parts) == 2 and parts[1] != str(label + 1):
                raise DatasetError(
                    f"{list_path}:{n}: label {parts[1]} does not match class {classes[label]} "
                    f"({label + 1} in {class_ind})"
                )
            rel = index.resolve(listed)
            if rel is None:
                missing.append(listed)
                continue
            if rel in used:
                raise DatasetError(f"{list_path}:{n}: {listed} is listed twice in split {split}")
            used.add(rel)
            vid = _video_id(rel)
            stem = vid.rsplit("/", 1)[-1]
            records.append(VideoRecord(vid, root / rel, label, classes[label], subset, ucf_group(stem) or vid))
    source = f"{lists['train'].name} / {lists['test'].name} in {splits_dir}"
    missing_t = _handle_missing(missing, allow_missing, root, source)
    records += _unused_records(index, used, lookup, classes, class_ind, lambda stem, _: ucf_group(stem))
    return _finish("ucf101", root, classes, records, split, missing_t)


# ----------------------------------------------------------------------------- HMDB51


def load_hmdb51(
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """HMDB51 with its official split ``split`` (1, 2 or 3).

    ``splits_dir`` holds ``<class>_test_split{1,2,3}.txt`` (and optionally TSN's
    ``class_list.txt``, whose order then gives the labels; else class names are sorted); by
    default ``<root>/testTrainMulti_7030_splits`` when present, else
    ``root``. Tags: 1 train, 2 test, 0 unused; videos on disk named by no split file are
    ``"unused"`` too. Missing videos as in :func:`load_ucf101`.
    """
    root = _abs(root)
    _require_dir(root, "HMDB51 root")
    split = _check_split_id(split)
    splits_dir = _default_splits_dir(root, ["testTrainMulti_7030_splits"]) if splits_dir is None else _abs(splits_dir)
    _require_dir(splits_dir, "HMDB51 splits folder")
    suffix = f"_test_split{split}.txt"
    split_files = sorted(p for p in splits_dir.iterdir() if p.name.endswith(suffix) and len(p.name) > len(suffix))
    if not split_files:
        raise MissingSplitFile(f"HMDB51 split files not found: no {splits_dir}/<class>{suffix}")
    classes = sorted(p.name[: -len(suffix)] for p in split_files)
    class_list = splits_dir / "class_list.txt"
    if class_list.is_file():
        listed = [line for _, line in _read_lines(class_list)]
        if sorted(listed) != sorted(classes):
            extra, absent = sorted(set(listed) - set(classes)), sorted(set(classes) - set(listed))
            raise DatasetError(
                f"{class_list} does not match the {suffix} files: only in the list: {_listing(extra) or '-'}; "
                f"only as split files: {_listing(absent) or '-'}"
            )
        classes = listed

    lookup = _class_lookup(classes)
    index = _DiskIndex(root) if index is None else index
    records, missing, used = [], [], set()
    for label, class_name in enumerate(classes):
        list_path = splits_dir / f"{class_name}{suffix}"
        for n, line in _read_lines(list_path):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in _HMDB_TAGS:
                raise DatasetError(f"{list_path}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            listed = f"{class_name}/{parts[0]}"
            rel = index.resolve(listed)
            if rel is None:
                missing.append(listed)
                continue
            if rel in used:
                raise DatasetError(f"{list_path}:{n}: {parts[0]} is listed twice in split {split}")
            used.add(rel)
            vid = _video_id(rel)
            stem = vid.rsplit("/", 1)[-1]
            group = hmdb_group(stem, class_name) or vid
            records.append(VideoRecord(vid, root / rel, label, class_name, _HMDB_TAGS[parts[1]], group))
    missing_t = _handle_missing(missing, allow_missing, root, f"{splits_dir}/<class>{suffix}")
    records += _unused_records(index, used, lookup, classes, splits_dir, hmdb_group)
    return _finish("hmdb51", root, classes, records, split, missing_t)


# ----------------------------------------------------------------------------- folder per class


def load_folder(
    root: str | os.PathLike, *, test_fraction: float | None = None, seed: int = 0
) -> Dataset:
    """``<root>/<Class>/**/<video>`` with classes sorted by name.

    All videos are ``"train"`` when ``test_fraction`` is None or 0; otherwise whole groups
    (UCF-style ``_gNN_`` names, else one group per video) are moved to ``"test"`` by
    :func:`holdout_groups` with ``seed``.
    """
    root = _abs(root)
    _require_dir(root, "dataset root")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
    with os.scandir(root) as top:
        folders = sorted(e.name for e in top if e.is_dir() and not e.name.startswith("."))
    found: list[tuple[str, str]] = []  # (class, relative path)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            found += [(folder, f"{rel_dir}/{name}") for name in filenames if _is_video(name)]
    classes = sorted({c for c, _ in found})
    label_of = {c: i for i, c in enumerate(classes)}
    records = []
    for class_name, rel in found:
        vid = _video_id(rel)
        group = ucf_group(vid.rsplit("/", 1)[-1]) or vid
        records.append(VideoRecord(vid, root / rel, label_of[class_name], class_name, "train", group))
    if test_fraction:
        held = holdout_groups(records, test_fraction, seed=seed)
        records = [
            VideoRecord(r.video_id, r.path, r.label, r.class_name, "test", r.group) if r.group in held else r
            for r in records
        ]
    return _finish("folder", root, classes, records, None, ())


# ----------------------------------------------------------------------------- CSV list

_CSV_COLUMNS = ("path", "label", "split", "group")


def _read_classes_file(path: Path) -> list[str]:
    """Class names in index order: one name per line, or UCF101's ``classInd.txt`` lines ``<1-based index> <name>``."""
    lines = [line for _, line in _read_lines(path)]
    if lines and all(re.fullmatch(r"\d+\s+\S+", line) for line in lines):
        return _read_class_ind(path)
    dups = sorted({n for n in lines if lines.count(n) > 1})
    if dups:
        raise DatasetError(f"{path}: class names repeated: {_listing(dups)}")
    return lines


def _csv_header(csv_path: Path, first: list[str]) -> list[str] | None:
    """The column names when ``first`` is a header row, None when it is a data row.

    A row is a header when it names a known column and its first cell is not a video file; every cell must
    then be a known column, ``path`` and ``label`` once each.
    """
    cells = [c.lower() for c in first]
    if not set(cells) & set(_CSV_COLUMNS) or _is_video(os.path.basename(first[0])):
        return None
    unknown = [c for c in first if c.lower() not in _CSV_COLUMNS]
    if unknown:
        close = difflib.get_close_matches(unknown[0].lower(), _CSV_COLUMNS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"{csv_path}:1: unknown column {unknown[0]!r} in the header{hint}; "
                           f"known columns: {', '.join(_CSV_COLUMNS)}")
    if "path" not in cells or "label" not in cells or len(set(cells)) != len(cells):
        raise DatasetError(f"{csv_path}:1: header must name 'path' and 'label' once each, got {first}")
    return cells


def _integer_classes(source: Path | str, labels: Sequence[str], *, names_allowed: bool = True) -> list[str]:
    """Classes ``"0".."C-1"`` for integer labels that are exactly 0..C-1; an error naming gaps or negatives.

    ``names_allowed``: the format could hold class names instead (a CSV), which the messages then suggest."""
    values = sorted({int(t) for t in labels})
    negative = [v for v in values if v < 0]
    if negative:
        raise DatasetError(f"{source}: negative class indices {_listing([str(v) for v in negative])}; labels "
                           f"are 0-based indices{' or class names' if names_allowed else ''}, or give a class list "
                           "(--classes)")
    gaps = sorted(set(range(values[-1] + 1)) - set(values)) if values else []
    if gaps:
        raise DatasetError(f"{source}: integer labels {_listing([str(v) for v in values])} leave classes "
                           f"{_listing([str(v) for v in gaps])} without any video; give a class list (--classes) "
                           f"that names every class{', or use class names as labels' if names_allowed else ''}")
    return [str(v) for v in values]


def _warn_singletons(csv_path: Path, classes: Sequence[str], labels: Sequence[int]) -> None:
    """A class with one video among classes with several is most likely a label typo: name it."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    if len(classes) < 2 or sorted(counts)[len(counts) // 2] < 3:
        return
    for i, n in enumerate(counts):
        if n == 1:
            others = [c for j, c in enumerate(classes) if j != i]
            close = difflib.get_close_matches(classes[i], others, n=1)
            hint = f"; a typo of {close[0]!r}?" if close else ""
            log.warning("%s: class %r has a single video%s (give a class list, --classes, to make unknown labels "
                        "an error)", csv_path, classes[i], hint)


def load_csv(
    csv: str | os.PathLike,
    *,
    classes_file: str | os.PathLike | None = None,
    labels: str = "names",
    allow_missing: bool = False,
    name: str = "csv",
) -> Dataset:
    """A list ``path,label[,split[,group]]``, one video per row.

    * Header: the first row is a header when it names one of ``path, label, split, group`` and its
      first cell is not a video file; it must then name only those (any order, ``path`` and ``label``
      required), else a :class:`DatasetError` names the unknown column. Without one, columns are positional.
    * ``path``: relative to the CSV's folder (the dataset root) or absolute.
    * ``label``: with ``labels="names"`` (default) a class name; with ``labels="indices"`` a 0-based class
      index. With ``classes_file`` (one class name per line in index order, or ``classInd.txt``'s
      ``<1-based index> <name>`` lines) a label must be one of its names or an index into it. Without it,
      classes are the sorted unique names; labels that all look like integers must be exactly 0..C-1
      (classes ``"0".."C-1"``): gaps or negatives are an error. A class with a single video among classes
      with several is logged as a likely typo.
    * ``split``: ``train`` (the default when empty or absent), ``test`` or ``unused``.
    * ``group``: when empty or absent, derived from a UCF-style name, else the video id.
    """
    if labels not in LABEL_KINDS:
        raise DatasetError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {labels!r}")
    csv_path = _abs(csv)
    _require_file(csv_path, "video list")
    classes_file = _existing_file(classes_file, "classes file")
    root = csv_path.parent

    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(_csv.reader(f), start=1)]
    rows = [(n, row) for n, row in rows if any(row)]
    columns = {c: i for i, c in enumerate(_CSV_COLUMNS)}
    header = _csv_header(csv_path, rows[0][1]) if rows else None
    if header is not None:
        columns = {c: i for i, c in enumerate(header)}
        rows = rows[1:]

    parsed = []  # (line, rel or absolute path, label text, split, group text)
    for n, row in rows:
        if len(row) < 2 or len(row) > len(columns):
            raise DatasetError(f"{csv_path}:{n}: expected columns {','.join(columns)}, got {len(row)} values")
        cell = {c: (row[i] if i < len(row) else "") for c, i in columns.items()}
        split = cell.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise DatasetError(f"{csv_path}:{n}: unknown split {cell['split']!r}; valid splits: {', '.join(SPLITS)}")
        if not cell["path"] or not cell["label"]:
            raise DatasetError(f"{csv_path}:{n}: empty path or label")
        if labels == "indices" and not _INT.fullmatch(cell["label"]):
            raise DatasetError(f"{csv_path}:{n}: label {cell['label']!r} is not a class index (labels=indices)")
        parsed.append((n, cell["path"], cell["label"], split, cell.get("group", "")))

    texts = [p[2] for p in parsed]
    integer = bool(texts) and all(_INT.fullmatch(t) for t in texts)
    if classes_file is not None:
        classes = _read_classes_file(classes_file)
    elif integer:
        classes = _integer_classes(csv_path, texts)
    else:
        classes = sorted(set(texts))
    by_name = {} if labels == "indices" else {c: i for i, c in enumerate(classes)}

    records, missing = [], []
    for n, path_text, label_text, split, group in parsed:
        label = by_name.get(label_text)
        if label is None and _INT.fullmatch(label_text) and (integer or classes_file is not None):
            label = int(label_text) if 0 <= int(label_text) < len(classes) else None
        if label is None:
            where = f"classes in {classes_file}" if classes_file is not None else "classes"
            raise DatasetError(f"{csv_path}:{n}: unknown label {label_text!r} ({len(classes)} {where})")
        path = _abs(root / path_text)  # an absolute path_text replaces root
        if not path.is_file():
            missing.append(path_text)
            continue
        vid = _id_under(root, path)
        group = group or ucf_group(PurePosixPath(vid).name) or vid
        records.append(VideoRecord(vid, path, label, classes[label], split, group))
    if classes_file is None and not integer:
        _warn_singletons(csv_path, classes, [r.label for r in records])
    missing_t = _handle_missing(missing, allow_missing, root, str(csv_path))
    return _finish(name, root, classes, records, None, missing_t)


# ----------------------------------------------------------------------------- mmaction2 / TSN lists


@dataclass(frozen=True)
class ListRow:
    """One line of an mmaction2 / TSN list: ``path label``, or ``dir num_frames label`` (``num_frames`` None
    for the first)."""

    line: int
    name: str
    num_frames: int | None
    label: int


def read_video_list(path: Path) -> list[ListRow]:
    """The lines of an mmaction2 / TSN list, whitespace-separated: ``path label`` (mmaction2's video list) or
    ``dir num_frames label`` (mmaction2's and TSN's rawframe list), with 0-based integer labels. The first line
    sets the column count, and every line must have it. A bad line is a :class:`DatasetError` naming
    ``path:line``."""
    rows, first = [], None
    for n, line in _read_lines(path):
        parts = line.split()
        if len(parts) not in (2, 3):
            raise DatasetError(f"{path}:{n}: expected 'path label' or 'dir num_frames label', got {line!r}")
        first = first or (n, len(parts))
        if len(parts) != first[1]:
            raise DatasetError(f"{path}:{n}: {len(parts)} columns, but line {first[0]} has {first[1]}; a list is "
                               "'path label' or 'dir num_frames label' on every line")
        label = parts[-1]
        if not _INT.fullmatch(label):
            raise DatasetError(f"{path}:{n}: label {label!r} is not an integer")
        if int(label) < 0:
            raise DatasetError(f"{path}:{n}: label {label} is negative (labels are 0-based class indices)")
        if len(parts) == 3 and not _COUNT.fullmatch(parts[1]):
            raise DatasetError(f"{path}:{n}: num_frames {parts[1]!r} is not a whole number")
        rows.append(ListRow(n, parts[0], int(parts[1]) if len(parts) == 3 else None, int(label)))
    return rows


def _split_files(kind: str, train, test, what: str, options: str = "--list / --test-list") -> list[tuple[str, Path]]:
    """(split, absolute path) of the given train and test annotation files, each of which must exist."""
    out = []
    for split, path in (("train", train), ("test", test)):
        if path is not None:
            path = _abs(path)
            _require_file(path, f"{kind} {split} {what}")
            out.append((split, path))
    if not out:
        raise DatasetError(f"dataset kind {kind!r} needs a train and / or a test {what} ({options})")
    return out


def _index_classes(rows: Sequence[tuple[Path, ListRow]], classes_file: Path | None) -> list[str]:
    """Classes of 0-based integer labels: ``classes_file``'s names (every label must index one), else
    ``"0".."C-1"`` (the labels must be exactly 0..C-1)."""
    if classes_file is None:
        sources = ", ".join(dict.fromkeys(str(p) for p, _ in rows))
        return _integer_classes(sources, [str(r.label) for _, r in rows], names_allowed=False)
    classes = _read_classes_file(classes_file)
    for path, row in rows:
        if row.label >= len(classes):
            raise DatasetError(f"{path}:{row.line}: label {row.label} but {classes_file} names {len(classes)} classes")
    return classes


class _Folders:
    """The files of each folder, listed once: a list of 650,000 Kinetics rows lists 700 folders instead of
    statting every file, and a name without extension finds its video in a dictionary."""

    def __init__(self):
        self._names: dict[Path, set[str]] = {}
        self._stems: dict[Path, dict[str, list[str]]] = {}

    def _scan(self, folder: Path) -> None:
        try:
            with os.scandir(folder) as it:
                names = {e.name for e in it if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            names = set()
        stems = defaultdict(list)
        for name in sorted(names):
            if _is_video(name):
                stems[os.path.splitext(name)[0]].append(name)
        self._names[folder], self._stems[folder] = names, stems

    def exists(self, path: Path) -> bool:
        if path.parent not in self._names:
            self._scan(path.parent)
        return path.name in self._names[path.parent]

    def by_stem(self, path: Path, where: str) -> Path | None:
        """``path`` when it is a file, else the one video beside it whose name without extension is ``path``'s
        name without a video extension; None when there is none, an error naming ``where`` when several."""
        if self.exists(path):
            return path
        stem = os.path.splitext(path.name)[0] if _is_video(path.name) else path.name
        found = self._stems[path.parent].get(stem, [])
        if len(found) > 1:
            raise DatasetError(f"{where}: {path.parent / stem} matches several videos: {', '.join(found)}")
        return path.parent / found[0] if found else None


def _name_group(video_id: str, class_name: str) -> str:
    """The group of a video from its name (UCF101's ``_gNN``, HMDB51's source title), else its id."""
    stem = video_id.rsplit("/", 1)[-1]
    return ucf_group(stem) or hmdb_group(stem, class_name) or video_id


def load_video_list(
    root: str | os.PathLike,
    *,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """mmaction2 / TSN lists (:func:`read_video_list`), one per split: ``train_list`` -> train, ``test_list`` ->
    test.

    * ``path label``: a video file relative to ``root`` (or absolute).
    * ``dir num_frames label``: a video named by its path without extension relative to ``root`` (a rawframe
      list's frame folder, e.g. ``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``), resolved to the one video file
      with that stem; ``num_frames`` is not used.

    A listed file that is absent is also looked for by its stem with any video extension (a dataset re-encoded
    to ``.mp4``). Classes: ``classes_file``'s names (one per line, or ``classInd.txt``), else ``"0".."C-1"``
    with the labels exactly 0..C-1. Groups from UCF101 / HMDB51 names, else the video id. Missing videos as in
    :func:`load_csv`.
    """
    root = _abs(root)
    _require_dir(root, "dataset root")
    files = _split_files("list", train_list, test_list, "list")
    classes_file = _existing_file(classes_file, "classes file")
    rows = [(path, split, row) for split, path in files for row in read_video_list(path)]
    classes = _index_classes([(path, row) for path, _, row in rows], classes_file)
    folders = _Folders()
    records, missing = [], []
    for path, split, row in rows:
        video = folders.by_stem(_abs(root / row.name), f"{path}:{row.line}")
        if video is None:
            missing.append(row.name)
            continue
        vid = _id_under(root, video)
        name = classes[row.label]
        records.append(VideoRecord(vid, video, row.label, name, split, _name_group(vid, name)))
    missing_t = _handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return _finish("list", root, classes, records, None, missing_t)


# ----------------------------------------------------------------------------- Kinetics

_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


@dataclass(frozen=True)
class _KineticsRow:
    csv: Path
    line: int
    split: str  # ours: the CSV's role (train / test)
    label: str
    youtube_id: str
    folder: str  # the CSV's split column: the folder under the root
    name: str  # <youtube_id>_<time_start:06d>_<time_end:06d>.mp4


def _read_kinetics_csv(path: Path, split: str) -> list[_KineticsRow]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(_csv.reader(f), start=1)]
    rows = [(n, row) for n, row in rows if any(row)]
    if not rows:
        raise DatasetError(f"{path}: empty; expected the header {','.join(_KINETICS_COLUMNS)}")
    (h, header), rows = rows[0], rows[1:]
    cells = [c.lower() for c in header]
    absent = [c for c in _KINETICS_COLUMNS if c not in cells]
    if absent:
        raise DatasetError(f"{path}:{h}: the header has no column {', '.join(absent)} (expected "
                           f"{','.join(_KINETICS_COLUMNS)}, other columns are ignored), got {','.join(header)}")
    col = {c: cells.index(c) for c in _KINETICS_COLUMNS}
    out = []
    for n, row in rows:
        if len(row) != len(cells):
            raise DatasetError(f"{path}:{n}: {len(row)} values, the header names {len(cells)} columns")
        cell = {c: row[i] for c, i in col.items()}
        if not cell["label"]:
            raise DatasetError(f"{path}:{n}: no label (the official Kinetics test CSVs have none: use the "
                               "validation CSV for the test split)")
        for c in ("label", "youtube_id", "split"):
            if cell[c] in ("", ".", "..") or "/" in cell[c] or "\\" in cell[c]:
                raise DatasetError(f"{path}:{n}: {c} {cell[c]!r} cannot name a file or folder")
        for c in ("time_start", "time_end"):
            if not _COUNT.fullmatch(cell[c]):
                raise DatasetError(f"{path}:{n}: {c} {cell[c]!r} is not a whole number of seconds")
        name = f"{cell['youtube_id']}_{int(cell['time_start']):06d}_{int(cell['time_end']):06d}.mp4"
        out.append(_KineticsRow(path, n, split, cell["label"], cell["youtube_id"], cell["split"], name))
    return out


def load_kinetics(
    root: str | os.PathLike,
    *,
    train_csv: str | os.PathLike | None = None,
    test_csv: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """Kinetics-400 / 600 / 700 with the official annotation CSVs: ``train_csv`` -> train, ``test_csv`` (the
    validation CSV, or a test CSV with labels) -> test.

    * Header ``label,youtube_id,time_start,time_end,split`` in any order; other columns (``is_cc``) are ignored.
    * Video: ``<root>/<split>/<label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``, ``<split>`` the
      row's split column (``train``, ``val``, ...), ``<label>`` as in the CSV or with spaces replaced by
      underscores (what common download scripts write).
    * Classes: ``classes_file``'s names (every label must be one), else the sorted unique labels of both CSVs.
    * Group: the YouTube id (clips of one source video stay on one side of the validation hold-out).

    A downloaded Kinetics always lacks some videos (removed from YouTube): they stop the load unless
    ``allow_missing``, as in :func:`load_csv`.
    """
    root = _abs(root)
    _require_dir(root, "Kinetics root")
    files = _split_files("kinetics", train_csv, test_csv, "CSV")
    classes_file = _existing_file(classes_file, "classes file")
    rows = [row for split, path in files for row in _read_kinetics_csv(path, split)]
    classes = _read_classes_file(classes_file) if classes_file is not None else sorted({r.label for r in rows})
    label_of = {c: i for i, c in enumerate(classes)}
    folders = _Folders()
    records, missing = [], []
    for r in rows:
        if r.label not in label_of:
            raise DatasetError(f"{r.csv}:{r.line}: unknown label {r.label!r} ({len(classes)} classes in "
                               f"{classes_file})")
        candidates = dict.fromkeys(root / r.folder / d / r.name for d in (r.label, r.label.replace(" ", "_")))
        found = [v for v in candidates if folders.exists(v)]
        if not found:
            missing.append(f"{r.folder}/{r.label}/{r.name}")
            continue
        records.append(VideoRecord(_id_under(root, found[0]), found[0], label_of[r.label], r.label, r.split,
                                   r.youtube_id))
    missing_t = _handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return _finish("kinetics", root, classes, records, None, missing_t)


# ----------------------------------------------------------------------------- Something-Something v2


def _read_json(path: Path):
    import json

    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _ssv2_classes(labels_json: Path) -> list[str]:
    """Templates in index order from ``{"Template name": "index", ...}``; the indices must be 0..C-1."""
    table = _read_json(labels_json)
    if not isinstance(table, dict):
        raise DatasetError(f'{labels_json}: expected an object {{"Template name": "index", ...}}, got a '
                           f"{type(table).__name__}")
    index = {}
    for template, value in table.items():
        text = value if isinstance(value, str) else str(value) if type(value) is int else ""
        if not _COUNT.fullmatch(text):
            raise DatasetError(f"{labels_json}: template {template!r} has index {value!r}, not a whole number")
        index[template] = int(text)
    order = sorted(index, key=index.__getitem__)
    if [index[t] for t in order] != list(range(len(order))):
        counts = defaultdict(int)
        for v in index.values():
            counts[v] += 1
        repeated = sorted(str(v) for v, c in counts.items() if c > 1)
        absent = sorted(set(range(len(order))) - set(index.values()))
        raise DatasetError(f"{labels_json}: indices must be 0..{len(order) - 1}, each once (repeated: "
                           f"{_listing(repeated) or '-'}; absent: {_listing([str(v) for v in absent]) or '-'})")
    return order


def load_ssv2(
    root: str | os.PathLike,
    *,
    labels_json: str | os.PathLike,
    train_json: str | os.PathLike | None = None,
    test_json: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """Something-Something v2: ``labels_json`` (``{"Template name": "index", ...}``, string indices 0..C-1)
    and the video lists ``train_json`` -> train, ``test_json`` (the validation JSON) -> test.

    A video list is a JSON list of ``{"id": "78687", "template": "Holding [something] next to [something]",
    ...}``; its class is the template without ``[`` and ``]``, looked up in ``labels_json``. Video:
    ``<root>/<id>.webm``; video id and group: ``id``. Missing videos as in :func:`load_csv`.
    """
    root = _abs(root)
    _require_dir(root, "Something-Something v2 root")
    labels_json = _existing_file(labels_json, "labels JSON")
    files = _split_files("ssv2", train_json, test_json, "JSON")
    classes = _ssv2_classes(labels_json)
    label_of = {c: i for i, c in enumerate(classes)}
    folders = _Folders()
    records, missing = [], []
    for split, path in files:
        entries = _read_json(path)
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: expected a list of videos, got a {type(entries).__name__}")
        for k, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: entry {k} is a {type(entry).__name__}, not an object")
            for key in ("id", "template"):
                if key not in entry:
                    raise DatasetError(f'{path}: entry {k} has no "{key}"')
            vid, template = _video_id(f"{entry['id']}.webm"), str(entry["template"]).replace("[", "").replace("]", "")
            if "/" in vid:
                raise DatasetError(f"{path}: entry {k}: id {vid!r} cannot name a file")
            label = label_of.get(template)
            if label is None:
                raise DatasetError(f"{path}: entry {k} (id {vid}): template {template!r} not in labels {labels_json}")
            video = root / f"{vid}.webm"
            if not folders.exists(video):
                missing.append(video.name)
                continue
            records.append(VideoRecord(vid, video, label, template, split, vid))
    missing_t = _handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return _finish("ssv2", root, classes, records, None, missing_t)


# ----------------------------------------------------------------------------- entry point


#: The command-line option of each load_dataset keyword (for the message naming an option a kind does not use).
_OPTIONS = {"splits_dir": "--splits", "csv": "--list", "train_list": "--list", "test_list": "--test-list",
            "classes_file": "--classes", "labels": "--labels", "test_fraction": "--test-fraction", "seed": "",
            "allow_missing": "--allow-missing"}


def load_dataset(
    kind: str,
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    csv: str | os.PathLike | None = None,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    labels: str | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    allow_missing: bool = False,
) -> Dataset:
    """Load a dataset of layout ``kind`` (one of :data:`DATASET_KINDS`).

    ``splits_dir`` and ``split`` apply to ``ucf101``/``hmdb51``; ``csv`` (default
    ``<root>/list.csv``; a relative path is taken from the current directory, like any
    command-line path), ``classes_file`` and ``labels`` to ``csv``; ``train_list`` and ``test_list`` (the
    annotation files of the train and test splits) and ``classes_file`` to ``list``, ``kinetics`` and ``ssv2``
    (whose ``classes_file`` is its labels JSON, required); ``test_fraction`` and ``seed`` to
    ``folder``; ``allow_missing`` to all but ``folder``. An option given for a layout that does
    not use it is an error rather than silently ignored.
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    given = {
        "splits_dir": splits_dir is not None,
        "csv": csv is not None,
        "train_list": train_list is not None,
        "test_list": test_list is not None,
        "classes_file": classes_file is not None,
        "labels": labels is not None,
        "test_fraction": test_fraction is not None,
        "seed": seed != 0,
        "allow_missing": allow_missing,
    }
    annotations = {"train_list", "test_list", "classes_file", "allow_missing"}
    uses = {
        "ucf101": {"splits_dir", "allow_missing"},
        "hmdb51": {"splits_dir", "allow_missing"},
        "folder": {"test_fraction", "seed"},
        "csv": {"csv", "classes_file", "labels", "allow_missing"},
        "demo": {"allow_missing"},
        "list": annotations,
        "kinetics": annotations,
        "ssv2": annotations,
    }[kind]
    unused = sorted(k + (f" ({_OPTIONS[k]})" if _OPTIONS[k] else "") for k, v in given.items() if v and k not in uses)
    if unused:
        raise DatasetError(f"option(s) {', '.join(unused)} do not apply to dataset kind {kind!r}")

    if kind == "ucf101":
        return load_ucf101(root, splits_dir=splits_dir, split=split, allow_missing=allow_missing)
    if kind == "hmdb51":
        return load_hmdb51(root, splits_dir=splits_dir, split=split, allow_missing=allow_missing)
    if kind == "folder":
        return load_folder(root, test_fraction=test_fraction, seed=seed)
    if kind == "list":
        return load_video_list(root, train_list=train_list, test_list=test_list, classes_file=classes_file,
                               allow_missing=allow_missing)
    if kind == "kinetics":
        return load_kinetics(root, train_csv=train_list, test_csv=test_list, classes_file=classes_file,
                             allow_missing=allow_missing)
    if kind == "ssv2":
        if classes_file is None:
            raise DatasetError("dataset kind 'ssv2' needs its labels JSON (--classes labels.json, or classes_file)")
        return load_ssv2(root, labels_json=classes_file, train_json=train_list, test_json=test_list,
                         allow_missing=allow_missing)
    root_path = _abs(root)
    _require_dir(root_path, "dataset root")
    if kind == "demo":
        return load_csv(root_path / "list.csv", allow_missing=allow_missing, name="demo")
    return load_csv(root_path / "list.csv" if csv is None else csv, classes_file=classes_file,
                    labels=labels or "names", allow_missing=allow_missing)
