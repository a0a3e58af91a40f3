"""The scripts of ``examples/`` are the documents' blocks, word for word: each is marked in its document
(``<!-- example: examples/NAME.py -->`` right before the block), and ``tests/test_docs.py`` runs every
block (the two distributed scripts under ``torchrun`` on 2 processes), so the examples run as documented
and the two never drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/training-loops.md", "docs/integrations.md", "docs/distributed.md")
MARKED = re.compile(r"^<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)^```", re.S | re.M)


def marked_blocks() -> list:
    return [
        pytest.param(match.group(1), match.group(2), id=match.group(1))
        for document in DOCUMENTS
        for match in MARKED.finditer((REPO / document).read_text())
    ]


@pytest.mark.parametrize(("example", "block"), marked_blocks())
def test_each_example_is_its_documented_block(example, block):
    assert (REPO / example).read_text() == block


def test_every_example_is_in_a_document():
    documented = sorted(param.values[0] for param in marked_blocks())
    assert documented == sorted(f"examples/{path.name}" for path in (REPO / "examples").glob("*.py"))
    assert len(documented) == 8
