"""Every Python block of the README, docs/training-loops.md and docs/integrations.md runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/training-loops.md", "docs/integrations.md")
FRAMEWORKS = ("lightning", "transformers", "accelerate")  # optional: a block that imports one needs it
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer((REPO / document).read_text()), start=1):
            yield pytest.param(match.group(1), id=f"{document}#{number}")


def test_the_documents_have_python_blocks():
    assert len(list(python_blocks())) >= 7


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_as_written(code, tmp_path, monkeypatch, request):
    imported = [name for name in FRAMEWORKS if re.search(rf"^(from|import) {name}\b", code, re.M)]
    for name in imported:
        pytest.importorskip(name)
    if {"transformers", "accelerate"} & set(imported):
        request.getfixturevalue("accelerator_state")
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a temporary folder
    script = tmp_path / "block.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
