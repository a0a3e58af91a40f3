"""Recipes, statistics, the training loop's pieces and the comparison outputs of torch_mltp.experiments."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from torch_mltp import MLTPOptimizer
from torch_mltp.data import DataSplits, default_model_names, load_dataset
from torch_mltp.experiments import comparison
from torch_mltp.experiments.checkpoints import restore_rng_states, rng_states
from torch_mltp.experiments.comparison import (
    Progress,
    duration_text,
    markdown_table,
    summarize,
    write_outputs,
)
from torch_mltp.experiments.loaders import data_order_generator, make_loader, training_subset
from torch_mltp.experiments.loop import evaluate
from torch_mltp.experiments.optimizers import alpha_learning_rate, build_optimizer
from torch_mltp.experiments.recipes import (
    DEFAULT_MODELS,
    MLTP_MODES,
    MLTP_ONLY_FIELDS,
    PROCEDURES,
    TABLES,
    recipe_for,
)
from torch_mltp.experiments.reproduce import TableRow, plan_lines, reproduce, table_rows
from torch_mltp.experiments.training import Experiment, ExperimentError, RunOptions, RunResult, train_run
from torch_mltp.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# -- recipes and tables -------------------------------------------------------------------------


def test_cifar_recipes_follow_the_paper():
    for dataset, model in [("cifar10", "cnet1"), ("cifar100", "ccnet3")]:
        recipe = recipe_for(dataset, model)
        assert (recipe.optimizer, recipe.lr, recipe.epochs) == ("adam", 1e-3, 150)
        assert recipe.milestones == (50, 100)
        assert (recipe.batch_size, recipe.lr_decay, recipe.weight_decay) == (128, 0.1, 0.0)
        assert (recipe.alpha_mean, recipe.alpha_std, recipe.eta, recipe.topk) == (1e-3, 1e-3, 1.0, (1,))
    assert recipe_for("cifar10", "cnet4").weight_decay == 1e-4
    assert recipe_for("cifar100", "ccnet4").weight_decay == 1e-4


def test_tiny_imagenet_recipe_follows_the_paper():
    recipe = recipe_for("tiny-imagenet", "resnet34")
    assert (recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay) == ("sgd", 0.05, 0.9, 1e-5)
    assert (recipe.epochs, recipe.milestones, recipe.batch_size) == (90, (30, 60), 128)
    assert (recipe.alpha_mean, recipe.alpha_std, recipe.eta, recipe.topk) == (1e-2, 1e-2, 0.5, (1, 5))


def test_mnist1d_recipe_is_the_documented_default():
    recipe = recipe_for("mnist1d", "mnist1d_cnn")
    assert (recipe.optimizer, recipe.lr, recipe.epochs, recipe.milestones, recipe.batch_size) == (
        "adam", 1e-2, 100, (70,), 128,
    )  # fmt: skip
    assert (recipe.alpha_mean, recipe.alpha_std, recipe.eta) == (1e-3, 1e-3, 1.0)
    assert (recipe.train_samples, recipe.alpha_policy, recipe.alpha_lr) == (None, "learned", None)
    assert DEFAULT_MODELS["mnist1d"] == "mnist1d_cnn"  # has conv and linear layers: all five procedures apply


def test_recipe_overrides_ignore_none():
    recipe = recipe_for("cifar10", "cnet1").replace(lr=0.1, epochs=None, milestones=(3,))
    assert (recipe.lr, recipe.epochs, recipe.milestones) == (0.1, 150, (3,))


def test_tables_hold_the_papers_grid_and_numbers():
    table1 = TABLES["table1"]
    assert table1.dataset == "cifar10"
    assert dict(table1.rows) == {
        "cnet1": PROCEDURES,
        "cnet2": PROCEDURES,
        "cnet3": PROCEDURES,
        "cnet4": ("standard", "mltp_fo"),
    }
    assert table1.reported["cnet1", "mltp_fo"] == (82.6,)
    assert table1.reported["cnet3", "mltp_fc"] == (86.6,)
    assert table1.reported["cnet4", "standard"] == (93.3,)
    assert TABLES["table2"].reported["ccnet2", "mltp"] == (59.7,)
    assert TABLES["table2"].reported["ccnet1", "mltp_conv"] == (55.5,)
    assert TABLES["table2"].reported["ccnet4", "mltp_fo"] == (72.4,)
    assert dict(TABLES["table3"].rows) == {
        "resnet18": ("standard", "mltp_fo"),
        "resnet34": ("standard", "mltp_fo"),
    }
    assert TABLES["table3"].reported["resnet18", "mltp_fo"] == (54.5, 77.2)
    assert TABLES["table3"].reported["resnet34", "standard"] == (54.3, 77.1)
    for table in TABLES.values():  # every cell of the grid has the paper's number, and only those
        assert set(table.reported) == {(model, p) for model, procedures in table.rows for p in procedures}


def test_default_models_belong_to_their_data_sets():
    for dataset, model in DEFAULT_MODELS.items():
        assert model in default_model_names(dataset)


def test_procedures_map_to_the_papers_variants():
    assert MLTP_MODES == {
        "standard": None,
        "mltp": "full",
        "mltp_conv": "conv",
        "mltp_fc": "fc",
        "mltp_fo": "fo",
        "sam": None,  # not the paper's: pytorch-optimizer's SAM, no MLTP wrapper
    }


def test_build_optimizer_per_procedure():
    model = build_model("mnist1d_cnn")
    recipe = recipe_for("tiny-imagenet", "resnet18")  # SGD with momentum and weight decay
    standard = build_optimizer(model, recipe, "standard")
    assert type(standard) is torch.optim.SGD
    assert standard.param_groups[0]["momentum"] == 0.9 and standard.param_groups[0]["weight_decay"] == 1e-5
    conv = build_optimizer(model, recipe, "mltp_conv")
    assert isinstance(conv, MLTPOptimizer) and set(conv.alphas) == {"conv1", "conv2", "conv3"}
    assert conv.eta == 0.5
    fc = build_optimizer(model, recipe, "mltp_fc")
    assert set(fc.alphas) == {"linear"}
    with pytest.raises(ExperimentError, match="mltp_conv"):
        build_optimizer(build_model("mnist1d_mlp"), recipe, "mltp_conv")


def test_alpha_policies_and_the_alphas_learning_rate():
    model = build_model("mnist1d_mlp")
    recipe = recipe_for("mnist1d", "mnist1d_mlp").replace(alpha_mean=0.0, alpha_std=1.0)

    def built(procedure="mltp_fo", **changes):
        torch.manual_seed(0)  # the same draws of N(0, 1) for every policy
        return build_optimizer(model, recipe.replace(**changes), procedure)

    learned = built()
    drawn = [alpha.item() for alpha in learned.alphas.values()]
    assert min(drawn) < 0 < max(drawn)
    assert alpha_learning_rate(learned) == recipe.lr  # tied to the weights' learning rate
    nonnegative = built(alpha_policy="nonnegative")
    assert nonnegative.alpha_min == 0.0
    assert [alpha.item() for alpha in nonnegative.alphas.values()] == [max(value, 0.0) for value in drawn]
    fixed = built("mltp", alpha_policy="fixed")
    assert not fixed.learn_alpha and alpha_learning_rate(fixed) is None
    assert not any(alpha.requires_grad for alpha in fixed.alphas.values())
    own = built(alpha_lr=1e-4)
    assert alpha_learning_rate(own) == 1e-4 and own.param_groups[0]["lr"] == recipe.lr
    with pytest.raises(ExperimentError, match="--alpha-lr"):
        built("mltp", alpha_policy="fixed", alpha_lr=1e-4)
    nonpositive = built(alpha_policy="nonpositive")  # N(-0, 1): the same draws, clamped at <= 0
    assert (nonpositive.alpha_min, nonpositive.alpha_max) == (None, 0.0)
    assert [alpha.item() for alpha in nonpositive.alphas.values()] == [min(value, 0.0) for value in drawn]
    mirrored = built(alpha_policy="nonpositive", alpha_mean=1e-3, alpha_std=1e-3)
    assert max(alpha.item() for alpha in mirrored.alphas.values()) <= 0.0
    assert min(alpha.item() for alpha in mirrored.alphas.values()) < 0.0  # drawn from N(-1e-3, 1e-3)
    with pytest.raises(ExperimentError, match="learned, nonnegative, nonpositive, fixed"):
        built("mltp", alpha_policy="frozen")
    assert type(built("standard", alpha_policy="frozen")) is torch.optim.Adam


def test_the_schedule_decays_the_alphas_own_learning_rate_with_the_weights(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_mlp").replace(epochs=3, milestones=(1, 2), alpha_lr=1e-3)
    experiment = Experiment("mnist1d", "mnist1d_mlp", recipe, limit_train_batches=1, limit_test_batches=1)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    history = train_run(experiment, "mltp_fo", 0, tmp_path, options).history
    assert [record["lr"] for record in history] == pytest.approx([1e-2, 1e-3, 1e-4])
    assert [record["alpha_lr"] for record in history] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_a_nonnegative_run_keeps_its_alphas_nonnegative(data_root, tmp_path):
    # alphas drawn from N(0, 0.01), moved by at most 3 Adam steps of 1e-6: the learned ones stay as drawn
    recipe = recipe_for("mnist1d", "mnist1d_mlp").replace(
        epochs=1, alpha_mean=0.0, alpha_std=0.01, alpha_lr=1e-6
    )
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)

    def final_alphas(policy: str) -> list:
        experiment = Experiment(
            "mnist1d",
            "mnist1d_mlp",
            recipe.replace(alpha_policy=policy),
            limit_train_batches=3,
            limit_test_batches=1,
        )
        return list(train_run(experiment, "mltp_fo", 0, tmp_path / policy, options).final["alphas"].values())

    learned, nonnegative = final_alphas("learned"), final_alphas("nonnegative")
    assert min(learned) < 0
    assert min(nonnegative) >= 0.0
    # where the draw was negative: clamped to 0, then at most 3 steps of 1e-6 (and clamped again)
    assert all(kept <= 3e-6 for value, kept in zip(learned, nonnegative) if value < 0)


class RecordingDataset(Dataset):
    """Remembers which samples were read, in order."""

    def __init__(self, base: Dataset):
        self.base = base
        self.read: list = []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.read.append(int(index))
        return self.base[index]


def _recorded_run(data_root, tmp_path, procedure: str, seed: int, recipe):
    """The samples one epoch of a run read, and its final weights (lr 0: the initial ones)."""
    data = load_dataset("mnist1d", data_root)
    recording = RecordingDataset(data.train)
    splits = DataSplits(recording, data.test, data.num_classes, data.input_shape, data.name)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_test_batches=1)
    options = RunOptions(device="cpu", progress=False, log_epochs=False, cosine_every=0)
    folder = tmp_path / f"{procedure}-{seed}"
    train_run(experiment, procedure, seed, folder, options, splits)
    return recording.read, torch.load(folder / "final.pt", weights_only=True)


def test_a_seed_gives_every_procedure_the_same_initial_weights_and_data_order(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=1, lr=0.0)  # lr 0: the weights stay initial
    order, weights = _recorded_run(data_root, tmp_path, "standard", 5, recipe)
    for procedure in ("mltp", "mltp_fo"):
        other_order, other_weights = _recorded_run(data_root, tmp_path, procedure, 5, recipe)
        assert other_order == order
        assert all(torch.equal(tensor, other_weights[name]) for name, tensor in weights.items())
    torch.manual_seed(5)
    initial = build_model("mnist1d_cnn").state_dict()
    assert all(torch.equal(tensor, initial[name]) for name, tensor in weights.items())
    another_order, another_weights = _recorded_run(data_root, tmp_path, "standard", 6, recipe)
    assert another_order != order and not torch.equal(
        another_weights["conv1.weight"], weights["conv1.weight"]
    )


def test_the_training_subset_is_fixed_and_nested(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=1, train_samples=300)
    order, _ = _recorded_run(data_root, tmp_path, "standard", 0, recipe)
    assert len(order) == 300  # batches of 128, 128 and 44
    fo_order, _ = _recorded_run(data_root, tmp_path, "mltp_fo", 1, recipe)
    assert sorted(fo_order) == sorted(order) and fo_order != order  # same samples, other seed's order
    first_300 = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:300].tolist()
    assert sorted(order) == sorted(first_300)
    dataset = TensorDataset(torch.arange(4000))
    small, large = training_subset(dataset, 300), training_subset(dataset, 1000)
    assert set(small.indices) <= set(large.indices) and training_subset(dataset, None) is dataset
    with pytest.raises(ExperimentError, match="4000"):
        training_subset(dataset, 4001)


# -- the training loop's pieces -------------------------------------------------------------------


def test_data_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        return torch.randperm(100, generator=data_order_generator(seed, epoch))

    assert torch.equal(order(0, 3), order(0, 3))
    assert not torch.equal(order(0, 3), order(0, 4))
    assert not torch.equal(order(0, 3), order(1, 3))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


class NoisyInputs(Dataset):
    """Adds noise drawn from torch's global RNG to every sample, as torchvision's augmentations do."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x + 0.1 * torch.randn(x.shape), y


def test_resume_restores_the_augmentation_rng(data_root, tmp_path):
    data = load_dataset("mnist1d", data_root)
    noisy = DataSplits(NoisyInputs(data.train), data.test, data.num_classes, data.input_shape, data.name)
    options = RunOptions(device="cpu", progress=False, log_epochs=False)

    def run(epochs: int, folder: str):
        recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=epochs)
        experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_train_batches=2, limit_test_batches=1)
        train_run(experiment, "mltp_fo", 0, tmp_path / folder, options, noisy)
        return torch.load(tmp_path / folder / "checkpoint.pt", weights_only=True)["model"]

    straight = run(2, "straight")
    run(1, "resumed")
    resumed = run(2, "resumed")
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in straight.items())


def test_evaluate_top1_and_top5_by_hand():
    # The "model" returns its input as logits; labels chosen so that top-1 / top-5 hits are known.
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 0],  # label 0: top-1 hit
            [9.0, 8, 7, 6, 5, 4, 0],  # label 4: rank 5, top-5 hit
            [9.0, 8, 7, 6, 5, 4, 0],  # label 5: rank 6, miss
            [0.0, 1, 2, 3, 4, 5, 6],  # label 6: top-1 hit
        ]
    )
    labels = torch.tensor([0, 4, 5, 6])
    loader = make_loader(TensorDataset(logits, labels), 3, torch.Generator(), False, 0, False)
    metrics = evaluate(nn.Identity(), loader, torch.device("cpu"), (1, 5), None)
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics == pytest.approx({"test_loss": expected_loss, "test_acc": 50.0, "test_top5": 75.0})


def test_untrained_run_reports_the_initial_models_accuracy(data_root, tmp_path):
    """With lr = 0 the weights never move, so the recorded train and test metrics must equal the
    seeded initial model's, computed here independently; and every training sample counts once."""
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(lr=0.0, epochs=1)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    record = train_run(experiment, "standard", 7, tmp_path / "run", options).final

    data = load_dataset("mnist1d", data_root)
    torch.manual_seed(7)
    model = build_model("mnist1d_cnn").eval()
    with torch.no_grad():
        for split, prefix in [(data.train, "train"), (data.test, "test")]:
            x = torch.stack([split[i][0] for i in range(len(split))])
            y = torch.tensor([split[i][1] for i in range(len(split))])
            logits = model(x)
            accuracy = 100.0 * (logits.argmax(1) == y).float().mean().item()
            assert record[f"{prefix}_acc"] == pytest.approx(accuracy)
            loss = nn.functional.cross_entropy(logits, y).item()
            assert record[f"{prefix}_loss"] == pytest.approx(loss, rel=1e-5)
    assert record["train_samples"] == len(data.train)


def test_mltp_train_metrics_count_every_sample_once(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=1)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_train_batches=3, limit_test_batches=1)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    record = train_run(experiment, "mltp_fo", 0, tmp_path / "run", options).final
    assert record["train_samples"] == 3 * 128  # task i (64) + task j (64) per step
    assert 0.0 <= record["train_acc"] <= 100.0
    # J = L_i + eta * L_j(w') with eta = 1 and two halves of 64: twice the per-sample mean the tally keeps
    assert record["train_objective"] == pytest.approx(2 * record["train_loss"], rel=1e-6)  # float32 losses
    assert set(record["alphas"]) == {"conv1", "conv2", "conv3", "linear"}


def test_a_run_folder_with_other_settings_is_refused(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=1)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_train_batches=1, limit_test_batches=1)
    train_run(experiment, "standard", 0, tmp_path, options)
    changed = Experiment("mnist1d", "mnist1d_cnn", recipe.replace(lr=0.001), 1, 1)
    with pytest.raises(ExperimentError, match=r"experiment\.recipe\.lr: 0\.01 there, 0\.001 now"):
        train_run(changed, "standard", 0, tmp_path, options)
    replaced = train_run(changed, "standard", 0, tmp_path, dataclasses.replace(options, overwrite=True))
    assert replaced.final["lr"] == 0.001
    assert json.loads((tmp_path / "config.json").read_text())["experiment"]["recipe"]["lr"] == 0.001


def test_run_folders_from_before_the_new_recipe_settings_are_reused(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_mlp").replace(epochs=1)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    experiment = Experiment("mnist1d", "mnist1d_mlp", recipe, limit_train_batches=1, limit_test_batches=1)
    train_run(experiment, "mltp_fo", 0, tmp_path, options)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in ("train_samples", "alpha_policy", "alpha_lr"):  # as written before these settings existed
        del config["experiment"]["recipe"][name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train_run(experiment, "mltp_fo", 0, tmp_path, options).reused
    for changed, message in [
        ({"alpha_policy": "fixed"}, "experiment.recipe.alpha_policy: 'learned' there, 'fixed' now"),
        ({"train_samples": 500}, "experiment.recipe.train_samples: None there, 500 now"),
        ({"alpha_lr": 1e-3}, "experiment.recipe.alpha_lr: None there, 0.001 now"),
    ]:
        other = Experiment("mnist1d", "mnist1d_mlp", recipe.replace(**changed), 1, 1)
        with pytest.raises(ExperimentError, match=re.escape(message)):
            train_run(other, "mltp_fo", 0, tmp_path, options)


def test_a_standard_run_does_not_depend_on_the_mltp_settings(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_mlp").replace(epochs=1)
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    experiment = Experiment("mnist1d", "mnist1d_mlp", recipe, limit_train_batches=1, limit_test_batches=1)
    train_run(experiment, "standard", 0, tmp_path, options)
    stored = json.loads((tmp_path / "config.json").read_text())["experiment"]["recipe"]
    assert [stored[name] for name in MLTP_ONLY_FIELDS] == [None] * len(MLTP_ONLY_FIELDS)
    mltp_settings = recipe.replace(eta=0.5, alpha_mean=0.1, alpha_std=0.2, alpha_policy="fixed")
    assert train_run(
        Experiment("mnist1d", "mnist1d_mlp", mltp_settings, 1, 1), "standard", 0, tmp_path, options
    ).reused
    with pytest.raises(ExperimentError, match=r"experiment\.recipe\.lr: 0\.01 there, 0\.1 now"):
        train_run(
            Experiment("mnist1d", "mnist1d_mlp", recipe.replace(lr=0.1), 1, 1),
            "standard",
            0,
            tmp_path,
            options,
        )


# -- comparison outputs -------------------------------------------------------------------------


def _fake_runs(accuracies: dict, cosines: dict) -> dict:
    """RunResults whose histories end with the given test accuracies (procedure -> per seed); each epoch
    takes 2 s (standard) or 3 s (MLTP) of which 0.5 s measure the gradient cosine, given per epoch (plus
    0.01 x seed for standard, 0.02 x seed for MLTP). The alphas of seed 1 are negative after epoch 1,
    those of seed 2 after both epochs."""
    runs = {}
    for procedure, values in accuracies.items():
        for seed, value in enumerate(values):
            seconds = 2.0 if procedure == "standard" else 3.0
            history = [
                {
                    "epoch": epoch,
                    "test_acc": value - 5 * (2 - epoch),
                    "train_loss": 1.0 / epoch,
                    "epoch_time_s": seconds + 0.5,
                    "grad_cosine_time_s": 0.5,
                    "grad_cosine": cosines[procedure][epoch - 1]
                    + (0.01 if procedure == "standard" else 0.02) * seed,
                }
                for epoch in (1, 2)
            ]
            if procedure != "standard":
                for record in history:
                    shift = {0: 0.0, 1: 0.0015, 2: 0.003}[seed]
                    record["alphas"] = {"conv1": 0.001 * record["epoch"] - shift, "linear": 0.002}
            runs[procedure, seed] = RunResult(Path(f"{procedure}-seed{seed}"), procedure, seed, history)
    return runs


def test_summary_table_and_figures(tmp_path):
    accuracies = {"standard": [80.0, 82.0, 81.0], "mltp_fo": [81.0, 82.5, 82.5]}
    cosines = {"standard": [0.2, 0.1], "mltp_fo": [0.3, 0.2]}
    experiment = Experiment("cifar10", "cnet1", recipe_for("cifar10", "cnet1"))
    result = summarize(experiment, list(accuracies), [0, 1, 2], _fake_runs(accuracies, cosines))
    fo = result["summary"]["mltp_fo"]["test_acc"]
    assert fo["per_seed"] == [81.0, 82.5, 82.5]
    assert fo["mean"] == pytest.approx(82.0) and fo["std"] == pytest.approx(math.sqrt(0.75))
    half_width = 4.302652729911275 * 0.5 / math.sqrt(3)
    difference = fo["diff_vs_standard"]
    assert difference["low"] == pytest.approx(1.0 - half_width, rel=1e-9)
    t = 1.0 / (0.5 / math.sqrt(3))  # differences 1.0, 0.5, 1.5; two degrees of freedom
    assert difference["p_t"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert difference["p_sign_flip"] == pytest.approx(0.25) and difference["sign_flip_draws"] is None
    assert result["summary"]["standard"]["test_acc"]["diff_vs_standard"] is None
    # per seed: two epochs of 2 s (standard) or 3 s training; cosine: mean of the two epochs + 0.02 seed
    assert result["summary"]["standard"]["train_time_s"]["per_seed"] == [4.0, 4.0, 4.0]
    assert result["summary"]["mltp_fo"]["train_time_s"]["mean"] == pytest.approx(6.0)
    cosine = result["summary"]["mltp_fo"]["grad_cosine"]
    assert cosine["per_seed"] == pytest.approx([0.25, 0.27, 0.29])
    cosine_half_width = 4.302652729911275 * 0.01 / math.sqrt(3)  # differences 0.10, 0.11, 0.12
    assert cosine["diff_vs_standard"]["mean"] == pytest.approx(0.11)
    assert cosine["diff_vs_standard"]["high"] == pytest.approx(0.11 + cosine_half_width, rel=1e-9)
    assert "diff_vs_standard" not in result["summary"]["standard"]["grad_cosine"]
    assert result["summary"]["mltp_fo"]["negative_alphas"] == {
        "runs": 3, "during": 2, "at_end": 1, "min": pytest.approx(-0.002),
    }  # fmt: skip
    assert result["summary"]["standard"]["negative_alphas"] is None

    table = markdown_table([result], reported=TABLES["table1"].reported)
    rows = [line for line in table.splitlines() if line.startswith("| cnet1")]
    p_t = 1 - t / math.sqrt(2 + t * t)
    assert rows == [
        "| cnet1 | standard | 81.00 ± 1.00 | — | — | — | 81.9 | 0.160 | — | 4.0 (×1.00) |",
        f"| cnet1 | mltp_fo | 82.00 ± 0.87 | +1.00 [{1 - half_width:+.2f}, {1 + half_width:+.2f}] "
        f"| {p_t:.3f} | 0.250 | 82.6 | 0.270 (+0.110 [{0.11 - cosine_half_width:+.3f}, "
        f"{0.11 + cosine_half_width:+.3f}]) | 2 / 1 of 3 | 6.0 (×1.50) |",
    ]
    assert "exact over every sign pattern" in table
    written = write_outputs(tmp_path, [result])
    assert [path.name for path in written] == [
        "results.json", "table.md", "accuracy.png", "alphas.png", "grad_cosine.png",
    ]  # fmt: skip
    for png in written[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["summary"]["mltp_fo"]["test_acc"]["mean"] == 82.0
    assert stored["summary"]["mltp_fo"]["test_acc"]["diff_vs_standard"]["p_sign_flip"] == 0.25


def test_one_seed_shows_no_p_values(tmp_path):
    accuracies = {"standard": [80.0], "mltp_fo": [81.0]}
    cosines = {"standard": [0.2, 0.1], "mltp_fo": [0.3, 0.2]}
    experiment = Experiment("cifar10", "cnet1", recipe_for("cifar10", "cnet1"))
    result = summarize(experiment, list(accuracies), [0], _fake_runs(accuracies, cosines))
    assert result["summary"]["mltp_fo"]["test_acc"]["diff_vs_standard"]["p_sign_flip"] == 1.0  # as computed
    (row,) = [line for line in markdown_table([result]).splitlines() if line.startswith("| cnet1 | mltp_fo")]
    assert row.startswith("| cnet1 | mltp_fo | 81.00 | +1.00 (1 seed: no interval) | — | — | 0.250 |")


def _progress_with_fake_runs(monkeypatch, step_seconds, runs):
    """A progress whose runs take the given seconds on a fake clock; ``runs``: (procedure, steps, seconds)."""
    now = [0.0]
    seconds = iter(seconds for _, _, seconds in runs)

    def fake_run(experiment, procedure, seed, folder, options, data):
        now[0] += next(seconds)
        record = {"epoch": 1, "test_acc": 50.0, "epoch_time_s": 0.0, "eval_time_s": 0.0}
        return RunResult(Path(folder), procedure, seed, [record])

    monkeypatch.setattr(comparison, "train_run", fake_run)
    monkeypatch.setattr(comparison.time, "perf_counter", lambda: now[0])
    progress = Progress(step_seconds)
    progress.plan([(procedure, steps) for procedure, steps, _ in runs])
    return progress


def test_progress_predicts_each_procedure_by_its_own_runs(monkeypatch, tmp_path):
    runs = [("standard", 10, 10.0), ("mltp", 10, 30.0), ("standard", 20, 0.0), ("mltp_fo", 10, 0.0)]
    progress = _progress_with_fake_runs(monkeypatch, None, runs)
    assert progress.left() is None  # nothing trained yet (or every run reused)
    for procedure, _, _ in runs[:2]:
        progress.train(None, procedure, 0, tmp_path / procedure, RunOptions(), None, procedure)
    # standard at its 1 s per step, mltp_fo (not trained yet) at all runs' 40 s / 20 steps
    assert (progress.done, progress.total) == (2, 4)
    assert progress.left() == pytest.approx(20 * 1.0 + 10 * 2.0)
    assert [duration_text(s) for s in (40.2, 150.0, 7200.0)] == ["40 s", "2.5 min", "2.0 h"]


def test_progress_scales_the_step_costs_by_how_much_longer_the_runs_took(monkeypatch, tmp_path):
    runs = [("standard", 10, 10.0), ("mltp", 10, 0.0), ("mltp_fo", 5, 0.0)]
    progress = _progress_with_fake_runs(monkeypatch, {"standard": 0.5, "mltp": 1.0, "mltp_fo": 0.6}, runs)
    assert progress.left() == pytest.approx(0.5 * 10 + 1.0 * 10 + 0.6 * 5)  # the step costs alone
    progress.train(None, "standard", 0, tmp_path / "standard", RunOptions(), None, "standard")
    # standard took 10 s where its step cost said 5 s: twice as long
    assert progress.left() == pytest.approx(2 * (1.0 * 10 + 0.6 * 5))


def test_reproduce_plan_counts_runs_and_steps():
    rows = table_rows("table1", {})
    text = "\n".join(plan_lines("table1", rows, [0, 1, 2], "nowhere", torch.device("cpu"), timing_steps=0))
    # 3 x 5 + 2 = 17 settings; ceil(50000 / 128) = 391 steps per epoch
    assert "17 (model, procedure) settings x 3 seed(s) (0, 1, 2) = 51 runs of 150 epochs, 391 steps" in text
    rows = table_rows("table3", {"epochs": 2}, limit_train_batches=5)
    text = "\n".join(plan_lines("table3", rows, [4], "nowhere", torch.device("cpu"), timing_steps=0))
    assert "4 (model, procedure) settings x 1 seed(s) (4,) = 4 runs of 2 epochs, 5 steps per epoch" in text


def test_step_time_estimate_times_each_model_once(one_thread):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=2)
    rows = [
        TableRow(Experiment("mnist1d", model, recipe), PROCEDURES) for model in ("mnist1d_cnn", "mnist1d_mlp")
    ]
    lines = list(plan_lines("table1", rows, [0], "nowhere", torch.device("cpu"), timing_steps=1))
    timed = [line for line in lines if line.startswith("  [")]
    assert [line.split()[1] for line in timed] == ["mnist1d_cnn", "mnist1d_mlp"]
    seconds = float(timed[0].split()[2])
    assert seconds > 0
    runs = dict(item.split(" ~") for item in timed[0].split("per run: ")[1].split(", "))
    assert list(runs) == list(PROCEDURES)
    assert lines[-1].startswith("estimated total: ~")


def test_reproduce_runs_each_row_and_writes_the_combined_table(data_root, tmp_path, caplog):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=1)
    rows = [
        TableRow(
            Experiment("mnist1d", model, recipe, limit_train_batches=1, limit_test_batches=1), procedures
        )
        for model, procedures in [("mnist1d_cnn", ("standard", "mltp_fo")), ("mnist1d_mlp", ("standard",))]
    ]
    options = RunOptions(data_root=str(data_root), device="cpu", progress=False, log_epochs=False)
    with caplog.at_level(logging.INFO, logger="torch_mltp"):
        results = reproduce("table1", rows, [0], tmp_path, options, timing_steps=0, dry_run=False)
    assert [result["model"] for result in results] == ["mnist1d_cnn", "mnist1d_mlp"]
    for folder in ("mnist1d-mnist1d_cnn", "mnist1d-mnist1d_mlp"):
        assert (tmp_path / folder / "table.md").exists() and (tmp_path / folder / "accuracy.png").exists()
    table = (tmp_path / "table.md").read_text()
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| mnist1d")] == [
        ["| mnist1d_cnn", "standard"],
        ["| mnist1d_cnn", "mltp_fo"],
        ["| mnist1d_mlp", "standard"],
    ]
    assert "paper top-1" in table  # the paper's column (empty here: MNIST-1D is not in the paper)
    combined = json.loads((tmp_path / "results.json").read_text())
    assert [experiment["model"] for experiment in combined["experiments"]] == ["mnist1d_cnn", "mnist1d_mlp"]
    assert "3 (model, procedure) settings x 1 seed(s) (0,) = 3 runs of 1 epochs" in caplog.text
