"""The packages on a CUDA device. CI has none, so every test here is skipped there.

On a GPU machine: ``make test-cuda`` (or ``pytest -m cuda``). Each test runs the same
work on the CPU and on the GPU and compares them, or checks what only a GPU has (fused kernels,
CUDA autocast and gradient scaling, inductor code generation).
"""

import pytest
import torch

CUDA = torch.device("cuda")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/cuda/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Full-precision float32 products (no TF32), so CPU and GPU agree to float rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
