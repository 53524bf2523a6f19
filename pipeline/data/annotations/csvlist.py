"""A CSV list (kind ``csv``): ``path,label[,split[,group]]`` rows with an optional header (:func:`load_csv`)."""

from __future__ import annotations

import csv as _csv
import difflib
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

from pipeline.data.annotations.base import (
    INTEGER,
    SPLITS,
    Dataset,
    DatasetError,
    VideoRecord,
    absolute,
    existing_file,
    finish,
    handle_missing,
    video_file_problem,
    id_under,
    integer_classes,
    is_video,
    read_classes_file,
    require_dir,
    require_file,
    ucf_group,
)

__all__ = ["CSV_COLUMNS", "LABEL_KINDS", "load_csv", "load_csv_kind"]

CSV_COLUMNS = ("path", "label", "split", "group")
LABEL_KINDS = ("names", "indices")  # what a CSV's label column holds
log = logging.getLogger("pipeline")


def _csv_header(csv_path: Path, first: list[str]) -> list[str] | None:
    """The column names when ``first`` is a header row, None when it is a data row.

    A row is a header when it names a known column and its first cell is not a video file; every cell must
    then be a known column, ``path`` and ``label`` once each.
    """
    cells = [c.lower() for c in first]
    if not set(cells) & set(CSV_COLUMNS) or is_video(os.path.basename(first[0])):
        return None
    unknown = [c for c in first if c.lower() not in CSV_COLUMNS]
    if unknown:
        close = difflib.get_close_matches(unknown[0].lower(), CSV_COLUMNS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"{csv_path}:1: unknown column {unknown[0]!r} in the header{hint}; "
                           f"known columns: {', '.join(CSV_COLUMNS)}")
    if "path" not in cells or "label" not in cells or len(set(cells)) != len(cells):
        raise DatasetError(f"{csv_path}:1: header must name 'path' and 'label' once each, got {first}")
    return cells


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
    csv_path = absolute(csv)
    require_file(csv_path, "video list")
    classes_file = existing_file(classes_file, "classes file")
    root = csv_path.parent

    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(_csv.reader(f), start=1)]
    rows = [(n, row) for n, row in rows if any(row)]
    columns = {c: i for i, c in enumerate(CSV_COLUMNS)}
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
        if labels == "indices" and not INTEGER.fullmatch(cell["label"]):
            raise DatasetError(f"{csv_path}:{n}: label {cell['label']!r} is not a class index (labels=indices)")
        parsed.append((n, cell["path"], cell["label"], split, cell.get("group", "")))

    texts = [p[2] for p in parsed]
    integer = bool(texts) and all(INTEGER.fullmatch(t) for t in texts)
    if classes_file is not None:
        classes = read_classes_file(classes_file)
    elif integer:
        classes = integer_classes(csv_path, texts)
    else:
        classes = sorted(set(texts))
    by_name = {} if labels == "indices" else {c: i for i, c in enumerate(classes)}

    records, missing = [], []
    for n, path_text, label_text, split, group in parsed:
        label = by_name.get(label_text)
        if label is None and INTEGER.fullmatch(label_text) and (integer or classes_file is not None):
            label = int(label_text) if 0 <= int(label_text) < len(classes) else None
        if label is None:
            where = f"classes in {classes_file}" if classes_file is not None else "classes"
            raise DatasetError(f"{csv_path}:{n}: unknown label {label_text!r} ({len(classes)} {where})")
        path = absolute(root / path_text)  # an absolute path_text replaces root
        problem = video_file_problem(path)
        if problem:  # absent, a dangling symlink (its target named), a fifo ...
            missing.append(path_text if problem == "file not found" else f"{path_text} ({problem})")
            continue
        vid = id_under(root, path)
        group = group or ucf_group(PurePosixPath(vid).name) or vid
        records.append(VideoRecord(vid, path, label, classes[label], split, group))
    if classes_file is None and not integer:
        _warn_singletons(csv_path, classes, [r.label for r in records])
    missing_t = handle_missing(missing, allow_missing, root, str(csv_path))
    return finish(name, root, classes, records, None, missing_t)


def load_csv_kind(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    labels: str | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """The ``csv`` kind: :func:`load_csv` of ``csv``, by default ``<root>/list.csv`` (a relative ``csv`` is taken
    from the current directory, like any command-line path); ``labels`` None means ``"names"``."""
    root = absolute(root)
    require_dir(root, "dataset root")
    return load_csv(root / "list.csv" if csv is None else csv, classes_file=classes_file, labels=labels or "names",
                    allow_missing=allow_missing)
