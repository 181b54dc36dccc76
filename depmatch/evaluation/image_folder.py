"""The images `depmatch predict` reads; importable without torch, so that the command rejects a
wrong --images before it loads the model libraries."""

from __future__ import annotations

from pathlib import Path

from depmatch.choices import IMAGE_SUFFIXES
from depmatch.errors import UserError


class ImagesNotFoundError(UserError, FileNotFoundError):
    """The folder given to `predict --images` does not exist or holds no image."""


def find_images(directory: Path) -> list[Path]:
    """The image files in `directory` (IMAGE_SUFFIXES, any case), sorted; two files with the same stem are an error
    because their outputs would overwrite each other."""
    if not directory.is_dir():
        raise ImagesNotFoundError(f"{directory} is not a directory; pass --images a folder of images")
    images = sorted(path for path in directory.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ImagesNotFoundError(
            f"{directory} holds no images (files ending {', '.join(IMAGE_SUFFIXES)}, any case); "
            "pass --images the folder that holds them"
        )
    stems = [path.stem for path in images]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise UserError(f"{directory} holds several images named {duplicates[0]}.*; outputs are named by stem")
    return images
