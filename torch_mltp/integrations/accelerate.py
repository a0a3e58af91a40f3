"""MLTP with Hugging Face ``accelerate`` (``pip install torch-mltp[accelerate]``; ``docs/integrations.md``).

Prepare the model first, build the :class:`~torch_mltp.MLTPOptimizer` on the prepared model, then
prepare the ``MLTPOptimizer``::

    model, loader = accelerator.prepare(model, loader)
    mltp = MLTPOptimizer(torch.optim.AdamW(model.parameters()), model, mode="fo")
    optimizer = accelerator.prepare(mltp)

``optimizer`` (accelerate's ``AcceleratedOptimizer``) steps ``mltp`` through the accelerator's
``GradScaler`` and honours gradient accumulation; ``mltp.backward`` computes the gradients.
"""

from __future__ import annotations

import torch

from . import require

require("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that ``accelerator.prepare`` wrapped (``AcceleratedOptimizer.optimizer``), e.g. the
    ``MLTPOptimizer`` behind the ``optimizer`` above; any other optimizer is returned as it is."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
