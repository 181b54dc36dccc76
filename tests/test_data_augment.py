import numpy as np
import pytest

from depmatch.data.augment import cutmix_box, weak_augment


def _position_encoded(height=120, width=160):
    """Image R = column, G = row; depth = column; label = row band: every map says where a pixel came from."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([columns / (width - 1) * 255, rows / (height - 1) * 255, np.full_like(rows, 128)], -1)
    depth = columns / (width - 1) * 20.0
    label = (rows * 6 // height).astype(np.uint8)
    return image.round().astype(np.uint8), label, depth


@pytest.mark.parametrize("seed", range(12))
def test_weak_augment_keeps_image_label_and_depth_aligned(seed):
    image, label, depth = _position_encoded()
    out_image, out_label, out_depth = weak_augment(image, label, depth, 96, (0.5, 2.0), np.random.default_rng(seed))
    assert out_image.shape == (96, 96, 3) and out_label.shape == out_depth.shape == (96, 96)
    assert out_image.dtype == np.uint8 and out_label.dtype == np.uint8 and out_depth.dtype == np.float32
    valid = out_label != 255
    # Horizontal: depth and red both encode the source column (flip and crop must move both).
    assert np.abs(out_depth[valid] / 20.0 * 255 - out_image[..., 0][valid]).max() <= 4
    # Vertical: the label band must match the row that green encodes (nearest vs bilinear: one band edge off).
    row_from_green = out_image[..., 1][valid].astype(np.float32) / 255 * 119
    assert np.abs(out_label[valid] - row_from_green * 6 / 120).max() < 1.2
    # Padding: image 0, label 255, depth 0.
    assert (out_depth[~valid] == 0).all() and (out_image[~valid] == 0).all()


def test_weak_augment_is_a_function_of_the_generator():
    image, label, depth = _position_encoded()
    first = weak_augment(image, label, depth, 64, (0.5, 2.0), np.random.default_rng(5))
    second = weak_augment(image, label, depth, 64, (0.5, 2.0), np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_small_image_is_padded_bottom_right():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.full((20, 30), 3, np.uint8)
    depth = np.full((20, 30), 7.0, np.float32)
    out_image, out_label, out_depth = weak_augment(image, label, depth, 64, (1.0, 1.0), np.random.default_rng(0))
    assert (out_label == 3).sum() == 600 and (out_label == 255).sum() == 64 * 64 - 600
    assert np.allclose(out_depth[out_label == 3], 7.0) and (out_depth[out_label == 255] == 0).all()
    assert (out_image[out_label == 3] == 200).all()


def test_label_values_survive_resizing_exactly():
    rng = np.random.default_rng(1)
    label = rng.choice([0, 4, 17, 255], size=(50, 70)).astype(np.uint8)
    image = np.zeros((50, 70, 3), np.uint8)
    _, out_label, _ = weak_augment(image, label, np.zeros((50, 70), np.float32), 40, (0.5, 2.0), rng)
    assert set(np.unique(out_label)) <= {0, 4, 17, 255}


def test_cutmix_box_area_and_shape():
    size = 100
    assert not cutmix_box(size, 0.0, np.random.default_rng(0)).any()
    for seed in range(50):
        box = cutmix_box(size, 1.0, np.random.default_rng(seed))
        rows, columns = np.nonzero(box)
        height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
        assert box.sum() == height * width  # one solid rectangle
        assert 0.015 * size * size <= box.sum() <= 0.4 * size * size
        assert 0.3 * 0.8 <= height / width <= 1 / 0.3 * 1.25
    drawn = [cutmix_box(size, 0.5, np.random.default_rng(seed)).any() for seed in range(400)]
    assert 0.4 < np.mean(drawn) < 0.6
