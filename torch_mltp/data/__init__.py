"""The data sets of the experiments, with the paper's preprocessing and augmentation.

``load_dataset(name, root)`` returns :class:`DataSplits`; a missing or damaged data set raises
:class:`DatasetError` with a one-line message saying what was expected where and how to get it.
See ``docs/data.md`` for the on-disk layouts.
"""

from __future__ import annotations

import os

from .common import DatasetError, DataSplits

__all__ = ["DATASET_NAMES", "DataSplits", "DatasetError", "default_model_names", "load_dataset"]

DATASET_NAMES = ("mnist1d", "cifar10", "cifar100", "tiny-imagenet")

_MODELS = {
    "mnist1d": ("mnist1d_mlp", "mnist1d_cnn"),
    "cifar10": ("cnet1", "cnet2", "cnet3", "cnet4"),
    "cifar100": ("ccnet1", "ccnet2", "ccnet3", "ccnet4"),
    "tiny-imagenet": ("resnet18", "resnet34"),
}


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def default_model_names(dataset: str) -> tuple[str, ...]:
    """The models the paper trains on ``dataset`` (for mnist1d: the mnist1d authors' baselines)."""
    _check_name(dataset)
    return _MODELS[dataset]


def load_dataset(name: str, root: str | os.PathLike, download: bool = False) -> DataSplits:
    """Load data set ``name`` (one of ``DATASET_NAMES``) stored under ``root``.

    ``download=True`` fetches CIFAR-10/100 if absent; MNIST-1D is always generated locally (and cached
    under ``root``); Tiny ImageNet must be unpacked by hand.
    """
    _check_name(name)
    if name == "mnist1d":
        from .mnist1d import load_mnist1d

        return load_mnist1d(root)
    if name == "tiny-imagenet":
        from .tiny_imagenet import load_tiny_imagenet

        return load_tiny_imagenet(root, download)
    from .cifar import load_cifar

    return load_cifar(name, root, download)
