"""What every annotation kind shares: the types, the group parsers and the helpers the loaders are made of.

Video ids: the video's path relative to the dataset root (the CSV's folder for ``csv`` and ``demo``) without
its extension (for Kinetics ``<split>/<label>/<youtube_id>_<start>_<end>``, for Something-Something v2 the
id), with ``/`` separators, e.g. ``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``. An absolute CSV path outside
that folder gives its absolute path without the leading ``/`` and extension. Ids are unique within a dataset,
never empty, contain no ``.``/``..`` component, backslash or control character, and are stable across runs as
long as the files do not move.

Groups (for group-held-out validation, so that clips cut from one source video never sit on both sides of a
split):

* UCF-style names ``v_<X>_gGG_cCC`` give ``<X>_gGG`` (UCF101, folder and list layouts): the 25 groups of a
  UCF101 class are the source videos its clips were cut from.
* HMDB51 names ``<title>_<action>_<body>_<camera>_<people>_<view>_<quality>_<idx>`` give ``<title>``, the
  source video's title, shared across classes: one film (e.g. ``TheBoondockSaints``) supplies clips to up to
  18 classes, so grouping by title alone keeps its actors and scenes on one side. The official splits
  already keep each title on one side within a class.
* Kinetics: the YouTube id; Something-Something v2: the video id.
* Otherwise the CSV's ``group`` column, else the video id (each video its own group).
"""

from __future__ import annotations

import os
import re
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = [
    "COUNT",
    "INTEGER",
    "OFFICIAL_SPLITS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "DiskIndex",
    "Folders",
    "MissingSplitFile",
    "VideoRecord",
    "absolute",
    "check_split_id",
    "existing_file",
    "finish",
    "handle_missing",
    "hmdb_group",
    "id_under",
    "integer_classes",
    "is_video",
    "listing",
    "name_group",
    "read_class_ind",
    "read_classes_file",
    "read_lines",
    "require_dir",
    "require_file",
    "split_files",
    "ucf_group",
    "video_file_problem",
    "video_id",
]

SPLITS = ("train", "test", "unused")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")
OFFICIAL_SPLITS = (1, 2, 3)  # [STFN], Sec. 4.1: "three training and testing splits"
INTEGER = re.compile(r"[+-]?\d+")  # a label that is a class index
COUNT = re.compile(r"[0-9]+")  # a whole number (frames, seconds, an index)

MAX_LISTED = 10  # names shown in a message before "... (N more)"
_UCF_NAME = re.compile(r"^v_(?P<name>.+)_g(?P<group>\d+)_c(?P<clip>\d+)$")


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


def name_group(video_id: str, class_name: str) -> str:
    """The group of a video from its name (UCF101's ``_gNN``, HMDB51's source title), else its id."""
    stem = video_id.rsplit("/", 1)[-1]
    return ucf_group(stem) or hmdb_group(stem, class_name) or video_id


# ----------------------------------------------------------------------------- paths and ids


def absolute(path: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks (keeps the user's view of the tree)."""
    return Path(os.path.abspath(os.fspath(path)))


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder")


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")


def existing_file(path: str | os.PathLike | None, what: str) -> Path | None:
    """``path`` made absolute, which must exist; None stays None."""
    if path is None:
        return None
    path = absolute(path)
    require_file(path, what)
    return path


def check_split_id(split: int) -> int:
    if isinstance(split, bool) or not isinstance(split, int) or split not in OFFICIAL_SPLITS:
        raise DatasetError(f"split must be one of 1, 2, 3 (the official splits), got {split!r}")
    return split


def video_file_problem(path: Path) -> str | None:
    """Why ``path``, named as a video, cannot be read as one: a dangling symlink (naming its target), not a
    regular file (a fifo, a socket, a device, a folder: reading a fifo would wait forever), or absent; None for a
    regular file (through any symlinks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symlink -> {os.readlink(path)}"
        return "file not found"
    except OSError as e:  # a symlink loop, no permission on a folder on the way
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kinds = ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
        kind = next((name for test, name in kinds if test(st.st_mode)), "a special file")
        return f"not a regular file ({kind})"
    return None


def is_video(name: str) -> bool:
    # Hidden files are skipped: macOS copies leave "._<name>.avi" AppleDouble files beside videos.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def video_id(rel: str) -> str:
    """``"Class/v_x.avi"`` -> ``"Class/v_x"``, checking the id is safe to use as a store key."""
    stem = os.path.splitext(rel)[0]
    parts = stem.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in stem or any(ord(c) < 32 for c in stem):
        raise DatasetError(
            f"cannot make a video id from path {rel!r} (empty, '.', '..', backslash or control character)"
        )
    return stem


def id_under(root: Path, path: Path) -> str:
    """The video id of a listed file: its path relative to ``root`` without extension, or, outside ``root``,
    its absolute path without the leading ``/`` and extension."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    if rel.startswith("../"):
        rel = path.as_posix().lstrip("/")
    return video_id(rel)


# ----------------------------------------------------------------------------- annotation files


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of non-blank lines; handles CRLF and a BOM."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def read_class_ind(path: Path) -> list[str]:
    """Class names in index order from UCF101's ``classInd.txt`` lines ``<1-based index> <ClassName>``."""
    entries = []
    for n, line in read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
        entries.append((int(parts[0]), parts[1]))
    indices = sorted(i for i, _ in entries)
    if indices != list(range(1, len(entries) + 1)):
        raise DatasetError(f"{path}: class indices must be 1..{len(entries)} without gaps or repeats")
    return [name for _, name in sorted(entries)]


def read_classes_file(path: Path) -> list[str]:
    """Class names in index order: one name per line, or UCF101's ``classInd.txt`` lines ``<1-based index> <name>``."""
    lines = [line for _, line in read_lines(path)]
    if lines and all(re.fullmatch(r"\d+\s+\S+", line) for line in lines):
        return read_class_ind(path)
    dups = sorted({n for n in lines if lines.count(n) > 1})
    if dups:
        raise DatasetError(f"{path}: class names repeated: {listing(dups)}")
    return lines


def integer_classes(source: Path | str, labels: Sequence[str], *, names_allowed: bool = True) -> list[str]:
    """Classes ``"0".."C-1"`` for integer labels that are exactly 0..C-1; an error naming gaps or negatives.

    ``names_allowed``: the format could hold class names instead (a CSV), which the messages then suggest."""
    values = sorted({int(t) for t in labels})
    negative = [v for v in values if v < 0]
    if negative:
        raise DatasetError(f"{source}: negative class indices {listing([str(v) for v in negative])}; labels "
                           f"are 0-based indices{' or class names' if names_allowed else ''}, or give a class list "
                           "(--classes)")
    gaps = sorted(set(range(values[-1] + 1)) - set(values)) if values else []
    if gaps:
        raise DatasetError(f"{source}: integer labels {listing([str(v) for v in values])} leave classes "
                           f"{listing([str(v) for v in gaps])} without any video; give a class list (--classes) "
                           f"that names every class{', or use class names as labels' if names_allowed else ''}")
    return [str(v) for v in values]


def split_files(kind: str, train, test, what: str, options: str = "--list / --test-list") -> list[tuple[str, Path]]:
    """(split, absolute path) of the given train and test annotation files, each of which must exist."""
    out = []
    for split, path in (("train", train), ("test", test)):
        if path is not None:
            path = absolute(path)
            require_file(path, f"{kind} {split} {what}")
            out.append((split, path))
    if not out:
        raise DatasetError(f"dataset kind {kind!r} needs a train and / or a test {what} ({options})")
    return out


# ----------------------------------------------------------------------------- finishing a dataset


def listing(items: Sequence[str]) -> str:
    """The first few of ``items``, comma-separated, with the count of the rest."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def handle_missing(missing: list[str], allow_missing: bool, root: Path, source: str) -> tuple[str, ...]:
    """The listed videos absent on disk, as a tuple for :attr:`Dataset.missing`; an error naming them unless
    ``allow_missing``."""
    if missing and not allow_missing:
        raise DatasetError(
            f"{len(missing)} videos named in {source} are missing under {root}: {listing(missing)}; "
            "allow missing videos (--allow-missing, or allow_missing=True) to go on without them"
        )
    return tuple(missing)


def finish(
    name: str,
    root: Path,
    classes: Sequence[str],
    records: list[VideoRecord],
    split_id: int | None,
    missing: tuple[str, ...],
) -> Dataset:
    """The :class:`Dataset` of ``records`` sorted by id; an error when there are none or an id repeats."""
    if not records:
        raise DatasetError(f"dataset {name!r} at {root} has no videos (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    records.sort(key=lambda r: r.video_id)
    dups = sorted({a.video_id for a, b in zip(records, records[1:]) if a.video_id == b.video_id})
    if dups:
        paths = [str(r.path) for r in records if r.video_id in set(dups[:MAX_LISTED])]
        raise DatasetError(
            f"dataset {name!r} at {root}: {len(dups)} duplicate video ids: {listing(dups)} (paths: {listing(paths)})"
        )
    return Dataset(name, root, tuple(classes), tuple(records), split_id, missing)


# ----------------------------------------------------------------------------- finding listed videos on disk


class DiskIndex:
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
                    if is_video(entry.name) and entry.is_file():
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


class Folders:
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
            if is_video(name):
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
        stem = os.path.splitext(path.name)[0] if is_video(path.name) else path.name
        found = self._stems[path.parent].get(stem, [])
        if len(found) > 1:
            raise DatasetError(f"{where}: {path.parent / stem} matches several videos: {', '.join(found)}")
        return path.parent / found[0] if found else None
