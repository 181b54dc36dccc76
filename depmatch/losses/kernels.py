"""The CDDP and ULDR pair sums as Triton kernels: value and gradient in one pass, no host sync.

Each loss's pair sum is one torch operator (`torch.ops.depmatch.cddp_pairs`,
`torch.ops.depmatch.uldr_pairs`, registered with `torch.library.custom_op` and a fake
implementation), so that torch.compile traces it without a graph break and a dispatch-mode
op counter sees one op where the blocked torch path launches thousands. The autograd
wrapping (the gradient is computed in the forward pass and scaled in backward) stays with
the losses in `depmatch.py`.

Tiling is that of flash attention: one program per (row block, image) walks over every
column block of its image, so each program owns its rows' gradient (written once, no
atomics) and one partial value; the partials are summed by torch afterwards. Results are
deterministic. Everything accumulates in float32; the inputs are the losses' float32
compute tensors (float64 inputs stay on the torch path, see `depmatch.py`).

Pixels that take no part in any pair (invalid for CDDP, not uncertain-and-valid for ULDR)
carry the label -1; the masks come from label comparisons only.

On CPU tensors the kernels run in Triton's interpreter, which triton selects when its
decorators run: `TRITON_INTERPRET=1` must be set before triton is first imported.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Tiles (rows per program, columns per step; powers of two, ≥ 16 for tl.dot) and warps. CDDP
# holds a row block's features and gradient accumulator (rows × channel block) and a column
# block's features, so wider features get smaller tiles. Each choice compiles for the H200
# (sm_90) without register spills (ptxas via triton.compile, no GPU needed; see
# tests/test_loss_kernels.py) and gives Pascal size more programs than its 132 SMs (CDDP,
# 64 channels: 43 row blocks × 4 images; ULDR: 82 × 4). Not tuned on a GPU yet.
CDDP_TILES = {64: (32, 64), 128: (32, 32), 256: (16, 32), 512: (16, 16)}  # channel block -> (rows, columns)
CDDP_NUM_WARPS = 8
ULDR_TILE, ULDR_NUM_WARPS = (32, 128), 4
# The interpreter runs every program step as NumPy calls on whole tiles: big tiles mean few
# steps, and registers do not matter there.
INTERPRETER_TILES = {"cddp": (128, 256), "uldr": (256, 512)}
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _launch_on(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The device the kernels must run on: triton launches on the current CUDA device, whatever the tensors'."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    if not _interpreted():
        raise RuntimeError(
            "the Triton loss kernels got CPU tensors: run them on CUDA, or set TRITON_INTERPRET=1 in the "
            "environment before Python starts (triton reads it when it is first imported), or use "
            "pair_backend('compact') / ('blocked') on the CPU"
        )
    return contextlib.nullcontext()


def _expect(dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise TypeError(f"{name} must be {dtype} for the loss kernels, got {tensor.dtype}")


@triton.jit
def _cddp_pixels(features_ptr, depth_ptr, entropy_ptr, label_ptr, pixels, pixel_in, channels, channel_in, num_channels):
    """One block of pixels: features (pixels × channel block), squared norms, depth, entropy, label
    (0 and -1 beyond the image, so that padding takes part in no pair)."""
    features = tl.load(
        features_ptr + pixels[:, None] * num_channels + channels[None, :],
        mask=pixel_in[:, None] & channel_in[None, :], other=0.0,
    )  # fmt: skip
    depth = tl.load(depth_ptr + pixels, mask=pixel_in, other=0.0)
    entropy = tl.load(entropy_ptr + pixels, mask=pixel_in, other=0.0)
    label = tl.load(label_ptr + pixels, mask=pixel_in, other=-1)
    return features, tl.sum(features * features, 1), depth, entropy, label


@triton.jit
def _cddp_kernel(
    features_ptr, depth_ptr, entropy_ptr, label_ptr, inter_weight_ptr, partial_ptr, grad_ptr,
    num_pixels, num_channels, neg_half_inv_sigma_sq, inter_threshold, zero_scale, tiny, target_offset, target_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WITH_GRAD: tl.constexpr,
    SIMILARITY: tl.constexpr,
):  # fmt: skip
    row_block = tl.program_id(0)
    image = tl.program_id(1)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < num_pixels
    channels = tl.arange(0, BLOCK_C)
    channel_in = channels < num_channels
    image_start = image * num_pixels
    row_features, row_norms, row_depth, row_entropy, row_label = _cddp_pixels(
        features_ptr, depth_ptr, entropy_ptr, label_ptr, image_start + rows, row_in, channels, channel_in,
        num_channels,
    )  # fmt: skip
    inter_weight = tl.load(inter_weight_ptr + image)

    row_values = tl.zeros((BLOCK_M,), tl.float32)
    row_pair_sums = tl.zeros((BLOCK_M,), tl.float32)  # Σ_j H_kj / 4
    pair_products = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)  # Σ_j H_kj f_j / 4
    for start in range(0, num_pixels, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_features, col_norms, col_depth, col_entropy, col_label = _cddp_pixels(
            features_ptr, depth_ptr, entropy_ptr, label_ptr, image_start + cols, cols < num_pixels, channels, channel_in,
            num_channels,
        )  # fmt: skip

        gram = tl.dot(row_features, tl.trans(col_features), input_precision="ieee")
        if SIMILARITY:  # unit features: the Gram entries are the cosine similarities
            measure = gram
        else:
            # Exact distances from the Gram identity (full float32, no TF32); squares within
            # rounding error of 0 count as 0, as on the torch path.
            norm_sum = row_norms[:, None] + col_norms[None, :]
            squared = norm_sum - 2.0 * gram
            nonzero = squared > norm_sum * zero_scale
            measure = tl.sqrt(tl.where(nonzero, squared, 0.0))

        depth_gap = tl.abs(row_depth[:, None] - col_depth[None, :])
        both_valid = (row_label[:, None] >= 0) & (col_label[None, :] >= 0)
        same_class = both_valid & (row_label[:, None] == col_label[None, :])
        inter = both_valid & (row_label[:, None] != col_label[None, :]) & (depth_gap > inter_threshold)
        # Same class: target offset + scale · exp(-Δd²/2σ²), weight |Δe'|; counted inter-class:
        # target |Δd|, weight inter_b.
        affinity = tl.exp(depth_gap * depth_gap * neg_half_inv_sigma_sq)
        target = tl.where(same_class, target_offset + target_scale * affinity, depth_gap)
        entropy_gap = tl.abs(row_entropy[:, None] - col_entropy[None, :])
        weight = tl.where(same_class, entropy_gap, tl.where(inter, inter_weight, 0.0))
        residual = measure - target
        weighted = weight * residual
        row_values += tl.sum(weighted * residual, 1)
        if WITH_GRAD:
            if SIMILARITY:  # dL/df_k = 4 Σ_j ω (m - t) f_j: no (f_k - f_j) part
                pair_grad = -weighted
            else:
                pair_grad = tl.where(nonzero, weighted / tl.maximum(measure, tiny), 0.0)
                row_pair_sums += tl.sum(pair_grad, 1)
            pair_products += tl.dot(pair_grad, col_features, input_precision="ieee")

    tl.store(partial_ptr + image * tl.num_programs(0) + row_block, tl.sum(row_values, 0))
    if WITH_GRAD:
        # dL/df_k = 4 Σ_j H_kj (f_k - f_j), H symmetric (similarities: row_pair_sums stays 0).
        grad = 4.0 * (row_pair_sums[:, None] * row_features - pair_products)
        tl.store(
            grad_ptr + (image_start + rows)[:, None] * num_channels + channels[None, :], grad,
            mask=row_in[:, None] & channel_in[None, :],
        )  # fmt: skip


@triton.jit
def _uldr_kernel(
    logit_ptr, depth_ptr, label_ptr, partial_ptr, grad_ptr, num_pixels, margin, inter_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_GRAD: tl.constexpr,
):  # fmt: skip
    row_block = tl.program_id(0)
    image = tl.program_id(1)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < num_pixels
    image_start = image * num_pixels
    row_logit = tl.load(logit_ptr + image_start + rows, mask=row_in, other=0.0)
    row_depth = tl.load(depth_ptr + image_start + rows, mask=row_in, other=0.0)
    row_label = tl.load(label_ptr + image_start + rows, mask=row_in, other=-1)

    row_values = tl.zeros((BLOCK_M,), tl.float32)
    row_grads = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, num_pixels, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_in = cols < num_pixels
        col_logit = tl.load(logit_ptr + image_start + cols, mask=col_in, other=0.0)
        col_depth = tl.load(depth_ptr + image_start + cols, mask=col_in, other=0.0)
        col_label = tl.load(label_ptr + image_start + cols, mask=col_in, other=-1)

        depth_gap = tl.abs(row_depth[:, None] - col_depth[None, :])
        both_uncertain = (row_label[:, None] >= 0) & (col_label[None, :] >= 0)
        same_class = row_label[:, None] == col_label[None, :]
        pulled = both_uncertain & same_class & (depth_gap < margin)
        pushed = both_uncertain & (row_label[:, None] != col_label[None, :]) & (depth_gap > inter_threshold)
        # Pulled pairs cost σ(-x), pushed ones σ(x), x = s_i s_j: σ(sign · x), computed as such
        # rather than as 1 - σ(x), which loses the small values.
        sign = tl.where(pushed, 1.0, -1.0)
        term = tl.sigmoid(sign * (row_logit[:, None] * col_logit[None, :]))
        counted = pulled | pushed
        row_values += tl.sum(tl.where(counted, term, 0.0), 1)
        if WITH_GRAD:
            # d/dx σ(sign · x) = sign · σ (1 - σ); the pair table is symmetric, hence the 2 below.
            slope = tl.where(counted, sign * term * (1.0 - term), 0.0)
            row_grads += tl.sum(slope * col_logit[None, :], 1)

    tl.store(partial_ptr + image * tl.num_programs(0) + row_block, tl.sum(row_values, 0))
    if WITH_GRAD:
        tl.store(grad_ptr + image_start + rows, 2.0 * row_grads, mask=row_in)


def _interpreted() -> bool:
    # Triton chose interpreter or compiler when the decorators above ran (TRITON_INTERPRET then).
    return not isinstance(_cddp_kernel, triton.runtime.JITFunction)


def cddp_tiles(num_channels: int) -> tuple[int, int, int]:
    """(rows, columns, channel block) of a CDDP tile for features of `num_channels` channels."""
    channel_block = max(16, triton.next_power_of_2(num_channels))
    if _interpreted():
        return (*INTERPRETER_TILES["cddp"], channel_block)
    rows, columns = CDDP_TILES[min(max(channel_block, 64), 512)]  # beyond 512 channels the tiles spill
    return rows, columns, channel_block


def uldr_tiles() -> tuple[int, int]:
    """(rows, columns) of a ULDR tile."""
    return INTERPRETER_TILES["uldr"] if _interpreted() else ULDR_TILE


@torch.library.custom_op("depmatch::cddp_pairs", mutates_args=())
def cddp_pairs(
    features: torch.Tensor,
    depth: torch.Tensor,
    scaled_entropy: torch.Tensor,
    label: torch.Tensor,
    inter_weight: torch.Tensor,
    sigma: float,
    inter_threshold: float,
    with_grad: bool,
    similarity: bool = False,
    target_offset: float = 0.0,
    target_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CDDP pair sum Σ_b Σ_(i,j) ω_ij (m_ij - t_ij)² and its gradient wrt the B×N×C features.

    m is the distance δ_ij, or with `similarity` the dot product (cosine similarity of the unit
    features given); the intra-class target is target_offset + target_scale · exp(-Δd²/2σ²)
    (`depmatch.losses.cddp_uldr.INTRA_FORMS`).

    features: B×N×C float32; depth, scaled_entropy: B×N float32 (the entropy carries the intra
    normaliser, see `cddp_loss`); label: B×N int32, -1 for pixels in no pair; inter_weight: B
    float32 (β/(|Q_b|·B), 0 without inter pairs). Returns the 0-dim sum and the gradient
    (an empty tensor when `with_grad` is False).
    """
    _expect(torch.float32, features=features, depth=depth, scaled_entropy=scaled_entropy, inter_weight=inter_weight)
    _expect(torch.int32, label=label)
    features, depth, scaled_entropy, label = (t.contiguous() for t in (features, depth, scaled_entropy, label))
    batch, num_pixels, num_channels = features.shape
    block_m, block_n, block_c = cddp_tiles(num_channels)
    rows = triton.cdiv(num_pixels, block_m)
    partials = features.new_empty(batch, rows)
    grad = features.new_empty(features.shape) if with_grad else features.new_empty(0)
    with _launch_on(features):
        _cddp_kernel[(rows, batch)](
            features, depth, scaled_entropy, label, inter_weight, partials, grad,
            num_pixels, num_channels, -0.5 / sigma**2, inter_threshold,
            num_channels * torch.finfo(torch.float32).eps, _FLOAT32_TINY, target_offset, target_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, WITH_GRAD=with_grad, SIMILARITY=similarity,
            num_warps=CDDP_NUM_WARPS,
        )  # fmt: skip
    return partials.sum(), grad


@cddp_pairs.register_fake
def _(
    features,
    depth,
    scaled_entropy,
    label,
    inter_weight,
    sigma,
    inter_threshold,
    with_grad,
    similarity=False,
    target_offset=0.0,
    target_scale=1.0,
):
    return features.new_empty(()), (features.new_empty(features.shape) if with_grad else features.new_empty(0))


@torch.library.custom_op("depmatch::uldr_pairs", mutates_args=())
def uldr_pairs(
    own_logit: torch.Tensor,
    depth: torch.Tensor,
    label: torch.Tensor,
    margin: float,
    inter_threshold: float,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ULDR pair sum Σ_b [Σ_pulled σ(-s_i s_j) + Σ_pushed σ(s_i s_j)] and its gradient wrt s.

    own_logit, depth: B×N float32; label: B×N int32, -1 for pixels that are not uncertain and
    valid. Returns the 0-dim sum (not normalised) and the B×N gradient (empty without `with_grad`).
    """
    _expect(torch.float32, own_logit=own_logit, depth=depth)
    _expect(torch.int32, label=label)
    own_logit, depth, label = (t.contiguous() for t in (own_logit, depth, label))
    batch, num_pixels = own_logit.shape
    block_m, block_n = uldr_tiles()
    rows = triton.cdiv(num_pixels, block_m)
    partials = own_logit.new_empty(batch, rows)
    grad = own_logit.new_empty(own_logit.shape) if with_grad else own_logit.new_empty(0)
    with _launch_on(own_logit):
        _uldr_kernel[(rows, batch)](
            own_logit, depth, label, partials, grad, num_pixels, margin, inter_threshold,
            BLOCK_M=block_m, BLOCK_N=block_n, WITH_GRAD=with_grad, num_warps=ULDR_NUM_WARPS,
        )  # fmt: skip
    return partials.sum(), grad


@uldr_pairs.register_fake
def _(own_logit, depth, label, margin, inter_threshold, with_grad):
    return own_logit.new_empty(()), (own_logit.new_empty(own_logit.shape) if with_grad else own_logit.new_empty(0))
