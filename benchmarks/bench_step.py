#!/usr/bin/env python3
"""Cost of one MLTP training step: torch_mltp against plain training and against ``higher`` / ``torchopt``.

Prints markdown tables (see docs/benchmarks.md):

1. time per step, every contestant interleaved round-robin on the same model (median, min-max, ratios);
2. peak memory per (model, contestant), each in its own subprocess;
3. scaling of the ``fo`` overhead over ``halves`` with MLP depth;
4. stability of time and memory per step over many steps (``fo`` and ``full`` on the MLP);
5. whether ``fo`` runs unchanged on a ``torch.compile``d model;

and a PASS/MISS line for each performance target (``--quick``, a smoke run, prints the numbers without
verdicts). Ratios are only meaningful between numbers measured side by side in one run on a quiet machine.

    python benchmarks/bench_step.py [--models mlp,cnet1,cnet4,resnet18] [--steps N] [--warmup N]
                                    [--device cpu|cuda] [--out FILE] [--quick]

The code is in the package ``step_bench`` next to this file:

- ``workloads``: the training setting, the models and their synthetic batches;
- ``contestants``: one factory ``model -> step(x, y)`` per contestant;
- ``lineup``: which contestants run on a model (the peers' float64 gradient check included);
- ``timing``: the one interleaved timing loop;
- ``memory``: memory in use, and peak memory measured in a subprocess per configuration;
- ``sections``: the five sections of the report;
- ``targets``: the performance targets and the table of verdicts;
- ``report``: markdown formatting;
- ``cli``: the options, the header, and the sections in turn.
"""

import sys
from pathlib import Path

try:
    import torch_mltp  # noqa: F401
except ImportError:  # run from a checkout without installing: python benchmarks/bench_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step_bench package, however this is run

from step_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
