"""Each package's wheel builds, installs into a fresh virtual environment with only the mmcore
wheel beside it, and imports: this is how we know `pip install wander-adapter` works."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "mmcore": "mmcore",
    "wander-adapter": "wander",
    "cggm-balance": "cggm",
    "casp-tta": "casp",
    "mm-prompts": "mm_prompts",
}
UV = os.environ.get("UV") or shutil.which("uv")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UV is None, reason="uv is needed to build wheels (run via `make test`)"),
]


def uv(*args, **kwargs):
    return subprocess.run([UV, *args], check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    for name in PACKAGES:
        uv("build", "--quiet", "--package", name, "--wheel", "--out-dir", str(out), cwd=ROOT)
    # pin third-party versions to the lock, so the fresh environments reuse uv's cache
    constraints = out / "constraints.txt"
    uv(
        "export",
        "--frozen",
        "--no-hashes",
        "--all-packages",
        "--no-emit-workspace",
        "--no-dev",
        "--output-file",
        str(constraints),
        cwd=ROOT,
    )
    return out


def wheel(wheels: Path, name: str) -> Path:
    found = list(wheels.glob(f"{name.replace('-', '_')}-0.1.0-py3-none-any.whl"))
    assert len(found) == 1, f"no wheel for {name} in {sorted(p.name for p in wheels.iterdir())}"
    return found[0]


@pytest.mark.parametrize("name", list(PACKAGES))
def test_wheel_installs_and_imports_in_a_clean_venv(tmp_path, wheels, name):
    venv = tmp_path / "venv"
    uv("venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    to_install = {wheel(wheels, "mmcore"), wheel(wheels, name)}
    uv(
        "pip",
        "install",
        "--quiet",
        "--python",
        str(python),
        "--constraint",
        str(wheels / "constraints.txt"),
        *map(str, to_install),
    )
    module = PACKAGES[name]
    code = (
        f"import {module}, mmcore, importlib.util as u; "
        f"assert {module}.__version__ == '0.1.0'; "
        "assert u.find_spec('benchmarks') is None; "  # the harness is never a dependency
        "import mmcore.metrics; print('ok')"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    installed = uv("pip", "list", "--python", str(python)).stdout
    for sibling in PACKAGES:  # method packages never pull each other in
        if sibling not in (name, "mmcore"):
            assert f"\n{sibling} " not in installed, f"{name} pulled in {sibling}"
    assert "py.typed" in {p.name for p in (venv.glob(f"lib/python*/site-packages/{module}/*"))}
