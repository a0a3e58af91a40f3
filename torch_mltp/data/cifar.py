"""CIFAR-10 and CIFAR-100 through torchvision, with the paper's preprocessing (section IV-A/B)."""

from __future__ import annotations

import os
from pathlib import Path

from .common import DatasetError, DataSplits
from .transforms import cifar_transforms

# data set name -> (display name, torchvision class name, number of classes)
CIFAR_VARIANTS = {
    "cifar10": ("CIFAR-10", "CIFAR10", 10),
    "cifar100": ("CIFAR-100", "CIFAR100", 100),
}


def cifar_class(name: str):
    """torchvision's class for ``name`` (``cifar10`` or ``cifar100``)."""
    from torchvision import datasets

    return getattr(datasets, CIFAR_VARIANTS[name][1])


def load_cifar(name: str, root: str | os.PathLike, download: bool = False) -> DataSplits:
    """The official python version of CIFAR-10/100 under ``root`` (torchvision's layout, md5-checked)."""
    title, _, num_classes = CIFAR_VARIANTS[name]
    dataset_class = cifar_class(name)
    folder = Path(root) / dataset_class.base_folder
    try:
        train = dataset_class(root, train=True, transform=cifar_transforms(train=True), download=download)
        test = dataset_class(root, train=False, transform=cifar_transforms(train=False))
    except (RuntimeError, OSError) as err:
        if download:
            files = [file for file, _ in dataset_class.train_list + dataset_class.test_list]
            raise DatasetError(
                f"{title} could not be downloaded from {dataset_class.url} into {root} ({err}): get "
                f"{dataset_class.filename} from that address another way (e.g. on a machine with network "
                f"access) and extract it under {root}, so that {folder} holds "
                f"{', '.join([*files, dataset_class.meta['filename']])} (docs/data.md), and run again: with "
                "the files in place, nothing is downloaded"
            ) from err
        if folder.is_dir():
            problem = f"{title} under {folder} is damaged (missing file or md5 mismatch)"
        else:
            problem = f"{title} not found under {folder}"
        raise DatasetError(
            f"{problem}: download it with download=True (CLI: --download) or extract the official python "
            f"version ({dataset_class.filename}) under {root}"
        ) from err
    return DataSplits(train=train, test=test, num_classes=num_classes, input_shape=(3, 32, 32), name=name)
