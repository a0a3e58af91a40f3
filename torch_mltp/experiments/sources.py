"""The user's model, data and loss, named by import strings: ``package.module:function`` (the convention of
uvicorn, gunicorn and Python entry points) or ``path/to/file.py:function``.

The current directory is importable, as it is for ``python -m``. A model function takes no required
argument and returns an ``nn.Module``; a data function returns ``(train, test)``, two datasets of
``(input, target)`` pairs; a loss function takes ``(output, target)`` and returns the batch's mean loss.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from torch_mltp.data import DataSplits

from .runs import ExperimentError


def is_import_string(text: str) -> bool:
    """Whether ``text`` names a function (``module:function``) rather than a registered name."""
    return ":" in text.lstrip(":")


def load_function(spec: str, what: str) -> Callable:
    """The function that ``spec`` names; ``what`` (``--model``, ...) names the option in errors."""
    where, _, attribute = spec.rpartition(":")
    if not where or not attribute:
        raise ExperimentError(f"{what} {spec!r}: expected module:function or path/to/file.py:function")
    module = _import_file(where, what) if where.endswith(".py") else _import_module(where, what, spec)
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ExperimentError(f"{what} {spec!r}: {where} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ExperimentError(f"{what} {spec!r}: {attribute} is a {type(target).__name__}, not a function")
    return target


def _import_module(name: str, what: str, spec: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ExperimentError(f"{what} {spec!r}: cannot import {name} ({err})") from None


def _import_file(path: str, what: str):
    file = Path(path).resolve()
    if not file.is_file():
        raise ExperimentError(f"{what}: the file {path} does not exist")
    name = f"torch_mltp_user_{file.stem}_{abs(hash(str(file))):x}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    return module


def folder_name(name: str) -> str:
    """``name`` (an import string) as one folder name: ``examples-my_model.py-make_model``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


def function_name(function: Callable) -> str:
    """``module:qualname`` of a function given as a Python object (its name in run folders and tables)."""
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"


def user_data(make_data: Callable, name: str) -> DataSplits:
    """``make_data()`` as the experiments' data splits (no class count: the user's model fixes it)."""
    splits = make_data()
    if not isinstance(splits, (tuple, list)) or len(splits) != 2:
        raise ExperimentError(
            f"the data function {name} must return (train, test), two datasets of (input, target) pairs; "
            f"got {type(splits).__name__}"
        )
    train, test = splits
    for part, dataset in (("train", train), ("test", test)):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or len(dataset) == 0:
            raise ExperimentError(
                f"the data function {name}: its {part} set must be a non-empty dataset of (input, target) "
                f"pairs (with len() and indexing), got {type(dataset).__name__}"
            )
    first = train[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ExperimentError(f"the data function {name}: a sample must be an (input, target) pair")
    return DataSplits(train, test, 0, tuple(torch.as_tensor(first[0]).shape), name)
