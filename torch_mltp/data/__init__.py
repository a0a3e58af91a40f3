"""The data sets of the experiments, with the paper's preprocessing and augmentation.

``load_dataset(name, root)`` returns :class:`DataSplits`; a missing or damaged data set raises
:class:`DatasetError` with a one-line message saying what was expected where and how to get it.
See ``docs/data.md`` for the on-disk layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import DatasetError, DataSplits

__all__ = [
    "DATASET_NAMES",
    "DataSplits",
    "DatasetError",
    "dataset_folder",
    "dataset_present",
    "default_model_names",
    "load_dataset",
]

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


def dataset_folder(name: str, root: str | os.PathLike) -> Path:
    """The folder under ``root`` where :func:`load_dataset` looks for data set ``name`` (MNIST-1D: where it
    caches what it generates)."""
    _check_name(name)
    if name == "mnist1d":
        return Path(root) / "mnist1d"
    if name == "tiny-imagenet":
        from .tiny_imagenet import FOLDER

        return Path(root) / FOLDER
    from .cifar import cifar_class

    return Path(root) / cifar_class(name).base_folder


def dataset_present(name: str, root: str | os.PathLike) -> bool:
    """Whether data set ``name``'s files are under ``root`` (by name, without reading them: a damaged file
    is found by :func:`load_dataset`). MNIST-1D is always present: it is generated when missing."""
    folder = dataset_folder(name, root)
    if name == "mnist1d":
        return True  # generated when missing
    if name == "tiny-imagenet":
        from .tiny_imagenet import REQUIRED

        return all((folder / path).exists() for path in REQUIRED)
    from .cifar import cifar_class

    dataset_class = cifar_class(name)
    files = [file for file, _ in dataset_class.train_list + dataset_class.test_list]
    return all((folder / file).is_file() for file in [*files, dataset_class.meta["filename"]])
