"""Pretrained encoder weights, from a local path or a Hugging Face hub id (depmatch.models.hub).

Three formats: a timm-style state dict (`.safetensors`, or `.pth`/`.pt`/`.bin` read with
`torch.load(weights_only=True)` so an untrusted file cannot run code), Meta's original
DINOv2 / DINOv3 `.pth` (converted to timm names by the timm family's own filter), and a
transformers directory for `backend: transformers`. A file that does not fit the model is an error
that lists the keys, never a silent partial load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from depmatch.config import ModelConfig
from depmatch.errors import UserError
from depmatch.models.hub import HF_HUB_PREFIX, HubId, timm_hub_state_dict, transformers_folder, weights_location

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_KEYS_LISTED = 20  # longer key lists are cut so the error stays readable


class WeightsError(UserError, RuntimeError):
    """Pretrained weights are not configured, missing, unreadable, or do not fit the model."""


def pretrained_source(config: ModelConfig) -> str | None:
    """The weights to load (a local path or a hub id), or None for an explicitly requested random init."""
    if config.pretrained:
        return config.pretrained
    if config.random_init:
        logger.warning("encoder %s is randomly initialised (model.random_init: true)", config.encoder)
        return None
    raise WeightsError(
        f"encoder {config.encoder} has no weights: set model.pretrained to a local weights file or "
        "directory or a Hugging Face hub id, or set model.random_init: true to train from random initialisation"
    )


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a `.safetensors` or torch-pickle file; `model`/`state_dict` wrappers are unwrapped."""
    if not path.is_file():
        raise WeightsError(
            f"model.pretrained: weights file {path} does not exist; point model.pretrained at the file "
            "(e.g. --set model.pretrained=/path/to/dinov2_vits14_pretrain.pth) or at a Hugging Face hub id"
        )
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        if path.suffix in _TORCH_SUFFIXES:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{path}: unsupported weights format (use .safetensors, {', '.join(_TORCH_SUFFIXES)})")
    except WeightsError:
        raise
    except Exception as error:  # safetensors, pickle and zip errors share no base class
        raise WeightsError(f"cannot read pretrained weights {path}: {error}") from error
    return _tensors(loaded, path)


def _tensors(loaded: object, source: Path | str) -> StateDict:
    """The state dict inside `model`/`state_dict` wrappers, checked to hold only tensors."""
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{source} does not hold a state dict of tensors")
    return loaded


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_KEYS_LISTED])
    return shown + (f", ... ({len(keys) - _KEYS_LISTED} more)" if len(keys) > _KEYS_LISTED else "")


def _check_fit(path: Path | str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> None:
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise WeightsError(f"pretrained weights {path} do not fit the encoder; " + "; ".join(problems))


def load_timm_weights(
    module: nn.Module,
    name: str,
    *,
    convert: Callable[[StateDict], StateDict] | None = None,
    unused_prefixes: tuple[str, ...] = (),
) -> None:
    """Load `model.pretrained` into a timm model: a local file, a local timm hub folder (its
    model.safetensors), or a hub id (`hf-hub:org/name`, `timm/name`) fetched as timm does."""
    location = weights_location(name)
    if isinstance(location, HubId):
        source = f"{HF_HUB_PREFIX}{location}"
        state_dict = _tensors(timm_hub_state_dict(location, "model.pretrained"), source)
    else:
        source = location / "model.safetensors" if location.is_dir() else location
        state_dict = read_state_dict(source)
    if any(key.startswith("embeddings.") for key in state_dict):
        raise WeightsError(
            f"pretrained weights {source} are a transformers Dinov2Model or DINOv3ViTModel (embeddings.*), "
            "not a timm model: set model.backend: transformers to load them"
        )
    fit_state_dict(module, state_dict, source, convert=convert, unused_prefixes=unused_prefixes)


def fit_state_dict(
    module: nn.Module,
    state_dict: StateDict,
    path: Path | str,
    *,
    convert: Callable[[StateDict], StateDict] | None = None,
    unused_prefixes: tuple[str, ...] = (),
) -> None:
    """Load `state_dict` (read from `path`) into `module`, all keys and shapes matching.

    `convert` maps foreign key names to the module's; `unused_prefixes` are keys the file may
    carry that the encoder has no use for (an ImageNet classifier).
    """
    if convert is not None:
        try:
            state_dict = convert(state_dict)
        except Exception as error:  # a foreign layout can break the converter anywhere
            raise WeightsError(f"cannot convert pretrained weights {path}: {error}") from error
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not k.startswith(unused_prefixes))
    mismatched = sorted(
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    )
    _check_fit(path, missing, unexpected, mismatched)
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected})
    logger.info("loaded encoder weights from %s", path)


def load_transformers_backbone(
    name: str, prepare: Callable[[object], tuple[type, tuple[int, ...]]], **config_overrides
) -> tuple[nn.Module, tuple[int, ...]]:
    """A transformers Backbone (Dinov2Backbone, DINOv3ViTBackbone, ...) from a `save_pretrained` folder or a
    hub repo id, every weight accounted for. `prepare(config)` gives the backbone class and sets the blocks
    to read (out_indices) once the folder's config is known; it returns them with the class."""
    from transformers import AutoConfig

    path = transformers_folder(name, "model.pretrained", "facebook/dinov2-small")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, **config_overrides)
    except Exception as error:  # transformers raises OSError or ValueError
        raise WeightsError(f"cannot read the transformers config.json in {path}: {error}") from error
    backbone_class, layers = prepare(config)
    try:
        # ignore_mismatched_sizes only makes transformers report mismatches instead of raising
        # a bare RuntimeError; any mismatch is still refused below, with its keys.
        model, info = backbone_class.from_pretrained(
            str(path), config=config, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as error:  # transformers raises OSError, ValueError or RuntimeError
        raise WeightsError(f"cannot load a {backbone_class.__name__} from {path}: {error}") from error
    # The encoder drops the masked-image-modelling token, so a file may or may not hold it; a
    # classification checkpoint may carry its classifier. Neither is a misfit.
    missing = sorted(k for k in info["missing_keys"] if "mask_token" not in k)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("classifier."))
    mismatched = sorted(
        f"{k} (file {tuple(file_shape)}, model {tuple(model_shape)})"
        for k, file_shape, model_shape in info["mismatched_keys"]
    )
    _check_fit(path, missing, unexpected, mismatched)
    logger.info("loaded %s weights from %s", backbone_class.__name__, path)
    return model, layers
