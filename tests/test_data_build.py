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
from depmatch.errors import UserError
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
    lists = {
        "labeled": _write_list(tmp_path / "l.txt", ["im0", "im1"]),
        "val": _write_list(tmp_path / "v.txt", ["im2"]),
    }
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
        _save(
            rng.choice([0, 5, 20, 255], size=(24, 32)).astype(np.uint8),
            tmp_path / "SegmentationClassAug" / f"{stem}.png",
        )
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
    assert np.array_equal(
        decode_label(labeled["label.png"]), np.array(Image.open(tmp_path / "SegmentationClassAug" / "2007_000032.png"))
    )
    unlabeled = _read_shards(out, "unlabeled")
    assert sorted(unlabeled) == ids[1:] and all(
        "label.png" not in s and "depth.npy" not in s for s in unlabeled.values()
    )
    assert list(_read_shards(out, "val")) == ["2008_000123"]


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    label_ids = np.array([[7, 8, 26, 0], [33, 1, 24, 23]], np.uint8).repeat(4, 0).repeat(4, 1)
    for subset, stem in (("train", "aachen_000000_000019"), ("val", "frankfurt_000000_000294")):
        city = stem.split("_")[0]
        _save(np.zeros((8, 16, 3), np.uint8), tmp_path / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png")
        _save(label_ids, tmp_path / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png")
    lists = {
        "labeled": _write_list(tmp_path / "labeled.txt", ["aachen_000000_000019"]),
        "val": _write_list(
            tmp_path / "val.txt",
            [
                "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png "
                "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
            ],
        ),
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
        "source": "model",
        "model": "depth-anything/tiny-test-hf",
        "commit": snapshot.name,
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
    by_path = build_shards(
        folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4),
        DepthAnythingModel(str(tiny_depth_anything)),
        tmp_path / "by-path",
    )
    command = [
        sys.executable,
        "-m",
        "depmatch",
        "shards",
        "build",
        "folder",
        "--source",
        str(tmp_path),
        "--num-classes",
        "4",
        "--out",
        str(tmp_path / "by-id"),
        "--depth-model",
        "depth-anything/tiny-test-hf",
    ]
    environment = {name: value for name, value in os.environ.items() if name != "HF_HUB_CACHE"}  # HF_HOME/hub
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**environment, "OMP_NUM_THREADS": "1"}
    )
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


# ------------------------------------------------------------------ builds split into tasks, sample order


def test_the_task_comes_from_the_flags_then_slurm_then_torchrun():
    from depmatch.data.build import task_from_environment
    from depmatch.data.writer import BuildTask

    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert task_from_environment(1, 5, torchrun) == BuildTask(1, 5)
    assert task_from_environment(None, None, torchrun) == BuildTask(3, 4)
    assert task_from_environment(None, None, {}) == BuildTask(0, 1)
    # --array=1-8: ids 1..8; --array=0-30:10: ids 0, 10, 20, 30
    assert task_from_environment(
        None, None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8", **torchrun}
    ) == BuildTask(0, 8)
    assert task_from_environment(
        None,
        None,
        {
            "SLURM_ARRAY_TASK_ID": "20",
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_STEP": "10",
            "SLURM_ARRAY_TASK_COUNT": "4",
        },
    ) == BuildTask(2, 4)
    with pytest.raises(ShardInputError, match="not one of 3 evenly spaced ids from 1; submit --array=0-2"):
        task_from_environment(
            None, None, {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
        )
    with pytest.raises(ShardInputError, match="--task-index and --task-count go together"):
        task_from_environment(2, None, {})
    with pytest.raises(UserError, match="task index 4 is not in 0..3"):
        task_from_environment(4, 4, {})


def test_tasks_write_contiguous_ranges_that_cover_every_shard_once():
    from depmatch.data.writer import BuildTask

    plans = list(range(10))
    ranges = [BuildTask(index, 4).shards(plans) for index in range(4)]
    assert ranges == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [BuildTask(index, 16).shards(plans) for index in (2, 3)] == [
        [],
        [1],
    ]  # more tasks than shards: some write none


def _build_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "depmatch",
        "shards",
        "build",
        "folder",
        "--source",
        str(source),
        "--num-classes",
        "4",
        "--name",
        "toy",
        "--depth-dir",
        str(source / "depth"),
        "--samples-per-shard",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_a_build_in_two_processes_gives_the_manifest_of_a_single_process_build(tmp_path):
    from depmatch.data.writer import TasksUnfinishedError, finalize

    _folder_tree(tmp_path, [(20, 30)] * 7)
    _write_list(tmp_path / "val.txt", ["im5", "im6"])
    _write_list(tmp_path / "labeled.txt", ["im0", "im1", "im2", "im3", "im4"])
    lists = ("--labeled-list", str(tmp_path / "labeled.txt"), "--val-list", str(tmp_path / "val.txt"))
    source = folder(
        "toy",
        tmp_path / "images",
        tmp_path / "labels",
        {"labeled": tmp_path / "labeled.txt", "val": tmp_path / "val.txt"},
        num_classes=4,
    )
    single = build_shards(source, DepthDirectory(tmp_path / "depth"), tmp_path / "single", samples_per_shard=2)
    split = tmp_path / "split"
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "5",
        "SLURM_ARRAY_TASK_COUNT": "2",
    }  # task 0 of 2 from SLURM's variables
    first = subprocess.run(
        _build_command(tmp_path, split, *lists), env=environment, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "task 0 of 2: shards written" in first.stdout
    assert not (split / "manifest.json").exists()
    with pytest.raises(TasksUnfinishedError, match=r"task\(s\) 1 of 2 have not finished"):
        finalize(split)
    second = subprocess.run(
        _build_command(tmp_path, split, *lists, "--task-index", "1", "--task-count", "2"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"wrote {split}/manifest.json" in second.stdout  # the last task to finish writes it
    expected = json.loads((single / "manifest.json").read_text())
    assert json.loads((split / "manifest.json").read_text()) == expected
    assert [len(expected["splits"][name]["shards"]) for name in ("labeled", "val")] == [3, 1]
    for shard in expected["splits"]["labeled"]["shards"]:
        assert (split / shard["name"]).read_bytes() == (single / shard["name"]).read_bytes()


def test_finalize_reads_no_shard_and_checks_sizes(tmp_path, monkeypatch):
    from depmatch.data import writer

    _folder_tree(tmp_path, [(20, 30)] * 4)
    source = folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4)
    out = tmp_path / "shards"
    for index in range(2):
        build_shards(source, NoDepth(), out, samples_per_shard=1, task=writer.BuildTask(index, 2))
    expected = (out / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    monkeypatch.setattr(writer, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    assert writer.finalize(out) == out / "manifest.json"
    assert (out / "manifest.json").read_text() == expected
    shard = json.loads(expected)["splits"]["labeled"]["shards"][1]
    assert shard["size"] == (out / shard["name"]).stat().st_size
    (out / shard["name"]).write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError, match=f"{shard['name']} is missing or changed after it was written"):
        writer.finalize(out)


def test_a_rerun_removes_its_own_stale_temporaries_only(tmp_path):
    from depmatch.data.writer import BuildTask

    _folder_tree(tmp_path, [(20, 30)] * 4)
    source = folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4)
    out = tmp_path / "shards"
    build_shards(source, NoDepth(), out, samples_per_shard=1, task=BuildTask(0, 2))
    mine = out / "labeled-000001.tar.0123abcd.tmp"
    record = out / ".build" / "labeled-000000.tar.json.4567.tmp"
    task_record = out / ".build" / "task-0-of-2.json.89ab.tmp"
    theirs = out / "labeled-000002.tar.89ef.tmp"  # task 1's, which may be writing it now
    for stale in (mine, record, task_record, theirs):
        stale.write_bytes(b"half a file")
    build_shards(source, NoDepth(), out, samples_per_shard=1, task=BuildTask(0, 2))
    assert not mine.exists() and not record.exists() and not task_record.exists() and theirs.exists()


def test_training_splits_are_written_in_a_seeded_random_order(tmp_path):
    from depmatch.data.build import shuffled_splits

    count = 40
    _folder_tree(tmp_path, [(8, 8)] * count)
    listed = [f"im{index}" for index in range(count)]
    lists = {
        "labeled": _write_list(tmp_path / "l.txt", listed[:30]),
        "val": _write_list(tmp_path / "v.txt", listed[30:]),
    }
    source = folder("toy", tmp_path / "images", tmp_path / "labels", lists, num_classes=4)
    out = build_shards(source, NoDepth(), tmp_path / "shards", samples_per_shard=10, shuffle_seed=3)
    manifest = read_manifest(out)
    assert manifest["shuffle_seed"] == 3
    written = [
        key
        for shard in manifest["splits"]["labeled"]["shards"]
        for key in (sample["__key__"] for sample in wds.WebDataset(str(out / shard["name"]), shardshuffle=False))
    ]
    assert sorted(written) == sorted(listed[:30]) and written != listed[:30]
    assert written == [item.key for item in shuffled_splits(source.splits, 3)["labeled"]]
    assert written != [item.key for item in shuffled_splits(source.splits, 4)["labeled"]]
    # every shard of 10 mixes the list: no shard holds a run of neighbouring ids
    assert all(
        max(map(listed.index, written[i : i + 10])) - min(map(listed.index, written[i : i + 10])) > 10
        for i in range(0, 30, 10)
    )
    assert list(_read_shards(out, "val")) == listed[30:]  # evaluation splits keep list order


def test_the_depth_model_runs_on_the_process_own_gpu():
    from depmatch.data.depth import depth_device

    assert depth_device(None, 0, {"LOCAL_RANK": "3"}) == torch.device("cpu")
    assert depth_device(None, 4, {}) == torch.device("cuda:0")
    assert depth_device(None, 4, {"LOCAL_RANK": "3", "SLURM_LOCALID": "1"}) == torch.device("cuda:3")
    assert depth_device(None, 4, {"SLURM_LOCALID": "1"}) == torch.device("cuda:1")
    assert depth_device(None, 4, {"LOCAL_RANK": "6"}) == torch.device("cuda:2")
    assert depth_device(None, 1, {"SLURM_LOCALID": "5"}) == torch.device("cuda:0")  # a task bound to one GPU
    assert depth_device("cuda:7", 2, {"LOCAL_RANK": "1"}) == torch.device("cuda:7")
    assert depth_device("cpu", 8, {}) == torch.device("cpu")
    with pytest.raises(ShardInputError, match="--depth-device 'gpu0' is not a device"):
        depth_device("gpu0", 1, {})


def test_labeled_draws_a_seeded_subset_of_the_pool_and_makes_the_rest_unlabeled(tmp_path):
    from depmatch.data.layouts import draw_labeled, labeled_count

    assert [labeled_count(amount, 367) for amount in ("1/8", "0.125", "46", "1/1")] == [46, 46, 46, 367]
    assert labeled_count("1/16", 2975) == 186 and labeled_count("1/8", 10582) == 1323  # UniMatch's sizes
    for wrong in ("0", "368", "3/2", "1/0", "half", "-1"):
        with pytest.raises(ShardInputError, match=f"--labeled '{re.escape(wrong)}': expected a count 1..367"):
            labeled_count(wrong, 367)

    _folder_tree(tmp_path, [(8, 8)] * 17)
    (tmp_path / "labels" / "im16.png").unlink()  # one image without a label: unlabeled from the start
    source = folder("toy", tmp_path / "images", tmp_path / "labels", {}, num_classes=4)
    drawn = draw_labeled(source, "1/4", seed=0)
    labeled, unlabeled = ([item.key for item in drawn.splits[split]] for split in ("labeled", "unlabeled"))
    assert len(labeled) == 4 and drawn.labeled_draw == {"amount": "1/4", "seed": 0, "pool": 16, "ids": labeled}
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == sorted(f"im{index}" for index in range(17))
    assert all(item.label is None for item in drawn.splits["unlabeled"])
    assert draw_labeled(source, "1/4", seed=0).labeled_draw["ids"] == labeled
    assert draw_labeled(source, "1/4", seed=1).labeled_draw["ids"] != labeled

    out = build_shards(drawn, NoDepth(), tmp_path / "shards", samples_per_shard=4)
    manifest = read_manifest(out)
    assert manifest["labeled_draw"]["ids"] == labeled
    assert sorted(_read_shards(out, "labeled")) == sorted(labeled) and len(_read_shards(out, "unlabeled")) == 13


def test_bench_shard_mix_counts_batches_of_one_shard_and_of_list_neighbours():
    from conftest import load_tool

    from depmatch.data.build import shuffled_splits

    bench = load_tool("bench_shard_mix", folder="benchmarks")
    listed = list(range(64))
    # buffer 1 passes samples through in shard order, and 4 divides 8: every batch is one shard's
    drawn = bench.replacement_batches(bench.shards_of(listed, 8), 8, buffer=1, batch=4)
    assert bench.shares(drawn, 200) == (1.0, 1.0)
    # one epoch reader with a buffer of the whole split shuffles all 64 ids at once: a batch of one
    # shard of 8 is rare (8 · C(8, 4) / C(64, 4) = 0.09 %)
    assert bench.shares(bench.epoch_batches(bench.shards_of(listed, 8), 8, buffer=64, batch=4, readers=1), 16)[0] < 0.1
    # a shard of the shuffled order holds ids from all over the list: 4 ids of one run of 32 neighbours
    # among 256 are as rare as in a random batch (8 · C(32, 4) / C(256, 4) = 0.16 %)
    mixed = bench.shards_of(shuffled_splits({"labeled": list(range(256))}, 0)["labeled"], 32)
    assert bench.shares(bench.replacement_batches(mixed, 32, buffer=1, batch=4), 200)[1] < 0.05
    assert bench.shares(bench.epoch_batches(mixed, 32, buffer=32, batch=4, readers=2), 64)[1] < 0.05
