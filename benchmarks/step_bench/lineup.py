"""Which contestants run on a model: the modes that select a layer set of their own, and the peers that
are installed and whose gradients match torch_mltp ``full`` (checked in float64 before anything is timed).
"""

from __future__ import annotations

import copy
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_mltp import PAPER_MODES, MLTPOptimizer, select_layers, task_closures
from torch_mltp.selection import model_layers

from .contestants import CONTESTANTS, PEER_OBJECTIVES, PEERS, cross_entropy_of
from .report import one_line
from .timing import Contestant
from .workloads import ETA, Workload, build_model, make_batches

CHECK_BATCH = 8  # samples (4 + 4) of the float64 gradient checks
CHECK_ALPHA = 0.05  # large enough that the Hessian term is far above float64 round-off
CHECK_RTOL, CHECK_ATOL = 1e-6, 1e-10


def mltp_reference_gradients(model: nn.Module, mode: str, alpha: float, x: Tensor, y: Tensor):
    """torch_mltp's ``dJ/dw`` and ``dJ/dalpha`` (weights untouched: the base optimizer has ``lr=0``)."""
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, eta=ETA, alpha_init=alpha, mode=mode
    )
    opt.zero_grad()
    opt.step(*task_closures(cross_entropy_of(model), x, y))
    return [p.grad for p in model.parameters()], [a.grad for a in opt.alphas.values()]


def objective_value(model: nn.Module, alpha: float, x: Tensor, y: Tensor) -> float:
    """``J(w)`` of ``full`` mode evaluated directly, for a finite-difference tie-break."""
    names = [name for layer in model_layers(model) for name in layer.param_names]
    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters() if name in names}
    (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
    loss_i = F.cross_entropy(torch.func.functional_call(model, params, (x_i,)), y_i)
    grads = torch.autograd.grad(loss_i, list(params.values()))
    shifted = {name: (p - alpha * g).detach() for (name, p), g in zip(params.items(), grads)}
    loss_j = F.cross_entropy(torch.func.functional_call(model, shifted, (x_j,)), y_j)
    return (loss_i + ETA * loss_j).item()


def finite_difference_verdict(
    model: nn.Module, alpha: float, x, y, candidates: dict[str, list[Tensor]]
) -> str:
    """Compare ``<dJ/dw, d>`` of each candidate with a central difference along a random ``d``."""
    generator = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    eps = 1e-6
    values = []
    for sign in (1.0, -1.0):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(probe.parameters(), direction):
                p.add_(d.to(p.device), alpha=sign * eps)
        values.append(objective_value(probe, alpha, x, y))
    numeric = (values[0] - values[1]) / (2 * eps)
    parts = [f"finite difference dJ/dw.d = {numeric:.10g}"]
    for name, grads in candidates.items():
        analytic = sum((g.cpu() * d).sum().item() for g, d in zip(grads, direction))
        parts.append(f"{name} gives {analytic:.10g}")
    return "; ".join(parts)


def check_peer(peer: str, workload: Workload, seed: int) -> Optional[str]:
    """``None`` when the peer's ``dJ/dw``, ``dJ/dalpha`` match torch_mltp ``full`` (float64), else why not."""
    device = torch.device("cpu")
    model = build_model(workload, device, seed).double()
    x, y = make_batches(workload, 1, CHECK_BATCH, device, torch.float64)[0]
    ref_w, ref_a = mltp_reference_gradients(copy.deepcopy(model), "full", CHECK_ALPHA, x, y)

    peer_model = copy.deepcopy(model)
    alphas = [torch.tensor(CHECK_ALPHA, dtype=torch.float64, requires_grad=True) for _ in model_layers(model)]
    try:
        PEER_OBJECTIVES[peer](peer_model, alphas)(x, y).backward()
    except Exception as error:  # a peer that does not run is reported, not fatal
        return f"{peer} failed to run: {one_line(error)}"
    peer_w = [p.grad for p in peer_model.parameters()]
    peer_a = [a.grad for a in alphas]
    bad = [
        f"dJ/dw[{name}]"
        for (name, _), a, b in zip(model.named_parameters(), ref_w, peer_w)
        if a is None or b is None or not torch.allclose(a, b, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    ] + [
        f"dJ/dalpha[{k}]"
        for k, (a, b) in enumerate(zip(ref_a, peer_a))
        if not torch.allclose(a, b, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    ]
    if not bad:
        return None
    verdict = finite_difference_verdict(model, CHECK_ALPHA, x, y, {"torch_mltp full": ref_w, peer: peer_w})
    shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
    return f"{peer} disagrees with torch_mltp full (float64, rtol={CHECK_RTOL}) on {shown}; {verdict}"


def selected_layer_names(model: nn.Module, mode: str) -> Optional[tuple[str, ...]]:
    try:
        return tuple(layer.name for layer in select_layers(model, PAPER_MODES[mode]))
    except ValueError:
        return None


def peer_problem(peer: str) -> Optional[str]:
    """Why ``peer`` cannot be benchmarked here (not installed or not importable), else ``None``."""
    try:
        importlib.import_module(peer)
    except Exception as error:  # any import failure is a reason to skip
        return f"{peer} is not usable here ({one_line(error)}); `pip install {peer}`"
    return None


SYNC_FREE_PAIR = ("halves-fused", "fo-skip-fused")
"""Run on a GPU only: there a host synchronisation drains the queue of kernels; on a CPU it costs next
to nothing."""


HAND_WRITTEN_FLOOR = "fo-by-hand"
"""Run on a CPU only: on a GPU its per-layer alphas (one scalar per tensor) would send the fused lookahead
down its one-kernel-per-tensor path, so it would be no floor there."""


def plan_contestants(
    workload: Workload, seed: int, device_type: str = "cpu"
) -> tuple[list[str], dict[str, str]]:
    """The contestants to run on ``workload`` and a note for each one left out."""
    model = build_model(workload, torch.device("cpu"), seed)
    floor = [HAND_WRITTEN_FLOOR] if device_type == "cpu" else []
    names, skipped = ["standard", "halves", "fo", *floor, "fo-fixed-alpha"], {}
    if device_type == "cuda":
        names += list(SYNC_FREE_PAIR)
    full_layers = selected_layer_names(model, "full")
    for mode in ("fc", "conv"):
        layers = selected_layer_names(model, mode)
        if layers is None:
            skipped[mode] = f"the model has no {'nn.Linear' if mode == 'fc' else 'convolution'} layer"
        elif layers == full_layers:
            skipped[mode] = "selects every layer, so it is `full`"
        else:
            names.append(mode)
    names.append("full")
    for peer in PEERS:
        problem = peer_problem(peer) or check_peer(peer, workload, seed)
        if problem:
            skipped[peer] = problem
        else:
            names.append(peer)
    return names, skipped


def instantiate(names: list[str], workload: Workload, device: torch.device, seed: int) -> list[Contestant]:
    """Each contestant on its own copy of one model (identical weights), alphas drawn from ``seed``."""
    base = build_model(workload, device, seed)
    contestants = []
    for k, name in enumerate(names):
        torch.manual_seed(seed + 1 + k)
        contestants.append(Contestant(name, CONTESTANTS[name](copy.deepcopy(base))))
    return contestants
