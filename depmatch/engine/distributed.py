"""Accelerate owns devices, precision and distribution; the launch config picks the backend.

The same code runs plain DDP, DeepSpeed ZeRO-2/3 (with CPU offload) and FSDP2: only the
`accelerate launch --config_file launch/...` changes.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env

from depmatch.config import ExperimentConfig
from depmatch.engine.trackers import check_trackers


def _process_group_kwargs() -> list:
    """DeepSpeed without a GPU: name the gloo backend explicitly.

    Otherwise accelerate finds no device backend, lets DeepSpeed start its process group
    but then reports a single process, and DeepSpeed rejects the batch-size arithmetic.
    """
    if _uses_deepspeed() and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def _uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def distributed_state(collective_timeout: float | None = None) -> PartialState:
    """The process group, started once per process with the backend `build_accelerator` will use.

    The first state made in a process is the one every later Accelerator shares, so it must
    honour ACCELERATE_USE_CPU as the Accelerator would: without it, CPU ranks never join.
    `collective_timeout` (seconds; None keeps torch's default) bounds every collective: gloo
    raises when it passes, and NCCL's watchdog aborts the process.
    """
    kwargs = {k: v for handler in _process_group_kwargs() for k, v in handler.to_kwargs().items()}
    if collective_timeout is not None:
        kwargs["timeout"] = timedelta(seconds=collective_timeout)
    if not torch.distributed.is_initialized():
        kwargs.update(_store_of_this_attempt(kwargs.get("timeout", torch.distributed.constants.default_pg_timeout)))
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)


def _store_of_this_attempt(timeout: timedelta) -> dict:
    """Process-group arguments that keep workers restarted by torchrun (`--max_restarts`) apart
    from the attempt before.

    torchrun's agent hosts the workers' store and keeps it across restarts: restarted gloo
    ranks read their peers' addresses from the failed attempt there and failed to connect
    ("Gloo connectFullMesh failed ... Connection refused", or a wait; torch 2.14). Keys under a
    prefix of their own per attempt cannot be stale. DeepSpeed starts its group itself and
    takes no store.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or _uses_deepspeed():
        return {}
    agent_store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return {
        "store": torch.distributed.PrefixStore(f"depmatch/attempt_{attempt}", agent_store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


class CollectiveError(RuntimeError):
    pass


def explain_collective_failure(error: RuntimeError, rank: int, step: int, timeout: float) -> CollectiveError | None:
    """The error to report when `error` is a collective that timed out or lost its peer, else None."""
    text = str(error)
    if "Timed out" in text or "timed out" in text:
        return CollectiveError(
            f"rank {rank}: a collective operation (gradient all-reduce, barrier or stop agreement) after step {step} "
            f"did not complete within train.collective_timeout={timeout:g} s, so another rank is hung (stopped, "
            "wedged GPU, stuck read) or unreachable. Its log, or `py-spy dump --pid PID` on its node, shows where it "
            "waits. If a step, evaluation or checkpoint legitimately takes longer, raise train.collective_timeout. "
            "Continue with --resume latest"
        )
    if "closed by peer" in text or "reset by peer" in text:
        return CollectiveError(
            f"rank {rank}: another rank left a collective operation after step {step} (it crashed or was killed): "
            "its log says why. Continue with --resume latest"
        )
    return None


def build_accelerator(config: ExperimentConfig) -> Accelerator:
    output_dir = Path(config.train.output_dir)
    check_trackers(config.train.log_with)
    distributed_state(config.train.collective_timeout)  # the group every Accelerator of this process shares
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        log_with=list(config.train.log_with),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
        kwargs_handlers=_process_group_kwargs(),
    )
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Fail at start, not after hours of N independent runs overwriting one output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type.value} on {accelerator.device}). On a machine without GPUs, set "
            "ACCELERATE_USE_CPU=true for DDP (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N -m depmatch.train ...`) or launch DeepSpeed (`--use_deepspeed`)"
        )
    fsdp_requested = parse_flag_from_env("ACCELERATE_USE_FSDP")
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(
            f"the launch config asks for FSDP but accelerate runs {accelerator.distributed_type.value} on "
            f"{accelerator.device}: accelerate enables FSDP on GPUs (and other accelerators) only; "
            "on CPUs use DDP or DeepSpeed (docs/training.md)"
        )


def prepare_student(accelerator: Accelerator, student: torch.nn.Module, optimizer, config: ExperimentConfig):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The batches come from our own streaming loaders, not a prepared DataLoader, so
        # DeepSpeed must be told the micro-batch size explicitly.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size + config.train.unlabeled_batch_size
        # Always ours: accelerate fills a missing or "auto" clip with 1.0, which would clip
        # DeepSpeed runs where DDP and FSDP runs with `optim.grad_clip: 0` do not.
        ds_config["gradient_clipping"] = config.optim.grad_clip
        zero = ds_config.get("zero_optimization", {})
        # Checkpoints include a consolidated student, which ZeRO-3 can only gather with this on.
        if zero.get("stage") == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        # The optimizer is our torch AdamW (two groups, poly lr set by hand); DeepSpeed refuses a
        # client optimizer under optimizer offload unless told it may run it on the CPU.
        if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
            ds_config["zero_force_ds_cpu_optimizer"] = False
    return accelerator.prepare(student, optimizer)


def fused_optimizer(accelerator: Accelerator, requested: bool | None) -> bool:
    """`optim.fused`, or by default fused AdamW where the optimizer steps on the GPU: CUDA, and not
    DeepSpeed's CPU offload.

    Under ZeRO the JSON names no optimizer, so DeepSpeed steps this torch AdamW on its fp32
    partitions, on the GPU unless `offload_optimizer` moves them to the CPU. The CPU keeps the
    per-tensor AdamW by default, so CPU runs and their recorded numbers are unchanged.
    """
    if requested is not None:
        return requested
    if accelerator.device.type != "cuda":
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        offload = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}
        )
        return offload.get("device", "none") in ("none", None)
    return True


def is_zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def shards_parameters(accelerator: Accelerator) -> bool:
    """ZeRO-3 and FSDP keep a slice of each weight per rank and gather it, collectively, in every forward."""
    return is_zero3(accelerator) or accelerator.distributed_type == DistributedType.FSDP


def holds_whole_state(accelerator: Accelerator) -> bool:
    """Every rank holds the whole model and optimizer state (DDP or one process), not a shard of it: one
    rank can save a checkpoint by itself. DeepSpeed's ZeRO stages shard the optimizer state at least."""
    return accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """DeepSpeed casts the weights to bf16/fp16 and expects inputs to match; autocast keeps fp32 inputs."""
    return next(model.parameters()).dtype
