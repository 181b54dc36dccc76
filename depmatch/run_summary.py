"""What `depmatch train` prints before step 1: where the run writes, what it reads, what it trains, on what."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from depmatch.config import ExperimentConfig


def parameter_count(module: nn.Module) -> int:
    """Every parameter of the whole model, also when ZeRO-3 keeps only this rank's slice (`ds_numel`).
    FSDP's DTensor parameters report their global size already."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in module.parameters())


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M"


BACKENDS = {"NO": "not distributed", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP on CPUs", "FSDP": "FSDP"}


def distribution(accelerator) -> str:
    """Processes, backend, device and precision, as accelerate set them up."""
    from depmatch.engine.distributed import is_zero3

    backend = BACKENDS.get(accelerator.distributed_type.value, accelerator.distributed_type.value)
    if accelerator.distributed_type.value == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        backend = f"DeepSpeed ZeRO-{stage}" + (" (parameters sharded)" if is_zero3(accelerator) else "")
    processes = accelerator.num_processes
    return (
        f"{processes} process{'es' if processes > 1 else ''} ({backend}), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )


def run_summary(config: ExperimentConfig, manifest: dict, model: nn.Module, accelerator) -> str:
    """The lines printed before training: config and output folders, split sizes, model size, distribution."""
    data, train = config.data, config.train
    totals = {split: entry["total"] for split, entry in manifest["splits"].items()}
    counts = ", ".join(
        f"{totals.get(split, 0)} {role}"
        for role, split in (
            ("labeled", data.labeled_split),
            ("unlabeled", data.unlabeled_split),
            ("val", data.val_split),
        )
    )
    others = [split for split in manifest.get("eval_splits", []) if split != data.val_split]
    encoder = getattr(model, "encoder", None)
    encoder_size = f", encoder {_millions(parameter_count(encoder))}" if encoder is not None else ""
    weights = config.model.pretrained or "random initialisation"
    depmatch = (
        f"DepMatch on (lambda_cddp {config.depmatch.lambda_cddp}, lambda_uldr {config.depmatch.lambda_uldr})"
        if config.depmatch.enabled
        else "DepMatch off"
    )
    output = Path(train.output_dir)
    lines = [
        f"config       {output / 'config.yaml'} (the resolved config: file, --set overrides and the shards' num_classes)",
        f"output       {output} (checkpoints/, best/, metrics.jsonl)",
        f"data         {data.root}: {counts}" + (f" (also evaluable: {', '.join(others)})" if others else ""),
        f"classes      {config.num_classes} from {manifest.get('dataset', 'the manifest')}: "
        + ", ".join(manifest.get("classes", [])[:6])
        + (", ..." if len(manifest.get("classes", [])) > 6 else ""),
        f"model        {config.model.encoder} ({config.model.backend}) + {config.model.head}: "
        f"{_millions(parameter_count(model))} parameters{encoder_size}; weights: {weights}",
        f"training     {train.framework}, {depmatch}, {train.steps} steps of {train.batch_size} labeled + "
        f"{0 if train.labeled_only else train.unlabeled_batch_size} unlabeled images per process",
        f"distributed  {distribution(accelerator)}",
    ]
    return "\n".join(lines)
