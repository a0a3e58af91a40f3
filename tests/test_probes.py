"""The gradient-cosine probe: its value against torch.func, and no trace of it in the training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from torch_mltp import MLTPOptimizer
from torch_mltp.experiments.loaders import make_loader
from torch_mltp.experiments.loop import train_one_epoch
from torch_mltp.experiments.probes import gradient_cosine
from torch_mltp.experiments.recipes import recipe_for
from torch_mltp.experiments.training import Experiment, RunOptions, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


class NormalisedNet(nn.Module):
    """BatchNorm (running statistics, a batch counter) and dropout (the RNG): all a probe could disturb.
    ``unused`` never reaches the loss."""

    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.dropout = nn.Dropout(0.3)
        self.linear2 = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.linear2(self.dropout(self.norm(self.linear1(x)).tanh()))


def cross_entropy(model):
    return lambda x, y: F.cross_entropy(model(x), y)


def test_gradient_cosine_matches_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))  # halves of 5 and 4
    params = {name: p.detach() for name, p in model.named_parameters()}

    def task_gradient(xs, ys):
        def loss(weights):
            return F.cross_entropy(torch.func.functional_call(model, weights, (xs,)), ys)

        grads = torch.func.grad(loss)(params)
        return torch.cat([grads[name].reshape(-1) for name in params])

    g_i, g_j = task_gradient(x[:5], y[:5]), task_gradient(x[5:], y[5:])
    expected = torch.dot(g_i, g_j) / (g_i.norm() * g_j.norm())
    assert gradient_cosine(model, cross_entropy(model), x, y).item() == pytest.approx(
        expected.item(), rel=1e-12
    )
    twice = torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]])  # the same task twice: cosine 1
    assert gradient_cosine(model, cross_entropy(model), *twice).item() == pytest.approx(1.0, abs=1e-12)


def test_probe_leaves_grads_buffers_and_rng_untouched():
    torch.manual_seed(1)
    model = NormalisedNet().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.linear2.bias.grad = None
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rng = torch.get_rng_state()
    cosine = gradient_cosine(model, cross_entropy(model), x, y)
    assert -1.0 <= cosine.item() <= 1.0
    assert model.linear2.bias.grad is None
    assert all(
        torch.equal(p.grad, torch.full_like(p, 7.0))
        for n, p in model.named_parameters()
        if n != "linear2.bias"
    )
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert int(model.norm.num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("procedure", ["standard", "mltp"])
def test_an_epoch_with_the_probe_ends_bit_identical_to_one_without(procedure):
    torch.manual_seed(2)
    data = TensorDataset(torch.randn(96, 6), torch.randint(0, 3, (96,)))
    initial = NormalisedNet()

    def epoch(cosine_every: int):
        model = copy.deepcopy(initial)
        torch.manual_seed(3)  # the initial alphas and the dropout masks
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
        optimizer = base if procedure == "standard" else MLTPOptimizer(base, model, mode="full")
        loader = make_loader(data, 16, torch.Generator().manual_seed(0), True, 0, False)
        metrics = train_one_epoch(
            model, optimizer, loader, torch.device("cpu"), None, "", False, cosine_every=cosine_every
        )
        return model, optimizer, metrics, torch.get_rng_state()

    plain, plain_optimizer, plain_metrics, plain_rng = epoch(0)
    probed, probed_optimizer, probed_metrics, probed_rng = epoch(2)
    for (name, tensor), other in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(tensor, other), name  # weights and BatchNorm statistics
    assert torch.equal(plain_rng, probed_rng)
    if procedure == "mltp":
        assert all(torch.equal(a, probed_optimizer.alphas[n]) for n, a in plain_optimizer.alphas.items())
    assert "grad_cosine" not in plain_metrics
    assert probed_metrics["grad_cosine_steps"] == 3  # 6 steps, measured before steps 0, 2 and 4
    assert -1.0 < probed_metrics["grad_cosine"] < 1.0 and probed_metrics["grad_cosine_time_s"] > 0
    assert {k: v for k, v in probed_metrics.items() if not k.startswith("grad_cosine")} == plain_metrics


def test_a_run_with_the_probe_writes_the_same_weights(data_root, tmp_path):
    recipe = recipe_for("mnist1d", "mnist1d_cnn").replace(epochs=2)
    experiment = Experiment("mnist1d", "mnist1d_cnn", recipe, limit_train_batches=3, limit_test_batches=1)

    def run(cosine_every: int):
        options = RunOptions(
            data_root=str(data_root),
            device="cpu",
            progress=False,
            log_epochs=False,
            cosine_every=cosine_every,
        )
        folder = tmp_path / f"every{cosine_every}"
        history = train_run(experiment, "mltp_fo", 0, folder, options).history
        return torch.load(folder / "final.pt", weights_only=True), history

    plain, plain_history = run(0)
    probed, probed_history = run(1)
    assert all(torch.equal(tensor, probed[name]) for name, tensor in plain.items())
    assert [record["grad_cosine_steps"] for record in probed_history] == [3, 3]
    assert all("grad_cosine" not in record for record in plain_history)
    assert [r["alphas"] for r in plain_history] == [r["alphas"] for r in probed_history]
