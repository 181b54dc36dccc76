"""CUDA paths against their CPU counterparts (skipped without a GPU; run them when one is lent).

python -m pytest -q -m gpu
"""

import json

import numpy as np
import pytest
import torch
from conftest import train_in_own_process
from loss_reference import synthetic_view

from depmatch.data.normalize import normalize
from depmatch.data.photometric import draw_strong_params, strong_view
from depmatch.losses import cddp_loss, uldr_loss
from depmatch.losses.cddp_uldr import pair_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _view(dtype):
    return synthetic_view(2, classes=6, channels=16, crop=112, feature_size=32, seed=3, dtype=dtype)


def _losses_and_grads(view, device, sizes=((8, 8), (11, 11)), dtype=None):
    """CDDP, ULDR and their gradients, left on `device` (inputs cast to `dtype` when given)."""
    features = view.features.detach().to(device, dtype).requires_grad_()  # a fresh leaf per call
    logits = view.logits.detach().to(device, dtype).requires_grad_()
    depth, probs, label, ignore = (t.to(device) for t in (view.depth, view.probs, view.pseudo_label, view.ignore))
    cddp = cddp_loss(features, depth, probs, label, ignore, size=sizes[0], inter_weight=1.0)  # the inter term too
    uldr = uldr_loss(logits, depth, label, ignore, size=sizes[1])
    (cddp + uldr).backward()
    return cddp.detach(), uldr.detach(), features.grad, logits.grad


def test_losses_on_cuda_match_the_cpu_in_float64():
    """The CUDA path runs over all pixels with masks (float64 has no kernel: the blocked path);
    the CPU path compacts: same values, same gradients."""
    view = _view(torch.float64)
    for cpu, cuda in zip(_losses_and_grads(view, "cpu"), _losses_and_grads(view, CUDA)):
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sizes", [((8, 8), (11, 11)), ((37, 37), (51, 51))], ids=["small", "pascal grids"])
def test_kernels_on_cuda_match_float64(sizes):
    """The Triton kernels (the CUDA default for float32) against the float64 CPU path, which
    tests/test_losses.py checks against the spec's loops. Float32 sums of up to 2601² pair
    terms per image: values within 1e-4 relative, gradients within 1e-3 of their largest entry."""
    view = synthetic_view(2, classes=6, channels=64, crop=224, feature_size=64, seed=5, dtype=torch.float64)
    expected = _losses_and_grads(view, "cpu", sizes)
    with pair_backend("triton"):
        got = _losses_and_grads(view, CUDA, sizes, dtype=torch.float32)
    for name, value, reference in zip(("cddp", "uldr", "features grad", "logits grad"), got, expected):
        assert value.dtype == torch.float32, name
        scale = reference.abs().max().item()
        assert scale > 0, name
        tolerance = dict(rtol=1e-4, atol=1e-12) if value.dim() == 0 else dict(rtol=1e-3, atol=1e-3 * scale)
        torch.testing.assert_close(value.cpu().double(), reference, **tolerance, msg=name)


@pytest.mark.parametrize("backend", ["triton", "blocked"])
def test_losses_on_cuda_never_wait_for_the_host(backend):
    """No .item(), .tolist() or data-dependent shape in forward or backward: the step keeps the GPU fed."""
    view = _view(torch.float32)
    on_device = view._replace(**{name: tensor.to(CUDA) for name, tensor in view._asdict().items()})
    with pair_backend(backend):
        _losses_and_grads(on_device, CUDA)  # warm-up: first calls may initialise lazily (and compile the kernels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            cddp, uldr, _, _ = _losses_and_grads(on_device, CUDA)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(cddp + uldr).item()


def test_loss_kernels_are_the_cuda_default_and_deterministic():
    """float32 on CUDA takes the kernels (same numbers as under pair_backend('triton')), and two
    runs give bit-identical values and gradients (per-program partials, no atomics)."""
    view = _view(torch.float32)
    default = _losses_and_grads(view, CUDA)
    with pair_backend("triton"):
        forced = _losses_and_grads(view, CUDA)
    for first, second in zip(default, forced):
        assert torch.equal(first, second)


def test_strong_views_on_cuda_match_the_cpu():
    generator = torch.Generator().manual_seed(0)
    weak = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=generator)
    rng = np.random.default_rng(0)
    params = torch.from_numpy(np.stack([draw_strong_params(rng) for _ in range(6)]))
    cpu = normalize(strong_view(weak, params))
    weak, params = weak.to(CUDA), params.to(CUDA)
    normalize(strong_view(weak, params))  # warm-up
    torch.cuda.set_sync_debug_mode("error")  # the step's augmentation never waits for the host either
    try:
        cuda = normalize(strong_view(weak, params))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-3, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_training_steps_on_cuda(tmp_path, precision):
    """A tiny UniMatch V2 + DepMatch run on the GPU: the loss falls, nothing is non-finite.
    In its own process: accelerate keeps one mixed-precision setting per process."""
    overrides = [f"data.root={tmp_path / 'shards'}", "data.synthesize=true", f"train.output_dir={tmp_path / 'run'}", "train.steps=40",
                 "train.log_every=1", "train.eval_every=40", "train.checkpoint_every=40",
                 f"train.mixed_precision={precision}"]  # fmt: skip
    results = train_in_own_process(overrides, "trainer.accelerator.device.type == 'cuda'")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "loss" in record]
    assert len(records) == 40  # a skipped (non-finite) step logs nothing
    first, last = (sum(r["loss_x"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert last < 0.8 * first
    assert results["student"] > 100 / 6


@pytest.mark.parametrize("head", ["dpt", "deeplabv3plus"])
def test_heads_keep_bf16_channels_last_maps_under_cuda_autocast(head):
    """CUDA autocast runs upsampling in fp32; the heads resize in the maps' dtype and layout, so
    the decoder features come out bf16 and channels_last, and no map is cast up and back."""
    from depmatch.config import ModelConfig
    from depmatch.models import build_model

    encoder = "vit_tiny" if head == "dpt" else "resnet18"
    model = build_model(ModelConfig(encoder=encoder, head=head), 5).to(CUDA)
    images = torch.randn(2, 3, 112, 112, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        features = model(images)["features"]
    assert features.dtype == torch.bfloat16
    assert features.is_contiguous(memory_format=torch.channels_last)


def test_a_training_step_on_cuda_never_waits_for_the_device(tmp_path):
    """UniMatch V2 + DepMatch with fused AdamW (fp32: accelerate keeps one precision per process): the second step (the first reads nothing
    late and allocates the optimizer state) runs under CUDA's sync check, which raises on any
    host sync; the CPU counterpart is tests/test_step.py's SyncCounter."""
    from depmatch.bench.step import synthetic_batches
    from depmatch.config import load_config
    from depmatch.engine.trainer import Trainer

    config = load_config(None, [f"train.output_dir={tmp_path}"])
    trainer = Trainer(config)
    assert trainer.skip_on_device
    raw_batches = [{name: value.to(CUDA) for name, value in batch.items()} for batch in synthetic_batches(config)]
    for check in ("default", "error"):
        batches = tuple(trainer.to_device(batch) for batch in raw_batches)
        torch.cuda.set_sync_debug_mode(check)
        try:
            parts = trainer.train_step(iter([batches]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert parts["nonfinite"].item() == 0.0
