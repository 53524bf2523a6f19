"""Something-Something v2 (kind ``ssv2``): ``labels.json`` and the train / validation JSON lists, videos at
``<root>/<id>.webm`` (:func:`load_ssv2`)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
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
    listing,
    require_dir,
    split_files,
    video_id,
)

__all__ = ["load_ssv2", "load_ssv2_kind"]


def _read_json(path: Path):
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
        if not COUNT.fullmatch(text):
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
                           f"{listing(repeated) or '-'}; absent: {listing([str(v) for v in absent]) or '-'})")
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
    ``<root>/<id>.webm``; video id and group: ``id``. Missing videos as in
    :func:`~pipeline.data.annotations.csvlist.load_csv`.
    """
    root = absolute(root)
    require_dir(root, "Something-Something v2 root")
    labels_json = existing_file(labels_json, "labels JSON")
    files = split_files("ssv2", train_json, test_json, "JSON")
    classes = _ssv2_classes(labels_json)
    label_of = {c: i for i, c in enumerate(classes)}
    folders = Folders()
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
            vid, template = video_id(f"{entry['id']}.webm"), str(entry["template"]).replace("[", "").replace("]", "")
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
    missing_t = handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return finish("ssv2", root, classes, records, None, missing_t)


def load_ssv2_kind(
    root: str | os.PathLike,
    *,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """The ``ssv2`` kind: :func:`load_ssv2` with the labels JSON as ``classes_file`` (required) and the train and
    validation JSONs as ``train_list`` and ``test_list``."""
    if classes_file is None:
        raise DatasetError("dataset kind 'ssv2' needs its labels JSON (--classes labels.json, or classes_file)")
    return load_ssv2(root, labels_json=classes_file, train_json=train_list, test_json=test_list,
                     allow_missing=allow_missing)
