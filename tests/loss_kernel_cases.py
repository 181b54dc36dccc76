"""The Triton loss kernels against the float64 loops, run on CPU in Triton's interpreter.

Triton picks its interpreter when its decorators first run, so these cases need a process
started with TRITON_INTERPRET=1; `tests/test_loss_kernels.py` starts one:

    TRITON_INTERPRET=1 python -m pytest -q tests/loss_kernel_cases.py

The kernels compute in float32, the judges (`cddp_loop`, `uldr_loop` of test_losses.py and,
where the loop's gradient is undefined, the float64 class loops of reference.py) in float64.
Tolerances: values rtol 1e-5, gradients rtol 1e-4 plus atol 1e-5 · max|gradient|. The sums
run over at most 48² pairs per image, each term good to a few float32 ulps (1.2e-7), and
the Gram-identity distances lose about C · eps · |f|² / δ² relative, small for these
centred random features; measured errors are about 1e-7 relative for values and 1e-6 of
the largest gradient entry, so the bounds leave 10-100× room, while a wrong mask, factor or
normaliser moves values by far more than 1e-5.
"""

import contextlib
import os

import pytest
import torch
from loss_reference import cddp_loss_reference
from test_losses import cddp_loop, make_inputs, uldr_loop, uneven_inputs

from depmatch.bench.ops import OpCounter
from depmatch.losses import cddp_loss, cddp_uldr, uldr_loss
from depmatch.losses.cddp_uldr import pair_backend

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from the start of the process (see the docstring)", allow_module_level=True)

from depmatch.losses import kernels  # noqa: E402  (after the check: the decorators read the variable)

pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered in exp:RuntimeWarning"
)  # σ of very negative x in NumPy

CDDP_KWARGS = dict(sigma=0.8, inter_threshold=0.7, inter_weight=0.5)
ULDR_KWARGS = dict(conf_threshold=0.7, margin=0.5, inter_threshold=1.0)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-row tiles and 32-column steps: several programs per image, and 48 or 35 pixels leave partial tiles."""
    monkeypatch.setattr(kernels, "INTERPRETER_TILES", {"cddp": (16, 32), "uldr": (16, 32)})


def assert_value_and_grad(got, expected, got_input, expected_input):
    """Value and gradient of the kernel path (float32) against the float64 judge."""
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-12)
    got.backward()
    # The loops build no graph when no pair counts (e.g. a 1×1 grid): their gradient is 0.
    expected_grad = torch.zeros_like(expected_input)
    if expected.requires_grad:
        (expected_grad,) = torch.autograd.grad(expected, expected_input)
    assert got_input.grad.dtype == torch.float32 and torch.isfinite(got_input.grad).all()
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(got_input.grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * scale + 1e-12)


def run_cddp(features, depth, probs, pseudo_label, ignore, size, judge=cddp_loop, **kwargs):
    """CDDP through the kernel (float32 features) against `judge` (float64), value and gradient."""
    kwargs = {**CDDP_KWARGS, **kwargs}
    got_input = features.float().requires_grad_(True)
    expected_input = features.double().requires_grad_(True)
    with pair_backend("triton"):
        got = cddp_loss(got_input, depth, probs, pseudo_label, ignore, size=size, **kwargs)
    if judge is cddp_loop:
        expected = cddp_loop(expected_input, depth, probs, pseudo_label, ignore, size, **kwargs)
    else:
        expected = judge(expected_input, depth, probs, pseudo_label, ignore, size=size, **kwargs)
    assert got.dtype == torch.float32
    assert_value_and_grad(got, expected, got_input, expected_input)
    return got, got_input.grad


def run_uldr(logits, depth, pseudo_label, ignore, size, **kwargs):
    """ULDR through the kernel (float32 logits) against the float64 loop, value and gradient."""
    kwargs = {**ULDR_KWARGS, **kwargs}
    got_input = logits.float().requires_grad_(True)
    expected_input = logits.double().requires_grad_(True)
    with pair_backend("triton"):
        got = uldr_loss(got_input, depth, pseudo_label, ignore, size=size, **kwargs)
    expected = uldr_loop(expected_input, depth, pseudo_label, ignore, size, **kwargs)
    assert got.dtype == torch.float32
    assert_value_and_grad(got, expected, got_input, expected_input)
    return got, got_input.grad


@pytest.mark.parametrize("seed, size", [(0, (6, 8)), (1, (5, 7)), (2, (1, 1))])
def test_random_inputs_match_loops(seed, size):
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(seed)
    cddp, _ = run_cddp(features, depth, probs, pseudo_label, ignore, size)
    uldr, _ = run_uldr(logits, depth, pseudo_label, ignore, size)
    if size != (1, 1):
        assert cddp > 0 and uldr > 0


def test_the_gpu_tiles(monkeypatch):
    """The tiles the GPU runs with for these inputs (a 48-pixel image in two row blocks and one column step)."""
    monkeypatch.setattr(kernels, "INTERPRETER_TILES", {"cddp": kernels.CDDP_TILES[64], "uldr": kernels.ULDR_TILE})
    assert kernels.cddp_tiles(5) == (32, 64, 16) and kernels.uldr_tiles() == (32, 128)
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(3)
    run_cddp(features, depth, probs, pseudo_label, ignore, (6, 8))
    run_uldr(logits, depth, pseudo_label, ignore, (6, 8))


def test_empty_classes():
    """Labels use 2 of 6 classes, so most classes have no pixel (|S_c| = 0 must not enter any normaliser)."""
    features, logits, probs, _, depth, ignore = make_inputs(4, classes=6)
    pseudo_label = torch.where(probs.argmax(1) < 3, 1, 4)
    run_cddp(features, depth, probs, pseudo_label, ignore, (6, 8))
    run_uldr(logits, depth, pseudo_label, ignore, (6, 8))


def test_all_ignored_is_exactly_zero_with_zero_gradient():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(5)
    ignore = torch.full_like(ignore, 255)
    cddp, cddp_grad = run_cddp(features, depth, probs, pseudo_label, ignore, (6, 8))
    uldr, uldr_grad = run_uldr(logits, depth, pseudo_label, ignore, (6, 8))
    assert cddp.item() == 0.0 and uldr.item() == 0.0
    assert not cddp_grad.any() and not uldr_grad.any()


def test_one_class_only():
    """No inter-class pair: CDDP is its intra term, ULDR has only pulled pairs."""
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(6)
    one_class = torch.zeros_like(pseudo_label)
    cddp, _ = run_cddp(features, depth, probs, one_class, ignore, (6, 8))
    uldr, _ = run_uldr(logits, depth, one_class, ignore, (6, 8))
    assert cddp > 0 and uldr > 0


def test_single_valid_pixel():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(7)
    ignore = torch.full_like(ignore, 255)
    ignore[:, 0, 0] = 0
    cddp, cddp_grad = run_cddp(features, depth, probs, pseudo_label, ignore, (6, 8))
    # ULDR's pixel pairs with itself: σ(-s²) when uncertain, so the value is not 0.
    uldr, uldr_grad = run_uldr(logits, depth, pseudo_label, ignore, (6, 8), conf_threshold=1.0)
    assert cddp.item() == 0.0 and not cddp_grad.any()
    assert uldr > 0 and uldr_grad.count_nonzero() > 0


def test_uneven_counts_across_the_batch():
    """Per-image valid (CDDP) and uncertain (ULDR) counts of 0, a few, and all pixels."""
    features, logits, probs, pseudo_label, depth, ignore, cddp_ignore = uneven_inputs()
    run_cddp(features, depth, probs, pseudo_label, cddp_ignore, (6, 8))
    run_uldr(logits, depth, pseudo_label, ignore, (6, 8), conf_threshold=0.9)


@pytest.mark.parametrize("target", ["similarity", "distance"])
@pytest.mark.parametrize("inter_weight", [0.0, 0.5])
def test_cddp_targets_other_than_the_paper(target, inter_weight):
    """depmatch.cddp.target: the kernel's similarity measure and flipped target, against the loop
    (the torch backends are checked against the same loop in test_losses.py), β on and off."""
    features, _, probs, pseudo_label, depth, _, cddp_ignore = uneven_inputs()
    run_cddp(features, depth, probs, pseudo_label, cddp_ignore, (6, 8), inter_weight=inter_weight, target=target)


def test_duplicated_features_give_distance_zero_and_a_finite_gradient():
    """Blocks of identical feature vectors (δ = 0 off the diagonal). The loop's sqrt has no gradient
    at 0, so the judge is reference.py's float64 class loop, whose distance has gradient 0 there."""
    features, _, probs, pseudo_label, depth, ignore = make_inputs(8, feat_hw=(6, 8))
    features = features.clone()
    features[:, :, :3] = features[:, :, :1]  # the grid is the feature map: rows 0-2 share their features
    features[1] = 1.0  # every pixel of image 1 has the same feature
    run_cddp(features, depth, probs, pseudo_label, ignore, (6, 8), judge=cddp_loss_reference)
    # The value also equals the spec loop's (exact zeros there).
    with pair_backend("triton"):
        value = cddp_loss(features.float(), depth, probs, pseudo_label, ignore, size=(6, 8), **CDDP_KWARGS)
    expected = cddp_loop(features, depth, probs, pseudo_label, ignore, (6, 8), **CDDP_KWARGS)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-12)


def test_without_gradient_same_value():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(9)
    with pair_backend("triton"), torch.no_grad():
        cddp = cddp_loss(features.float(), depth, probs, pseudo_label, ignore, size=(5, 7), **CDDP_KWARGS)
        uldr = uldr_loss(logits.float(), depth, pseudo_label, ignore, size=(5, 7), **ULDR_KWARGS)
    torch.testing.assert_close(
        cddp.double(), cddp_loop(features, depth, probs, pseudo_label, ignore, (5, 7), **CDDP_KWARGS)
    )
    torch.testing.assert_close(uldr.double(), uldr_loop(logits, depth, pseudo_label, ignore, (5, 7), **ULDR_KWARGS))


def test_bfloat16_inputs_are_computed_in_float32():
    """bf16 features and logits: the losses' float32 compute tensors reach the kernels, as on the torch path."""
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(10)
    features, logits = features.bfloat16(), logits.bfloat16()
    for loss, differentiable, inputs, kwargs in (
        (cddp_loss, features, (depth, probs, pseudo_label, ignore), CDDP_KWARGS),
        (uldr_loss, logits, (depth, pseudo_label, ignore), ULDR_KWARGS),
    ):
        grads = []
        for backend in ("triton", "compact"):
            leaf = differentiable.clone().requires_grad_(True)
            with pair_backend(backend):
                value = loss(leaf, *inputs, size=(6, 8), **kwargs)
            value.backward()
            grads.append((value, leaf.grad))
        (triton_value, triton_grad), (torch_value, torch_grad) = grads
        assert triton_value.dtype == torch.float32 and triton_grad.dtype == torch.bfloat16
        torch.testing.assert_close(triton_value, torch_value, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(
            triton_grad.float(), torch_grad.float(), rtol=2e-2, atol=1e-2 * torch_grad.abs().max().item()
        )


def test_float64_falls_back_to_the_blocked_path():
    features, _, probs, pseudo_label, depth, ignore = make_inputs(11)
    counter = OpCounter()
    with pair_backend("triton"), counter:
        value = cddp_loss(features, depth, probs, pseudo_label, ignore, size=(6, 8), **CDDP_KWARGS)
    assert counter.counts["cddp_pairs"] == 0
    torch.testing.assert_close(value, cddp_loop(features, depth, probs, pseudo_label, ignore, (6, 8), **CDDP_KWARGS))


def count_forward_backward(backend, loss, differentiable, inputs, size, **kwargs):
    """The op counter of one forward + backward, after one uncounted call (which builds the cached resampling plans)."""
    counter = OpCounter()
    for mode in (contextlib.nullcontext(), counter):
        leaf = differentiable.float().requires_grad_(True)
        with pair_backend(backend), mode:
            loss(leaf, *inputs, size=size, **kwargs).backward()
    return counter


@pytest.mark.parametrize("name, bound", [("cddp", 110), ("uldr", 75)])
def test_each_pair_sum_is_one_op(monkeypatch, name, bound):
    """Under the triton backend a loss's pair sum is one dispatched op, and the loss's forward and
    backward take a fixed number of ops (resampling and normalisers: 103 for CDDP, 68 for ULDR,
    views included, at any size); the blocked path's count grows with its row blocks (here 4
    blocks of 25 on a 10×10 grid; 11 and 21 blocks at Pascal size)."""
    monkeypatch.undo()  # the interpreter's big tiles: one program per image
    monkeypatch.setattr(cddp_uldr, "_BLOCK", 25)
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(12, height=20, width=20, feat_hw=(10, 10))
    if name == "cddp":
        args = (cddp_loss, features, (depth, probs, pseudo_label, ignore), (10, 10))
    else:
        args = (uldr_loss, logits, (depth, pseudo_label, ignore), (10, 10))
    kernel_ops = count_forward_backward("triton", *args)
    blocked_ops = count_forward_backward("blocked", *args)
    assert kernel_ops.counts[f"{name}_pairs"] == 1
    assert kernel_ops.total <= bound
    # The ops that replace the one kernel op: about 90 (CDDP) or 50 (ULDR) per row block.
    pair_ops = blocked_ops.total - (kernel_ops.total - 1)
    assert pair_ops >= 4 * 40, (blocked_ops.total, kernel_ops.total)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the pure resampling plans
def test_compiles_without_graph_break():
    """torch.compile traces both losses, forward and backward, as one graph (fullgraph raises on a
    break) through the ops' fake implementations; aot_eager runs the traced graphs, with the op inside."""
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(13)

    def both(features, logits):
        return cddp_loss(features, depth, probs, pseudo_label, ignore, size=(5, 7), **CDDP_KWARGS) + uldr_loss(
            logits, depth, pseudo_label, ignore, size=(5, 7), **ULDR_KWARGS
        )

    results = []
    with pair_backend("triton"):
        for function in (both, torch.compile(both, backend="aot_eager", fullgraph=True)):
            leaves = features.float().requires_grad_(True), logits.float().requires_grad_(True)
            value = function(*leaves)
            value.backward()
            results.append((value, *(leaf.grad for leaf in leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-9)
    assert results[0][0] > 0 and results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0
