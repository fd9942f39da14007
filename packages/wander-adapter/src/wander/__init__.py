"""Wander: a low-rank sequence multimodal adapter (Guo et al., AAAI 2025, arXiv 2412.08979).

The method itself lands with its own issue; this release only reserves the package.
"""

__version__ = "0.1.0"
