"""Datasets on disk -> a sorted list of videos with labels, split membership and groups.

One module per dataset kind over the shared helpers of :mod:`~pipeline.data.annotations.base` (video ids,
groups, line readers, path resolution, class lists), and :data:`KINDS`, the registry every caller reads:

``ucf101`` (:mod:`.ucf101`), ``hmdb51`` (:mod:`.hmdb51`)
    the official split files, read by the one loader shape of :mod:`.official` ([STFN] §4.1 evaluates on the
    three official splits of UCF101 and HMDB51).
``folder`` (:mod:`.folder`)
    a folder per class; whole groups held out as test with ``test_fraction``.
``csv`` (:mod:`.csvlist`), ``demo`` (:mod:`.demo`)
    ``path,label[,split[,group]]`` rows; the demo is the CSV the demo generator writes.
``list`` (:mod:`.videolist`)
    mmaction2 / TSN lists, one file per split.
``kinetics`` (:mod:`.kinetics`), ``ssv2`` (:mod:`.ssv2`)
    the official Kinetics annotation CSVs; Something-Something v2's JSONs.
``rawframes`` (:mod:`.rawframes`)
    frames other tools extracted, labelled by rawframe lists or the official UCF101 / HMDB51 split files.

:func:`load_dataset` loads any kind by name, with the options (keyword arguments) of :data:`OPTIONS`; an
option the kind does not take is an error naming the option and the kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

from pipeline.data.annotations.base import (
    OFFICIAL_SPLITS,
    SPLITS,
    VIDEO_EXTENSIONS,
    Dataset,
    DatasetError,
    MissingSplitFile,
    VideoRecord,
    hmdb_group,
    ucf_group,
)
from pipeline.data.annotations.csvlist import LABEL_KINDS, load_csv, load_csv_kind
from pipeline.data.annotations.demo import load_demo
from pipeline.data.annotations.folder import load_folder
from pipeline.data.annotations.hmdb51 import load_hmdb51
from pipeline.data.annotations.kinetics import load_kinetics, load_kinetics_kind
from pipeline.data.annotations.rawframes import load_rawframes
from pipeline.data.annotations.ssv2 import load_ssv2, load_ssv2_kind
from pipeline.data.annotations.ucf101 import load_ucf101
from pipeline.data.annotations.videolist import ListRow, load_video_list, read_video_list

__all__ = [
    "DATASET_KINDS",
    "KINDS",
    "LABEL_KINDS",
    "OFFICIAL_SPLITS",
    "OPTIONS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "Kind",
    "ListRow",
    "MissingSplitFile",
    "VideoRecord",
    "hmdb_group",
    "load_csv",
    "load_dataset",
    "load_demo",
    "load_folder",
    "load_hmdb51",
    "load_kinetics",
    "load_rawframes",
    "load_ssv2",
    "load_ucf101",
    "load_video_list",
    "read_video_list",
    "ucf_group",
]

#: Every option a kind's loader may take, with the value that means "not given".
OPTIONS: dict[str, object] = {
    "splits_dir": None,  # the official split files' folder (kinds with official splits)
    "csv": None,  # the CSV of kind csv (default <root>/list.csv)
    "train_list": None,  # the train split's annotation file (list, kinetics, ssv2, rawframes)
    "test_list": None,  # the test split's annotation file
    "classes_file": None,  # a class list (ssv2: its labels JSON, required)
    "labels": None,  # what a CSV's label column holds (LABEL_KINDS; None: names)
    "test_fraction": None,  # folder: fraction of groups held out as test
    "seed": 0,  # folder: seed of that hold-out
    "allow_missing": False,  # go on without listed videos absent on disk
    "layout": None,  # rawframes: the tree's layout (a pipeline.interop.rawframes.Layout)
    "label_source": "lists",  # rawframes: lists, or an official-split kind (rawframes.LABEL_SOURCES)
}


@dataclass(frozen=True)
class Kind:
    """A dataset kind: its loader, called as ``load(root, **options)`` (plus ``split=`` when the kind has official
    splits), the options of :data:`OPTIONS` it takes, and whether it reads the official splits 1-3."""

    load: Callable[..., Dataset]
    options: frozenset[str]
    official_splits: bool = False

    def takes(self) -> frozenset[str]:
        """The options the kind takes: its own, and ``splits_dir`` when it reads official splits."""
        return self.options | ({"splits_dir"} if self.official_splits else frozenset())


_ANNOTATION_FILES = frozenset({"train_list", "test_list", "classes_file", "allow_missing"})

#: The dataset kinds, in the order help texts and messages list them. ``rawframes`` reads the official splits
#: with ``label_source`` ucf101 / hmdb51; its lists define split 1 alone (asking for another is a
#: MissingSplitFile, as an absent split file is).
KINDS: dict[str, Kind] = {
    "ucf101": Kind(load_ucf101, frozenset({"allow_missing"}), official_splits=True),
    "hmdb51": Kind(load_hmdb51, frozenset({"allow_missing"}), official_splits=True),
    "folder": Kind(load_folder, frozenset({"test_fraction", "seed", "allow_missing"})),
    "csv": Kind(load_csv_kind, frozenset({"csv", "classes_file", "labels", "allow_missing"})),
    "demo": Kind(load_demo, frozenset({"allow_missing"})),
    "list": Kind(load_video_list, _ANNOTATION_FILES),
    "kinetics": Kind(load_kinetics_kind, _ANNOTATION_FILES),
    "ssv2": Kind(load_ssv2_kind, _ANNOTATION_FILES),
    "rawframes": Kind(load_rawframes, _ANNOTATION_FILES | {"layout", "label_source"}, official_splits=True),
}
DATASET_KINDS = tuple(KINDS)


def load_dataset(kind: str, root: str | os.PathLike, *, split: int = 1,
                 option_names: Mapping[str, str] | None = None, **options) -> Dataset:
    """Load a dataset of kind ``kind`` (one of :data:`KINDS`) with the ``options`` of :data:`OPTIONS`.

    ``split`` (1, 2 or 3) applies to the kinds with official splits; the other kinds define their own splits
    and ignore it. An option given (other than its "not given" value in :data:`OPTIONS`) for a kind that does
    not take it is a :class:`DatasetError` naming the option and the kind rather than silently ignored;
    ``option_names`` maps an option to how the caller spells it (a command-line flag), added to that message.
    """
    spec = KINDS.get(kind)
    if spec is None:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"load_dataset() got unexpected keyword argument(s) {', '.join(unknown)}; options: "
                        f"{', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if v != OPTIONS[k]}
    spelled = option_names or {}
    unused = sorted(k + (f" ({spelled[k]})" if spelled.get(k) else "") for k in given if k not in spec.takes())
    if unused:
        raise DatasetError(f"option(s) {', '.join(unused)} do not apply to dataset kind {kind!r}")
    if spec.official_splits:
        given["split"] = split
    return spec.load(root, **given)
