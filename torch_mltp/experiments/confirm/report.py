"""The confirmatory study's tables: the budget curves, the radii of SAM, and each family's analysis."""

from __future__ import annotations

from typing import List

from ..tables import arms_table, interval_text, markdown, mean_sd_text, p_text
from .design import LEVEL, MARGIN

FAMILY_NOTE = (
    "Δ: mean paired difference (same seed) of final test accuracy, treatment minus baseline, with a "
    "95% Student-t interval. H1, H2, H4 and the secondary comparisons: two-sided paired t-test; H3: "
    f"one-sided paired t-test of non-inferiority with a margin of {MARGIN:g} points. Holm-Bonferroni "
    f"over the family's 8 hypotheses; a hypothesis is supported when its adjusted p-value is below "
    f"{LEVEL:g} (and, for H1 and H2, in the direction of the difference; for H4 the verdict names the "
    "arm ahead)."
)


def _claim_cells(entry: dict) -> List[str]:
    return [entry["name"], entry["claim"], interval_text(entry)]


def regime_tables(result: dict) -> List[str]:
    """One regime of a family: its arms, hypotheses and secondary comparisons."""
    arms = [
        (name, arm["steps"], arm["test_acc"], arm["train_time_s"]) for name, arm in result["arms"].items()
    ]
    hypotheses = [
        [*_claim_cells(e), e["test"], p_text(e["p"]), p_text(e["p_holm"]), e["verdict"]]
        for e in result["hypotheses"]
    ]
    secondary = [[*_claim_cells(e), p_text(e["p"])] for e in result["secondary"]]
    return [
        arms_table(arms),
        markdown(["", "claim", "Δ top-1 [95% CI]", "test", "p", "p (Holm)", "verdict"], hypotheses),
        markdown(["", "secondary (not corrected)", "Δ top-1 [95% CI]", "p (t)"], secondary),
    ]


def family_table(model: str, regimes: dict) -> str:
    """The markdown of one family: its arms, hypotheses and secondary comparisons per regime."""
    parts = [f"# `{model}`"]
    for key, result in regimes.items():
        seeds = next(iter(result["arms"].values()))["seeds"]
        parts += [f"## {key}: {len(seeds)} seeds", *regime_tables(result)]
    return "\n\n".join([*parts, FAMILY_NOTE]) + "\n"


def _with_choice(cells: List[str], chosen: bool) -> List[str]:
    """The cells of a candidate and the last column's mark of the chosen one."""
    return [*cells, "yes" if chosen else ""]


def _budget_cells(model: str, key: str, row: dict) -> List[str]:
    accuracies = [mean_sd_text(row[metric]["per_seed"]) for metric in ("val_acc", "test_acc")]
    return [model, key, row["label"], str(row["steps"]), *accuracies, f"{row['train_time_s']['mean']:.1f}"]


def budget_table(choices: dict) -> str:
    """Every candidate budget of each model and regime: its steps, accuracies and time; the chosen one."""
    rows = [
        _with_choice(_budget_cells(model, key, row), row["budget"] == entry["budget"]["budget"])
        for model, regimes in choices.items()
        for key, entry in regimes.items()
        for row in entry["rows"]
    ]
    header = ["model", "regime", "budget", "steps", "val top-1 (%)", "test top-1 (%)", "train s/run"]
    return markdown([*header, "chosen"], rows) + "\n"


def rho_table(choices: dict) -> str:
    """Every radius of SAM for each model and regime: its validation accuracy; the chosen one."""
    rows = [
        _with_choice(
            [model, key, f"{row['value']:g}", mean_sd_text(row["val_acc"]["per_seed"])],
            row["value"] == entry["rho"]["value"],
        )
        for model, regimes in choices.items()
        for key, entry in regimes.items()
        for row in entry["rho"]["rows"]
    ]
    return markdown(["model", "regime", "ρ", "val top-1 (%)", "chosen"], rows) + "\n"
