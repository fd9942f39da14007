"""Baselines that the method packages are compared against (they live here, not in packages)."""
