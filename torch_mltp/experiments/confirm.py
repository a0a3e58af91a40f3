"""The confirmatory MNIST-1D study, pre-registered in docs/results.md ("Confirmatory study
(pre-registered)"): does MLTP beat standard training, and SAM, at a converged budget and at equal cost?

``python -m torch_mltp.experiments.confirm PHASE`` runs one phase; each reads what the phases before it
wrote under ``--results-root`` (default ``docs/results/confirm``) and ends with its summary there:

* ``budget``: standard training of both CNNs in both regimes at 0.5, 1, 2 and 4 times the current recipe's
  epochs and with the MNIST-1D authors' recipe, on tuning seeds 0-9, with 10% of the training samples held
  out for validation. Writes the budget curves (``budget.md``, ``budget.png``) and each regime's budget:
  the one with the highest mean validation accuracy (``choices.json``).
* ``cost``: the seconds per training step of ``standard``, ``mltp_fo``, ``mltp`` and ``sam`` at each chosen
  recipe's batch size, measured alone on the machine (``cost.json``). The ratios to standard training give
  the other procedures their equal-cost budgets (``--steps-scale``).
* ``rho``: SAM at equal cost to ``mltp_fo`` with each radius of :data:`RHO_GRID`, on the tuning seeds and
  the validation split; the radius with the highest mean validation accuracy goes to ``choices.json``.
* ``run``: the confirmatory runs on seeds 100-129 (fresh), on all training samples, and their analysis:
  the hypotheses of each family (model) with Holm-Bonferroni adjusted p-values, the secondary comparisons
  (``<model>.md``, ``results.json``) and the cost figure (``cost.png``).
* ``report``: the analysis and the figure again, from the summaries alone (no training).

A family's analysis is written as soon as all of its runs are done: its correction involves only its own
hypotheses. ``results.json`` names the families still ``pending``.

``all`` runs the phases in order. Every run goes to ``--runs-root`` (default ``runs/confirm``): running a
phase again reuses finished runs and resumes interrupted ones. Processes share a phase when they are
started with the same command: each claims a comparison before running it and skips those another one has
claimed. ``--shard K/N`` runs only every N-th comparison of a phase from the K-th (1-based), to split a
phase between machines. The summary of a phase is written by whichever process finds all its comparisons
done (or by running the phase again). ``list`` prints a phase's commands. Options the driver does not
know are appended to every ``torch-mltp compare`` command (``--epochs 1 --limit-train-batches 1``): with
``--tuning-seeds 0 --confirm-seeds 100`` that is the one-seed smoke test the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torch_mltp.data import load_dataset

from .cli import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, messages_to_stdout
from .comparison import CONFIDENCE
from .recipes import TRAIN_SET_SIZES, recipe_for
from .stats import holm, mean_std, non_inferiority_p, paired_difference
from .study import Comparison, named, run_comparisons
from .training import Experiment, TrainTally, build_model_for, build_optimizer, training_step, versions

log = logging.getLogger(__name__)

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
COMMON = ("--cosine-every", "0")
"""Every run: no gradient-cosine measurement (the study does not use it); the commands set one thread."""
PHASES = ("budget", "cost", "rho", "run", "report")


def short(model: str) -> str:
    return model.replace("mnist1d_", "")


def regime(samples: int) -> str:
    return f"n{samples}"


@dataclass(frozen=True)
class Budget:
    """A candidate schedule of standard training in one regime, as command-line settings."""

    name: str
    settings: Tuple[str, ...]

    @property
    def label(self) -> str:
        return "authors' recipe" if self.name == "authors" else f"{self.name} the recipe"


def budgets(samples: int) -> List[Budget]:
    """The candidates of one regime: the current recipe's epochs and milestones times each of
    :data:`BUDGET_SCALES` (rounded, halves up), then the MNIST-1D authors' recipe."""
    epochs, milestones = PRESET[samples]
    subset = ("--train-samples", str(samples)) if samples != TRAIN_SET_SIZES["mnist1d"] else ()
    candidates = []
    for scale in BUDGET_SCALES:
        scaled = recipe_for("mnist1d", MODELS[0]).replace(epochs=epochs, milestones=milestones).scaled(scale)
        settings = ("--epochs", str(scaled.epochs), "--milestones", *map(str, scaled.milestones))
        candidates.append(Budget(f"{scale:g}x", (*subset, *settings)))
    authors_epochs = AUTHORS_STEPS * AUTHORS_BATCH // samples
    authors = ("--batch-size", str(AUTHORS_BATCH), "--epochs", str(authors_epochs), "--milestones")
    candidates.append(Budget("authors", (*subset, *authors)))
    return candidates


# -- what the phases run --------------------------------------------------------------------------------


def budget_comparisons(tuning_seeds: Sequence[int]) -> List[Comparison]:
    validation = ("--val-fraction", str(VAL_FRACTION))
    return [
        Comparison(
            f"budget-{short(model)}-{regime(samples)}-{budget.name}",
            model,
            ("standard",),
            (*budget.settings, *validation, *COMMON),
            figures=False,
            seeds=tuple(tuning_seeds),
        )
        for model in MODELS
        for samples in SAMPLES
        for budget in budgets(samples)
    ]


def _scale_text(value: float) -> str:
    return f"{value:.2f}"


def rho_comparisons(choices: dict, cost: dict, tuning_seeds: Sequence[int]) -> List[Comparison]:
    """SAM with each radius at equal cost to ``mltp_fo`` on the chosen budget, on the validation split."""
    comparisons = []
    for model in MODELS:
        for samples in SAMPLES:
            chosen = choices[model][regime(samples)]["budget"]["settings"]
            scale = sam_scale(cost[model][regime(samples)])
            for rho in RHO_GRID:
                settings = (*chosen, "--steps-scale", _scale_text(scale), "--sam-rho", f"{rho:g}")
                comparisons.append(
                    Comparison(
                        f"rho-{short(model)}-{regime(samples)}-{rho:g}",
                        model,
                        ("sam",),
                        (*settings, "--val-fraction", str(VAL_FRACTION), *COMMON),
                        figures=False,
                        seeds=tuple(tuning_seeds),
                    )
                )
    return comparisons


def sam_scale(ratios: dict) -> float:
    """SAM's steps scale at equal cost to ``mltp_fo``: the two measured ratios to standard training."""
    return round(ratios["ratio"]["mltp_fo"] / ratios["ratio"]["sam"], 2)


@dataclass(frozen=True)
class Arm:
    """One arm of the confirmatory runs: a procedure in a comparison of the ``run`` phase."""

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


def run_comparisons_of(choices: dict, cost: dict, confirm_seeds: Sequence[int]) -> List[Comparison]:
    """The confirmatory runs: per model and regime the chosen budget on all its training samples, in the
    groups of :data:`ARMS`. No two groups share a run, so that shards never train the same one."""
    comparisons = []
    for model in MODELS:
        for samples in SAMPLES:
            key = regime(samples)
            ratios = cost[model][key]["ratio"]
            rho = f"{choices[model][key]['rho']['value']:g}"
            groups = [
                ("main", ("standard", "mltp_fo", "mltp"), ()),
                ("alpha-nonnegative", ("mltp_fo",), ("--alpha-policy", "nonnegative")),
                ("alpha-nonpositive", ("mltp_fo",), ("--alpha-policy", "nonpositive")),
                ("standard-cost-mltp_fo", ("standard",), ("--steps-scale", _scale_text(ratios["mltp_fo"]))),
                ("standard-cost-mltp", ("standard",), ("--steps-scale", _scale_text(ratios["mltp"]))),
                (
                    "sam-cost-mltp_fo",
                    ("sam",),
                    ("--steps-scale", _scale_text(sam_scale(cost[model][key])), "--sam-rho", rho),
                ),
            ]
            name = f"{short(model)}-{key}"
            for group, procedures, settings in groups:
                comparisons.append(
                    Comparison(
                        f"{name}-{group}",
                        model,
                        procedures,
                        (*choices[model][key]["budget"]["settings"], *COMMON, *settings),
                        figures=False,
                        seeds=tuple(confirm_seeds),
                    )
                )
    return comparisons


# -- choices ----------------------------------------------------------------------------------------------


def _summary(results_root: Path, name: str) -> Optional[dict]:
    path = results_root / "comparisons" / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def steps_per_run(result: dict) -> int:
    """The training steps of one run of a comparison's recipe (``limit_train_batches`` included)."""
    experiment = result["experiment"]
    recipe = experiment["recipe"]
    samples = recipe["train_samples"] or TRAIN_SET_SIZES[result["dataset"]]
    if recipe.get("val_fraction") is not None:
        samples -= math.floor(recipe["val_fraction"] * samples + 0.5)
    batch = recipe["batch_size"]
    per_epoch = math.ceil(samples / batch) - (samples % batch == 1)  # a last batch of one is dropped
    if experiment.get("limit_train_batches") is not None:
        per_epoch = min(per_epoch, experiment["limit_train_batches"])
    return recipe["epochs"] * per_epoch


def _pick(rows: List[dict], key: str) -> dict:
    """The row with the highest mean validation accuracy; an exact tie goes to the smaller ``key``."""
    return max(rows, key=lambda row: (row["val_acc"]["mean"], -row[key]))


def budget_rows(results_root: Path, model: str, samples: int) -> Optional[List[dict]]:
    """One row per budget of a model and regime, from the summaries; ``None`` while one is missing."""
    rows = []
    for budget in budgets(samples):
        result = _summary(results_root, f"budget-{short(model)}-{regime(samples)}-{budget.name}")
        if result is None:
            return None
        entry = result["summary"]["standard"]
        rows.append(
            {
                "budget": budget.name,
                "label": budget.label,
                "settings": list(budget.settings),
                "steps": steps_per_run(result),
                "val_acc": entry["val_acc"],
                "test_acc": entry["test_acc"],
                "train_time_s": entry["train_time_s"],
            }
        )
    return rows


def choose_budgets(results_root: Path) -> Optional[dict]:
    """Each model's and regime's budget rows and the chosen one (:func:`_pick` by steps); ``None`` while a
    summary is missing."""
    chosen = {}
    for model in MODELS:
        for samples in SAMPLES:
            rows = budget_rows(results_root, model, samples)
            if rows is None:
                return None
            best = _pick(rows, "steps")
            chosen.setdefault(model, {})[regime(samples)] = {"rows": rows, "budget": best}
    return chosen


def choose_rhos(results_root: Path, choices: dict) -> Optional[dict]:
    """Each model's and regime's radius (:func:`_pick` by radius); ``None`` while a summary is missing."""
    for model in MODELS:
        for samples in SAMPLES:
            rows = []
            for rho in RHO_GRID:
                result = _summary(results_root, f"rho-{short(model)}-{regime(samples)}-{rho:g}")
                if result is None:
                    return None
                rows.append({"value": rho, "val_acc": result["summary"]["sam"]["val_acc"], "rho": rho})
            choices[model][regime(samples)]["rho"] = {"rows": rows, **_pick(rows, "rho")}
    return choices


# -- cost ---------------------------------------------------------------------------------------------------


def measure_cost(choices: dict, steps: int, rounds: int, data_root: str) -> dict:
    """Seconds per training step of each of :data:`COST_PROCEDURES` at each chosen recipe, on the CPU with
    one thread: ``rounds`` rounds, each timing ``steps`` steps of every procedure in turn (after one
    warm-up step) on real batches; the median of the rounds, and its ratio to standard training's."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs train (the commands set one thread for MNIST-1D)
    try:
        return _measure_cost(choices, steps, rounds, load_dataset("mnist1d", data_root))
    finally:
        torch.set_num_threads(previous_threads)


def _measure_cost(choices: dict, steps: int, rounds: int, data) -> dict:
    device = torch.device("cpu")
    cost = {}
    for model in MODELS:
        for samples in SAMPLES:
            budget = choices[model][regime(samples)]["budget"]
            batch = int(dict(zip(budget["settings"], budget["settings"][1:])).get("--batch-size", 128))
            recipe = recipe_for("mnist1d", model).replace(batch_size=batch)
            experiment = Experiment("mnist1d", model, recipe)
            x = torch.stack([data.train[i][0] for i in range(batch)])
            y = torch.tensor([data.train[i][1] for i in range(batch)])
            seconds: Dict[str, List[float]] = {procedure: [] for procedure in COST_PROCEDURES}
            for _ in range(rounds):
                for procedure in COST_PROCEDURES:
                    seconds[procedure].append(_time_steps(experiment, procedure, data, x, y, steps, device))
            medians = {procedure: statistics.median(values) for procedure, values in seconds.items()}
            cost.setdefault(model, {})[regime(samples)] = {
                "batch_size": batch,
                "seconds_per_step": medians,
                "ratio": {p: round(medians[p] / medians["standard"], 2) for p in COST_PROCEDURES},
            }
    return cost


def _time_steps(experiment, procedure, data, x, y, steps, device) -> float:
    torch.manual_seed(0)
    model = build_model_for(experiment, data).to(device)
    optimizer = build_optimizer(model, experiment.recipe, procedure)
    loss_fn = TrainTally(device).loss_fn(model)
    plain = _plain_loss(model)
    model.train()
    training_step(optimizer, loss_fn, x, y, plain)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        training_step(optimizer, loss_fn, x, y, plain)
    return (time.perf_counter() - started) / steps


def _plain_loss(model):
    return lambda a, b: torch.nn.functional.cross_entropy(model(a), b)


# -- analysis -------------------------------------------------------------------------------------------


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


def arm_values(results_root: Path, model: str, samples: int) -> Optional[Dict[str, dict]]:
    """Per arm: the seeds, their final test accuracies, training seconds and steps; ``None`` while a
    summary is missing."""
    arms = {}
    for arm in ARMS:
        result = _summary(results_root, f"{short(model)}-{regime(samples)}-{arm.group}")
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


def _comparison(arms: Dict[str, dict], hypothesis: Hypothesis) -> dict:
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


def _verdict(entry: dict) -> str:
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
            "hypotheses": [_comparison(arms, h) for h in HYPOTHESES],
            "secondary": [_comparison(arms, h) for h in SECONDARY],
        }
    family = [entry for result in regimes.values() for entry in result["hypotheses"]]
    for entry, adjusted in zip(family, holm([entry["p"] for entry in family])):
        entry["p_holm"] = adjusted
        entry["verdict"] = _verdict(entry)
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


def _p_text(p: Optional[float]) -> str:
    return "—" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _interval_text(entry: dict) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:+.2f}"
    return f"{entry['mean']:+.2f} [{entry['low']:+.2f}, {entry['high']:+.2f}]"


def _accuracy_text(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def family_table(model: str, regimes: dict) -> str:
    """The markdown of one family: its arms, hypotheses and secondary comparisons per regime."""
    lines = [f"# `{model}`", ""]
    for key, result in regimes.items():
        arms = result["arms"]
        seeds = next(iter(arms.values()))["seeds"]
        lines += [
            f"## {key}: {len(seeds)} seeds",
            "",
            "| arm | steps | test top-1 (%) | train s/run |",
            "|---|---|---|---|",
        ]
        for name, arm in arms.items():
            seconds = statistics.fmean(arm["train_time_s"])
            lines.append(f"| {name} | {arm['steps']} | {_accuracy_text(arm['test_acc'])} | {seconds:.1f} |")
        lines += [
            "",
            "| | claim | Δ top-1 [95% CI] | test | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in result["hypotheses"]:
            lines.append(
                f"| {entry['name']} | {entry['claim']} | {_interval_text(entry)} | {entry['test']} | "
                f"{_p_text(entry['p'])} | {_p_text(entry['p_holm'])} | {entry['verdict']} |"
            )
        lines += ["", "| | secondary (not corrected) | Δ top-1 [95% CI] | p (t) |", "|---|---|---|---|"]
        for entry in result["secondary"]:
            lines.append(
                f"| {entry['name']} | {entry['claim']} | {_interval_text(entry)} | {_p_text(entry['p'])} |"
            )
        lines.append("")
    lines.append(
        "Δ: mean paired difference (same seed) of final test accuracy, treatment minus baseline, with a "
        "95% Student-t interval. H1, H2, H4 and the secondary comparisons: two-sided paired t-test; H3: "
        f"one-sided paired t-test of non-inferiority with a margin of {MARGIN:g} points. Holm-Bonferroni "
        f"over the family's 8 hypotheses; a hypothesis is supported when its adjusted p-value is below "
        f"{LEVEL:g} (and, for H1 and H2, in the direction of the difference; for H4 the verdict names the "
        "arm ahead)."
    )
    return "\n".join(lines) + "\n"


def budget_table(choices: dict) -> str:
    lines = [
        "| model | regime | budget | steps | val top-1 (%) | test top-1 (%) | train s/run | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, regimes in choices.items():
        for key, entry in regimes.items():
            for row in entry["rows"]:
                chosen = "yes" if row["budget"] == entry["budget"]["budget"] else ""
                lines.append(
                    f"| {model} | {key} | {row['label']} | {row['steps']} | {_mean_sd(row['val_acc'])} | "
                    f"{_mean_sd(row['test_acc'])} | {row['train_time_s']['mean']:.1f} | {chosen} |"
                )
    return "\n".join(lines) + "\n"


def _mean_sd(entry: dict) -> str:
    return _accuracy_text(entry["per_seed"])


def rho_table(choices: dict) -> str:
    lines = ["| model | regime | ρ | val top-1 (%) | chosen |", "|---|---|---|---|---|"]
    for model, regimes in choices.items():
        for key, entry in regimes.items():
            for row in entry["rho"]["rows"]:
                chosen = "yes" if row["value"] == entry["rho"]["value"] else ""
                lines.append(
                    f"| {model} | {key} | {row['value']:g} | {_mean_sd(row['val_acc'])} | {chosen} |"
                )
    return "\n".join(lines) + "\n"


# -- the driver -------------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the {what} phase first")
    return json.loads(path.read_text())


def _shard(comparisons: List[Comparison], shard: Optional[Tuple[int, int]]) -> List[Comparison]:
    if shard is None:
        return comparisons
    index, count = shard
    return comparisons[index - 1 :: count]


def _parse_shard(text: str) -> Tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 1/2, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {text}")
    return index, count


def phase_comparisons(phase: str, args: argparse.Namespace) -> List[Comparison]:
    """The comparisons of a training phase (reading what earlier phases chose)."""
    root = args.results_root
    if phase == "budget":
        return budget_comparisons(args.tuning_seeds)
    if phase == "rho":
        return rho_comparisons(
            _read(root / "choices.json", "budget"), _read(root / "cost.json", "cost"), args.tuning_seeds
        )
    if phase == "run":
        choices = _read(root / "choices.json", "budget and rho")
        if not all("rho" in entry for regimes in choices.values() for entry in regimes.values()):
            raise SystemExit(f"{root / 'choices.json'} holds no radius yet: run the rho phase first")
        return run_comparisons_of(choices, _read(root / "cost.json", "cost"), args.confirm_seeds)
    return []


def selected_comparisons(phase: str, args: argparse.Namespace) -> List[Comparison]:
    """The comparisons of a training phase that ``--only`` names (all by default), then ``--shard``'s."""
    return _shard(named(phase_comparisons(phase, args), args.only), args.shard)


def _train(phase: str, args: argparse.Namespace, extra: Sequence[str]) -> List[str]:
    selected = selected_comparisons(phase, args)
    log.info("== phase %s: %d comparison(s)", phase, len(selected))
    return run_comparisons(selected, args.runs_root, args.results_root / "comparisons", extra)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def finish_phase(phase: str, args: argparse.Namespace) -> bool:
    """Write the phase's summary if all its comparisons are done; whether it was written."""
    from .plots import plot_budget_curves, plot_cost

    root = args.results_root
    if phase == "budget":
        choices = choose_budgets(root)
        if choices is None:
            return False
        _write(root / "choices.json", json.dumps(choices, indent=2) + "\n")
        _write(root / "budget.md", budget_table(choices))
        plot_budget_curves(choices, root / "budget.png")
        return True
    if phase == "cost":
        cost = measure_cost(
            _read(root / "choices.json", "budget"),
            args.cost_steps,
            args.cost_rounds,
            args.data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT,
        )
        cost["about"] = {
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "steps": args.cost_steps,
            "rounds": args.cost_rounds,
            "versions": versions(),
        }
        _write(root / "cost.json", json.dumps(cost, indent=2) + "\n")
        return True
    if phase == "rho":
        choices = choose_rhos(root, _read(root / "choices.json", "budget"))
        if choices is None:
            return False
        _write(root / "choices.json", json.dumps(choices, indent=2) + "\n")
        _write(root / "rho.md", rho_table(choices))
        return True
    analysis = analyse(root)
    if analysis["pending"]:
        log.info("runs missing for %s: not analysed yet", ", ".join(analysis["pending"]))
    if not analysis["families"]:
        return False
    _write(root / "results.json", json.dumps(analysis, indent=2) + "\n")
    for model, regimes in analysis["families"].items():
        _write(root / f"{short(model)}.md", family_table(model, regimes))
    plot_cost(analysis, root / "cost.png")
    return not analysis["pending"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torch_mltp.experiments.confirm",
        description="The confirmatory MNIST-1D study (docs/results.md). Other options are appended to every "
        "torch-mltp compare command.",
    )
    parser.add_argument("phase", choices=(*PHASES, "all", "list"))
    parser.add_argument("--phase-list", choices=("budget", "rho", "run"), help="with list: the phase to list")
    parser.add_argument("--runs-root", type=Path, default=Path("runs/confirm"), help="default: runs/confirm")
    parser.add_argument(
        "--results-root",
        type=Path,
        default=Path("docs/results/confirm"),
        help="summaries and choices; default: docs/results/confirm",
    )
    parser.add_argument("--tuning-seeds", type=int, nargs="+", default=list(TUNING_SEEDS), help="default 0-9")
    parser.add_argument(
        "--confirm-seeds", type=int, nargs="+", default=list(CONFIRM_SEEDS), help="default 100-129"
    )
    parser.add_argument(
        "--shard", type=_parse_shard, metavar="K/N", help="run every N-th comparison from the K-th"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="with budget, rho, run or list: only these comparisons (to train them again, remove their "
        "folders under the runs root first)",
    )
    parser.add_argument("--cost-steps", type=int, default=100, help="steps per timing (default 100)")
    parser.add_argument("--cost-rounds", type=int, default=5, help="timings per procedure (default 5)")
    parser.add_argument(
        "--data-root",
        help="passed to every torch-mltp compare command when given; the cost phase's batches come from it "
        f"(default, as for torch-mltp: ${DATA_ROOT_ENV} or ./{DEFAULT_DATA_ROOT})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.data_root is not None:
        extra = [*extra, "--data-root", args.data_root]
    if args.only is not None and args.phase not in ("budget", "rho", "run", "list"):
        parser.error(f"--only names the comparisons of one training phase, not of {args.phase}")
    try:
        if args.phase == "list":
            for comparison in selected_comparisons(args.phase_list or "budget", args):
                print(comparison.command(args.runs_root))
            return 0
        if args.only is not None:
            selected_comparisons(args.phase, args)  # an unknown name fails before any training
    except ValueError as error:
        parser.error(str(error))
    phases = PHASES[:-1] if args.phase == "all" else (args.phase,)
    with messages_to_stdout():
        for phase in phases:
            failed = _train(phase, args, extra) if phase in ("budget", "rho", "run") else []
            if failed:
                print(f"failed: {', '.join(failed)} (the messages above say why)", file=sys.stderr)
                return 1
            if not finish_phase(phase, args):
                print(
                    f"phase {phase}: not every comparison is done (another shard?); run it again to summarise"
                )
                return 0
            print(f"phase {phase}: summary in {args.results_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
