"""data.depth_control: shuffled depth is a derangement within each group read together, the same for the
same seed, resized to the image, and leaves images and labels untouched; random and constant keep the
depth's range."""

import numpy as np
import pytest
import torch

from depmatch.config import ConfigError, load_config
from depmatch.data.codec import DEPTH_FIELD, LABEL_FIELD, decode_depth, encode_depth, encode_png
from depmatch.data.depth_controls import derangement, group_transform, paired_depth
from depmatch.data.loader import build_unlabeled_loader


def raw_sample(index, size=(4, 6)):
    """A shard sample whose depth is filled with its own index, so that a partner can be read off."""
    image = np.full((*size, 3), index, np.uint8)
    return {
        "__key__": f"{index:04d}",
        "png": encode_png(image),
        LABEL_FIELD: encode_png(image[..., 0]),
        DEPTH_FIELD: encode_depth(np.full(size, float(index), np.float32)),
    }


def depth_values(samples):
    return [float(decode_depth(sample[DEPTH_FIELD])[0, 0]) for sample in samples]


def without_depth(sample):
    return {k: v for k, v in sample.items() if k not in (DEPTH_FIELD, "__url__", "__local_path__")}


@pytest.mark.parametrize("count", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point_and_is_a_permutation(count):
    for seed in range(5):
        partner = derangement(count, seed)
        assert sorted(partner.tolist()) == list(range(count)) and (partner != np.arange(count)).all()
    assert derangement(count, 1).tolist() == derangement(count, 1).tolist()


def test_shuffled_depth_pairs_within_the_group_deterministically_and_leaves_images_and_labels():
    raw = [raw_sample(i) for i in range(5)]
    paired = paired_depth(raw, 0)
    partners = depth_values(paired)
    assert sorted(partners) == [0, 1, 2, 3, 4]
    assert all(partner != index for index, partner in enumerate(partners))  # no image keeps its own depth
    assert depth_values(paired_depth(raw, 0)) == partners  # the same seed, the same pairs
    assert depth_values(paired_depth(raw, 1)) != partners
    assert [without_depth(sample) for sample in paired] == [without_depth(sample) for sample in raw]


def test_shuffled_depth_is_resized_to_the_image():
    small, large = paired_depth([raw_sample(0, size=(4, 6)), raw_sample(1, size=(8, 10))], 0)
    assert decode_depth(small[DEPTH_FIELD]).shape == (4, 6) and decode_depth(large[DEPTH_FIELD]).shape == (8, 10)
    assert depth_values([small, large]) == [1.0, 0.0]


def test_random_and_constant_keep_the_images_depth_range():
    depth = np.linspace(2.0, 5.0, 24, dtype=np.float32).reshape(4, 6)
    sample = {**raw_sample(0), DEPTH_FIELD: encode_depth(depth)}
    [constant] = group_transform("constant", 0)([sample], 7)
    assert np.allclose(decode_depth(constant[DEPTH_FIELD]), depth.mean(), atol=1e-2)
    [random] = group_transform("random", 0)([sample], 7)
    values = decode_depth(random[DEPTH_FIELD])
    assert values.shape == depth.shape and 2.0 - 1e-2 <= values.min() and values.max() <= 5.0 + 1e-2
    assert not np.allclose(values, depth, atol=0.1)
    assert depth_values(group_transform("random", 0)([sample], 8)) == depth_values(
        [random]
    )  # per sample, not per group
    assert group_transform("none", 0) is None
    with pytest.raises(ConfigError, match="data.depth_control"):
        load_config(None, ["data.depth_control=swapped"])


def test_a_block_of_one_sample_is_refused_under_the_shuffled_control(small_config):
    small_config.data.depth_control = "shuffled"
    small_config.data.shuffle_buffer = 1
    with pytest.raises(ConfigError, match="shuffled pairs samples within a shuffle block.*raise data.shuffle_buffer"):
        build_unlabeled_loader(small_config, 0, 1)
    # the same rule before step 1, from the manifest alone (each training split; val is not controlled)
    from depmatch.data.preflight import preflight
    from depmatch.data.shards import read_manifest

    manifest = read_manifest(small_config.data.root)
    with pytest.raises(ConfigError, match="the labeled split would give a block of one"):
        preflight(small_config, manifest, world_size=1)
    small_config.data.shuffle_buffer = 2
    preflight(small_config, manifest, world_size=1)
    with pytest.raises(ConfigError, match="block of one"):  # one process per labeled sample: blocks of one
        preflight(small_config, manifest, world_size=sum(s["samples"] for s in manifest["splits"]["labeled"]["shards"]))


def test_the_loader_serves_another_images_depth_under_the_shuffled_control(small_config):
    """Through the real unlabeled loader: the same images and views, every depth another, the same for the same seed."""
    plain = next(iter(build_unlabeled_loader(small_config, 0, 1)))
    small_config.data.depth_control = "shuffled"
    shuffled, again = (next(iter(build_unlabeled_loader(small_config, 0, 1))) for _ in range(2))
    for name, value in plain.items():
        assert torch.equal(shuffled[name], again[name])
        if name != "depth":
            assert torch.equal(value, shuffled[name]), name
    assert all(not torch.equal(a, b) for a, b in zip(plain["depth"], shuffled["depth"]))
