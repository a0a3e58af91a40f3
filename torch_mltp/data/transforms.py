"""Preprocessing and augmentation of the paper's image experiments (torchvision transforms v1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision import transforms


class PerImageStandardize:
    """Standardise each image by its own statistics (CIFAR preprocessing of Deng & Zhang, section IV-A:
    "each image is preprocessed by subtracting its mean and dividing it by its standard deviation").

    For an image x with N = C*H*W values: (x - mean(x)) / max(std(x), 1/sqrt(N)), where std is the
    population standard deviation over all pixels and channels.  The floor, taken from TensorFlow's
    ``tf.image.per_image_standardization``, keeps uniform images finite (they map to zeros).
    """

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mean = image.mean()
        std = image.std(correction=0).clamp_min(1.0 / math.sqrt(image.numel()))
        return (image - mean) / std

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pad_crop_flip(size: int, padding: int) -> list:
    """Training augmentation of the paper: zero-pad ``padding`` pixels on each side, take a random
    ``size`` x ``size`` crop, flip horizontally with probability 1/2 (torch's RNG drives all draws)."""
    return [transforms.RandomCrop(size, padding=padding, fill=0), transforms.RandomHorizontalFlip()]


def cifar_transforms(train: bool) -> transforms.Compose:
    """PIL image -> [0, 1] tensor -> per-image standardisation (-> pad 4, crop 32, flip when training)."""
    steps = [transforms.ToTensor(), PerImageStandardize()]
    return transforms.Compose((steps + pad_crop_flip(32, 4)) if train else steps)


def tiny_imagenet_transforms(train: bool, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """PIL image -> [0, 1] tensor -> (x - training-set channel mean) / channel std
    (-> pad 8, crop 64, flip when training); Deng & Zhang, section IV-C."""
    steps = [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    return transforms.Compose((steps + pad_crop_flip(64, 8)) if train else steps)
