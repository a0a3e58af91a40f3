#!/usr/bin/env python3
"""Cost of one MLTP training step: torch_mltp against plain training and against ``higher`` / ``torchopt``.

Prints markdown tables (see docs/benchmarks.md):

1. time per step, every contestant interleaved round-robin on the same model (median, min-max, ratios);
2. peak memory per (model, contestant), each in its own subprocess;
3. scaling of the ``fo`` overhead over ``halves`` with MLP depth;
4. stability of time and memory per step over many steps (``fo`` and ``full`` on the MLP);
5. whether ``fo`` runs unchanged on a ``torch.compile``d model;

and a PASS/MISS line for each performance target.  Ratios are only meaningful between numbers measured
side by side in one run on a quiet machine.

    python benchmarks/bench_step.py [--models mlp,cnet1,cnet4,resnet18] [--steps N] [--warmup N]
                                    [--device cpu|cuda] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import torch_mltp
except ImportError:  # run from a checkout without installing: python benchmarks/bench_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch_mltp

from torch_mltp import PAPER_MODES, MLTPOptimizer, model_layers, select_layers, task_closures

LR = 1e-3  # Adam, for weights and alphas alike (the paper's setting)
ETA = 1.0
ALPHA_INIT = (1e-3, 1e-3)
BATCH = 128  # split 64 + 64 into task i and task j
CHECK_BATCH = 8  # samples (4 + 4) of the float64 gradient checks
CHECK_ALPHA = 0.05  # large enough that the Hessian term is far above float64 round-off
CHECK_RTOL, CHECK_ATOL = 1e-6, 1e-10
MLTP_MODES = ("fo", "fc", "conv", "full")
PEERS = ("higher", "torchopt")
TIME_TARGETS = {"mlp": 1.30, "cnet1": 1.10, "resnet18": 1.10}  # fo / halves
FULL_VS_PEER_TARGET = 0.85  # full / faster peer
FO_MEMORY_TARGET = 1.25  # fo / standard
STABILITY_TIME_LIMIT = 1.10  # median of the last window / median of the first window
STABILITY_MEMORY_LIMIT_MIB = 8.0  # growth from the end of the first window to the end
CPU_STEP_CAPS = {"cnet1": (10, 2), "cnet4": (4, 1), "resnet18": (3, 1)}  # (timed steps, warm-up) on CPU
SCALING_DEPTHS = (2, 4, 8, 16, 32, 64)
SCALING_WIDTH = 64
MIB = 1024.0 * 1024.0
CPU_MEMORY_RESOLUTION_MIB = 16.0  # peak-RSS differences below this are allocator noise: no verdict

Step = Callable[[Tensor, Tensor], None]
Objective = Callable[[Tensor, Tensor], Tensor]


# -- workloads ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A model to benchmark and the shape of its synthetic data."""

    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int


def paper_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torch_mltp.models import build_model

        return build_model(name)

    return build


def deep_mlp(depth: int, width: int = SCALING_WIDTH, inputs: int = 40, classes: int = 10) -> nn.Module:
    """``depth`` linear layers, ReLU between them: inputs -> width -> ... -> classes."""
    sizes = [inputs] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if k < depth - 1 else [])
    return nn.Sequential(*layers)


WORKLOADS = {
    "mlp": Workload("mlp", paper_model("mnist1d_mlp"), (40,), 10),
    "cnet1": Workload("cnet1", paper_model("cnet1"), (3, 32, 32), 10),
    "cnet4": Workload("cnet4", paper_model("cnet4"), (3, 32, 32), 10),
    "resnet18": Workload("resnet18", paper_model("resnet18"), (3, 64, 64), 200),
}


def scaling_workload(depth: int) -> Workload:
    return Workload(f"mlp{depth}", lambda: deep_mlp(depth), (40,), 10)


def make_batches(workload: Workload, count: int, batch: int, device: torch.device, dtype=torch.float32):
    """``count`` synthetic batches (standard normal inputs, uniform labels) from a fixed seed."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        x = torch.randn(batch, *workload.input_shape, generator=generator, dtype=dtype)
        y = torch.randint(0, workload.num_classes, (batch,), generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


def build_model(workload: Workload, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return workload.build().to(device)


# -- contestants: each is a factory model -> step(x, y) ------------------------------------------------
def cross_entropy_of(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, y: F.cross_entropy(model(x), y)


def standard_step(model: nn.Module) -> Step:
    """One forward/backward on the whole batch, one Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss = cross_entropy_of(model)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()

    return step


def halves_step(model: nn.Module) -> Step:
    """Two forward/backward passes of half a batch accumulated, one Adam step: the floor for ``fo``."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss = cross_entropy_of(model)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        for x_half, y_half in zip(x.chunk(2), y.chunk(2)):
            loss(x_half, y_half).backward()
        opt.step()

    return step


def mltp_step(mode: str, learn_alpha: bool = True) -> Callable[[nn.Module], Step]:
    """torch_mltp's ``MLTPOptimizer`` around Adam in ``mode``, as its docstring shows."""

    def factory(model: nn.Module) -> Step:
        opt = MLTPOptimizer(
            torch.optim.Adam(model.parameters(), lr=LR),
            model,
            eta=ETA,
            alpha_init=ALPHA_INIT,
            mode=mode,
            learn_alpha=learn_alpha,
        )
        loss = cross_entropy_of(model)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad()
            opt.step(*task_closures(loss, x, y))

        return step

    return factory


def higher_objective(model: nn.Module, alphas: list[Tensor]) -> Objective:
    """``J`` with higher, as in its MAML example (examples/maml-omniglot.py of facebookresearch/higher).

    ``innerloop_ctx(..., copy_initial_weights=False)`` makes the model's own weights the initial fast
    weights; the inner optimizer is a plain SGD with one param group per layer whose ``lr`` is
    overridden by that layer's alpha tensor (``override={'lr': [...]}``, higher's documented way to
    pass differentiable hyperparameters), so ``J.backward()`` reaches ``w`` and ``alpha``.
    """
    import higher

    groups = [{"params": list(layer.params)} for layer in model_layers(model)]
    inner = torch.optim.SGD(groups, lr=1.0)  # lr placeholder: overridden by the alphas every step

    def objective(x: Tensor, y: Tensor) -> Tensor:
        (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False, override={"lr": alphas}) as (
            fmodel,
            diffopt,
        ):
            loss_i = F.cross_entropy(fmodel(x_i), y_i)
            diffopt.step(loss_i)
            return loss_i + ETA * F.cross_entropy(fmodel(x_j), y_j)

    return objective


def torchopt_objective(model: nn.Module, alphas: list[Tensor]) -> Objective:
    """``J`` with torchopt's functional API (README "Functional API"; examples/MAML-RL/func_maml.py).

    One ``torch.autograd.grad(create_graph=True)``, then per layer the differentiable update
    ``torchopt.sgd(lr=...).update(..., inplace=False)`` + ``torchopt.apply_updates(..., inplace=False)``
    (what ``torchopt.MetaSGD.step`` does inside), and task j through ``torch.func.functional_call``.
    The learnable per-layer step size is given as a schedule returning the alpha tensor: a tensor
    ``lr`` is checked ``>= 0`` once at construction, and a learnt alpha may turn negative.
    ``MetaSGD`` itself takes one ``lr`` per module and differentiates the loss once per param group.
    """
    import torchopt

    layers = model_layers(model)
    inners = [torchopt.sgd(lr=lambda _count, alpha=alpha: alpha) for alpha in alphas]
    params = [p for layer in layers for p in layer.params]

    def objective(x: Tensor, y: Tensor) -> Tensor:
        (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
        loss_i = F.cross_entropy(model(x_i), y_i)
        grads = iter(torch.autograd.grad(loss_i, params, create_graph=True))
        adapted: dict[str, Tensor] = {}
        for layer, inner in zip(layers, inners):
            layer_grads = tuple(next(grads) for _ in layer.params)
            updates, _ = inner.update(
                layer_grads, inner.init(layer.params), params=layer.params, inplace=False
            )
            adapted.update(
                zip(layer.param_names, torchopt.apply_updates(layer.params, updates, inplace=False))
            )
        return loss_i + ETA * F.cross_entropy(torch.func.functional_call(model, adapted, (x_j,)), y_j)

    return objective


PEER_OBJECTIVES = {"higher": higher_objective, "torchopt": torchopt_objective}


def draw_alphas(model: nn.Module) -> list[Tensor]:
    """One alpha per layer drawn as torch_mltp draws them: N(1e-3, 1e-3)."""
    like = next(model.parameters())
    return [
        torch.empty((), dtype=like.dtype, device=like.device).normal_(*ALPHA_INIT).requires_grad_()
        for _ in model_layers(model)
    ]


def peer_step(peer: str) -> Callable[[nn.Module], Step]:
    """A peer's ``J``, ``J.backward()`` and one Adam step on the weights and alphas (``full`` mode)."""

    def factory(model: nn.Module) -> Step:
        alphas = draw_alphas(model)
        objective = PEER_OBJECTIVES[peer](model, alphas)
        weights = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam([{"params": weights}, {"params": alphas}], lr=LR)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            objective(x, y).backward()
            opt.step()

        return step

    return factory


CONTESTANTS: dict[str, Callable[[nn.Module], Step]] = {
    "standard": standard_step,
    "halves": halves_step,
    **{mode: mltp_step(mode) for mode in MLTP_MODES},
    "fo-fixed-alpha": mltp_step("fo", learn_alpha=False),  # alpha as a hyperparameter (paper III-E)
    **{peer: peer_step(peer) for peer in PEERS},
}


# -- gradient checks ------------------------------------------------------------------------------------
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


# -- the one timing loop --------------------------------------------------------------------------------
@dataclass
class Contestant:
    name: str
    step: Step


@dataclass
class Timings:
    """Per-step seconds of each contestant that ran, and why the others stopped."""

    seconds: dict[str, list[float]]
    failures: dict[str, str] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    contestants: list[Contestant],
    batches: list[tuple[Tensor, Tensor]],
    rounds: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    after_round: Optional[Callable[[int], None]] = None,
    block: int = 1,
) -> Timings:
    """Run ``warmup + rounds`` rounds; each round times every contestant once, in a shuffled order.

    One sample is ``block`` consecutive steps between two device synchronisations, divided by
    ``block`` (more than one on a GPU, so that the host can run ahead of the device as in training).
    A contestant that raises is dropped (its error is kept); ``after_round(k)`` runs after round ``k``
    (1-based, warm-up included), outside the timed region.
    """
    order = list(contestants)
    shuffle = random.Random(seed).shuffle
    result = Timings({c.name: [] for c in contestants})
    gc.collect()
    for round_index in range(warmup + rounds):
        shuffle(order)
        x, y = batches[round_index % len(batches)]
        for contestant in list(order):
            try:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(block):
                    contestant.step(x, y)
                synchronize(device)
                elapsed = (time.perf_counter() - start) / block
            except Exception as error:  # reported in the table
                result.failures[contestant.name] = one_line(error)
                order.remove(contestant)
                continue
            if round_index >= warmup:
                result.seconds[contestant.name].append(elapsed)
        if after_round is not None:
            after_round(round_index + 1)
    for name in result.failures:
        result.seconds.pop(name, None)
    return result


# -- contestant planning --------------------------------------------------------------------------------
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


def plan_contestants(workload: Workload, seed: int) -> tuple[list[str], dict[str, str]]:
    """The contestants to run on ``workload`` and a note for each one left out."""
    model = build_model(workload, torch.device("cpu"), seed)
    names, skipped = ["standard", "halves", "fo", "fo-fixed-alpha"], {}
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


# -- formatting -----------------------------------------------------------------------------------------
def one_line(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:limit]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def ratio_text(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def verdict(value: Optional[float], limit: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "PASS" if value <= limit else "MISS"


# -- memory ---------------------------------------------------------------------------------------------
def read_status_kib(field_name: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; ``False`` where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_child(label: str, name: str, device: torch.device, steps: int, seed: int) -> dict:
    """Measure one configuration in this (fresh) process: peak memory above model + optimizer + data.

    One step of the same contestant on a throw-away copy of the model first, so that one-time lazy
    set-up (BLAS / oneDNN buffers, autograd threads, imports) is not charged to the measured steps.
    """
    workload = WORKLOADS[label]
    batches = make_batches(workload, 2, BATCH, device)
    model = build_model(workload, device, seed)
    CONTESTANTS[name](copy.deepcopy(model))(*batches[0])
    gc.collect()
    torch.manual_seed(seed + 1)
    step = CONTESTANTS[name](model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        how = "torch.cuda.max_memory_allocated"
    else:
        base = (read_status_kib("VmRSS") or 0) * 1024
        # ru_maxrss, the peak of the whole process life, is the fallback: an upper bound.
        how = "VmHWM after reset" if reset_peak_rss() else "ru_maxrss"
    for k in range(steps):
        step(*batches[k % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif how == "VmHWM after reset":
        peak = (read_status_kib("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base_mib": base / MIB, "peak_mib": peak / MIB, "delta_mib": (peak - base) / MIB, "how": how}


def measure_memory(label: str, name: str, device: torch.device, steps: int, seed: int) -> dict:
    """Run :func:`memory_child` in a subprocess and return its result (or ``{"error": ...}``)."""
    command = [sys.executable, __file__, "--memory-child", label, name, "--device", device.type]
    command += ["--memory-steps", str(steps), "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail}"}


# -- the sections ---------------------------------------------------------------------------------------
@dataclass
class Settings:
    models: list[str]
    steps: int
    warmup: int
    device: torch.device
    seed: int
    memory_steps: int
    stability_steps: int
    scaling_depths: tuple[int, ...]
    scaling_steps: int
    compile_steps: int
    quick: bool
    block: int = 1


@dataclass
class Findings:
    """What the target checks need from the sections."""

    median: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> contestant -> seconds
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> contestant -> MiB
    stability: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (time ratio, MiB)


def steps_for(label: str, settings: Settings) -> tuple[int, int, str]:
    """Timed steps and warm-up for ``label``: capped on CPU for the big models (and said so)."""
    if settings.device.type == "cpu" and label in CPU_STEP_CAPS and not settings.quick:
        cap_steps, cap_warmup = CPU_STEP_CAPS[label]
        if cap_steps < settings.steps or cap_warmup < settings.warmup:
            steps, warmup = min(cap_steps, settings.steps), min(cap_warmup, settings.warmup)
            return steps, warmup, f" (CPU: reduced to {steps} timed steps after {warmup} warm-up)"
    return settings.steps, settings.warmup, ""


def time_section(settings: Settings, findings: Findings, plans: dict) -> str:
    parts = [f"## 1. Time per training step (batch {BATCH}; MLTP tasks {BATCH // 2}+{BATCH // 2}; Adam)"]
    for label in settings.models:
        workload = WORKLOADS[label]
        names, skipped = plans[label]
        steps, warmup, note = steps_for(label, settings)
        contestants = instantiate(names, workload, settings.device, settings.seed)
        batches = make_batches(workload, 4, BATCH, settings.device)
        timings = time_rounds(
            contestants, batches, steps, warmup, settings.device, settings.seed, block=settings.block
        )
        medians = {n: statistics.median(s) for n, s in timings.seconds.items() if s}
        findings.median[label] = medians
        rows = []
        for name in names:
            if name not in medians:
                rows.append(
                    [f"`{name}`", "-", "-", "-", "-", f"failed: {timings.failures.get(name, 'no data')}"]
                )
                continue
            samples = timings.seconds[name]
            rows.append(
                [
                    f"`{name}`",
                    ms(medians[name]),
                    f"{ms(min(samples))}-{ms(max(samples))}",
                    ratio_text(medians[name] / medians["standard"] if "standard" in medians else None),
                    ratio_text(medians[name] / medians["halves"] if "halves" in medians else None),
                    "",
                ]
            )
        rows += [[f"`{name}`", "-", "-", "-", "-", f"skipped: {why}"] for name, why in skipped.items()]
        parts.append(f"### {label}: median of {steps} interleaved steps after {warmup} warm-up{note}")
        parts.append(
            markdown_table(["contestant", "median ms", "min-max ms", "x standard", "x halves", "note"], rows)
        )
    return "\n\n".join(parts)


def memory_section(settings: Settings, findings: Findings, plans: dict) -> str:
    unit = "CUDA max_memory_allocated" if settings.device.type == "cuda" else "peak RSS (VmHWM)"
    parts = [
        f"## 2. Peak memory per step ({unit}; each configuration in its own process, "
        f"{settings.memory_steps} steps; 'above setup' = peak minus the value after building model, "
        "optimizer and data)"
    ]
    for label in settings.models:
        names, skipped = plans[label]
        findings.memory[label] = {}
        rows = []
        for name in names:
            result = measure_memory(label, name, settings.device, settings.memory_steps, settings.seed)
            if "error" in result:
                rows.append([f"`{name}`", "-", "-", "-", "-", result["error"]])
                continue
            findings.memory[label][name] = result["delta_mib"]
            base = findings.memory[label].get("standard")
            rows.append(
                [
                    f"`{name}`",
                    f"{result['delta_mib']:.1f}",
                    ratio_text(result["delta_mib"] / base if base else None),
                    f"{result['peak_mib']:.1f}",
                    f"{result['base_mib']:.1f}",
                    result["how"],
                ]
            )
        rows += [[f"`{name}`", "-", "-", "-", "-", f"skipped: {why}"] for name, why in skipped.items()]
        parts.append(f"### {label}")
        parts.append(
            markdown_table(
                ["contestant", "above setup MiB", "x standard", "peak MiB", "after setup MiB", "how"], rows
            )
        )
    return "\n\n".join(parts)


def scaling_section(settings: Settings) -> str:
    rows = []
    for depth in settings.scaling_depths:
        workload = scaling_workload(depth)
        contestants = instantiate(["halves", "fo"], workload, settings.device, settings.seed)
        batches = make_batches(workload, 4, BATCH, settings.device)
        timings = time_rounds(
            contestants,
            batches,
            settings.scaling_steps,
            settings.warmup,
            settings.device,
            block=settings.block,
        )
        halves, fo = (statistics.median(timings.seconds[n]) for n in ("halves", "fo"))
        params = sum(p.numel() for p in build_model(workload, torch.device("cpu"), 0).parameters())
        rows.append([str(depth), f"{params:,}", ms(halves), ms(fo), ms(fo - halves), ratio_text(fo / halves)])
    ratios = [float(r[-1]) for r in rows]
    return "\n\n".join(
        [
            f"## 3. Scaling: `fo` over `halves` for MLPs of width {SCALING_WIDTH} "
            f"(median of {settings.scaling_steps} interleaved steps)",
            markdown_table(["layers", "params", "halves ms", "fo ms", "fo - halves ms", "fo / halves"], rows),
            f"Ratio at {settings.scaling_depths[-1]} layers / ratio at {settings.scaling_depths[0]} layers: "
            f"{ratios[-1] / ratios[0]:.2f} (flat = about 1).",
        ]
    )


def current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return (read_status_kib("VmRSS") or 0) / 1024.0


def memory_probe(marks: tuple[int, ...], device: torch.device):
    """A dict and an ``after_round`` callback that records the memory in use after the rounds ``marks``."""
    samples: dict[int, float] = {}

    def probe(done: int) -> None:
        if done in marks:
            samples[done] = current_memory_mib(device)

    return samples, probe


def stability_section(settings: Settings, findings: Findings) -> str:
    steps = settings.stability_steps
    window = max(1, min(100, steps // 4))
    memory_name = "allocated MiB" if settings.device.type == "cuda" else "RSS MiB"
    rows = []
    for name in ("fo", "full"):
        workload = WORKLOADS["mlp"]
        contestants = instantiate([name], workload, settings.device, settings.seed)
        samples, probe = memory_probe((1, window, steps), settings.device)
        timings = time_rounds(
            contestants,
            make_batches(workload, 16, BATCH, settings.device),
            steps,
            0,
            settings.device,
            after_round=probe,
        )
        seconds = timings.seconds.get(name)
        if not seconds:
            rows.append([f"`{name}`", "-", "-", "-", "-", "-", "-", "-", timings.failures.get(name, "")])
            continue
        first, last = statistics.median(seconds[:window]), statistics.median(seconds[-window:])
        growth = samples[steps] - samples[window]
        findings.stability[name] = (last / first, growth)
        rows.append(
            [
                f"`{name}`",
                ms(first),
                ms(last),
                ratio_text(last / first),
                f"{samples[1]:.1f}",
                f"{samples[window]:.1f}",
                f"{samples[steps]:.1f}",
                f"{growth:+.1f}",
                "",
            ]
        )
    return "\n\n".join(
        [
            f"## 4. Stability over {steps} steps (MLP; each mode alone; windows of {window} steps)",
            markdown_table(
                [
                    "mode",
                    f"first {window} median ms",
                    f"last {window} median ms",
                    "last / first",
                    f"{memory_name} after step 1",
                    f"after step {window}",
                    f"after step {steps}",
                    f"growth from step {window}",
                    "note",
                ],
                rows,
            ),
        ]
    )


def compiled_gradients(base: nn.Module, mode: str, x: Tensor, y: Tensor):
    """torch_mltp's gradients on ``torch.compile`` of a copy of ``base``, and a note; ``None`` if it fails.

    A failure that names torch's ``donated_buffer`` setting is retried once with it off, as the
    error message advises, so that the report says whether that is enough.
    """
    errors: list[str] = []
    for setting in ({}, {"donated_buffer": False}):
        with torch._functorch.config.patch(**setting):
            try:
                grads = mltp_reference_gradients(torch.compile(copy.deepcopy(base)), mode, CHECK_ALPHA, x, y)
            except Exception as error:  # the failure is the finding
                errors.append(one_line(error))
                if "donated_buffer" not in errors[-1]:
                    break
                continue
        return grads, ("only with torch._functorch.config.donated_buffer=False; " if setting else "")
    return None, " -- then, with donated_buffer=False: ".join(errors)


def compile_section(settings: Settings) -> str:
    """Does MLTP run unchanged on ``torch.compile(model)``; same gradients; cost vs compiled halves."""
    workload = WORKLOADS["mlp"]
    base = build_model(workload, settings.device, settings.seed)
    x, y = make_batches(workload, 1, BATCH, settings.device)[0]
    rows = []
    for mode in ("fo", "full"):
        eager = mltp_reference_gradients(copy.deepcopy(base), mode, CHECK_ALPHA, x, y)
        compiled, note = compiled_gradients(base, mode, x, y)
        if compiled is None:
            rows.append([f"`{mode}`", "no", "-", note])
            continue
        pairs = list(zip(compiled[0] + compiled[1], eager[0] + eager[1]))
        worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)
        rows.append(
            [f"`{mode}`", "yes", "yes" if same else "NO", f"{note}largest relative difference {worst:.1e}"]
        )
    parts = [
        "## 5. torch.compile (MLP, default backend)",
        markdown_table(["mode", "runs on compiled model", "gradients match eager (rtol 1e-4)", "note"], rows),
    ]

    def fresh(kind: str) -> nn.Module:
        model = copy.deepcopy(base)
        return torch.compile(model) if kind == "compiled" else model

    contestants = [
        Contestant(f"{name} ({kind})", CONTESTANTS[name](fresh(kind)))
        for kind in ("eager", "compiled")
        for name in ("halves", "fo")
    ]
    timings = time_rounds(
        contestants,
        make_batches(workload, 4, BATCH, settings.device),
        settings.compile_steps,
        max(settings.warmup, 3),
        settings.device,
        block=settings.block,
    )
    medians = {n: statistics.median(s) for n, s in timings.seconds.items() if s}
    rows = [
        [f"`{c.name}`", ms(medians[c.name]) if c.name in medians else "-", timings.failures.get(c.name, "")]
        for c in contestants
    ]
    ratio = {
        kind: medians.get(f"fo ({kind})", math.nan) / medians.get(f"halves ({kind})", math.nan)
        for kind in ("eager", "compiled")
    }
    parts += [
        markdown_table(["contestant", "median ms", "error"], rows),
        f"`fo` / `halves`: compiled {ratio_text(ratio['compiled'])}, eager {ratio_text(ratio['eager'])} "
        f"(median of {settings.compile_steps} interleaved steps; compilation in the warm-up).",
    ]
    return "\n\n".join(parts)


def faster_peer(times: dict[str, float], fallback: dict[str, float]) -> Optional[str]:
    """The peer with the lower median step time (or, without timings, the lower ``fallback`` value)."""
    timed = [p for p in PEERS if p in times and p in fallback]
    if timed:
        return min(timed, key=times.__getitem__)
    present = [p for p in PEERS if p in fallback]
    return min(present, key=fallback.__getitem__) if present else None


def target_row(target: str, model: str, value: Optional[float], limit: float, unit: str = "x") -> list[str]:
    shown = (
        "-"
        if value is None or math.isnan(value)
        else (f"{value:+.1f} MiB" if unit == "MiB" else f"{value:.2f}")
    )
    return [target, model, shown, verdict(value, limit)]


def targets_section(findings: Findings, memory_floor_mib: float) -> str:
    """One PASS/MISS row per performance target the sections measured."""
    rows = []
    for label, times in findings.median.items():
        if label in TIME_TARGETS:
            limit = TIME_TARGETS[label]
            value = times.get("fo", math.nan) / times.get("halves", math.nan)
            rows.append(target_row(f"time `fo` <= {limit:.2f} x `halves`", label, value, limit))
        peer = faster_peer(times, times)
        value = times.get("full", math.nan) / times[peer] if peer else None
        rows.append(
            target_row(
                f"time `full` <= {FULL_VS_PEER_TARGET} x faster peer ({peer or 'none ran'})",
                label,
                value,
                FULL_VS_PEER_TARGET,
            )
        )
    for label, memory in findings.memory.items():
        standard = memory.get("standard", math.nan)
        if not standard >= memory_floor_mib:  # also catches NaN
            rows.append(
                [
                    f"memory targets (`standard` uses {standard:.1f} MiB)",
                    label,
                    "-",
                    f"n/a (below the {memory_floor_mib:g} MiB resolution of RSS)",
                ]
            )
            continue
        value = memory.get("fo", math.nan) / standard
        rows.append(
            target_row(f"memory `fo` <= {FO_MEMORY_TARGET} x `standard`", label, value, FO_MEMORY_TARGET)
        )
        peer = faster_peer(findings.median.get(label, {}), memory)
        value = memory.get("full", math.nan) / memory[peer] if peer else None
        rows.append(target_row(f"memory `full` <= faster peer's ({peer or 'none ran'})", label, value, 1.0))
    for name, (time_ratio, growth) in findings.stability.items():
        rows.append(
            target_row(
                f"stability: last / first step time <= {STABILITY_TIME_LIMIT}",
                f"mlp `{name}`",
                time_ratio,
                STABILITY_TIME_LIMIT,
            )
        )
        rows.append(
            target_row(
                f"stability: memory growth <= {STABILITY_MEMORY_LIMIT_MIB:g} MiB",
                f"mlp `{name}`",
                growth,
                STABILITY_MEMORY_LIMIT_MIB,
                unit="MiB",
            )
        )
    table = markdown_table(["target", "model", "measured", "verdict"], rows) if rows else "(no section ran)"
    return "## Targets\n\n" + table


def environment_header(settings: Settings, argv: list[str]) -> str:
    versions = [f"torch {torch.__version__}", f"torch_mltp {torch_mltp.__version__}"]
    for peer in PEERS:
        try:
            versions.append(f"{peer} {importlib.metadata.version(peer)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{peer} not available")
    device = (
        torch.cuda.get_device_name(settings.device)
        if settings.device.type == "cuda"
        else platform.processor()
    )
    return "\n".join(
        [
            "# torch_mltp step benchmark",
            "",
            f"- command: `python benchmarks/bench_step.py {' '.join(argv)}`".rstrip(),
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- device: {settings.device.type} ({device or platform.machine()}); {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}; Python {platform.python_version()}",
            f"- versions: {', '.join(versions)}",
            f"- settings: Adam lr {LR} (alphas in a second param group), eta {ETA}, alpha_init {ALPHA_INIT}, "
            f"synthetic data; peers checked against torch_mltp `full` in float64 on {CHECK_BATCH} samples "
            f"(alpha {CHECK_ALPHA}) before anything is timed; one timing sample = {settings.block} step(s) "
            "between device syncs" + ("; QUICK smoke run, not a measurement" if settings.quick else ""),
        ]
    )


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="mlp,cnet1,cnet4,resnet18", help=f"comma-separated, from {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="timed rounds per model (capped on CPU for big ones)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--sections",
        default="time,memory,scaling,stability,compile",
        help="comma-separated subset of time,memory,scaling,stability,compile",
    )
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess")
    parser.add_argument("--stability-steps", type=int, default=2000)
    parser.add_argument("--scaling-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--block",
        type=int,
        help="steps per timing sample between device syncs (default: 1 on CPU, 4 on CUDA)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    parser.add_argument("--quick", action="store_true", help="everything tiny, MLP only: a smoke check")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONTESTANT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    block = args.block or (4 if device.type == "cuda" else 1)
    if args.quick:
        return Settings(
            models=["mlp"],
            steps=5,
            warmup=1,
            device=device,
            seed=args.seed,
            memory_steps=2,
            stability_steps=40,
            scaling_depths=(2, 4, 8),
            scaling_steps=5,
            compile_steps=5,
            quick=True,
            block=block,
        )
    return Settings(
        models=models,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        seed=args.seed,
        memory_steps=args.memory_steps,
        stability_steps=args.stability_steps,
        scaling_depths=SCALING_DEPTHS,
        scaling_steps=args.scaling_steps or args.steps,
        compile_steps=args.steps,
        quick=False,
        block=block,
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        label, name = args.memory_child
        result = memory_child(label, name, torch.device(args.device), args.memory_steps, args.seed)
        print("MEMORY_RESULT " + json.dumps(result), flush=True)
        return 0
    settings = settings_from(args)
    sections = {s.strip() for s in args.sections.split(",")}
    report: list[str] = []

    def emit(text: str) -> None:
        report.append(text)
        print(text + "\n", flush=True)

    emit(environment_header(settings, argv))
    findings = Findings()
    plans = {}
    if sections & {"time", "memory"}:
        for label in settings.models:
            plans[label] = plan_contestants(WORKLOADS[label], settings.seed)
    runs = [
        ("time", lambda: time_section(settings, findings, plans)),
        ("memory", lambda: memory_section(settings, findings, plans)),
        ("scaling", lambda: scaling_section(settings)),
        ("stability", lambda: stability_section(settings, findings)),
        ("compile", lambda: compile_section(settings)),
    ]
    for name, run in runs:
        if name not in sections:
            continue
        started = time.perf_counter()
        try:
            text = run()
        except Exception:  # one broken section must not hide the others
            text = f"## {name}: FAILED\n\n```\n{traceback.format_exc()}```"
        emit(text + f"\n\n_(section took {time.perf_counter() - started:.0f} s)_")
    emit(targets_section(findings, CPU_MEMORY_RESOLUTION_MIB if settings.device.type == "cpu" else 0.0))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
