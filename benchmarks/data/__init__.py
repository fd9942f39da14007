"""Data layer of the harness: loaders for the formats users have, and generators of such files.

Every loader returns ``{"train", "valid", "test"}`` → :class:`mmcore.ModalityBatch`.
"""

from benchmarks.data.generators import (
    PlantedStructure,
    write_mmsa_pickle,
    write_mult_pickle,
    write_shift_pair,
)
from benchmarks.data.pickles import load_mmsa_pickle, load_mult_pickle
from benchmarks.data.uci import UCI_MODALITIES, default_uci_path, load_uci_mfeat

__all__ = [
    "UCI_MODALITIES",
    "PlantedStructure",
    "default_uci_path",
    "load_mmsa_pickle",
    "load_mult_pickle",
    "load_uci_mfeat",
    "write_mmsa_pickle",
    "write_mult_pickle",
    "write_shift_pair",
]
