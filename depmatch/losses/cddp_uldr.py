"""The two DepMatch losses: CDDP on decoder features, ULDR on logits (method.md §3, §4).

Both work on a coarse grid and compare every ordered pair of pixels of the same image.
Every pair term is a function of per-pixel quantities, and classes enter through label
equality, so there is no loop over classes or images and no C×N×N (feature) or K×N×N
(class) tensor. The normalisers (|S_c|, |C_b|, |Q_b|, |C_U|) are per-pixel or per-image
and computed up front. The pair sums are custom autograd functions that compute the value
and the gradient together, in blocks of rows against the later columns (the pair tables
are symmetric, so each unordered pair is computed once): nothing B×N×N is built or kept
for backward, memory is O(B·_BLOCK·N), and there is no host sync on CUDA. On the CPU the
blocks run only over the pixels that can take part (valid ones for CDDP, uncertain valid
ones for ULDR), moved to the front of each image; that needs the per-image counts on the
host, a read that is free on the synchronous CPU (see `_compact`). On CUDA the pair sums
are, by default, the Triton kernels of `kernels.py` (one op per loss, value and gradient
in one pass over all pixels, label masks, no host sync); the blocked torch path stays
available (`pair_backend`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from depmatch.choices import CDDP_TARGETS, PAIR_BACKENDS, check_choice, cuda_pair_backend
from depmatch.config import CDDPConfig, ULDRConfig

IGNORE_INDEX = 255
ENTROPY_EPS = 1e-10
# Rows per block of the pair tables: a block's temporaries are B×_BLOCK×(N - first row). Small
# blocks stay in cache (128 was fastest on CPU at Pascal size, 256 and 512 were 1.3× and 1.5× slower).
_BLOCK = 128


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Pair sums over millions of terms lose too much in half precision.
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _interpolation(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device):
    """Per output index: its two source indices (interleaved, 2·out) and the weight of the second."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = torch.arange(out_size, dtype=dtype, device=device) * scale
    low = source.floor().long().clamp_(0, in_size - 1)
    high = (low + 1).clamp_(max=in_size - 1)
    return torch.stack([low, high], 1).flatten(), source - low.to(dtype)


# The resampling plans depend only on the sizes, and a step asks for the same few: built once
# per device they save ~25 small ops (launches on a GPU) per loss call. Callers never write to them.
@functools.lru_cache(maxsize=64)
def _bilinear_plan(in_size: tuple[int, int], out_size: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """The flattened index of the 2×2 source pixels of every output pixel, the row weights (h×1×1), the column weights (w)."""
    rows, row_weight = _interpolation(in_size[0], out_size[0], dtype, device)
    cols, col_weight = _interpolation(in_size[1], out_size[1], dtype, device)
    return (rows.unsqueeze(1) * in_size[1] + cols.unsqueeze(0)).flatten(), row_weight.view(-1, 1, 1), col_weight


class _BilinearResize(torch.autograd.Function):
    """`F.interpolate(maps, size, mode="bilinear", align_corners=True)` on B×C×H×W maps.

    Forward gathers the 2×2 source pixels of each output pixel and blends them, which reads
    only those (a few per cent of a 518×518 map shrunk to 51×51) where the library kernel
    goes over the whole map; backward is the library's own upsample_bilinear2d_backward.
    The gather is a `gather` on the flattened maps (3× faster on CPU than advanced indexing).
    """

    @staticmethod
    def forward(ctx, maps, size):
        ctx.input_size, ctx.size = list(maps.shape), list(size)
        flat, row_weight, col_weight = _bilinear_plan(tuple(maps.shape[-2:]), tuple(size), maps.dtype, maps.device)
        corners = maps.contiguous().flatten(2).gather(2, flat.expand(*maps.shape[:2], -1))
        corners = corners.view(*maps.shape[:2], size[0], 2, size[1], 2)
        blended_rows = torch.lerp(corners[:, :, :, 0], corners[:, :, :, 1], row_weight)  # B×C×h×w×2
        return torch.lerp(blended_rows[..., 0], blended_rows[..., 1], col_weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = torch.ops.aten.upsample_bilinear2d_backward(grad_output.contiguous(), ctx.size, ctx.input_size, True)
        return grad, None


def _resize_continuous(maps: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """B×C×H×W (or B×H×W) -> B×C×h×w (or B×h×w), bilinear with aligned corners."""
    squeeze = maps.dim() == 3
    maps = maps.unsqueeze(1) if squeeze else maps
    resized = _BilinearResize.apply(maps.to(dtype), tuple(size))
    return resized.squeeze(1) if squeeze else resized


@functools.lru_cache(maxsize=64)
def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """The source index of each output index of `F.interpolate(mode="nearest")` along one axis."""
    source = torch.arange(in_size, dtype=torch.float32, device=device).view(1, 1, in_size, 1)
    return F.interpolate(source, size=(out_size, 1), mode="nearest").view(-1).long()


def _resize_discrete(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×H×W integer map -> B×h×w (long), as `F.interpolate(mode="nearest")` on a float copy.

    Nearest neighbour picks one source row per output row and one source column per output
    column; those indices come from the library on the (small) index vectors, and the map is
    read only at them, without a float copy of the whole map.
    """
    rows = _nearest_indices(maps.shape[-2], size[0], maps.device)
    cols = _nearest_indices(maps.shape[-1], size[1], maps.device)
    return maps.index_select(-2, rows).index_select(-1, cols).long()


def _grid_labels(pseudo_label: torch.Tensor, ignore: torch.Tensor, size: tuple[int, int], num_classes: int):
    """Resized pseudo-labels (flattened, B×N) with invalid pixels set to class 0, and the B×N validity mask."""
    label = _resize_discrete(pseudo_label, size).flatten(1)
    valid = _resize_discrete(ignore, size).flatten(1) != IGNORE_INDEX
    # Invalid pixels never enter a pair; a safe class index keeps gather/scatter in range.
    label = torch.where(valid, label, torch.zeros_like(label)).clamp_(0, num_classes - 1)
    return label, valid


def _sum_rows_by_class(row_values: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B×N values -> B×K sums, each pixel's value added to its class."""
    sums = row_values.new_zeros(row_values.shape[0], num_classes)
    return sums.scatter_add(1, label, row_values)


def _row_blocks(num_pixels: int):
    """(rows, cols, diagonal) per block of rows: the block's pairs with itself and every later pixel.

    Together the blocks cover each unordered pair once (and each pixel with itself): a pair
    table symmetric in (i, j) is summed as 2·Σ(blocks) - Σ(diagonal squares).
    """
    for start in range(0, num_pixels, _BLOCK):
        stop = min(start + _BLOCK, num_pixels)
        yield slice(start, stop), slice(start, num_pixels), stop - start


def _segments(batch: int, num_pixels: int, lengths):
    """(images, pixels) the pair blocks run over: the whole batch over all pixels, or, with the
    per-image `lengths` of compacted pixels (see `_compact`), each image over its own first ones."""
    if lengths is None:
        return [(slice(None), num_pixels)]
    return [(slice(b, b + 1), length) for b, length in enumerate(lengths) if length > 0]


def _compact(keep: torch.Tensor, *per_pixel: torch.Tensor):
    """Move each image's kept pixels to the front; cut every B×N(×C) tensor to the largest kept count.

    Returns the per-image kept counts (a list) and the cut tensors. A stable sort of the flag
    keeps the original order among the kept pixels. The counts are read on the host, so this
    runs only on the CPU, where execution is synchronous and the read costs nothing (see the
    callers for CUDA). The gathers are ordinary autograd ops: the gradient goes back to the
    original pixel order.
    """
    order = torch.sort(keep.logical_not().view(torch.uint8), dim=1, stable=True).indices
    lengths = keep.sum(1).tolist()
    index = order[:, : max(lengths, default=0)]
    return lengths, tuple(
        tensor.gather(1, index if tensor.dim() == 2 else index.unsqueeze(2).expand(-1, -1, tensor.shape[2]))
        for tensor in per_pixel
    )


class IntraForm(NamedTuple):
    """What CDDP's intra-class pairs compare: the measure (distance, or similarity of unit features)
    against the target offset + scale · w."""

    similarity: bool
    offset: float
    scale: float


PAPER_INTRA = IntraForm(similarity=False, offset=0.0, scale=1.0)
# The forms of depmatch.cddp.target (its names: `depmatch.choices.CDDP_TARGETS`). `paper` is
# method.md §3 (δ against w: same depth pushed to distance 1, different depths pulled together);
# the other two are deviations from the paper, so that same depth means similar features:
# `similarity` compares the cosine similarity with w, `distance` compares δ with 1 - w. The
# inter-class term is the paper's in every form.
INTRA_FORMS = {
    "paper": PAPER_INTRA,
    "similarity": IntraForm(similarity=True, offset=0.0, scale=1.0),
    "distance": IntraForm(similarity=False, offset=1.0, scale=-1.0),
}
# A unit feature is f / max(||f||, this): a zero feature stays zero, with a finite gradient.
_UNIT_EPS = 1e-8
_forced_backend: str | None = None


@contextlib.contextmanager
def pair_backend(name: str):
    """Run the pair sums through one backend whatever the device (tests, op counting).

    `compact`: row blocks over each image's taking-part pixels only (the CPU default; one host
    read of the counts). `blocked`: row blocks over all pixels with masks (no host sync).
    `triton`: the kernels of `depmatch.losses.kernels`, one op per loss (the CUDA default when
    triton imports; on CPU tensors they need TRITON_INTERPRET=1). Float64 inputs have no
    kernel: under `triton` they take the `blocked` path.
    """
    global _forced_backend
    check_choice("the pair backend", name, PAIR_BACKENDS)
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _pair_backend(tensor: torch.Tensor, dtype: torch.dtype) -> str:
    if _forced_backend is not None:
        backend = _forced_backend
    elif tensor.device.type == "cpu":
        backend = "compact"
    else:
        backend = cuda_pair_backend()
    return "blocked" if backend == "triton" and dtype != torch.float32 else backend


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Through uint8: much faster on CPU than a bool -> float cast, a `where` or a product with a bool.
    return mask.view(torch.uint8).to(dtype)


def _symmetric_sum(table: torch.Tensor, diagonal: int) -> torch.Tensor:
    """Σ over both orderings of the pairs of one row block (see `_row_blocks`)."""
    return 2 * table.sum() - table[:, :, :diagonal].sum()


def _accumulate_symmetric(grad, pair_grad, values, rows, cols, diagonal, alpha=1.0):
    """grad_k += alpha Σ_j P_kj v_j over all j, from the block's P (rows × cols) of a symmetric table P.

    The block rows get P v over the block's columns; the later columns get Pᵀ v over the rows
    (the diagonal square is already counted in both orderings by the first product).
    """
    grad[:, rows].baddbmm_(pair_grad, values[:, cols], alpha=alpha)
    grad[:, cols][:, diagonal:].baddbmm_(pair_grad[:, :, diagonal:].transpose(1, 2), values[:, rows], alpha=alpha)


def _cddp_pairs(
    features,
    depth,
    scaled_entropy,
    label,
    valid,
    inter_weight,
    sigma,
    inter_threshold,
    lengths,
    with_grad,
    intra=PAPER_INTRA,
):
    """Σ_b Σ_(i,j) ω_ij (m_ij - t_ij)² over the counted pairs of CDDP, and its gradient wrt the B×N×C features.

    A pair of valid pixels of the same class has target t = offset + scale · exp(-Δd²/2σ²)
    (`intra`) and weight ω = |Δe'| with e' = e · (the per-class normaliser, equal for i and j);
    a pair of valid pixels of different classes with |Δd| > τ has target |Δd| and weight
    inter_weight_b. The measure m is the distance δ_ij, or with `intra.similarity` the dot
    product f_i·f_j (cosine similarity on unit features; then the intra term is all there is,
    inter_weight must be 0). Everything is symmetric in (i, j), so dL/df_k = Σ_j H_kj (f_k - f_j)
    with H = 4ω(δ - t)/δ (0 where δ = 0) for distances, and dL/df_k = Σ_j 4ω(f_k·f_j - t) f_j
    for similarities. Masks enter as 0/1 factors and selections as blends, which on CPU
    run several times faster than `where` over B×n×N tables. `valid` is None when the
    pixels are compacted (`lengths`): then every pixel the blocks reach is valid.
    """
    dtype = features.dtype
    num_channels = features.shape[-1]
    norms = features.pow(2).sum(-1)
    total = features.new_zeros(())
    grad = torch.zeros_like(features) if with_grad else None
    for images, num_pixels in _segments(features.shape[0], features.shape[1], lengths):
        f, n, d, e, y = features[images], norms[images], depth[images], scaled_entropy[images], label[images]
        g = grad[images] if with_grad else None
        pair_weight = inter_weight[images].view(-1, 1, 1)
        for rows, cols, diagonal in _row_blocks(num_pixels):
            if intra.similarity:
                measure = torch.bmm(f[:, rows], f[:, cols].transpose(1, 2))
            else:
                # Exact distances from the Gram identity; squares within rounding error of 0 count as 0.
                norm_sum = n[:, rows].unsqueeze(2) + n[:, cols].unsqueeze(1)
                squared = torch.baddbmm(norm_sum, f[:, rows], f[:, cols].transpose(1, 2), alpha=-2.0)
                nonzero = _as_float(squared > norm_sum.mul_(num_channels * torch.finfo(dtype).eps), dtype)
                measure = squared.mul_(nonzero).sqrt_()

            depth_gap = (d[:, rows].unsqueeze(2) - d[:, cols].unsqueeze(1)).abs_()
            same_class = y[:, rows].unsqueeze(2) == y[:, cols].unsqueeze(1)
            far = depth_gap > inter_threshold
            if valid is not None:
                both_valid = valid[images][:, rows].unsqueeze(2) & valid[images][:, cols].unsqueeze(1)
                same_class &= both_valid
                far &= both_valid
            inter = _as_float(far > same_class, dtype)  # a > b is a & ~b for booleans
            same_class = _as_float(same_class, dtype)

            # Same class: target offset + scale·w, w = exp(-Δd²/2σ²), weight |Δe'|; counted inter-class:
            # target |Δd|, weight inter_b.
            depth_affinity = depth_gap.square().mul_(-0.5 / sigma**2).exp_()
            intra_target = depth_affinity.mul_(intra.scale).add_(intra.offset)
            target = torch.addcmul(depth_gap, same_class, intra_target.sub_(depth_gap))
            entropy_gap = (e[:, rows].unsqueeze(2) - e[:, cols].unsqueeze(1)).abs_()
            weight = torch.addcmul(inter.mul_(pair_weight), same_class, entropy_gap)

            residual = measure.sub(target)
            weighted = weight.mul_(residual)  # ω(m - t) on counted pairs, 0 elsewhere
            total = total + _symmetric_sum(weighted * residual, diagonal)
            if with_grad and intra.similarity:
                # -ω(m - t) against f_j, with the -1 of _accumulate_symmetric: Σ_j ω(m - t) f_j (× 4 at the end).
                _accumulate_symmetric(g, weighted.neg_(), f, rows, cols, diagonal, alpha=-1.0)
            elif with_grad:
                # H/4 (the 4 is applied once at the end).
                pair_grad = weighted.mul_(nonzero).div_(measure.clamp_min_(torch.finfo(dtype).tiny))
                g[:, rows].addcmul_(f[:, rows], pair_grad.sum(2, keepdim=True))
                g[:, cols][:, diagonal:].addcmul_(
                    f[:, cols][:, diagonal:], pair_grad[:, :, diagonal:].sum(1).unsqueeze(2)
                )
                _accumulate_symmetric(g, pair_grad, f, rows, cols, diagonal, alpha=-1.0)
    return total, grad.mul_(4.0) if with_grad else None


def _uldr_pairs(own_logit, depth, label, uncertain, margin, inter_threshold, lengths, with_grad):
    """Σ_b [Σ_pulled σ(-x_ij) + Σ_pushed σ(x_ij)], x_ij = s_i s_j, and its gradient wrt s (B×N).

    Pulled: uncertain, same class, |Δd| < m; pushed: uncertain, different classes, |Δd| > τ.
    With S = +1 on pushed and -1 on pulled pairs (0 elsewhere) and σ(-x) = 1 - σ(x), the sum
    is Σ S σ(x) + #pulled, and as S is symmetric, dL/ds_k = 2 Σ_j S_kj σ'(x_kj) s_j.
    """
    dtype = own_logit.dtype
    total = own_logit.new_zeros(())
    grad = torch.zeros_like(own_logit).unsqueeze(2) if with_grad else None
    values = 2 * own_logit.unsqueeze(2)  # B×N×1, for the products with the pair tables
    # A pixel that is not uncertain gets depth NaN: every comparison of its depth gaps is False.
    depth = torch.where(uncertain, depth, torch.nan)
    for images, num_pixels in _segments(own_logit.shape[0], own_logit.shape[1], lengths):
        s, d, y, v = own_logit[images], depth[images], label[images], values[images]
        g = grad[images] if with_grad else None
        for rows, cols, diagonal in _row_blocks(num_pixels):
            depth_gap = (d[:, rows].unsqueeze(2) - d[:, cols].unsqueeze(1)).abs_()
            same_class = y[:, rows].unsqueeze(2) == y[:, cols].unsqueeze(1)
            pulled = (depth_gap < margin) & same_class
            pushed = (depth_gap > inter_threshold) > same_class  # a > b is a & ~b for booleans
            sign = (pushed.view(torch.int8) - pulled.view(torch.int8)).to(dtype)

            sigmoid = torch.mul(s[:, rows].unsqueeze(2), s[:, cols].unsqueeze(1)).sigmoid_()
            signed = sigmoid * sign
            total = total + _symmetric_sum(signed, diagonal) + _symmetric_sum(pulled, diagonal)
            if with_grad:
                # S σ'(x) = S σ(x) (1 - σ(x)); `values` carries the factor 2 of the symmetric sum.
                _accumulate_symmetric(g, signed.addcmul_(signed, sigmoid, value=-1.0), v, rows, cols, diagonal)
    return total, grad.squeeze(2) if with_grad else None


class _CDDPPairs(torch.autograd.Function):
    """The CDDP pair sum with its gradient computed in the forward pass, tile by tile."""

    @staticmethod
    def forward(
        ctx,
        features,
        depth,
        scaled_entropy,
        label,
        valid,
        inter_weight,
        sigma,
        inter_threshold,
        lengths,
        backend,
        intra,
    ):
        # The pair sums stay in the compute dtype under an ambient autocast (no bf16 Gram matrix).
        with torch.autocast(features.device.type, enabled=False):
            if backend == "triton":
                from depmatch.losses import kernels

                total, grad = kernels.cddp_pairs(
                    features.detach(), depth, scaled_entropy, _kernel_label(label, valid), inter_weight, sigma,
                    inter_threshold, ctx.needs_input_grad[0], *intra,
                )  # fmt: skip
            else:
                total, grad = _cddp_pairs(
                    features.detach(),
                    depth,
                    scaled_entropy,
                    label,
                    valid,
                    inter_weight,
                    sigma,
                    inter_threshold,
                    lengths,
                    with_grad=ctx.needs_input_grad[0],
                    intra=intra,
                )
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None, None, None, None, None


class _ULDRPairs(torch.autograd.Function):
    """The ULDR pair sum with its gradient computed in the forward pass, tile by tile."""

    @staticmethod
    def forward(ctx, own_logit, depth, label, uncertain, margin, inter_threshold, lengths, backend):
        with torch.autocast(own_logit.device.type, enabled=False):
            if backend == "triton":
                from depmatch.losses import kernels

                total, grad = kernels.uldr_pairs(
                    own_logit.detach(), depth, _kernel_label(label, uncertain), margin, inter_threshold,
                    ctx.needs_input_grad[0],
                )  # fmt: skip
            else:
                total, grad = _uldr_pairs(
                    own_logit.detach(),
                    depth,
                    label,
                    uncertain,
                    margin,
                    inter_threshold,
                    lengths,
                    with_grad=ctx.needs_input_grad[0],
                )
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None, None


def _kernel_label(label: torch.Tensor, takes_part: torch.Tensor) -> torch.Tensor:
    """The kernels' label: the class where the pixel takes part in pairs, -1 where it does not."""
    return torch.where(takes_part, label, -1).int()


def cddp_loss(
    features: torch.Tensor,
    depth: torch.Tensor,
    probs: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    sigma: float = CDDPConfig.sigma,
    inter_threshold: float = CDDPConfig.inter_threshold,
    inter_weight: float = CDDPConfig.inter_weight,
    target: str = CDDPConfig.target,
) -> torch.Tensor:
    """Class-wise Depth Disparity Perception loss of one strong view (method.md §3).

    features: B×C×Hf×Wf student decoder features (differentiable).
    depth: B×H×W relative inverse depth of the CutMixed weak view.
    probs: B×K×H×W teacher softmax, CutMixed like the view.
    pseudo_label: B×H×W long, argmax of probs at full resolution.
    ignore: B×H×W, 255 where the pixel is padding or ignored.
    size: (h, w) of the grid both the features and the maps are resampled to.
    target: what the intra-class pairs compare (`INTRA_FORMS`): `paper` is §3 exactly;
    `similarity` (cosine similarity against w) and `distance` (δ against 1 - w) deviate from it.
    The keyword defaults are the config's (`depmatch.cddp`), so that a call without them
    computes what a training run with the default config does: β = `inter_weight` = 0.
    Returns a 0-dim tensor.
    """
    check_choice("depmatch.cddp.target", target, CDDP_TARGETS)
    intra = INTRA_FORMS[target]
    dtype = _compute_dtype(features)
    num_classes = probs.shape[1]
    batch = features.shape[0]

    grid_features = _resize_continuous(features, size, dtype).flatten(2).transpose(1, 2)  # B×N×C
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)  # B×N
    grid_probs = _resize_continuous(probs.detach(), size, dtype).flatten(2)  # B×K×N
    entropy = -(grid_probs * torch.log(grid_probs + ENTROPY_EPS)).sum(1)  # B×N
    label, valid = _grid_labels(pseudo_label, ignore, size, num_classes)

    # Per-pixel and per-image normalisers (O(B·N + B·K)), so that every pair term is local.
    class_counts = _sum_rows_by_class(valid.to(dtype), label, num_classes)  # |S_c|, B×K
    classes_present = (class_counts > 0).sum(1).clamp_min(1)  # |C_b|
    own_count = class_counts.gather(1, label)  # |S_ŷi|, B×N
    intra_weight = torch.where(
        valid, 1.0 / (own_count.clamp_min(1).square() * classes_present.unsqueeze(1) * batch), 0.0
    )
    inter_pairs = valid.to(dtype).sum(1).square() - class_counts.square().sum(1)  # |Q_b|
    inter_pair_weight = torch.where(inter_pairs > 0, inter_weight / (inter_pairs.clamp_min(1) * batch), 0.0)

    # Translating all features leaves the distances unchanged and shrinks the Gram cancellation error.
    centred = grid_features - grid_features.mean(dim=1, keepdim=True)
    # Same-class pairs share the normaliser, so it can scale the entropy: |e_i a - e_j a| = a |e_i - e_j|.
    scaled_entropy = entropy * intra_weight
    # Cosine similarities are those of the features as they are (not centred): from unit features.
    unit = (grid_features / grid_features.norm(dim=2, keepdim=True).clamp_min(_UNIT_EPS),) if intra.similarity else ()
    lengths = None
    backend = _pair_backend(valid, dtype)
    if backend == "compact":
        # Only valid pixels enter a pair: on the CPU each image's blocks run over its valid pixels
        # only, moved to the front (the counts are one host read, free on the synchronous CPU), and
        # need no validity mask. On CUDA there is no host sync anywhere in the step: the kernels (or
        # the blocks) go over all pixels and the validity mask does the selection.
        lengths, (centred, grid_depth, scaled_entropy, label, *unit) = _compact(
            valid, centred, grid_depth, scaled_entropy, label, *unit
        )
        valid = None

    def pairs(pair_features, pair_entropy, pair_inter_weight, form):
        return _CDDPPairs.apply(pair_features, grid_depth, pair_entropy, label, valid, pair_inter_weight, sigma,
                                inter_threshold, lengths, backend, form)  # fmt: skip

    if not intra.similarity:
        return pairs(centred, scaled_entropy, inter_pair_weight, intra)
    # Similarity form: the intra pairs on unit features, and the paper's inter pairs (distances) in
    # a second pair sum with no intra weight, run only when β counts.
    total = pairs(unit[0], scaled_entropy, torch.zeros_like(inter_pair_weight), intra)
    if inter_weight > 0:
        total = total + pairs(centred, torch.zeros_like(scaled_entropy), inter_pair_weight, PAPER_INTRA)
    return total


def uldr_loss(
    logits: torch.Tensor,
    depth: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    conf_threshold: float = ULDRConfig.conf_threshold,
    margin: float = ULDRConfig.margin,
    inter_threshold: float = ULDRConfig.inter_threshold,
) -> torch.Tensor:
    """Uncertain Logit Disparity Regulation loss of one strong view (method.md §4).

    logits: B×K×H×W student logits (differentiable).
    depth: B×H×W relative inverse depth of the CutMixed weak view.
    pseudo_label: B×H×W long teacher pseudo-labels at full resolution.
    ignore: B×H×W, 255 where the pixel is padding or ignored.
    size: (h, w) of the grid.
    The keyword defaults are the config's (`depmatch.uldr`).
    Returns a 0-dim tensor.
    """
    dtype = _compute_dtype(logits)
    batch, num_classes = logits.shape[:2]
    num_pixels = size[0] * size[1]

    grid_logits = _resize_continuous(logits, size, dtype).flatten(2)  # B×K×N
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)
    label, valid = _grid_labels(pseudo_label, ignore, size, num_classes)

    # Every pair term uses each pixel's logit of its own pseudo-class: z_{i,ŷi} · z_{j,ŷj}.
    own_logit = grid_logits.gather(1, label.unsqueeze(1)).squeeze(1)  # B×N
    own_prob = grid_logits.detach().softmax(1).gather(1, label.unsqueeze(1)).squeeze(1)
    uncertain = valid & (own_prob < conf_threshold)

    # Counted with a scatter rather than boolean indexing, which would sync with the host.
    uncertain_per_class = label.new_zeros(batch, num_classes).scatter_add(1, label, uncertain.long()).sum(0)
    num_uncertain_classes = (uncertain_per_class > 0).sum().clamp_min(1)
    lengths = None
    backend = _pair_backend(uncertain, dtype)
    if backend == "compact":
        # Only uncertain valid pixels enter a pair (about 40 % of the pixels, 17 % of the pairs, in
        # the benchmark): on the CPU each image's blocks run over its uncertain pixels only, moved
        # to the front (the counts are one host read, free on the synchronous CPU). On CUDA there is
        # no host sync anywhere in the step: the kernels (or the blocks) go over all pixels and the
        # mask (the blocks: NaN depth) of the other pixels does the selection.
        lengths, (uncertain, own_logit, grid_depth, label) = _compact(
            uncertain, uncertain, own_logit, grid_depth, label
        )
    total = _ULDRPairs.apply(own_logit, grid_depth, label, uncertain, margin, inter_threshold, lengths, backend)
    # method.md §4: 1/(B · N² · max(1, |C_U|)), N counting every grid pixel, valid or not.
    return total / (batch * num_pixels**2 * num_uncertain_classes)
