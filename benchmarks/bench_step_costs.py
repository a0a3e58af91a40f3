#!/usr/bin/env python3
"""How much the step costs that ``torch-mltp compare`` measures vary from one measurement to the next.

The decision gives an arm such as ``standard@mltp_fo`` the ratio of two measured step costs times the
budget's steps (``torch_mltp.experiments.decision.measured_costs``: rounds of at least half a second per
procedure, interleaved, the median of ``--rounds``). This repeats that measurement ``--repeats`` times on
the main job's model (MNIST-1D's CNN, batches of 128, one torch thread) and prints each repeat's ratios to
standard training, as the median and as the minimum over the rounds, then their range (see
docs/results.md, "Reading the verdict").

    python benchmarks/bench_step_costs.py [--repeats 5] [--rounds 3] [--data-root data]
"""

import argparse
import statistics
import sys
from pathlib import Path

try:
    import torch_mltp  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from torch_mltp.data import load_dataset
from torch_mltp.experiments.cost import step_costs, steps_lasting
from torch_mltp.experiments.decision import Plan
from torch_mltp.experiments.recipes import recipe_for
from torch_mltp.experiments.training import Experiment

PROCEDURES = ("standard", "mltp_fo", "sam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", args.data_root)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe_for("mnist1d", "mnist1d_cnn"))
    device = torch.device("cpu")
    steps = steps_lasting(experiment, data, Plan.cost_seconds, device)  # as the decision times
    print(f"{args.repeats} measurements of {args.rounds} rounds of {steps} steps per procedure\n")
    print(
        "| repeat | "
        + " | ".join(f"{p} / standard ({how})" for how in ("median", "min") for p in PROCEDURES[1:])
        + " |"
    )
    print("|---" * (1 + 2 * (len(PROCEDURES) - 1)) + "|")
    ratios = []
    for repeat in range(1, args.repeats + 1):
        costs = step_costs(experiment, PROCEDURES, data, steps, args.rounds, device)
        rounds = {procedure: cost["seconds_per_round"] for procedure, cost in costs.items()}
        row = [
            summary(rounds[procedure]) / summary(rounds["standard"])
            for summary in (statistics.median, min)
            for procedure in PROCEDURES[1:]
        ]
        ratios.append(row)
        print(f"| {repeat} | " + " | ".join(f"{ratio:.2f}" for ratio in row) + " |")
    ranges = [f"{min(column):.2f}-{max(column):.2f}" for column in zip(*ratios)]
    print("| range | " + " | ".join(ranges) + " |")


if __name__ == "__main__":
    main()
