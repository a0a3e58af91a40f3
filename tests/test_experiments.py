"""Recipes, statistics, the training loop's pieces and the comparison outputs of torch_mltp.experiments."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from torch_mltp import MLTPOptimizer
from torch_mltp.data import DataSplits, default_model_names, load_dataset
from torch_mltp.experiments.compare import markdown_table, summarize, write_outputs
from torch_mltp.experiments.recipes import DEFAULT_MODELS, MLTP_MODES, PROCEDURES, TABLES, recipe_for
from torch_mltp.experiments.reproduce import TableRow, plan, reproduce, table_rows
from torch_mltp.experiments.stats import mean_std, paired_difference, student_t_cdf, student_t_quantile
from torch_mltp.experiments.training import (
    Experiment,
    ExperimentError,
    RunOptions,
    RunResult,
    build_optimizer,
    data_order_generator,
    evaluate,
    make_loader,
    restore_rng_states,
    rng_states,
    train_run,
)
from torch_mltp.models import build_model


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One MNIST-1D cache for the whole session (generating it takes a few seconds)."""
    return tmp_path_factory.getbasetemp() / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores
    (the command line does the same for MNIST-1D)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, math.tan(math.pi * 0.475)),  # df = 1 is the Cauchy distribution
        (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # df = 2: (2p - 1) / sqrt(2p(1 - p))
        (0.995, 2, 0.99 / math.sqrt(2 * 0.995 * 0.005)),
    ],
)
def test_t_quantile_matches_closed_forms(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [  # published table values (scipy.stats.t.ppf)
        (0.975, 2, 4.302652729911275),
        (0.975, 4, 2.7764451051977987),
        (0.975, 30, 2.0422724563012373),
        (0.95, 10, 1.8124611228107335),
        (0.025, 4, -2.7764451051977987),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    # scipy's own value for df = 2 is 4e-11 off the closed form, hence rel=1e-9.
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-9)


def test_t_cdf_of_large_df_approaches_the_normal():
    assert student_t_cdf(1.959963984540054, 1e7) == pytest.approx(0.975, abs=1e-7)


def test_mean_std_uses_n_minus_one():
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt((4 + 1 + 9) / 2)))
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_paired_difference_by_hand():
    standard = [80.0, 82.0, 81.0]
    mltp = [81.0, 82.5, 82.5]
    # differences 1.0, 0.5, 1.5: mean 1.0, sample std 0.5, t_{0.975, 2} = 4.302652729911275
    half_width = 4.302652729911275 * 0.5 / math.sqrt(3)
    result = paired_difference(standard, mltp)
    assert result.mean == pytest.approx(1.0)
    assert result.low == pytest.approx(1.0 - half_width, rel=1e-9)
    assert result.high == pytest.approx(1.0 + half_width, rel=1e-9)
    single = paired_difference([80.0], [81.5])
    assert single.mean == pytest.approx(1.5) and single.low is None and single.high is None
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


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
        "adam", 1e-2, 30, (20,), 128,
    )  # fmt: skip
    assert (recipe.alpha_mean, recipe.alpha_std, recipe.eta) == (1e-3, 1e-3, 1.0)
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


# -- comparison outputs -------------------------------------------------------------------------


def _fake_runs(accuracies: dict) -> dict:
    """RunResults whose histories end with the given test accuracies (procedure -> per seed)."""
    runs = {}
    for procedure, values in accuracies.items():
        for seed, value in enumerate(values):
            history = [
                {"epoch": 1, "test_acc": value - 5, "train_loss": 1.0},
                {"epoch": 2, "test_acc": value, "train_loss": 0.5},
            ]
            if procedure != "standard":
                for record in history:
                    record["alphas"] = {"conv1": 0.001 * record["epoch"], "linear": 0.002}
            runs[procedure, seed] = RunResult(Path(f"{procedure}-seed{seed}"), procedure, seed, history)
    return runs


def test_summary_table_and_figures(tmp_path):
    accuracies = {"standard": [80.0, 82.0, 81.0], "mltp_fo": [81.0, 82.5, 82.5]}
    experiment = Experiment("cifar10", "cnet1", recipe_for("cifar10", "cnet1"))
    result = summarize(experiment, list(accuracies), [0, 1, 2], _fake_runs(accuracies))
    fo = result["summary"]["mltp_fo"]["test_acc"]
    assert fo["per_seed"] == [81.0, 82.5, 82.5]
    assert fo["mean"] == pytest.approx(82.0) and fo["std"] == pytest.approx(math.sqrt(0.75))
    half_width = 4.302652729911275 * 0.5 / math.sqrt(3)
    assert fo["diff_vs_standard"]["low"] == pytest.approx(1.0 - half_width, rel=1e-9)
    assert result["summary"]["standard"]["test_acc"]["diff_vs_standard"] is None

    table = markdown_table([result], reported=TABLES["table1"].reported)
    rows = [line for line in table.splitlines() if line.startswith("| cnet1")]
    assert rows == [
        "| cnet1 | standard | 81.00 ± 1.00 | — | 81.9 |",
        f"| cnet1 | mltp_fo | 82.00 ± 0.87 | +1.00 [{1 - half_width:+.2f}, {1 + half_width:+.2f}] | 82.6 |",
    ]
    written = write_outputs(tmp_path, [result])
    assert [path.name for path in written] == ["results.json", "table.md", "accuracy.png", "alphas.png"]
    for png in written[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["summary"]["mltp_fo"]["test_acc"]["mean"] == 82.0


def test_reproduce_plan_counts_runs_and_steps():
    rows = table_rows("table1", {})
    text = plan("table1", rows, [0, 1, 2], torch.device("cpu"), timing_steps=0)
    # 3 x 5 + 2 = 17 settings; ceil(50000 / 128) = 391 steps per epoch
    assert "17 (model, procedure) settings x 3 seed(s) (0, 1, 2) = 51 runs of 150 epochs, 391 steps" in text
    rows = table_rows("table3", {"epochs": 2}, limit_train_batches=5)
    text = plan("table3", rows, [4], torch.device("cpu"), timing_steps=0)
    assert "4 (model, procedure) settings x 1 seed(s) (4,) = 4 runs of 2 epochs, 5 steps per epoch" in text


def test_step_time_estimate_lists_every_setting():
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe_for("mnist1d", "mnist1d_cnn"))
    text = plan("table1", [TableRow(experiment, PROCEDURES)], [0], torch.device("cpu"), timing_steps=1)
    for procedure in PROCEDURES:
        seconds = float(text.split(f"mnist1d_cnn {procedure:<10}")[1].split()[0])
        assert seconds > 0
    assert "estimated total: ~" in text


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
