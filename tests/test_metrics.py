import math

import pytest
import torch

from depmatch.metrics import confusion_matrix, miou, miou_from_confusion

NUM_CLASSES = 5
IGNORE = 255


def loop_confusion(pred, target, num_classes, ignore_index=IGNORE):
    counts = [[0] * num_classes for _ in range(num_classes)]
    for predicted, true in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if true != ignore_index:
            counts[true][predicted] += 1
    return counts


def loop_iou(counts):
    """Per-class IoU in percent, None where the class is in neither prediction nor target."""
    num_classes = len(counts)
    ious = []
    for cls in range(num_classes):
        true_positive = counts[cls][cls]
        false_negative = sum(counts[cls]) - true_positive
        false_positive = sum(counts[row][cls] for row in range(num_classes)) - true_positive
        union = true_positive + false_negative + false_positive
        ious.append(None if union == 0 else 100.0 * true_positive / union)
    return ious


@pytest.fixture
def pair():
    """Class 4 is absent from both sides, class 3 only predicted, some pixels ignored."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 17, 23), generator=generator)
    pred = torch.randint(0, 4, (2, 17, 23), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    return pred, target


def test_confusion_matrix_matches_loops(pair):
    pred, target = pair
    confusion = confusion_matrix(pred, target, NUM_CLASSES)
    assert confusion.dtype == torch.long and confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert confusion.tolist() == loop_confusion(pred, target, NUM_CLASSES)
    assert confusion.sum() == (target != IGNORE).sum()


def test_miou_excludes_absent_classes(pair):
    pred, target = pair
    expected = loop_iou(loop_confusion(pred, target, NUM_CLASSES))
    assert expected[4] is None and expected[3] == 0.0

    mean, per_class = miou(pred, target, NUM_CLASSES)

    present = [iou for iou in expected if iou is not None]
    assert mean == pytest.approx(sum(present) / len(present))
    for got, want in zip(per_class.tolist(), expected):
        assert math.isnan(got) if want is None else got == pytest.approx(want)


def test_miou_from_confusion_is_additive(pair):
    pred, target = pair
    summed = confusion_matrix(pred[:1], target[:1], NUM_CLASSES) + confusion_matrix(pred[1:], target[1:], NUM_CLASSES)
    assert miou_from_confusion(summed)[0] == pytest.approx(miou(pred, target, NUM_CLASSES)[0])


def test_perfect_prediction_is_100():
    target = torch.tensor([[0, 1], [2, IGNORE]])
    pred = torch.tensor([[0, 1], [2, 0]])
    assert miou(pred, target, 3)[0] == pytest.approx(100.0)


def test_out_of_range_label_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
