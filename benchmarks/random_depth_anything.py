"""Save a randomly initialised Depth Anything (V2-Small shape) as a local transformers folder.

For timing the online-depth step (`--set train.online_depth_model=DIR` in `depmatch bench`)
where no real weights are on disk: the cost of a forward pass does not depend on the weights.
Its depth maps are meaningless; never train with it.

    python benchmarks/random_depth_anything.py /tmp/depth-anything-small-random
"""

from __future__ import annotations

import argparse

import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write")
    args = parser.parse_args()
    # Depth Anything V2 Small: a DINOv2-S backbone read at blocks 3, 6, 9, 12 and a DPT neck of 48-384 channels.
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
                                 fusion_hidden_size=64, head_hidden_size=32, depth_estimation_type="relative")  # fmt: skip
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config)
    model.save_pretrained(args.out)
    DPTImageProcessor(
        size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14
    ).save_pretrained(args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, random)")


if __name__ == "__main__":
    main()
