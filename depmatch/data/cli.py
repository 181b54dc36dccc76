"""`depmatch shards build | synth | verify`, registered by the main `depmatch` command.

Each subcommand's `func(args)` returns 0, or 1 when `verify` finds problems; a mistake in
the input raises a `UserError` (one line from the `depmatch` command, depmatch/errors.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from depmatch.config import SynthConfig

BUILD_EPILOG = """examples:
  depmatch shards build pascal --source VOC2012 --out shards/pascal-92 \\
      --labeled-list splits/pascal/92/labeled.txt --unlabeled-list splits/pascal/92/unlabeled.txt \\
      --val-list splits/pascal/val.txt --depth-model depth-anything/Depth-Anything-V2-Small-hf
  HF_HUB_OFFLINE=1 depmatch shards build ... --depth-model depth-anything/Depth-Anything-V2-Small-hf
      (offline: the model must already be in the Hugging Face cache, HF_HOME/hub)
  accelerate launch --num_processes 4 "$(which depmatch)" shards build cityscapes ...
      (each process takes every k-th shard)
  depmatch shards build folder --source camvid --num-classes 11 --label-map 11:255 \\
      --labeled-list camvid/train.txt --val-list camvid/val.txt --out shards/camvid --no-depth
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser(
        "shards", description="WebDataset shards (docs/shards.md)."
    )
    commands = shards.add_subparsers(dest="shards_command", required=True, metavar="{build,synth,verify}")
    _add_build(commands)
    _add_synth(commands)
    verify = commands.add_parser(
        "verify", help="check checksums, decoding, label values and sizes",
        description="Check every shard of a dataset folder against its manifest; exit 1 listing each bad sample.",
    )
    verify.add_argument("root", type=Path, metavar="DIR", help="dataset folder holding manifest.json")
    verify.set_defaults(func=run_verify)


def _add_build(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser(
        "build", help="write shards (image, label, depth, metadata) from a dataset on disk",
        description="Write the labeled / unlabeled / val splits of a dataset as tar shards plus manifest.json.",
        epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("layout", choices=("pascal", "cityscapes", "folder"),
                       help="pascal: JPEGImages + SegmentationClassAug; cityscapes: leftImg8bit + gtFine labelIds; "
                            "folder: an image folder and a label folder with the same stems")
    build.add_argument("--source", type=Path, required=True, help="dataset root")
    build.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/pascal-92")
    for split in ("labeled", "unlabeled", "val"):
        build.add_argument(f"--{split}-list", type=Path, help=f"file listing the {split} ids, one per line")
    folder = build.add_argument_group("folder layout")
    folder.add_argument("--images", type=Path, help="image folder (default: SOURCE/images)")
    folder.add_argument("--labels", type=Path, help="label folder of 8-bit PNGs (default: SOURCE/labels)")
    folder.add_argument("--num-classes", type=int, help="number of classes (required for folder)")
    folder.add_argument("--class-names", help="comma-separated class names")
    folder.add_argument("--label-map", action="append", default=[], metavar="SRC:DST",
                        help="remap a label value, e.g. 11:255 for a void class; repeatable or comma-separated")
    folder.add_argument("--name", help="dataset name in the manifest (default: the source folder's name)")
    depth = build.add_argument_group("depth (choose one)").add_mutually_exclusive_group(required=True)
    depth.add_argument("--depth-model", metavar="PATH_OR_ID",
                       help="Depth Anything to run: a local transformers folder or a Hugging Face hub repo id "
                            "(depth-anything/Depth-Anything-V2-Small-hf), fetched into the HF cache (HF_HOME, "
                            "HF_HUB_OFFLINE=1: cache only)")
    depth.add_argument("--depth-dir", type=Path, help="precomputed maps <key>.npy (float) or <key>.png (16-bit)")
    depth.add_argument("--no-depth", action="store_true", help="no depth: shards for the base frameworks only")
    build.add_argument("--depth-batch-size", type=int, default=8, help="images per depth-model batch")
    build.add_argument("--depth-png-scale", type=float, default=256.0, help="16-bit depth png value per disparity unit")
    build.add_argument("--samples-per-shard", type=int, default=500)
    build.set_defaults(func=run_build)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    defaults = SynthConfig()
    synth = commands.add_parser(
        "synth", help="generate the procedural RGB-D scenes (the embedded default dataset)",
        description="Generate deterministic synthetic RGB-D scenes (6 classes) as shards plus manifest.json.",
    )
    synth.add_argument("--out", type=Path, default=Path("shards/synthetic"), help="output folder")
    for name in ("labeled", "unlabeled", "val", "height", "width", "seed", "samples_per_shard"):
        synth.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                           help=f"default {getattr(defaults, name)}")
    synth.add_argument("--depth-mode", choices=("true", "constant", "random"), default=defaults.depth_mode,
                       help="true: scene depth; constant / random: controls whose depth carries no class information")
    synth.set_defaults(func=run_synth)


def _source_dataset(args: argparse.Namespace):
    from depmatch.data import layouts

    lists = {split: getattr(args, f"{split}_list") for split in ("labeled", "unlabeled", "val")}
    lists = {split: path for split, path in lists.items() if path is not None}
    if args.layout != "folder":
        if args.label_map or args.num_classes or args.class_names:
            raise layouts.ShardInputError("--label-map, --num-classes and --class-names are for the folder layout")
        if not lists:
            raise layouts.ShardInputError(f"the {args.layout} layout needs at least one of --labeled-list, --unlabeled-list, --val-list")
        return (layouts.pascal if args.layout == "pascal" else layouts.cityscapes)(args.source, lists)
    if args.num_classes is None:
        raise layouts.ShardInputError("the folder layout needs --num-classes")
    return layouts.folder(
        args.name or args.source.name,
        args.images or args.source / "images",
        args.labels or args.source / "labels",
        lists,
        args.num_classes,
        args.class_names.split(",") if args.class_names else None,
        layouts.parse_label_map(args.label_map),
    )


def _depth_source(args: argparse.Namespace):
    from depmatch.data import depth

    if args.depth_model:
        return depth.DepthAnythingModel(args.depth_model, args.depth_batch_size)
    if args.depth_dir:
        return depth.DepthDirectory(args.depth_dir, args.depth_png_scale)
    return depth.NoDepth()


def run_build(args: argparse.Namespace) -> int:
    source = _source_dataset(args)  # the lists and files are checked before the slow imports
    from depmatch.data.build import build_shards
    from depmatch.engine.distributed import distributed_state

    out = build_shards(source, _depth_source(args), args.out, args.samples_per_shard, args.depth_batch_size)
    if distributed_state().is_main_process:
        print(f"wrote {out}/manifest.json")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from depmatch.data.synth import SYNTH_CLASSES, ensure_synthetic_shards

    fields = ("labeled", "unlabeled", "val", "height", "width", "seed", "depth_mode", "samples_per_shard")
    synth = SynthConfig(**{name: getattr(args, name) for name in fields})
    out = ensure_synthetic_shards(str(args.out), synth, len(SYNTH_CLASSES))
    print(f"wrote {out}/manifest.json")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from depmatch.data.verify import verify_shards

    checked, problems = verify_shards(args.root)
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit(f"{len(problems)} problem(s) in {args.root}")
    print(f"{args.root}: {checked} samples OK")
    return 0
