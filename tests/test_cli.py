"""The ``torch-mltp`` command line end to end on MNIST-1D with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_mltp.experiments.cli import main
from torch_mltp.experiments.stats import paired_difference

REPO = Path(__file__).resolve().parents[1]


def tiny(data_root: Path, *extra: str) -> list:
    """Options that keep a run to a few batches on the CPU."""
    return [
        "--data-root", str(data_root), "--device", "cpu", "--no-progress",
        "--limit-train-batches", "3", "--limit-test-batches", "2", *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_config_metrics_checkpoint_and_result(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--procedure", "mltp", "--epochs", "1", "--out", str(out), *tiny(data_root)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json", "metrics.jsonl", "checkpoint.pt", "final.pt", "result.json",
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["procedure"] == "mltp" and config["seed"] == 0 and config["epochs"] == 1
    assert config["experiment"]["model"] == "mnist1d_cnn"
    assert config["experiment"]["recipe"]["lr"] == 1e-2  # the MNIST-1D preset
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["torch_mltp"]
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["epoch"] == 1 and record["lr"] == 1e-2
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s"):
        assert isinstance(record[key], float)
    assert set(record["alphas"]) == {"conv1", "conv2", "conv3", "linear"}
    state = torch.load(out / "final.pt", weights_only=True)
    assert set(state) >= {"conv1.weight", "linear.bias"}
    assert json.loads((out / "result.json").read_text())["final"] == record
    assert "mltp seed 0 epoch 1/1" in capsys.readouterr().out


@pytest.mark.parametrize("procedure", ["standard", "mltp"])
def test_resume_gives_bit_identical_weights(data_root, tmp_path, procedure):
    # --milestones 2: the learning rate drops after epoch 2, which only a restored scheduler knows.
    common = ["train", "--procedure", procedure, "--lr", "1e-3", "--milestones", "2", *tiny(data_root)]
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"]) == 0

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 3
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    final = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(tensor, final[name]) for name, tensor in straight["model"].items())
    if procedure == "mltp":
        alphas = straight["optimizer"]["mltp"]["alphas"]
        assert all(torch.equal(a, resumed["optimizer"]["mltp"]["alphas"][n]) for n, a in alphas.items())

    def without_times(path):
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in read_jsonl(path)]

    records = without_times(tmp_path / "resumed" / "metrics.jsonl")
    assert records == without_times(tmp_path / "straight" / "metrics.jsonl")
    assert [r["lr"] for r in records] == [1e-3, 1e-3, pytest.approx(1e-4)]


def test_compare_writes_table_results_and_figures(data_root, tmp_path, capsys):
    root = tmp_path / "cmp"
    argv = [
        "compare", "--procedures", "standard", "mltp_fo", "--seeds", "0", "1", "--epochs", "1",
        "--out", str(root), *tiny(data_root),
    ]  # fmt: skip
    assert main(argv) == 0
    for name in ("results.json", "table.md", "accuracy.png", "alphas.png", "grad_cosine.png"):
        assert (root / name).stat().st_size > 0
    for run in ("standard-seed0", "standard-seed1", "mltp_fo-seed0", "mltp_fo-seed1"):
        assert (root / run / "final.pt").exists()

    # The summary against the per-run result files, recomputed here.
    def final_acc(run):
        return json.loads((root / run / "result.json").read_text())["final"]["test_acc"]

    standard = [final_acc("standard-seed0"), final_acc("standard-seed1")]
    fo = [final_acc("mltp_fo-seed0"), final_acc("mltp_fo-seed1")]
    summary = json.loads((root / "results.json").read_text())["summary"]
    assert summary["mltp_fo"]["test_acc"]["per_seed"] == fo
    assert summary["mltp_fo"]["test_acc"]["mean"] == pytest.approx(sum(fo) / 2)
    difference = summary["mltp_fo"]["test_acc"]["diff_vs_standard"]
    assert difference["mean"] == pytest.approx((fo[0] - standard[0] + fo[1] - standard[1]) / 2)
    assert difference["high"] == pytest.approx(paired_difference(standard, fo).high)

    table = (root / "table.md").read_text()
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| mnist1d_cnn")] == [
        "standard", "mltp_fo",
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert "| mnist1d_cnn | mltp_fo |" in printed and str(root / "accuracy.png") in printed
    run_lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert [line.split("] ")[0] for line in run_lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert not any("reused" in line for line in run_lines)
    assert f"mltp_fo seed 1: test acc {fo[1]:.2f}% after 1 epochs, " in run_lines[3]

    # Run again: every run is reused, nothing retrained, and the lines say so.
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/checkpoint.pt")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/checkpoint.pt")} == stamps
    rerun_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(rerun_lines) == 4
    assert rerun_lines[3] == (
        f"[4/4] mnist1d mnist1d_cnn mltp_fo seed 1: reused, test acc {fo[1]:.2f}% after 1 epochs "
        f"({root / 'mltp_fo-seed1'})"
    )
    assert all(": reused, test acc " in line for line in rerun_lines)

    # Other settings in the same folder are refused with one line, then replaced with --overwrite.
    assert main([*argv, "--lr", "0.003"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--lr", "0.003", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("argv", "listed"),
    [
        (["train", "--model", "vgg16"], "cnet1"),
        (["train", "--procedure", "maml"], "mltp_fo"),
        (["compare", "--dataset", "imagenet"], "tiny-imagenet"),
        (["reproduce", "table4"], "table3"),
    ],
)
def test_unknown_names_list_the_choices(argv, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and listed in err


def test_missing_cifar_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(
        [sys.executable, "-m", "torch_mltp.experiments", "train", "--dataset", "cifar10",
         "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torch-mltp: error:") and "cifar" in lines[0].lower()


def test_procedure_that_cannot_train_the_model_is_refused(data_root, tmp_path, capsys):
    argv = ["compare", "--model", "mnist1d_mlp", "--out", str(tmp_path), *tiny(data_root)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mltp_conv" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before any training


def test_resume_without_checkpoint_is_refused(data_root, tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), *tiny(data_root)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_tensorboard_missing_gives_install_hint(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert main(["train", "--tensorboard", "--out", str(tmp_path / "run"), *tiny(data_root)]) == 2
    assert "pip install 'torch-mltp[tensorboard]'" in capsys.readouterr().err


def test_tensorboard_logs_scalars(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--procedure", "mltp_fo", "--epochs", "1", "--tensorboard", "--out", str(out)]
    assert main([*argv, *tiny(data_root)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"test/acc", "train/loss", "alpha/conv1"} <= set(tags)
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert events.Scalars("test/acc")[0].value == pytest.approx(record["test_acc"])


def test_train_records_the_study_settings(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train", "--procedure", "mltp_fo", "--epochs", "2", "--milestones", "1", "--train-samples", "300",
        "--alpha-policy", "nonnegative", "--alpha-lr", "1e-3", "--cosine-every", "2", "--out", str(out),
        "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--limit-test-batches", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    recipe = json.loads((out / "config.json").read_text())["experiment"]["recipe"]
    assert (recipe["train_samples"], recipe["alpha_policy"], recipe["alpha_lr"]) == (300, "nonnegative", 1e-3)
    records = read_jsonl(out / "metrics.jsonl")
    # 300 samples: batches of 128, 128 and 44, the cosine measured before the first and the third
    assert [(r["train_samples"], r["grad_cosine_steps"]) for r in records] == [(300, 2), (300, 2)]
    assert [r["alpha_lr"] for r in records] == pytest.approx([1e-3, 1e-4])  # decays with the weights' lr
    assert all(alpha >= 0 for r in records for alpha in r["alphas"].values())
    # fixed alphas have no learning rate: refused before training, with one line
    assert main([*argv, "--alpha-policy", "fixed", "--out", str(tmp_path / "fixed")]) == 2
    assert "--alpha-lr" in capsys.readouterr().err and not (tmp_path / "fixed").exists()


def test_compare_shares_standard_runs_through_a_baseline_folder(data_root, tmp_path, capsys):
    baseline = tmp_path / "baseline"
    common = ["compare", "--procedures", "standard", "mltp_fo", "--seeds", "0", "--epochs", "1",
              "--baseline-dir", str(baseline), *tiny(data_root)]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "eta1")]) == 0
    assert {p.name for p in baseline.iterdir()} == {"standard-seed0"}
    assert (
        not (tmp_path / "eta1" / "standard-seed0").exists() and (tmp_path / "eta1" / "mltp_fo-seed0").is_dir()
    )
    trained = (baseline / "standard-seed0" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--eta", "0.5", "--out", str(tmp_path / "eta0.5")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert "standard seed 0: reused" in lines[0] and "mltp_fo seed 0: test acc" in lines[1]
    assert (baseline / "standard-seed0" / "checkpoint.pt").stat().st_mtime_ns == trained
    standard = json.loads((tmp_path / "eta0.5" / "results.json").read_text())["summary"]["standard"]
    first = json.loads((tmp_path / "eta1" / "results.json").read_text())["summary"]["standard"]
    assert standard["test_acc"]["per_seed"] == first["test_acc"]["per_seed"]
    assert main([*common, "--lr", "0.003", "--out", str(tmp_path / "lr")]) == 2  # a standard setting
    assert "experiment.recipe.lr" in capsys.readouterr().err


def test_reproduce_dry_run_prints_the_plan(capsys):
    assert main(["reproduce", "table2", "--dry-run", "--timing-steps", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Table II" in out and "= 51 runs of 150 epochs, 391 steps per epoch" in out
