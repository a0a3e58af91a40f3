"""Figures of a comparison: test accuracy per epoch (the paper's Figs. 1-9), the alphas per layer and
the gradient cosine of the two tasks per epoch.

Each figure is a grid of panels, at most three per row. Lines are means over the seeds; where a
figure has a band, its legend says what the band is.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .stats import mean_std

MAX_COLUMNS = 3
PANEL_SIZE = (4.8, 3.6)  # inches per panel
DPI = 130
MAX_LEGEND_LAYERS = 10  # more layers than this are coloured by depth, with a colour bar instead of a legend
DEPTH_COLOURMAP = "viridis"
FONTS = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
}


def _grid(panels: int, figsize: Optional[tuple] = None):
    """A figure of ``panels`` panels, at most :data:`MAX_COLUMNS` per row, rows filled evenly, each
    :data:`PANEL_SIZE` unless ``figsize`` is given.

    Returns the figure and the list of the ``panels`` axes in use (the unused cells are hidden).
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    rows = math.ceil(panels / MAX_COLUMNS)
    columns = math.ceil(panels / rows)
    figure = Figure(figsize=figsize or (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def _legend_below(figure, axis) -> None:
    """One legend for the figure, under its panels, with the entries of ``axis``."""
    figure.legend(*axis.get_legend_handles_labels(), loc="outside lower center", ncols=4)


def _in_fonts(function: Callable) -> Callable:
    """``function`` run under :data:`FONTS`: titles, labels and legends take their sizes when they are made,
    tick labels when the figure is drawn."""

    @functools.wraps(function)
    def in_fonts(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(FONTS):
            return function(*args, **kwargs)

    return in_fonts


def _writer(make: Callable[[dict], object]) -> Callable[[dict, Path], Optional[Path]]:
    """``plot(data, path)``: write the figure ``make(data)`` to ``path`` and return ``path``; ``None``,
    writing nothing, when ``make`` draws no figure."""

    def plot(data: dict, path: Path) -> Optional[Path]:
        figure = make(data)
        if figure is None:
            return None
        _in_fonts(figure.savefig)(path, dpi=DPI)
        return path

    plot.__doc__ = f"Write :func:`{make.__name__}` to ``path``; ``None``, writing nothing, if it draws none."
    return plot


def _curves(result: dict, procedure: str, key) -> np.ndarray:
    """``key(record)`` per epoch (columns) and seed (rows), cut to the shortest run."""
    runs = result["runs"][procedure].values()
    epochs = min(len(run["history"]) for run in runs)
    return np.array([[key(record) for record in run["history"][:epochs]] for run in runs], dtype=float)


def _title(result: dict) -> str:
    seeds = len(result["seeds"])
    return f"{result['model']} on {result['dataset']}, mean over {seeds} seed{'s' * (seeds != 1)}"


def _epoch_axis(axis, ylabel: str, epochs: int) -> None:
    """Label ``axis``; ticks on whole epochs, no offset notation on the values."""
    from matplotlib.ticker import MaxNLocator

    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    if epochs <= 12:
        axis.set_xticks(range(1, epochs + 1))
    else:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.ticklabel_format(axis="y", useOffset=False)
    axis.grid(alpha=0.3)


BAND_SPREADS = {"sd": "1 sd", "se": "1 standard error"}
"""The half widths a band can have: the sample standard deviation over the seeds (n − 1), or the standard
error of their mean (sd / √n)."""


def band_label(seeds: int, spread: str = "sd") -> str:
    """What a shaded band shows: ``sd`` in :func:`accuracy_figure`, ``se`` in
    :func:`gradient_cosine_figure`."""
    return f"band: mean ± {BAND_SPREADS[spread]} over {seeds} seeds"


def _mean_line(axis, values: np.ndarray, colour, label: str, spread: Optional[str] = None) -> int:
    """Plot the mean over the rows of ``values`` (seeds x epochs), with markers up to 14 epochs, and, given a
    ``spread`` and more than one row, a band of ± one ``spread`` (:data:`BAND_SPREADS`); returns the
    number of epochs."""
    epochs = np.arange(1, values.shape[1] + 1)
    mean = values.mean(axis=0)
    axis.plot(epochs, mean, marker="o" if len(epochs) < 15 else None, color=colour, label=label)
    seeds = values.shape[0]
    if spread is not None and seeds > 1:
        half_width = values.std(axis=0, ddof=1) / (np.sqrt(seeds) if spread == "se" else 1.0)
        axis.fill_between(epochs, mean - half_width, mean + half_width, color=colour, alpha=0.15, linewidth=0)
    return len(epochs)


def _legend_with_band(axis, seeds: int, spread: str = "sd", **placement) -> None:
    from matplotlib.patches import Patch

    handles, labels = axis.get_legend_handles_labels()
    if seeds > 1:
        handles.append(Patch(facecolor="grey", alpha=0.3))
        labels.append(band_label(seeds, spread))
    axis.legend(handles, labels, **placement)


def _procedure_colour(index: int) -> str:
    """The colour of the ``index``-th procedure of a comparison, the same in every figure."""
    return f"C{index % 10}"


@_in_fonts
def accuracy_figure(result: dict):
    """Test accuracy (and top-5 when reported) and train loss per epoch.

    Lines: mean over the seeds; with more than one seed a band of ± one sample standard deviation
    (n − 1), named in the legend.
    """
    panels = [
        (metric, f"test {metric.replace('test_', '').replace('acc', 'accuracy')} (%)")
        for metric in result["metrics"]
    ] + [("train_loss", "train loss")]
    figure, axes = _grid(len(panels))
    for axis, (metric, label) in zip(axes, panels):
        for index, procedure in enumerate(result["procedures"]):
            values = _curves(result, procedure, lambda record, m=metric: record[m])
            epochs = _mean_line(axis, values, _procedure_colour(index), procedure, "sd")
        _epoch_axis(axis, label, epochs)
    _legend_with_band(axes[0], len(result["seeds"]))
    figure.suptitle(_title(result))
    return figure


def _procedures_logging(result: dict, logged: Callable[[List[dict]], bool]) -> List[str]:
    """The procedures of ``result`` whose every run's history the test ``logged`` accepts."""
    runs = result["runs"]
    return [p for p in result["procedures"] if all(logged(run["history"]) for run in runs[p].values())]


def _layers(result: dict, procedure: str) -> List[str]:
    first_run = next(iter(result["runs"][procedure].values()))
    return list(first_run["history"][0]["alphas"])


def layer_order(result: dict, procedures: Sequence[str]) -> List[str]:
    """Every layer that has an alpha in any of ``procedures``, in the model's order.

    The procedure with the most layers gives the order; layers only the others have follow.
    """
    by_size = sorted(procedures, key=lambda procedure: -len(_layers(result, procedure)))
    return list(dict.fromkeys(layer for procedure in by_size for layer in _layers(result, procedure)))


def layer_colours(layers: Sequence[str]) -> Dict[str, tuple]:
    """One colour per layer name: the tab10 colours for a few layers, else by depth (viridis)."""
    import matplotlib

    if len(layers) <= MAX_LEGEND_LAYERS:
        cycle = matplotlib.colormaps["tab10"]
        return {layer: cycle(index) for index, layer in enumerate(layers)}
    depth = matplotlib.colormaps[DEPTH_COLOURMAP]
    return {layer: depth(index / (len(layers) - 1)) for index, layer in enumerate(layers)}


@_in_fonts
def alphas_figure(result: dict):
    """One panel per MLTP procedure: each layer's alpha at the end of each epoch (mean over seeds).

    A layer has the same colour in every panel. Up to ten layers are named in each panel's legend;
    more are coloured by depth, with a colour bar. ``None`` when no procedure learns alphas.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    procedures = _procedures_logging(result, lambda history: "alphas" in history[0])
    if not procedures:
        return None
    order = layer_order(result, procedures)
    colours = layer_colours(order)
    figure, axes = _grid(len(procedures))
    for axis, procedure in zip(axes, procedures):
        for layer in _layers(result, procedure):
            values = _curves(result, procedure, lambda record, name=layer: np.mean(record["alphas"][name]))
            epochs = _mean_line(axis, values, colours[layer], layer)
        axis.set_title(procedure)
        _epoch_axis(axis, "alpha", epochs)
        if len(order) <= MAX_LEGEND_LAYERS:
            axis.legend()
    if len(order) > MAX_LEGEND_LAYERS:
        mappable = ScalarMappable(Normalize(0, len(order) - 1), matplotlib.colormaps[DEPTH_COLOURMAP])
        bar = figure.colorbar(mappable, ax=axes, shrink=0.9)
        bar.set_label(f"layer index: 0 = {order[0]}, {len(order) - 1} = {order[-1]}")
    figure.suptitle(f"alpha per layer, {_title(result)}")
    return figure


@_in_fonts
def gradient_cosine_figure(result: dict):
    """The cosine similarity of the two tasks' gradients per epoch, one line per procedure that measured
    it in every epoch of every run (mean over the seeds; with more than one seed a band of ± one standard
    error of that mean, named in the legend: the procedures' spreads overlap, their means are what the
    figure compares). ``None`` when no procedure measured it.

    Each epoch's value is the mean over the steps measured in it (every ``cosine_every``-th step), both
    gradients taken at the same weights, so standard training has a curve too.
    """
    procedures = _procedures_logging(result, lambda history: all("grad_cosine" in r for r in history))
    if not procedures:
        return None
    # one wide panel, the legend beside it: the curves of all procedures lie close together
    figure, (axis,) = _grid(1, figsize=(2 * PANEL_SIZE[0], 1.2 * PANEL_SIZE[1]))
    for procedure in procedures:
        values = _curves(result, procedure, lambda record: record["grad_cosine"])
        colour = _procedure_colour(result["procedures"].index(procedure))
        epochs = _mean_line(axis, values, colour, procedure, "se")
    axis.axhline(0.0, color="black", linewidth=0.8, alpha=0.5)
    _epoch_axis(axis, "cos(∇L_i, ∇L_j) at the same w", epochs)
    _legend_with_band(axis, len(result["seeds"]), "se", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(f"gradient cosine of the two half batches, {_title(result)}")
    return figure


plot_accuracy = _writer(accuracy_figure)
plot_alphas = _writer(alphas_figure)
plot_gradient_cosine = _writer(gradient_cosine_figure)


# -- the confirmatory study ------------------------------------------------------------------------------


CHOSEN = {"marker": "o", "markersize": 14, "markerfacecolor": "none", "color": "black", "linestyle": "none"}
"""How the budget figure circles the chosen budget."""


def _error_bars(axis, rows: Sequence[dict], metric: str, **style) -> None:
    """Each row's mean ± 1 sd of ``metric`` over the seeds against its training steps."""
    points = [mean_std(row[metric]["per_seed"]) for row in rows]
    steps = [row["steps"] for row in rows]
    axis.errorbar(steps, [mean for mean, _ in points], yerr=[sd for _, sd in points], capsize=3, **style)


@_in_fonts
def budget_figure(choices: dict):
    """Standard training's final validation and test accuracy against its number of steps, one panel per
    model and regime: the recipe's schedule scaled (lines) and the MNIST-1D authors' recipe (squares);
    the chosen budget circled. Error bars: ± 1 sd over the tuning seeds. The steps axis is logarithmic,
    labelled at the scaled budgets only."""
    from matplotlib.ticker import NullFormatter

    panels = [(model, key, entry) for model, regimes in choices.items() for key, entry in regimes.items()]
    figure, axes = _grid(len(panels))
    for axis, (model, key, entry) in zip(axes, panels):
        scaled = [row for row in entry["rows"] if row["budget"] != "authors"]
        for colour, metric, label in (("C0", "val_acc", "validation"), ("C1", "test_acc", "test")):
            _error_bars(axis, scaled, metric, color=colour, marker="o", label=f"{label}, recipe scaled")
            for row in entry["rows"]:
                if row["budget"] == "authors":
                    authors = f"{label}, authors' recipe"
                    _error_bars(
                        axis, [row], metric, color=colour, marker="s", linestyle="none", label=authors
                    )
                if row["budget"] == entry["budget"]["budget"] and metric == "val_acc":
                    axis.plot(row["steps"], mean_std(row[metric]["per_seed"])[0], label="chosen", **CHOSEN)
        steps = [row["steps"] for row in scaled]
        axis.set_xscale("log")
        axis.set_xticks(steps, [f"{step:,}" for step in steps])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("training steps")
        axis.set_ylabel("final accuracy (%)")
        axis.set_title(f"{model}, {key}")
    _legend_below(figure, axes[0])
    seeds = len(panels[0][2]["rows"][0]["val_acc"]["per_seed"])
    figure.suptitle(f"Standard training against its budget, mean ± 1 sd over {seeds} tuning seeds")
    return figure


STANDARD_ARMS = ("standard", "standard at mltp_fo's cost", "standard at mltp's cost")


@_in_fonts
def cost_figure(analysis: dict):
    """Final test accuracy against the measured training time per run, one panel per model and regime: every
    arm at its mean over the seeds with ± 1 sd error bars in both directions, standard training's arms
    joined as a curve over their budgets."""
    panels = [
        (model, key, result["arms"])
        for model, regimes in analysis["families"].items()
        for key, result in regimes.items()
    ]
    figure, axes = _grid(len(panels))
    for axis, (model, key, arms) in zip(axes, panels):
        points = {
            name: (mean_std(arm["train_time_s"]), mean_std(arm["test_acc"])) for name, arm in arms.items()
        }
        curve = sorted((points[name] for name in STANDARD_ARMS), key=lambda point: point[0][0])
        times, accuracies = [x for (x, _), _ in curve], [y for _, (y, _) in curve]
        axis.plot(times, accuracies, color="grey", linestyle="--", label="standard over its budgets")
        for index, (name, ((x, x_sd), (y, y_sd))) in enumerate(points.items()):
            style = {"marker": "os^v<>Dp"[index % 8], "color": f"C{index % 10}", "linestyle": "none"}
            axis.errorbar(x, y, xerr=x_sd, yerr=y_sd, capsize=3, label=name, **style)
        axis.set_xlabel("training time per run (s)")
        axis.set_ylabel("final test accuracy (%)")
        axis.set_title(f"{model}, {key}")
    _legend_below(figure, axes[0])
    seeds = len(next(iter(panels[0][2].values()))["seeds"])
    figure.suptitle(f"Accuracy against cost, mean ± 1 sd over {seeds} seeds")
    return figure


@_in_fonts
def decision_figure(decision: dict):
    """Two panels of a decision (``decision.Decision.to_dict()``): each arm's final test accuracy per seed
    (dots) and mean; each comparison's paired differences per seed (dots), their mean and 95% interval."""
    arms, comparisons = decision["arms"], decision["comparisons"]
    figure, (arms_axis, differences_axis) = _grid(2)
    for row, arm in enumerate(arms.values()):
        values = arm["test_acc"]
        arms_axis.scatter(values, [row] * len(values), color=f"C{row % 10}", alpha=0.5)
        arms_axis.plot([math.fsum(values) / len(values)], [row], marker="|", markersize=18, color="black")
    arms_axis.set_yticks(range(len(arms)), [arm["label"] for arm in arms.values()])
    arms_axis.invert_yaxis()
    arms_axis.set_xlabel("final test accuracy (%)")
    for row, entry in enumerate(comparisons):
        treatment, baseline = arms[entry["treatment"]]["test_acc"], arms[entry["baseline"]]["test_acc"]
        per_seed = [t - b for t, b in zip(treatment, baseline)]
        differences_axis.scatter(per_seed, [row] * len(per_seed), color="grey", alpha=0.5)
        difference = entry["difference"]
        low, high = difference["low"], difference["high"]
        error = None if low is None else [[difference["mean"] - low], [high - difference["mean"]]]
        differences_axis.errorbar(difference["mean"], row, xerr=error, marker="o", color="C3", capsize=4)
    differences_axis.axvline(0.0, color="black", linewidth=0.8)
    labels = [f"{entry['treatment']} − {entry['baseline']}" for entry in comparisons]
    differences_axis.set_yticks(range(len(labels)), labels)
    differences_axis.invert_yaxis()
    differences_axis.set_xlabel("Δ test accuracy, points (95% CI)")
    setup = decision["setup"]
    figure.suptitle(f"{setup['model']} on {setup['dataset']}: {len(setup['seeds'])} paired seeds")
    return figure


plot_budget_curves = _writer(budget_figure)
plot_cost = _writer(cost_figure)
plot_decision = _writer(decision_figure)
