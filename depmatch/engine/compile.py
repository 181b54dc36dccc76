"""`train.compile`: torch.compile of the student's and the EMA teacher's forwards.

`nn.Module.compile` compiles a module's call in place, so the module stays the same object:
its state dict keeps the plain names (no `_orig_mod.`), accelerate's wrappers stay as they
are, and the EMA teacher still updates its parameters in place. The §5 objective is compiled
too (`compile_function`): the CutMix mixing, the cross-entropies and CDDP/ULDR's resizes,
entropies and normalisers around their pair sums, which trace as one graph (the Triton pair
sums are custom ops; the blocked path's autograd functions trace). Shapes are static in
training (fixed crop and batch), so each call site compiles once, with `dynamic=False` (a
static graph per call site rather than one with symbolic sizes); `reduce-overhead` then
replays them as CUDA graphs, which the step allows since it has no host sync (trainer.py).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from depmatch.choices import COMPILE_MODES
from depmatch.config import ConfigError, TrainConfig
from depmatch.engine.distributed import shards_parameters


def compile_forwards(accelerator: Accelerator, student: torch.nn.Module, teacher_model, config: TrainConfig) -> None:
    """Compile the (prepared) student's and the teacher model's forwards when `train.compile` is on."""
    if not config.compile:
        return
    if config.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"train.compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {config.compile_mode!r}"
        )
    if shards_parameters(accelerator):
        # ZeRO-3 and FSDP gather each block's weights in module hooks, which a whole-model graph
        # would have to trace; that path is not built or tested yet.
        raise ConfigError(
            "train.compile: not supported with DeepSpeed ZeRO-3 or FSDP yet; use DDP or ZeRO-2 "
            "(launch/ddp-*.yaml, launch/zero2-8gpu.yaml) or set train.compile=false"
        )
    # Under DDP the wrapper itself: dynamo then splits the graph at DDP's gradient buckets, so the
    # all-reduces still overlap the backward. Otherwise the plain module (DeepSpeed's engine
    # forward is host-side bookkeeping around it).
    compiled_student = student if isinstance(student, DistributedDataParallel) else accelerator.unwrap_model(student)
    for model in (compiled_student, teacher_model):
        if model is not None:
            model.compile(mode=config.compile_mode, dynamic=False)


def compile_function(function, config: TrainConfig):
    """`function` compiled like the forwards when `train.compile` is on: step-side tensor code
    of static shapes (the strong views' photometric chain and the objective: hundreds of small
    ops per step each)."""
    return torch.compile(function, mode=config.compile_mode, dynamic=False) if config.compile else function


def eager_forwards():
    """Evaluation runs the modules eagerly: its batch sizes and image sizes vary, and compiling
    each would cost more than it saves."""
    return torch.compiler.set_stance("force_eager")
