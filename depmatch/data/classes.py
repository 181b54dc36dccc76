"""Class names, palettes and label-id tables of the datasets the builder knows."""

import numpy as np

IGNORE_INDEX = 255

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# gtFine labelIds of the 19 evaluated classes, in train-id order; every other id is ignored.
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def voc_palette(num_classes: int) -> list[list[int]]:
    """The Pascal VOC bit-interleaved colour map; distinct colours for any class count."""
    palette = []
    for index in range(num_classes):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.append([red, green, blue])
    return palette


def identity_label_table() -> np.ndarray:
    """A 256-entry lookup table that leaves every label value as it is."""
    return np.arange(256, dtype=np.uint8)


def cityscapes_label_table() -> np.ndarray:
    """Lookup table from gtFine labelIds to the 19 train ids (255 elsewhere)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        table[label_id] = train_id
    return table
