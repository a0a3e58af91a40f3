"""``torch-mltp compare`` on a model and a data set of the user's, by import string, and its Python API
``torch_mltp.experiments.compare``: the arms, their pairing, the budget, the paired statistics (checked
against scipy), the verdict and the files."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest
from scipy import stats

from torch_mltp.experiments import Arm, Plan, compare
from torch_mltp.experiments.cli import main
from torch_mltp.experiments.decision import analyse, verdict
from torch_mltp.experiments.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

USER_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 8, generator=generator)
    labels = (inputs[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(dim=1)
    return TensorDataset(inputs[:200], labels[:200]), TensorDataset(inputs[200:], labels[200:])


def not_a_model():
    return "a model"
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    """A model and a data set in a file outside the package, in the current directory."""
    (tmp_path / "user_problem.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "user_problem.py"


def test_compare_by_import_string_runs_the_decision_arms_paired_and_analysed(user_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--model", "user_problem:make_model", "--dataset", f"{user_file}:make_data"]
    argv += [
        "--seeds",
        "3",
        "4",
        "5",
        "--tuning-seeds",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--lr",
        "0.01",
    ]
    assert main([*argv, "--budgets", "0.5", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    decision = json.loads((out / "decision.json").read_text())
    arms = decision["arms"]
    assert list(arms) == ["standard", "mltp_fo", "sam@mltp_fo", "standard@mltp_fo"]
    assert decision["setup"]["recipe"]["alpha_policy"] == "nonnegative"  # alpha_min=0 by default
    # the budget: standard training at 1 and 2 epochs (0.5 and 1 times the 2 given) on the validation split
    rows = decision["tuning"]["budget"]["rows"]
    assert [row["value"] for row in rows] == [0.5, 1.0]
    best = max(rows, key=lambda row: (row["val_acc"], -row["value"]))
    epochs = Recipe("adam", 1e-2, 2, ()).scaled(best["value"]).epochs
    assert arms["standard"]["epochs"] == epochs and arms["standard"]["steps"] == epochs * 4  # 200 / 50
    # an arm at another's cost trains the ratio of the two measured step costs times the budget's epochs
    costs = json.loads((out / "cost.json").read_text())
    for name, procedure in (("sam@mltp_fo", "sam"), ("standard@mltp_fo", "standard")):
        scale = round(costs["mltp_fo"]["ratio"] / costs[procedure]["ratio"], 2)
        assert arms[name]["epochs"] == max(1, math.floor(epochs * scale + 0.5))
    # paired: on one seed, standard training and standard training given more epochs start alike, so
    # (constant learning rate) their first epochs are the same to the last bit
    first = [_epoch_one(Path(arm["run_dirs"][0])) for arm in (arms["standard"], arms["standard@mltp_fo"])]
    assert first[0] == first[1]
    _check_statistics(decision)
    assert decision["verdict"] == verdict([Arm.parse(name) for name in arms], decision["comparisons"])
    assert decision["verdict"][0].startswith("mltp_fo: ")
    for line in decision["verdict"]:
        assert f"**Verdict.** {line}" in printed
    assert "| mltp_fo − sam@mltp_fo |" in printed and (out / "decision.png").stat().st_size > 0


def _epoch_one(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {key: value for key, value in record.items() if not key.endswith("time_s")}


def _check_statistics(decision: dict) -> None:
    """Every comparison against scipy: the mean paired difference, its 95% t interval, the paired t-test,
    and Holm's adjustment over the family computed here by its definition."""
    entries = decision["comparisons"]
    assert [(e["treatment"], e["baseline"]) for e in entries] == [
        ("mltp_fo", "standard"),
        ("mltp_fo", "sam@mltp_fo"),
        ("mltp_fo", "standard@mltp_fo"),
    ]
    p_values = []
    for entry in entries:
        treatment = decision["arms"][entry["treatment"]]["test_acc"]
        baseline = decision["arms"][entry["baseline"]]["test_acc"]
        differences = [t - b for t, b in zip(treatment, baseline)]
        result = stats.ttest_rel(treatment, baseline)
        interval = result.confidence_interval(0.95)
        assert entry["difference"]["mean"] == pytest.approx(sum(differences) / len(differences), abs=1e-12)
        if len(set(differences)) > 1:
            assert entry["difference"]["low"] == pytest.approx(interval.low, abs=1e-9)
            assert entry["difference"]["high"] == pytest.approx(interval.high, abs=1e-9)
            assert entry["difference"]["p_t"] == pytest.approx(result.pvalue, rel=1e-9)
        p_values.append(1.0 if entry["difference"]["p_t"] is None else entry["difference"]["p_t"])
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    assert [entry["p_holm"] for entry in entries] == pytest.approx(adjusted)


def test_the_python_api_gives_the_table_of_the_command_line(user_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--model", f"{user_file}:make_model", "--dataset", f"{user_file}:make_data"]
    argv += ["--arms", "standard", "mltp_fo", "sam", "--seeds", "0", "1", "--budgets", "1"]
    assert main([*argv, "--epochs", "2", "--lr", "0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    from user_problem import make_data, make_model

    decision = compare(
        make_model,
        make_data,
        recipe=Recipe("adam", 1e-2, 2, (), alpha_policy="nonnegative"),
        plan=Plan(arms=tuple(map(Arm.parse, ["standard", "mltp_fo", "sam"])), seeds=(0, 1), budgets=(1.0,)),
        out=out,
        names={"model": f"{user_file}:make_model", "data": f"{user_file}:make_data"},
    )
    assert decision.table() in printed
    assert json.loads(json.dumps(decision.to_dict())) == json.loads((out / "decision.json").read_text())


def test_the_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    (command,) = set(re.findall(r"^torch-mltp compare --model examples/my_model\.py:.*$", readme, re.M))
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "my_model.py", tmp_path / "examples" / "my_model.py")
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:]) == 0
    folder = tmp_path / "runs/compare/examples-my_model.py-make_data-examples-my_model.py-make_model"
    decision = json.loads((folder / "decision.json").read_text())
    assert list(decision["arms"]) == ["standard", "mltp_fo", "sam@mltp_fo", "standard@mltp_fo"]
    assert len(decision["setup"]["seeds"]) == 5 and decision["verdict"]
    # the four-class teacher's labels are learnable: every arm is far above chance (25%)
    assert all(min(arm["test_acc"]) > 50.0 for arm in decision["arms"].values())
    assert "**Verdict.** mltp_fo: " in capsys.readouterr().out


def test_the_verdict_follows_the_holm_adjusted_p_values():
    arms = tuple(map(Arm.parse, ["standard", "mltp_fo", "sam@mltp_fo", "standard@mltp_fo"]))
    base = [60.0, 61.0, 59.5, 60.5, 60.2, 61.1]
    results = {
        "standard": {"test_acc": base},
        "mltp_fo": {"test_acc": [b + 0.1 * k for k, b in enumerate(base)]},  # a small, noisy gain
        "sam@mltp_fo": {"test_acc": [b + 3.0 + 0.05 * k for k, b in enumerate(base)]},  # SAM far ahead
        "standard@mltp_fo": {"test_acc": [b + (-0.3, 0.4)[k % 2] for k, b in enumerate(base)]},
    }
    entries = analyse(arms, results)
    outcomes = {(e["treatment"], e["baseline"]): e["outcome"] for e in entries}
    assert outcomes[("mltp_fo", "sam@mltp_fo")] == "sam@mltp_fo ahead"
    assert outcomes[("mltp_fo", "standard@mltp_fo")] == "not shown"
    (line,) = verdict(arms, entries)
    assert line.startswith("mltp_fo: gain over standard training not shown (same steps: +")
    assert "; SAM ahead (equal cost: -" in line


@pytest.mark.parametrize(
    ("same_steps", "equal_cost", "expected"),
    [
        (2.0, 2.0, "mltp_fo: ahead of standard training (same steps: +2.00"),
        # ahead of the longer standard run only (more steps overfit): no gain shown
        (0.0, 2.0, "mltp_fo: gain over standard training not shown (same steps: +0.00"),
        (0.0, -2.0, "mltp_fo: standard training ahead (same steps: +0.00"),
    ],
)
def test_a_gain_over_standard_training_needs_both_standard_arms(same_steps, equal_cost, expected):
    arms = tuple(map(Arm.parse, ["standard", "mltp_fo", "standard@mltp_fo"]))
    noise = [0.1, -0.1, 0.2, -0.2, 0.05, -0.05]
    mltp = [70.0 + k for k in range(6)]
    results = {
        "mltp_fo": {"test_acc": mltp},
        "standard": {"test_acc": [m - same_steps + e for m, e in zip(mltp, noise)]},
        "standard@mltp_fo": {"test_acc": [m - equal_cost - e for m, e in zip(mltp, noise)]},
    }
    (line,) = verdict(arms, analyse(arms, results))
    assert line.startswith(expected), line


USER = ["--dataset", "user_problem:make_data", "--model", "user_problem:make_model"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*USER, "--model", "user_problem:nothing_here"], "user_problem has no attribute 'nothing_here'"),
        ([*USER, "--model", "no_such_module:make_model"], "cannot import no_such_module"),
        ([*USER, "--model", "missing.py:make_model"], "the file missing.py does not exist"),
        ([*USER, "--model", "user_problem:not_a_model"], "must return a torch.nn.Module, got str"),
        ([*USER, "--loss", "user_problem:no_loss"], "user_problem has no attribute 'no_loss'"),
    ],
)
def test_a_wrong_function_ends_the_command_with_one_line_and_status_2(user_file, argv, message, capsys):
    assert main(["compare", "--epochs", "1", "--seeds", "0", "--budgets", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "mnist1d_mlpp"], "mnist1d_gap_cnn, or module:function or path/to/file.py:function, got"),
        (["--dataset", "user_problem:make_data"], "with your own data set (--dataset module:function), give"),
        (["--arms", "standard", "mltp_foo"], "arm 'mltp_foo': expected PROCEDURE or PROCEDURE@PROCEDURE"),
        (["--loss", "cross_entropy"], "expected module:function or path/to/file.py:function"),
    ],
)
def test_a_wrong_name_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_step_costs_are_kept_for_a_rerun_and_measured_again_with_overwrite(user_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--model", "user_problem:make_model", "--dataset", "user_problem:make_data"]
    argv += ["--arms", "standard", "standard@mltp_fo", "--seeds", "0", "--budgets", "1", "--epochs", "2"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    path = out / "cost.json"
    costs = json.loads(path.read_text())
    costs["mltp_fo"]["ratio"] = costs["standard"]["ratio"] * 5.0  # as if mltp_fo's step cost 5 standard ones
    path.write_text(json.dumps(costs))
    assert main(argv) == 0  # the rerun reads the file: standard@mltp_fo now trains 5 x 2 epochs
    arms = json.loads((out / "decision.json").read_text())["arms"]
    assert arms["standard@mltp_fo"]["epochs"] == 10 and arms["standard"]["epochs"] == 2
    assert main([*argv, "--overwrite"]) == 0
    remeasured = json.loads(path.read_text())
    assert remeasured["mltp_fo"]["ratio"] != costs["mltp_fo"]["ratio"]
    arms = json.loads((out / "decision.json").read_text())["arms"]
    assert arms["standard@mltp_fo"]["epochs"] == max(1, math.floor(2 * remeasured["mltp_fo"]["ratio"] + 0.5))
