"""Source datasets on disk -> the list of (key, image, label) of every split.

Layouts: Pascal VOC 2012 with SBD labels (`JPEGImages/`, `SegmentationClassAug/`),
Cityscapes (`leftImg8bit/`, `gtFine/` labelIds) and a generic `folder` layout (an image
folder and a label folder with the same stems). Split membership comes from list files,
one id per line; as in the UniMatch split files, only the first column is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from depmatch.errors import UserError
from depmatch.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    PASCAL_CLASSES,
    cityscapes_label_table,
    identity_label_table,
    voc_palette,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABELED_SPLITS = ("labeled", "val")  # splits whose every image must have a label


class ShardInputError(UserError, ValueError):
    """A source file is missing or wrong; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # sample key inside the shards: unique, no '.' or '/'
    image: Path
    label: Optional[Path]  # None for unlabeled images

    def __str__(self) -> str:  # what the shard plan digest hashes
        return f"{self.key} {self.image} {self.label}"


@dataclass
class SourceDataset:
    name: str
    num_classes: int
    classes: list[str]
    palette: list[list[int]]
    splits: dict[str, list[SourceItem]]
    label_table: np.ndarray = field(default_factory=identity_label_table)  # source value -> class index

    def manifest_fields(self) -> dict:
        return {"dataset": self.name, "num_classes": self.num_classes, "classes": self.classes, "palette": self.palette}


def read_id_list(path: Path) -> list[str]:
    """Ids of a split list: the first column of each non-empty line that is not a comment."""
    if not path.is_file():
        raise ShardInputError(f"{path}: split list not found; pass an existing file")
    lines = (line.split() for line in path.read_text().splitlines())
    return [columns[0] for columns in lines if columns and not columns[0].startswith("#")]


def sample_key(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def _check_unique(splits: dict[str, list[SourceItem]]) -> None:
    for split, items in splits.items():
        seen: set[str] = set()
        for item in items:
            if item.key in seen:
                raise ShardInputError(f"id {item.key} appears twice in the {split} list; remove the duplicate")
            seen.add(item.key)


def _item(split: str, key: str, image: Path, label: Path, list_file: Path) -> SourceItem:
    if not image.is_file():
        raise ShardInputError(f"{image}: image of id {key} (listed in {list_file}) not found; add it or remove the id")
    if split not in LABELED_SPLITS:
        return SourceItem(key, image, None)
    if not label.is_file():
        raise ShardInputError(
            f"{label}: missing label for labeled id {key} (listed in {list_file}); "
            "add the mask or move the id to the unlabeled list"
        )
    return SourceItem(key, image, label)


def pascal(root: Path, lists: dict[str, Path]) -> SourceDataset:
    """Pascal VOC 2012; labels from SegmentationClassAug (SBD), else SegmentationClass."""
    label_dir = root / "SegmentationClassAug"
    if not label_dir.is_dir():
        label_dir = root / "SegmentationClass"
    splits = {}
    for split, list_file in lists.items():
        stems = [Path(entry).stem for entry in read_id_list(list_file)]
        splits[split] = [
            _item(split, stem, root / "JPEGImages" / f"{stem}.jpg", label_dir / f"{stem}.png", list_file)
            for stem in stems
        ]
    _check_unique(splits)
    return SourceDataset("pascal", len(PASCAL_CLASSES), list(PASCAL_CLASSES), voc_palette(len(PASCAL_CLASSES)), splits)


def _cityscapes_image(root: Path, entry: str, list_file: Path) -> Path:
    """A list entry is a path below `root` (UniMatch lists) or a bare id like aachen_000000_000019."""
    if "/" in entry:
        return root / entry
    city = entry.split("_")[0]
    matches = sorted(root.glob(f"leftImg8bit/*/{city}/{entry}_leftImg8bit.png"))
    if not matches:
        raise ShardInputError(
            f"{root}/leftImg8bit/*/{city}/{entry}_leftImg8bit.png: image of id {entry} (listed in {list_file}) "
            "not found; check --source points at the Cityscapes root"
        )
    return matches[0]


def cityscapes(root: Path, lists: dict[str, Path]) -> SourceDataset:
    """Cityscapes fine annotations; gtFine labelIds are mapped to the 19 train ids."""
    splits = {}
    for split, list_file in lists.items():
        items = []
        for entry in read_id_list(list_file):
            image = _cityscapes_image(root, entry, list_file)
            stem = image.name.removesuffix("_leftImg8bit.png")
            subset, city = image.parent.parent.name, image.parent.name
            label = root / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png"
            items.append(_item(split, stem, image, label, list_file))
        splits[split] = items
    _check_unique(splits)
    return SourceDataset(
        "cityscapes",
        len(CITYSCAPES_CLASSES),
        list(CITYSCAPES_CLASSES),
        [list(colour) for colour in CITYSCAPES_PALETTE],
        splits,
        cityscapes_label_table(),
    )


def parse_label_map(pairs: list[str]) -> np.ndarray:
    """`["11:255", "3:1"]` -> a 256-entry lookup table from source value to class index."""
    table = identity_label_table()
    for pair in pairs:
        for mapping in pair.split(","):
            try:
                source, target = (int(value) for value in mapping.split(":"))
            except ValueError:
                raise ShardInputError(f"--label-map {mapping!r}: expected SOURCE:TARGET integers, e.g. 11:255") from None
            if not (0 <= source <= 255 and 0 <= target <= 255):
                raise ShardInputError(f"--label-map {mapping!r}: values must lie in 0..255")
            table[source] = target
    return table


def folder(
    name: str,
    images: Path,
    labels: Path,
    lists: dict[str, Path],
    num_classes: int,
    classes: Optional[list[str]] = None,
    label_table: Optional[np.ndarray] = None,
) -> SourceDataset:
    """Images and labels with the same stems. Without list files, images that have a label
    form the labeled split and the others the unlabeled split."""
    if not images.is_dir():
        raise ShardInputError(f"{images}: image folder not found; pass --images")
    image_by_stem = {path.stem: path for path in sorted(images.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    label_by_stem = {path.stem: path for path in sorted(labels.glob("*.png"))} if labels.is_dir() else {}
    if lists:
        splits = {}
        for split, list_file in lists.items():
            stems = [Path(entry).stem for entry in read_id_list(list_file)]
            splits[split] = [
                _item(
                    split,
                    sample_key(stem),
                    image_by_stem.get(stem, images / stem),
                    label_by_stem.get(stem, labels / f"{stem}.png"),
                    list_file,
                )
                for stem in stems
            ]
    else:
        splits = {
            "labeled": [SourceItem(sample_key(s), p, label_by_stem[s]) for s, p in image_by_stem.items() if s in label_by_stem],
            "unlabeled": [SourceItem(sample_key(s), p, None) for s, p in image_by_stem.items() if s not in label_by_stem],
        }
    _check_unique(splits)
    classes = classes or [f"class_{index}" for index in range(num_classes)]
    if len(classes) != num_classes:
        raise ShardInputError(f"--class-names gives {len(classes)} names for --num-classes {num_classes}")
    table = identity_label_table() if label_table is None else label_table
    return SourceDataset(name, num_classes, classes, voc_palette(num_classes), splits, table)
