"""The example scripts run end to end (``--quick``: a few epochs), print their results, warn not."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "printed"),
    [
        ("wander_transfer.py", "same outputs = True"),
        ("cggm_balance.py", "test accuracy: joint"),
        ("mplmm_missing.py", "mor only"),
        ("casp_shift.py", "pseudo-labels"),
    ],
)
def test_example_runs(script, printed):
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / script), "--quick"],  # warnings fail
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert printed in result.stdout
