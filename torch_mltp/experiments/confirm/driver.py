"""The command line of the confirmatory study: each phase as a record of what it trains and how it
summarises, the shards, ``--only`` and ``list``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from torch_mltp.data import load_dataset

from ..cli import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, messages_to_stdout
from ..cost import step_costs
from ..recipes import recipe_for
from ..study import Comparison, data_root, driver_parser, named, run_comparisons, write_json, write_text
from ..training import Experiment, versions
from .analysis import analyse, choose_budgets, choose_rhos
from .design import (
    CELLS,
    CONFIRM_SEEDS,
    COST_PROCEDURES,
    MODELS,
    TUNING_SEEDS,
    budget_comparisons,
    chosen_budget,
    confirmatory_comparisons,
    regime,
    rho_comparisons,
    short,
)
from .report import budget_table, family_table, rho_table

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the {what} phase first")
    return json.loads(path.read_text())


def measure_cost(choices: dict, steps: int, rounds: int, data_root: str) -> dict:
    """Seconds per training step of each of :data:`COST_PROCEDURES` at each chosen recipe's batch size, on
    the CPU with one thread, as the runs train (``cost.step_costs``: the median of ``rounds`` rounds of
    ``steps`` steps after a warm-up step, on the first batch of the training set), and the ratios to
    standard training's."""
    data = load_dataset("mnist1d", data_root)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cost: dict = {model: {} for model in MODELS}
    try:
        for model, samples in CELLS:
            batch = chosen_budget(choices, model, samples).overrides.get("batch_size", 128)
            experiment = Experiment("mnist1d", model, recipe_for("mnist1d", model).replace(batch_size=batch))
            costs = step_costs(experiment, COST_PROCEDURES, data, steps, rounds, torch.device("cpu"))
            cost[model][regime(samples)] = {
                "batch_size": batch,
                "seconds_per_step": {p: entry["seconds_per_step"] for p, entry in costs.items()},
                "ratio": {p: entry["ratio"] for p, entry in costs.items()},
            }
    finally:
        torch.set_num_threads(previous_threads)
    return cost


def finish_budget(args: argparse.Namespace) -> bool:
    from ..plots import plot_budget_curves

    choices = choose_budgets(args.results_root)
    if choices is None:
        return False
    write_json(args.results_root / "choices.json", choices)
    write_text(args.results_root / "budget.md", budget_table(choices))
    plot_budget_curves(choices, args.results_root / "budget.png")
    return True


def finish_cost(args: argparse.Namespace) -> bool:
    choices = _read(args.results_root / "choices.json", "budget")
    cost = measure_cost(choices, args.cost_steps, args.cost_rounds, data_root(args.data_root))
    cost["about"] = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": args.cost_steps,
        "rounds": args.cost_rounds,
        "versions": versions(),
    }
    write_json(args.results_root / "cost.json", cost)
    return True


def finish_rho(args: argparse.Namespace) -> bool:
    choices = choose_rhos(args.results_root, _read(args.results_root / "choices.json", "budget"))
    if choices is None:
        return False
    write_json(args.results_root / "choices.json", choices)
    write_text(args.results_root / "rho.md", rho_table(choices))
    return True


def finish_analysis(args: argparse.Namespace) -> bool:
    """The analysis of every family whose runs are done; whether every family's are."""
    from ..plots import plot_cost

    analysis = analyse(args.results_root)
    if analysis["pending"]:
        log.info("runs missing for %s: not analysed yet", ", ".join(analysis["pending"]))
    if not analysis["families"]:
        return False
    write_json(args.results_root / "results.json", analysis)
    for model, regimes in analysis["families"].items():
        write_text(args.results_root / f"{short(model)}.md", family_table(model, regimes))
    plot_cost(analysis, args.results_root / "cost.png")
    return not analysis["pending"]


@dataclass(frozen=True)
class Phase:
    """A phase of the study: the comparisons it trains (``None``: it trains nothing), reading what the
    phases before it chose, and how it writes its summary once they are done (whether it could)."""

    name: str
    finish: Callable[[argparse.Namespace], bool]
    comparisons: Optional[Callable[[argparse.Namespace], List[Comparison]]] = None


def _rho_comparisons(args: argparse.Namespace) -> List[Comparison]:
    root = args.results_root
    choices, cost = _read(root / "choices.json", "budget"), _read(root / "cost.json", "cost")
    return rho_comparisons(choices, cost, args.tuning_seeds)


def _run_comparisons(args: argparse.Namespace) -> List[Comparison]:
    choices = _read(args.results_root / "choices.json", "budget and rho")
    if not all("rho" in entry for regimes in choices.values() for entry in regimes.values()):
        raise SystemExit(f"{args.results_root / 'choices.json'} holds no radius yet: run the rho phase first")
    cost = _read(args.results_root / "cost.json", "cost")
    return confirmatory_comparisons(choices, cost, args.confirm_seeds)


PHASE_STEPS = {
    phase.name: phase
    for phase in (
        Phase("budget", finish_budget, lambda args: budget_comparisons(args.tuning_seeds)),
        Phase("cost", finish_cost),
        Phase("rho", finish_rho, _rho_comparisons),
        Phase("run", finish_analysis, _run_comparisons),
        Phase("report", finish_analysis),
    )
}
PHASES = tuple(PHASE_STEPS)
TRAINING_PHASES = tuple(name for name, phase in PHASE_STEPS.items() if phase.comparisons is not None)


def shard(comparisons: List[Comparison], part: Optional[Tuple[int, int]]) -> List[Comparison]:
    """Every N-th comparison from the K-th (1-based) for ``part = (K, N)``; all for ``None``."""
    if part is None:
        return comparisons
    index, count = part
    return comparisons[index - 1 :: count]


def _parse_shard(text: str) -> Tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 1/2, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {text}")
    return index, count


def selected_comparisons(phase: str, args: argparse.Namespace) -> List[Comparison]:
    """The comparisons of a training phase that ``--only`` names (all by default), then ``--shard``'s."""
    return shard(named(PHASE_STEPS[phase].comparisons(args), args.only), args.shard)


def run_phase(phase: Phase, args: argparse.Namespace, extra: Sequence[str]) -> Optional[int]:
    """Train the phase's comparisons, then write its summary; ``None`` to go on with the next phase, else
    the exit status."""
    if phase.comparisons is not None:
        selected = selected_comparisons(phase.name, args)
        log.info("== phase %s: %d comparison(s)", phase.name, len(selected))
        failed = run_comparisons(selected, args.runs_root, args.results_root / "comparisons", extra)
        if failed:
            print(f"failed: {', '.join(failed)} (the messages above say why)", file=sys.stderr)
            return 1
    if not phase.finish(args):
        print(f"phase {phase.name}: not every comparison is done (another shard?); run it again to summarise")
        return 0
    print(f"phase {phase.name}: summary in {args.results_root}")
    return None


def build_parser() -> argparse.ArgumentParser:
    only = (
        "with budget, rho, run or list: only these comparisons (to train them again, remove their folders "
        "under the runs root first)"
    )
    about = "The confirmatory MNIST-1D study (docs/results.md)."
    parser = driver_parser("confirm", about, "runs/confirm", "docs/results/confirm", only)
    parser.add_argument("phase", choices=(*PHASES, "all", "list"))
    parser.add_argument("--phase-list", choices=TRAINING_PHASES, help="with list: the phase to list")
    seeds = {"type": int, "nargs": "+"}
    parser.add_argument("--tuning-seeds", default=list(TUNING_SEEDS), help="default 0-9", **seeds)
    parser.add_argument("--confirm-seeds", default=list(CONFIRM_SEEDS), help="default 100-129", **seeds)
    parser.add_argument(
        "--shard", type=_parse_shard, metavar="K/N", help="run every N-th comparison from the K-th"
    )
    parser.add_argument("--cost-steps", type=int, default=100, help="steps per timing (default 100)")
    parser.add_argument("--cost-rounds", type=int, default=5, help="timings per procedure (default 5)")
    parser.add_argument(
        "--data-root",
        help="passed to every comparison when given; the cost phase's batches come from it "
        f"(default, as for torch-mltp: ${DATA_ROOT_ENV} or ./{DEFAULT_DATA_ROOT})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.data_root is not None:
        extra = [*extra, "--data-root", args.data_root]
    if args.only is not None and args.phase not in (*TRAINING_PHASES, "list"):
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
            status = run_phase(PHASE_STEPS[phase], args, extra)
            if status is not None:
                return status
    return 0
