"""Quieting the INFO and warning lines of the libraries underneath (`--verbose` keeps them).

accelerate logs its setup at INFO, DeepSpeed warns "Setting accelerator to CPU" on every
import without a GPU, and the model libraries report downloads and defaults: none of it is
something the user can act on, and it buries the lines of depmatch itself.
"""

from __future__ import annotations

import logging

THIRD_PARTY_LOGGERS = ("accelerate", "DeepSpeed", "deepspeed", "torch", "timm", "transformers", "huggingface_hub")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_third_party_logs() -> None:
    """Only errors from the libraries in `THIRD_PARTY_LOGGERS`; call it before they are imported."""
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # DeepSpeed sets its logger's level itself when it is imported; a filter stays
        logger.addFilter(_errors_only)
