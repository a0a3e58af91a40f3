"""Count the distinct Python functions of ``torch_mltp`` that run during one MLTP step.

The step is ``opt.step(closure_i, closure_j)`` (the closures from ``task_closures``, built before) of an
``MLTPOptimizer`` around Adam on an MLP (40-64-64-10, ReLU, a batch of 128 split into two tasks of 64),
taken after two warm-up steps so that
what the optimizer caches between steps already exists.  ``sys.settrace`` records every code object
that starts a frame during that one call; counted are the named functions (not lambdas, comprehensions
or generator expressions) whose file lies in the ``torch_mltp`` package directory.  Functions of torch
itself, and the script's own loss function, are not counted (autograd on the CPU runs the package's
hooks on the calling thread, where the trace sees them).

For comparison, the same count for one ``torch.optim.Adam.step()`` on the same model, after
``loss.backward()`` (outside the trace) and two warm-up steps: the named functions whose file lies in
``torch/optim``.

    python benchmarks/count_calls.py                          # mode "fo", fused path (foreach=None)
    python benchmarks/count_calls.py --mode full --foreach false
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from types import CodeType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_mltp
from torch_mltp import MLTPOptimizer, task_closures

PACKAGE_DIR = Path(torch_mltp.__file__).resolve().parent
OPTIM_DIR = Path(torch.optim.__file__).resolve().parent
TORCH_PARENT = OPTIM_DIR.parents[1]  # torch/optim/adam.py is shown relative to it
BATCH = 128
WARM_UP_STEPS = 2
MODES = ("fo", "full", "fc")  # the MLP has no convolution, so "conv" selects nothing
FOREACH = {"none": None, "false": False}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 40, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
        for _ in range(count)
    ]


def traced_code(run: Callable[[], object], *roots: Path) -> set[CodeType]:
    """The code objects whose file lies under one of ``roots`` and that start a frame while ``run()`` runs."""
    prefixes = tuple(str(root) + os.sep for root in roots)
    under: dict[str, bool] = {}  # by file name, resolved once
    seen: set[CodeType] = set()

    def on_call(frame, event, arg):  # the global trace function: called when a frame starts
        code = frame.f_code
        inside = under.get(code.co_filename)
        if inside is None:
            inside = under[code.co_filename] = os.path.realpath(code.co_filename).startswith(prefixes)
        if inside:
            seen.add(code)
        return None  # no line events

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(previous)
    return seen


def named_functions(codes: set[CodeType], root: Path, base: Path) -> tuple[list[str], int]:
    """``file:function`` of the named functions among ``codes`` whose file lies under ``root`` (the path
    relative to ``base``), sorted; and the number of the other code objects there
    (lambdas, comprehensions, generator expressions)."""
    prefix = str(root) + os.sep
    named, anonymous = set(), 0
    for code in codes:
        path = os.path.realpath(code.co_filename)
        if not path.startswith(prefix):
            continue
        if code.co_name.startswith("<"):
            anonymous += 1
            continue
        qualname = getattr(code, "co_qualname", code.co_name)  # Python 3.11+: Class.method
        named.add(f"{Path(path).relative_to(base).as_posix()}:{qualname}")
    return sorted(named), anonymous


def report(title: str, codes: set[CodeType], root: Path, base: Path) -> None:
    """Print the number of distinct named functions and files under ``root``, then each ``file:function``."""
    entries, anonymous = named_functions(codes, root, base)
    print(title)
    print(f"  distinct functions: {len(entries)}")
    print(f"  distinct files: {len({entry.split(':')[0] for entry in entries})}")
    print(f"  (not counted: {anonymous} lambdas, comprehensions and generator expressions)")
    for entry in entries:
        print(f"    {entry}")


def count_mltp(mode: str, foreach) -> set[CodeType]:
    """The code objects of the package and of torch/optim that one MLTP step runs."""
    model = build_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = MLTPOptimizer(base, model, eta=1.0, alpha_init=(1e-3, 1e-3), mode=mode, foreach=foreach)

    def loss(x, y):
        return F.cross_entropy(model(x), y)

    *warm_up, (x, y) = batches(WARM_UP_STEPS + 1)
    for xs, ys in warm_up:
        opt.zero_grad()
        opt.step(*task_closures(loss, xs, ys))
    opt.zero_grad()
    closure_i, closure_j = task_closures(loss, x, y)  # built before: the count starts at opt.step
    return traced_code(lambda: opt.step(closure_i, closure_j), PACKAGE_DIR, OPTIM_DIR)


def count_adam() -> set[CodeType]:
    """The code objects of torch/optim that one ``Adam.step()`` runs."""
    model = build_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    *warm_up, (x, y) = batches(WARM_UP_STEPS + 1)
    for xs, ys in warm_up:
        adam.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        adam.step()
    adam.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return traced_code(adam.step, OPTIM_DIR)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="fo", help="MLTP mode (default: fo)")
    parser.add_argument(
        "--foreach",
        choices=list(FOREACH),
        default="none",
        help="MLTPOptimizer(foreach=...): none (fused) or false",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    foreach = FOREACH[args.foreach]
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, package at {PACKAGE_DIR}; "
        f"MLP 40-64-64-10, batch {BATCH}, Adam, {WARM_UP_STEPS} warm-up steps"
    )
    mltp = count_mltp(args.mode, foreach)
    report(
        f"\nMLTPOptimizer.step(closure_i, closure_j), mode={args.mode!r}, foreach={foreach}: "
        f"functions of {PACKAGE_DIR.name}",
        mltp,
        PACKAGE_DIR,
        PACKAGE_DIR.parent,
    )
    base_step, _ = named_functions(mltp, OPTIM_DIR, TORCH_PARENT)
    print(f"  (the same step also runs {len(base_step)} named functions of torch/optim: Adam's own step)")
    report("\ntorch.optim.Adam.step(): functions of torch/optim", count_adam(), OPTIM_DIR, TORCH_PARENT)


if __name__ == "__main__":
    main()
