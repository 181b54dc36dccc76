"""CDDP and ULDR against a direct loop over the formulas of method.md §3-§4, plus base losses."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from depmatch.config import CDDPConfig, ExperimentConfig, ULDRConfig
from depmatch.losses import cddp_loss, cddp_uldr, cross_entropy, masked_unlabeled_ce, ohem_cross_entropy, uldr_loss

# ---------------------------------------------------------------- loop references


def _resize_grid(features, depth, probs, pseudo_label, ignore, size):
    """The §2 resampling, done per map exactly as the spec words it."""
    resized = {}
    if features is not None:
        resized["features"] = F.interpolate(features, size=size, mode="bilinear", align_corners=True)
    resized["depth"] = F.interpolate(depth[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    if probs is not None:
        resized["probs"] = F.interpolate(probs, size=size, mode="bilinear", align_corners=True)
    resized["label"] = F.interpolate(pseudo_label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    resized["ignore"] = F.interpolate(ignore[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return resized


def cddp_loop(
    features, depth, probs, pseudo_label, ignore, size, sigma=1.0, inter_threshold=1.0, inter_weight=1.0, target="paper"
):
    """§3 as a loop; `target` swaps what the intra pairs compare (the forms other than the paper's:
    `similarity`, cos(f_i, f_j) against w; `distance`, δ against 1 - w)."""
    grid = _resize_grid(features, depth, probs, pseudo_label, ignore, size)
    batch = features.shape[0]
    total = features.new_zeros(())
    for b in range(batch):
        f = grid["features"][b].flatten(1).T  # N×C
        d = grid["depth"][b].flatten()
        p = grid["probs"][b].flatten(1).T  # N×K
        y = grid["label"][b].flatten()
        v = grid["ignore"][b].flatten() != 255
        n = f.shape[0]
        entropy = [-(p[i] * torch.log(p[i] + 1e-10)).sum() for i in range(n)]
        valid = [i for i in range(n) if v[i]]
        if not valid:
            continue

        def dist(i, j):
            if i == j:
                return f.new_zeros(())
            return torch.sqrt(((f[i] - f[j]) ** 2).sum())

        def intra_residual(i, j):
            w = torch.exp(-((d[i] - d[j]) ** 2) / (2 * sigma**2))
            if target == "similarity":
                norms = torch.sqrt((f[i] ** 2).sum()).clamp_min(1e-8) * torch.sqrt((f[j] ** 2).sum()).clamp_min(1e-8)
                return (f[i] * f[j]).sum() / norms - w
            return dist(i, j) - (1 - w if target == "distance" else w)

        classes = sorted({int(y[i]) for i in valid})
        intra_values = []
        for c in classes:
            members = [i for i in valid if int(y[i]) == c]
            s = f.new_zeros(())
            for i in members:
                for j in members:
                    s = s + intra_residual(i, j) ** 2 * torch.abs(entropy[i] - entropy[j])
            intra_values.append(s / len(members) ** 2)
        intra = torch.stack(intra_values).mean()
        inter_pairs = [(i, j) for i in valid for j in valid if int(y[i]) != int(y[j])]
        inter = f.new_zeros(())
        if inter_pairs:
            for i, j in inter_pairs:
                gap = torch.abs(d[i] - d[j])
                if gap > inter_threshold:
                    inter = inter + (dist(i, j) - gap) ** 2
            inter = inter / len(inter_pairs)
        total = total + intra + inter_weight * inter
    return total / batch


def uldr_loop(logits, depth, pseudo_label, ignore, size, conf_threshold=0.95, margin=0.2, inter_threshold=1.5):
    grid = _resize_grid(logits, depth, None, pseudo_label, ignore, size)
    batch = logits.shape[0]
    n = size[0] * size[1]
    total = logits.new_zeros(())
    uncertain_classes = set()
    for b in range(batch):
        z = grid["features"][b].flatten(1).T  # N×K
        q = z.softmax(1)
        d = grid["depth"][b].flatten()
        y = grid["label"][b].flatten()
        v = grid["ignore"][b].flatten() != 255
        uncertain = [i for i in range(n) if v[i] and q[i, int(y[i])] < conf_threshold]
        uncertain_classes |= {int(y[i]) for i in uncertain}
        for i in uncertain:
            for j in uncertain:
                ci, cj = int(y[i]), int(y[j])
                gap = torch.abs(d[i] - d[j])
                if ci == cj and gap < margin:
                    total = total + 1 - torch.sigmoid(z[i, ci] * z[j, ci])
                elif ci != cj and gap > inter_threshold:
                    total = total + torch.sigmoid(z[i, ci] * z[j, cj])
    return total / (batch * n**2 * max(1, len(uncertain_classes)))


# ---------------------------------------------------------------- inputs


def make_inputs(seed, batch=2, classes=4, channels=5, height=12, width=15, feat_hw=(6, 8), ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, *feat_hw, generator=g, dtype=torch.float64)
    logits = 3 * torch.randn(batch, classes, height, width, generator=g, dtype=torch.float64)
    probs = torch.randn(batch, classes, height, width, generator=g, dtype=torch.float64).mul(2).softmax(1)
    pseudo_label = probs.argmax(1)
    depth = 4 * torch.rand(batch, height, width, generator=g, dtype=torch.float64)
    ignore = torch.where(torch.rand(batch, height, width, generator=g) < ignore_fraction, 255, 0).long()
    return features, logits, probs, pseudo_label, depth, ignore


SIZES = [(4, 5), (3, 3), (1, 1), (6, 8)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", SIZES)
def test_cddp_matches_loop(seed, size):
    features, _, probs, pseudo_label, depth, ignore = make_inputs(seed)
    kwargs = dict(sigma=0.8, inter_threshold=0.7, inter_weight=0.5)
    expected = cddp_loop(features, depth, probs, pseudo_label, ignore, size, **kwargs)
    got = cddp_loss(features, depth, probs, pseudo_label, ignore, size=size, **kwargs)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", SIZES)
def test_uldr_matches_loop(seed, size):
    _, logits, _, pseudo_label, depth, ignore = make_inputs(seed)
    # A low confidence threshold leaves some pixels certain, so both branches of U_c matter.
    kwargs = dict(conf_threshold=0.7, margin=0.5, inter_threshold=1.0)
    expected = uldr_loop(logits, depth, pseudo_label, ignore, size, **kwargs)
    got = uldr_loss(logits, depth, pseudo_label, ignore, size=size, **kwargs)
    assert got.shape == ()
    if size[0] * size[1] > 1:
        assert expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)


def test_keyword_defaults_are_the_configs():
    """One default per setting: each loss keyword defaults to its key of depmatch.cddp / depmatch.uldr
    (train.ohem_* for the OHEM CE), so that a library call computes what a default training run does."""
    config = ExperimentConfig()
    expected = {
        cddp_loss: dataclasses.asdict(config.depmatch.cddp),
        uldr_loss: dataclasses.asdict(config.depmatch.uldr),
        ohem_cross_entropy: {"thresh": config.train.ohem_thresh, "min_kept": config.train.ohem_min_kept},
    }
    for loss, values in expected.items():
        defaults = {
            name: p.default for name, p in inspect.signature(loss).parameters.items() if p.default is not p.empty
        }
        assert defaults == {name: value for name, value in values.items() if name in defaults}, loss.__name__
        assert set(defaults) <= set(values), loss.__name__
    assert config.depmatch.cddp.inter_weight == 0.0  # the measured default, not the paper's β = 1


def test_defaults_match_loop_on_depth_scale_inputs():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(7)
    depth = depth * 5  # raw Depth Anything range, where the default thresholds bite
    cddp, uldr = CDDPConfig(), ULDRConfig()
    torch.testing.assert_close(
        cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5)),
        cddp_loop(
            features,
            depth,
            probs,
            pseudo_label,
            ignore,
            (4, 5),
            sigma=cddp.sigma,
            inter_threshold=cddp.inter_threshold,
            inter_weight=cddp.inter_weight,
            target=cddp.target,
        ),
        rtol=1e-5,
        atol=1e-12,
    )
    torch.testing.assert_close(
        uldr_loss(logits, depth, pseudo_label, ignore, size=(5, 6)),
        uldr_loop(
            logits,
            depth,
            pseudo_label,
            ignore,
            (5, 6),
            conf_threshold=uldr.conf_threshold,
            margin=uldr.margin,
            inter_threshold=uldr.inter_threshold,
        ),
        rtol=1e-5,
        atol=1e-12,
    )


def test_inter_weight_zero_drops_the_inter_term():
    features, _, probs, pseudo_label, depth, ignore = make_inputs(3)
    with_inter = cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5), inter_weight=1.0)
    without = cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5), inter_weight=0.0)
    inter_only = cddp_loop(features, depth, probs, pseudo_label, ignore, (4, 5), inter_weight=1.0) - cddp_loop(
        features, depth, probs, pseudo_label, ignore, (4, 5), inter_weight=0.0
    )
    assert inter_only > 0
    torch.testing.assert_close(with_inter - without, inter_only, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------- gradients


def test_cddp_gradcheck():
    features, _, probs, pseudo_label, depth, ignore = make_inputs(
        4, batch=2, channels=3, height=8, width=8, feat_hw=(4, 4)
    )
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: cddp_loss(f, depth, probs, pseudo_label, ignore, size=(4, 4), inter_threshold=0.5), (features,)
    )


def test_uldr_gradcheck():
    _, logits, _, pseudo_label, depth, ignore = make_inputs(5, batch=2, classes=3, height=8, width=8)
    logits = (logits / 3).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: uldr_loss(z, depth, pseudo_label, ignore, size=(4, 4), margin=1.0, inter_threshold=1.0), (logits,)
    )


def test_gradient_finite_with_duplicated_features():
    """Identical feature vectors (distance 0 off the diagonal) must not give NaN gradients."""
    features = torch.ones(1, 4, 3, 3, dtype=torch.float32, requires_grad=True)
    depth = torch.rand(1, 6, 6) * 5
    probs = torch.rand(1, 3, 6, 6).softmax(1)
    pseudo_label = probs.argmax(1)
    ignore = torch.zeros(1, 6, 6, dtype=torch.long)
    loss = cddp_loss(features, depth, probs, pseudo_label, ignore, size=(3, 3))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("block", [1, 5, 13])
def test_row_blocks_match_loop_value_and_gradient(monkeypatch, block):
    """Pair sums computed over many row blocks (and their transposes) give the loop's value and gradient."""
    monkeypatch.setattr(cddp_uldr, "_BLOCK", block)
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(10)
    size = (6, 8)
    for loss, loop, inputs, extra in (
        (
            cddp_loss,
            cddp_loop,
            (depth, probs, pseudo_label, ignore),
            dict(sigma=0.8, inter_threshold=0.7, inter_weight=0.5),
        ),
        (
            uldr_loss,
            uldr_loop,
            (depth, pseudo_label, ignore),
            dict(conf_threshold=0.7, margin=0.5, inter_threshold=1.0),
        ),
    ):
        differentiable = features if loss is cddp_loss else logits
        got_input = differentiable.clone().requires_grad_(True)
        expected_input = differentiable.clone().requires_grad_(True)
        got = loss(got_input, *inputs, size=size, **extra)
        expected = loop(expected_input, *inputs, size, **extra)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
        got.backward()
        expected.backward()
        torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 3, 12, 15), (4, 5)),
        ((2, 3, 6, 8), (6, 8)),
        ((2, 3, 6, 8), (13, 17)),
        ((1, 2, 1, 1), (3, 2)),
        ((2, 12, 15), (1, 1)),
    ],
)
def test_resize_is_bilinear_interpolation_with_aligned_corners(shape, size):
    maps = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    batched = maps if maps.dim() == 4 else maps.unsqueeze(1)
    expected = F.interpolate(batched, size=size, mode="bilinear", align_corners=True).reshape(shape[:-2] + size)
    got = cddp_uldr._resize_continuous(maps, size, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, maps, upstream)
    (got_grad,) = torch.autograd.grad(got, maps, upstream)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_value_without_gradient_is_the_same():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(11)
    with_grad = (
        cddp_loss(features.clone().requires_grad_(True), depth, probs, pseudo_label, ignore, size=(4, 5)),
        uldr_loss(logits.clone().requires_grad_(True), depth, pseudo_label, ignore, size=(5, 6)),
    )
    with torch.no_grad():
        without = (
            cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5)),
            uldr_loss(logits, depth, pseudo_label, ignore, size=(5, 6)),
        )
    for got, expected in zip(without, with_grad):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- edge cases


def edge_case_inputs():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(6, batch=2, classes=3)
    one_class = torch.zeros_like(pseudo_label)
    yield "all ignored", features, logits, probs, pseudo_label, depth, torch.full_like(ignore, 255)
    yield "one class everywhere", features, logits, probs, one_class, depth, torch.zeros_like(ignore)
    single = torch.full_like(ignore, 255)
    single[:, 0, 0] = 0
    yield "one valid pixel", features, logits, probs, pseudo_label, depth, single
    yield (
        "one image without valid pixel",
        features,
        logits,
        probs,
        pseudo_label,
        depth,
        torch.stack([torch.full_like(ignore[0], 255), torch.zeros_like(ignore[0])]),
    )


@pytest.mark.parametrize("case", list(edge_case_inputs()), ids=lambda case: case[0])
@pytest.mark.parametrize("size", [(4, 5), (1, 1)])
def test_edge_cases_finite_and_match_loop(case, size):
    _, features, logits, probs, pseudo_label, depth, ignore = case
    features = features.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    cddp = cddp_loss(features, depth, probs, pseudo_label, ignore, size=size, inter_weight=1.0)  # the loop's β
    uldr = uldr_loss(logits, depth, pseudo_label, ignore, size=size)
    (cddp + uldr).backward()
    for value in (cddp, uldr, features.grad, logits.grad):
        assert torch.isfinite(value).all()
    torch.testing.assert_close(
        cddp, cddp_loop(features, depth, probs, pseudo_label, ignore, size), rtol=1e-5, atol=1e-12
    )
    torch.testing.assert_close(uldr, uldr_loop(logits, depth, pseudo_label, ignore, size), rtol=1e-5, atol=1e-12)


def test_all_ignored_gives_exact_zero():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(8)
    ignore = torch.full_like(ignore, 255)
    assert cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 4)).item() == 0.0
    assert uldr_loss(logits, depth, pseudo_label, ignore, size=(4, 4)).item() == 0.0


def test_half_precision_inputs_are_computed_in_float32():
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(9)
    reference = cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5))
    half = cddp_loss(features.bfloat16(), depth.float(), probs.float(), pseudo_label, ignore, size=(4, 5))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), reference, rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------- base losses


def test_cross_entropy_ignores_255():
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    label[0, 0] = 255
    valid = label != 255
    log_probs = logits.log_softmax(1)
    expected = -log_probs.gather(1, label.clamp(max=2)[:, None])[:, 0][valid].mean()
    torch.testing.assert_close(cross_entropy(logits, label), expected)


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8) * 3
    label = torch.randint(0, 3, (1, 8, 8))
    label[0, :2] = 255
    probs = logits.softmax(1).gather(1, label.clamp(max=2)[:, None])[:, 0].flatten()
    losses = F.cross_entropy(logits, label, ignore_index=255, reduction="none").flatten()
    valid = label.flatten() != 255
    # Few min_kept: exactly the pixels at or below the threshold.
    hard = valid & (probs <= 0.7)
    torch.testing.assert_close(ohem_cross_entropy(logits, label, thresh=0.7, min_kept=1), losses[hard].mean())
    # Large min_kept: the min_kept hardest valid pixels.
    min_kept = int(valid.sum()) - 3
    order = probs[valid].sort().values
    kept = valid & (probs <= order[min_kept - 1])
    torch.testing.assert_close(ohem_cross_entropy(logits, label, thresh=0.0, min_kept=min_kept), losses[kept].mean())


def test_masked_unlabeled_ce_divides_by_valid_pixels():
    logits = torch.randn(2, 3, 5, 5)
    pseudo = torch.randint(0, 3, (2, 5, 5))
    confidence = torch.rand(2, 5, 5)
    ignore = torch.zeros(2, 5, 5, dtype=torch.long)
    ignore[1, :, :2] = 255
    losses = F.cross_entropy(logits, pseudo, reduction="none")
    valid = ignore != 255
    expected = losses[(confidence >= 0.5) & valid].sum() / valid.sum()
    torch.testing.assert_close(masked_unlabeled_ce(logits, pseudo, confidence, ignore, 0.5), expected)
    assert not math.isnan(masked_unlabeled_ce(logits, pseudo, confidence, torch.full_like(ignore, 255), 0.5).item())


# ---------------------------------------------------------------- compaction (CPU) and the all-pixel path (CUDA)


def uneven_inputs():
    """Three images whose uncertain (ULDR) and valid (CDDP) pixel counts differ widely, one of them 0."""
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(12, batch=3, classes=4)
    # Image 0: one class, every pixel confident (no uncertain pixel); image 1: two classes, uncertain
    # only along their border and in a small patch; image 2: random classes, every pixel uncertain.
    pseudo_label = pseudo_label.clone()
    pseudo_label[0] = 0
    pseudo_label[1] = 1
    pseudo_label[1, :, 8:] = 2
    logits = logits.clone()
    logits[:2] = 40 * F.one_hot(pseudo_label[:2], 4).permute(0, 3, 1, 2).double()
    logits[1, :, 2:5, 2:4] = 0
    logits[2] = 0.1 * logits[2]
    # For CDDP, image 0: nothing valid; image 1: a few valid pixels; image 2: all valid.
    cddp_ignore = torch.full_like(ignore, 255)
    cddp_ignore[1, 3:7, 4:9] = 0
    cddp_ignore[2] = 0
    return features, logits, probs, pseudo_label, depth, ignore, cddp_ignore


@pytest.mark.parametrize("compact", [True, False], ids=["compacted", "all pixels"])
@pytest.mark.parametrize("block", [3, 128])
def test_uneven_counts_across_the_batch_match_loop(monkeypatch, compact, block):
    """Per-image compaction (CPU) and the all-pixel path (CUDA) give the loop's value and gradient
    when the images' uncertain / valid counts differ widely, including 0."""
    monkeypatch.setattr(cddp_uldr, "_BLOCK", block)
    monkeypatch.setattr(cddp_uldr, "_forced_backend", "compact" if compact else "blocked")
    features, logits, probs, pseudo_label, depth, ignore, cddp_ignore = uneven_inputs()
    size = (6, 8)
    uldr_kwargs = dict(conf_threshold=0.9, margin=0.5, inter_threshold=1.0)
    grid = _resize_grid(logits, depth, None, pseudo_label, ignore, size)
    own_prob = grid["features"].softmax(1).gather(1, grid["label"][:, None])[:, 0].flatten(1)
    uncertain = ((own_prob < 0.9) & (grid["ignore"].flatten(1) != 255)).sum(1).tolist()
    assert uncertain[0] == 0 and 0 < uncertain[1] < 15 and uncertain[2] > 30, uncertain
    valid = (
        (_resize_grid(None, depth, None, pseudo_label, cddp_ignore, size)["ignore"].flatten(1) != 255).sum(1).tolist()
    )
    assert valid[0] == 0 and 0 < valid[1] < 15 and valid[2] == 48, valid
    cddp_kwargs = dict(sigma=0.8, inter_threshold=0.7, inter_weight=0.5)
    for loss, loop, differentiable, inputs, kwargs in (
        (uldr_loss, uldr_loop, logits, (depth, pseudo_label, ignore), uldr_kwargs),
        (cddp_loss, cddp_loop, features, (depth, probs, pseudo_label, cddp_ignore), cddp_kwargs),
    ):
        got_input = differentiable.clone().requires_grad_(True)
        expected_input = differentiable.clone().requires_grad_(True)
        got = loss(got_input, *inputs, size=size, **kwargs)
        expected = loop(expected_input, *inputs, size, **kwargs)
        assert expected > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
        got.backward()
        expected.backward()
        assert torch.isfinite(got_input.grad).all()
        torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_all_pixel_path_matches_loop(monkeypatch, seed):
    """The sync-free path over all pixels (what CUDA runs) against the loop, value and gradient, on CPU."""
    monkeypatch.setattr(cddp_uldr, "_forced_backend", "blocked")
    monkeypatch.setattr(cddp_uldr, "_BLOCK", 7)
    features, logits, probs, pseudo_label, depth, ignore = make_inputs(seed)
    for loss, loop, differentiable, inputs, kwargs in (
        (
            uldr_loss,
            uldr_loop,
            logits,
            (depth, pseudo_label, ignore),
            dict(conf_threshold=0.7, margin=0.5, inter_threshold=1.0),
        ),
        (
            cddp_loss,
            cddp_loop,
            features,
            (depth, probs, pseudo_label, ignore),
            dict(sigma=0.8, inter_threshold=0.7, inter_weight=0.5),
        ),
    ):
        got_input = differentiable.clone().requires_grad_(True)
        expected_input = differentiable.clone().requires_grad_(True)
        got = loss(got_input, *inputs, size=(6, 8), **kwargs)
        expected = loop(expected_input, *inputs, (6, 8), **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
        got.backward()
        expected.backward()
        torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("target", ["similarity", "distance"])
@pytest.mark.parametrize("backend", ["compact", "blocked"])
@pytest.mark.parametrize("inter_weight", [0.0, 0.5])
def test_cddp_targets_match_loop_on_each_torch_backend(monkeypatch, target, backend, inter_weight):
    """The forms other than the paper's (depmatch.cddp.target), value and gradient, on uneven counts
    (an image with no valid pixel, one with a few) and small blocks."""
    monkeypatch.setattr(cddp_uldr, "_BLOCK", 7)
    features, _, probs, pseudo_label, depth, _, cddp_ignore = uneven_inputs()
    kwargs = dict(sigma=0.8, inter_threshold=0.7, inter_weight=inter_weight, target=target)
    got_input = features.clone().requires_grad_(True)
    expected_input = features.clone().requires_grad_(True)
    with cddp_uldr.pair_backend(backend):
        got = cddp_loss(got_input, depth, probs, pseudo_label, cddp_ignore, size=(6, 8), **kwargs)
    expected = cddp_loop(expected_input, depth, probs, pseudo_label, cddp_ignore, (6, 8), **kwargs)
    assert expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=1e-5, atol=1e-12)
    paper = cddp_loss(features, depth, probs, pseudo_label, cddp_ignore, size=(6, 8), **{**kwargs, "target": "paper"})
    assert abs(paper.item() - got.item()) > 1e-3 * paper.item()  # the form changes the loss


def test_cddp_rejects_an_unknown_target():
    features, _, probs, pseudo_label, depth, ignore = make_inputs(0)
    with pytest.raises(ValueError, match="depmatch.cddp.target must be one of paper, similarity, distance"):
        cddp_loss(features, depth, probs, pseudo_label, ignore, size=(4, 5), target="cosine")
