"""The annotation kinds of decode beyond the official UCF101 / HMDB51 splits: mmaction2 / TSN lists (``list``),
the Kinetics CSVs (``kinetics``) and the Something-Something v2 JSONs (``ssv2``), each read from a small
hand-written file over empty placeholder videos (the loaders only check that a video exists), and decode's
options for them (real decodable videos there)."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.data.annotations import (
    DatasetError,
    load_kinetics,
    load_ssv2,
    load_video_list,
    read_video_list,
)
from pipeline.data.table import VideoTable
from stages.cli import main
from stages.decode import load_dataset
from tests.videos import write_video


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _table(dataset):
    """(video id, label, class name, split, group) per video, in id order."""
    return [(v.video_id, v.label, v.class_name, v.split, v.group) for v in dataset.videos]


# ----------------------------------------------------------------------------- mmaction2 / TSN lists


def test_video_list_path_label(tmp_path):
    root = tmp_path / "videos"
    _touch(root, "Alpha/v_Alpha_g01_c01.avi", "Alpha/v_Alpha_g02_c01.avi", "Beta/clip.mp4", "Beta/other.mp4")
    train = _write(tmp_path / "train.txt", "Alpha/v_Alpha_g01_c01.avi 0\nBeta/clip.mp4 1\n\n")
    test = _write(tmp_path / "test.txt", "Alpha/v_Alpha_g02_c01.avi 0\r\n")
    ds = load_video_list(root, train_list=train, test_list=test)
    assert ds.name == "list" and ds.root == root and ds.split_id is None
    assert ds.classes == ("0", "1")  # no class list: the 0-based labels name the classes
    assert _table(ds) == [
        ("Alpha/v_Alpha_g01_c01", 0, "0", "train", "Alpha_g01"),
        ("Alpha/v_Alpha_g02_c01", 0, "0", "test", "Alpha_g02"),
        ("Beta/clip", 1, "1", "train", "Beta/clip"),  # not a UCF / HMDB name: its own group
    ]
    assert ds.videos[2].path == root / "Beta/clip.mp4"  # Beta/other.mp4 is listed nowhere: not a video of it


def test_rawframe_list_names_videos_by_stem_with_a_class_list(tmp_path):
    root = tmp_path / "videos"
    _touch(root, "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.mp4",
           "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair/notes.txt")
    train = _write(tmp_path / "train.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01 120 1\n"
                                           "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0 80 0\n")
    test = _write(tmp_path / "val.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02 90 1\n")
    classes = _write(tmp_path / "classInd.txt", "1 brush_hair\n2 ApplyEyeMakeup\n")
    ds = load_video_list(root, train_list=train, test_list=test, classes_file=classes)
    assert ds.classes == ("brush_hair", "ApplyEyeMakeup")
    assert _table(ds) == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 1, "ApplyEyeMakeup", "train", "ApplyEyeMakeup_g01"),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02", 1, "ApplyEyeMakeup", "test", "ApplyEyeMakeup_g01"),
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0", 0, "brush_hair", "train", "April_09"),
    ]
    assert [v.path.suffix for v in ds.videos] == [".avi", ".mp4", ".avi"]
    assert [(r.line, r.num_frames, r.label) for r in read_video_list(train)] == [(1, 120, 1), (2, 80, 0)]


def test_video_list_finds_a_reencoded_video_and_refuses_two_with_one_stem(tmp_path):
    root = tmp_path / "videos"
    _touch(root, "A/x.mp4", "A/y.avi", "A/y.mkv")
    ds = load_video_list(root, train_list=_write(tmp_path / "l.txt", "A/x.avi 0\n"))  # listed .avi, on disk .mp4
    assert [(v.video_id, v.path.name) for v in ds.videos] == [("A/x", "x.mp4")]
    with pytest.raises(DatasetError, match=r"l2.txt:2: .*A/y matches several videos: y.avi, y.mkv"):
        load_video_list(root, train_list=_write(tmp_path / "l2.txt", "A/x 1 0\nA/y 5 0\n"))


@pytest.mark.parametrize("text, message", [
    ("a.avi 0\nb.avi x\n", r"list.txt:2: label 'x' is not an integer"),
    ("a.avi 0\nb 12 0\n", r"list.txt:2: 3 columns, but line 1 has 2"),
    ("\na 12 0\nb.avi 0\n", r"list.txt:3: 2 columns, but line 2 has 3"),
    ("a.avi\n", r"list.txt:1: expected 'path label' or 'dir num_frames label', got 'a.avi'"),
    ("a.avi 0\nb.avi -1\n", r"list.txt:2: label -1 is negative"),
    ("a 1.5 0\n", r"list.txt:1: num_frames '1.5' is not a whole number"),
    ("a.avi 0\nb.avi 2\n", r"list.txt: integer labels 0, 2 leave classes 1 without any video"),
])
def test_video_list_errors_name_the_file_and_line(tmp_path, text, message):
    _touch(tmp_path, "a.avi", "b.avi")
    with pytest.raises(DatasetError, match=message):
        load_video_list(tmp_path, train_list=_write(tmp_path / "list.txt", text))


def test_video_list_label_past_the_class_list_and_missing_videos(tmp_path):
    _touch(tmp_path, "a.avi")
    classes = _write(tmp_path / "classes.txt", "run\njump\n")
    with pytest.raises(DatasetError, match=r"list.txt:2: label 2 but .*classes.txt names 2 classes"):
        load_video_list(tmp_path, train_list=_write(tmp_path / "list.txt", "a.avi 0\nb.avi 2\n"),
                        classes_file=classes)
    listed = _write(tmp_path / "list.txt", "a.avi 0\ngone.avi 1\n")
    with pytest.raises(DatasetError, match=r"1 videos named in .*list.txt are missing .*gone.avi.*--allow-missing"):
        load_video_list(tmp_path, train_list=listed, classes_file=classes)
    ds = load_video_list(tmp_path, train_list=listed, classes_file=classes, allow_missing=True)
    assert ds.missing == ("gone.avi",) and [v.video_id for v in ds.videos] == ["a"]
    with pytest.raises(DatasetError, match=r"test list .*nope.txt does not exist"):
        load_video_list(tmp_path, test_list=tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match=r"needs a train and / or a test list \(--list / --test-list\)"):
        load_video_list(tmp_path)


def test_rawframes_lists_share_the_list_reader(tmp_path):
    """The rawframes import reads its lists with the same reader: a bad label names the file and line."""
    from pipeline.data.annotations.rawframes import load_lists

    (tmp_path / "A" / "v1").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"bad.txt:1: label 'x' is not an integer"):
        load_lists(tmp_path, _write(tmp_path / "bad.txt", "A/v1 3 x\n"), None)
    with pytest.raises(DatasetError, match=r"two.txt:1: expected '<frame_dir> <total_frames> <label>'"):
        load_lists(tmp_path, _write(tmp_path / "two.txt", "A/v1.avi 0\n"), None)
    ds = load_lists(tmp_path, _write(tmp_path / "ok.txt", "A/v1 3 0\n"), None)
    assert _table(ds) == [("A/v1", 0, "A", "train", "A/v1")]  # the class named by its only folder


# ----------------------------------------------------------------------------- Kinetics

KINETICS_TRAIN = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,-abc_12,10,20,train,0
air drumming,def,0,10,train,1
abseiling,-abc_12,30,40,train,0
"""
KINETICS_VAL = """youtube_id,label,time_start,time_end,split
ghi,air drumming,5,15,val
"""


def _kinetics(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "k400"
    _touch(root, "train/abseiling/-abc_12_000010_000020.mp4", "train/abseiling/-abc_12_000030_000040.mp4",
           "train/air_drumming/def_000000_000010.mp4",  # label folder with underscores (download scripts)
           "val/air drumming/ghi_000005_000015.mp4")  # label folder as in the CSV
    return root, _write(tmp_path / "train.csv", KINETICS_TRAIN), _write(tmp_path / "validate.csv", KINETICS_VAL)


def test_kinetics_csvs(tmp_path):
    root, train, val = _kinetics(tmp_path)
    ds = load_kinetics(root, train_csv=train, test_csv=val)
    assert ds.name == "kinetics" and ds.classes == ("abseiling", "air drumming")
    assert _table(ds) == [
        ("train/abseiling/-abc_12_000010_000020", 0, "abseiling", "train", "-abc_12"),
        ("train/abseiling/-abc_12_000030_000040", 0, "abseiling", "train", "-abc_12"),  # one YouTube video
        ("train/air_drumming/def_000000_000010", 1, "air drumming", "train", "def"),
        ("val/air drumming/ghi_000005_000015", 1, "air drumming", "test", "ghi"),
    ]
    classes = _write(tmp_path / "classes.txt", "air drumming\nabseiling\nzumba\n")
    ds = load_dataset("kinetics", root, train_list=train, classes_file=classes)
    assert ds.classes == ("air drumming", "abseiling", "zumba") and [v.label for v in ds.videos] == [1, 1, 0]


def test_kinetics_missing_videos_need_allow_missing(tmp_path):
    root, train, val = _kinetics(tmp_path)
    with open(train, "a") as f:
        f.write("abseiling,gone,0,10,train,0\n")
    with pytest.raises(DatasetError, match=r"1 videos named in .*train.csv.* are missing .*"
                                           r"train/abseiling/gone_000000_000010.mp4.*--allow-missing"):
        load_kinetics(root, train_csv=train, test_csv=val)
    ds = load_kinetics(root, train_csv=train, test_csv=val, allow_missing=True)
    assert ds.missing == ("train/abseiling/gone_000000_000010.mp4",) and len(ds.videos) == 4


@pytest.mark.parametrize("text, message", [
    ("label,youtube_id,time_start,time_end\nx,a,0,10\n", r"train.csv:1: the header has no column split"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,a,x,10,train\n",
     r"train.csv:2: time_start 'x' is not a whole number of seconds"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,a,0,10\n",
     r"train.csv:2: 4 values, the header names 5 columns"),
    ("label,youtube_id,time_start,time_end,split\n,a,0,10,test\n", r"train.csv:2: no label"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,../a,0,10,train\n",
     r"train.csv:2: youtube_id '../a' cannot name a file"),
])
def test_kinetics_errors_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message):
        load_kinetics(tmp_path, train_csv=_write(tmp_path / "train.csv", text))


def test_kinetics_label_outside_the_class_list(tmp_path):
    root, train, _ = _kinetics(tmp_path)
    with pytest.raises(DatasetError, match=r"train.csv:3: unknown label 'air drumming' \(1 classes in .*c.txt\)"):
        load_kinetics(root, train_csv=train, classes_file=_write(tmp_path / "c.txt", "abseiling\n"))


# ----------------------------------------------------------------------------- Something-Something v2

SSV2_LABELS = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
SSV2_TRAIN = [
    {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
     "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
    {"id": "42", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right",
     "placeholders": ["a cup"]},
]
SSV2_VAL = [{"id": "7", "label": "pushing pen from left to right",
             "template": "Pushing [something] from left to right", "placeholders": ["pen"]}]


def _ssv2(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    root = tmp_path / "20bn-something-something-v2"
    _touch(root, "78687.webm", "42.webm", "7.webm", "999.webm")
    files = [_write(tmp_path / name, json.dumps(data, indent=1)) for name, data in (
        ("labels.json", SSV2_LABELS), ("train.json", SSV2_TRAIN), ("validation.json", SSV2_VAL))]
    return (root, *files)


def test_ssv2_jsons(tmp_path):
    root, labels, train, val = _ssv2(tmp_path)
    ds = load_ssv2(root, labels_json=labels, train_json=train, test_json=val)
    assert ds.name == "ssv2" and ds.classes == tuple(SSV2_LABELS)
    assert _table(ds) == [
        ("42", 1, "Pushing something from left to right", "train", "42"),
        ("7", 1, "Pushing something from left to right", "test", "7"),
        ("78687", 0, "Holding something next to something", "train", "78687"),
    ]
    assert ds.videos[0].path == root / "42.webm"
    # The class order is the labels' indices, not the file's order.
    _write(labels, json.dumps({"Pushing something from left to right": "1", "Holding something next to something": "0"}))
    assert load_dataset("ssv2", root, train_list=train, classes_file=labels).classes == tuple(SSV2_LABELS)


def test_ssv2_errors_name_the_file_and_entry(tmp_path):
    root, labels, train, val = _ssv2(tmp_path)
    _write(train, json.dumps([SSV2_TRAIN[0], {"id": "42", "label": "x"}]))
    with pytest.raises(DatasetError, match=r'train.json: entry 2 has no "template"'):
        load_ssv2(root, labels_json=labels, train_json=train)
    _write(train, json.dumps([{"id": "5", "template": "Foo [something]"}]))
    with pytest.raises(DatasetError, match=r"train.json: entry 1 \(id 5\): template 'Foo something' not in labels "
                                           r".*labels.json"):
        load_ssv2(root, labels_json=labels, train_json=train)
    _write(train, '[\n {"id": "5",\n  "template": }\n]')
    with pytest.raises(DatasetError, match=r"train.json:3: not valid JSON"):
        load_ssv2(root, labels_json=labels, train_json=train)
    _write(train, json.dumps([{"id": "1234", "template": "Holding [something] next to [something]"}]))
    with pytest.raises(DatasetError, match=r"1 videos named in .*train.json are missing .*1234.webm.*--allow-missing"):
        load_ssv2(root, labels_json=labels, train_json=train)
    ds = load_ssv2(root, labels_json=labels, train_json=train, test_json=val, allow_missing=True)
    assert ds.missing == ("1234.webm",) and [v.video_id for v in ds.videos] == ["7"]
    _write(labels, json.dumps({"Holding something next to something": "0", "Pushing": "2"}))
    with pytest.raises(DatasetError, match=r"labels.json: indices must be 0..1, each once \(repeated: -; absent: 1\)"):
        load_ssv2(root, labels_json=labels, train_json=val)
    _write(labels, json.dumps({"Holding something next to something": "zero"}))
    with pytest.raises(DatasetError, match=r"labels.json: template 'Holding something next to something' has "
                                           r"index 'zero'"):
        load_ssv2(root, labels_json=labels, train_json=val)


# ----------------------------------------------------------------------------- load_dataset and decode


def test_options_a_kind_does_not_use_are_refused(tmp_path):
    root, labels, train, val = _ssv2(tmp_path)
    with pytest.raises(DatasetError, match=r"test_list \(--test-list\) do not apply to dataset kind 'csv'"):
        load_dataset("csv", root, test_list=val)
    with pytest.raises(DatasetError, match=r"labels \(--labels\) do not apply to dataset kind 'kinetics'"):
        load_dataset("kinetics", root, train_list=train, labels="indices")
    with pytest.raises(DatasetError, match=r"splits_dir \(--splits\) do not apply to dataset kind 'list'"):
        load_dataset("list", root, train_list=train, splits_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"train_list \(--list\) do not apply to dataset kind 'ucf101'"):
        load_dataset("ucf101", root, train_list=train)
    with pytest.raises(DatasetError, match=r"'ssv2' needs its labels JSON \(--classes labels.json"):
        load_dataset("ssv2", root, train_list=train)


def _video(path: Path, seed: int) -> None:
    """A real 6-frame clip at ``path`` whatever its extension (written as AVI, renamed; PyAV probes content)."""
    tmp = path.with_name(path.name + ".tmp.avi")
    write_video(tmp, num_frames=6, size=(32, 24), seed=seed)
    os.replace(tmp, path)


def _decode(tmp_path: Path, *args: str):
    cache = tmp_path / "cache"
    res = CliRunner().invoke(main, ["decode", *args, "--short-side", "0", "--workers", "1", "--val-fraction", "0",
                                    "--cache-dir", str(cache)])
    return res, cache / "decode"


@pytest.mark.parametrize("kind", ["list", "kinetics", "ssv2"])
def test_decode_options_reach_each_new_kind(tmp_path, kind):
    """decode's --list / --test-list / --classes / --allow-missing map onto each kind's files: the stored table
    has the hand-computed ids, labels, classes and splits."""
    if kind == "list":
        root = tmp_path / "videos"
        for i, rel in enumerate(["A/v_A_g01_c01.avi", "B/clip.mp4"]):
            _video(root / rel, i)
        train = _write(tmp_path / "train.txt", "A/v_A_g01_c01 6 1\ngone 6 0\n")
        test = _write(tmp_path / "val.txt", "B/clip 6 0\n")
        classes = _write(tmp_path / "classes.txt", "Bee\nAy\n")
        args = ["--list", str(train), "--test-list", str(test), "--classes", str(classes), "--allow-missing"]
        want = (["A/v_A_g01_c01", "B/clip"], [1, 0], ["Bee", "Ay"], ["train", "test"], ["A_g01", "B/clip"])
    elif kind == "kinetics":
        root, train, val = _kinetics(tmp_path)
        for i, rel in enumerate(["train/abseiling/-abc_12_000010_000020.mp4", "val/air drumming/ghi_000005_000015.mp4"]):
            _video(root / rel, i)
        os.remove(root / "train/abseiling/-abc_12_000030_000040.mp4")
        os.remove(root / "train/air_drumming/def_000000_000010.mp4")
        args = ["--list", str(train), "--test-list", str(val), "--allow-missing"]
        want = (["train/abseiling/-abc_12_000010_000020", "val/air drumming/ghi_000005_000015"], [0, 1],
                ["abseiling", "air drumming"], ["train", "test"], ["-abc_12", "ghi"])
    else:
        root, labels, train, val = _ssv2(tmp_path)
        for i, name in enumerate(["78687.webm", "42.webm", "7.webm"]):
            _video(root / name, i)
        args = ["--list", str(train), "--test-list", str(val), "--classes", str(labels)]
        want = (["42", "7", "78687"], [1, 1, 0], list(SSV2_LABELS), ["train", "test", "train"], ["42", "7", "78687"])
    res, out = _decode(tmp_path, "--dataset", kind, "--root", str(root), *args)
    assert res.exit_code == 0, res.output
    table = VideoTable.load(out)
    assert (table.video_ids, table.labels, table.classes, table.splits["1"], table.groups) == want
    assert table.num_frames == [6] * len(want[0]) and list(table.splits) == ["1"]
    assert bool(table.missing) == (kind != "ssv2")


def test_decode_refuses_options_of_other_kinds(tmp_path):
    root, labels, train, val = _ssv2(tmp_path)
    res, out = _decode(tmp_path, "--dataset", "csv", "--root", str(root), "--test-list", str(val))
    assert res.exit_code == 2 and "test_list (--test-list) do not apply to dataset kind 'csv'" in res.output
    res, out = _decode(tmp_path, "--dataset", "ssv2", "--root", str(root), "--list", str(train))
    assert res.exit_code == 2 and "needs its labels JSON (--classes labels.json" in res.output
    res, out = _decode(tmp_path, "--dataset", "folder", "--root", str(root), "--list", str(train))
    assert res.exit_code == 2 and "train_list (--list) do not apply to dataset kind 'folder'" in res.output
    res, out = _decode(tmp_path, "--dataset", "rawframes", "--root", str(root), "--test-list", str(val))
    assert res.exit_code == 2 and "--rawframes-train-list / --rawframes-test-list, not --list" in res.output
    assert not out.exists()
