"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024, arXiv 2411.01409).

The method itself lands with its own issue; this release only reserves the package.
"""

__version__ = "0.1.0"
