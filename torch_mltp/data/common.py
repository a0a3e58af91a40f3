"""Types shared by the data set loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


class DatasetError(Exception):
    """A data set is missing, damaged or cannot be fetched; the message says where and how to get it."""


@dataclass(frozen=True)
class DataSplits:
    """The two splits of a data set, each yielding ``(float32 tensor, int label)``.

    ``train`` applies the paper's training augmentation, ``test`` none; ``input_shape`` is the shape of
    one sample without the batch dimension.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


class TensorPairs(Dataset):
    """In-memory samples ``inputs[i]`` (float32) with integer labels ``labels[i]``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.labels[index])
