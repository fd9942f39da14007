"""The READMEs' Python examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_python_examples_run(readme):
    text = readme.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if readme.parent == ROOT:
        assert blocks, "the main README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
