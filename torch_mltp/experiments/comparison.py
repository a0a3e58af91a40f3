"""Procedures x seeds on one experiment: the runs, a Table-I-style summary, results.json and figures."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch_mltp.data import DataSplits, load_dataset

from . import distributed, loaders
from .loaders import split_training
from .loop import metric_name
from .plots import plot_accuracy, plot_alphas, plot_gradient_cosine
from .stats import MAX_EXACT_SIGN_FLIPS, SIGN_FLIP_DRAWS, mean_std, paired_difference
from .tables import interval_text, markdown, mean_sd_text, p_text
from .training import Experiment, RunOptions, RunResult, check_procedures, train_run, versions

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


def _difference(baseline: dict, entry: dict) -> dict:
    """The paired difference of ``entry`` to the baseline's (same seed), as :func:`paired_difference`."""
    return paired_difference(baseline["per_seed"], entry["per_seed"], CONFIDENCE).to_dict()


def _run_record(run: RunResult) -> dict:
    return {"run_dir": str(run.run_dir), "history": run.history}


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
        for metric in metrics:
            finals = [runs[procedure, seed].final[metric] for seed in seeds]
            mean, std = mean_std(finals)
            summary[procedure][metric] = {
                "per_seed": finals,
                "mean": mean,
                "std": std,
                "diff_vs_standard": None,
            }
    baseline = summary.get(BASELINE)
    for procedure, entries in summary.items():
        if baseline is None or procedure == BASELINE:
            continue
        for metric in metrics:
            entries[metric]["diff_vs_standard"] = _difference(baseline[metric], entries[metric])
        if entries["grad_cosine"] is not None and baseline["grad_cosine"] is not None:
            entries["grad_cosine"]["diff_vs_standard"] = _difference(
                baseline["grad_cosine"], entries["grad_cosine"]
            )
    run_records = {
        procedure: {str(seed): _run_record(runs[procedure, seed]) for seed in seeds}
        for procedure in procedures
    }
    return {
        "dataset": experiment.dataset,
        "model": experiment.model,
        "experiment": experiment.to_dict(),
        "procedures": list(procedures),
        "seeds": list(seeds),
        "metrics": metrics,
        "summary": summary,
        "versions": versions(),
        "runs": run_records,
    }


def _metric_cells(entry: dict) -> List[str]:
    """Mean ± std, the paired difference to standard and its two p-values."""
    difference = entry["diff_vs_standard"]
    if difference is None:
        return [mean_sd_text(entry["per_seed"]), "—", "—", "—"]
    single = " (1 seed: no interval)" if difference["low"] is None else ""
    return [
        mean_sd_text(entry["per_seed"]),
        interval_text(difference) + single,
        p_text(difference["p_t"]),
        p_text(difference["p_sign_flip"] if difference["n"] > 1 else None),  # one pair: always p = 1
    ]


def _cosine_text(entry: Optional[dict]) -> str:
    if entry is None:
        return "—"
    difference = entry.get("diff_vs_standard")
    if difference is None or difference["low"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ({interval_text(difference, 3)})"


def _negative_alphas_text(entry: Optional[dict]) -> str:
    return "—" if entry is None else f"{entry['during']} / {entry['at_end']} of {entry['runs']}"


def _time_text(entry: Optional[dict], baseline: Optional[dict]) -> str:
    if entry is None:
        return "—"
    ratio = f" (×{entry['mean'] / baseline['mean']:.2f})" if baseline and baseline["mean"] > 0 else ""
    return f"{entry['mean']:.1f}{ratio}"


_METRIC_TITLES = {"test_acc": "top-1", "test_top5": "top-5"}


def _header(metrics: Sequence[str], first_column: str, reported: bool) -> List[str]:
    header = [first_column, "procedure"]
    for title in (_METRIC_TITLES.get(metric, metric) for metric in metrics):
        header += [
            f"test {title} (%)",
            f"Δ {title} vs standard [{CONFIDENCE:.0%} CI]",
            "p (t)",
            "p (sign-flip)",
        ]
        header += [f"paper {title}"] if reported else []
    return [*header, "grad cosine (Δ [CI])", "runs with α < 0: during / at end", "train s/run (× standard)"]


def _row(result: dict, procedure: str, reported) -> List[str]:
    summary = result["summary"][procedure]
    cells = [result.get("label", result["model"]), procedure]
    paper = reported.get((result["model"], procedure), ()) if reported is not None else None
    for index, metric in enumerate(result["metrics"]):
        cells += _metric_cells(summary[metric])
        if paper is not None:
            cells.append(f"{paper[index]:.1f}" if index < len(paper) else "—")
    return [
        *cells,
        _cosine_text(summary.get("grad_cosine")),
        _negative_alphas_text(summary.get("negative_alphas")),
        _time_text(summary.get("train_time_s"), result["summary"].get(BASELINE, {}).get("train_time_s")),
    ]


def _table_note(seeds: Sequence[int]) -> str:
    flips = (
        "exact over every sign pattern"
        if len(seeds) <= MAX_EXACT_SIGN_FLIPS
        else f"over {SIGN_FLIP_DRAWS} random sign patterns"
    )
    return (
        f"Final-epoch test accuracy over {len(seeds)} seed(s) {tuple(seeds)}: mean ± sample std (n − 1). "
        f"Δ: mean of the paired differences to standard (same seed) with a {CONFIDENCE:.0%} Student-t "
        "interval (n − 1 degrees of freedom); two-sided p-values of a paired t-test and of a sign-flip "
        f"permutation test ({flips}). Grad cosine: cosine similarity of the two half "
        "batches' gradients at the same weights, averaged over the measured steps of each epoch, the "
        "epochs and the seeds; in brackets the mean paired difference to standard with its interval. "
        "α < 0: runs in which some layer's alpha was below 0 at the end of some epoch, and at the end of "
        "training. Train s/run: seconds of training per run (without test evaluation and "
        "the cosine measurements), mean over the seeds, and its ratio to standard training's."
    )


def markdown_table(
    results: Sequence[dict],
    reported: Optional[Dict[Tuple[str, str], Tuple[float, ...]]] = None,
    first_column: str = "model",
) -> str:
    """One row per (model, procedure) of the ``summarize`` outputs in ``results``.

    ``reported``: the paper's accuracies per (model, procedure), shown in extra columns.
    ``first_column``: its header; a result's ``"label"`` (else its model) fills it.
    """
    header = _header(results[0]["metrics"], first_column, reported is not None)
    rows = [_row(result, procedure, reported) for result in results for procedure in result["procedures"]]
    return f"{markdown(header, rows)}\n\n{_table_note(results[0]['seeds'])}\n"


def write_outputs(root: Path, results: Sequence[dict], reported=None, figures: bool = True) -> List[Path]:
    """Write results.json and table.md under ``root`` (and, for one experiment, the figures)."""
    root.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else {"experiments": list(results)}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "table.md").write_text(markdown_table(results, reported))
    written = [root / "results.json", root / "table.md"]
    if figures:
        result = results[0]
        plotted = [plot_accuracy(result, root / "accuracy.png"), plot_alphas(result, root / "alphas.png")]
        plotted.append(plot_gradient_cosine(result, root / "grad_cosine.png"))
        written += [path for path in plotted if path is not None]
    return written


def compare(
    experiment: Experiment,
    procedures: Sequence[str],
    seeds: Sequence[int],
    root: Path,
    options: RunOptions,
    data: Optional[DataSplits] = None,
    baseline_root: Optional[Path] = None,
    progress: Optional[Progress] = None,
    label: Optional[str] = None,
) -> dict:
    """Train every procedure with every seed under ``root`` and return the summary (:func:`summarize`).

    Runs already finished with the same settings are reused, interrupted ones resumed. The standard
    runs live under ``baseline_root`` when it is given (default ``root``): standard training does not
    depend on the MLTP settings, so comparisons that differ only in those can share them. ``progress``:
    the progress of a larger plan that these runs are part of (default: these runs alone); ``label``: the
    runs' name in its lines (default: the data set, the model and the procedure).
    """
    if len(set(seeds)) != len(seeds) or len(set(procedures)) != len(procedures):
        raise ValueError("procedures and seeds must not repeat")
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)
    check_procedures(experiment, procedures, data)
    split_training(data, experiment, distributed.current())  # a bad --batch-size fails before any run
    plan = [(procedure, seed) for seed in seeds for procedure in procedures]
    if progress is None:
        size = f"{len(plan)} runs ({len(procedures)} procedure(s) x {len(seeds)} seed(s))"
        log.info("%s of %s on %s into %s", size, experiment.model, experiment.dataset, root)
        progress = Progress()
        progress.plan([(procedure, run_steps(experiment, data)) for procedure, _ in plan])
    runs: Dict[Tuple[str, int], RunResult] = {}
    for procedure, seed in plan:
        parent = baseline_root if procedure == BASELINE and baseline_root is not None else root
        name = label or f"{experiment.dataset} {experiment.model} {procedure}"
        folder = Path(parent) / run_dir_name(procedure, seed)
        runs[procedure, seed] = progress.train(experiment, procedure, seed, folder, options, data, name)
    return summarize(experiment, procedures, seeds, runs)


def run_steps(experiment: Experiment, data: DataSplits) -> int:
    """The training steps of one run of ``experiment`` on ``data`` (:func:`.loaders.run_steps`)."""
    return loaders.run_steps(experiment.recipe, len(data.train), experiment.limit_train_batches)


class Progress:
    """The runs of a plan, trained in order, each with a line as it starts and as it ends; the second says
    how long the runs still to come (:meth:`plan`) will take: their steps times the seconds per step of
    their procedure as measured by its runs so far (wall clock, evaluation included), else as
    ``step_seconds`` say (:func:`.cost.step_costs`) times how much longer than they said the runs so far
    took, else as all runs so far took. Runs found finished and reused are not timed."""

    def __init__(self, step_seconds: Optional[Dict[str, float]] = None):
        self.step_seconds = step_seconds or {}
        self.done = 0
        self.upcoming: List[Tuple[str, int]] = []
        self.measured: Dict[str, List[Tuple[float, int]]] = {}  # per procedure: (seconds, steps) per run

    def plan(self, upcoming: Sequence[Tuple[str, int]]) -> None:
        """The runs still to come, the next first, as (procedure, training steps)."""
        self.upcoming = list(upcoming)

    @property
    def total(self) -> int:
        return self.done + len(self.upcoming)

    def left(self) -> Optional[float]:
        """Seconds the runs still to come will take; ``None`` when nothing says."""
        every = [run for runs in self.measured.values() for run in runs]
        costed = [run for p, runs in self.measured.items() if p in self.step_seconds for run in runs]
        predicted = math.fsum(
            self.step_seconds[p] * steps
            for p, runs in self.measured.items()
            if p in self.step_seconds
            for _, steps in runs
        )
        slowdown = _seconds(costed) / predicted if predicted > 0 else 1.0
        seconds = []
        for procedure, steps in self.upcoming:
            rate = _per_step(self.measured.get(procedure, []))
            if rate is None and procedure in self.step_seconds:
                rate = self.step_seconds[procedure] * slowdown
            rate = _per_step(every) if rate is None else rate
            if rate is None:
                return None
            seconds.append(rate * steps)
        return math.fsum(seconds)

    def train(
        self,
        experiment: Experiment,
        procedure: str,
        seed: int,
        folder: Path,
        options: RunOptions,
        data: DataSplits,
        label: str,
    ) -> RunResult:
        """One run (:func:`.training.train_run`) and its two lines."""
        log.info("run %d/%d: %s seed %d ...", self.done + 1, self.total, label, seed)
        started = time.perf_counter()
        run = train_run(experiment, procedure, seed, folder, options, data)
        steps = self.upcoming.pop(0)[1] if self.upcoming else run_steps(experiment, data)
        if not run.reused:
            self.measured.setdefault(procedure, []).append((time.perf_counter() - started, steps))
        self.done += 1
        left = self.left()
        suffix = "" if left is None or not self.upcoming else f"; about {duration_text(left)} left"
        log.info(
            "[%d/%d] %s seed %d: %s (%s)%s",
            self.done,
            self.total,
            label,
            seed,
            _result_text(run),
            run.run_dir,
            suffix,
        )
        return run


def _seconds(runs: Sequence[Tuple[float, int]]) -> float:
    return math.fsum(seconds for seconds, _ in runs)


def _per_step(runs: Sequence[Tuple[float, int]]) -> Optional[float]:
    steps = sum(steps for _, steps in runs)
    return _seconds(runs) / steps if steps else None


def duration_text(seconds: float) -> str:
    """``seconds`` for a person: ``40 s``, ``3.5 min``, ``12.0 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _result_text(run: RunResult) -> str:
    """A finished run's final test (and validation) accuracy and how long it trained, or that it was
    found finished in its folder with the same settings and reused."""
    final = run.final
    validation = f", val acc {final['val_acc']:.2f}%" if "val_acc" in final else ""
    result = f"test acc {final['test_acc']:.2f}%{validation} after {final['epoch']} epochs"
    if run.reused:
        return f"reused, {result}"
    seconds = sum(record["epoch_time_s"] + record["eval_time_s"] for record in run.history)
    return f"{result}, {duration_text(seconds)}"
