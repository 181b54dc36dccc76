"""The synthetic scene's cues without depth, on an ablation preset's unlabeled scenes (issue 19).

    python tools/check_scene.py --preset cpu_v4   # issue 19's plan on scene version 4
    python tools/check_scene.py --preset cpu_v3   # ... on version 3 (the same shapes: the same numbers)
    python tools/check_scene.py                   # the cpu preset's scene version 2

Prints depmatch.data.scene_stats.scene_statistics as JSON: the best bottom-row (position)
threshold's accuracy on near vs far boxes (must be ≤ 60 %), the same on the ground's grey just
below each box, and the percentage of training crops (the loader's rescale, crop and flip) that
hold both box classes on the CDDP grid (must be ≥ 60 %).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (tools/ablate.py, beside this file)

from depmatch.data.scene_stats import scene_statistics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(ablate.PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops' augmentation")
    args = parser.parse_args(argv)
    preset = ablate.PRESETS[args.preset]
    plan = ablate.parse_args(["--preset", args.preset])
    config = ablate.load_config_of(plan, ("fixmatch", "true", "base", 0))
    count = config.data.synth.unlabeled
    data = config.data
    stats = scene_statistics(data.synth, "unlabeled", count, data.crop_size, data.scale_range, args.seed)
    print(json.dumps({"preset": args.preset, "scene_version": config.data.synth.scene_version,
                      "unlabeled": preset.unlabeled, **stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
