"""The README's main job end to end: ``torch-mltp compare`` with its defaults (about 5 min on one core)."""

import json

import pytest

from torch_mltp.experiments.cli import main

pytestmark = pytest.mark.slow


def test_default_compare_trains_every_procedure_to_a_useful_accuracy(tmp_path, capsys):
    out, data = tmp_path / "compare", tmp_path / "data"
    data.mkdir()  # a --data-root that is given must exist
    assert main(["compare", "--out", str(out), "--data-root", str(data)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["procedures"] == ["standard", "mltp", "mltp_conv", "mltp_fc", "mltp_fo"]
    assert results["seeds"] == [0, 1, 2]
    for procedure, summary in results["summary"].items():
        accuracies = summary["test_acc"]["per_seed"]
        assert len(accuracies) == 3
        # MNIST-1D has 10 balanced classes: chance is 10 %; the CNN baseline reaches about 90 %.
        assert min(accuracies) > 80.0, (procedure, accuracies)
    for figure in ("accuracy.png", "alphas.png", "table.md"):
        assert (out / figure).stat().st_size > 0
    printed = capsys.readouterr().out
    assert all(f"| mnist1d_cnn | {p} |" in printed for p in results["procedures"])
