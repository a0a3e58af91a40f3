"""The comparison figures: what the lines and bands show, one colour per layer, a readable grid."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba

from torch_mltp.experiments.plots import (
    MAX_COLUMNS,
    PANEL_SIZE,
    accuracy_figure,
    alphas_figure,
    band_label,
    budget_figure,
    gradient_cosine_figure,
    plot_accuracy,
    plot_alphas,
    plot_gradient_cosine,
)


def fake_result(layers_per_procedure: dict, seeds=(0, 1, 2), epochs: int = 4, cosines=()) -> dict:
    """A ``summarize``-shaped result whose numbers are simple functions of (procedure, seed, epoch, layer);
    the procedures in ``cosines`` measured the gradient cosine."""
    runs = {}
    for p, (procedure, layers) in enumerate(layers_per_procedure.items()):
        runs[procedure] = {}
        for seed in seeds:
            history = []
            for epoch in range(1, epochs + 1):
                record = {
                    "epoch": epoch,
                    "test_acc": 50.0 + 10 * epoch + 3 * seed**2 + p,
                    "train_loss": 2.0 / epoch + 0.1 * seed,
                }
                if procedure in cosines:
                    record["grad_cosine"] = 0.05 * p + 0.4 / epoch + 0.02 * seed**2
                if layers:
                    record["alphas"] = {
                        layer: 1e-3 * (k + 1) * epoch + 1e-4 * seed for k, layer in enumerate(layers)
                    }
                history.append(record)
            runs[procedure][str(seed)] = {"run_dir": f"{procedure}-seed{seed}", "history": history}
    return {
        "dataset": "mnist1d",
        "model": "mnist1d_cnn",
        "procedures": list(layers_per_procedure),
        "seeds": list(seeds),
        "metrics": ["test_acc"],
        "runs": runs,
    }


CNN_LAYERS = ["conv1", "conv2", "conv3", "linear"]
FIVE_PROCEDURES = {
    "standard": None,
    "mltp": CNN_LAYERS,
    "mltp_conv": CNN_LAYERS[:3],
    "mltp_fc": ["linear"],
    "mltp_fo": CNN_LAYERS,
}


def lines_by_label(axis) -> dict:
    return {line.get_label(): line for line in axis.get_lines()}


def test_accuracy_lines_are_means_and_bands_one_sample_sd_named_in_the_legend():
    result = fake_result(FIVE_PROCEDURES)
    figure = accuracy_figure(result)
    accuracy_axis, loss_axis = [axis for axis in figure.axes if axis.get_visible()]
    legend = [text.get_text() for text in accuracy_axis.get_legend().get_texts()]
    assert legend == [*FIVE_PROCEDURES, "band: mean ± 1 sd over 3 seeds"]
    assert band_label(3) in legend

    # mltp (p = 1), epoch 2: test_acc = 71 + 3 seed² over the seeds 0, 1, 2
    values = [71.0 + 3 * seed**2 for seed in (0, 1, 2)]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    line = lines_by_label(accuracy_axis)["mltp"]
    assert line.get_ydata()[1] == pytest.approx(mean)
    bands = [c for c in accuracy_axis.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(FIVE_PROCEDURES)
    band = bands[1].get_paths()[0].vertices  # the second procedure's band, as drawn
    at_epoch_2 = sorted(y for x, y in band if x == 2)
    assert at_epoch_2[0] == pytest.approx(mean - sd) and at_epoch_2[-1] == pytest.approx(mean + sd)
    assert lines_by_label(loss_axis)["standard"].get_ydata()[3] == pytest.approx(0.5 + 0.1)


def test_one_seed_has_no_band_and_no_band_entry():
    figure = accuracy_figure(fake_result({"standard": None, "mltp": CNN_LAYERS}, seeds=(0,)))
    axis = figure.axes[0]
    assert not [c for c in axis.collections if isinstance(c, PolyCollection)]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["standard", "mltp"]
    assert figure.get_suptitle().endswith("mean over 1 seed")


def test_a_layer_has_the_same_colour_in_every_panel():
    figure = alphas_figure(fake_result(FIVE_PROCEDURES))
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert list(panels) == ["mltp", "mltp_conv", "mltp_fc", "mltp_fo"]
    colours = {}
    for axis in panels.values():
        for label, line in lines_by_label(axis).items():
            colours.setdefault(label, set()).add(to_rgba(line.get_color()))
    assert set(colours) == set(CNN_LAYERS)
    assert all(len(seen) == 1 for seen in colours.values()), colours
    assert len({next(iter(seen)) for seen in colours.values()}) == len(CNN_LAYERS)
    # mltp_fc has only the linear layer: the colour it has where all four layers are drawn
    assert to_rgba(lines_by_label(panels["mltp_fc"])["linear"].get_color()) == to_rgba(
        lines_by_label(panels["mltp"])["linear"].get_color()
    )
    # the line is the mean over the seeds: 2e-3 * epoch + 1e-4 * mean(0, 1, 2)
    ydata = lines_by_label(panels["mltp_conv"])["conv2"].get_ydata()
    np.testing.assert_allclose(ydata, [2e-3 * epoch + 1e-4 for epoch in (1, 2, 3, 4)])


def test_many_layers_are_coloured_by_depth_with_a_colour_bar():
    layers = [f"layer{k}" for k in range(41)]
    figure = alphas_figure(fake_result({"mltp_fo": layers, "mltp_fc": layers[-1:]}))
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_title()}
    assert all(axis.get_legend() is None for axis in panels.values())
    colour_bars = [axis for axis in figure.axes if "layer index: 0 = layer0," in axis.get_ylabel()]
    assert len(colour_bars) == 1 and "40 = layer40" in colour_bars[0].get_ylabel()
    fo = lines_by_label(panels["mltp_fo"])
    assert len({to_rgba(line.get_color()) for line in fo.values()}) == 41
    fc_colour = to_rgba(lines_by_label(panels["mltp_fc"])["layer40"].get_color())
    assert fc_colour == to_rgba(fo["layer40"].get_color())


@pytest.mark.parametrize(("procedures", "grid"), [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (5, (2, 3))])
def test_alpha_panels_form_a_grid_of_at_most_three_columns(procedures, grid, tmp_path):
    result = fake_result({f"mltp{k}": CNN_LAYERS for k in range(procedures)})
    figure = alphas_figure(result)
    shown = [axis for axis in figure.axes if axis.get_visible()]
    assert len(shown) == procedures
    rows, columns = grid
    assert columns <= MAX_COLUMNS
    assert shown[0].get_subplotspec().get_gridspec().get_geometry() == grid
    width, height = figure.get_size_inches()
    assert width / height == pytest.approx((columns * PANEL_SIZE[0]) / (rows * PANEL_SIZE[1]))
    path = plot_alphas(result, tmp_path / "alphas.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written_and_no_alphas_figure_without_mltp(tmp_path):
    result = fake_result({"standard": None})
    assert plot_alphas(result, tmp_path / "alphas.png") is None
    assert not (tmp_path / "alphas.png").exists()
    assert plot_accuracy(result, tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_cosine_lines_are_means_with_standard_error_bands_in_the_procedures_colours(tmp_path):
    measured = ["standard", "mltp", "mltp_fo"]
    result = fake_result(FIVE_PROCEDURES, cosines=measured)
    figure = gradient_cosine_figure(result)
    (axis,) = [axis for axis in figure.axes if axis.get_visible()]
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert legend == [*measured, "band: mean ± 1 standard error over 3 seeds"]  # not mltp_conv, mltp_fc
    # mltp_fo is procedure 4: 0.2 + 0.4 / epoch + 0.02 seed² over the seeds 0, 1, 2
    values = [[0.2 + 0.4 / epoch + 0.02 * seed**2 for seed in (0, 1, 2)] for epoch in (1, 2, 3, 4)]
    line = lines_by_label(axis)["mltp_fo"]
    np.testing.assert_allclose(line.get_ydata(), [statistics.mean(v) for v in values])
    band = [c for c in axis.collections if isinstance(c, PolyCollection)][2].get_paths()[0].vertices
    at_epoch_3 = sorted(y for x, y in band if x == 3)
    standard_error = statistics.stdev(values[2]) / math.sqrt(3)
    assert at_epoch_3[0] == pytest.approx(statistics.mean(values[2]) - standard_error)
    assert at_epoch_3[-1] == pytest.approx(statistics.mean(values[2]) + standard_error)
    accuracy_lines = lines_by_label(accuracy_figure(result).axes[0])
    for procedure in measured:  # a procedure has the same colour as in the accuracy figure
        assert to_rgba(lines_by_label(axis)[procedure].get_color()) == to_rgba(
            accuracy_lines[procedure].get_color()
        )
    assert "mnist1d_cnn on mnist1d, mean over 3 seeds" in figure.get_suptitle()
    assert plot_gradient_cosine(result, tmp_path / "cosine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_gradient_cosine_figure_without_measurements(tmp_path):
    result = fake_result({"standard": None, "mltp": CNN_LAYERS}, cosines=["mltp"])
    del result["runs"]["mltp"]["1"]["history"][2]["grad_cosine"]  # one epoch of one run not measured
    assert gradient_cosine_figure(result) is None
    assert plot_gradient_cosine(result, tmp_path / "cosine.png") is None
    assert not (tmp_path / "cosine.png").exists()


def test_the_budget_figure_labels_its_step_axis_at_the_budgets_under_one_legend():
    def row(budget, steps):
        return {
            "budget": budget,
            "steps": steps,
            "val_acc": {"per_seed": [90.0, 91.0]},
            "test_acc": {"per_seed": [89.0, 90.0]},
        }

    rows = [row("0.5x", 600), row("1x", 1200), row("authors", 6000)]
    figure = budget_figure({"mnist1d_cnn": {"n1000": {"rows": rows, "budget": rows[1]}}})
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    assert [label.get_text() for label in axis.get_xticklabels()] == [
        "600",
        "1,200",
    ]  # not the authors' 6,000
    assert [label.get_text() for label in axis.get_xticklabels(minor=True)] == [""] * len(
        axis.get_xticklabels(minor=True)
    )
    assert axis.get_legend() is None and len(figure.legends) == 1
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert sorted(labels) == sorted(
        [
            "validation, recipe scaled",
            "validation, authors' recipe",
            "chosen",
            "test, recipe scaled",
            "test, authors' recipe",
        ]
    )
