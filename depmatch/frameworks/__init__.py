"""Base SSS frameworks as small strategies over one trainer, and the DepMatch hook."""

from depmatch.choices import check_choice
from depmatch.config import ConfigError
from depmatch.frameworks.base import Framework, Predictions
from depmatch.frameworks.fixmatch import FixMatch
from depmatch.frameworks.unimatch import UniMatch
from depmatch.frameworks.unimatch_v2 import UniMatchV2

FRAMEWORKS = {cls.name: cls for cls in (FixMatch, UniMatch, UniMatchV2)}


def build_framework(name: str) -> Framework:
    check_choice("train.framework", name, tuple(FRAMEWORKS), ConfigError)
    return FRAMEWORKS[name]()


__all__ = ["Framework", "Predictions", "FixMatch", "UniMatch", "UniMatchV2", "FRAMEWORKS", "build_framework"]
