"""torch_mltp: the meta-learning based training procedure (MLTP) of Deng & Zhang for any PyTorch model.

The core (this package's top level) imports only torch::

    from torch_mltp import MLTPOptimizer, task_closures
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, eta=1.0, mode="fo")
    opt.zero_grad()
    J = opt.step(*task_closures(lambda x, y: F.cross_entropy(model(x), y), x, y))

The stateless computation of one step is :mod:`torch_mltp.functional`.
"""

from .checkpoint import ShardedCheckpoint
from .optimizer import MLTPOptimizer, MLTPStepResult, task_closures
from .selection import CONV_TYPES, FC_TYPES, PAPER_MODES, Mode, select_layers

__version__ = "0.3.0"

__all__ = [
    "CONV_TYPES",
    "FC_TYPES",
    "PAPER_MODES",
    "MLTPOptimizer",
    "MLTPStepResult",
    "Mode",
    "ShardedCheckpoint",
    "__version__",
    "select_layers",
    "task_closures",
]
