"""MPLMM: multimodal prompt learning for missing modalities (Guo, Jin, Zhao, ACL 2024).

The method itself lands with its own issue; this release only reserves the package.
"""

__version__ = "0.1.0"
