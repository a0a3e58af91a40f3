"""Count the ATen operations that touch tensor data in one training step, MLTP against its floor.

On a GPU every such operation is at least one kernel launch, so their number, not arithmetic, sets
the overhead of a first-order MLTP step over two accumulated half batches (``halves``). The count
comes from ``torch.profiler`` on the CPU: top-level ``aten::`` operations (those not called from
another ``aten::`` operation), without the metadata-only ones (views, reshapes, ``detach``, empty
allocations). Base optimizer: Adam with ``foreach=True``, as it runs on a GPU. Host synchronisations
are the ``aten::_local_scalar_dense`` calls (``.item()``, ``bool(tensor)``) outside the base
optimizer's own step (whose ``.item()`` calls read its step counters, CPU tensors also on a GPU).

"extra" counts the operations a contestant runs beyond ``halves`` (per operation name, the surplus),
"net" the difference of the totals: MLTP combines the two tasks' gradients with fused operations where
``halves`` accumulates each tensor's gradient with its own ``add_``, so the net can be negative.

    python benchmarks/count_ops.py                       # mlp, cnet1, resnet18: fo, full vs halves
    python benchmarks/count_ops.py --models mlp --show fo  # also list fo's extra operations
    python benchmarks/count_ops.py --device cuda         # the GPU code path, syncs from CUDA's debug mode

The last column is ``fo`` with ``nonfinite="skip"`` around a fused Adam (``fused=True``), the
configuration that skips a non-finite step on the device instead of asking the host.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_bench.opcount import SYNC, cuda_kernel_launches, cuda_synchronisations, data_ops
from step_bench.workloads import ALPHA_INIT, ETA, LR, WORKLOADS, build_model, make_batches

from torch_mltp import MLTPOptimizer, task_closures


def adam(model, fused=False):
    """Adam as it runs on a GPU: the multi-tensor (foreach) implementation, or the fused one."""
    return torch.optim.Adam(model.parameters(), lr=LR, **({"fused": True} if fused else {"foreach": True}))


def halves(model):
    opt = adam(model)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        for x_half, y_half in zip(x.chunk(2), y.chunk(2)):
            F.cross_entropy(model(x_half), y_half).backward()
        opt.step()

    return step


def mltp(mode, nonfinite="raise", fused=False):
    def factory(model):
        opt = MLTPOptimizer(
            adam(model, fused), model, eta=ETA, alpha_init=ALPHA_INIT, mode=mode, nonfinite=nonfinite
        )

        def step(x, y):
            opt.zero_grad()
            opt.step(*task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y))

        return step

    return factory


CONTESTANTS = {"halves": halves, "fo": mltp("fo"), "full": mltp("full")}
SYNC_FREE = mltp("fo", nonfinite="skip", fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnet1,resnet18")
    parser.add_argument("--show", choices=sorted(CONTESTANTS), help="list this contestant's extra operations")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(
        "| model | tensors | halves | fo | fo extra (net) | full | full extra (net) "
        "| syncs halves / fo / full | syncs fo (skip, fused Adam) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    launch_rows: list[str] = []
    for name in args.models.split(","):
        workload = WORKLOADS[name]
        ((x, y),) = make_batches(workload, 1, 128, device)
        counts = {}
        for contestant, make in CONTESTANTS.items():
            counts[contestant] = data_ops(make(build_model(workload, device, 0)), x, y)
        syncs = {contestant: counted.pop(SYNC) for contestant, counted in counts.items()}
        if device.type == "cuda":  # what waits for the device, whatever the operation
            for contestant, make in CONTESTANTS.items():
                syncs[contestant] = cuda_synchronisations(make(build_model(workload, device, 0)), x, y)
            sync_free = cuda_synchronisations(SYNC_FREE(build_model(workload, device, 0)), x, y)
            launches = {
                contestant: cuda_kernel_launches(make(build_model(workload, device, 0)), x, y)
                for contestant, make in (*CONTESTANTS.items(), ("fo (skip, fused Adam)", SYNC_FREE))
            }
            launch_rows.append(f"| {name} | " + " | ".join(str(n) for n in launches.values()) + " |")
        else:
            sync_free = data_ops(SYNC_FREE(build_model(workload, device, 0)), x, y)[SYNC]
        tensors = sum(1 for _ in build_model(workload, torch.device("cpu"), 0).parameters())
        total = {contestant: sum(counted.values()) for contestant, counted in counts.items()}
        extra = {c: sum((counts[c] - counts["halves"]).values()) for c in ("fo", "full")}
        print(
            f"| {name} | {tensors} | {total['halves']} "
            + "".join(f"| {total[c]} | {extra[c]} ({total[c] - total['halves']:+d}) " for c in ("fo", "full"))
            + f"| {syncs['halves']} / {syncs['fo']} / {syncs['full']} | {sync_free} |"
        )
        if args.show:
            more = counts[args.show] - counts["halves"]
            fewer = counts["halves"] - counts[args.show]
            print(
                f"\n{name} {args.show}: more {dict(more.most_common())}; fewer {dict(fewer.most_common())}\n"
            )

    if launch_rows:
        print("\n| model | CUDA kernel launches: halves | fo | full | fo (skip, fused Adam) |")
        print("|---|---|---|---|---|")
        print("\n".join(launch_rows))


if __name__ == "__main__":
    main()
