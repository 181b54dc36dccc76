"""Per-GPU memory of the DepMatch training step, from the model's shapes: `depmatch bench --memory-model`.

The model is built on the meta device (no memory, any size), so the parameter counts are the
real ones. Per GPU it adds up, for plain accelerate (DDP), DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2:

* parameters, gradients and AdamW states, each in the dtype and sharding the backend keeps them
  (bf16 training: DeepSpeed keeps bf16 weights and gradients and fp32 master weights and moments;
  accelerate's DDP and FSDP2 keep fp32 weights and gradients and cast to bf16 for compute);
* the EMA teacher, a whole fp32 copy on every rank (it is copied before sharding);
* activations kept for the backward pass: per token and block, from the tensors a pre-norm ViT
  block saves under bf16 autocast with fused attention (no L×L matrix), the DPT head's maps at
  its four scales, and the full-resolution logits; with `model.grad_checkpointing` the encoder
  keeps only each block's input and recomputes one block at a time.

The step is UniMatch V2 + DepMatch (method.md §5): with `batch` images per view the student runs
with gradients on the labeled batch and on both strong views (3·batch images through the encoder),
and the head runs a fourth time on the strong views for CDDP's clean features (5·batch head passes).
Compared with the measured single-H200 peaks in tests/test_memory_model.py and docs/benchmarks/memory-model-cpu-2026-12-06.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
BACKENDS = ("plain", "zero2", "zero3", "fsdp2")
DEFAULT_ENCODERS = ("dinov3_s", "dinov3_b", "dinov3_l", "dinov3_h", "dinov3_7b")
# depmatch/engine/deepspeed/zero*.json: the reduce bucket (bf16 gradients) and ZeRO-3's prefetch bucket (bf16 weights)
REDUCE_BUCKET = 200_000_000
PREFETCH_BUCKET = 50_000_000
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Architecture:
    """What the memory depends on, read from the built model."""

    encoder_params: int
    head_params: int
    block_params: int  # the largest FSDP unit / ZeRO-3 gather
    width: int
    depth: int
    mlp_hidden: int
    gated_mlp: bool
    rope: bool
    tokens: int  # patch tokens + prefix tokens of one image
    grid: int  # patch rows (= columns) of a square crop
    head_features: int
    head_out_channels: tuple[int, ...]

    @property
    def params(self) -> int:
        return self.encoder_params + self.head_params


def architecture(encoder: str, crop: int) -> Architecture:
    """The encoder and DPT head of the bench preset or name `encoder`, built on the meta device."""
    from depmatch.bench.presets import encoder_settings
    from depmatch.config import ModelConfig
    from depmatch.models import build_model
    from depmatch.models.layers import round_to_patch

    settings = dict(encoder_settings(encoder))
    if settings.get("head_out_channels") is not None:
        settings["head_out_channels"] = tuple(settings["head_out_channels"])
    with torch.device("meta"):
        model = build_model(ModelConfig(**settings, random_init=True), num_classes=21)
    vit = model.encoder.vit
    block = vit.blocks[0]
    hidden = block.mlp.fc2.in_features
    grid = round_to_patch(crop, model.patch_size) // model.patch_size
    return Architecture(
        encoder_params=sum(p.numel() for p in model.encoder.parameters()),
        head_params=sum(p.numel() for p in model.head.parameters()),
        block_params=sum(p.numel() for p in block.parameters()),
        width=vit.embed_dim,
        depth=len(vit.blocks),
        mlp_hidden=hidden,
        gated_mlp=sum(p.numel() for name, p in block.mlp.named_parameters() if "fc1" in name and "weight" in name)
        == 2 * hidden * vit.embed_dim,
        rope=getattr(vit, "rope", None) is not None,
        tokens=grid * grid + model.encoder.num_prefix_tokens,
        grid=grid,
        head_features=model.head.lateral_convs[0].out_channels,
        head_out_channels=tuple(conv.out_channels for conv in model.head.projections),
    )


def block_activation_bytes_per_token(arch: Architecture) -> int:
    """Bytes one pre-norm ViT block saves for backward per token (bf16 autocast, fused attention).

    Attention half: the fp32 residual stream into LayerNorm (4C), its bf16 cast into qkv (2C), q, k, v
    (6C), the attention output into the projection (2C), the LayerScale input (2C); RoPE adds the
    rotated q and k (4C). MLP half: LayerNorm input (4C), fc1 input (2C), LayerScale input (2C), and per
    hidden channel the activation's input and fc2's input (4 bytes), or for a gated MLP both halves of
    fc1's output and the product (8 bytes).
    """
    width, hidden = arch.width, arch.mlp_hidden
    attention = (FP32 + BF16 + 3 * BF16 + BF16 + BF16) * width + (2 * BF16 * width if arch.rope else 0)
    mlp = (FP32 + BF16 + BF16) * width + (4 * BF16 if arch.gated_mlp else 2 * BF16) * hidden
    return attention + mlp


def head_activation_bytes_per_image(arch: Architecture) -> int:
    """The DPT head's saved maps for one image: each level's projection and resampling (out channels), its
    lateral conv and two residual units (features), the finest fusion output at 8× the patch grid and the
    classifier's 3×3 conv on it."""
    grid = arch.grid
    sides = (4 * grid, 2 * grid, grid, (grid + 1) // 2)
    projected = sum(2 * channels * side * side for channels, side in zip(arch.head_out_channels, sides))
    fused = sum(6 * arch.head_features * side * side for side in sides)  # lateral conv, 2 RCUs (2 convs each)
    finest = 4 * arch.head_features * (8 * grid) ** 2  # upsampled path, 1×1 conv, classifier conv, ReLU
    return BF16 * (projected + fused + finest)


@dataclass(frozen=True)
class StepShape:
    batch: int = 4  # images per view (labeled, unlabeled)
    crop: int = 518
    num_classes: int = 21

    @property
    def encoder_images(self) -> int:  # labeled + both strong views, with gradients
        return 3 * self.batch

    @property
    def head_passes(self) -> int:  # + the clean-feature pass over both strong views
        return 5 * self.batch


def activation_bytes(arch: Architecture, step: StepShape, checkpointing: bool) -> int:
    per_token = block_activation_bytes_per_token(arch)
    tokens = step.encoder_images * arch.tokens
    if checkpointing:  # each block's fp32 input, and one block recomputed at a time
        encoder = tokens * (arch.depth * FP32 * arch.width + per_token)
    else:
        encoder = tokens * arch.depth * per_token
    head = step.head_passes * head_activation_bytes_per_image(arch)
    # fp32 logits at full resolution: upsampled, softmax for the losses, and their gradient
    logits = step.encoder_images * 3 * FP32 * step.num_classes * step.crop**2
    return encoder + head + logits


@dataclass(frozen=True)
class Estimate:
    encoder: str
    backend: str
    gpus: int
    params: float  # GiB per GPU
    grads: float
    optimizer: float
    teacher: float
    activations: float
    activations_checkpointed: float

    @property
    def static(self) -> float:
        return self.params + self.grads + self.optimizer + self.teacher

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.static + self.activations_checkpointed


def state_bytes(arch: Architecture, backend: str, gpus: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per GPU."""
    params, shard = arch.params, arch.params / gpus
    if backend == "plain":  # fp32 weights and grads, AdamW m and v; DDP's own gradient buckets on > 1 GPU
        return FP32 * params, FP32 * params * (2 if gpus > 1 else 1), 2 * FP32 * params
    if backend == "zero2":  # bf16 weights whole; bf16 gradient partition and reduce bucket; fp32 master + m + v
        return BF16 * params, BF16 * shard + BF16 * REDUCE_BUCKET, 3 * FP32 * shard
    if backend == "zero3":  # bf16 weight shard plus the gathered prefetch window
        gathered = BF16 * min(params, PREFETCH_BUCKET + arch.block_params)
        return BF16 * shard + gathered, BF16 * shard + BF16 * min(params, REDUCE_BUCKET), 3 * FP32 * shard
    if backend == "fsdp2":  # fp32 shards; the block in use and the prefetched one gathered in bf16
        gathered = BF16 * min(params, 2 * arch.block_params)
        return FP32 * shard + gathered, FP32 * shard, 2 * FP32 * shard
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend}")


def estimate(
    encoder: str, backend: str, gpus: int, step: StepShape = StepShape(), arch: Architecture | None = None
) -> Estimate:
    arch = arch or architecture(encoder, step.crop)
    params, grads, optimizer = state_bytes(arch, backend, gpus)
    return Estimate(
        encoder=encoder,
        backend=backend,
        gpus=gpus,
        params=params / GIB,
        grads=grads / GIB,
        optimizer=optimizer / GIB,
        teacher=FP32 * arch.params / GIB,
        activations=activation_bytes(arch, step, checkpointing=False) / GIB,
        activations_checkpointed=activation_bytes(arch, step, checkpointing=True) / GIB,
    )


def markdown(estimates: list[Estimate]) -> str:
    header = (
        "| encoder | backend | GPUs | params | grads | optimizer | EMA teacher | activations | total | "
        "activations (ckpt) | total (ckpt) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for e in estimates:
        lines.append(
            f"| {e.encoder} | {e.backend} | {e.gpus} | {e.params:.1f} | {e.grads:.1f} | {e.optimizer:.1f} | "
            f"{e.teacher:.1f} | {e.activations:.1f} | {e.total:.1f} | {e.activations_checkpointed:.1f} | "
            f"{e.total_checkpointed:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    step = StepShape(batch=args.batch, crop=args.crop, num_classes=args.num_classes)
    encoders = args.encoders or list(DEFAULT_ENCODERS)
    estimates = []
    for encoder in encoders:
        arch = architecture(encoder, step.crop)
        estimates += [estimate(encoder, backend, gpus, step, arch) for backend in BACKENDS for gpus in args.gpus]
    table = markdown(estimates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.md").write_text(table + "\n")
    rows = [{**dataclasses.asdict(e), "total": e.total, "total_checkpointed": e.total_checkpointed} for e in estimates]
    (out / "memory.json").write_text(json.dumps({"step": dataclasses.asdict(step), "gib_per_gpu": rows}, indent=1))
    print(f"GiB per GPU, UniMatch V2 + DepMatch step, crop {step.crop}, {step.batch}+{step.batch} images per GPU")
    print(table)
    print(f"wrote {out / 'memory.md'}, {out / 'memory.json'}")
    return 0
