"""MPLMM: multimodal prompt learning for missing modalities (Guo, Jin, Zhao, ACL 2024).

Generative, missing-signal and missing-type prompts on a frozen MulT-style backbone, for any
number of modalities (missing cases are bitmasks), vectorised over batches that mix every case;
plus helpers that simulate missing modalities on any :class:`mmcore.ModalityBatch`.
"""

__version__ = "0.1.0"

from mm_prompts.backbone import MulTBackbone, MulTConfig
from mm_prompts.missing import (
    REFERENCE_CASES,
    all_cases,
    apply_case,
    case_from_presence,
    case_name,
    presence_from_case,
    reference_case_to_mask,
    simulate_missing,
)
from mm_prompts.model import MPLMM

__all__ = [
    "MPLMM",
    "REFERENCE_CASES",
    "MulTBackbone",
    "MulTConfig",
    "__version__",
    "all_cases",
    "apply_case",
    "case_from_presence",
    "case_name",
    "presence_from_case",
    "reference_case_to_mask",
    "simulate_missing",
]
