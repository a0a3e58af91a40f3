"""The confirmatory study's driver: its budgets and choice rules, the statistics of its families, and a
one-seed smoke run of every phase with tiny budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from torch_mltp.experiments.confirm import analysis, design, driver
from torch_mltp.experiments.recipes import Recipe
from torch_mltp.experiments.stats import holm, non_inferiority_p

REPO = Path(__file__).resolve().parents[1]


def test_the_budget_candidates_of_each_regime():
    assert [(b.name, b.settings) for b in design.budgets(4000)] == [
        ("0.5x", ["--epochs", "50", "--milestones", "35"]),
        ("1x", ["--epochs", "100", "--milestones", "70"]),
        ("2x", ["--epochs", "200", "--milestones", "140"]),
        ("4x", ["--epochs", "400", "--milestones", "280"]),
        ("authors", ["--batch-size", "100", "--epochs", "150", "--milestones"]),  # 6,000 steps, constant lr
    ]
    low = design.budgets(1000)
    assert all(b.settings[:2] == ["--train-samples", "1000"] for b in low)
    assert [b.settings[2:] for b in low][1] == ["--epochs", "150", "--milestones", "100"]
    assert low[-1].overrides == {"train_samples": 1000, "batch_size": 100, "epochs": 600, "milestones": ()}
    names = [c.name for c in design.budget_comparisons(design.TUNING_SEEDS)]
    assert (
        len(names) == 2 * 2 * 5
        and names[0] == "budget-cnn-n4000-0.5x"
        and names[-1] == "budget-gap_cnn-n1000-authors"
    )
    first = design.budget_comparisons(design.TUNING_SEEDS)[0]
    assert first.seeds == tuple(range(10))
    assert first.settings["val_fraction"] == 0.1 and first.settings["cosine_every"] == 0


def row(name, steps, val):
    return {"budget": name, "steps": steps, "rho": steps, "val_acc": {"mean": val}}


def test_the_choice_rules():
    rows = [row("1x", 3200, 91.0), row("2x", 6400, 91.5), row("4x", 12800, 91.4)]
    assert analysis.pick(rows, "steps")["budget"] == "2x"  # the highest mean validation accuracy
    rows[0]["val_acc"]["mean"] = 91.5
    assert analysis.pick(rows, "steps")["budget"] == "1x"  # a tie goes to fewer steps (or a smaller rho)


def test_steps_per_run_counts_the_validation_split_and_the_dropped_batch():
    def result(samples, batch, epochs, fraction=None, limit=None):
        recipe = Recipe(
            "adam", 1e-3, epochs, (50,), batch_size=batch, train_samples=samples, val_fraction=fraction
        )
        stored = json.loads(json.dumps(recipe.to_dict()))  # as results.json holds it
        return {"dataset": "mnist1d", "experiment": {"recipe": stored, "limit_train_batches": limit}}

    assert analysis.steps_per_run(result(None, 128, 100)) == 3200  # 4,000 samples: 32 batches
    assert analysis.steps_per_run(result(None, 128, 100, 0.1)) == 2900  # 3,600: 29 batches
    assert analysis.steps_per_run(result(1000, 100, 600)) == 6000
    assert analysis.steps_per_run(result(1000, 111, 1)) == 9  # 1000 = 9 * 111 + 1: the last one is dropped
    assert analysis.steps_per_run(result(None, 128, 3, limit=2)) == 6


def test_holm_adjusts_a_family_in_its_order():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, None]) == [0.4, 1.0]  # no test: p = 1
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        holm([1.5])


def test_non_inferiority_is_a_one_sided_test_against_the_margin():
    baseline = [90.0, 91.0, 92.0, 90.5, 91.5]
    same = [b + d for b, d in zip(baseline, (0.1, -0.1, 0.0, 0.2, -0.2))]
    assert non_inferiority_p(baseline, same, 0.5) < 0.01  # equal: clearly not worse by 0.5
    worse = [b - 1.0 + d for b, d in zip(baseline, (0.1, -0.1, 0.0, 0.2, -0.2))]
    assert non_inferiority_p(baseline, worse, 0.5) > 0.99
    # t = (mean + margin) / (sd / sqrt(n)) with n - 1 degrees of freedom, by hand
    differences = [0.1, -0.1, 0.0, 0.2, -0.2]
    t = 0.5 / (math.sqrt(sum(d**2 for d in differences) / 4) / math.sqrt(5))
    from scipy import stats

    assert non_inferiority_p(baseline, same, 0.5) == pytest.approx(stats.t.sf(t, 4))
    assert non_inferiority_p([1.0], [2.0], 0.5) is None


def test_the_verdicts_follow_the_plan():
    """H1 and H2 claim which arm is ahead; H4 claims only that the two signs of alpha differ."""
    seeds = list(range(6))
    noise = [0.1, -0.1, 0.0, 0.2, -0.2, 0.05]
    low, high = [90.0 + d for d in noise], [91.0 + d for d in reversed(noise)]
    arms = {
        "mltp_fo": {"seeds": seeds, "test_acc": low},
        "standard at mltp_fo's cost": {"seeds": seeds, "test_acc": high},
        "mltp_fo α ≤ 0": {"seeds": seeds, "test_acc": low},
        "mltp_fo α ≥ 0": {"seeds": seeds, "test_acc": high},
    }
    h1, h4 = (analysis.arm_difference(arms, h) for h in (design.HYPOTHESES[0], design.HYPOTHESES[3]))
    assert h1["mean"] == pytest.approx(-1.0) and h4["mean"] == pytest.approx(-1.0) and h1["p"] < 0.001
    for entry in (h1, h4):
        entry["p_holm"] = 0.01
    assert analysis.verdict(h1) == "reversed"
    assert analysis.verdict(h4) == "supported: mltp_fo α ≥ 0 ahead"
    h4["p_holm"] = 0.2
    assert analysis.verdict(h4) == "not shown"
    arms["mltp_fo α ≤ 0"]["test_acc"], arms["mltp_fo α ≥ 0"]["test_acc"] = high, low
    h4 = analysis.arm_difference(arms, design.HYPOTHESES[3])
    h4["p_holm"] = 0.01
    assert analysis.verdict(h4) == "supported: mltp_fo α ≤ 0 ahead"


def test_the_shards_split_a_phase():
    comparisons = design.budget_comparisons((0,))
    first, second = driver.shard(comparisons, (1, 2)), driver.shard(comparisons, (2, 2))
    assert sorted(c.name for c in first + second) == sorted(c.name for c in comparisons)
    assert not {c.name for c in first} & {c.name for c in second}


def test_one_seed_smoke_of_every_phase(data_root, tmp_path, capsys, quick_figures):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--runs-root", str(runs), "--results-root", str(results), "--data-root", str(data_root)]
    argv += ["--tuning-seeds", "0", "--confirm-seeds", "100", "--cost-steps", "1", "--cost-rounds", "1"]
    argv += ["--epochs", "1", "--limit-train-batches", "1", "--limit-test-batches", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=r"choices\.json is missing: run the budget phase first"):
        driver.main(["rho", *argv])
    assert driver.main(["all", *argv]) == 0
    names = {p.name for p in results.iterdir()}
    assert {"choices.json", "cost.json", "budget.md", "budget.png", "rho.md", "results.json"} <= names
    assert {"cnn.md", "gap_cnn.md", "cost.png", "comparisons"} <= names
    choices = json.loads((results / "choices.json").read_text())
    cost = json.loads((results / "cost.json").read_text())
    for model in design.MODELS:
        for key in ("n4000", "n1000"):
            entry = choices[model][key]
            assert entry["budget"]["budget"] in {"0.5x", "1x", "2x", "4x", "authors"}
            assert entry["rho"]["value"] in design.RHO_GRID
            assert cost[model][key]["ratio"]["standard"] == 1.0
            assert set(cost[model][key]["seconds_per_step"]) == set(design.COST_PROCEDURES)
    assert cost["about"]["steps"] == 1 and "torch" in cost["about"]["versions"]
    # the tuning runs held 10% out; the confirmatory runs train on everything, with the fresh seed
    tuning = json.loads((results / "comparisons" / "budget-cnn-n1000-1x" / "results.json").read_text())
    assert tuning["experiment"]["recipe"]["val_fraction"] == 0.1 and tuning["seeds"] == [0]
    confirmatory = json.loads((results / "comparisons" / "cnn-n1000-main" / "results.json").read_text())
    assert confirmatory["experiment"]["recipe"]["val_fraction"] is None and confirmatory["seeds"] == [100]
    assert confirmatory["experiment"]["recipe"]["train_samples"] == 1000
    sam = json.loads((results / "comparisons" / "cnn-n4000-sam-cost-mltp_fo" / "results.json").read_text())
    assert sam["experiment"]["recipe"]["sam_rho"] == choices["mnist1d_cnn"]["n4000"]["rho"]["value"]
    # no comparison trains another's runs (shards run comparisons side by side)
    assert {p.name for p in (runs / "gap_cnn-n4000-alpha-nonpositive").iterdir() if p.is_dir()} == {
        "mltp_fo-seed100"
    }
    analysis = json.loads((results / "results.json").read_text())
    family = analysis["families"]["mnist1d_gap_cnn"]
    assert [h["name"] for h in family["n4000"]["hypotheses"]] == ["H1", "H2", "H3", "H4"]
    assert all(h["p_holm"] == 1.0 and h["verdict"] == "not shown" for h in family["n1000"]["hypotheses"])
    assert set(family["n4000"]["arms"]) == {arm.name for arm in design.ARMS}
    table = (results / "cnn.md").read_text()
    assert "| H3 | mltp_fo ≥ SAM − 0.5 at equal cost |" in table and "| C1 |" in table
    printed = capsys.readouterr().out
    assert "phase run: summary in" in printed
    # the report phase writes the analysis again from the summaries, without training
    (results / "cnn.md").unlink()
    assert driver.main(["report", *argv]) == 0 and (results / "cnn.md").exists()
    assert not (runs / "report").exists()
    # a family is analysed as soon as its own runs are done
    for path in (results / "cnn.md", results / "gap_cnn.md", results / "results.json"):
        path.unlink()
    (results / "comparisons" / "gap_cnn-n1000-sam-cost-mltp_fo" / "results.json").unlink()
    capsys.readouterr()
    assert driver.main(["report", *argv]) == 0
    assert (results / "cnn.md").exists() and not (results / "gap_cnn.md").exists()
    analysis = json.loads((results / "results.json").read_text())
    assert set(analysis["families"]) == {"mnist1d_cnn"} and analysis["pending"] == ["mnist1d_gap_cnn"]
    printed = capsys.readouterr().out
    assert "runs missing for mnist1d_gap_cnn" in printed and "not every comparison is done" in printed


def test_list_prints_a_phases_commands(capsys):
    assert driver.main(["list", "--phase-list", "budget"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and lines[0].startswith(
        "torch-mltp compare --dataset mnist1d --model mnist1d_cnn"
    )
    assert "--train-samples 1000 --batch-size 100 --epochs 600 --milestones --val-fraction 0.1" in lines[-1]


def test_only_selects_comparisons_by_name(capsys):
    assert (
        driver.main(
            ["list", "--phase-list", "budget", "--only", "budget-gap_cnn-n1000-2x", "budget-cnn-n4000-1x"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--out ")[1] for line in lines] == [
        "runs/confirm/budget-cnn-n4000-1x",
        "runs/confirm/budget-gap_cnn-n1000-2x",
    ]
    for argv in (["budget", "--only", "budget-cnn-n4000-3x"], ["report", "--only", "budget-cnn-n4000-1x"]):
        with pytest.raises(SystemExit) as exit_info:
            driver.main(argv)
        assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown comparison(s) budget-cnn-n4000-3x; choose from budget-cnn-n4000-0.5x," in error
    assert "--only names the comparisons of one training phase, not of report" in error


def test_the_results_page_holds_the_plan_the_driver_runs():
    page = (REPO / "docs" / "results.md").read_text()
    plan = page[page.index("## Confirmatory study (pre-registered)") : page.index("## Epochs")]
    for phase in driver.PHASES:
        assert f"\npython -m torch_mltp.experiments.confirm {phase}\n" in plan
    assert tuple(range(100, 130)) == design.CONFIRM_SEEDS and "**Seeds.** 100-129: 30 seeds" in plan
    assert tuple(range(10)) == design.TUNING_SEEDS and "tuning seeds 0-9" in plan
    assert "ρ from {" + ", ".join(f"{rho:g}" for rho in design.RHO_GRID) + "}" in plan
    assert f"margin of {design.MARGIN:g} points" in plan and f"level of {design.LEVEL:g}" in plan
    assert f"--val-fraction {design.VAL_FRACTION:g}" in plan
    assert design.BUDGET_SCALES == (0.5, 1.0, 2.0, 4.0) and "0.5, 1, 2 and 4 times" in plan
    assert (
        f"batch {design.AUTHORS_BATCH}, constant learning rate 1e-2, {design.AUTHORS_STEPS:,} steps" in plan
    )
    assert all(f"* **{h.name}:**" in plan for h in design.HYPOTHESES)
    assert all(f"| {arm.name} |" in plan for arm in design.ARMS)
    assert [model for model in design.MODELS if f"`{model}`" in plan] == list(design.MODELS)
