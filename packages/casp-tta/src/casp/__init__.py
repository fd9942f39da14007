"""CASP: contrastive adaptation and stable pseudo-labels (Guo et al., AAAI 2025, arXiv 2412.07121).

The method itself lands with its own issue; this release only reserves the package.
"""

__version__ = "0.1.0"
