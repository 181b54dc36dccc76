"""Measure one benchmark configuration in this process: `python -m depmatch.bench.step SPEC_JSON OUT_JSON`.

The orchestrator (`depmatch bench`) runs every configuration in its own process, so that
accelerate/DeepSpeed state and the peak-memory counters start clean each time.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from depmatch.bench.ops import OpCounter
from depmatch.bench.presets import encoder_overrides, peak_tflops
from depmatch.bench.profile import profile_steps
from depmatch.config import load_config
from depmatch.data.photometric import draw_strong_params
from depmatch.losses import pair_backend


def synthetic_batches(config) -> tuple[dict, dict]:
    """Random labeled and unlabeled batches with the loader's shapes (docs/architecture.md)."""
    generator = torch.Generator().manual_seed(0)
    size, classes = config.data.crop_size, config.num_classes
    labeled_batch, unlabeled_batch = config.train.batch_size, config.train.unlabeled_batch_size

    def images(batch):
        return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)

    def strong_params(batch):
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=generator)))
        return torch.from_numpy(np.stack([draw_strong_params(rng) for _ in range(batch)]))

    def box(batch):
        boxes = torch.zeros(batch, size, size, dtype=torch.long)
        boxes[:, size // 4 : size // 2, size // 3 : 2 * size // 3] = 1
        return boxes

    labeled = {
        "image": images(labeled_batch),
        "label": torch.randint(0, classes, (labeled_batch, size, size), generator=generator),
    }
    unlabeled = {
        "image_weak": images(unlabeled_batch),
        "strong_params1": strong_params(unlabeled_batch),
        "strong_params2": strong_params(unlabeled_batch),
        "ignore": torch.zeros(unlabeled_batch, size, size, dtype=torch.long),
        "depth": torch.rand(unlabeled_batch, size, size, generator=generator) * 20,
        "cutmix_box1": box(unlabeled_batch),
        "cutmix_box2": box(unlabeled_batch),
    }
    return labeled, unlabeled


def overrides_for(spec: dict) -> list[str]:
    overrides = encoder_overrides(spec["encoder"]) + [
        "model.random_init=true",
        "model.pretrained=null",
        f"train.framework={spec['framework']}",
        f"depmatch.enabled={str(spec['depmatch']).lower()}",
        f"data.crop_size={spec['crop']}",
        f"train.batch_size={spec['batch']}",
        f"train.unlabeled_batch_size={spec['batch']}",
        f"train.output_dir={spec['output_dir']}",
        f"num_classes={spec['num_classes']}",
        f"train.compile={str(spec.get('compile', False)).lower()}",
        f"train.compile_mode={spec.get('compile_mode', 'default')}",
    ]
    if spec["precision"] != "no":
        overrides.append(f"train.mixed_precision={spec['precision']}")
    return overrides + spec.get("extra", [])


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process high-water mark


def student_step(trainer, raw_batches) -> None:
    """The student alone: one forward and backward over as many images as a step has, and the update."""
    labeled, unlabeled = (trainer.to_device(batch) for batch in raw_batches)
    images = torch.cat([labeled["image"], unlabeled["image_weak"]])
    labels = torch.cat([labeled["label"], labeled["label"]])
    with trainer.accelerator.autocast():
        loss = F.cross_entropy(trainer.student(images)["logits"].float(), labels, ignore_index=255)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def count_flops(step) -> int:
    """The FLOPs one call of `step` does (matrix products and convolutions, FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def build_step(spec: dict):
    """A Trainer for `spec` and one step of it on fixed batches already on the device: the training
    step, or with `spec["scope"]` "student" the student's forward, backward and update alone."""
    from depmatch.engine.trainer import Trainer

    trainer = Trainer(load_config(None, overrides_for(spec)))
    device = trainer.accelerator.device
    # On the device already, as the loader's next batch would be once copied; the step makes the
    # strong views and normalises, as training does.
    raw_batches = [
        {name: value.to(device) for name, value in batch.items()} for batch in synthetic_batches(trainer.config)
    ]
    if spec.get("scope") == "student":
        return trainer, lambda: student_step(trainer, raw_batches)

    def training_step():
        labeled, unlabeled = (trainer.to_device(batch) for batch in raw_batches)
        with trainer.accelerator.accumulate(trainer.student):
            trainer.forward_backward_step(labeled, unlabeled)

    return trainer, training_step


def measure(spec: dict) -> dict:
    """The configuration's timings (or op count); with `spec["profile"]` steps, their profile too, its
    op table and Chrome trace written into `spec["profile_dir"]`."""
    trainer, unsynchronized_step = build_step(spec)
    config = trainer.config  # the crop rounded to the encoder's patch size
    device = trainer.accelerator.device

    def step():
        unsynchronized_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # The warm-up steps compile (train.compile), so neither count nor time includes compilation.
    for _ in range(spec["warmup"]):
        step()
    identity = {
        **{k: spec[k] for k in ("scope", "encoder", "framework", "depmatch", "precision", "zero", "batch")},
        "crop": config.data.crop_size,  # as run: rounded to the encoder's patch size
        "compile": spec.get("compile", False),
        "overrides": " ".join(spec.get("extra", [])) or None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if spec.get("count_ops"):
        with OpCounter() as ops:
            step()
        return {**identity, "ops_per_step": ops.total, "computing_ops_per_step": ops.computing}
    flops = count_flops(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    step_time = sorted(times)[len(times) // 2]
    images = config.train.batch_size + config.train.unlabeled_batch_size  # labeled + unlabeled images per step
    peak = peak_tflops(identity["device"])
    achieved = flops / step_time / 1e12
    result = {
        **identity,
        "step_time_s": step_time,
        "images_per_s": images / step_time,
        "peak_memory_gib": peak_memory_gib(device),
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
    }
    if spec.get("profile"):
        stem = Path(spec["profile_dir"]) / spec["name"]
        trace = stem.with_suffix(".trace.json")
        result.update(
            profile_steps(step, spec["profile"], step_time * 1e3, table=stem.with_suffix(".txt"), trace=trace)
        )
    return result


def train_and_evaluate(spec: dict) -> dict[str, float]:
    """mIoU of the student and teacher after `train_steps` steps on the shards in `spec["shards"]`."""
    from depmatch.engine.trainer import Trainer
    from depmatch.train import prepare_dataset

    steps = spec["train_steps"]
    config = load_config(
        None,
        overrides_for(spec)
        + [
            f"data.root={spec['shards']}",
            f"data.synthesize={str(spec['synthesize']).lower()}",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
        ],
    )
    return Trainer(config, dataset=prepare_dataset(config)).train()


def main() -> int:
    spec = json.loads(sys.argv[1])
    # The op count runs the losses' pair sums on the path CUDA takes (bench --pair-backend).
    with pair_backend(spec["pair_backend"]) if spec.get("pair_backend") else contextlib.nullcontext():
        result = measure(spec)
    if spec.get("train_steps"):
        result.update({f"miou_{name}": value for name, value in train_and_evaluate(spec).items()})
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
