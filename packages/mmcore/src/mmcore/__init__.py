"""mmcore: the thin core shared by the multimodal toolkit's packages.

* :class:`ModalityBatch` — named modality tensors with presence and padding masks;
* the model contract (:class:`MultimodalModel`, :func:`resolve_module`, :func:`run_encoder`);
* :mod:`mmcore.metrics` — MSA, classification, IEMOCAP and BraTS metrics;
* small utilities (:func:`seed_everything`, :func:`atomic_write`, :func:`read_json`) and layers for
  MulT-style backbones (:class:`PointwiseConv1d`, :func:`dropout_fast`, :class:`FastDropout`).
"""

from mmcore.batch import ModalityBatch, ModalityKind, collate_modalities, require_modality_batch
from mmcore.contract import (
    ModulePathError,
    MultimodalModel,
    accepts_padding_mask,
    call_padding_mask,
    check_distinct_modules,
    check_module_names,
    check_multimodal_model,
    closest_module_names,
    compiled_inner,
    contract_encoder_paths,
    encoder_features,
    find_modality_batch,
    held_module,
    is_multimodal_model,
    masked_mean,
    modalities_not_in_batch,
    parallel_inner,
    resolve_module,
    run_encoder,
)
from mmcore.layers import FastDropout, PointwiseConv1d, dropout_fast
from mmcore.utils import (
    atomic_write,
    collective_device,
    fused_optimizer,
    is_compiling,
    make_config,
    modes_kept,
    read_json,
    save_directory,
    seed_everything,
    sinusoidal_positions,
    stacklevel_outside,
    trainable_dtype,
)

__version__ = "0.1.0"

__all__ = [
    "FastDropout",
    "ModalityBatch",
    "ModalityKind",
    "ModulePathError",
    "MultimodalModel",
    "PointwiseConv1d",
    "accepts_padding_mask",
    "atomic_write",
    "call_padding_mask",
    "check_distinct_modules",
    "check_module_names",
    "check_multimodal_model",
    "closest_module_names",
    "collate_modalities",
    "collective_device",
    "compiled_inner",
    "contract_encoder_paths",
    "dropout_fast",
    "encoder_features",
    "find_modality_batch",
    "fused_optimizer",
    "held_module",
    "is_compiling",
    "is_multimodal_model",
    "make_config",
    "masked_mean",
    "modalities_not_in_batch",
    "modes_kept",
    "parallel_inner",
    "read_json",
    "require_modality_batch",
    "resolve_module",
    "run_encoder",
    "save_directory",
    "seed_everything",
    "sinusoidal_positions",
    "stacklevel_outside",
    "trainable_dtype",
]
