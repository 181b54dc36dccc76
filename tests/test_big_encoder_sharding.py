"""DINOv3-7B's architecture sharded over 2 CPU ranks with activation checkpointing: under FSDP2 and ZeRO-3
each rank holds half the weights and optimizer state; under FSDP2 (docs/training.md's 7B recipe) resume is
exact and export is one safetensors file.

Shape-reduced: the 7B's block (SwiGLU at MLP ratio 2, RoPE, 4 registers, LayerScale, its 32 heads) at width
512 instead of 4096, and 4 blocks, the fewest that give DPT its four maps (not 2). At the real width 4 blocks are
670M parameters: with the whole fp32 EMA teacher on each rank about 16 GB for the two ranks and several seconds
per step on a 2-core CPU; at width 1024 one launch already took 40 s here. DEPMATCH_7B_WIDTH=4096 runs the same
test at the real width by hand, not in CI (docs/training.md).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import BACKENDS, launch_two_processes

from depmatch.config import load_config
from depmatch.models import build_model
from depmatch.train import prepare_dataset

pytestmark = pytest.mark.slow

WIDTH = int(os.environ.get("DEPMATCH_7B_WIDTH", "512"))
SHRUNK_7B = [
    "model.encoder=dinov3_7b",
    f"model.embed_dim={WIDTH}",
    "model.depth=4",
    "model.grad_checkpointing=true",
    # a small head, so that the encoder's blocks are what is sharded and measured
    "model.head_features=32",
    "model.head_out_channels=[32,64,128,128]",
    "data.crop_size=32",
    "train.batch_size=1",
    "train.unlabeled_batch_size=1",
]
# timm's DINOv3 (Eva) is made of EvaBlock: one FSDP2 unit per block
FSDP2_EVA = [arg.replace("Block", "EvaBlock") if arg == "Block" else arg for arg in BACKENDS["fsdp2"][0]]
# The files each rank writes of its own shard: (weights, optimizer state) per rank.
RANK_FILES = {
    "fsdp2": ("pytorch_model_fsdp_0/__{rank}_0.distcp", "optimizer_0/__{rank}_0.distcp"),
    "zero3": (
        "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
    ),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    # one sample per shard: the 2 val images make a shard for each of the 2 ranks' readers
    prepare_dataset(
        load_config(
            None,
            [
                f"data.root={root}",
                "data.synthesize=true",
                "data.synth.labeled=4",
                "data.synth.unlabeled=8",
                "data.synth.val=2",
                "data.synth.samples_per_shard=1",
            ],
        )
    )
    return root


def overrides(*settings):
    return [word for setting in (*SHRUNK_7B, *settings) for word in ("--set", setting)]


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_a_shape_reduced_7b_shards_and_under_fsdp2_resumes_exactly_and_exports_one_file(
    shards, tmp_path, backend, monkeypatch
):
    monkeypatch.setitem(BACKENDS, "fsdp2", (FSDP2_EVA, BACKENDS["fsdp2"][1]))
    # tests/fsdp_on_cpu.py runs as a script, with tests/ first on its path: import this tree's depmatch
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    straight = launch_two_processes(shards, tmp_path / "straight", backend, *overrides(), checkpoint_every=2)
    step2 = tmp_path / "straight" / "checkpoints" / "step_00000002"
    full = load_file(step2 / "student.safetensors")
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    assert any(name.startswith("encoder.vit.blocks.3.mlp.fc1_g") for name in full)  # the 7B's SwiGLU, 4 blocks
    assert full["encoder.vit.blocks.0.mlp.fc1_g.weight"].shape == (2 * WIDTH, WIDTH)

    # each rank saves its own shard: about half of the fp32 weights, and half of AdamW's two moments
    weights, optimizer = RANK_FILES[backend]
    for rank in (0, 1):
        weight_bytes = (step2 / weights.format(rank=rank)).stat().st_size
        optimizer_bytes = (step2 / optimizer.format(rank=rank)).stat().st_size
        weight_share = weight_bytes / full_bytes
        # ZeRO-3 saves the fp32 master weights with the moments: 3 parameter copies, FSDP2 2 (m, v)
        optimizer_share = optimizer_bytes / full_bytes / (3 if backend == "zero3" else 2)
        if backend == "zero3":
            weight_share = optimizer_share  # its model-states file holds no weights under ZeRO-3
        assert 0.45 < weight_share < 0.55 and 0.45 < optimizer_share < 0.55, (rank, weight_share, optimizer_share)

    if backend == "zero3":
        return  # ZeRO-3's exact resume is tests/test_training.py's (a DeepSpeed launch costs a minute here)
    # resumed from the sharded step-2 state: the same losses at steps 3 and 4, the same final weights
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed_dir / "best", ignore_errors=True)
    (resumed_dir / "metrics.jsonl").unlink()
    resumed = launch_two_processes(shards, resumed_dir, backend, *overrides(), "--resume", "latest", checkpoint_every=2)
    assert [r["loss"] for r in resumed if "loss" in r] == [
        r["loss"] for r in straight if r.get("step", 0) > 2 and "loss" in r
    ]
    final = lambda run: load_file(tmp_path / run / "checkpoints" / "step_00000004" / "student.safetensors")  # noqa: E731
    straight_final, resumed_final = final("straight"), final("resumed")
    assert all(torch.equal(value, resumed_final[name]) for name, value in straight_final.items())

    # export: one safetensors file, the consolidated student, loading into the model its config describes
    out = tmp_path / "export"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "depmatch",
            "export",
            "--checkpoint",
            str(tmp_path / "straight" / "checkpoints" / "step_00000004"),
            "--out",
            str(out),
            "--which",
            "student",
        ],
        check=True,
        capture_output=True,
    )
    assert sorted(path.name for path in out.glob("*.safetensors")) == ["model.safetensors"]
    exported = load_file(out / "model.safetensors")
    config = load_config(out / "config.yaml")
    build_model(config.model, config.num_classes).load_state_dict(exported)  # strict
    assert all(torch.equal(value, exported[name]) for name, value in straight_final.items())
