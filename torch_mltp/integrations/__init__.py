"""Integrations with training engines, one module each; importing ``torch_mltp`` imports none of them.

* :mod:`torch_mltp.integrations.transformers`: ``MLTPTrainer``, a Hugging Face ``Trainer``
  (``pip install torch-mltp[transformers]``).
* :mod:`torch_mltp.integrations.accelerate`: MLTP in an ``accelerate`` loop
  (``pip install torch-mltp[accelerate]``).

See ``docs/integrations.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(framework: str) -> ModuleType:
    """Import ``framework``, or say which extra installs it."""
    try:
        return importlib.import_module(framework)
    except ImportError as err:
        raise ImportError(
            f"torch_mltp.integrations.{framework} needs {framework}: pip install 'torch-mltp[{framework}]'"
        ) from err
