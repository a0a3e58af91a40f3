"""Every Python block of the README and of docs/training-loops.md runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/training-loops.md")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer((REPO / document).read_text()), start=1):
            yield pytest.param(match.group(1), id=f"{document}#{number}")


def test_the_documents_have_python_blocks():
    assert len(list(python_blocks())) >= 7


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_as_written(code, tmp_path, monkeypatch):
    if "import lightning" in code:
        pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a temporary folder
    script = tmp_path / "block.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
