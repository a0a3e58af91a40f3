"""The MNIST-1D baseline models of Greydanus & Steinbach (``MLPBase`` and ``ConvBase`` in the mnist1d
repository, ``notebooks/models.py``), reproduced layer for layer, and a small CNN with global average
pooling (not the authors').

Both keep PyTorch's default initialisation, as the mnist1d authors do (the paper's Xavier/Kaiming
settings are for its CIFAR and Tiny ImageNet networks; MNIST-1D is not in the paper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MNIST1D_INPUT_SHAPE = (40,)


class MNIST1DMLP(nn.Module):
    """``in -> 100 -> 100 -> classes`` with ReLU and the authors' residual connection around the middle
    layer: h1 = relu(W1 x), h2 = h1 + relu(W2 h1), logits = W3 h2.  Inputs are flattened first."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x.flatten(1)).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


def _conv_out_length(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class _ThreeConvolutions(nn.Module):
    """The features of both CNNs: ``conv1``, ``conv2`` and ``conv3``, each followed by a ReLU."""

    conv1: nn.Conv1d
    conv2: nn.Conv1d
    conv3: nn.Conv1d

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The third convolution's feature map of a batch shaped (B, length) or (B, 1, length)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()


class MNIST1DCNN(_ThreeConvolutions):
    """Three stride-2 ``Conv1d`` layers with ``channels`` channels (kernels 5, 3, 3; padding 1) and ReLU,
    then a linear classifier on the flattened feature map (25 * 5 = 125 features for length 40).

    Accepts a batch of shape (B, length) or (B, 1, length)."""

    def __init__(self, length: int, num_classes: int, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_length = _conv_out_length(_conv_out_length(_conv_out_length(length, 5), 3), 3)
        self.linear = nn.Linear(channels * out_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x).flatten(1))


class MNIST1DGAPCNN(_ThreeConvolutions):
    """A small CNN that averages its features over positions: three ``Conv1d`` layers with ``channels``
    channels and ReLU (kernel 5, then kernel 3 with stride 2 twice; padding keeps each layer's positions),
    global average pooling over the remaining positions, and a linear classifier on the ``channels``
    averages. The average makes the features the classifier sees independent of where a pattern lies in the
    signal, a prior that MNIST-1D's translated digits reward; the authors' ``ConvBase``
    (:class:`MNIST1DCNN`) flattens its feature map instead and must learn each position apart.

    Accepts a batch of shape (B, length) or (B, 1, length)."""

    def __init__(self, num_classes: int, channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x).mean(dim=2))


def build_mnist1d_mlp(num_classes: int, input_shape: tuple[int, ...] = MNIST1D_INPUT_SHAPE) -> MNIST1DMLP:
    """The MLP for signals of any shape (flattened to ``prod(input_shape)`` inputs)."""
    if not input_shape or min(input_shape) <= 0:
        raise ValueError(f"mnist1d_mlp expects a non-empty input_shape such as (40,), got {input_shape}")
    return MNIST1DMLP(math.prod(input_shape), num_classes)


def build_mnist1d_cnn(num_classes: int, input_shape: tuple[int, ...] = MNIST1D_INPUT_SHAPE) -> MNIST1DCNN:
    """The 1-D CNN for signals of shape (length,) or (1, length); length >= 3 so that the first kernel
    (size 5) fits the padded signal."""
    length = input_shape[-1] if input_shape else 0
    if input_shape not in ((length,), (1, length)) or length < 3:
        raise ValueError(
            f"mnist1d_cnn expects input_shape (length,) or (1, length) with length >= 3, got {input_shape}"
        )
    return MNIST1DCNN(length, num_classes)


def build_mnist1d_gap_cnn(
    num_classes: int, input_shape: tuple[int, ...] = MNIST1D_INPUT_SHAPE
) -> MNIST1DGAPCNN:
    """The CNN with global average pooling, for signals of shape (length,) or (1, length); any length >= 1
    (the average adapts to it)."""
    length = input_shape[-1] if input_shape else 0
    if input_shape not in ((length,), (1, length)) or length < 1:
        raise ValueError(
            f"mnist1d_gap_cnn expects input_shape (length,) or (1, length), length >= 1, got {input_shape}"
        )
    return MNIST1DGAPCNN(num_classes)
