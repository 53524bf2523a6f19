"""Kept for one release so that existing imports keep working: the dataset kinds now live in
:mod:`pipeline.data.annotations` (a module per kind over shared helpers, and the registry ``KINDS``); import
from there. This module only re-exports the public names it had."""

from pipeline.data.annotations import (
    DATASET_KINDS,
    LABEL_KINDS,
    SPLITS,
    VIDEO_EXTENSIONS,
    Dataset,
    DatasetError,
    ListRow,
    MissingSplitFile,
    VideoRecord,
    hmdb_group,
    load_csv,
    load_dataset,
    load_folder,
    load_hmdb51,
    load_kinetics,
    load_ssv2,
    load_ucf101,
    load_video_list,
    read_video_list,
    ucf_group,
)

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
