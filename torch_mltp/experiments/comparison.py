"""Procedures x seeds on one experiment: the runs, a Table-I-style summary, results.json and figures."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch_mltp.data import DataSplits, load_dataset

from . import distributed
from .plots import plot_accuracy, plot_alphas, plot_gradient_cosine
from .stats import MAX_EXACT_SIGN_FLIPS, SIGN_FLIP_DRAWS, mean_std, paired_difference
from .training import (
    Experiment,
    RunOptions,
    RunResult,
    check_procedures,
    metric_name,
    split_training,
    train_run,
    versions,
)

log = logging.getLogger(__name__)

BASELINE = "standard"
CONFIDENCE = 0.95


def run_dir_name(procedure: str, seed: int) -> str:
    return f"{procedure}-seed{seed}"


def training_seconds(history: Sequence[dict]) -> float:
    """Wall-clock seconds a run spent training: its epochs without test evaluation and without the
    gradient-cosine measurements."""
    return math.fsum(record["epoch_time_s"] - record.get("grad_cosine_time_s", 0.0) for record in history)


def mean_gradient_cosine(history: Sequence[dict]) -> Optional[float]:
    """The mean over a run's epochs of each epoch's mean gradient cosine; ``None`` if none was measured."""
    values = [record["grad_cosine"] for record in history if "grad_cosine" in record]
    return math.fsum(values) / len(values) if values else None


def negative_alphas(histories: Sequence[Sequence[dict]]) -> Optional[dict]:
    """In how many runs some logged alpha was below 0 at the end of some epoch (``"during"``) and at the end
    of the last epoch (``"at_end"``), and the lowest alpha logged; ``None`` if the runs logged no alphas."""
    logged = [[record["alphas"] for record in history if record.get("alphas")] for history in histories]
    if not all(logged):
        return None
    lowest = [min(min(alphas.values()) for alphas in run) for run in logged]
    return {
        "runs": len(logged),
        "during": sum(low < 0 for low in lowest),
        "at_end": sum(min(run[-1].values()) < 0 for run in logged),
        "min": min(lowest),
    }


def _spread(values: Sequence[Optional[float]]) -> Optional[dict]:
    """Per seed, mean and sample std of values measured for every seed; ``None`` if any is missing."""
    if any(value is None for value in values):
        return None
    mean, std = mean_std(values)
    return {"per_seed": list(values), "mean": mean, "std": std}


def summarize(
    experiment: Experiment,
    procedures: Sequence[str],
    seeds: Sequence[int],
    runs: Dict[Tuple[str, int], RunResult],
) -> dict:
    """Final-epoch test accuracies per procedure: per seed, mean ± sample std, and the paired
    difference to ``standard`` (same seed) with a 95% Student-t interval, a paired t-test and a sign-flip
    test. Per procedure also the training time per run (:func:`training_seconds`), the mean gradient
    cosine over training (:func:`mean_gradient_cosine`; ``None`` if a run did not measure it) with its
    paired difference to ``standard``, the runs whose alphas went negative (:func:`negative_alphas`), and
    the final validation accuracy (``None`` without a validation split)."""
    metrics = [metric_name(k) for k in experiment.recipe.topk]
    summary = {}
    for procedure in procedures:
        histories = [runs[procedure, seed].history for seed in seeds]
        summary[procedure] = {
            "train_time_s": _spread([training_seconds(history) for history in histories]),
            "grad_cosine": _spread([mean_gradient_cosine(history) for history in histories]),
            "negative_alphas": negative_alphas(histories),
            "val_acc": _spread([history[-1].get("val_acc") for history in histories]),
        }
    baseline_cosine = summary.get(BASELINE, {}).get("grad_cosine")
    for procedure in procedures:
        cosine = summary[procedure]["grad_cosine"]
        if cosine is not None and baseline_cosine is not None and procedure != BASELINE:
            cosine["diff_vs_standard"] = paired_difference(
                baseline_cosine["per_seed"], cosine["per_seed"], CONFIDENCE
            ).to_dict()
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


def _p_text(p_value: Optional[float]) -> str:
    if p_value is None:
        return "—"
    return f"{p_value:.2g}" if p_value < 0.001 else f"{p_value:.3f}"


def _informative_sign_flip(difference: dict) -> Optional[float]:
    """The sign-flip p-value, or ``None`` for one pair: its two sign patterns always give p = 1."""
    return difference["p_sign_flip"] if difference["n"] > 1 else None


def _cosine_text(entry: Optional[dict]) -> str:
    if entry is None:
        return "—"
    difference = entry.get("diff_vs_standard")
    if difference is None or difference["low"] is None:
        return f"{entry['mean']:.3f}"
    interval = f"[{difference['low']:+.3f}, {difference['high']:+.3f}]"
    return f"{entry['mean']:.3f} ({difference['mean']:+.3f} {interval})"


def _negative_alphas_text(entry: Optional[dict]) -> str:
    return "—" if entry is None else f"{entry['during']} / {entry['at_end']} of {entry['runs']}"


def _time_text(entry: Optional[dict], baseline: Optional[dict]) -> str:
    if entry is None:
        return "—"
    ratio = f" (×{entry['mean'] / baseline['mean']:.2f})" if baseline and baseline["mean"] > 0 else ""
    return f"{entry['mean']:.1f}{ratio}"


def _sign_flip_note(seeds: int) -> str:
    if seeds <= MAX_EXACT_SIGN_FLIPS:
        return "exact over every sign pattern"
    return f"over {SIGN_FLIP_DRAWS} random sign patterns"


_METRIC_TITLES = {"test_acc": "top-1", "test_top5": "top-5"}


def markdown_table(
    results: Sequence[dict],
    reported: Optional[Dict[Tuple[str, str], Tuple[float, ...]]] = None,
    first_column: str = "model",
) -> str:
    """One row per (model, procedure) of the ``summarize`` outputs in ``results``.

    ``reported``: the paper's accuracies per (model, procedure), shown in extra columns.
    ``first_column``: its header; a result's ``"label"`` (else its model) fills it.
    """
    metrics = results[0]["metrics"]
    header = [first_column, "procedure"]
    for metric in metrics:
        title = _METRIC_TITLES.get(metric, metric)
        header += [
            f"test {title} (%)",
            f"Δ {title} vs standard [{CONFIDENCE:.0%} CI]",
            "p (t)",
            "p (sign-flip)",
        ]
        if reported is not None:
            header.append(f"paper {title}")
    header += ["grad cosine (Δ [CI])", "runs with α < 0: during / at end", "train s/run (× standard)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        for procedure in result["procedures"]:
            cells = [result.get("label", result["model"]), procedure]
            summary = result["summary"][procedure]
            for index, metric in enumerate(metrics):
                entry = summary[metric]
                difference = entry["diff_vs_standard"]
                cells += [_mean_std_text(entry), _difference_text(difference)]
                cells += (
                    ["—", "—"]
                    if difference is None
                    else [_p_text(difference["p_t"]), _p_text(_informative_sign_flip(difference))]
                )
                if reported is not None:
                    paper = reported.get((result["model"], procedure), ())
                    cells.append(f"{paper[index]:.1f}" if index < len(paper) else "—")
            baseline = result["summary"].get(BASELINE, {}).get("train_time_s")
            cells += [
                _cosine_text(summary.get("grad_cosine")),
                _negative_alphas_text(summary.get("negative_alphas")),
                _time_text(summary.get("train_time_s"), baseline),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    seeds = results[0]["seeds"]
    lines += [
        "",
        f"Final-epoch test accuracy over {len(seeds)} seed(s) {tuple(seeds)}: mean ± sample std (n − 1). "
        f"Δ: mean of the paired differences to standard (same seed) with a {CONFIDENCE:.0%} Student-t "
        "interval (n − 1 degrees of freedom); two-sided p-values of a paired t-test and of a sign-flip "
        f"permutation test ({_sign_flip_note(len(seeds))}). Grad cosine: cosine similarity of the two half "
        "batches' gradients at the same weights, averaged over the measured steps of each epoch, the "
        "epochs and the seeds; in brackets the mean paired difference to standard with its interval. "
        "α < 0: runs in which some layer's alpha was below 0 at the end of some epoch, and at the end of "
        "training. Train s/run: seconds of training per run (without test evaluation and "
        "the cosine measurements), mean over the seeds, and its ratio to standard training's.",
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
        for optional in (
            plot_alphas(result, root / "alphas.png"),
            plot_gradient_cosine(result, root / "grad_cosine.png"),
        ):
            if optional is not None:
                written.append(optional)
    return written


def compare(
    experiment: Experiment,
    procedures: Sequence[str],
    seeds: Sequence[int],
    root: Path,
    options: RunOptions,
    data: Optional[DataSplits] = None,
    baseline_root: Optional[Path] = None,
) -> dict:
    """Train every procedure with every seed under ``root`` and return the summary.

    Runs already finished with the same settings are reused, interrupted ones resumed. The standard
    runs live under ``baseline_root`` when it is given (default ``root``): standard training does not
    depend on the MLTP settings, so comparisons that differ only in those can share them.
    """
    if len(set(seeds)) != len(seeds) or len(set(procedures)) != len(procedures):
        raise ValueError("procedures and seeds must not repeat")
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)
    check_procedures(experiment, procedures, data)
    split_training(data, experiment, distributed.current())  # a bad --batch-size fails before any run
    plan = [(procedure, seed) for seed in seeds for procedure in procedures]
    log.info(
        "%d runs (%d procedure(s) x %d seed(s)) of %s on %s into %s",
        len(plan),
        len(procedures),
        len(seeds),
        experiment.model,
        experiment.dataset,
        root,
    )
    runs: Dict[Tuple[str, int], RunResult] = {}
    clock = RunClock()
    for index, (procedure, seed) in enumerate(plan, start=1):
        log.info("run %d/%d: %s seed %d ...", index, len(plan), procedure, seed)
        parent = baseline_root if procedure == BASELINE and baseline_root is not None else root
        started = time.perf_counter()
        run = train_run(
            experiment, procedure, seed, Path(parent) / run_dir_name(procedure, seed), options, data
        )
        if not run.reused:
            clock.add(procedure, time.perf_counter() - started)
        runs[procedure, seed] = run
        left = clock.left([procedure for procedure, _ in plan[index:]])
        suffix = "" if left is None else f"; about {duration_text(left)} left"
        log.info("[%d/%d] %s%s", index, len(plan), run_line(experiment, run), suffix)
    return summarize(experiment, procedures, seeds, runs)


class RunClock:
    """The wall-clock seconds of the runs trained so far, per procedure, and what they predict for the
    runs still to come (runs found finished and reused take no time and are not counted)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, List[float]] = {}

    def add(self, procedure: str, seconds: float) -> None:
        self.seconds.setdefault(procedure, []).append(seconds)

    def left(self, procedures: Sequence[str]) -> Optional[float]:
        """Seconds that runs of ``procedures`` will take: each at the mean of its procedure's runs so far,
        or of all runs so far for a procedure not yet trained; ``None`` before any run or when none is
        left."""
        every = [seconds for runs in self.seconds.values() for seconds in runs]
        if not every or not procedures:
            return None
        overall = math.fsum(every) / len(every)
        mean = {procedure: math.fsum(runs) / len(runs) for procedure, runs in self.seconds.items()}
        return math.fsum(mean.get(procedure, overall) for procedure in procedures)


def duration_text(seconds: float) -> str:
    """``seconds`` for a person: ``40 s``, ``3.5 min``, ``12.0 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


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
