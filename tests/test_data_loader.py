import io
import json
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch

from depmatch.data.loader import build_labeled_loader, build_unlabeled_loader, build_val_loader
from depmatch.data.photometric import NUM_PARAMS
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.data.stream import SKIPPED_KEY, CorruptDataError, CorruptSamples, batches_before


def _batches(loader, count):
    return list(islice(iter(loader), count))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_labeled_batch_contract(small_config):
    batch = _batches(build_labeled_loader(small_config, 0, 1), 1)[0]
    assert batch["image"].shape == (2, 3, 24, 24) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (2, 24, 24) and batch["label"].dtype == torch.long
    assert batch["depth"].shape == (2, 24, 24) and batch["depth"].dtype == torch.float32
    labels = batch["label"].unique().tolist()
    assert set(labels) <= set(range(6)) | {255}
    assert 0 <= batch["depth"].min() and batch["depth"].max() <= 20


def test_unlabeled_batch_contract(small_config):
    small_config.train.cutmix_prob = 1.0
    batch = _batches(build_unlabeled_loader(small_config, 0, 1), 1)[0]
    assert batch["image_weak"].shape == (2, 3, 24, 24) and batch["image_weak"].dtype == torch.uint8
    for name in ("strong_params1", "strong_params2"):
        assert batch[name].shape == (2, NUM_PARAMS) and batch[name].dtype == torch.float32
    for name in ("ignore", "cutmix_box1", "cutmix_box2"):
        assert batch[name].shape == (2, 24, 24) and batch[name].dtype == torch.long
    assert set(batch["ignore"].unique().tolist()) <= {0, 255}
    assert set(batch["cutmix_box1"].unique().tolist()) == {0, 1}  # p = 1: always a box
    assert not torch.equal(batch["cutmix_box1"], batch["cutmix_box2"])
    assert not torch.equal(batch["strong_params1"], batch["strong_params2"])
    # Padding (ignore 255) has depth 0.
    assert (batch["depth"][batch["ignore"] == 255] == 0).all()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("build", [build_labeled_loader, build_unlabeled_loader])
def test_exact_resume(small_config, workers, build):
    small_config.data.workers = workers
    fresh = _batches(build(small_config, 1, 2), 6)
    resumed = _batches(build(small_config, 1, 2, start_step=3), 3)
    _assert_same(fresh[3:], resumed)
    _assert_same(fresh, _batches(build(small_config, 1, 2), 6))  # a pure function of the seed


def test_ranks_and_seeds_give_different_streams(small_config):
    rank0 = _batches(build_labeled_loader(small_config, 0, 2), 1)[0]
    rank1 = _batches(build_labeled_loader(small_config, 1, 2), 1)[0]
    assert not torch.equal(rank0["image"], rank1["image"])
    small_config.train.seed = 7
    assert not torch.equal(rank0["image"], _batches(build_labeled_loader(small_config, 0, 2), 1)[0]["image"])


@pytest.mark.parametrize(
    "step,worker,workers,expected", [(0, 0, 1, 0), (5, 0, 1, 5), (3, 0, 2, 2), (3, 1, 2, 1), (1, 1, 2, 0)]
)
def test_batches_before(step, worker, workers, expected):
    assert batches_before(step, worker, workers) == expected


def test_val_split_over_two_ranks_and_two_workers_covers_each_sample_once(small_config):
    small_config.data.workers = 2
    keys_per_rank = []
    for rank in range(2):
        batches = list(build_val_loader(small_config, rank, 2))
        assert all(batch["image"].shape[:2] == (1, 3) and batch["image"].shape[2:] == (32, 40) for batch in batches)
        keys_per_rank.append([batch["key"][0] for batch in batches])
    every_key = keys_per_rank[0] + keys_per_rank[1]
    assert sorted(every_key) == [f"val_{index:06d}" for index in range(8)]
    assert len(keys_per_rank[0]) == len(keys_per_rank[1]) == 4


def test_val_labels_are_the_stored_labels(small_config):
    from depmatch.data.synth import synthetic_sample

    batch = next(iter(build_val_loader(small_config, 0, 1)))
    index = int(batch["key"][0].split("_")[1])
    _, label, _ = synthetic_sample(small_config.data.synth, "val", index)
    assert torch.equal(batch["label"][0], torch.from_numpy(label).long())


def test_fewer_val_samples_than_readers_is_an_error(small_config):
    small_config.data.workers = 3
    with pytest.raises(ValueError, match="val split has 8 sample.*ranks × workers = 9 readers"):
        build_val_loader(small_config, 0, 3)


def test_one_val_shard_is_shared_by_readers(small_config, tmp_path):
    """Fewer shards than readers: readers split a shard, each val sample still read once."""
    manifest = read_manifest(small_config.data.root)
    first = manifest["splits"]["val"]["shards"][0]
    manifest["splits"]["val"] = {"shards": [first], "total": first["samples"]}
    (tmp_path / first["name"]).write_bytes(open(f"{small_config.data.root}/{first['name']}", "rb").read())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    small_config.data.root = str(tmp_path)
    keys = [batch["key"][0] for rank in range(2) for batch in build_val_loader(small_config, rank, 2)]
    assert keys == ["val_000000", "val_000001"]


def _corrupt_first_sample(shard, tmp_path):
    """A copy of the shard whose first sample's image is garbage; returns the corrupted key."""
    members = []
    with tarfile.open(shard) as tar:
        for member in tar:
            members.append((member, tar.extractfile(member).read()))
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(tmp_path / shard.split("/")[-1], "w") as tar:
        for member, data in members:
            if member.name == f"{bad_key}.png":
                data = b"not an image" + data[:20]
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return bad_key


@pytest.fixture
def dataset_with_a_corrupt_val_sample(small_config, tmp_path):
    manifest = read_manifest(small_config.data.root)
    for url in shard_urls(small_config.data.root, manifest, "val"):
        (tmp_path / url.split("/")[-1]).write_bytes(open(url, "rb").read())
    (tmp_path / "manifest.json").write_text(open(f"{small_config.data.root}/manifest.json").read())
    bad_key = _corrupt_first_sample(shard_urls(small_config.data.root, manifest, "val")[0], tmp_path)
    small_config.data.root = str(tmp_path)
    return small_config, bad_key


def test_corrupt_sample_is_skipped_and_logged(dataset_with_a_corrupt_val_sample, caplog):
    cfg, bad_key = dataset_with_a_corrupt_val_sample
    keys = [batch["key"][0] for batch in build_val_loader(cfg, 0, 1)]
    assert len(keys) == 7 and bad_key not in keys
    assert any(bad_key in record.getMessage() for record in caplog.records)


def test_skipped_samples_are_counted_in_their_batch(dataset_with_a_corrupt_val_sample):
    cfg, _ = dataset_with_a_corrupt_val_sample
    budget = CorruptSamples(max_fraction=0.5)
    for batch in build_val_loader(cfg, 0, 1):
        assert SKIPPED_KEY not in budget.add(batch)
    assert budget.totals(lambda counts: counts) == {"samples_read": 8, "samples_skipped": 1}


def test_too_many_corrupt_samples_in_the_job_stop_the_run():
    """The budget is the job's: the counts of every rank are summed before the fraction is checked."""
    rank_budgets = [CorruptSamples(max_fraction=0.05) for _ in range(2)]
    for rank, budget in enumerate(rank_budgets):
        for _ in range(25):
            budget.add({"image": torch.zeros(2, 1), SKIPPED_KEY: torch.tensor(rank)})  # 50 read, 25 skipped on rank 1

    # Rank 0 alone saw nothing bad, but the job has 25 corrupt of 125 (more than 5 %): both ranks stop.
    for budget, other in zip(rank_budgets, rank_budgets[::-1]):
        with pytest.raises(CorruptDataError, match="25 of 125 samples were corrupt"):
            budget.totals(lambda counts: counts + torch.tensor([other.read, other.skipped]))
    small = CorruptSamples(max_fraction=0.05)
    small.add({"image": torch.zeros(2, 1), SKIPPED_KEY: torch.tensor(5)})
    assert small.totals(lambda counts: counts) == {"samples_read": 7, "samples_skipped": 5}  # under 100: no verdict


def test_no_depth_shards(tmp_path, small_config):
    from PIL import Image

    from depmatch.data.build import build_shards
    from depmatch.data.depth import NoDepth
    from depmatch.data.layouts import folder

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for index in range(2):
        Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(tmp_path / "images" / f"im{index}.png")
    Image.fromarray(np.ones((20, 30), np.uint8)).save(tmp_path / "labels" / "im0.png")
    source = folder("tiny", tmp_path / "images", tmp_path / "labels", {}, num_classes=2)
    small_config.data.root = str(build_shards(source, NoDepth(), tmp_path / "shards"))
    with pytest.raises(ValueError, match="require_depth"):
        build_unlabeled_loader(small_config, 0, 1)
    small_config.data.require_depth = False
    unlabeled = _batches(build_unlabeled_loader(small_config, 0, 1), 1)[0]
    labeled = _batches(build_labeled_loader(small_config, 0, 1), 1)[0]
    assert (unlabeled["depth"] == 0).all() and (labeled["depth"] == 0).all()
    assert set(labeled["label"].unique().tolist()) <= {1, 255}
