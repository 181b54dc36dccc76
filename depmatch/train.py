"""Train a segmentation model with a base SSS framework and, optionally, DepMatch.

    depmatch train                      # embedded default: synthetic RGB-D shards, tiny ViT, CPU, a few minutes
    depmatch train --config configs/pascal/unimatch_v2-depmatch-dinov2_s-92.yaml --set train.steps=2000
    depmatch train --config CONFIG --set model.pretrained=timm/vit_small_patch14_dinov2.lvd142m  # by hub id, HF cache
    depmatch train --config CONFIG --set train.log_with=[tensorboard,wandb] --set train.run_name=seed0
    accelerate launch --config_file launch/ddp-4gpu.yaml -m depmatch.train --config CONFIG
    accelerate launch --config_file launch/zero2-8gpu.yaml -m depmatch.train --config CONFIG --resume latest

docs/training.md has every launch (DeepSpeed ZeRO-2/3, FSDP, multi-node, SLURM) and the trackers;
docs/models.md how weights are named (local path or Hugging Face hub id) and cached.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from depmatch.config import ConfigError, ExperimentConfig, add_overrides_argument, given_keys, load_config

logger = logging.getLogger("depmatch.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (configs/...); without it, the embedded synthetic default")
    add_overrides_argument(
        parser,
        "override a config key, e.g. --set train.steps=100 --set depmatch.enabled=false (repeatable)",
    )
    parser.add_argument(
        "--resume", metavar="CHECKPOINT", help="checkpoint folder to continue from, or 'latest' in train.output_dir"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `depmatch` subcommands."""
    parser = subparsers.add_parser("train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def prepare_dataset(config: ExperimentConfig, num_classes_from_data: bool = False) -> dict:
    """The shards' manifest, checked for this run (depmatch/data/preflight.py); the synthetic
    default is generated on first use (`DataConfig.synthesizes`).

    `num_classes_from_data`: the config did not set num_classes, so it is taken from the
    manifest; otherwise a config value that differs from the manifest's is an error.

    The job's main process builds it first; then each node's main process finds it complete
    (a filesystem shared by the nodes: one writer in all) or builds its own copy (node-local
    disks). No two processes write the same path at once.
    """
    from depmatch.data.loader import check_depth
    from depmatch.data.preflight import preflight
    from depmatch.data.roots import ShardRoot
    from depmatch.data.shards import ShardsNotFoundError, read_manifest
    from depmatch.data.synth import ensure_synthetic_shards
    from depmatch.engine.distributed import distributed_state

    root = ShardRoot.parse(config.data.root)  # the root as given: a URL or a pipe command is not a path
    state = distributed_state(config.train.collective_timeout)
    if config.data.synthesizes():
        if root.kind != "local" or root.selection is not None:
            raise ConfigError(
                f"data.synthesize: true generates the synthetic dataset into a local folder, and data.root is "
                f"{config.data.root}: set data.synthesize: false to read shards from there"
            )
        # First the job's main process, then the main process of each other node.
        for builds_now in (state.is_main_process, state.is_local_main_process and not state.is_main_process):
            if builds_now:
                ensure_synthetic_shards(config.data.root, config.data.synth, config.num_classes)
            state.wait_for_everyone()
    try:
        manifest = read_manifest(config.data.root)
    except ShardsNotFoundError as error:
        synthesize = config.data.synthesize is None and root.kind == "local" and root.selection is None
        synthesize = ", or set data.synthesize: true to generate the synthetic dataset there" if synthesize else ""
        raise ConfigError(f"data.root: {error}{synthesize}") from None
    if num_classes_from_data:
        config.num_classes = manifest["num_classes"]
    elif manifest["num_classes"] != config.num_classes:
        raise ConfigError(
            f"num_classes is {config.num_classes} in the config but {manifest['num_classes']} in {root.location('manifest.json')}: "
            "leave num_classes out of the config (it comes from the shards), fix it, or point data.root at the right shards"
        )
    if not config.train.labeled_only:
        check_depth(config, manifest)  # now, not at the first unlabeled batch
    preflight(config, manifest, state.num_processes)
    return manifest


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # a mistyped key fails before the slow imports
    from depmatch.engine.trackers import check_trackers
    from depmatch.engine.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_trackers(config.train.log_with)  # before the shards are generated or checked
    manifest = prepare_dataset(
        config, num_classes_from_data="num_classes" not in given_keys(args.config, args.overrides)
    )
    trainer = Trainer(config, resume=args.resume, dataset=manifest)
    if trainer.accelerator.is_main_process:
        from depmatch.run_summary import run_summary

        print(
            run_summary(config, manifest, trainer.accelerator.unwrap_model(trainer.student), trainer.accelerator),
            flush=True,
        )
    try:
        results = trainer.train()
    finally:
        trainer.accelerator.state.destroy_process_group()
    if trainer.stopped_by is not None:
        # 0, not an error: under torchrun a failing worker would be restarted (--max_restarts) while
        # the job is being stopped; the SLURM script requeues on the signal it saw (launch/slurm.sbatch).
        return 0
    if trainer.accelerator.is_main_process:
        summary = ", ".join(f"{name} {value:.2f}" for name, value in results.items())
        print(f"final mIoU ({config.data.val_split}): {summary}")
        print(
            f"checkpoints: {Path(config.train.output_dir) / 'checkpoints'}  best: {Path(config.train.output_dir) / 'best'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m depmatch.train ...`: the same command as `depmatch train ...`."""
    from depmatch.cli import main as depmatch_main

    return depmatch_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
