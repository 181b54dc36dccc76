"""`depmatch export`: one consolidated model directory from any checkpoint.

The trainer already writes consolidated fp32 `student.safetensors` / `teacher.safetensors`
into every checkpoint (under ZeRO-2/3 too), so exporting is choosing one, checking that
it loads into the model its config describes, and writing it next to that config and
the class names. The result needs neither DeepSpeed nor the training state.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from depmatch.config import load_config, save_config
from depmatch.evaluation.checkpoint_dir import checkpoint_config
from depmatch.evaluation.loading import (
    EXPORT_WEIGHTS,
    EXPORTED_FROM_KEY,
    build_model_for_inference,
    load_classes,
    load_for_inference,
    load_weights_into,
    resolve_weights,
)


def export_model(checkpoint: str | Path, out: str | Path, which: str = "auto") -> Path:
    """Write `model.safetensors`, `config.yaml` and `classes.json` to `out`; return `out`.

    The chosen weights (teacher or student) are recorded in the safetensors metadata
    under `depmatch.exported_from`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config = load_config(checkpoint_config(checkpoint))
    weights_path, source = resolve_weights(checkpoint, which)
    weights = load_file(str(weights_path))
    # fail here, not at the first eval, when the weights do not fit the config
    load_weights_into(build_model_for_inference(config), weights, weights_path)
    classes = load_classes(checkpoint, config.num_classes)

    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / EXPORT_WEIGHTS), metadata={EXPORTED_FROM_KEY: source})
    save_config(config, out / "config.yaml")
    (out / "classes.json").write_text(json.dumps(classes.to_json(), indent=2) + "\n")
    # read the export back the way eval and predict will
    load_for_inference(out)
    return out
