"""A launch that accelerate would quietly run as independent single-process jobs is an error."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from depmatch.engine.distributed import check_launch


def accelerator(distributed_type, num_processes):
    return SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes, device=torch.device("cpu"))


def test_ranks_that_did_not_join_are_an_error(monkeypatch):
    # `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs and without ACCELERATE_USE_CPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 2 processes but accelerate joined 1.*ACCELERATE_USE_CPU=true"):
        check_launch(accelerator(DistributedType.NO, 1))
    check_launch(accelerator(DistributedType.MULTI_CPU, 2))


def test_fsdp_that_accelerate_turned_into_ddp_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asks for FSDP but accelerate runs MULTI_CPU"):
        check_launch(accelerator(DistributedType.MULTI_CPU, 2))
    check_launch(accelerator(DistributedType.FSDP, 2))


def test_a_single_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_launch(accelerator(DistributedType.NO, 1))
