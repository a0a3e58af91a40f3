"""Procedures x seeds on one experiment: the runs, a Table-I-style summary, results.json and figures."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch_mltp.data import DataSplits, load_dataset

from .plots import plot_accuracy, plot_alphas
from .stats import mean_std, paired_difference
from .training import (
    Experiment,
    RunOptions,
    RunResult,
    check_procedures,
    metric_name,
    train_run,
    versions,
)

log = logging.getLogger(__name__)

BASELINE = "standard"
CONFIDENCE = 0.95


def run_dir_name(procedure: str, seed: int) -> str:
    return f"{procedure}-seed{seed}"


def summarize(
    experiment: Experiment,
    procedures: Sequence[str],
    seeds: Sequence[int],
    runs: Dict[Tuple[str, int], RunResult],
) -> dict:
    """Final-epoch test accuracies per procedure: per seed, mean ± sample std, and the paired
    difference to ``standard`` (same seed) with a 95% Student-t interval."""
    metrics = [metric_name(k) for k in experiment.recipe.topk]
    summary = {}
    for procedure in procedures:
        summary[procedure] = {}
        for metric in metrics:
            values = [runs[procedure, seed].final[metric] for seed in seeds]
            mean, std = mean_std(values)
            entry = {"per_seed": values, "mean": mean, "std": std, "diff_vs_standard": None}
            if BASELINE in procedures and procedure != BASELINE:
                baseline = [runs[BASELINE, seed].final[metric] for seed in seeds]
                entry["diff_vs_standard"] = paired_difference(baseline, values, CONFIDENCE).to_dict()
            summary[procedure][metric] = entry
    return {
        "dataset": experiment.dataset,
        "model": experiment.model,
        "experiment": experiment.to_dict(),
        "procedures": list(procedures),
        "seeds": list(seeds),
        "metrics": metrics,
        "summary": summary,
        "versions": versions(),
        "runs": {
            procedure: {
                str(seed): {
                    "run_dir": str(runs[procedure, seed].run_dir),
                    "history": runs[procedure, seed].history,
                }
                for seed in seeds
            }
            for procedure in procedures
        },
    }


def _mean_std_text(entry: dict) -> str:
    if math.isnan(entry["std"]):
        return f"{entry['mean']:.2f}"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def _difference_text(difference: Optional[dict]) -> str:
    if difference is None:
        return "—"
    if difference["low"] is None:
        return f"{difference['mean']:+.2f} (1 seed: no interval)"
    return f"{difference['mean']:+.2f} [{difference['low']:+.2f}, {difference['high']:+.2f}]"


_METRIC_TITLES = {"test_acc": "top-1", "test_top5": "top-5"}


def markdown_table(
    results: Sequence[dict], reported: Optional[Dict[Tuple[str, str], Tuple[float, ...]]] = None
) -> str:
    """One row per (model, procedure) of the ``summarize`` outputs in ``results``.

    ``reported``: the paper's accuracies per (model, procedure), shown in extra columns.
    """
    metrics = results[0]["metrics"]
    header = ["model", "procedure"]
    for metric in metrics:
        title = _METRIC_TITLES.get(metric, metric)
        header += [f"test {title} (%)", f"Δ {title} vs standard [{CONFIDENCE:.0%} CI]"]
        if reported is not None:
            header.append(f"paper {title}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        for procedure in result["procedures"]:
            cells = [result["model"], procedure]
            for index, metric in enumerate(metrics):
                entry = result["summary"][procedure][metric]
                cells += [_mean_std_text(entry), _difference_text(entry["diff_vs_standard"])]
                if reported is not None:
                    paper = reported.get((result["model"], procedure), ())
                    cells.append(f"{paper[index]:.1f}" if index < len(paper) else "—")
            lines.append("| " + " | ".join(cells) + " |")
    seeds = results[0]["seeds"]
    lines += [
        "",
        f"Final-epoch test accuracy over {len(seeds)} seed(s) {tuple(seeds)}: mean ± sample std (n − 1). "
        f"Δ: mean of the paired differences to standard (same seed) with a {CONFIDENCE:.0%} Student-t "
        "interval (n − 1 degrees of freedom).",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(root: Path, results: Sequence[dict], reported=None, figures: bool = True) -> List[Path]:
    """Write results.json and table.md under ``root`` (and, for one experiment, the figures)."""
    root.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else {"experiments": list(results)}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "table.md").write_text(markdown_table(results, reported))
    written = [root / "results.json", root / "table.md"]
    if figures:
        result = results[0]
        written.append(plot_accuracy(result, root / "accuracy.png"))
        alphas = plot_alphas(result, root / "alphas.png")
        if alphas is not None:
            written.append(alphas)
    return written


def compare(
    experiment: Experiment,
    procedures: Sequence[str],
    seeds: Sequence[int],
    root: Path,
    options: RunOptions,
    data: Optional[DataSplits] = None,
) -> dict:
    """Train every procedure with every seed under ``root`` and write the summary there.

    Runs already finished with the same settings are reused, interrupted ones resumed.
    """
    if len(set(seeds)) != len(seeds) or len(set(procedures)) != len(procedures):
        raise ValueError("procedures and seeds must not repeat")
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)
    check_procedures(experiment, procedures, data)
    runs: Dict[Tuple[str, int], RunResult] = {}
    total = len(procedures) * len(seeds)
    for seed in seeds:
        for procedure in procedures:
            run = train_run(
                experiment, procedure, seed, Path(root) / run_dir_name(procedure, seed), options, data
            )
            runs[procedure, seed] = run
            log.info("[%d/%d] %s", len(runs), total, run_line(experiment, run))
    return summarize(experiment, procedures, seeds, runs)


def run_line(experiment: Experiment, run: RunResult) -> str:
    """One line on a run of a comparison: its final test accuracy and how long it trained, or, for a run
    found finished in its folder with the same settings, that it was reused."""
    final = run.final
    result = f"test acc {final['test_acc']:.2f}% after {final['epoch']} epochs"
    if run.reused:
        result = f"reused, {result}"
    else:
        seconds = sum(record["epoch_time_s"] + record["eval_time_s"] for record in run.history)
        result = f"{result}, {seconds:.0f}s"
    return (
        f"{experiment.dataset} {experiment.model} {run.procedure} seed {run.seed}: {result} ({run.run_dir})"
    )
