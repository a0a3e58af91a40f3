"""Does MLTP help on your model? :func:`compare` (the arms on paired seeds, ending in a verdict), and the
paper's experiments: recipes, the training loop, comparisons over seeds and the command line.

Needs the ``vision`` extra (torchvision, tqdm, matplotlib, mnist1d, pillow, scipy). The core package
never imports this one.
"""

import importlib.util

_VISION_EXTRA = ("numpy", "torchvision", "tqdm", "matplotlib", "mnist1d", "PIL", "scipy")
_missing = [name for name in _VISION_EXTRA if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"the torch-mltp experiments need the 'vision' extra (missing: {', '.join(_missing)}); "
        "install it with: pip install 'torch-mltp[vision]'"
    )

from .decision import Arm, Decision, Plan, compare  # noqa: E402  (after the check of the extra)

__all__ = ["Arm", "Decision", "Plan", "compare"]
