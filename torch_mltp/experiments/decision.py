"""Does MLTP help on this model? One comparison that ends in a decision, on any model and data.

The arms (:class:`Arm`) train on the same seeds, so that each seed pairs them. By default: standard
training; ``mltp_fo`` with its alphas kept >= 0; SAM given ``mltp_fo``'s measured cost; standard training
given ``mltp_fo``'s measured cost. The steps:

1. **Cost.** Seconds per step of every procedure on one batch (:func:`.cost.step_costs`, kept in
   ``cost.json``), so that an arm ``procedure@other`` trains ``ratio(other) / ratio(procedure)`` times the
   budget's steps, and so that the whole comparison's time can be estimated before it starts.
2. **Budget.** Standard training at each scale of the recipe's schedule, on the tuning seeds, with a part
   of the training samples held out; the scale with the highest mean validation accuracy is the budget
   (a tie goes to the shorter one). With several SAM radii, SAM's is chosen the same way.
3. **Runs.** Every arm on every seed, on all training samples, with the chosen budget.
4. **Analysis.** Every MLTP arm against every arm that is not MLTP: the paired difference of final test
   accuracy (treatment minus baseline, same seed) with a 95% Student-t interval and a two-sided paired
   t-test, Holm-Bonferroni adjusted over all of them, and the verdict (:func:`verdict`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torch_mltp.data import DataSplits

from . import comparison
from .comparison import Progress, duration_text, run_steps
from .cost import step_costs, steps_lasting
from .recipes import MLTP_MODES, Recipe
from .sources import folder_name, function_name, user_data
from .stats import holm, paired_difference
from .tables import arms_table, interval_text, markdown, p_text
from .training import Experiment, ExperimentError, RunOptions, resolve_device, split_training

log = logging.getLogger(__name__)

LEVEL = 0.05
"""A difference is shown when its Holm-adjusted p-value is below this (the family-wise error rate)."""
CONFIDENCE = 0.95
DEFAULT_ARMS = ("standard", "mltp_fo", "sam@mltp_fo", "standard@mltp_fo")
DEFAULT_SEEDS = (100, 101, 102, 103, 104)
DEFAULT_TUNING_SEEDS = (0, 1)
DEFAULT_BUDGETS = (0.5, 1.0)
DEFAULT_SAM_RHOS = (0.05,)
COST_FILE = "cost.json"
DEFAULT_RECIPE = Recipe("adam", 1e-3, 10, (), alpha_policy="nonnegative")
"""For a model of the user's: Adam at 1e-3, batches of 128, 10 epochs at a constant learning rate, the
alphas of MLTP kept >= 0 (``alpha_min=0``)."""


@dataclass(frozen=True)
class Arm:
    """One arm: a procedure, trained for the budget's steps or, with ``cost_of``, for as long as a step
    of that procedure costs (``sam@mltp_fo``: SAM given ``mltp_fo``'s time)."""

    procedure: str
    cost_of: Optional[str] = None

    @staticmethod
    def parse(spec: str) -> Arm:
        procedure, _, cost_of = spec.partition("@")
        for name in (procedure, cost_of or procedure):
            if name not in MLTP_MODES:
                raise ExperimentError(
                    f"arm {spec!r}: expected PROCEDURE or PROCEDURE@PROCEDURE with procedures from "
                    f"{', '.join(MLTP_MODES)}"
                )
        return Arm(procedure, cost_of if cost_of and cost_of != procedure else None)

    @property
    def name(self) -> str:
        return self.procedure if self.cost_of is None else f"{self.procedure}@{self.cost_of}"

    @property
    def label(self) -> str:
        return self.procedure if self.cost_of is None else f"{self.procedure} at {self.cost_of}'s cost"

    @property
    def is_mltp(self) -> bool:
        return MLTP_MODES[self.procedure] is not None


@dataclass(frozen=True)
class Plan:
    """What a decision trains: the arms, the seeds, and the budget and radius candidates."""

    arms: Tuple[Arm, ...] = tuple(Arm.parse(spec) for spec in DEFAULT_ARMS)
    seeds: Tuple[int, ...] = DEFAULT_SEEDS
    tuning_seeds: Tuple[int, ...] = DEFAULT_TUNING_SEEDS
    budgets: Tuple[float, ...] = DEFAULT_BUDGETS
    sam_rhos: Tuple[float, ...] = DEFAULT_SAM_RHOS
    val_fraction: float = 0.1
    cost_seconds: float = 0.5
    """Each round times every procedure for at least this long (and 20 steps)."""
    cost_rounds: int = 3

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names) or not names:
            raise ExperimentError(f"the arms must be distinct and at least one, got {names}")
        for values, what in ((self.seeds, "seeds"), (self.tuning_seeds, "tuning seeds")):
            if not values or len(set(values)) != len(values):
                raise ExperimentError(f"the {what} must be distinct and at least one, got {list(values)}")
        if not self.budgets or any(not (math.isfinite(b) and b > 0) for b in self.budgets):
            raise ExperimentError(f"the budgets must be positive scales, got {list(self.budgets)}")
        if not self.sam_rhos or any(not (math.isfinite(r) and r >= 0) for r in self.sam_rhos):
            raise ExperimentError(f"the SAM radii must be numbers >= 0, got {list(self.sam_rhos)}")

    @property
    def timed(self) -> Tuple[str, ...]:
        """The procedures whose step cost the plan needs, standard training first."""
        named = [arm.procedure for arm in self.arms] + [arm.cost_of for arm in self.arms if arm.cost_of]
        return tuple(dict.fromkeys(["standard", *named]))


@dataclass
class Decision:
    """The outcome: per arm its per-seed results, the comparisons and the verdict (:meth:`to_dict` is
    the JSON that :func:`write_outputs` writes)."""

    setup: dict
    arms: Dict[str, dict]
    comparisons: List[dict]
    verdict: List[str]
    tuning: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The arms and the paired comparisons as markdown, then the verdict."""
        arms = [(a["label"], a["steps"], a["test_acc"], a["train_s_per_seed"]) for a in self.arms.values()]
        rows = [
            [
                f"{entry['treatment']} − {entry['baseline']}",
                interval_text(entry["difference"]),
                p_text(entry["difference"]["p_t"]),
                p_text(entry["p_holm"]),
                entry["outcome"],
            ]
            for entry in self.comparisons
        ]
        seeds = self.setup["seeds"]
        return "\n".join(
            [
                arms_table(arms),
                "",
                markdown(["comparison", "Δ top-1 [95% CI]", "p (t)", "p (Holm)", "outcome"], rows),
                "",
                *(f"**Verdict.** {line}" for line in self.verdict),
                "",
                f"{len(seeds)} paired seeds {tuple(seeds)}. Δ: mean of the paired differences of final test "
                "accuracy (same seed), treatment minus baseline, with a 95% Student-t interval; p (t): "
                "two-sided paired t-test; p (Holm): Holm-Bonferroni adjusted over the comparisons. A "
                f"difference is shown when p (Holm) < {LEVEL:g}.",
            ]
        )


def compare(
    make_model: Callable[[], nn.Module],
    make_data: Callable[[], Tuple[object, object]],
    *,
    loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    recipe: Optional[Recipe] = None,
    plan: Optional[Plan] = None,
    out: Optional[Path] = None,
    device: str = "auto",
    overwrite: bool = False,
    names: Optional[Dict[str, str]] = None,
) -> Decision:
    """Does MLTP help on ``make_model()`` trained on ``make_data()``? The comparison of ``plan``'s arms
    (default :class:`Plan()`) with ``recipe`` (default :data:`DEFAULT_RECIPE`) as the schedule to scale
    (module docstring), its runs under ``out`` (default ``runs/compare/<model>``; finished runs are reused,
    interrupted ones resumed). ``names`` (``model``, ``data``, ``loss``) label the functions in the run
    folders, by default ``module:qualname``."""
    names = {**_default_names(make_model, make_data, loss), **(names or {})}
    data = user_data(make_data, names["data"])
    experiment = Experiment(
        names["data"],
        names["model"],
        recipe or DEFAULT_RECIPE,
        make_model=make_model,
        loss=loss,
        loss_name=names.get("loss"),
    )
    out = Path(out) if out is not None else Path("runs/compare") / folder_name(names["model"])
    return decide(experiment, data, plan or Plan(), out, RunOptions(device=device, overwrite=overwrite))


def _default_names(make_model, make_data, loss) -> Dict[str, str]:
    names = {"model": function_name(make_model), "data": function_name(make_data)}
    if loss is not None:
        names["loss"] = function_name(loss)
    return names


def decide(experiment: Experiment, data: DataSplits, plan: Plan, out: Path, options: RunOptions) -> Decision:
    """The steps of the module docstring for ``experiment`` (its recipe is the schedule to scale), each
    group of runs a comparison (:func:`.comparison.compare`) of one progress."""
    options = dataclasses.replace(
        options, log_epochs=False, cosine_every=0, command="compare", progress=False
    )
    device = resolve_device(options.device)
    split_training(data, experiment)  # a batch larger than the data fails before anything runs
    costs = measured_costs(experiment, data, plan, out / COST_FILE, device, again=options.overwrite)
    runs = _Runs(experiment, data, plan, costs, out, options)
    runs.replan()
    log.info(
        "%d runs: about %s in all (from the measured step times; evaluation not included)",
        runs.progress.total,
        duration_text(runs.progress.left() or 0.0),
    )
    tuning = {"budget": runs.choose_budget()}
    if runs.tunes_rho:
        tuning["sam_rho"] = runs.choose_rho()
    arms = {arm.name: runs.run_arm(arm) for arm in plan.arms}
    comparisons = analyse(plan.arms, arms)
    setup = {
        "dataset": experiment.dataset,
        "model": experiment.model,
        "loss": experiment.loss_name or "cross_entropy",
        "recipe": runs.recipe.to_dict(),
        "seeds": list(plan.seeds),
        "plan": {**dataclasses.asdict(plan), "arms": [arm.name for arm in plan.arms]},
        "cost": costs,
        "device": str(device),
    }
    return Decision(setup, arms, comparisons, verdict(plan.arms, comparisons), tuning)


def measured_costs(
    experiment: Experiment, data: DataSplits, plan: Plan, path: Path, device, again: bool = False
) -> dict:
    """The step costs of the plan's procedures (:func:`.cost.step_costs`), kept in ``path``: running the
    comparison again reuses them, so that the arms given another arm's cost keep their budgets and their
    finished runs (``again``, as with ``--overwrite``, or deleting the file measures them again)."""
    if path.exists() and not again:
        costs = json.loads(path.read_text())
        if set(plan.timed) <= set(costs):
            log.info("step costs from %s (delete it to measure them again)", path)
            return costs
    steps = steps_lasting(experiment, data, plan.cost_seconds, device)
    costs = step_costs(experiment, plan.timed, data, steps, plan.cost_rounds, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs, indent=2) + "\n")
    log.info("seconds per step: %s", ", ".join(f"{p} {c['seconds_per_step']:.4f}" for p, c in costs.items()))
    return costs


class _Runs:
    """The comparisons of one decision, in order, with one progress over all of their runs."""

    def __init__(self, experiment, data, plan: Plan, costs: dict, out: Path, options: RunOptions):
        self.experiment, self.data, self.plan, self.costs = experiment, data, plan, costs
        self.out, self.options = out, options
        self.base = self.recipe = experiment.recipe
        self.progress = Progress({p: cost["seconds_per_step"] for p, cost in costs.items()})

    @property
    def tunes_rho(self) -> bool:
        return len(self.plan.sam_rhos) > 1 and any(arm.procedure == "sam" for arm in self.plan.arms)

    def replan(self) -> None:
        """Tell the progress every run still to come, the arms at the current budget."""
        plan, runs = self.plan, []
        held_out = {"val_fraction": plan.val_fraction}  # the tuning runs train on the rest
        if len(plan.budgets) > 1:
            tuning = [self.base.scaled(s).replace(**held_out) for s in plan.budgets]
            runs += [("standard", recipe) for recipe in tuning for _ in plan.tuning_seeds]
        if self.tunes_rho:
            sam = self.recipe.scaled(self.scale_of(next(a for a in plan.arms if a.procedure == "sam")))
            runs += [("sam", sam.replace(**held_out)) for _ in plan.sam_rhos for _ in plan.tuning_seeds]
        runs += [(a.procedure, self.recipe.scaled(self.scale_of(a))) for a in plan.arms for _ in plan.seeds]
        self.progress.plan([(p, self.steps(recipe)) for p, recipe in runs[self.progress.done :]])

    def scale_of(self, arm: Arm) -> float:
        """How many times the budget's steps ``arm`` trains: 1, or the cost ratio of ``arm.cost_of``."""
        if arm.cost_of is None:
            return 1.0
        return round(self.costs[arm.cost_of]["ratio"] / self.costs[arm.procedure]["ratio"], 2)

    def steps(self, recipe: Recipe) -> int:
        return run_steps(dataclasses.replace(self.experiment, recipe=recipe), self.data)

    def compare(self, recipe: Recipe, procedure: str, seeds, folder: Path, label: str) -> dict:
        """``procedure`` with ``recipe`` on ``seeds`` in ``folder``: :func:`.comparison.compare`'s summary."""
        experiment = dataclasses.replace(self.experiment, recipe=recipe)
        options, data, progress = self.options, self.data, self.progress
        return comparison.compare(
            experiment, (procedure,), seeds, folder, options, data, None, progress, label
        )

    def choose_budget(self) -> dict:
        """The budget scale with the highest mean validation accuracy of standard training."""
        if len(self.plan.budgets) == 1:
            self.recipe = self.base.scaled(self.plan.budgets[0])
            return {"value": self.plan.budgets[0], "rows": []}
        rows = [self._tune("standard", self.base.scaled(s), f"budget-{s:g}", s) for s in self.plan.budgets]
        best = max(rows, key=lambda row: (row["val_acc"], -row["value"]))
        self.recipe = self.base.scaled(best["value"])
        log.info("budget: %gx the recipe's schedule (%d epochs)", best["value"], self.recipe.epochs)
        self.replan()
        return {"value": best["value"], "rows": rows}

    def choose_rho(self) -> dict:
        """SAM's radius (at its arm's cost) with the highest mean validation accuracy."""
        sam = next(arm for arm in self.plan.arms if arm.procedure == "sam")
        scaled = self.recipe.scaled(self.scale_of(sam))
        rows = [self._tune("sam", scaled.replace(sam_rho=r), f"sam-rho-{r:g}", r) for r in self.plan.sam_rhos]
        best = max(rows, key=lambda row: (row["val_acc"], -row["value"]))
        self.recipe = self.recipe.replace(sam_rho=best["value"])
        log.info("SAM radius: %g", best["value"])
        return {"value": best["value"], "rows": rows}

    def _tune(self, procedure: str, recipe: Recipe, name: str, value: float) -> dict:
        """``procedure`` on the tuning seeds with the validation split: its mean validation accuracy."""
        recipe = recipe.replace(val_fraction=self.plan.val_fraction)
        summary = self.compare(
            recipe,
            procedure,
            self.plan.tuning_seeds,
            self.out / "tuning" / name,
            f"tuning {name} {procedure}",
        )
        accuracies = summary["summary"][procedure]["val_acc"]
        return {"value": value, "val_acc": accuracies["mean"], "per_seed": accuracies["per_seed"]}

    def run_arm(self, arm: Arm) -> dict:
        """Every seed of ``arm`` on all training samples; its per-seed results."""
        recipe = self.recipe.scaled(self.scale_of(arm))
        result = self.compare(
            recipe, arm.procedure, self.plan.seeds, self.out / folder_name(arm.name), arm.label
        )
        summary = result["summary"][arm.procedure]
        return {
            "label": arm.label,
            "procedure": arm.procedure,
            "steps_scale": self.scale_of(arm),
            "epochs": recipe.epochs,
            "steps": self.steps(recipe),
            "test_acc": summary["test_acc"]["per_seed"],
            "train_s_per_seed": summary["train_time_s"]["per_seed"],
            "train_s": summary["train_time_s"]["mean"],
            "run_dirs": [run["run_dir"] for run in result["runs"][arm.procedure].values()],
        }


def analyse(arms: Sequence[Arm], results: Dict[str, dict]) -> List[dict]:
    """Every MLTP arm minus every other arm that is not MLTP: the paired difference of final test accuracy,
    Holm-Bonferroni adjusted over all of them, and each one's outcome."""
    pairs = [(t, b) for t in arms if t.is_mltp for b in arms if not b.is_mltp]
    entries = []
    for treatment, baseline in pairs:
        difference = paired_difference(
            results[baseline.name]["test_acc"], results[treatment.name]["test_acc"], CONFIDENCE
        ).to_dict()
        entries.append({"treatment": treatment.name, "baseline": baseline.name, "difference": difference})
    for entry, adjusted in zip(entries, holm([entry["difference"]["p_t"] for entry in entries])):
        entry["p_holm"] = adjusted
        entry["outcome"] = outcome(entry)
    return entries


def outcome(entry: dict) -> str:
    """``"<arm> ahead"`` when the adjusted p-value is below :data:`LEVEL`, else ``"not shown"``."""
    if entry["p_holm"] >= LEVEL:
        return "not shown"
    return f"{entry['treatment'] if entry['difference']['mean'] > 0 else entry['baseline']} ahead"


def verdict(arms: Sequence[Arm], comparisons: Sequence[dict]) -> List[str]:
    """One line per MLTP arm: against standard training, then against SAM. An arm is *ahead* of standard
    training (or SAM) when it is shown ahead of every such arm there is (the same steps, and given its
    cost): more steps can hurt standard training, so beating only the longer run shows no gain. The other
    arm is *ahead* when one of its comparisons shows it ahead; otherwise the line says *not shown*."""
    by_pair = {(entry["treatment"], entry["baseline"]): entry for entry in comparisons}
    lines = []
    for arm in (arm for arm in arms if arm.is_mltp):
        parts = []
        for procedure, claim, title in (
            ("standard", "gain over", "standard training"),
            ("sam", "difference from", "SAM"),
        ):
            found = {
                how: by_pair[arm.name, baseline]
                for how, baseline in (
                    ("same steps", procedure),
                    ("equal cost", f"{procedure}@{arm.procedure}"),
                )
                if (arm.name, baseline) in by_pair
            }
            if found:
                parts.append(_against(found, claim, title))
        if parts:
            lines.append(f"{arm.name}: " + "; ".join(parts) + ".")
    return lines


def _against(entries: Dict[str, dict], claim: str, baseline: str) -> str:
    """``"ahead of X (...)"``, ``"X ahead (...)"`` or ``"gain over X not shown (...)"``, with the evidence
    of each comparison."""
    evidence = "; ".join(
        f"{how}: {interval_text(entry['difference'])} points, Holm p {p_text(entry['p_holm'])}"
        for how, entry in entries.items()
    )
    shown = [entry["difference"]["mean"] for entry in entries.values() if entry["p_holm"] < LEVEL]
    if len(shown) == len(entries) and all(mean > 0 for mean in shown):
        return f"ahead of {baseline} ({evidence})"
    if any(mean < 0 for mean in shown):
        return f"{baseline} ahead ({evidence})"
    return f"{claim} {baseline} not shown ({evidence})"


def write_outputs(decision: Decision, out: Path) -> List[Path]:
    """``decision.json`` (every arm's per-seed results), ``decision.md`` and ``decision.png``."""
    from .plots import plot_decision

    out.mkdir(parents=True, exist_ok=True)
    (out / "decision.json").write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    (out / "decision.md").write_text(decision.table() + "\n")
    return [
        out / "decision.json",
        out / "decision.md",
        plot_decision(decision.to_dict(), out / "decision.png"),
    ]
