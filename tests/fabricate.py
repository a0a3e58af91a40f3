"""Tiny copies of the data sets in their official on-disk formats, for the data tests.

* CIFAR-10/100: the "python version" pickles (``cifar-10-batches-py/data_batch_1..5, test_batch,
  batches.meta``; ``cifar-100-python/train, test, meta``) with uint8 ``data`` rows of 3072 bytes
  (1024 red, 1024 green, 1024 blue, each row-major 32x32).
* Tiny ImageNet: ``tiny-imagenet-200/wnids.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``,
  ``val/images/val_<i>.JPEG`` and the tab-separated ``val/val_annotations.txt``.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class FabricatedCifar:
    folder: Path
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC, in file order
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    md5: dict[str, str]  # file name -> md5 of the fabricated file


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official (N, 3072) channel-planar rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)


def _dump(path: Path, content: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar(
    root: Path, variant: str, per_batch: int = 2, num_test: int = 4, seed: int = 0
) -> FabricatedCifar:
    """Random images and labels in the official pickle layout of ``variant`` ("cifar10"/"cifar100")."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if variant == "cifar10" else 100
    batches = 5 if variant == "cifar10" else 1
    folder = root / ("cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    train_images = rng.integers(0, 256, (batches * per_batch, 32, 32, 3), dtype=np.uint8)
    train_labels = rng.integers(0, num_classes, batches * per_batch).tolist()
    test_images = rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, num_classes, num_test).tolist()

    if variant == "cifar10":
        for b in range(batches):
            part = slice(b * per_batch, (b + 1) * per_batch)
            _dump(
                folder / f"data_batch_{b + 1}",
                {
                    "batch_label": f"training batch {b + 1} of 5",
                    "labels": train_labels[part],
                    "data": _rows(train_images[part]),
                    "filenames": [f"img_{i}.png" for i in range(per_batch)],
                },
            )
        _dump(
            folder / "test_batch",
            {
                "batch_label": "testing batch 1 of 1",
                "labels": test_labels,
                "data": _rows(test_images),
                "filenames": [],
            },
        )
        _dump(
            folder / "batches.meta",
            {
                "num_cases_per_batch": per_batch,
                "num_vis": 3072,
                "label_names": [f"class{i}" for i in range(10)],
            },
        )
    else:
        splits = (("train", train_images, train_labels), ("test", test_images, test_labels))
        for name, images, labels in splits:
            _dump(
                folder / name,
                {
                    "batch_label": name,
                    "fine_labels": labels,
                    "coarse_labels": [label // 5 for label in labels],
                    "data": _rows(images),
                    "filenames": [],
                },
            )
        _dump(
            folder / "meta",
            {
                "fine_label_names": [f"fine{i}" for i in range(100)],
                "coarse_label_names": [f"coarse{i}" for i in range(20)],
            },
        )
    md5 = {path.name: md5_of(path) for path in folder.iterdir()}
    return FabricatedCifar(folder, train_images, train_labels, test_images, test_labels, md5)


def cifar_checksum_attributes(dataset_class, md5: dict[str, str]) -> dict:
    """``train_list``/``test_list``/``meta`` of a torchvision CIFAR class with the fabricated files' md5,
    to be monkeypatched onto the class so that its real integrity check runs against the fake files."""
    return {
        "train_list": [[name, md5[name]] for name, _ in dataset_class.train_list],
        "test_list": [[name, md5[name]] for name, _ in dataset_class.test_list],
        "meta": {**dataset_class.meta, "md5": md5[dataset_class.meta["filename"]]},
    }


@dataclass
class FabricatedTinyImagenet:
    folder: Path
    wnids: list[str]  # in the (unsorted) order written to wnids.txt
    train: list[tuple[Path, str]]  # (image file, wnid)
    val: list[tuple[Path, str]]
    grayscale: list[Path]


def write_tiny_imagenet(
    root: Path,
    wnids=("n0300", "n0100", "n0200"),
    train_per_class: int = 3,
    val_per_class: int = 2,
    seed: int = 0,
) -> FabricatedTinyImagenet:
    """Random 64x64 JPEGs in the official layout; the first training image of the first class and the
    first validation image are grayscale ("L" mode) files, as some real Tiny ImageNet images are."""
    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    grayscale: list[Path] = []

    def save(path: Path, gray: bool) -> None:
        shape = (64, 64) if gray else (64, 64, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format="JPEG")
        if gray:
            grayscale.append(path)

    train = []
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(train_per_class):
            path = images / f"{wnid}_{i}.JPEG"
            save(path, gray=(c == 0 and i == 0))
            train.append((path, wnid))

    val, lines = [], []
    for i in range(val_per_class * len(wnids)):
        wnid = wnids[i % len(wnids)]
        path = folder / "val" / "images" / f"val_{i}.JPEG"
        save(path, gray=(i == 0))
        val.append((path, wnid))
        lines.append(f"{path.name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return FabricatedTinyImagenet(folder, list(wnids), train, val, grayscale)
