import dataclasses
import json

import numpy as np
import pytest

from depmatch.config import SynthConfig
from depmatch.data import synth
from depmatch.data.synth import (
    BOX_FAR,
    BOX_NEAR,
    GROUND,
    SYNTH_CLASSES,
    WALL,
    ensure_synthetic_shards,
    synthetic_sample,
)

SMALL = SynthConfig(labeled=4, unlabeled=4, val=2, height=48, width=64, seed=1, samples_per_shard=3)


def test_scenes_are_deterministic_from_the_seed():
    first = synthetic_sample(SMALL, "labeled", 2)
    again = synthetic_sample(SMALL, "labeled", 2)
    other_seed = synthetic_sample(dataclasses.replace(SMALL, seed=2), "labeled", 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other_seed[0])
    assert first[0].shape == (48, 64, 3) and first[1].shape == first[2].shape == (48, 64)


def test_look_alike_boxes_are_separated_by_depth():
    config = SynthConfig()
    near, far, colours = [], [], {BOX_NEAR: [], BOX_FAR: []}
    classes_seen = set()
    for index in range(40):
        image, label, depth = synthetic_sample(config, "labeled", index)
        classes_seen |= set(np.unique(label).tolist())
        assert 0 <= depth.min() and depth.max() <= 20
        for class_index, depths in ((BOX_NEAR, near), (BOX_FAR, far)):
            if (label == class_index).any():
                depths.append(depth[label == class_index].mean())
                colours[class_index].append(image[label == class_index].mean(0))
    assert classes_seen == set(range(len(SYNTH_CLASSES)))
    assert min(near) > max(far) + 2  # the two box classes sit at disjoint depths
    # ... but look alike: their mean colours differ far less than their depths do.
    colour_gap = np.abs(np.mean(colours[BOX_NEAR], 0) - np.mean(colours[BOX_FAR], 0)).max()
    assert colour_gap < 25


def test_ground_spans_a_large_depth_range():
    _, label, depth = synthetic_sample(SynthConfig(), "labeled", 0)
    assert np.ptp(depth[label == GROUND]) > 15


def test_easy_walls_change_only_the_wall_pixels_to_purple():
    walls_seen = 0
    for index in range(6):
        image, label, depth = synthetic_sample(SMALL, "labeled", index)
        easy_image, easy_label, easy_depth = synthetic_sample(
            dataclasses.replace(SMALL, easy_walls=True), "labeled", index
        )
        assert np.array_equal(label, easy_label) and np.array_equal(depth, easy_depth)
        wall = label == WALL
        assert np.array_equal(image[~wall], easy_image[~wall])
        if wall.any():
            walls_seen += 1
            # purple: red and blue well above green, which no other class has (the sky is bluer
            # than red, the ground and the boxes are not bluer than green)
            red, green, blue = np.median(easy_image[wall].astype(float), axis=0)
            assert red > green + 20 and blue > green + 20
            assert not (image[wall][:, 2].astype(float) > image[wall][:, 1] + 20).any()  # brown before
    assert walls_seen >= 3


@pytest.mark.parametrize("mode", ["constant", "random"])
def test_depth_controls_keep_images_and_labels(mode):
    true_image, true_label, true_depth = synthetic_sample(SMALL, "val", 1)
    image, label, depth = synthetic_sample(dataclasses.replace(SMALL, depth_mode=mode), "val", 1)
    assert np.array_equal(image, true_image) and np.array_equal(label, true_label)
    if mode == "constant":
        assert np.all(depth == depth.flat[0])
    else:
        assert 0 <= depth.min() and depth.max() <= 20 and np.ptp(depth) > 1
        class_means = [depth[label == c].mean() for c in np.unique(label)]
        true_means = [true_depth[label == c].mean() for c in np.unique(label)]
        assert not np.allclose(class_means, true_means, atol=0.5)


def test_ensure_builds_once_and_rebuilds_on_config_change(tmp_path):
    root = ensure_synthetic_shards(str(tmp_path), SMALL, 6)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["synth"] == dataclasses.asdict(SMALL)
    assert {split: entry["total"] for split, entry in manifest["splits"].items()} == {
        "labeled": 4,
        "unlabeled": 4,
        "val": 2,
    }
    assert [shard["samples"] for shard in manifest["splits"]["labeled"]["shards"]] == [3, 1]
    assert manifest["num_classes"] == 6 and len(manifest["palette"]) == 6
    stamp = (root / "labeled-000000.tar").stat().st_mtime_ns
    ensure_synthetic_shards(str(tmp_path), SMALL, 6)
    assert (root / "labeled-000000.tar").stat().st_mtime_ns == stamp
    changed = dataclasses.replace(SMALL, depth_mode="constant")
    ensure_synthetic_shards(str(tmp_path), changed, 6)
    assert json.loads((root / "manifest.json").read_text())["synth"]["depth_mode"] == "constant"


def test_shards_of_another_scene_version_are_rebuilt(tmp_path):
    root = ensure_synthetic_shards(str(tmp_path), SMALL, 6)
    assert json.loads((root / "manifest.json").read_text())["scene_version"] == 2  # the default
    stamp = (root / "labeled-000000.tar").stat().st_mtime_ns
    ensure_synthetic_shards(str(tmp_path), dataclasses.replace(SMALL, scene_version=3), 6)
    assert json.loads((root / "manifest.json").read_text())["scene_version"] == 3
    assert (root / "labeled-000000.tar").stat().st_mtime_ns != stamp


def test_shards_drawn_by_other_code_are_rebuilt(tmp_path, monkeypatch):
    """An edit of the drawing that kept the settings and the scene version must not reuse the shards."""
    root = ensure_synthetic_shards(str(tmp_path), SMALL, 6)
    before = json.loads((root / "manifest.json").read_text())["scene_fingerprint"]
    stamp = (root / "labeled-000000.tar").stat().st_mtime_ns
    drawn_before = synth._sky_and_ground

    def brighter_sky_and_ground(canvas, *args, **kwargs):
        drawn_before(canvas, *args, **kwargs)
        canvas.image += 10.0

    monkeypatch.setattr(synth, "_sky_and_ground", brighter_sky_and_ground)
    ensure_synthetic_shards(str(tmp_path), SMALL, 6)
    after = json.loads((root / "manifest.json").read_text())["scene_fingerprint"]
    assert (root / "labeled-000000.tar").stat().st_mtime_ns != stamp
    assert after != before and after == synth.scene_fingerprint(SMALL)
    monkeypatch.undo()
    assert synth.scene_fingerprint(SMALL) == before


def test_ensure_rejects_a_class_count_it_cannot_make(tmp_path):
    with pytest.raises(ValueError, match="num_classes: 6"):
        ensure_synthetic_shards(str(tmp_path), SMALL, 21)
    with pytest.raises(ValueError, match="depth_mode"):
        ensure_synthetic_shards(str(tmp_path), dataclasses.replace(SMALL, depth_mode="flat"), 6)
    with pytest.raises(ValueError, match="data.synth.scene_version must be one of 2, 3, 4, got 1"):
        ensure_synthetic_shards(str(tmp_path), dataclasses.replace(SMALL, scene_version=1), 6)


def test_scene_version_2_is_drawn_as_before_version_3():
    """The scenes of the earlier presets stay reproducible: a digest of three default scenes, taken
    from the code before scene version 3 existed (commit a6663eb)."""
    import hashlib

    digest = hashlib.sha256()
    for index in range(3):
        for array in synthetic_sample(SynthConfig(), "labeled", index):
            digest.update(array.tobytes())
    assert digest.hexdigest()[:16] == "e92f723709c2ebbf"


@pytest.mark.parametrize(
    "version, expected",
    [
        (3, "5f0bfacd6942b933"),  # taken before version 4 existed (3af77a8): the cpu_v3 records
        (4, "f144d9513ed5565b"),  # the scenes of the cpu_v4 records (fe9fdf5)
    ],
)
def test_scene_versions_3_and_4_are_drawn_as_their_records_were(version, expected):
    import hashlib

    digest = hashlib.sha256()
    for index in range(3):
        for array in synthetic_sample(SynthConfig(scene_version=version), "labeled", index):
            digest.update(array.tobytes())
    assert digest.hexdigest()[:16] == expected


def test_scene_version_4_is_version_3_in_other_colours():
    """Version 4 changes how the scene looks, not what it holds: the same labels and depth pixel for pixel."""
    for index in range(10):
        old = synthetic_sample(SynthConfig(scene_version=3, easy_walls=True), "unlabeled", index)
        new = synthetic_sample(SynthConfig(scene_version=4, easy_walls=True), "unlabeled", index)
        assert np.array_equal(old[1], new[1]) and np.array_equal(old[2], new[2])
        assert not np.array_equal(old[0], new[0])


def box_colours_seen(scene_version: int) -> set[int]:
    """Which of the version's box colours the boxes of the ablation's two labeled scenes have, by
    the nearest chromaticity of each box's mean colour (haze and shading change brightness more)."""
    from depmatch.data.scene_stats import components
    from depmatch.data.synth import BOX_COLOURS, DISTINCT_BOX_COLOURS

    palette = np.array(DISTINCT_BOX_COLOURS if scene_version == 4 else BOX_COLOURS, float)
    palette /= palette.sum(1, keepdims=True)
    seen = set()
    for index in range(2):
        image, label, _ = synthetic_sample(
            SynthConfig(height=96, width=128, easy_walls=True, seed=4, scene_version=scene_version), "labeled", index
        )
        for box_class in (BOX_NEAR, BOX_FAR):
            pieces = components(label == box_class)
            for piece in np.unique(pieces[pieces >= 0]):
                mean = image[pieces == piece].astype(float).mean(0)
                seen.add(int(np.argmin(((palette - mean / mean.sum()) ** 2).sum(1))))
    return seen


def test_scene_version_4_shows_every_box_colour_in_two_labeled_scenes():
    """Version 3 drew each box's colour alone, and the cpu_v3 preset's two labeled scenes hold boxes
    of one colour; its 2-label models took the others for ground. Version 4's pair has two colours."""
    assert len(box_colours_seen(3)) == 1
    assert box_colours_seen(4) == {0, 1, 2}


# ---------------------------------------------------------------- the scene checker


def test_components_and_best_threshold_by_hand():
    from depmatch.data.scene_stats import best_threshold_accuracy, components

    mask = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]], bool)
    pieces = components(mask)
    assert len(np.unique(pieces[mask])) == 3 and (pieces[~mask] == -1).all()
    assert pieces[0, 0] == pieces[1, 1] and pieces[0, 3] == pieces[1, 3] and pieces[2, 0] != pieces[0, 0]
    # 0 0 1 | 0 1 1 sorted by value: the best cut leaves one point wrong of six
    assert best_threshold_accuracy([1, 2, 3, 4, 5, 6], [0, 0, 1, 0, 1, 1]) == pytest.approx(100 * 5 / 6)
    assert best_threshold_accuracy([1, 2, 3, 4], [1, 1, 0, 0]) == 100.0  # either direction
    # equal values cannot be split: each value holds one point of each class
    assert best_threshold_accuracy([1, 1, 2, 2], [0, 1, 0, 1]) == 50.0


def test_both_boxes_on_grid_samples_like_the_loss():
    from depmatch.data.scene_stats import both_boxes_on_grid

    label = np.zeros((28, 28), np.uint8)  # 2×2 grid: nearest picks rows and columns 0 and 14
    label[14, 0] = BOX_NEAR
    label[0, 13] = BOX_FAR  # column 13 is not sampled
    assert not both_boxes_on_grid(label, 28)
    label[0, 14] = BOX_FAR
    assert both_boxes_on_grid(label, 28)


def test_scene_version_3_removes_the_position_cue_and_puts_both_boxes_in_most_crops():
    """On the ablation's scenes (seed 4, 96×128, easy walls): version 2's bottom row tells the boxes
    apart (the issue measured 96.5 %), version 3's does not, and most of its crops hold both boxes."""
    from depmatch.data.scene_stats import scene_statistics

    settings = SynthConfig(height=96, width=128, easy_walls=True, seed=4, unlabeled=80)
    old = scene_statistics(settings, "unlabeled", 80, 98, (0.5, 2.0))
    new = scene_statistics(dataclasses.replace(settings, scene_version=3), "unlabeled", 80, 98, (0.5, 2.0))
    assert old["position_accuracy"] > 90 and old["both_on_grid"] < 40
    assert new["position_accuracy"] <= 60 and new["ground_accuracy"] <= 60 and new["both_on_grid"] >= 60
    assert 40 < new["near_fraction"] < 60


def test_scene_version_3_stripes_are_finer_on_near_boxes():
    """Depth's one RGB correlate: the stripe period is STRIPE_PERIOD / disparity, so a near box's
    pixels change more from one column to the next than a far box's."""
    near, far = [], []
    config = SynthConfig(scene_version=3, height=96, width=128)
    for index in range(30):
        image, label, _ = synthetic_sample(config, "labeled", index)
        grey = image.astype(float).mean(2)
        step = np.abs(np.diff(grey, axis=1))
        inside = label[:, 1:] == label[:, :-1]
        near += step[inside & (label[:, 1:] == BOX_NEAR)].tolist()
        far += step[inside & (label[:, 1:] == BOX_FAR)].tolist()
    assert np.mean(near) > np.mean(far)
