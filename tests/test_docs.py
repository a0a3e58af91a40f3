"""Every Python block of the README, docs/training-loops.md and docs/integrations.md runs as written;
the scripts of docs/distributed.md (DDP and FSDP2) run under ``torchrun --nproc_per_node=2`` on the CPU."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
from spawn import torchrun

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/training-loops.md", "docs/integrations.md")
TORCHRUN_DOCUMENTS = ("docs/distributed.md",)
FRAMEWORKS = ("lightning", "transformers", "accelerate")  # optional: a block that imports one needs it
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 240
TEARDOWN_ABORT = "terminate called without an active exception"


def python_blocks(documents) -> list:
    return [
        pytest.param(match.group(1), id=f"{document}#{number}")
        for document in documents
        for number, match in enumerate(BLOCK.finditer((REPO / document).read_text()), start=1)
    ]


def test_the_documents_have_python_blocks():
    assert len(python_blocks(DOCUMENTS)) >= 7 and len(python_blocks(TORCHRUN_DOCUMENTS)) == 2


@pytest.mark.parametrize("code", python_blocks(DOCUMENTS))
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


@pytest.mark.parametrize("code", python_blocks(TORCHRUN_DOCUMENTS))
def test_script_runs_under_torchrun_on_two_cpu_processes(code, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(code)
    done = torchrun(str(script), cwd=tmp_path, timeout=TIMEOUT_S)
    printed = done.stdout.splitlines()
    resumes = "ShardedCheckpoint" in code  # the FSDP2 script also saves a checkpoint and resumes from it
    expected = ["epoch 0", "epoch 1"] + (["resumed"] if resumes else [])
    assert [line.split(":")[0] for line in printed] == expected, done.stdout + done.stderr  # rank 0 only
    # Once the script is done, a gloo thread of torch can still abort a process while Python shuts down
    # ("terminate called without an active exception"): the training above is complete, so only that
    # abort, after the last line, is tolerated.
    assert done.returncode == 0 or TEARDOWN_ABORT in done.stderr, done.stdout + done.stderr
    if resumes:
        assert printed[-1] == "resumed: the same weights True, the same alphas True"
