"""Procedural RGB-D street-like scenes: the embedded default dataset and the CPU benchmark
where depth should matter.

Six classes. `box_near` and `box_far` share colours, texture and size range and differ
only in the depth they sit at, so appearance alone cannot separate them; the side wall
and the ground span a large depth range. Depth is disparity-like, in about [0, 20]
(larger = closer), as Depth Anything outputs. Every scene is a function of
(seed, split, index) alone. `depth_mode` replaces the stored depth by a control that
carries no class information (`constant`, `random`) while images and labels stay the same;
`easy_walls` paints the walls purple, a colour no other class has, instead of a brown close
to the ground's.

`scene_version` picks how objects are drawn. Version 2 places each box on the ground row of
its own disparity and draws far objects first, which gives the class away without depth
(the bottom row alone separates the boxes). Version 3 removes those cues: every
object's bottom row, size and drawing order are drawn independently of its class, no wall
hides an object, and each scene holds a near and a far box side by side, so that most
training crops hold both on the CDDP grid. Its RGB correlates of depth are weak: the boxes'
low-contrast stripes have a period proportional to 1/disparity (`STRIPE_PERIOD`), and far boxes
are a little paler (aerial perspective, `HAZE`). Version 4 draws version 3's shapes and depth
pixel for pixel, with boxes that cannot pass for ground or sky (`DISTINCT_BOX_COLOURS`, a dark
rim), so that two labels teach what a box is and only depth-related cues tell near from far.
`scene_statistics` measures those properties.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from depmatch.config import ConfigError, SynthConfig
from depmatch.data.codec import encode_depth, encode_png
from depmatch.data.shards import BUILDER_VERSION, MANIFEST_NAME, depth_manifest_entry, read_manifest
from depmatch.data.writer import ShardPlan, plan_shards, write_dataset

SYNTH_CLASSES = ("sky", "ground", "wall", "box_near", "box_far", "pillar")
SKY, GROUND, WALL, BOX_NEAR, BOX_FAR, PILLAR = range(len(SYNTH_CLASSES))
SYNTH_PALETTE = [[70, 130, 180], [128, 64, 128], [102, 102, 156], [0, 0, 142], [0, 142, 142], [220, 20, 60]]
DEPTH_MODES = ("true", "constant", "random")
SPLIT_STREAMS = {"labeled": 0, "unlabeled": 1, "val": 2}
MAX_DISPARITY = 20.0
CONSTANT_DISPARITY = 5.0
BOX_COLOURS = ((60, 150, 90), (70, 120, 170), (150, 140, 60))
# Purple, not the light grey of scene version 1: a 4-label model took grey walls for the sky
# near the horizon, and pseudo-labels spread that confusion.
EASY_WALL_COLOUR = (140.0, 70.0, 150.0)
# data.synth.scene_version: how objects are drawn (the module docstring). A new version, not an
# edit of an old one, whenever the scenes drawn from the same settings would change: the version
# is a setting, so it is in the manifest and every shard's digest, and cached shards are rebuilt.
SCENE_VERSIONS = (2, 3, 4)
# Scene version 3: box stripes of period STRIPE_PERIOD / disparity pixels (near boxes 4-6.5,
# far ones 10-24) and relative amplitude STRIPE_CONTRAST, about the image noise (σ 3 of ~100).
STRIPE_PERIOD = 72.0
STRIPE_CONTRAST = 0.05
# ... and aerial perspective: a box's colour blends towards the horizon's sky colour by
# HAZE · (1 - disparity / 20), near boxes 3-18 %, far ones 26-34 %, so that far boxes are paler.
HAZE = 0.4
HAZE_COLOUR = (180.0, 205.0, 235.0)
# Scene version 4: version 3's shapes and depth, but a box looks like a
# box whatever its depth. With 2 labels, version 3's models took 29-66 % of each box class's pixels
# for ground (and 17 % of the far ones for sky), which held the ground's IoU under 80 %: its olive box
# colour is close to the ground's browns, its blue one to the sky, its ground takes a tint, and the
# two labeled scenes of the ablation's seed hold boxes of one colour. Version 4's box colours are far
# from the ground's and the sky's, its ground has one brightness jitter instead of a tint, every
# box has a dark rim of BOX_RIM pixels, and the near and the far box of a scene differ in colour:
# cues of objectness shared by both box classes, so they say nothing about depth.
DISTINCT_BOX_COLOURS = ((50, 160, 80), (210, 180, 40), (40, 150, 150))
BOX_RIM = 1.0
BOX_RIM_SHADE = 0.5
OBJECT_DISPARITY = {BOX_NEAR: (11.0, 18.0), BOX_FAR: (3.0, 7.0), PILLAR: (2.0, 18.0)}


def _ground_row(disparity, horizon: float, height: int):
    """Image row where the ground plane has `disparity` (linear in the row for a flat ground)."""
    return horizon + (disparity - 0.5) / 19.0 * (height - horizon)


def _bricks(rows: np.ndarray, columns: np.ndarray, course_height) -> np.ndarray:
    """1 on bricks, 0 on mortar, with courses of `course_height` pixels offset by half a brick."""
    course = np.floor(rows / course_height)
    along = columns / (2.5 * course_height) + 0.5 * (course % 2)
    mortar = ((rows / course_height) % 1 < 0.15) | (along % 1 < 0.08)
    return (~mortar).astype(np.float32)


class _Canvas:
    def __init__(self, height: int, width: int):
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.columns = np.arange(width, dtype=np.float32)[None, :]
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.full((height, width), SKY, np.uint8)
        self.depth = np.zeros((height, width), np.float32)

    def paint(self, mask, class_index: int, rgb, disparity) -> None:
        mask = np.broadcast_to(mask, self.label.shape)
        self.image[mask] = np.broadcast_to(rgb, self.image.shape)[mask]
        self.label[mask] = class_index
        self.depth[mask] = np.broadcast_to(disparity, self.depth.shape)[mask]


def _sky_and_ground(canvas: _Canvas, rng: np.random.Generator, horizon: float, untinted: bool) -> None:
    height = canvas.label.shape[0]
    top = np.array([60, 110, 200], np.float32) * rng.uniform(0.85, 1.1)
    bottom = np.array([180, 205, 235], np.float32)
    blend = np.clip(canvas.rows / horizon, 0, 1)[..., None]
    canvas.paint(True, SKY, top + (bottom - top) * blend, 0.3)
    disparity = 0.5 + 19.0 * np.clip((canvas.rows - horizon) / (height - horizon), 0, 1)
    # A perspective checkerboard: ground-plane coordinates are (x / disparity, 1 / disparity).
    world_x = (canvas.columns - canvas.label.shape[1] / 2) / disparity * 0.6
    world_z = 30.0 / disparity
    checker = (np.floor(world_x) + np.floor(world_z)) % 2
    jitter = rng.uniform(0.8, 1.2, 3)  # drawn in every version, so the rest of the scene is the same
    colour = np.array([120, 100, 80], np.float32) * (jitter.mean() if untinted else jitter)
    shade = (0.85 + 0.15 * checker) * (0.65 + 0.35 * disparity / MAX_DISPARITY)
    canvas.paint(canvas.rows >= horizon, GROUND, colour * shade[..., None], disparity)


def _walls(canvas: _Canvas, rng: np.random.Generator, horizon: float, easy: bool) -> None:
    height, width = canvas.label.shape
    jitter = rng.uniform(0.85, 1.15, 3)  # drawn in both styles, so the rest of the scene is the same
    colour = (
        np.array(EASY_WALL_COLOUR, np.float32) * jitter.mean()
        if easy
        else np.array([170, 150, 130], np.float32) * jitter
    )
    if rng.random() < 0.7:  # a side wall receding from the image edge: a large depth range
        near, far = rng.uniform(12, 19), rng.uniform(1.5, 3.0)
        extent = rng.uniform(0.15, 0.4) * width
        from_edge = canvas.columns if rng.random() < 0.5 else width - 1 - canvas.columns
        disparity = far + (near - far) * np.clip(1 - from_edge / extent, 0, 1)
        top = horizon - disparity * rng.uniform(0.8, 1.6) * height / MAX_DISPARITY
        mask = (from_edge < extent) & (canvas.rows >= top) & (canvas.rows < _ground_row(disparity, horizon, height))
        bricks = _bricks(canvas.rows - horizon, from_edge, np.maximum(disparity * 0.4, 1.0))
        shade = (0.75 + 0.25 * bricks) * (0.6 + 0.4 * disparity / MAX_DISPARITY)
        canvas.paint(mask, WALL, colour * shade[..., None], disparity)
    if rng.random() < 0.6:  # a back wall facing the camera
        disparity = rng.uniform(2.0, 5.0)
        left = rng.uniform(0, 0.6) * width
        right = left + rng.uniform(0.3, 0.6) * width
        bottom = _ground_row(disparity, horizon, height)
        top = bottom - rng.uniform(0.2, 0.45) * height
        mask = (canvas.columns >= left) & (canvas.columns < right) & (canvas.rows >= top) & (canvas.rows < bottom)
        shade = 0.7 + 0.2 * _bricks(canvas.rows, canvas.columns, 3.0)
        canvas.paint(mask, WALL, colour * shade[..., None], disparity)


def _objects(canvas: _Canvas, rng: np.random.Generator, horizon: float) -> None:
    height, width = canvas.label.shape
    classes = rng.choice([BOX_NEAR, BOX_FAR, PILLAR], size=rng.integers(2, 6))
    disparities = [rng.uniform(*OBJECT_DISPARITY[c]) for c in classes]
    for class_index, disparity in sorted(zip(classes, disparities), key=lambda pair: pair[1]):  # far first
        if class_index == PILLAR:
            object_width, object_height = rng.uniform(0.03, 0.07) * width, rng.uniform(0.3, 0.7) * height
        else:  # near and far boxes draw their size from the same range: only depth tells them apart
            object_width, object_height = rng.uniform(0.1, 0.3) * width, rng.uniform(0.12, 0.35) * height
        bottom = _ground_row(disparity, horizon, height) + rng.uniform(-0.1, 0.1) * height
        left = rng.uniform(-0.1, 0.9) * width
        across = (canvas.columns - left) / object_width  # 0..1 over the object's width
        mask = (across >= 0) & (across < 1) & (canvas.rows >= bottom - object_height) & (canvas.rows < bottom)
        if class_index == PILLAR:
            rgb, object_disparity = _pillar_colour(across), np.full_like(across, disparity)
        else:
            stripes = ((canvas.rows + canvas.columns) // 6) % 2
            vertical_shade = 1.0 - 0.25 * np.clip((canvas.rows - bottom + object_height) / object_height, 0, 1)
            colour = np.array(BOX_COLOURS[rng.integers(len(BOX_COLOURS))], np.float32)
            rgb = colour * ((0.85 + 0.15 * stripes) * vertical_shade)[..., None]
            object_disparity = disparity + rng.uniform(-0.6, 0.6) * (across - 0.5)  # a slightly turned face
        nearer_wall = (canvas.label == WALL) & (canvas.depth > object_disparity)
        canvas.paint(mask & ~nearer_wall, int(class_index), rgb, object_disparity)


def _pillar_colour(across: np.ndarray) -> np.ndarray:
    return np.array([200, 70, 40], np.float32) * (0.55 + 0.45 * np.sin(np.pi * np.clip(across, 0, 1)))[..., None]


def _objects_v3(canvas: _Canvas, rng: np.random.Generator, horizon: float, distinct_boxes: bool) -> None:
    """Scene version 3: nothing but depth and the faint stripe period tells the box classes apart.
    `distinct_boxes` (version 4): box colours unlike the ground's and the sky's, and a dark rim."""
    height, width = canvas.label.shape
    extra = rng.choice([BOX_NEAR, BOX_FAR, PILLAR], size=rng.integers(0, 3))
    classes = [BOX_NEAR, BOX_FAR, *extra.tolist()]
    # The near and the far box of every scene stand side by side about one column, either on the left.
    centre = rng.uniform(0.35, 0.65) * width
    near_on_left = rng.random() < 0.5
    # Version 4 gives the near and the far box two different colours, so that two labeled scenes
    # show every colour a box can have: with a colour drawn per box, as in version 3, the two labeled
    # scenes of the ablation's seed 4 hold yellow boxes only, and a first try of version 4 that drew
    # them so took 46-50 % of the box pixels for sky with 2 labels. The order is drawn from a child
    # stream, which leaves `rng`, and so every shape and depth, as in version 3.
    colour_order = rng.spawn(1)[0].permutation(len(DISTINCT_BOX_COLOURS)) if distinct_boxes else None
    for index in rng.permutation(len(classes)):  # drawing order independent of class
        class_index = classes[index]
        disparity = rng.uniform(*OBJECT_DISPARITY[class_index])
        if class_index == PILLAR:
            object_width, object_height = rng.uniform(0.03, 0.07) * width, rng.uniform(0.3, 0.7) * height
        else:
            object_width, object_height = rng.uniform(0.18, 0.32) * width, rng.uniform(0.22, 0.4) * height
        if index < 2:  # the pair: touching at `centre`, overlapping or apart by up to 8 % of the width
            gap = rng.uniform(-0.08, 0.08) * width
            on_left = (class_index == BOX_NEAR) == near_on_left
            left = centre - gap / 2 - object_width if on_left else centre + gap / 2
        else:
            left = rng.uniform(-0.1, 0.9) * width
        # the same range of bottom rows for every class: position says nothing about depth
        bottom = rng.uniform(horizon + 0.3 * (height - horizon), 1.05 * height)
        across = (canvas.columns - left) / object_width
        mask = (across >= 0) & (across < 1) & (canvas.rows >= bottom - object_height) & (canvas.rows < bottom)
        if class_index == PILLAR:
            rgb, object_disparity = _pillar_colour(across), np.full_like(across, disparity)
        else:
            period = STRIPE_PERIOD / disparity
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin(2 * np.pi * (canvas.rows + canvas.columns) / (np.sqrt(2) * period) + phase)
            vertical_shade = 1.0 - 0.25 * np.clip((canvas.rows - bottom + object_height) / object_height, 0, 1)
            pick = rng.integers(len(BOX_COLOURS))  # drawn in version 4 too: the same geometry as version 3
            if distinct_boxes:
                colour = np.array(DISTINCT_BOX_COLOURS[colour_order[index % len(colour_order)]], np.float32)
            else:
                colour = np.array(BOX_COLOURS[pick], np.float32)
            haze = HAZE * (1 - disparity / MAX_DISPARITY)
            colour = colour * (1 - haze) + np.array(HAZE_COLOUR, np.float32) * haze
            shade = (1.0 + STRIPE_CONTRAST * stripes) * vertical_shade
            if distinct_boxes:  # the rim is the same width in pixels at every depth
                from_edge = np.minimum(
                    np.minimum(across, 1 - across) * object_width,
                    np.minimum(canvas.rows - (bottom - object_height), bottom - 1 - canvas.rows),
                )
                shade = np.where(from_edge < BOX_RIM, BOX_RIM_SHADE * shade, shade)
            rgb = colour * shade[..., None]
            object_disparity = disparity + rng.uniform(-0.6, 0.6) * (across - 0.5)
        canvas.paint(mask, int(class_index), rgb, object_disparity)


def render_scene(
    rng: np.random.Generator, height: int, width: int, easy_walls: bool = False, scene_version: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: uint8 H×W×3 image, uint8 H×W label, float32 H×W disparity."""
    canvas = _Canvas(height, width)
    horizon = rng.uniform(0.3, 0.5) * height
    _sky_and_ground(canvas, rng, horizon, untinted=scene_version >= 4)
    _walls(canvas, rng, horizon, easy_walls)
    if scene_version >= 3:
        _objects_v3(canvas, rng, horizon, distinct_boxes=scene_version >= 4)
    else:
        _objects(canvas, rng, horizon)
    image = canvas.image * rng.uniform(0.75, 1.15) + rng.normal(0, 3.0, canvas.image.shape)
    depth = canvas.depth + rng.normal(0, 0.05, canvas.depth.shape)
    return np.clip(image, 0, 255).astype(np.uint8), canvas.label, np.clip(depth, 0, MAX_DISPARITY).astype(np.float32)


RANDOM_GRID = (4, 6)  # the random field's coarse grid (rows, columns)


def smooth_random_depth(shape: tuple[int, int], low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth field in [low, high] of `shape`: it looks like depth and is independent of any image
    (bilinear from a coarse grid of uniform draws; the synthetic scenes' random
    control, and depmatch.data.depth_controls' on real data)."""
    coarse = rng.uniform(low, high, RANDOM_GRID).astype(np.float32)
    return np.array(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR))


def control_depth(depth: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """The stored depth: the scene's own (`true`) or a control without class information."""
    if mode == "true":
        return depth
    if mode == "constant":
        return np.full_like(depth, CONSTANT_DISPARITY)
    if mode == "random":  # smooth, so it looks like depth, but independent of the scene
        return smooth_random_depth(depth.shape, 0.0, MAX_DISPARITY, rng)
    raise ConfigError(f"data.synth.depth_mode must be one of {', '.join(DEPTH_MODES)}, got {mode!r}")


def synthetic_sample(synth: SynthConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene `index` of `split`: (image, label, stored depth), deterministic from synth.seed."""
    stream = SPLIT_STREAMS[split]
    image, label, depth = render_scene(
        np.random.default_rng([synth.seed, stream, index]),
        synth.height,
        synth.width,
        synth.easy_walls,
        synth.scene_version,
    )
    # The control draws from its own generator so images and labels are the same in every mode.
    control_rng = np.random.default_rng([synth.seed, stream, index, 1])
    return image, label, control_depth(depth, synth.depth_mode, control_rng)


def _samples(plan: ShardPlan, synth: SynthConfig) -> Iterator[tuple[str, dict[str, bytes]]]:
    for index in plan.items:
        image, label, depth = synthetic_sample(synth, plan.split, index)
        meta = {
            "source": f"synthetic seed {synth.seed} {plan.split} {index}",
            "width": synth.width,
            "height": synth.height,
            "dataset": "synthetic",
            "split": plan.split,
        }
        fields = {"png": encode_png(image), "depth.npy": encode_depth(depth), "json": json.dumps(meta).encode()}
        if plan.split != "unlabeled":
            fields["label.png"] = encode_png(label)
        yield f"{plan.split}_{index:06d}", fields


def scene_fingerprint(synth: SynthConfig) -> str:
    """A digest of one scene as this code draws it from `synth`.

    The settings alone do not say how a scene looks: an edit of the drawing code that forgot to
    bump `scene_version` would leave cached shards of the old drawing beside probes and checks
    that draw the new one. Shards are reused only when this digest matches too."""
    digest = hashlib.sha256()
    for array in synthetic_sample(synth, "labeled", 0):
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def ensure_synthetic_shards(root: str, synth: SynthConfig, num_classes: int) -> Path:
    """Build the synthetic dataset into `root` unless its manifest already matches `synth`.

    Call it from one process (the main one) before the others read the shards.
    """
    if num_classes != len(SYNTH_CLASSES):
        raise ConfigError(
            f"the synthetic dataset has {len(SYNTH_CLASSES)} classes; set num_classes: {len(SYNTH_CLASSES)}"
        )
    if synth.depth_mode not in DEPTH_MODES:
        raise ConfigError(f"data.synth.depth_mode must be one of {', '.join(DEPTH_MODES)}, got {synth.depth_mode!r}")
    if synth.scene_version not in SCENE_VERSIONS:
        raise ConfigError(
            f"data.synth.scene_version must be one of {', '.join(map(str, SCENE_VERSIONS))}, "
            f"got {synth.scene_version!r}"
        )
    path = Path(root)
    settings = dataclasses.asdict(synth)
    fingerprint = scene_fingerprint(synth)
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        if (
            manifest.get("synth") == settings
            and manifest.get("builder_version") == BUILDER_VERSION
            and manifest.get("scene_fingerprint") == fingerprint
        ):
            return path
    counts = {"labeled": synth.labeled, "unlabeled": synth.unlabeled, "val": synth.val}
    # the settings, scene version included, and the drawing's fingerprint are in each shard's
    # digest: no stale shard is kept
    plans = plan_shards(
        {split: list(range(n)) for split, n in counts.items() if n},
        synth.samples_per_shard,
        {**settings, "scene_fingerprint": fingerprint},
    )
    manifest_fields = {
        "dataset": "synthetic",
        "num_classes": len(SYNTH_CLASSES),
        "classes": list(SYNTH_CLASSES),
        "palette": SYNTH_PALETTE,
        "ignore_index": 255,
        "depth": depth_manifest_entry({"source": "synthetic", "mode": synth.depth_mode}),
        "synth": settings,
        "scene_version": synth.scene_version,
        "scene_fingerprint": fingerprint,
    }
    write_dataset(path, plans, lambda plan: _samples(plan, synth), manifest_fields)
    return path
