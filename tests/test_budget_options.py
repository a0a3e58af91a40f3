"""The options that choose and equalise budgets: ``--val-fraction`` (a validation split carved from the
training samples) and ``--steps-scale`` (the same schedule stretched)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from torch_mltp.data import load_dataset
from torch_mltp.experiments.cli import main
from torch_mltp.experiments.loaders import training_subset, validation_split
from torch_mltp.experiments.recipes import recipe_for
from torch_mltp.experiments.runs import CHECKPOINT_FILE, ExperimentError
from torch_mltp.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def indices(subset):
    """The indices of the base data set that a (nested) ``Subset`` holds."""
    inner = getattr(subset.dataset, "indices", None)
    return [inner[i] for i in subset.indices] if inner is not None else list(subset.indices)


def test_the_validation_split_is_disjoint_deterministic_and_inside_the_training_subset():
    data = TensorDataset(torch.arange(4000))
    subset = training_subset(data, 1000)
    torch.manual_seed(123)  # the run seed plays no part
    train, validation = validation_split(subset, 0.1)
    torch.manual_seed(7)
    again_train, again_validation = validation_split(subset, 0.1)
    assert (len(train), len(validation)) == (900, 100)
    assert indices(train) == indices(again_train) and indices(validation) == indices(again_validation)
    assert not set(indices(train)) & set(indices(validation))
    assert set(indices(train)) | set(indices(validation)) == set(indices(subset))
    whole_train, whole_validation = validation_split(data, 0.1)
    assert (len(whole_train), len(whole_validation)) == (3600, 400)
    assert not set(whole_train.indices) & set(whole_validation.indices)
    assert validation_split(data, None) == (data, None)
    assert len(validation_split(data, 0.0125)[1]) == 50  # round(F * N), halves up
    for fraction, size in [(0.0001, 4000), (0.5, 3)]:
        with pytest.raises(ExperimentError, match="--val-fraction"):
            validation_split(TensorDataset(torch.arange(size)), fraction)


def test_a_run_with_a_validation_split_trains_without_it_and_reports_it(data_root, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--procedure",
        "standard",
        "--train-samples",
        "200",
        "--val-fraction",
        "0.1",
        "--epochs",
        "2",
    ]
    argv += ["--data-root", str(data_root), "--out", str(out), "--no-progress", "--cosine-every", "0"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["train_samples"] for record in records] == [180, 180]  # 200 minus the 20 held out
    assert all(0 <= record["val_acc"] <= 100 and record["val_loss"] > 0 for record in records)
    # the validation samples are the training set's, not the test set's: by hand on the 20 held out
    model = build_model("mnist1d_cnn")
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    data = load_dataset("mnist1d", str(data_root))
    _, held_out = validation_split(training_subset(data.train, 200), 0.1)
    x = torch.stack([held_out[i][0] for i in range(len(held_out))])
    y = torch.tensor([held_out[i][1] for i in range(len(held_out))])
    with torch.no_grad():
        accuracy = 100.0 * (model(x).argmax(dim=1) == y).float().mean().item()
    assert records[-1]["val_acc"] == pytest.approx(accuracy)


def test_steps_scale_stretches_the_schedule():
    recipe = recipe_for("mnist1d", "mnist1d_cnn")
    assert (recipe.epochs, recipe.milestones) == (100, (70,))
    assert recipe.scaled(1.53).epochs == 153 and recipe.scaled(1.53).milestones == (107,)
    assert recipe.scaled(0.5).epochs == 50 and recipe.scaled(0.5).milestones == (35,)
    low_data = recipe.replace(epochs=150, milestones=(100,))
    assert (low_data.scaled(2.64).epochs, low_data.scaled(2.64).milestones) == (396, (264,))
    assert recipe.replace(epochs=3, milestones=(1,)).scaled(0.5).epochs == 2  # 1.5: halves round up
    assert recipe.replace(epochs=1).scaled(0.1).epochs == 1  # at least one epoch
    assert recipe.scaled(1.0) == recipe
    with pytest.raises(ValueError, match="steps scale"):
        recipe.scaled(0.0)


def test_a_scaled_run_takes_the_scaled_number_of_steps(data_root, tmp_path):
    out = tmp_path / "scaled"
    argv = ["train", "--procedure", "standard", "--epochs", "2", "--milestones", "1", "--steps-scale", "2.5"]
    argv += ["--limit-train-batches", "3", "--limit-test-batches", "1", "--cosine-every", "0"]
    argv += ["--data-root", str(data_root), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["experiment"]["recipe"]["epochs"], config["experiment"]["recipe"]["milestones"]) == (
        5,
        [3],
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["lr"] for record in records] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-3])
    adam_state = torch.load(out / CHECKPOINT_FILE, weights_only=True)["optimizer"]["state"][0]
    assert adam_state["step"].item() == 5 * 3  # 5 epochs of 3 steps: 2.5 x the 2 epochs asked for
    with pytest.raises(SystemExit):
        main(["train", "--steps-scale", "0", "--out", str(tmp_path / "refused")])
    with pytest.raises(SystemExit):
        main(["train", "--val-fraction", "1", "--out", str(tmp_path / "refused")])
