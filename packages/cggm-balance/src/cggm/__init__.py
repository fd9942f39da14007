"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024, arXiv 2411.01409).

A modulator called inside your own training loop keeps one modality from dominating: per-modality
classifiers on detached encoder features measure how much each modality improves, and the
encoders' gradients are rescaled (and the head steered) towards the lagging ones. Any number of
modalities >= 2; classification (multi-label too), regression and segmentation.
"""

__version__ = "0.1.0"

from cggm.classifiers import ModalityClassifier, StackedClassifiers
from cggm.config import CGGMConfig
from cggm.functional import (
    batch_score_counts,
    direction_loss,
    direction_loss_from_target,
    direction_target,
    magnitude_coefficients,
    segmentation_dice,
)
from cggm.modulator import CGGM

__all__ = [
    "CGGM",
    "CGGMConfig",
    "ModalityClassifier",
    "StackedClassifiers",
    "__version__",
    "batch_score_counts",
    "direction_loss",
    "direction_loss_from_target",
    "direction_target",
    "magnitude_coefficients",
    "segmentation_dice",
]
