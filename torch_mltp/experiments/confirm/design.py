"""The pre-registered design of the confirmatory study: its models, regimes, budgets, seeds, the
comparisons each training phase runs, and the hypotheses of each family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

from ..recipes import TRAIN_SET_SIZES, recipe_for
from ..study import Comparison, option_words

MODELS = ("mnist1d_cnn", "mnist1d_gap_cnn")
"""The two pre-registered families: the MNIST-1D authors' CNN (flattened feature map) and the CNN with
global average pooling."""
SAMPLES = (4000, 1000)
"""The two data regimes: all 4,000 training samples, and the fixed subset of 1,000."""
PRESET = {4000: (100, (70,)), 1000: (150, (100,))}
"""The current recipe's epochs and milestones per regime (docs/results.md, "Epochs")."""
BUDGET_SCALES = (0.5, 1.0, 2.0, 4.0)
AUTHORS_STEPS = 6000
"""The MNIST-1D authors' recipe: Adam at a constant learning rate of 1e-2, batches of 100, about 6,000
steps (their ``notebooks/train.py``); in epochs of the full regime: 150 of 4,000 samples, 600 of 1,000."""
AUTHORS_BATCH = 100
TUNING_SEEDS = tuple(range(10))
CONFIRM_SEEDS = tuple(range(100, 130))
VAL_FRACTION = 0.1
RHO_GRID = (0.01, 0.02, 0.05, 0.1, 0.2)
COST_PROCEDURES = ("standard", "mltp_fo", "mltp", "sam")
MARGIN = 0.5
"""H3's non-inferiority margin in points of test accuracy."""
LEVEL = 0.05
"""The family-wise error rate of each family (Holm-Bonferroni)."""
COMMON = {"cosine_every": 0}
"""Every run: no gradient-cosine measurement (the study does not use it); the runs use one thread."""


def short(model: str) -> str:
    return model.replace("mnist1d_", "")


def regime(samples: int) -> str:
    return f"n{samples}"


CELLS = tuple((model, samples) for model in MODELS for samples in SAMPLES)
"""Each model in each regime, in the order of the phases' comparisons."""


@dataclass(frozen=True)
class Budget:
    """A candidate schedule of standard training in one regime: recipe overrides."""

    name: str
    overrides: Dict[str, Any]

    @property
    def label(self) -> str:
        return "authors' recipe" if self.name == "authors" else f"{self.name} the recipe"

    @property
    def settings(self) -> List[str]:
        """The overrides as options of ``torch-mltp compare`` (as ``choices.json`` stores them)."""
        return option_words(self.overrides)


def budgets(samples: int) -> List[Budget]:
    """The candidates of one regime: the current recipe's epochs and milestones times each of
    :data:`BUDGET_SCALES` (rounded, halves up), then the MNIST-1D authors' recipe."""
    epochs, milestones = PRESET[samples]
    preset = recipe_for("mnist1d", MODELS[0]).replace(epochs=epochs, milestones=milestones)
    subset = {"train_samples": samples} if samples != TRAIN_SET_SIZES["mnist1d"] else {}
    candidates = [
        Budget(f"{scale:g}x", {**subset, "epochs": scaled.epochs, "milestones": scaled.milestones})
        for scale, scaled in zip(BUDGET_SCALES, map(preset.scaled, BUDGET_SCALES))
    ]
    steps = {"batch_size": AUTHORS_BATCH, "epochs": AUTHORS_STEPS * AUTHORS_BATCH // samples}
    return [*candidates, Budget("authors", {**subset, **steps, "milestones": ()})]


def chosen_budget(choices: dict, model: str, samples: int) -> Budget:
    """The budget that ``choices.json`` holds for a model and regime; ``SystemExit`` if it was written
    with other candidates than these."""
    stored = choices[model][regime(samples)]["budget"]
    budget = next((b for b in budgets(samples) if b.name == stored["budget"]), None)
    if budget is None or budget.settings != stored["settings"]:
        raise SystemExit(
            f"choices.json holds a budget {stored['budget']} {stored['settings']} of other candidates"
        )
    return budget


def budget_comparisons(tuning_seeds: Sequence[int]) -> List[Comparison]:
    """Standard training with each candidate budget, on the validation split."""
    return [
        Comparison(
            f"budget-{short(model)}-{regime(samples)}-{budget.name}",
            model,
            ("standard",),
            {**budget.overrides, "val_fraction": VAL_FRACTION, **COMMON},
            figures=False,
            seeds=tuple(tuning_seeds),
        )
        for model, samples in CELLS
        for budget in budgets(samples)
    ]


def sam_scale(ratios: dict) -> float:
    """SAM's steps scale at equal cost to ``mltp_fo``: the two measured ratios to standard training."""
    return round(ratios["ratio"]["mltp_fo"] / ratios["ratio"]["sam"], 2)


def rho_comparisons(choices: dict, cost: dict, tuning_seeds: Sequence[int]) -> List[Comparison]:
    """SAM with each radius at equal cost to ``mltp_fo`` on the chosen budget, on the validation split."""
    return [
        Comparison(
            f"rho-{short(model)}-{regime(samples)}-{rho:g}",
            model,
            ("sam",),
            {
                **chosen_budget(choices, model, samples).overrides,
                "steps_scale": sam_scale(cost[model][regime(samples)]),
                "sam_rho": rho,
                "val_fraction": VAL_FRACTION,
                **COMMON,
            },
            figures=False,
            seeds=tuple(tuning_seeds),
        )
        for model, samples in CELLS
        for rho in RHO_GRID
    ]


@dataclass(frozen=True)
class Arm:
    """One arm of the confirmatory runs: a procedure in a comparison (a group) of the ``run`` phase."""

    name: str
    group: str
    procedure: str


ARMS = (
    Arm("standard", "main", "standard"),
    Arm("mltp_fo", "main", "mltp_fo"),
    Arm("mltp", "main", "mltp"),
    Arm("mltp_fo α ≥ 0", "alpha-nonnegative", "mltp_fo"),
    Arm("mltp_fo α ≤ 0", "alpha-nonpositive", "mltp_fo"),
    Arm("standard at mltp_fo's cost", "standard-cost-mltp_fo", "standard"),
    Arm("standard at mltp's cost", "standard-cost-mltp", "standard"),
    Arm("sam at mltp_fo's cost", "sam-cost-mltp_fo", "sam"),
)
"""The arms of each model and regime, in the order of the tables."""


def group_settings(choices: dict, cost: dict, model: str, key: str) -> Dict[str, dict]:
    """The settings of each group of the confirmatory runs of a model and regime, besides the budget."""
    ratios = cost[model][key]["ratio"]
    sam = {"steps_scale": sam_scale(cost[model][key]), "sam_rho": choices[model][key]["rho"]["value"]}
    return {
        "main": {},
        "alpha-nonnegative": {"alpha_policy": "nonnegative"},
        "alpha-nonpositive": {"alpha_policy": "nonpositive"},
        "standard-cost-mltp_fo": {"steps_scale": ratios["mltp_fo"]},
        "standard-cost-mltp": {"steps_scale": ratios["mltp"]},
        "sam-cost-mltp_fo": sam,
    }


def confirmatory_comparisons(choices: dict, cost: dict, confirm_seeds: Sequence[int]) -> List[Comparison]:
    """The confirmatory runs: per model and regime the chosen budget on all its training samples, in the
    groups of :data:`ARMS`. No two groups share a run, so that shards never train the same one."""
    return [
        Comparison(
            f"{short(model)}-{regime(samples)}-{group}",
            model,
            tuple(arm.procedure for arm in ARMS if arm.group == group),
            {**chosen_budget(choices, model, samples).overrides, **COMMON, **settings},
            figures=False,
            seeds=tuple(confirm_seeds),
        )
        for model, samples in CELLS
        for group, settings in group_settings(choices, cost, model, regime(samples)).items()
    ]


@dataclass(frozen=True)
class Hypothesis:
    """A pre-registered comparison of two arms in every regime: ``treatment - baseline``."""

    name: str
    treatment: str
    baseline: str
    claim: str
    test: str = "two-sided"
    """``two-sided``: paired t-test; ``non-inferiority``: one-sided paired t-test with :data:`MARGIN`."""
    directional: bool = True
    """Whether the claim names the arm that is ahead (H1, H2); H4 claims only that the arms differ."""


HYPOTHESES = (
    Hypothesis("H1", "mltp_fo", "standard at mltp_fo's cost", "mltp_fo > standard at equal cost"),
    Hypothesis("H2", "mltp", "standard at mltp's cost", "mltp > standard at equal cost"),
    Hypothesis(
        "H3",
        "mltp_fo",
        "sam at mltp_fo's cost",
        f"mltp_fo ≥ SAM − {MARGIN:g} at equal cost",
        "non-inferiority",
    ),
    Hypothesis(
        "H4", "mltp_fo α ≤ 0", "mltp_fo α ≥ 0", "the sign of α matters (α ≤ 0 vs α ≥ 0)", directional=False
    ),
)
SECONDARY = (
    Hypothesis("S1", "mltp_fo", "standard", "mltp_fo vs standard, same steps"),
    Hypothesis("S2", "mltp", "standard", "mltp vs standard, same steps"),
    Hypothesis("C1", "standard at mltp_fo's cost", "standard", "standard: more steps (0 if converged)"),
    Hypothesis("C2", "standard at mltp's cost", "standard", "standard: more steps (0 if converged)"),
    Hypothesis("S3", "mltp_fo α ≥ 0", "standard at mltp_fo's cost", "α ≥ 0 vs standard at equal cost"),
    Hypothesis("S4", "mltp_fo α ≤ 0", "standard at mltp_fo's cost", "α ≤ 0 vs standard at equal cost"),
    Hypothesis("S5", "mltp_fo", "mltp_fo α ≥ 0", "free α vs α ≥ 0"),
    Hypothesis("S6", "mltp_fo", "mltp_fo α ≤ 0", "free α vs α ≤ 0"),
    Hypothesis("S7", "sam at mltp_fo's cost", "standard at mltp_fo's cost", "SAM vs standard at equal cost"),
)
