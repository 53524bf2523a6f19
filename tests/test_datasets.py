"""Dataset layouts: official UCF101/HMDB51 split files over fake roots of empty placeholder videos."""

import os
import shutil
import time
from pathlib import Path

import pytest

from pipeline.data.splits import holdout_groups
from pipeline.data.annotations import (
    DatasetError,
    MissingSplitFile,
    VideoRecord,
    hmdb_group,
    load_csv,
    load_dataset,
    load_folder,
    load_hmdb51,
    load_ucf101,
    ucf_group,
)


def _listed_paths(list_file: Path) -> list[str]:
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _touch(root: Path, rels) -> None:
    """Empty placeholder files at ``root/rel`` (plain os calls: about 2x faster than pathlib for 13k files)."""
    rels = list(rels)
    for folder in sorted({os.path.dirname(rel) for rel in rels}):
        os.makedirs(root / folder, exist_ok=True)
    for rel in rels:
        os.close(os.open(root / rel, os.O_CREAT | os.O_WRONLY, 0o644))


@pytest.fixture(scope="session")
def ucf_splits(shared_data) -> Path:
    return shared_data / "splits" / "ucf101"


@pytest.fixture(scope="session")
def hmdb_splits(shared_data) -> Path:
    return shared_data / "splits" / "hmdb51"


@pytest.fixture(scope="session")
def ucf_root(ucf_splits, tmp_path_factory) -> Path:
    """Every video any UCF101 split names, as an empty file at its listed path (as on the real disk)."""
    root = tmp_path_factory.mktemp("ucf101")
    rels = set()
    for n in (1, 2, 3):
        rels.update(_listed_paths(ucf_splits / f"trainlist0{n}.txt"))
        rels.update(_listed_paths(ucf_splits / f"testlist0{n}.txt"))
    _touch(root, rels)
    return root


@pytest.fixture(scope="session")
def hmdb_root(hmdb_splits, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hmdb51")
    rels = []
    for f in hmdb_splits.glob("*_test_split1.txt"):
        cls = f.name[: -len("_test_split1.txt")]
        rels += [f"{cls}/{name}" for name in _listed_paths(f)]
    _touch(root, rels)
    return root


# ----------------------------------------------------------------------------- name parsing


def test_ucf_group_parsing():
    assert ucf_group("v_ApplyEyeMakeup_g01_c01") == "ApplyEyeMakeup_g01"
    assert ucf_group("v_HandStandPushups_g25_c04") == "HandStandPushups_g25"
    assert ucf_group("arm_wrestling_demo") is None
    assert ucf_group("v_Archery_g01") is None


def test_hmdb_group_is_the_source_title():
    assert hmdb_group("April_09_brush_hair_u_nm_np1_ba_goo_0", "brush_hair") == "April_09"
    name = "Brushing_Her_Hair__[_NEW_AUDIO_]_UPDATED!!!!_brush_hair_h_cm_np1_fr_goo_0"
    assert hmdb_group(name, "brush_hair") == "Brushing_Her_Hair__[_NEW_AUDIO_]_UPDATED!!!!"
    assert hmdb_group("TheBoondockSaints_sit_u_nm_np10_ba_med_0", "sit") == "TheBoondockSaints"
    assert hmdb_group("clip_0", "sit") is None
    assert hmdb_group("TheBoondockSaints_sit_u_nm_np10_ba_med_0", "run") is None


# ----------------------------------------------------------------------------- UCF101


def test_ucf101_split1_counts_and_labels(ucf_root, ucf_splits):
    start = time.perf_counter()
    ds = load_dataset("ucf101", ucf_root, splits_dir=ucf_splits, split=1)
    elapsed = time.perf_counter() - start
    # Official figures: 13,320 videos, 101 classes ([STFN] Sec. 4.1); split 1 = 9537 / 3783.
    assert ds.counts() == {"train": 9537, "test": 3783, "unused": 0}
    assert len(ds.classes) == 101 and ds.split_id == 1 and ds.missing == ()
    assert ds.classes[0] == "ApplyEyeMakeup" and ds.classes[36] == "HandstandPushups" and ds.classes[100] == "YoYo"
    assert [v.video_id for v in ds.videos] == sorted(v.video_id for v in ds.videos)
    by_id = {v.video_id: v for v in ds.videos}
    v = by_id["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"]
    assert (v.label, v.split, v.group, v.class_name) == (0, "test", "ApplyEyeMakeup_g01", "ApplyEyeMakeup")
    assert v.path == ucf_root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi" and v.path.is_file()
    v = by_id["HandstandPushups/v_HandStandPushups_g08_c01"]
    assert (v.label, v.split, v.class_name) == (36, "train", "HandstandPushups")
    # The official protocol splits by group: 7 groups of 25 per class are test in split 1.
    test_groups = {v.group for v in ds.videos if v.split == "test"}
    assert not test_groups & {v.group for v in ds.videos if v.split == "train"}
    assert {int(g[-2:]) for g in test_groups} == set(range(1, 8))
    assert all("\r" not in v.video_id for v in ds.videos)
    assert elapsed < 3.0, f"loading 13,320 records took {elapsed:.2f} s"


def test_ucf101_split2_marks_unlisted_videos_unused(ucf_root, ucf_splits, tmp_path):
    ds = load_ucf101(ucf_root, splits_dir=ucf_splits, split=2)
    assert ds.counts() == {"train": 9586, "test": 3734, "unused": 0}
    # A video on disk that split 2 does not name is "unused".
    splits = tmp_path / "splits"
    shutil.copytree(ucf_splits, splits)
    lines = (ucf_splits / "trainlist02.txt").read_bytes().splitlines(keepends=True)
    (splits / "trainlist02.txt").write_bytes(b"".join(lines[1:]))
    ds = load_ucf101(ucf_root, splits_dir=splits, split=2)
    assert ds.counts() == {"train": 9585, "test": 3734, "unused": 1}
    (unused,) = ds.subset("unused")
    assert unused.video_id + ".avi" == lines[0].split()[0].decode()


def _small_ucf(tmp_path: Path, crlf: bool = True) -> tuple[Path, Path]:
    """Two classes; list entries name the HandStand spelling used by the official lists."""
    eol = "\r\n" if crlf else "\n"
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_text(f"1 ApplyEyeMakeup{eol}2 HandstandPushups{eol}", newline="")
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1", "HandstandPushups/v_HandStandPushups_g02_c01.avi 2"]
    test = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "HandstandPushups/v_HandStandPushups_g01_c01.avi"]
    for n in (1, 2, 3):
        (splits / f"trainlist0{n}.txt").write_text(eol.join(train) + eol, newline="")
        (splits / f"testlist0{n}.txt").write_text(eol.join(test) + eol, newline="")
    root = tmp_path / "UCF-101"
    _touch(root, [t.split()[0] for t in train + test])
    return root, splits


@pytest.mark.parametrize("crlf", [True, False])
def test_ucf101_line_endings(tmp_path, crlf):
    root, splits = _small_ucf(tmp_path, crlf)
    ds = load_ucf101(root, splits_dir=splits)
    assert ds.classes == ("ApplyEyeMakeup", "HandstandPushups")
    assert [(v.video_id, v.label, v.split) for v in ds.videos] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 0, "test"),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01", 0, "train"),
        ("HandstandPushups/v_HandStandPushups_g01_c01", 1, "test"),
        ("HandstandPushups/v_HandStandPushups_g02_c01", 1, "train"),
    ]


def test_ucf101_resolves_case_differences_on_disk(tmp_path):
    root, splits = _small_ucf(tmp_path)
    # A copy whose files are spelled differently from the lists (e.g. folder lower-cased, "Handstand").
    shutil.rmtree(root / "HandstandPushups")
    _touch(root, ["handstandpushups/v_HandstandPushups_g01_c01.avi", "handstandpushups/v_HandstandPushups_g02_c01.avi"])
    ds = load_ucf101(root, splits_dir=splits)
    assert ds.missing == () and ds.counts() == {"train": 2, "test": 2, "unused": 0}
    v = [v for v in ds.videos if v.label == 1 and v.split == "train"][0]
    assert v.video_id == "handstandpushups/v_HandstandPushups_g02_c01"  # the id follows the disk
    assert v.path == root / "handstandpushups" / "v_HandstandPushups_g02_c01.avi"
    assert v.class_name == "HandstandPushups"


def test_ucf101_resolves_reencoded_extension(tmp_path):
    root, splits = _small_ucf(tmp_path)
    folder = root / "ApplyEyeMakeup"
    (folder / "v_ApplyEyeMakeup_g01_c01.avi").rename(folder / "v_ApplyEyeMakeup_g01_c01.mp4")
    ds = load_ucf101(root, splits_dir=splits)
    assert ds.videos[0].path.name == "v_ApplyEyeMakeup_g01_c01.mp4" and ds.videos[0].split == "test"


def test_ucf101_missing_videos_listed_or_recorded(ucf_root, ucf_splits, tmp_path):
    # Twelve more entries than the fake root holds: the message shows 10 of them and the count.
    splits = tmp_path / "splits"
    shutil.copytree(ucf_splits, splits)
    absent = [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g{g}_c01.avi" for g in range(26, 38)]
    with open(splits / "trainlist01.txt", "a", newline="") as f:
        f.write("".join(f"{p} 1\r\n" for p in absent))
    with pytest.raises(DatasetError) as err:
        load_ucf101(ucf_root, splits_dir=splits, split=1)
    message = str(err.value)
    assert "12 videos" in message and "allow_missing" in message and "(2 more)" in message
    assert sum(p in message for p in absent) == 10

    ds = load_dataset("ucf101", ucf_root, splits_dir=splits, allow_missing=True)
    assert ds.missing == tuple(absent)
    assert ds.counts() == {"train": 9537, "test": 3783, "unused": 0}


def test_ucf101_missing_split_file_is_named(tmp_path):
    root, splits = _small_ucf(tmp_path)
    (splits / "testlist02.txt").unlink()
    load_ucf101(root, splits_dir=splits, split=1)
    with pytest.raises(MissingSplitFile, match="not found: " + str(splits / "testlist02.txt")):
        load_ucf101(root, splits_dir=splits, split=2)


def test_ucf101_default_splits_dir(tmp_path):
    root, splits = _small_ucf(tmp_path)
    with pytest.raises(DatasetError, match="classInd.txt"):
        load_ucf101(root)
    splits.rename(root / "ucfTrainTestlist")
    assert load_ucf101(root).counts()["train"] == 2


@pytest.mark.parametrize("split", [0, 4, "1", True])
def test_split_number_must_be_official(tmp_path, split):
    root, splits = _small_ucf(tmp_path)
    with pytest.raises(DatasetError, match="1, 2, 3"):
        load_ucf101(root, splits_dir=splits, split=split)


def test_ucf101_rejects_stray_class_folder_and_label_mismatch(tmp_path):
    root, splits = _small_ucf(tmp_path)
    _touch(root, ["Basketball/v_Basketball_g01_c01.avi"])
    with pytest.raises(DatasetError, match=r"Basketball \(1 videos\)"):
        load_ucf101(root, splits_dir=splits)
    shutil.rmtree(root / "Basketball")
    (splits / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 2\n")
    with pytest.raises(DatasetError, match="trainlist01.txt:1"):
        load_ucf101(root, splits_dir=splits)


# ----------------------------------------------------------------------------- HMDB51


def test_hmdb51_split1_counts(hmdb_root, hmdb_splits):
    ds = load_dataset("hmdb51", hmdb_root, splits_dir=hmdb_splits, split=1)
    # 6,766 videos over 51 classes ([STFN] Sec. 4.1); split 1: 70 train / 30 test per class.
    assert ds.counts() == {"train": 3570, "test": 1530, "unused": 1666}
    assert len(ds.classes) == 51 and ds.split_id == 1
    # Class order is TSN's class_list.txt (entries carry trailing spaces there).
    reference = [line.strip() for line in (hmdb_splits / "class_list.txt").read_text().splitlines() if line.strip()]
    assert list(ds.classes) == reference
    assert ds.classes.index("kick_ball") < ds.classes.index("kick")
    for label, name in enumerate(ds.classes):
        per_class = [v for v in ds.videos if v.label == label]
        assert {v.class_name for v in per_class} == {name}
        assert sum(v.split == "train" for v in per_class) == 70 and sum(v.split == "test" for v in per_class) == 30
    v = {v.video_id: v for v in ds.videos}["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0"]
    assert (v.split, v.group, v.label) == ("train", "April_09", 0)
    v = {v.video_id: v for v in ds.videos}["brush_hair/Aussie_Brunette_Brushing_Hair_II_brush_hair_u_nm_np1_ba_goo_4"]
    assert (v.split, v.group) == ("unused", "Aussie_Brunette_Brushing_Hair_II")


def test_hmdb51_class_order_without_class_list(hmdb_root, hmdb_splits, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for f in hmdb_splits.glob("*_test_split2.txt"):
        shutil.copy(f, splits / f.name)
    ds = load_hmdb51(hmdb_root, splits_dir=splits, split=2)
    tsn = [line.strip() for line in (hmdb_splits / "class_list.txt").read_text().splitlines() if line.strip()]
    assert list(ds.classes) == sorted(tsn)  # mmaction2's order: sorted class names
    swapped = [i for i, (a, b) in enumerate(zip(ds.classes, tsn)) if a != b]
    assert [tsn[i] for i in swapped] == ["kick_ball", "kick", "sword_exercise", "sword"]
    assert ds.counts() == {"train": 3570, "test": 1530, "unused": 1666}  # split 2: also 70/30 per class
    with pytest.raises(MissingSplitFile, match=r"<class>_test_split1\.txt"):
        load_hmdb51(hmdb_root, splits_dir=splits, split=1)


def test_hmdb51_missing_video(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "sit_test_split1.txt").write_text("A_sit_u_nm_np1_ba_goo_0.avi 1 \nB_sit_u_nm_np1_ba_goo_0.avi 2 \n")
    root = tmp_path / "hmdb"
    _touch(root, ["sit/A_sit_u_nm_np1_ba_goo_0.avi"])
    with pytest.raises(DatasetError, match="sit/B_sit_u_nm_np1_ba_goo_0.avi"):
        load_hmdb51(root, splits_dir=splits)
    ds = load_hmdb51(root, splits_dir=splits, allow_missing=True)
    assert ds.missing == ("sit/B_sit_u_nm_np1_ba_goo_0.avi",) and ds.counts()["train"] == 1


# ----------------------------------------------------------------------------- errors shared by all layouts


def test_unknown_kind_lists_valid_ones(tmp_path):
    with pytest.raises(DatasetError, match="ucf101, hmdb51, folder, csv, demo, list, kinetics, ssv2"):
        load_dataset("youtube8m", tmp_path)


def test_missing_root_is_named(tmp_path):
    for kind in ("ucf101", "hmdb51", "folder", "demo"):
        with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
            load_dataset(kind, tmp_path / "nope")


def test_option_for_another_layout_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="test_fraction"):
        load_dataset("ucf101", tmp_path, test_fraction=0.2)


def test_empty_dataset(tmp_path):
    (tmp_path / "Jump").mkdir()
    (tmp_path / "Jump" / "notes.txt").touch()
    with pytest.raises(DatasetError, match="no videos"):
        load_folder(tmp_path)


# ----------------------------------------------------------------------------- folder per class


def _folder_root(root: Path) -> Path:
    classes, groups, clips = ("Run", "Jump", "Clap"), range(1, 9), range(1, 4)
    rels = [f"{c}/v_{c}_g{g:02d}_c{k:02d}.mp4" for c in classes for g in groups for k in clips]
    _touch(root, rels + ["Run/extra/other_clip.webm", "Run/readme.txt", "Run/._v_Run_g01_c01.mp4"])
    return root


def test_folder_all_train(tmp_path):
    ds = load_dataset("folder", _folder_root(tmp_path))
    assert ds.classes == ("Clap", "Jump", "Run")
    assert ds.counts() == {"train": 73, "test": 0, "unused": 0}
    v = {v.video_id: v for v in ds.videos}
    assert v["Run/v_Run_g03_c02"].group == "Run_g03" and v["Run/v_Run_g03_c02"].label == 2
    assert v["Run/extra/other_clip"].group == "Run/extra/other_clip"


def test_folder_groupwise_split_is_deterministic(tmp_path):
    root = _folder_root(tmp_path)
    ds = load_dataset("folder", root, test_fraction=0.25, seed=3)
    train = {v.group for v in ds.subset("train")}
    test = {v.group for v in ds.subset("test")}
    assert train and test and not train & test
    # 8 groups of 3 clips per class: a quarter is exactly 2 groups (6 clips) per class.
    for label in range(3):
        assert sum(v.split == "test" for v in ds.videos if v.label == label) == 6
    assert load_folder(root, test_fraction=0.25, seed=3) == ds
    assert any(load_folder(root, test_fraction=0.25, seed=s).subset("test") != ds.subset("test") for s in range(4, 8))


def test_holdout_groups_keep_groups_whole():
    videos = [
        VideoRecord(f"c{lab}/v{i}", Path(f"/x/c{lab}/v{i}.mp4"), lab, f"c{lab}", "train", f"g{lab}_{i // 4}")
        for lab in range(2)
        for i in range(40)
    ]
    held = holdout_groups(videos, 0.2, seed=0)
    assert len(held) == 4  # 10 groups of 4 per class; 20 % is 2 groups each
    assert holdout_groups(videos, 0.2, seed=0) == held
    assert holdout_groups(videos, 0.0) == frozenset()
    assert len(holdout_groups(videos[:4], 0.9)) == 0  # one group: always kept
    with pytest.raises(ValueError):
        holdout_groups(videos, 1.0)


# ----------------------------------------------------------------------------- CSV and demo


def test_csv_with_header_and_names(tmp_path):
    _touch(tmp_path, ["a/v_Run_g01_c01.mp4", "a/v_Run_g02_c01.mp4", "b/clip.mp4"])
    elsewhere = tmp_path.parent / f"{tmp_path.name}_other" / "far.mp4"
    _touch(elsewhere.parent, [elsewhere.name])
    (tmp_path / "list.csv").write_text(
        "path,label,split,group\n"
        "a/v_Run_g01_c01.mp4,Run,train,\n"
        "a/v_Run_g02_c01.mp4,Run,test,\n"
        "b/clip.mp4,Jump,,src7\n"
        f"{elsewhere},Jump,unused,\n"
    )
    ds = load_dataset("csv", tmp_path)
    assert ds.classes == ("Jump", "Run") and ds.root == tmp_path
    got = {v.video_id: (v.label, v.split, v.group) for v in ds.videos}
    far = elsewhere.with_suffix("").as_posix().lstrip("/")  # outside the CSV's folder: the absolute path
    assert got == {
        "a/v_Run_g01_c01": (1, "train", "Run_g01"),
        "a/v_Run_g02_c01": (1, "test", "Run_g02"),
        "b/clip": (0, "train", "src7"),
        far: (0, "unused", far),
    }
    assert load_dataset("demo", tmp_path).name == "demo"


def test_csv_without_header_integer_labels(tmp_path):
    _touch(tmp_path, ["x.avi", "y.avi", "z.avi"])
    (tmp_path / "videos.csv").write_text("x.avi,2\ny.avi,0,test\nz.avi,1\n")
    ds = load_csv(tmp_path / "videos.csv")  # exactly 0..C-1: classes "0".."2" in numeric order
    assert ds.classes == ("0", "1", "2")
    assert [(v.video_id, v.label, v.split) for v in ds.videos] == [("x", 2, "train"), ("y", 0, "test"), ("z", 1, "train")]
    (tmp_path / "classes.txt").write_text("Walk\nRun\nSit\n")
    ds = load_dataset("csv", tmp_path, csv=tmp_path / "videos.csv", classes_file=tmp_path / "classes.txt")
    assert ds.classes == ("Walk", "Run", "Sit") and [v.class_name for v in ds.videos] == ["Sit", "Walk", "Run"]
    (tmp_path / "videos.csv").write_text("x.avi,3\n")
    with pytest.raises(DatasetError, match=r"videos.csv:1: unknown label '3'"):
        load_csv(tmp_path / "videos.csv", classes_file=tmp_path / "classes.txt")
    (tmp_path / "videos.csv").write_text("x.avi,Swim\n")
    with pytest.raises(DatasetError, match="unknown label 'Swim'"):
        load_csv(tmp_path / "videos.csv", classes_file=tmp_path / "classes.txt")


def test_csv_integer_labels_with_gaps_or_negatives_are_refused(tmp_path):
    _touch(tmp_path, ["x.avi", "y.avi"])
    csv = tmp_path / "videos.csv"
    csv.write_text("x.avi,0\ny.avi,7\n")  # issue 12: 8 classes, 6 of them empty
    with pytest.raises(DatasetError, match=r"integer labels 0, 7 leave classes 1, 2, 3, 4, 5, 6 without any video"):
        load_csv(csv)
    csv.write_text("x.avi,-1\ny.avi,0\n")  # issue 12: -1 shifted every label by one
    with pytest.raises(DatasetError, match="negative class indices -1"):
        load_csv(csv)
    # A class list explains a gap: 8 named classes, videos in two of them.
    (tmp_path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(8)))
    csv.write_text("x.avi,0\ny.avi,7\n")
    ds = load_csv(csv, classes_file=tmp_path / "classes.txt")
    assert ds.num_classes == 8 and [v.class_name for v in ds.videos] == ["c0", "c7"]
    # classInd.txt style ("<1-based index> <name>") is a class list too; labels are still 0-based indices.
    (tmp_path / "classInd.txt").write_text("1 Walk\r\n2 Run\r\n")
    csv.write_text("x.avi,1\ny.avi,Walk\n")
    ds = load_csv(csv, classes_file=tmp_path / "classInd.txt")
    assert ds.classes == ("Walk", "Run") and [v.class_name for v in ds.videos] == ["Run", "Walk"]
    # labels="indices": every label an index; a name is refused.
    csv.write_text("x.avi,1\ny.avi,Walk\n")
    with pytest.raises(DatasetError, match=r"videos.csv:2: label 'Walk' is not a class index"):
        load_csv(csv, labels="indices", classes_file=tmp_path / "classInd.txt")
    with pytest.raises(DatasetError, match="labels must be one of names, indices"):
        load_csv(csv, labels="ints")
    with pytest.raises(DatasetError, match="do not apply to dataset kind 'ucf101'"):
        load_dataset("ucf101", tmp_path, labels="indices")


def test_csv_header_is_recognised_or_refused(tmp_path):
    _touch(tmp_path, ["x.avi"])
    csv = tmp_path / "list.csv"
    csv.write_text("path,lable,split\nx.avi,Run,train\n")
    with pytest.raises(DatasetError, match=r"list.csv:1: unknown column 'lable' in the header \(did you mean 'label'\?\)"):
        load_csv(csv)
    csv.write_text("Path,Label,Split\nx.avi,Run,test\n")
    assert [(v.class_name, v.split) for v in load_csv(csv).videos] == [("Run", "test")]
    csv.write_text("x.avi,split\n")  # a class named like a column: a data row (its path is a video)
    assert load_csv(csv).classes == ("split",)


def test_csv_label_typo_singleton_is_named(tmp_path, caplog):
    names = [f"v{i}.avi" for i in range(10)]
    _touch(tmp_path, names)
    labels = ["Running"] * 5 + ["Jumping"] * 4 + ["Runing"]
    (tmp_path / "list.csv").write_text("".join(f"{n},{c}\n" for n, c in zip(names, labels)))
    caplog.set_level("WARNING", logger="pipeline")
    ds = load_csv(tmp_path / "list.csv")
    assert ds.classes == ("Jumping", "Runing", "Running")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "class 'Runing' has a single video; a typo of 'Running'?" in warned[0]
    (tmp_path / "classes.txt").write_text("Running\nJumping\n")  # with a class list the typo is an error
    with pytest.raises(DatasetError, match=r"list.csv:10: unknown label 'Runing'"):
        load_csv(tmp_path / "list.csv", classes_file=tmp_path / "classes.txt")


def test_csv_errors(tmp_path):
    _touch(tmp_path, ["x.avi", "x.mp4"])
    csv = tmp_path / "list.csv"
    csv.write_text("x.avi,Run\nx.mp4,Run\n")
    with pytest.raises(DatasetError, match="duplicate video ids: x"):
        load_csv(csv)
    csv.write_text("x.avi,Run,validation\n")
    with pytest.raises(DatasetError, match="list.csv:1: unknown split"):
        load_csv(csv)
    csv.write_text("x.avi,Run\ngone.avi,Run\n")
    with pytest.raises(DatasetError, match="1 videos named in .*gone.avi"):
        load_csv(csv)
    assert load_csv(csv, allow_missing=True).missing == ("gone.avi",)
    with pytest.raises(DatasetError, match="nothere.csv"):
        load_csv(tmp_path / "nothere.csv")


def test_real_clips_as_csv(shared_data, tmp_path):
    clips = shared_data / "clips" / "ucf101"
    (tmp_path / "list.csv").write_text(
        "path,label\n"
        f"{clips / 'v_ApplyEyeMakeup_g01_c01.avi'},ApplyEyeMakeup\n"
        f"{clips / 'v_BaseballPitch_g01_c01.avi'},BaseballPitch\n"
    )
    ds = load_csv(tmp_path / "list.csv")
    assert [v.group for v in ds.videos] == ["ApplyEyeMakeup_g01", "BaseballPitch_g01"]
    assert all(v.path.is_file() for v in ds.videos)


def test_one_holdout_on_the_official_ucf101_split(shared_data):
    """mark_validation on UCF101 split 1 (official lists, 25 groups per class): whole groups per class,
    about 10 % of each class's training videos, no test video touched, deterministic for a seed."""
    from pipeline.data.splits import VAL, mark_validation

    lists = shared_data / "splits" / "ucf101"
    classes = [line.split()[1] for line in (lists / "classInd.txt").read_text().split("\n") if line.strip()]
    rows = [(line.split()[0], "train") for line in (lists / "trainlist01.txt").read_text().split("\n") if line.strip()]
    rows += [(line.strip(), "test") for line in (lists / "testlist01.txt").read_text().split("\n") if line.strip()]
    names = [r[0].split("/")[1].rsplit(".", 1)[0] for r in rows]
    groups = [n.rsplit("_", 1)[0] for n in names]  # v_<Class>_gGG
    labels = [classes.index(r[0].split("/")[0]) if r[0].split("/")[0] in classes else
              [c.lower() for c in classes].index(r[0].split("/")[0].lower()) for r in rows]
    membership = [m for _, m in rows]
    marked = mark_validation(membership, groups, labels, 0.1, seed=0)
    assert mark_validation(membership, groups, labels, 0.1, seed=0) == marked
    assert mark_validation(membership, groups, labels, 0.1, seed=1) != marked
    assert all(m == "test" for m, o in zip(marked, membership) if o == "test")
    val_groups = {g for g, m in zip(groups, marked) if m == VAL}
    train_groups = {g for g, m in zip(groups, marked) if m == "train"}
    assert not val_groups & train_groups
    for c in range(len(classes)):
        tr = [i for i, (m, y) in enumerate(zip(membership, labels)) if m == "train" and y == c]
        held = sum(marked[i] == VAL for i in tr)
        assert 1 <= held and abs(held - 0.1 * len(tr)) <= 5  # a UCF101 group holds 4-7 clips
    assert len(marked) == 9537 + 3783
