"""DepMatch: depth-guided semi-supervised semantic segmentation."""

__version__ = "0.1.0"
