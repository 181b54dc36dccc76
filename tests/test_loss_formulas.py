"""CDDP and ULDR against method.md §3-§4 read literally, on grids small enough to work out by hand.

The loop references elsewhere were written from a reading of the spec, so a misreading repeats
in them (ULDR's N² normaliser was lost that way). Here every expected value is arithmetic on
the inputs, one term per comment. The maps are given at the grid size, where the §2
resampling is the identity (bilinear with aligned corners and nearest both return the map),
so that each grid pixel's value is the one written below.
"""

import math

import pytest
import torch

from depmatch.losses import cddp_loss, uldr_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def entropy(*probs: float) -> float:
    """e_i = -Σ_k p_ik · log(p_ik + 1e-10), as §3 defines it (the 1e-10 included)."""
    return -sum(p * math.log(p + 1e-10) for p in probs)


def two_class_logits(own_logits, labels):
    """K=2 logits (H×W lists): the own class gets `own_logits`, the other class 0, so q_own = σ(z_own)."""
    own = torch.tensor(own_logits, dtype=torch.float64)
    label = torch.tensor(labels)
    logits = torch.zeros(2, *own.shape, dtype=torch.float64)
    logits.scatter_(0, label.unsqueeze(0), own.unsqueeze(0))
    return logits


# ---------------------------------------------------------------- ULDR (§4)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(2, 2), (2, 3), (5, 5)])
def test_uldr_scale_check(batch, size):
    """§4's scale check: every pixel valid, uncertain, of one class, at one depth, logits 0.

    Each of the B·N² ordered pairs (i = j included) is pulled (|Δd| = 0 < m) and costs
    1 - σ(0·0) = 0.5; |C_U| = 1; so L = B·N²·0.5 / (B·N²·1) = 0.5 whatever the grid and batch.
    The input is larger than the grid: the resampling keeps a constant map constant.
    """
    logits = torch.zeros(batch, 4, 20, 30, dtype=torch.float64, requires_grad=True)
    depth = torch.full((batch, 20, 30), 7.0, dtype=torch.float64)
    label = torch.zeros(batch, 20, 30, dtype=torch.long)
    ignore = torch.zeros(batch, 20, 30, dtype=torch.long)
    loss = uldr_loss(logits, depth, label, ignore, size=size)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)


def uldr_case():
    """A 2×3 grid, K = 2, two images; the first has every kind of pixel and pair.

    Image 0, pixels row-major (class, own logit z, depth, ignore):
      p0 (0, 1.0, 5.0)  p1 (0, 2.0, 5.125)  p2 (0, 4.0, 5.0)
      p3 (1, 0.5, 8.0)  p4 (1, 1.0, 5.0)  p5 (0, 0.0, 5.0, ignored)
    q_own = σ(z): p0 .731, p1 .881, p3 .622, p4 .731 are uncertain (< 0.95); p2 (σ(4) = .982)
    is certain; p5 is not valid. So U_0 = {p0, p1}, U_1 = {p3, p4}.
    Image 1: every pixel class 1 with own logit 5 (σ(5) = .993): nothing uncertain.
    """
    labels0 = [[0, 0, 0], [1, 1, 0]]
    logits0 = two_class_logits([[1.0, 2.0, 4.0], [0.5, 1.0, 0.0]], labels0)
    labels1 = [[1, 1, 1], [1, 1, 1]]
    logits1 = two_class_logits([[5.0] * 3] * 2, labels1)
    logits = torch.stack([logits0, logits1])
    depth = torch.tensor(
        [[[5.0, 5.125, 5.0], [8.0, 5.0, 5.0]], [[5.0, 9.0, 1.0], [5.0, 5.0, 5.0]]], dtype=torch.float64
    )
    label = torch.tensor([labels0, labels1])
    ignore = torch.zeros(2, 2, 3, dtype=torch.long)
    ignore[0, 1, 2] = 255
    return logits, depth, label, ignore


def test_uldr_by_hand():
    logits, depth, label, ignore = uldr_case()
    logits.requires_grad_(True)
    loss = uldr_loss(logits, depth, label, ignore, size=(2, 3))  # m = 0.2, τ_u = 1.5, τ_conf = 0.95

    pulled = (
        (1 - sigmoid(1.0 * 1.0))  # (p0, p0): class 0, |Δd| 0 < 0.2
        + (1 - sigmoid(2.0 * 2.0))  # (p1, p1)
        + 2 * (1 - sigmoid(1.0 * 2.0))  # (p0, p1) and (p1, p0): |Δd| 0.125 < 0.2
        + (1 - sigmoid(0.5 * 0.5))  # (p3, p3): class 1
        + (1 - sigmoid(1.0 * 1.0))  # (p4, p4); (p3, p4) is not pulled: |Δd| 3.0
    )
    pushed = (
        2 * sigmoid(1.0 * 0.5)  # (p0, p3), (p3, p0): classes 0/1, |Δd| 3.0 > 1.5
        + 2 * sigmoid(2.0 * 0.5)  # (p1, p3), (p3, p1): |Δd| 2.875 > 1.5
        # (p0, p4), (p1, p4) and their mirrors: |Δd| 0 and 0.125, not > 1.5
    )
    batch, num_pixels, uncertain_classes = 2, 6, 2  # N counts the ignored pixel; C_U = {0, 1}
    expected = (pulled + pushed) / (batch * num_pixels**2 * uncertain_classes)
    assert loss.item() == pytest.approx(expected, rel=1e-12)

    # p4 enters only its own pair (p4, p4): d/dz4 [1 - σ(z4²)] = -σ'(z4²) · 2 z4 at z4 = 1.
    loss.backward()
    expected_grad_p4 = -sigmoid(1.0) * (1 - sigmoid(1.0)) * 2 * 1.0 / 144
    assert logits.grad[0, 1, 1, 1].item() == pytest.approx(expected_grad_p4, rel=1e-10)
    # The other class's logit, certain, ignored pixels and the second image get no gradient.
    assert logits.grad[0, 0, 1, 1].item() == 0.0
    assert logits.grad[0, :, 0, 2].abs().max().item() == 0.0
    assert logits.grad[0, :, 1, 2].abs().max().item() == 0.0
    assert logits.grad[1].abs().max().item() == 0.0


def test_uldr_thresholds_are_strict():
    """|Δd| exactly m is not pulled and exactly τ_u is not pushed (depths chosen exact in binary)."""
    logits, depth, label, ignore = uldr_case()
    # m = 0.125 keeps (p0, p1) (|Δd| 0.125) out; τ_u = 2.875 keeps (p1, p3) (|Δd| 2.875) out.
    loss = uldr_loss(logits, depth, label, ignore, size=(2, 3), margin=0.125, inter_threshold=2.875)
    pulled = (1 - sigmoid(1.0)) + (1 - sigmoid(4.0)) + (1 - sigmoid(0.25)) + (1 - sigmoid(1.0))  # the diagonals
    pushed = 2 * sigmoid(0.5)  # (p0, p3) and (p3, p0): |Δd| 3.0 > 2.875
    assert loss.item() == pytest.approx((pulled + pushed) / (2 * 36 * 2), rel=1e-12)


def test_uldr_confidence_threshold_is_strict():
    """q_ic < τ_conf: with K = 4 and all logits 0, q = 1/4 exactly, so τ_conf = 0.25 leaves no
    uncertain pixel (L = 0, the normaliser's max(1, |C_U|) keeping it finite); just above, all are."""
    logits = torch.zeros(2, 4, 2, 3, dtype=torch.float64)
    depth = torch.full((2, 2, 3), 7.0, dtype=torch.float64)
    label = torch.zeros(2, 2, 3, dtype=torch.long)
    ignore = torch.zeros(2, 2, 3, dtype=torch.long)
    assert uldr_loss(logits, depth, label, ignore, size=(2, 3), conf_threshold=0.25).item() == 0.0
    assert uldr_loss(logits, depth, label, ignore, size=(2, 3), conf_threshold=0.2500001).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- CDDP (§3)

# Four valid pixels of a 2×2 image, row-major: features f (C = 2), depth d, teacher probs p (K = 2).
FEATURES = [(0.0, 0.0), (3.0, 4.0), (1.0, 0.0), (1.0, 2.0)]
DEPTHS = [2.0, 2.0, 2.5, 6.0]
PROBS = [(0.5, 0.5), (0.9, 0.1), (0.2, 0.8), (0.5, 0.5)]
LABELS = [0, 0, 1, 1]  # S_0 = {p0, p1}, S_1 = {p2, p3}
E = [entropy(*p) for p in PROBS]


def cddp_by_hand(sigma: float, inter_threshold: float, inter_weight: float) -> float:
    """L_cddp of the four pixels above, term by term (B = 1)."""
    # Intra, class 0: (p0,p0), (p1,p1) have |e_i - e_j| = 0; (p0,p1) twice with δ = |(3,4)| = 5,
    # w = exp(-(2 - 2)²/2σ²) = 1. I_0 = 2·(5 - 1)²·|e0 - e1| / |S_0|² (= 4).
    intra_0 = 2 * (5.0 - 1.0) ** 2 * abs(E[0] - E[1]) / 4
    # Intra, class 1: (p2,p3) twice, δ = |(0,2)| = 2, w = exp(-(2.5 - 6)²/2σ²).
    intra_1 = 2 * (2.0 - math.exp(-(3.5**2) / (2 * sigma**2))) ** 2 * abs(E[2] - E[3]) / 4
    # Inter: Q = the 8 ordered pairs across the classes; only |Δd| > τ count in the sum.
    # (p0,p2), (p1,p2): |Δd| 0.5, δ = 1 and |(2,4)| = √20; (p0,p3), (p1,p3): |Δd| 4, δ = √5 and √8;
    # each pair in both orders.
    inter_terms = [(0.5, 1.0), (0.5, math.sqrt(20.0)), (4.0, math.sqrt(5.0)), (4.0, math.sqrt(8.0))]
    inter_sum = sum(2 * (delta - gap) ** 2 for gap, delta in inter_terms if gap > inter_threshold)
    inter = inter_sum / 8
    return (intra_0 + intra_1) / 2 + inter_weight * inter  # mean over C_b = {0, 1}, then + β J


def cddp_image(features, depths, probs, labels, ignored=()):
    """One image's maps on a grid of `len(features)` pixels laid out as 2 rows."""
    width = len(features) // 2
    f = torch.tensor(features, dtype=torch.float64).T.reshape(-1, 2, width)
    d = torch.tensor(depths, dtype=torch.float64).reshape(2, width)
    p = torch.tensor(probs, dtype=torch.float64).T.reshape(-1, 2, width)
    y = torch.tensor(labels).reshape(2, width)
    v = torch.zeros(2 * width, dtype=torch.long)
    v[list(ignored)] = 255
    return f, d, p, y, v.reshape(2, width)


def stack(*images):
    return [torch.stack(parts) for parts in zip(*images)]


@pytest.mark.parametrize(
    "sigma, inter_threshold, inter_weight",
    [
        (1.0, 1.0, 1.0),  # the defaults: (p0,p3) and (p1,p3) are reliable pairs
        (2.0, 0.4, 0.5),  # every inter pair counts; σ changes w_23
        (1.0, 4.0, 1.0),  # |Δd| = 4 is not > 4: no reliable pair, J = 0 but |Q| stays 8
    ],
)
def test_cddp_by_hand(sigma, inter_threshold, inter_weight):
    features, depth, probs, label, ignore = stack(cddp_image(FEATURES, DEPTHS, PROBS, LABELS))
    loss = cddp_loss(
        features,
        depth,
        probs,
        label,
        ignore,
        size=(2, 2),
        sigma=sigma,
        inter_threshold=inter_threshold,
        inter_weight=inter_weight,
    )
    assert loss.item() == pytest.approx(cddp_by_hand(sigma, inter_threshold, inter_weight), rel=1e-12)


def test_cddp_by_hand_ignored_pixels_and_a_one_class_image():
    """B = 2 on a 2×3 grid. Image 0: the four pixels above plus two ignored ones with huge
    features (they must enter no pair, nor |S_c|, |Q_b|). Image 1: two valid pixels of one
    class (Q_1 is empty, so J_1 = 0), four ignored."""
    huge = (1e3, -1e3)
    image0 = cddp_image(
        [FEATURES[0], FEATURES[1], huge, FEATURES[2], FEATURES[3], huge],
        [DEPTHS[0], DEPTHS[1], 9.0, DEPTHS[2], DEPTHS[3], 9.0],
        [PROBS[0], PROBS[1], (0.6, 0.4), PROBS[2], PROBS[3], (0.6, 0.4)],
        [0, 0, 1, 1, 1, 0],
        ignored=(2, 5),
    )
    image1 = cddp_image(
        [(0.0, 0.0), (0.0, 1.0), huge, huge, huge, huge],
        [3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
        [(0.3, 0.7), (0.6, 0.4), (0.5, 0.5), (0.5, 0.5), (0.5, 0.5), (0.5, 0.5)],
        [1, 1, 0, 0, 0, 0],
        ignored=(2, 3, 4, 5),
    )
    features, depth, probs, label, ignore = stack(image0, image1)
    features.requires_grad_(True)
    loss = cddp_loss(features, depth, probs, label, ignore, size=(2, 3), inter_weight=1.0)
    # Image 1: one class, (q0,q1) twice with δ = 1, w = exp(-(3 - 4)²/2), over |S|² = 4; mean over one class.
    image1_loss = 2 * (1.0 - math.exp(-0.5)) ** 2 * abs(entropy(0.3, 0.7) - entropy(0.6, 0.4)) / 4
    expected = (cddp_by_hand(1.0, 1.0, 1.0) + image1_loss) / 2  # 1/B Σ_b
    # The huge ignored features shift the per-image mean the distances are computed around,
    # which costs a few digits of the Gram identity: still far inside §8's 1e-5.
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    # Ignored pixels get no gradient: exactly none through the pairs, rounding error through the
    # per-image mean that the distances are computed around (translation-invariant analytically).
    assert features.grad[0, :, 0, 2].abs().max().item() < 1e-12
    assert features.grad[1, :, 1].abs().max().item() < 1e-12


def test_cddp_gradient_by_hand():
    """dL/df for the one-class image above alone: L = 2(δ - w)²·Δe / 4 with δ = ||f0 - f1||,
    so dL/df0 = (δ - w)·Δe · (f0 - f1)/δ and dL/df1 = -dL/df0."""
    features, depth, probs, label, ignore = stack(
        cddp_image(
            [(0.0, 0.0), (3.0, 4.0)] + [(0.0, 0.0)] * 4,
            [3.0, 4.0] + [0.0] * 4,
            [(0.3, 0.7), (0.6, 0.4)] + [(0.5, 0.5)] * 4,
            [1, 1, 0, 0, 0, 0],
            ignored=(2, 3, 4, 5),
        )
    )
    features.requires_grad_(True)
    cddp_loss(features, depth, probs, label, ignore, size=(2, 3)).backward()
    entropy_gap = abs(entropy(0.3, 0.7) - entropy(0.6, 0.4))
    scale = (5.0 - math.exp(-0.5)) * entropy_gap / 5.0  # (δ - w)·Δe/δ, δ = 5
    expected_f0 = [scale * (0.0 - 3.0), scale * (0.0 - 4.0)]
    torch.testing.assert_close(
        features.grad[0, :, 0, 0], torch.tensor(expected_f0, dtype=torch.float64), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(features.grad[0, :, 0, 1], -features.grad[0, :, 0, 0], rtol=1e-12, atol=0)


# ---------------------------------------------------------------- CDDP forms other than §3's (depmatch.cddp.target)


def inter_by_hand(inter_threshold: float) -> float:
    """J of the four pixels above: the inter-class term is the paper's in every form."""
    return cddp_by_hand(1.0, inter_threshold, 1.0) - cddp_by_hand(1.0, inter_threshold, 0.0)


@pytest.mark.parametrize("sigma, inter_threshold, inter_weight", [(1.0, 1.0, 1.0), (2.0, 0.4, 0.5), (1.0, 1.0, 0.0)])
def test_cddp_distance_target_by_hand(sigma, inter_threshold, inter_weight):
    """`distance`: δ against 1 - w, so that pixels at one depth are pulled to distance 0."""
    # Class 0: (p0,p1) twice, δ = 5, 1 - w = 1 - exp(0) = 0. Class 1: (p2,p3) twice, δ = 2, 1 - exp(-3.5²/2σ²).
    intra_0 = 2 * (5.0 - 0.0) ** 2 * abs(E[0] - E[1]) / 4
    intra_1 = 2 * (2.0 - (1 - math.exp(-(3.5**2) / (2 * sigma**2)))) ** 2 * abs(E[2] - E[3]) / 4
    expected = (intra_0 + intra_1) / 2 + inter_weight * inter_by_hand(inter_threshold)
    features, depth, probs, label, ignore = stack(cddp_image(FEATURES, DEPTHS, PROBS, LABELS))
    loss = cddp_loss(
        features,
        depth,
        probs,
        label,
        ignore,
        size=(2, 2),
        sigma=sigma,
        inter_threshold=inter_threshold,
        inter_weight=inter_weight,
        target="distance",
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("sigma, inter_threshold, inter_weight", [(1.0, 1.0, 1.0), (2.0, 0.4, 0.5), (1.0, 1.0, 0.0)])
def test_cddp_similarity_target_by_hand(sigma, inter_threshold, inter_weight):
    """`similarity`: cos(f_i, f_j) of the features as given against w, so that pixels at one depth
    are pulled to similar features. p0's feature is 0: its cosine with anything is 0 (unit feature 0)."""
    # Class 0: (p0,p1) twice, cos = 0, w = 1. Class 1: (p2,p3) twice, cos((1,0), (1,2)) = 1/√5,
    # w = exp(-3.5²/2σ²). The diagonal pairs have |e_i - e_i| = 0.
    intra_0 = 2 * (0.0 - 1.0) ** 2 * abs(E[0] - E[1]) / 4
    intra_1 = 2 * (1 / math.sqrt(5.0) - math.exp(-(3.5**2) / (2 * sigma**2))) ** 2 * abs(E[2] - E[3]) / 4
    expected = (intra_0 + intra_1) / 2 + inter_weight * inter_by_hand(inter_threshold)
    features, depth, probs, label, ignore = stack(cddp_image(FEATURES, DEPTHS, PROBS, LABELS))
    loss = cddp_loss(
        features,
        depth,
        probs,
        label,
        ignore,
        size=(2, 2),
        sigma=sigma,
        inter_threshold=inter_threshold,
        inter_weight=inter_weight,
        target="similarity",
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_cddp_similarity_gradient_by_hand():
    """One class, f0 = (1, 0), f1 = (0, 2) at depths 3 and 4: L = 2(cos - w)²·Δe / 4 with cos = 0,
    w = exp(-1/2). d cos/d f0 = (u1 - cos·u0)/|f0| = (0, 1), d cos/d f1 = (u0 - cos·u1)/|f1| = (1/2, 0),
    so dL/df0 = (cos - w)·Δe·(0, 1) and dL/df1 = (cos - w)·Δe·(1/2, 0)."""
    features, depth, probs, label, ignore = stack(
        cddp_image(
            [(1.0, 0.0), (0.0, 2.0)] + [(0.0, 0.0)] * 4,
            [3.0, 4.0] + [0.0] * 4,
            [(0.3, 0.7), (0.6, 0.4)] + [(0.5, 0.5)] * 4,
            [1, 1, 0, 0, 0, 0],
            ignored=(2, 3, 4, 5),
        )
    )
    features.requires_grad_(True)
    cddp_loss(features, depth, probs, label, ignore, size=(2, 3), target="similarity").backward()
    scale = (0.0 - math.exp(-0.5)) * abs(entropy(0.3, 0.7) - entropy(0.6, 0.4))
    expected = torch.tensor([[0.0, scale], [scale / 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(features.grad[0, :, 0, :2].T, expected, rtol=1e-10, atol=1e-15)
