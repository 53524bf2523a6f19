"""The registry of dataset kinds (pipeline.data.annotations.KINDS) and what reads it: decode's --dataset choices
and option flags, the official splits it loads, import-rawframes' --dataset; the one loader of the official
UCF101 / HMDB51 split files on the real split files; the module kept for one release."""

import ast
import inspect
import re
from pathlib import Path

import click
import pytest

from pipeline.data import annotations
from pipeline.data.annotations import KINDS, OPTIONS, DatasetError
from pipeline.data.annotations.hmdb51 import HMDB51
from pipeline.data.annotations.official import load_official
from pipeline.data.annotations.ucf101 import UCF101
from stages.cli import main
from stages.decode import OPTION_FLAGS, DecodeParams, dataset_options, load_dataset

REPO = Path(__file__).resolve().parents[1]
#: Every --dataset of decode, in the order its help lists them (written out here, not read from the code).
DECODE_KINDS = ["ucf101", "hmdb51", "folder", "csv", "demo", "list", "kinetics", "ssv2", "rawframes"]
#: The kinds whose official split files define splits 1, 2 and 3 ([STFN] §4.1; rawframes labelled by them).
OFFICIAL = {"ucf101", "hmdb51", "rawframes"}


def _choices(command: str, option: str) -> list[str]:
    cmd = main.get_command(click.Context(main), command)
    (param,) = [p for p in cmd.params if p.name == option]
    return list(param.type.choices)


# ----------------------------------------------------------------------------- the registry and the CLI


def test_decode_dataset_choices_are_the_registry():
    assert list(KINDS) == DECODE_KINDS
    assert _choices("decode", "dataset") == DECODE_KINDS


def test_each_kind_declares_exactly_the_keywords_its_loader_takes():
    """The registry's options (with split and splits_dir for official splits) are the loader's keyword
    arguments, so load_dataset neither refuses an option a loader takes nor passes one it does not."""
    for name, kind in KINDS.items():
        params = inspect.signature(kind.load).parameters
        keywords = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"index"}
        assert keywords == set(kind.takes()) | ({"split"} if kind.official_splits else set()), name
        assert kind.takes() <= set(OPTIONS), name
    assert set().union(*(k.takes() for k in KINDS.values())) == set(OPTIONS)


def test_official_splits_are_those_of_ucf101_hmdb51_and_rawframes():
    assert {name for name, kind in KINDS.items() if kind.official_splits} == OFFICIAL
    # A rawframes tree is labelled by rawframe lists or by the split files of the other official kinds, which
    # import-rawframes offers as --dataset.
    assert annotations.rawframes.LABEL_SOURCES == ("lists", "ucf101", "hmdb51")
    assert _choices("import-rawframes", "dataset") == ["ucf101", "hmdb51"]
    assert _choices("decode", "rawframes_labels") == ["lists", "ucf101", "hmdb51"]


def _decode_options(kind: str, tmp_path: Path, **fields) -> dict:
    return dataset_options(DecodeParams(dataset=kind, root=tmp_path / "absent", **fields))


@pytest.mark.parametrize("kind", DECODE_KINDS)
def test_splits_is_refused_for_each_kind_without_official_splits(tmp_path, kind):
    """decode's --splits reaches the kinds with official splits and is refused, naming the flag and the kind,
    for every other kind (before the root is looked at)."""
    with pytest.raises(DatasetError) as err:
        load_dataset(kind, tmp_path / "absent", split=1, **_decode_options(kind, tmp_path, splits=tmp_path))
    refused = f"splits_dir (--splits) do not apply to dataset kind '{kind}'"
    assert (refused in str(err.value)) == (kind not in OFFICIAL), str(err.value)


@pytest.mark.parametrize("kind, fields, named", [
    ("folder", {"list": Path("l.txt")}, "train_list (--list)"),
    ("demo", {"list": Path("l.csv")}, "csv (--list)"),
    ("csv", {"test_list": Path("t.txt")}, "test_list (--test-list)"),
    ("folder", {"classes": Path("c.txt")}, "classes_file (--classes)"),
    ("ucf101", {"labels": "indices"}, "labels (--labels)"),
    ("rawframes", {"labels": "indices"}, "labels (--labels)"),
    ("folder", {"labels": "indices"}, "labels (--labels)"),  # (every kind takes --allow-missing)
])
def test_an_option_a_kind_does_not_take_is_named_by_its_decode_flag(tmp_path, kind, fields, named):
    with pytest.raises(DatasetError, match=re.escape(f"option(s) {named} do not apply to dataset kind '{kind}'")):
        load_dataset(kind, tmp_path / "absent", **_decode_options(kind, tmp_path, **fields))
    # The library names the keyword alone: the flag is the application's spelling.
    with pytest.raises(DatasetError, match=re.escape(f"option(s) {named.split()[0]} do not apply")):
        annotations.load_dataset(kind, tmp_path / "absent", **_decode_options(kind, tmp_path, **fields))


def test_every_option_decode_gives_has_its_flag():
    assert OPTION_FLAGS == {"splits_dir": "--splits", "csv": "--list", "train_list": "--list",
                            "test_list": "--test-list", "classes_file": "--classes", "labels": "--labels",
                            "test_fraction": "--test-fraction", "allow_missing": "--allow-missing",
                            "layout": "--rawframes-layout", "label_source": "--rawframes-labels"}
    assert set(OPTIONS) - set(OPTION_FLAGS) == {"seed"}  # folder's seed has no decode option (always 0)


def test_an_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="splits"):
        annotations.load_dataset("ucf101", tmp_path, splits=tmp_path)


@pytest.mark.parametrize("kind, splits", [("ucf101", ["1", "2", "3"]), ("folder", ["1"])])
def test_decode_loads_the_official_splits_of_the_kinds_that_have_them(tmp_path, kind, splits):
    from stages.decode import load_tables

    root = tmp_path / "data"
    names = ["Run/v_Run_g01_c01.avi", "Run/v_Run_g02_c01.avi", "Jump/v_Jump_g01_c01.avi", "Jump/v_Jump_g02_c01.avi"]
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Jump\n2 Run\n")
    for n in (1, 2, 3):  # split n: group g0(n % 2 + 1) is test
        test = [r for r in names if f"_g0{n % 2 + 1}_" in r]
        (lists / f"trainlist0{n}.txt").write_text("".join(f"{r}\n" for r in names if r not in test))
        (lists / f"testlist0{n}.txt").write_text("".join(f"{r}\n" for r in test))
    table = load_tables(DecodeParams(dataset=kind, root=root, val_fraction=0.0,
                                     **({"splits": lists} if kind == "ucf101" else {"test_fraction": 0.0})), tmp_path)
    assert list(table.splits) == splits
    if kind == "ucf101":  # Jump/g01, Jump/g02, Run/g01, Run/g02 in id order
        assert table.splits == {"1": ["train", "test", "train", "test"], "2": ["test", "train", "test", "train"],
                                "3": ["train", "test", "train", "test"]}


# ----------------------------------------------------------------------------- the official split files


class _Listed:
    """An index of exactly the given ``Class/video`` paths (the loader's ``index``), so the real split files
    load without 13,320 files on disk."""

    def __init__(self, root: Path, rels):
        self.root, self.files = root, set(rels)

    def resolve(self, rel: str):
        return rel if rel in self.files else None


def _ucf_listed(folder: Path) -> set[str]:
    return {line.split()[0] for f in folder.glob("*list0*.txt") for line in f.read_text().splitlines() if line.strip()}


def _hmdb_listed(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*_test_split*.txt"):
        cls = f.name.rsplit("_test_split", 1)[0]
        out |= {f"{cls}/{line.split()[0]}" for line in f.read_text().splitlines() if line.strip()}
    return out


# Published sizes: UCF101 trainlist0N / testlist0N (the THUMOS'13 protocol, test groups 1-7, 8-14, 15-21);
# HMDB51: 70 train and 30 test clips per class in every split, the other clips of the 6,766 unused.
@pytest.mark.parametrize("form, split, counts, test_groups", [
    (UCF101, 1, (9537, 3783, 0), range(1, 8)),
    (UCF101, 2, (9586, 3734, 0), range(8, 15)),
    (UCF101, 3, (9624, 3696, 0), range(15, 22)),
    (HMDB51, 1, (3570, 1530, 1666), None),
    (HMDB51, 2, (3570, 1530, 1666), None),
    (HMDB51, 3, (3570, 1530, 1666), None),
])
def test_one_loader_reads_both_official_formats(shared_data, tmp_path, form, split, counts, test_groups):
    folder = shared_data / "splits" / form.kind
    if not folder.is_dir():
        pytest.skip(f"the official {form.title} split files are not in {folder}")
    root = tmp_path  # an empty folder: the index stands for the videos on disk
    rels = _ucf_listed(folder) if form is UCF101 else _hmdb_listed(folder)
    ds = load_official(form, root, splits_dir=folder, split=split, index=_Listed(root, rels))
    assert (ds.name, ds.split_id, ds.missing) == (form.kind, split, ())
    assert (ds.counts()["train"], ds.counts()["test"], ds.counts()["unused"]) == counts
    assert len(ds.classes) == (101 if form is UCF101 else 51) and len(ds.videos) == len(rels)
    for label, name in enumerate(ds.classes):
        videos = [v for v in ds.videos if v.label == label]
        assert {v.class_name for v in videos} == {name} and {v.video_id.split("/")[0] for v in videos} == {name}
        train = {v.group for v in videos if v.split == "train"}
        test = {v.group for v in videos if v.split == "test"}
        assert not train & test, name  # a source video never sits on both sides
        if form is UCF101:
            assert {int(g[-2:]) for g in test} == set(test_groups), name
        else:
            assert (sum(v.split == "train" for v in videos), sum(v.split == "test" for v in videos)) == (70, 30)


# ----------------------------------------------------------------------------- layering and the old module


def test_the_annotations_package_does_not_import_interop():
    """The rawframes kind reads labels for a layout it is given: the data package stays below interop."""
    for path in sorted((REPO / "pipeline" / "data" / "annotations").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("pipeline.interop", "stages")), (path.name, node.module)


def test_pipeline_data_datasets_still_exports_its_public_names():
    from pipeline.data import datasets

    names = {"DATASET_KINDS", "LABEL_KINDS", "SPLITS", "VIDEO_EXTENSIONS", "Dataset", "DatasetError", "ListRow",
             "MissingSplitFile", "VideoRecord", "hmdb_group", "load_csv", "load_dataset", "load_folder",
             "load_hmdb51", "load_kinetics", "load_ssv2", "load_ucf101", "load_video_list", "read_video_list",
             "ucf_group"}  # its __all__ at 7e8f4a7
    assert set(datasets.__all__) == names
    assert all(getattr(datasets, n) is getattr(annotations, n) for n in names)
