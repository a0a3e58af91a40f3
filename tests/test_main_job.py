"""The README's main job end to end: ``torch-mltp compare`` with its defaults (a few minutes on one core)."""

import json

import pytest

from torch_mltp.experiments.cli import main
from torch_mltp.experiments.decision import DEFAULT_ARMS, DEFAULT_SEEDS

pytestmark = pytest.mark.slow


def test_default_compare_decides_on_mnist1d_with_every_arm_at_a_useful_accuracy(tmp_path, capsys):
    out, data = tmp_path / "compare", tmp_path / "data"
    data.mkdir()  # a --data-root that is given must exist
    assert main(["compare", "--out", str(out), "--data-root", str(data)]) == 0
    decision = json.loads((out / "decision.json").read_text())
    assert list(decision["arms"]) == list(DEFAULT_ARMS) and decision["setup"]["seeds"] == list(DEFAULT_SEEDS)
    assert decision["setup"]["model"] == "mnist1d_cnn"
    for name, arm in decision["arms"].items():
        # MNIST-1D has 10 balanced classes: chance is 10 %; the CNN baseline reaches about 90 %.
        assert len(arm["test_acc"]) == len(DEFAULT_SEEDS) and min(arm["test_acc"]) > 80.0, (name, arm)
    assert [row["value"] for row in decision["tuning"]["budget"]["rows"]] == [0.5, 1.0]
    printed = capsys.readouterr().out
    assert f"**Verdict.** {decision['verdict'][0]}" in printed
    assert (out / "decision.png").stat().st_size > 0
