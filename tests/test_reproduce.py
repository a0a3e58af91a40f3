"""The plan of ``torch-mltp reproduce``: shown setting by setting while it is timed, and its arithmetic."""

from __future__ import annotations

import re

import pytest
import torch

from torch_mltp.experiments import reproduce as reproduce_module
from torch_mltp.experiments.cli import main
from torch_mltp.experiments.reproduce import plan_lines, table_rows


@pytest.fixture
def fake_timing(monkeypatch):
    """Replace step timing by known seconds: 0.5 s for the first setting timed, 0.1 s more for each next."""
    calls = []

    def measure(experiment, procedure, device, steps):
        calls.append((experiment.model, procedure, steps))
        return 0.4 + 0.1 * len(calls)

    monkeypatch.setattr(reproduce_module, "measure_step_seconds", measure)
    return calls


def test_each_setting_is_reported_as_soon_as_it_is_timed(fake_timing):
    lines = plan_lines("table1", table_rows("table1", {}), [0, 1, 2], torch.device("cpu"), timing_steps=2)
    for line in lines:
        if line.startswith("timing "):
            assert line.startswith("timing 17 settings: 1 warm-up step and 2 timed step(s) each")
            assert not fake_timing
        if line.startswith("  [ 1/17]"):
            break
    assert fake_timing == [("cnet1", "standard", 2)]  # one setting timed, its line already out
    rest = list(lines)
    assert len(fake_timing) == 17 and fake_timing[-1][:2] == ("cnet4", "mltp_fo")
    assert rest[0].startswith("  [ 2/17] cnet1     mltp         0.6000 s/step")
    # every run: 150 epochs of 391 steps; three seeds each
    hours = sum(0.4 + 0.1 * k for k in range(1, 18)) * 150 * 391 * 3 / 3600
    assert re.match(rf"estimated total: ~{hours:.1f} h on cpu", rest[-1])
    assert "depends on the machine" in rest[-1]


def test_the_command_line_prints_each_line_while_timing_the_next(fake_timing, monkeypatch, capsys):
    printed_before_call = []
    measure = reproduce_module.measure_step_seconds

    def measure_after_reading(*args):
        printed_before_call.append(capsys.readouterr().out)
        return measure(*args)

    monkeypatch.setattr(reproduce_module, "measure_step_seconds", measure_after_reading)
    argv = ["reproduce", "table3", "--dry-run", "--timing-steps", "1", "--device", "cpu", "--seeds", "0"]
    assert main(argv) == 0
    assert [call[:2] for call in fake_timing] == [
        ("resnet18", "standard"), ("resnet18", "mltp_fo"), ("resnet34", "standard"), ("resnet34", "mltp_fo"),
    ]  # fmt: skip
    assert "timing 4 settings: 1 warm-up step and 1 timed step(s) each" in printed_before_call[0]
    for index, printed in enumerate(printed_before_call[1:], start=1):
        assert printed.startswith(f"  [{index}/4] ")  # the previous setting's line, before timing this one
    last = capsys.readouterr().out.splitlines()
    assert last[0].startswith("  [4/4] resnet34  mltp_fo      0.8000 s/step")
    # 90 epochs of ceil(100000 / 128) = 782 steps, one seed
    assert last[1].startswith(f"estimated total: ~{(0.5 + 0.6 + 0.7 + 0.8) * 90 * 782 / 3600:.1f} h")
