"""What the confirmatory study reads back from its summaries: the chosen budgets and radii, and each
family's hypotheses with Holm-Bonferroni adjusted p-values, verdicts and secondary comparisons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from ..comparison import CONFIDENCE
from ..loaders import run_steps
from ..recipes import TRAIN_SET_SIZES, Recipe
from ..stats import holm, non_inferiority_p, paired_difference
from .design import (
    ARMS,
    CELLS,
    HYPOTHESES,
    LEVEL,
    MARGIN,
    MODELS,
    RHO_GRID,
    SAMPLES,
    SECONDARY,
    Hypothesis,
    budgets,
    regime,
    short,
)


def summary(results_root: Path, name: str) -> Optional[dict]:
    """The summary of the comparison ``name``; ``None`` while it is missing."""
    path = results_root / "comparisons" / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def steps_per_run(result: dict) -> int:
    """The training steps of one run of a comparison's recipe (``limit_train_batches`` included)."""
    experiment = result["experiment"]
    stored = {**Recipe.field_defaults(), **experiment["recipe"]}
    recipe = Recipe(**{**stored, "milestones": tuple(stored["milestones"])})
    limit = experiment.get("limit_train_batches")
    return run_steps(recipe, TRAIN_SET_SIZES[result["dataset"]], limit)


def pick(rows: List[dict], key: str) -> dict:
    """The row with the highest mean validation accuracy; an exact tie goes to the smaller ``key``."""
    return max(rows, key=lambda row: (row["val_acc"]["mean"], -row[key]))


def budget_rows(results_root: Path, model: str, samples: int) -> Optional[List[dict]]:
    """One row per budget of a model and regime, from the summaries; ``None`` while one is missing."""
    rows = []
    for budget in budgets(samples):
        result = summary(results_root, f"budget-{short(model)}-{regime(samples)}-{budget.name}")
        if result is None:
            return None
        entry = result["summary"]["standard"]
        steps = steps_per_run(result)
        row = {"budget": budget.name, "label": budget.label, "settings": budget.settings, "steps": steps}
        rows.append({**row, **{key: entry[key] for key in ("val_acc", "test_acc", "train_time_s")}})
    return rows


def choose_budgets(results_root: Path) -> Optional[dict]:
    """Each model's and regime's budget rows and the chosen one (:func:`pick` by steps); ``None`` while a
    summary is missing."""
    chosen: dict = {model: {} for model in MODELS}
    for model, samples in CELLS:
        rows = budget_rows(results_root, model, samples)
        if rows is None:
            return None
        chosen[model][regime(samples)] = {"rows": rows, "budget": pick(rows, "steps")}
    return chosen


def choose_rhos(results_root: Path, choices: dict) -> Optional[dict]:
    """Each model's and regime's radius (:func:`pick` by radius); ``None`` while a summary is missing."""
    for model, samples in CELLS:
        rows = []
        for rho in RHO_GRID:
            result = summary(results_root, f"rho-{short(model)}-{regime(samples)}-{rho:g}")
            if result is None:
                return None
            rows.append({"value": rho, "val_acc": result["summary"]["sam"]["val_acc"], "rho": rho})
        choices[model][regime(samples)]["rho"] = {"rows": rows, **pick(rows, "rho")}
    return choices


def arm_values(results_root: Path, model: str, samples: int) -> Optional[Dict[str, dict]]:
    """Per arm: the seeds, their final test accuracies, training seconds and steps; ``None`` while a
    summary is missing."""
    arms = {}
    for arm in ARMS:
        result = summary(results_root, f"{short(model)}-{regime(samples)}-{arm.group}")
        if result is None:
            return None
        entry = result["summary"][arm.procedure]
        arms[arm.name] = {
            "seeds": result["seeds"],
            "test_acc": entry["test_acc"]["per_seed"],
            "train_time_s": entry["train_time_s"]["per_seed"],
            "steps": steps_per_run(result),
        }
    return arms


def arm_difference(arms: Dict[str, dict], hypothesis: Hypothesis) -> dict:
    """The paired difference of a hypothesis's two arms and its p-value (its test's)."""
    treatment, baseline = arms[hypothesis.treatment], arms[hypothesis.baseline]
    if treatment["seeds"] != baseline["seeds"]:
        raise ValueError(f"{hypothesis.name}: the arms were run with other seeds")
    difference = paired_difference(baseline["test_acc"], treatment["test_acc"], CONFIDENCE).to_dict()
    p = difference["p_t"]
    if hypothesis.test == "non-inferiority":
        p = non_inferiority_p(baseline["test_acc"], treatment["test_acc"], MARGIN)
    entry = {
        "name": hypothesis.name,
        "claim": hypothesis.claim,
        "test": hypothesis.test,
        "p": p,
        **difference,
    }
    if not hypothesis.directional:
        entry["ahead"] = hypothesis.treatment if difference["mean"] > 0 else hypothesis.baseline
    return entry


def verdict(entry: dict) -> str:
    """The pre-registered verdict: supported when the Holm-adjusted p is below :data:`LEVEL`; a directional
    claim whose difference has the other sign is *reversed*; a claim that the arms differ names the arm
    ahead."""
    if entry["p_holm"] >= LEVEL:
        return "not shown"
    if "ahead" in entry:
        return f"supported: {entry['ahead']} ahead"
    if entry["test"] == "non-inferiority" or entry["mean"] > 0:
        return "supported"
    return "reversed"


def analyse_family(results_root: Path, model: str) -> Optional[dict]:
    """One family's hypotheses (Holm-Bonferroni over its regimes and hypotheses) and secondary comparisons,
    per regime; ``None`` while one of its summaries is missing."""
    regimes = {}
    for samples in SAMPLES:
        arms = arm_values(results_root, model, samples)
        if arms is None:
            return None
        regimes[regime(samples)] = {
            "arms": arms,
            "hypotheses": [arm_difference(arms, h) for h in HYPOTHESES],
            "secondary": [arm_difference(arms, h) for h in SECONDARY],
        }
    family = [entry for result in regimes.values() for entry in result["hypotheses"]]
    for entry, adjusted in zip(family, holm([entry["p"] for entry in family])):
        entry["p_holm"] = adjusted
        entry["verdict"] = verdict(entry)
    return regimes


def analyse(results_root: Path) -> dict:
    """The analysis of every family whose runs are all done (a family's correction needs only its own
    runs); ``pending`` names the others."""
    families, pending = {}, []
    for model in MODELS:
        regimes = analyse_family(results_root, model)
        if regimes is None:
            pending.append(model)
        else:
            families[model] = regimes
    return {
        "families": families,
        "pending": pending,
        "margin": MARGIN,
        "level": LEVEL,
        "confidence": CONFIDENCE,
    }
