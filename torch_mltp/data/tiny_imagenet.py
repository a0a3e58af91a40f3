"""Tiny ImageNet (200 classes, 64x64) from its official folder layout, with the paper's preprocessing
(Deng & Zhang, section IV-C): every image is normalised by the training set's per-channel mean and
standard deviation; training adds pad 8 + random 64x64 crop + horizontal flip.  The labelled ``val``
split serves as the test set (the official ``test`` split has no labels).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .common import DatasetError, DataSplits
from .transforms import tiny_imagenet_transforms

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt"
REQUIRED = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
"""The top of the layout, which ``dataset_present`` looks for."""
STATS_FILE = "mltp_channel_stats.json"


def _fail(problem: str, root: str | os.PathLike) -> DatasetError:
    return DatasetError(
        f"{problem}; expected {Path(root) / FOLDER}/ with {LAYOUT}: download {URL} and unzip it under {root}"
    )


class ImageFiles(Dataset):
    """Images read from ``(path, label)`` pairs, converted to RGB (grayscale files included), then
    ``transform``ed; yields ``(tensor, int label)``."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def _training_samples(folder: Path, wnids: list[str], root) -> list[tuple[str, int]]:
    samples = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        files = sorted(images.glob("*.JPEG")) if images.is_dir() else []
        if not files:
            raise _fail(f"no training images {images}/*.JPEG for class {wnid} listed in wnids.txt", root)
        samples += [(str(path), label) for path in files]
    return samples


def _validation_samples(folder: Path, class_index: dict[str, int], root) -> list[tuple[str, int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise _fail(f"missing {annotations}", root)
    samples = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise _fail(f"{annotations} line {line_number}: expected tab-separated filename and wnid", root)
        filename, wnid = fields[:2]
        if wnid not in class_index:
            raise _fail(f"{annotations} line {line_number}: class {wnid!r} is not in wnids.txt", root)
        path = folder / "val" / "images" / filename
        if not path.is_file():
            raise _fail(f"{annotations} line {line_number}: missing image {path}", root)
        samples.append((str(path), class_index[wnid]))
    if not samples:
        raise _fail(f"{annotations} lists no images", root)
    return samples


def channel_mean_std(paths: list[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and population standard deviation over all pixels of all images (RGB, values
    in [0, 1]), accumulated in float64."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(axis=0)
        total_sq += (pixels**2).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _cached_channel_stats(folder: Path, paths: list[str]) -> tuple[list[float], list[float]]:
    """``channel_mean_std`` of the training images, cached in ``<folder>/mltp_channel_stats.json``;
    the cache is recomputed when the number of training images changes, and skipped silently if the
    folder is read-only."""
    cache = folder / STATS_FILE
    try:
        stored = json.loads(cache.read_text())
        if stored["num_images"] == len(paths):
            return stored["mean"], stored["std"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = channel_mean_std(paths)
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"num_images": len(paths), "mean": mean, "std": std}))
    return mean, std


def load_tiny_imagenet(root: str | os.PathLike, download: bool = False) -> DataSplits:
    """Tiny ImageNet from ``<root>/tiny-imagenet-200``; labels are indices into the sorted wnids of
    ``wnids.txt``, one mapping for both splits.  ``download=True`` only helps if the set is present:
    automatic download is not supported."""
    folder = Path(root) / FOLDER
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        problem = f"missing {wnids_file}"
        if download:
            problem = f"automatic download of Tiny ImageNet is not supported and {problem}"
        raise _fail(problem, root)
    wnids = sorted(set(wnids_file.read_text().split()))
    if not wnids:
        raise _fail(f"{wnids_file} lists no classes", root)
    train_samples = _training_samples(folder, wnids, root)
    test_samples = _validation_samples(folder, {wnid: i for i, wnid in enumerate(wnids)}, root)
    mean, std = _cached_channel_stats(folder, [path for path, _ in train_samples])
    return DataSplits(
        train=ImageFiles(train_samples, tiny_imagenet_transforms(True, mean, std)),
        test=ImageFiles(test_samples, tiny_imagenet_transforms(False, mean, std)),
        num_classes=len(wnids),
        input_shape=(3, 64, 64),
        name="tiny-imagenet",
    )
