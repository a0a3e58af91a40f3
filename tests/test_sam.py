"""``--procedure sam``: pytorch-optimizer's SAM around the recipe's optimizer, stepped by the experiments'
training loop."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_mltp.experiments.cli import main
from torch_mltp.experiments.loop import TrainTally
from torch_mltp.experiments.optimizers import build_optimizer, training_step
from torch_mltp.experiments.recipes import recipe_for, unused_fields
from torch_mltp.experiments.training import Experiment, ExperimentError, RunOptions, train_run

SAM = pytest.importorskip("pytorch_optimizer").SAM

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(10, 6, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (10,), generator=generator
    )


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_one_sam_step_is_pytorch_optimizers_two_steps_and_the_hand_computation():
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(sam_rho=0.3, lr=0.05)
    model = tiny()
    x, y = batch()
    by_library, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    start = parameters(model)

    optimizer = build_optimizer(model, recipe, "sam")
    assert isinstance(optimizer, SAM) and isinstance(optimizer.base_optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["rho"] == 0.3 and optimizer.param_groups[0]["lr"] == 0.05
    tally = TrainTally(torch.device("cpu"))
    loss = training_step(optimizer, tally.loss_fn(model), x, y, lambda a, b: F.cross_entropy(model(a), b))
    assert loss == pytest.approx(F.cross_entropy(by_hand(x), y).item())
    assert tally.sums[3].item() == 10  # samples tallied: the perturbed pass is not counted as training data

    # pytorch-optimizer's own API: gradient at w, first_step, gradient at w + e, second_step
    library = SAM(by_library.parameters(), torch.optim.Adam, rho=0.3, lr=0.05, weight_decay=0.0)
    library.zero_grad()
    F.cross_entropy(by_library(x), y).backward()
    library.first_step(zero_grad=True)
    F.cross_entropy(by_library(x), y).backward()
    library.second_step()
    assert all(torch.equal(a, b) for a, b in zip(parameters(model), parameters(by_library)))

    # by hand: e = rho g / |g|, the gradient at w + e, and an Adam step from w with it
    gradient = torch.autograd.grad(F.cross_entropy(by_hand(x), y), list(by_hand.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in gradient))
    with torch.no_grad():
        for p, g in zip(by_hand.parameters(), gradient):
            p.add_(0.3 * g / (norm + 1e-12))
    perturbed = torch.autograd.grad(F.cross_entropy(by_hand(x), y), list(by_hand.parameters()))
    with torch.no_grad():
        for p, w in zip(by_hand.parameters(), start):
            p.copy_(w)
    adam = torch.optim.Adam(by_hand.parameters(), lr=0.05)
    for p, g in zip(by_hand.parameters(), perturbed):
        p.grad = g
    adam.step()
    assert all(
        torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(parameters(model), parameters(by_hand))
    )

    plain = copy.deepcopy(tiny())  # a plain Adam step goes elsewhere: the perturbation matters
    plain_optimizer = build_optimizer(plain, recipe, "standard")
    training_step(plain_optimizer, lambda a, b: F.cross_entropy(plain(a), b), x, y)
    assert not all(torch.allclose(a, b) for a, b in zip(parameters(model), parameters(plain)))


def test_sam_depends_on_rho_alone_of_the_procedure_settings():
    assert "sam_rho" in unused_fields("standard") and "sam_rho" in unused_fields("mltp_fo")
    assert "sam_rho" not in unused_fields("sam") and "eta" in unused_fields("sam")


def test_a_sam_run_resumes_exactly_and_is_refused_with_another_rho(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=2, sam_rho=0.1)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_train_batches=2, limit_test_batches=1)
    options = RunOptions(
        data_root=str(data_root), device="cpu", progress=False, log_epochs=False, cosine_every=0
    )
    whole = train_run(experiment, "sam", 0, tmp_path / "whole", options)
    train_run(with_recipe(experiment, epochs=1), "sam", 0, tmp_path / "resumed", options)
    resumed = train_run(experiment, "sam", 0, tmp_path / "resumed", options)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert resumed.final["test_loss"] == whole.final["test_loss"]
    stored = json.loads((tmp_path / "whole" / "config.json").read_text())["experiment"]["recipe"]
    assert stored["sam_rho"] == 0.1 and stored["eta"] is None  # MLTP settings recorded as unused
    with pytest.raises(ExperimentError, match=r"sam_rho: 0\.1 there, 0\.2 now"):
        train_run(with_recipe(experiment, sam_rho=0.2), "sam", 0, tmp_path / "whole", options)
    # a standard run in the same place is not refused for another rho: it does not use it
    train_run(experiment, "standard", 0, tmp_path / "standard", options)
    assert train_run(
        with_recipe(experiment, sam_rho=0.2), "standard", 0, tmp_path / "standard", options
    ).reused


def with_recipe(experiment, **changes):
    return dataclasses.replace(experiment, recipe=experiment.recipe.replace(**changes))


def test_the_command_line_trains_sam(data_root, tmp_path, capsys):
    out = tmp_path / "sam"
    argv = ["train", "--procedure", "sam", "--sam-rho", "0.02", "--epochs", "1", "--limit-train-batches", "1"]
    argv += ["--limit-test-batches", "1", "--data-root", str(data_root), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["procedure"] == "sam" and config["experiment"]["recipe"]["sam_rho"] == 0.02
    assert "final test accuracy" in capsys.readouterr().out
