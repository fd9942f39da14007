"""Wander: a low-rank sequence multimodal adapter (Guo et al., AAAI 2025, arXiv 2412.08979).

``Wander(model, ranks=...)`` wraps a multimodal model the user already has: it freezes the base,
captures each modality's sequence, and fuses the modalities token by token through a
CP-factorised outer product (any number of modalities, different sizes and lengths).

Example:
    >>> from wander import Wander
    >>> wander = Wander(model, ranks={"bottleneck": 16, "feature": 8, "token": 12},
    ...                 example_input=batch)  # doctest: +SKIP
    >>> wander.print_trainable_parameters()  # doctest: +SKIP
    >>> wander.save_pretrained("adapter/")  # doctest: +SKIP
    >>> again = Wander.from_pretrained(fresh_base_model, "adapter/")  # doctest: +SKIP

``inject_wander(model, ranks=...)`` is the low-level path: it adds the adapter to the model in
place (a submodule of it) and returns the model itself; ``get_wander(model)`` gives the
``Wander`` behind it.
"""

__version__ = "0.1.0"

from wander.config import WanderConfig
from wander.functional import dense_fusion, fusion_product
from wander.inject import get_wander, inject_wander
from wander.inspect import TargetReport, inspect_targets
from wander.layer import WanderFusion
from wander.model import Wander, WanderTargetError

__all__ = [
    "TargetReport",
    "Wander",
    "WanderConfig",
    "WanderFusion",
    "WanderTargetError",
    "__version__",
    "dense_fusion",
    "fusion_product",
    "get_wander",
    "inject_wander",
    "inspect_targets",
]
