"""The MNIST-1D study driver: its commands, the docs that list them, and a one-seed, one-epoch smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torch_mltp.experiments import study
from torch_mltp.experiments.comparison import markdown_table

REPO = Path(__file__).resolve().parents[1]


def test_the_results_page_lists_every_command_of_the_driver():
    page = (REPO / "docs" / "results.md").read_text()
    for comparison in study.comparisons():
        assert f"\n{comparison.command(Path('runs/study'))}\n" in page, comparison.name


def test_the_study_grid():
    comparisons = {comparison.name: comparison for comparison in study.comparisons()}
    assert list(comparisons)[:4] == ["mlp-n4000", "cnn-n4000", "mlp-n1000", "cnn-n1000"]
    assert len(comparisons) == 4 + 2 + 3 + 2 + 2 + 2
    low_data = comparisons["cnn-n1000"]
    assert low_data.procedures == ("standard", "mltp", "mltp_conv", "mltp_fc", "mltp_fo")
    assert low_data.seeds == tuple(range(20))
    assert dict(low_data.settings) == {"train_samples": 1000, "epochs": 150, "milestones": (100,)}
    sweeps = [
        comparison
        for name, comparison in comparisons.items()
        if name.startswith("mlp-") and name not in ("mlp-n4000", "mlp-n1000")
    ]
    assert len(sweeps) == 9
    for comparison in sweeps:  # every MLP sweep shares the main MLP comparison's standard runs
        assert comparison.baseline == "mlp-n4000" and comparison.model == "mnist1d_mlp"
        assert len(comparison.settings) == 1
    assert dict(comparisons["mlp-alpha-lr-0.0001"].settings) == {"alpha_lr": 0.0001}
    assert "--alpha-policy fixed" in comparisons["mlp-alpha-policy-fixed"].command(Path("runs/study"))
    for samples in (4000, 1000):  # the CNN with its alphas kept >= 0, against the main CNN comparisons
        comparison = comparisons[f"cnn-n{samples}-alpha-policy-nonnegative"]
        assert comparison.baseline == f"cnn-n{samples}" and comparison.model == "mnist1d_cnn"
        assert comparison.settings["alpha_policy"] == "nonnegative"
        assert ("train_samples" in comparison.settings) == (samples == 1000)


def test_a_comparison_trains_its_recipe_with_its_settings_and_the_given_options():
    comparison = study.Comparison(
        "c", "mnist1d_cnn", ("standard",), {"train_samples": 1000, "epochs": 150, "milestones": (100,),
        "steps_scale": 1.5, "cosine_every": 0},
    )  # fmt: skip
    experiment = study.experiment_of(comparison, study.compare_options([]))
    recipe = experiment.recipe
    assert (recipe.train_samples, recipe.epochs, recipe.milestones) == (1000, 225, (150,))  # 150 x 1.5
    assert study.run_options(comparison, study.compare_options([])).cosine_every == 0
    given = study.compare_options(["--epochs", "2", "--limit-train-batches", "1", "--cosine-every", "3"])
    experiment = study.experiment_of(comparison, given)
    assert (experiment.recipe.epochs, experiment.recipe.milestones) == (3, (150,))  # 2 x 1.5
    assert experiment.limit_train_batches == 1
    options = study.run_options(comparison, given)
    assert (options.cosine_every, options.command, options.log_epochs) == (3, "compare", False)


def test_one_seed_one_epoch_smoke_of_the_whole_study(data_root, tmp_path, capsys, quick_figures):
    runs, results = tmp_path / "runs", tmp_path / "results"
    smoke = ["--seeds", "0", "--epochs", "1", "--limit-train-batches", "1", "--limit-test-batches", "1"]
    argv = ["--runs-root", str(runs), "--results-root", str(results), "--data-root", str(data_root), *smoke]
    assert study.main([*argv, "--no-progress"]) == 0
    for comparison in study.comparisons():
        summary = results / comparison.name
        figures = {"accuracy.png", "alphas.png", "grad_cosine.png"} if comparison.figures else set()
        assert {p.name for p in summary.iterdir()} == {"results.json", "table.md", *figures}, comparison.name
        assert comparison.figures == (comparison.baseline is None)  # the sweeps' figures stay in the runs
        stored = json.loads((summary / "results.json").read_text())
        assert "runs" not in stored and stored["seeds"] == [0]
        assert stored["experiment"]["recipe"]["epochs"] == 1
    assert not list(results.rglob("*.pt"))  # checkpoints stay under the runs root
    # the sweeps trained only their MLTP runs; their standard runs are the main MLP comparison's
    assert {p.name for p in (runs / "mlp-eta-0.5").iterdir() if p.is_dir()} == {"mltp-seed0", "mltp_fo-seed0"}
    assert {p.name for p in (runs / "cnn-n1000-alpha-policy-nonnegative").iterdir() if p.is_dir()} == {
        "mltp-seed0", "mltp_conv-seed0", "mltp_fo-seed0",
    }  # fmt: skip
    assert sum(1 for _ in runs.rglob("standard-seed0")) == 4  # mlp and cnn, 4,000 and 1,000 samples
    low_data = json.loads((results / "cnn-n1000" / "results.json").read_text())["experiment"]["recipe"]
    assert (low_data["train_samples"], low_data["milestones"]) == (1000, [100])
    fixed = json.loads((results / "mlp-alpha-policy-fixed" / "results.json").read_text())
    assert fixed["experiment"]["recipe"]["alpha_policy"] == "fixed"
    table = (results / "sweep-mlp-eta" / "table.md").read_text()
    settings = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| --eta")]
    assert settings == [
        ["| --eta 1 (preset)", "standard"], ["| --eta 1 (preset)", "mltp"], ["| --eta 1 (preset)", "mltp_fo"],
        ["| --eta 0.5", "mltp"], ["| --eta 0.5", "mltp_fo"], ["| --eta 2", "mltp"], ["| --eta 2", "mltp_fo"],
    ]  # fmt: skip
    assert all((results / sweep.name / "table.md").exists() for sweep in study.SWEEPS)
    table = (results / "sweep-cnn-n1000-alpha-policy" / "table.md").read_text()
    settings = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| --alpha-policy")]
    assert settings == [
        ["| --alpha-policy learned (preset)", procedure] for procedure in study.CNN_SWEEP_PROCEDURES
    ] + [["| --alpha-policy nonnegative", procedure] for procedure in study.CNN_SWEEP_PROCEDURES[1:]]
    printed = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("== [15/15] cnn-n1000-alpha-policy-nonnegative: torch-mltp compare --dataset")
        for line in printed
    )
    baseline_lines = [line for line in printed if f"({runs / 'mlp-n4000' / 'standard-seed0'})" in line]
    assert len(baseline_lines) == 1 + 9  # trained once, reused by the 9 sweep comparisons; each printed once
    assert sum(": reused, test acc" in line for line in baseline_lines) == 9


def test_list_prints_the_commands_and_only_selects(capsys):
    assert study.main(["--list", "--only", "cnn-n4000", "mlp-eta-2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        study.comparisons()[1].command(Path("runs/study")),
        next(c for c in study.comparisons() if c.name == "mlp-eta-2").command(Path("runs/study")),
    ]
    with pytest.raises(SystemExit):
        study.main(["--list", "--only", "mlp-eta-3"])
    assert "unknown comparison(s) mlp-eta-3" in capsys.readouterr().err


@pytest.mark.skipif(study.fcntl is None, reason="claims need fcntl")
def test_a_comparison_that_another_process_runs_is_skipped_until_that_process_ends(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(
        study, "run_comparison", lambda comparison, runs_root, args: ran.append(comparison.name)
    )
    monkeypatch.setattr(study, "write_summary", lambda *args: None)
    first, second = (study.Comparison(name, "mnist1d_mlp", ("standard",)) for name in ("first", "second"))
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "first.lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"1"
        assert study.run_comparisons([first, second], tmp_path, tmp_path / "results", []) == []
        assert ran == ["second"]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (
        study.run_comparisons([first], tmp_path, tmp_path / "results", []) == []
    )  # released with its process
    assert ran == ["second", "first"]


@pytest.mark.parametrize("name", ["cnn-n1000", "mlp-alpha-lr-0.0001"])
def test_a_committed_table_regenerates_from_its_results(name):
    folder = REPO / "docs" / "results" / name
    result = json.loads((folder / "results.json").read_text())
    assert markdown_table([result]) == (folder / "table.md").read_text()


def test_the_committed_sweep_tables_regenerate_from_the_summaries():
    for sweep in study.SWEEPS:
        table = study.sweep_table(sweep, REPO / "docs" / "results")
        assert table == (REPO / "docs" / "results" / sweep.name / "table.md").read_text(), sweep.name
