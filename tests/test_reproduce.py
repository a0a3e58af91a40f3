"""The plan of ``torch-mltp reproduce``: one timed step per model, shown as soon as it is timed, its
arithmetic, and whether the data set is where --data-root points."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from fabricate import write_cifar, write_tiny_imagenet

from torch_mltp.data import dataset_folder, dataset_present
from torch_mltp.experiments import reproduce as reproduce_module
from torch_mltp.experiments.cli import main
from torch_mltp.experiments.reproduce import STEP_COST, data_line, plan_lines, table_rows


@pytest.fixture
def fake_timing(monkeypatch):
    """Replace step timing by known seconds: 0.5 s for the first model timed, 0.1 s more for each next."""
    calls = []

    def measure(experiment, device, steps):
        calls.append((experiment.model, steps))
        return 0.4 + 0.1 * len(calls)

    monkeypatch.setattr(reproduce_module, "measure_step_seconds", measure)
    return calls


def test_each_model_is_timed_once_and_reported_as_soon_as_it_is(fake_timing, tmp_path):
    lines = plan_lines(
        "table1", table_rows("table1", {}), [0, 1, 2], str(tmp_path), torch.device("cpu"), timing_steps=2
    )
    for line in lines:
        if line.startswith("timing "):
            assert line.startswith("timing 4 models: 2 step(s) of standard training each")
            assert not fake_timing
        if line.startswith("  [1/4]"):
            break
    assert fake_timing == [("cnet1", 2)]  # one model timed, its line already out
    rest = list(lines)
    assert fake_timing == [("cnet1", 2), ("cnet2", 2), ("cnet3", 2), ("cnet4", 2)]
    assert rest[0].startswith("  [2/4] cnet2       0.6000 s/step; per run: standard ~")
    # every run: 150 epochs of 391 steps; three seeds each; MLTP's steps cost STEP_COST standard steps
    cost = STEP_COST["cpu"]
    cnets = sum(0.4 + 0.1 * k for k in range(1, 4)) * sum(cost.values())
    hours = (cnets + 0.8 * (cost["standard"] + cost["mltp_fo"])) * 150 * 391 * 3 / 3600
    assert re.match(rf"estimated total: ~{hours:.1f} h on cpu", rest[-1])
    assert "depends on the machine" in rest[-1]


def test_the_command_line_prints_each_line_while_timing_the_next(fake_timing, monkeypatch, capsys, tmp_path):
    printed_before_call = []
    measure = reproduce_module.measure_step_seconds

    def measure_after_reading(*args):
        printed_before_call.append(capsys.readouterr().out)
        return measure(*args)

    monkeypatch.setattr(reproduce_module, "measure_step_seconds", measure_after_reading)
    argv = [
        "reproduce",
        "table3",
        "--dry-run",
        "--device",
        "cpu",
        "--seeds",
        "0",
        "--data-root",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert fake_timing == [("resnet18", 1), ("resnet34", 1)]
    assert "timing 2 models: 1 step(s) of standard training each" in printed_before_call[0]
    assert "data: tiny-imagenet NOT found in " in printed_before_call[0]
    assert printed_before_call[1].startswith("  [1/2] resnet18 ")  # before timing the next model
    last = capsys.readouterr().out.splitlines()
    assert last[0].startswith("  [2/2] resnet34    0.6000 s/step; per run: standard ~")
    # 90 epochs of ceil(100000 / 128) = 782 steps, one seed, standard and mltp_fo for each model
    steps = 90 * 782 * (STEP_COST["cpu"]["standard"] + STEP_COST["cpu"]["mltp_fo"])
    assert last[1].startswith(f"estimated total: ~{(0.5 + 0.6) * steps / 3600:.1f} h")


def test_the_plan_says_whether_the_data_set_is_there(tmp_path):
    for name in ("cifar10", "cifar100", "tiny-imagenet"):
        assert not dataset_present(name, tmp_path)
    assert data_line("cifar10", str(tmp_path)) == (
        f"data: cifar10 NOT found in {tmp_path / 'cifar-10-batches-py'} (--data-root {tmp_path}): "
        "add --download to fetch it"
    )
    assert "unzip it by hand, see docs/data.md" in data_line("tiny-imagenet", str(tmp_path))
    fake = write_cifar(tmp_path, "cifar100")
    write_tiny_imagenet(tmp_path)
    assert dataset_folder("cifar100", tmp_path) == fake.folder
    assert dataset_folder("cifar100", tmp_path).name == torchvision.datasets.CIFAR100.base_folder
    assert data_line("cifar100", str(tmp_path)) == f"data: cifar100 found in {fake.folder}"
    assert data_line("tiny-imagenet", str(tmp_path)).startswith("data: tiny-imagenet found in ")
    (fake.folder / "test").unlink()  # one file missing: not there
    assert not dataset_present("cifar100", tmp_path)
    assert dataset_present("mnist1d", tmp_path)  # generated when missing


def test_table_choice_is_in_the_help_and_its_absence_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: torch-mltp reproduce {table1,table2,table3} [--dry-run]")
    assert "table1 (cifar10: cnet1, cnet2, cnet3, cnet4)" in " ".join(help_text.split())
    assert "runs/reproduce/<table><settings>" in help_text
    assert "--tasks" not in help_text and "--dist-timeout" not in help_text  # it runs in one process
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--dry-run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "torch-mltp reproduce: error: name the table to reproduce, one of table1, table2, table3, "
        "e.g. 'torch-mltp reproduce table1 --dry-run'"
    ]
