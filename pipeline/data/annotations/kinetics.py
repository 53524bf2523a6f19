"""Kinetics-400 / 600 / 700 (kind ``kinetics``): the official annotation CSVs
``label,youtube_id,time_start,time_end,split``, videos at
``<root>/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (:func:`load_kinetics`)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.annotations.base import (
    COUNT,
    Dataset,
    DatasetError,
    Folders,
    VideoRecord,
    absolute,
    existing_file,
    finish,
    handle_missing,
    id_under,
    read_classes_file,
    require_dir,
    split_files,
)

__all__ = ["KINETICS_COLUMNS", "load_kinetics", "load_kinetics_kind"]

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


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
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), start=1)]
    rows = [(n, row) for n, row in rows if any(row)]
    if not rows:
        raise DatasetError(f"{path}: empty; expected the header {','.join(KINETICS_COLUMNS)}")
    (h, header), rows = rows[0], rows[1:]
    cells = [c.lower() for c in header]
    absent = [c for c in KINETICS_COLUMNS if c not in cells]
    if absent:
        raise DatasetError(f"{path}:{h}: the header has no column {', '.join(absent)} (expected "
                           f"{','.join(KINETICS_COLUMNS)}, other columns are ignored), got {','.join(header)}")
    col = {c: cells.index(c) for c in KINETICS_COLUMNS}
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
            if not COUNT.fullmatch(cell[c]):
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
    ``allow_missing``, as in :func:`~pipeline.data.annotations.csvlist.load_csv`.
    """
    root = absolute(root)
    require_dir(root, "Kinetics root")
    files = split_files("kinetics", train_csv, test_csv, "CSV")
    classes_file = existing_file(classes_file, "classes file")
    rows = [row for split, path in files for row in _read_kinetics_csv(path, split)]
    classes = read_classes_file(classes_file) if classes_file is not None else sorted({r.label for r in rows})
    label_of = {c: i for i, c in enumerate(classes)}
    folders = Folders()
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
        records.append(VideoRecord(id_under(root, found[0]), found[0], label_of[r.label], r.label, r.split,
                                   r.youtube_id))
    missing_t = handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return finish("kinetics", root, classes, records, None, missing_t)


def load_kinetics_kind(
    root: str | os.PathLike,
    *,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """The ``kinetics`` kind: :func:`load_kinetics` with the train and validation CSVs as ``train_list`` and
    ``test_list``."""
    return load_kinetics(root, train_csv=train_list, test_csv=test_list, classes_file=classes_file,
                         allow_missing=allow_missing)
