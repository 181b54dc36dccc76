"""`depmatch bench`: its report arithmetic and one real measured configuration."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from depmatch.bench.cli import launch_environment, register, shipped_deepspeed_config
from depmatch.bench.ops import OpCounter
from depmatch.bench.presets import ENCODER_PRESETS, peak_tflops
from depmatch.bench.report import markdown_table
from depmatch.bench.step import overrides_for
from depmatch.config import load_config


def test_peak_tflops_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("cpu") is None


@pytest.mark.parametrize("encoder", sorted(ENCODER_PRESETS))
def test_every_preset_makes_a_valid_config(encoder, tmp_path):
    spec = {
        "encoder": encoder,
        "framework": "fixmatch",
        "depmatch": False,
        "precision": "bf16",
        "crop": 518,
        "batch": 4,
        "output_dir": str(tmp_path),
        "num_classes": 21,
    }
    config = load_config(None, overrides_for(spec))
    assert config.model.encoder == ENCODER_PRESETS[encoder]["encoder"]
    assert config.train.mixed_precision == "bf16"
    assert not config.depmatch.enabled
    assert (config.train.batch_size, config.train.unlabeled_batch_size, config.data.crop_size) == (4, 4, 518)


def test_markdown_table_formats_and_drops_empty_columns():
    result = {
        "encoder": "dinov2_s",
        "framework": "unimatch_v2",
        "depmatch": True,
        "precision": "bf16",
        "zero": "2",
        "crop": 518,
        "batch": 4,
        "step_time_s": 0.5,
        "images_per_s": 16.0,
        "peak_memory_gib": 12.345,
        "tflop_per_step": 3.0,
        "achieved_tflops": 6.0,
        "mfu": 0.25,
        "miou_student": None,
    }
    lines = markdown_table([result]).splitlines()
    assert lines[0].split(" | ")[-1] == "MFU |"
    assert "mIoU" not in lines[0]
    assert (
        lines[2]
        == "| dinov2_s | unimatch_v2 | True | bf16 | 2 | 518 | 4 | 0.500 | 16.0 | 12.35 | 3.000 | 6.00 | 25.0% |"
    )


@pytest.mark.slow
def test_bench_measures_a_tiny_configuration(tmp_path):
    command = [
        sys.executable,
        "-m",
        "depmatch",
        "bench",
        "--encoders",
        "vit_tiny",
        "--depmatch",
        "on",
        "--crop",
        "28",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--profile",
        "1",
        "--out",
        str(tmp_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert result["images_per_s"] == pytest.approx(4 / result["step_time_s"])
    # --profile: the CPU launches no kernel; the op table and the trace name the step's ops
    assert result["kernel_ms_per_step"] == 0 and result["launches_per_step"] == 0
    assert "aten::" in (tmp_path / "profiles" / "run1.txt").read_text()
    assert any(row["name"] == "aten::addmm" for row in result["top_host"])
    assert json.loads((tmp_path / "profiles" / "run1.trace.json").read_text())["traceEvents"]
    assert result["achieved_tflops"] == pytest.approx(result["tflop_per_step"] / result["step_time_s"])
    assert result["tflop_per_step"] > 0 and result["mfu"] is None
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| vit_tiny | unimatch_v2 | True |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    "zero,stage,offload", [("0", None, None), ("2", "2", None), ("3", "3", None), ("3-offload", "3", "cpu")]
)
def test_zero_choice_becomes_a_one_process_deepspeed_launch(zero, stage, offload, monkeypatch):
    for name in (
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    env = launch_environment(zero, "bf16")
    assert env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == stage
    assert env.get("ACCELERATE_USE_DEEPSPEED") == ("true" if stage else None)
    assert env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") == offload
    assert env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") == offload


@pytest.mark.parametrize("zero", ["2", "3", "3-offload"])
def test_zero_runs_hand_accelerate_the_shipped_deepspeed_json(zero, monkeypatch):
    """The bench measures the DeepSpeed settings users launch (depmatch/engine/deepspeed/*.json: overlap,
    buckets, contiguous gradients), not accelerate's defaults for a bare stage."""
    from accelerate.utils import DeepSpeedPlugin

    for name, value in launch_environment(zero, "bf16").items():
        monkeypatch.setenv(name, value)
    handed = dict(DeepSpeedPlugin().deepspeed_config)
    handed.pop("steps_per_print")  # accelerate silences DeepSpeed's own logging
    assert handed == json.loads(shipped_deepspeed_config(zero).read_text())


def test_zero_runs_refuse_a_precision_the_shipped_json_does_not_train_in(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--zero", "2", "--precision", "fp16", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "depmatch/engine/deepspeed/zero2.json, which trains in bf16" in capsys.readouterr().err


def test_op_counter_counts_each_dispatched_op():
    """Four aten ops, one of them a view that computes nothing; ops before the block are not counted."""
    x = torch.ones(3)
    y = x + 1
    with OpCounter() as ops:
        z = (y * 2).view(3, 1)
        torch.relu(z).sum()
    assert dict(ops.counts) == {"mul": 1, "view": 1, "relu": 1, "sum": 1}
    assert (ops.total, ops.computing) == (4, 3)


@pytest.mark.slow
def test_bench_counts_the_ops_of_a_step(tmp_path):
    """--count-ops: one row per configuration with the step's op counts, DepMatch adding ops."""
    command = [
        sys.executable,
        "-m",
        "depmatch",
        "bench",
        "--encoders",
        "vit_tiny",
        "--depmatch",
        "off",
        "on",
        "--count-ops",
        "--crop",
        "28",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    off, on = json.loads((tmp_path / "bench.json").read_text())
    assert (off["depmatch"], on["depmatch"]) == (False, True)
    assert 0 < off["computing_ops_per_step"] < off["ops_per_step"] < on["ops_per_step"]
    assert "step_time_s" not in on
    assert f"| {on['ops_per_step']:,} | {on['computing_ops_per_step']:,} |" in (tmp_path / "bench.md").read_text()


def test_encoder_names_beyond_the_presets_make_configs():
    from depmatch.bench.presets import encoder_settings, unknown_encoder

    assert encoder_settings("dinov3_7b") == {
        "encoder": "dinov3_7b",
        "head": "dpt",
        "head_features": 384,
        "head_out_channels": [1536, 1536, 1536, 1536],
    }
    assert encoder_settings("dinov3_h")["head_out_channels"] == [320, 640, 1280, 1280]
    assert encoder_settings("transformers:dinov3_s") == {**ENCODER_PRESETS["dinov3_s"], "backend": "transformers"}
    assert encoder_settings("vit_small_patch16_224.augreg_in21k") == {
        "encoder": "vit_small_patch16_224.augreg_in21k",
        "head": "dpt",
        "head_features": None,
        "head_out_channels": None,
    }
    assert encoder_settings("facebook/dinov3-vits16-pretrain-lvd1689m")["backend"] == "transformers"
    assert encoder_settings("resnet34") == {"encoder": "resnet34", "head": "deeplabv3plus"}
    assert [unknown_encoder(name) for name in ("dinov3_s", "transformers:dinov2_b", "eva02_small_patch14_224")] == [
        None
    ] * 3
    assert "--encoders: dinov9_s is neither a preset" in unknown_encoder("dinov9_s")


@pytest.mark.slow
def test_bench_times_a_mix_of_families_at_their_patch_sizes(tmp_path):
    """Presets, a timm name and a transformers backbone in one run, shape-reduced (random init): each row
    runs the real model at a crop rounded to its patch size, and more blocks cost more FLOPs."""
    encoders = ["vit_tiny", "dinov3_s", "vit_small_patch16_224.augreg_in21k", "transformers:dinov3_s"]
    command = [
        sys.executable,
        "-m",
        "depmatch",
        "bench",
        "--encoders",
        *encoders,
        "--depmatch",
        "on",
        "--crop",
        "28",
        "--batch",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
        "--set",
        "model.depth=4",
        "--set",
        "model.embed_dim=32",
        "--set",
        "model.num_heads=2",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = {r["encoder"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert sorted(results) == sorted(encoders)
    assert {name: r["crop"] for name, r in results.items()} == {
        "vit_tiny": 28,
        "dinov3_s": 32,
        "vit_small_patch16_224.augreg_in21k": 32,
        "transformers:dinov3_s": 32,
    }
    assert all(r["tflop_per_step"] > 0 and r["step_time_s"] > 0 for r in results.values())
    # the same DINOv3 architecture through timm and transformers: the same FLOPs to within the attention's
    # implementation details (RoPE, fused attention count alike; a few percent at most)
    timm_flops, transformers_flops = (
        results["dinov3_s"]["tflop_per_step"],
        results["transformers:dinov3_s"]["tflop_per_step"],
    )
    assert transformers_flops == pytest.approx(timm_flops, rel=0.05)
    bad = subprocess.run(
        [sys.executable, "-m", "depmatch", "bench", "--encoders", "dinov9_s", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --encoders: dinov9_s is neither a preset")
