"""Figures of a comparison: test accuracy per epoch (the paper's Figs. 1-9) and the alphas per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def _figure(panels: int, width: float = 5.5, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    figure = Figure(figsize=(width * panels, height), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _curves(result: dict, procedure: str, key) -> np.ndarray:
    """``key(record)`` per epoch (columns) and seed (rows), cut to the shortest run."""
    runs = result["runs"][procedure].values()
    epochs = min(len(run["history"]) for run in runs)
    return np.array([[key(record) for record in run["history"][:epochs]] for run in runs], dtype=float)


def _title(result: dict) -> str:
    seeds = len(result["seeds"])
    return f"{result['model']} on {result['dataset']} (mean over {seeds} seed{'s' * (seeds > 1)})"


def plot_accuracy(result: dict, path: Path) -> Path:
    """Test accuracy (and top-5 when reported) and train loss per epoch, mean ± std band over seeds."""
    panels = [
        (metric, f"test {metric.replace('test_', '').replace('acc', 'accuracy')} (%)")
        for metric in result["metrics"]
    ] + [("train_loss", "train loss")]
    figure, axes = _figure(len(panels))
    for axis, (metric, label) in zip(axes, panels):
        for procedure in result["procedures"]:
            values = _curves(result, procedure, lambda record, m=metric: record[m])
            epochs = np.arange(1, values.shape[1] + 1)
            mean = values.mean(axis=0)
            axis.plot(epochs, mean, marker="o" if len(epochs) < 15 else None, label=procedure)
            if values.shape[0] > 1:
                std = values.std(axis=0, ddof=1)
                axis.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(_title(result))
    figure.savefig(path, dpi=120)
    return path


def plot_alphas(result: dict, path: Path) -> Optional[Path]:
    """One panel per MLTP procedure: each layer's alpha at the end of each epoch (mean over seeds).

    Returns ``None`` (and writes nothing) when no procedure learns alphas.
    """
    procedures = [
        procedure
        for procedure in result["procedures"]
        if all("alphas" in run["history"][0] for run in result["runs"][procedure].values())
    ]
    if not procedures:
        return None
    figure, axes = _figure(len(procedures), width=4.5)
    for axis, procedure in zip(axes, procedures):
        first_run = next(iter(result["runs"][procedure].values()))
        for layer in first_run["history"][0]["alphas"]:
            values = _curves(result, procedure, lambda record, name=layer: np.mean(record["alphas"][name]))
            epochs = np.arange(1, values.shape[1] + 1)
            axis.plot(epochs, values.mean(axis=0), marker="o" if len(epochs) < 15 else None, label=layer)
        axis.set_title(procedure)
        axis.set_xlabel("epoch")
        axis.set_ylabel("alpha")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"alpha per layer, {_title(result)}")
    figure.savefig(path, dpi=120)
    return path
