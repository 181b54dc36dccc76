import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from depmatch.config import ExperimentConfig
from depmatch.data.build import build_shards
from depmatch.data.codec import decode_depth, decode_image, decode_label
from depmatch.data.depth import DepthAnythingModel, DepthDirectory, NoDepth
from depmatch.data.layouts import ShardInputError, cityscapes, folder, parse_label_map, pascal
from depmatch.data.loader import build_val_loader
from depmatch.data.shards import read_manifest
from depmatch.engine.online_depth import OnlineDepth
from depmatch.models.hub import HubError


def _save(array, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _folder_tree(root: Path, sizes, num_classes=4, seed=0):
    """images/, labels/ and depth/ for ids im0.. with the given (height, width)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for index, (height, width) in enumerate(sizes):
        key = f"im{index}"
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = rng.choice([*range(num_classes), 255], size=(height, width)).astype(np.uint8)
        depth = rng.uniform(0, 20, (height, width)).astype(np.float32)
        _save(image, root / "images" / f"{key}.png")
        _save(label, root / "labels" / f"{key}.png")
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{key}.npy", depth)
        arrays[key] = (image, label, depth)
    return arrays


def _read_shards(root: Path, split: str) -> dict[str, dict]:
    manifest = read_manifest(root)
    urls = [str(root / shard["name"]) for shard in manifest["splits"][split]["shards"]]
    return {sample["__key__"]: sample for sample in wds.WebDataset(urls, shardshuffle=False)}


def _write_list(path: Path, ids) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def test_round_trip_image_label_depth(tmp_path):
    arrays = _folder_tree(tmp_path, [(30, 40), (40, 30), (30, 40)])
    lists = {"labeled": _write_list(tmp_path / "l.txt", ["im0", "im1"]), "val": _write_list(tmp_path / "v.txt", ["im2"])}
    source = folder("toy", tmp_path / "images", tmp_path / "labels", lists, num_classes=4)
    out = build_shards(source, DepthDirectory(tmp_path / "depth"), tmp_path / "shards", samples_per_shard=1)

    labeled = _read_shards(out, "labeled")
    assert sorted(labeled) == ["im0", "im1"]
    for key, sample in labeled.items():
        image, label, depth = arrays[key]
        assert sample["png"] == (tmp_path / "images" / f"{key}.png").read_bytes()  # original bytes kept
        assert np.array_equal(decode_image(sample["png"]), image)
        assert np.array_equal(decode_label(sample["label.png"]), label)
        stored = np.load(io.BytesIO(sample["depth.npy"]), allow_pickle=False)
        assert stored.dtype == np.float16 and stored.shape == label.shape
        assert np.array_equal(decode_depth(sample["depth.npy"]), depth.astype(np.float16).astype(np.float32))
        meta = json.loads(sample["json"])
        assert meta["width"] == image.shape[1] and meta["dataset"] == "toy"

    # The val loader returns the stored label and image bit for bit (uint8, channels first).
    cfg = ExperimentConfig()
    cfg.data.root = str(out)
    batch = next(iter(build_val_loader(cfg, 0, 1)))
    assert batch["key"] == ["im2"]
    assert np.array_equal(batch["label"][0].numpy(), arrays["im2"][1])
    assert batch["image"][0].equal(torch.from_numpy(arrays["im2"][0]).permute(2, 0, 1))

    manifest = read_manifest(out)
    assert manifest["splits"]["labeled"]["total"] == 2 and len(manifest["splits"]["labeled"]["shards"]) == 2
    assert manifest["depth"]["source"] == "directory" and manifest["depth"]["dtype"] == "float16"
    with tarfile.open(out / "labeled-000000.tar") as tar:  # plain tar can read it
        assert sorted(tar.getnames()) == ["im0.depth.npy", "im0.json", "im0.label.png", "im0.png"]


def test_rerun_skips_verified_shards_and_rewrites_changed_ones(tmp_path):
    _folder_tree(tmp_path, [(20, 20)] * 4)
    source = folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4)
    out = build_shards(source, NoDepth(), tmp_path / "shards", samples_per_shard=2)
    first, second = out / "labeled-000000.tar", out / "labeled-000001.tar"
    stamps = first.stat().st_mtime_ns, second.stat().st_mtime_ns
    second.write_bytes(second.read_bytes()[:-1024])  # a damaged shard is not trusted
    build_shards(source, NoDepth(), out, samples_per_shard=2)
    assert first.stat().st_mtime_ns == stamps[0]
    assert second.stat().st_mtime_ns != stamps[1]
    assert read_manifest(out)["splits"]["labeled"]["total"] == 4
    assert "unlabeled" not in read_manifest(out)["splits"]


def test_pascal_layout(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["2007_000032", "2007_000039", "2008_000123"]
    for stem in ids:
        _save(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), tmp_path / "JPEGImages" / f"{stem}.jpg")
        _save(rng.choice([0, 5, 20, 255], size=(24, 32)).astype(np.uint8), tmp_path / "SegmentationClassAug" / f"{stem}.png")
    lists = {
        "labeled": _write_list(tmp_path / "labeled.txt", ids[:1]),
        "unlabeled": _write_list(tmp_path / "unlabeled.txt", ids[1:]),
        "val": _write_list(tmp_path / "val.txt", ["JPEGImages/2008_000123.jpg SegmentationClass/2008_000123.png"]),
    }
    out = build_shards(pascal(tmp_path, lists), NoDepth(), tmp_path / "shards")
    manifest = read_manifest(out)
    assert manifest["num_classes"] == 21 and manifest["classes"][15] == "person"
    assert manifest["palette"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert manifest["depth"] == {"source": "none"}
    labeled = _read_shards(out, "labeled")["2007_000032"]
    assert labeled["jpg"] == (tmp_path / "JPEGImages" / "2007_000032.jpg").read_bytes()
    assert np.array_equal(decode_label(labeled["label.png"]),
                          np.array(Image.open(tmp_path / "SegmentationClassAug" / "2007_000032.png")))
    unlabeled = _read_shards(out, "unlabeled")
    assert sorted(unlabeled) == ids[1:] and all("label.png" not in s and "depth.npy" not in s for s in unlabeled.values())
    assert list(_read_shards(out, "val")) == ["2008_000123"]


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    label_ids = np.array([[7, 8, 26, 0], [33, 1, 24, 23]], np.uint8).repeat(4, 0).repeat(4, 1)
    for subset, stem in (("train", "aachen_000000_000019"), ("val", "frankfurt_000000_000294")):
        city = stem.split("_")[0]
        _save(np.zeros((8, 16, 3), np.uint8), tmp_path / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png")
        _save(label_ids, tmp_path / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png")
    lists = {
        "labeled": _write_list(tmp_path / "labeled.txt", ["aachen_000000_000019"]),
        "val": _write_list(tmp_path / "val.txt", [
            "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png "
            "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"]),
    }
    out = build_shards(cityscapes(tmp_path, lists), NoDepth(), tmp_path / "shards")
    expected = np.array([[0, 1, 13, 255], [18, 255, 11, 10]], np.uint8).repeat(4, 0).repeat(4, 1)
    for split, key in (("labeled", "aachen_000000_000019"), ("val", "frankfurt_000000_000294")):
        assert np.array_equal(decode_label(_read_shards(out, split)[key]["label.png"]), expected)
    assert read_manifest(out)["num_classes"] == 19


def test_camvid_folder_layout(camvid, tmp_path):
    lists = {"labeled": camvid / "train.txt", "val": camvid / "val.txt"}
    source = folder("camvid", camvid / "images", camvid / "labels", lists, 11, label_table=parse_label_map(["11:255"]))
    out = build_shards(source, NoDepth(), tmp_path / "no-depth", samples_per_shard=8)
    manifest = read_manifest(out)
    assert manifest["splits"]["labeled"]["total"] == 24 and manifest["splits"]["val"]["total"] == 8
    for split in ("labeled", "val"):
        for key, sample in _read_shards(out, split).items():
            raw = np.array(Image.open(camvid / "labels" / f"{key}.png"))
            stored = decode_label(sample["label.png"])
            assert np.array_equal(stored, np.where(raw == 11, 255, raw))
            assert stored.shape == (360, 480) and "depth.npy" not in sample


def test_camvid_with_a_depth_dir(camvid, tmp_path):
    ids = [line.strip() for line in (camvid / "val.txt").read_text().split()][:3]
    rng = np.random.default_rng(0)
    depths = {}
    for index, name in enumerate(ids):
        stem = Path(name).stem
        depths[stem] = rng.uniform(0, 20, (360, 480)).astype(np.float32)
        if index == 0:  # one map as a 16-bit png, value / 256
            Image.fromarray((depths[stem] * 256).round().astype(np.uint16)).save(tmp_path / f"{stem}.png")
            depths[stem] = (depths[stem] * 256).round() / 256
        else:
            np.save(tmp_path / f"{stem}.npy", depths[stem])
    lists = {"val": _write_list(tmp_path / "val.txt", ids)}
    source = folder("camvid", camvid / "images", camvid / "labels", lists, 11, label_table=parse_label_map(["11:255"]))
    out = build_shards(source, DepthDirectory(tmp_path), tmp_path / "shards")
    for key, sample in _read_shards(out, "val").items():
        assert np.allclose(decode_depth(sample["depth.npy"]), depths[key], rtol=1e-3, atol=1e-2)


def test_depth_anything_model(tmp_path, tiny_depth_anything):
    model_dir = tiny_depth_anything
    _folder_tree(tmp_path, [(30, 40), (40, 30), (30, 40)])
    source = folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4)
    depth_model = DepthAnythingModel(model_dir, batch_size=2)
    out = build_shards(source, depth_model, tmp_path / "shards")
    assert read_manifest(out)["depth"]["source"] == "model"
    samples = _read_shards(out, "labeled")
    images = [decode_image(samples[key]["png"]) for key in ("im0", "im1", "im2")]
    for key, image in zip(("im0", "im1", "im2"), images):
        depth = decode_depth(samples[key]["depth.npy"])
        assert depth.shape == image.shape[:2] and np.isfinite(depth).all() and depth.min() >= 0 and np.ptp(depth) > 0.01
    # Batched by input shape, the maps equal one-image-at-a-time inference (within float16 storage).
    single = DepthAnythingModel(model_dir, batch_size=1).maps([None], images[:1])[0]
    assert np.allclose(decode_depth(samples["im0"]["depth.npy"]), single, rtol=1e-3)


def test_depth_anything_by_hub_id(tmp_path, tiny_depth_anything, offline_hub):
    from transformers import DepthAnythingForDepthEstimation

    snapshot = offline_hub.add("depth-anything/tiny-test-hf", tiny_depth_anything)
    by_id = DepthAnythingModel("depth-anything/tiny-test-hf")
    saved = DepthAnythingForDepthEstimation.from_pretrained(tiny_depth_anything).state_dict()
    loaded = by_id.model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert by_id.description == {
        "source": "model", "model": "depth-anything/tiny-test-hf", "commit": snapshot.name,
        "architecture": "DepthAnythingForDepthEstimation",
    }
    online = OnlineDepth("depth-anything/tiny-test-hf", torch.device("cpu"))  # train.online_depth_model
    assert all(torch.equal(value, saved[name]) for name, value in online.model.state_dict().items())
    with pytest.raises(ShardInputError) as error:
        DepthAnythingModel("depth-anything/absent")
    assert str(error.value).startswith("--depth-model: depth-anything/absent is not a local path")
    assert str(offline_hub.cache) in str(error.value)
    a_file = tmp_path / "model.safetensors"  # a weights file where the folder around it is wanted
    a_file.write_bytes(b"")
    folder_wanted = f"{a_file} is neither a local transformers folder nor a hub repo id (such as depth-anything/"
    with pytest.raises(ShardInputError, match=re.escape(f"--depth-model: {folder_wanted}")):
        DepthAnythingModel(str(a_file))
    with pytest.raises(HubError, match=re.escape(f"train.online_depth_model: {folder_wanted}")):
        OnlineDepth(str(a_file), torch.device("cpu"))


@pytest.mark.slow
def test_shards_build_takes_the_depth_model_by_id_offline(tmp_path, tiny_depth_anything, offline_hub):
    """The command line in a fresh process: HF_HOME and HF_HUB_OFFLINE=1 from the environment alone."""
    offline_hub.add("depth-anything/tiny-test-hf", tiny_depth_anything)
    _folder_tree(tmp_path, [(30, 40), (40, 30)])
    by_path = build_shards(folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4),
                           DepthAnythingModel(str(tiny_depth_anything)), tmp_path / "by-path")
    command = [sys.executable, "-m", "depmatch", "shards", "build", "folder", "--source", str(tmp_path),
               "--num-classes", "4", "--out", str(tmp_path / "by-id"), "--depth-model", "depth-anything/tiny-test-hf"]
    environment = {name: value for name, value in os.environ.items() if name != "HF_HUB_CACHE"}  # HF_HOME/hub
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**environment, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected = _read_shards(by_path, "labeled")
    for key, sample in _read_shards(tmp_path / "by-id", "labeled").items():
        assert np.array_equal(decode_depth(sample["depth.npy"]), decode_depth(expected[key]["depth.npy"]))
    assert read_manifest(tmp_path / "by-id")["depth"]["model"] == "depth-anything/tiny-test-hf"


@pytest.fixture
def toy(tmp_path):
    _folder_tree(tmp_path, [(20, 30), (20, 30)])
    return tmp_path


def _build_toy(toy, depth_source=None):
    source = folder("toy", toy / "images", toy / "labels", {}, num_classes=4)
    return build_shards(source, depth_source or NoDepth(), toy / "shards", samples_per_shard=1)


def _assert_nothing_trusted_left(toy):
    shards = toy / "shards"
    assert not (shards / "manifest.json").exists()
    assert not list(shards.glob("*.tmp"))
    assert not (shards / "labeled-000001.tar").exists()


def test_missing_label_for_a_labeled_id(toy):
    (toy / "labels" / "im1.png").unlink()
    lists = {"labeled": _write_list(toy / "l.txt", ["im0", "im1"])}
    with pytest.raises(ShardInputError, match=r"labels/im1\.png: missing label for labeled id im1.*unlabeled list"):
        folder("toy", toy / "images", toy / "labels", lists, num_classes=4)


def test_image_label_size_mismatch(toy):
    _save(np.zeros((21, 30), np.uint8), toy / "labels" / "im1.png")
    with pytest.raises(ShardInputError, match=r"labels/im1\.png: label is 30×21 but its image .*im1\.png is 30×20"):
        _build_toy(toy)
    _assert_nothing_trusted_left(toy)


def test_label_values_out_of_range(toy):
    _save(np.full((20, 30), 9, np.uint8), toy / "labels" / "im1.png")
    with pytest.raises(ShardInputError, match=r"labels/im1\.png: label values \[9\].*--label-map"):
        _build_toy(toy)
    _assert_nothing_trusted_left(toy)


def test_unreadable_image(toy):
    (toy / "images" / "im1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ShardInputError, match=r"images/im1\.png: unreadable image"):
        _build_toy(toy)
    _assert_nothing_trusted_left(toy)


def test_depth_of_the_wrong_size(toy):
    np.save(toy / "depth" / "im1.npy", np.zeros((10, 15), np.float32))
    with pytest.raises(ShardInputError, match=r"depth/im1\.npy: depth must be .* image size 20×30.*recompute"):
        _build_toy(toy, DepthDirectory(toy / "depth"))
    _assert_nothing_trusted_left(toy)


def test_depth_dir_never_unpickles(toy):
    np.save(toy / "depth" / "im1.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        _build_toy(toy, DepthDirectory(toy / "depth"))


def test_label_map_parsing():
    table = parse_label_map(["11:255", "3:1,4:2"])
    assert (table[11], table[3], table[4], table[5]) == (255, 1, 2, 5)
    with pytest.raises(ShardInputError, match="SOURCE:TARGET"):
        parse_label_map(["eleven"])


def test_two_writers_of_one_shard_each_publish_a_whole_file(tmp_path):
    """Two nodes building the same shard on a shared filesystem: each writes a temporary file of its
    own, so the second rename replaces the first file whole instead of failing on a vanished `.tmp`."""
    from depmatch.data.writer import ShardWriter

    first, second = ShardWriter(tmp_path / "labeled-000000.tar"), ShardWriter(tmp_path / "labeled-000000.tar")
    for writer in (first, second):
        writer.write("sample_000000", {"png": b"image bytes", "label.png": b"label bytes"})
    assert first.commit() == second.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["labeled-000000.tar"]
    with tarfile.open(tmp_path / "labeled-000000.tar") as tar:
        assert tar.getnames() == ["sample_000000.png", "sample_000000.label.png"]
