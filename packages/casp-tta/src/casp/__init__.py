"""CASP: contrastive adaptation and stable pseudo-labels (Guo et al., AAAI 2025, arXiv 2412.07121).

Test-time adaptation for multimodal regression and classification under distribution shift:
``CASP(model).adapt(unlabeled_target)`` adapts the normalisation layers of a copy of your model
without reading a single target label; ``predict``, online ``forward`` and ``reset`` as in Tent.
"""

__version__ = "0.1.0"

from casp.adapter import CASP, AdaptationReport
from casp.config import CASPConfig
from casp.functional import (
    gather_with_grad,
    nt_xent,
    pseudo_labels,
    select_samples,
    stability_scores,
)
from casp.norms import is_norm_layer, norm_parameters

__all__ = [
    "CASP",
    "AdaptationReport",
    "CASPConfig",
    "__version__",
    "gather_with_grad",
    "is_norm_layer",
    "norm_parameters",
    "nt_xent",
    "pseudo_labels",
    "select_samples",
    "stability_scores",
]
