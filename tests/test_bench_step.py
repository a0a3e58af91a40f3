"""``benchmarks/bench_step.py``: target verdicts in a full run, none in a ``--quick`` smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from step_bench.sections import Findings  # noqa: E402
from step_bench.targets import targets_section  # noqa: E402


def findings() -> Findings:
    return Findings(
        median={
            "mlp": {"halves": 1.0e-3, "fo": 1.4e-3, "full": 2.0e-3, "higher": 3.0e-3, "torchopt": 2.5e-3}
        },
        memory={"cnet1": {"standard": 100.0, "fo": 120.0, "full": 130.0, "higher": 140.0, "torchopt": 120.0}},
        stability={"fo": (1.05, 0.0), "full": (1.25, 9.5)},
    )


def table_rows(text: str) -> list:
    """The cells of the rows of the markdown tables in ``text`` (the header row of the first one left out)."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ")
    ][1:]


def test_a_full_run_judges_each_target():
    rows = table_rows(targets_section(findings(), "cpu"))
    assert rows == [
        ["time `fo` <= 1.30 x `halves`", "mlp", "1.40", "MISS"],  # 1.4 / 1.0
        ["time `full` <= 1.0 x faster peer (torchopt)", "mlp", "0.80", "PASS"],  # 2.0 / 2.5
        ["memory `fo` <= 1.25 x `standard`", "cnet1", "1.20", "PASS"],  # 120 / 100
        # no timings of cnet1: the peer with the lower memory is the one compared, 130 / 120
        ["memory `full` <= faster peer's (torchopt)", "cnet1", "1.08", "MISS"],
        ["stability: last / first step time <= 1.1", "mlp `fo`", "1.05", "PASS"],
        ["stability: memory growth <= 8 MiB", "mlp `fo`", "+0.0 MiB", "PASS"],
        ["stability: last / first step time <= 1.1", "mlp `full`", "1.25", "MISS"],
        ["stability: memory growth <= 8 MiB", "mlp `full`", "+9.5 MiB", "MISS"],
    ]


def test_a_smoke_run_shows_the_same_numbers_without_verdicts():
    text = targets_section(findings(), "cpu", judge=False)
    assert "PASS" not in text and "MISS" not in text and "<=" not in text
    assert "Smoke run (`--quick`)" in text
    judged = table_rows(targets_section(findings(), "cpu"))
    assert [row[1:3] for row in table_rows(text)] == [row[1:3] for row in judged]


def test_quick_entry_point_runs_and_judges_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "quick.md"
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--quick", "--threads", "1",
        "--sections", "time,scaling,stability", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr
    report = out.read_text()
    assert report.strip() == process.stdout.strip()
    assert "QUICK smoke run, not a measurement" in report
    for heading in ("## 1. Time per training step", "## 3. Scaling", "## 4. Stability over 40 steps"):
        assert heading in report
    assert "## Target quantities, not judged" in report and "## Targets" not in report
    assert "PASS" not in report and "MISS" not in report
    timed = [row[0] for row in table_rows(report.split("## 1.")[1].split("## 3.")[0])]
    assert {"`standard`", "`halves`", "`fo`", "`full`"} <= set(timed)


@pytest.mark.parametrize("peer", ["higher", "torchopt"])
def test_the_peers_compute_the_gradients_of_full_mltp(peer):
    """The benchmark's higher and torchopt contestants write the same J as ``mode="full"``: their
    dJ/dw and dJ/dalpha match torch_mltp's in float64 (skipped where the peer is not installed)."""
    pytest.importorskip(peer)
    from step_bench.lineup import check_peer
    from step_bench.workloads import WORKLOADS

    assert check_peer(peer, WORKLOADS["mlp"], seed=0) is None


@pytest.mark.parametrize("label", ["mlp", "cnet1"])
def test_the_hand_written_floor_computes_the_gradients_of_fo(label):
    """The ``fo-by-hand`` contestant computes what ``mode="fo"`` does: dJ/dw and dJ/dalpha in float64."""
    import copy

    import torch
    from step_bench.contestants import fo_by_hand_gradients
    from step_bench.lineup import CHECK_ALPHA, CHECK_BATCH, mltp_reference_gradients
    from step_bench.workloads import WORKLOADS, build_model, make_batches

    from torch_mltp.selection import model_layers

    model = build_model(WORKLOADS[label], torch.device("cpu"), seed=0).double()
    x, y = make_batches(WORKLOADS[label], 1, CHECK_BATCH, torch.device("cpu"), torch.float64)[0]
    expected_w, expected_a = mltp_reference_gradients(copy.deepcopy(model), "fo", CHECK_ALPHA, x, y)
    alphas = torch.full((len(model_layers(model)),), CHECK_ALPHA, dtype=torch.float64, requires_grad=True)
    fo_by_hand_gradients(model, alphas)(x, y)
    for got, want in zip([p.grad for p in model.parameters()], expected_w):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(alphas.grad, torch.stack(expected_a), rtol=1e-12, atol=1e-14)
    assert alphas.grad.abs().min() > 0  # the comparison is not between zeros


def test_the_step_cost_benchmark_prints_a_row_per_repeat_and_the_range(data_root, tmp_path):
    """``benchmarks/bench_step_costs.py``: one row of four ratios per repeat, each row's medians and minima
    equal over a single round, and the range of each column over the rows."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_step_costs.py"), "--repeats", "2", "--rounds", "1",
        "--data-root", str(data_root),
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr
    rows = table_rows(process.stdout)
    assert [row[0] for row in rows] == ["1", "2", "range"]
    ratios = [[float(cell) for cell in row[1:]] for row in rows[:2]]
    for row in ratios:
        assert row[:2] == row[2:] and all(ratio > 0 for ratio in row)  # one round: median = min
    for column, cells in enumerate(zip(*ratios)):
        assert rows[2][column + 1] == f"{min(cells):.2f}-{max(cells):.2f}"
