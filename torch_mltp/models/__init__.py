"""The networks of the experiments, built by name.

* ``cnet1`` .. ``cnet4``: CIFAR-10 networks of Deng & Zhang (section IV-A), 10 classes, input 3x32x32;
* ``ccnet1`` .. ``ccnet4``: the same architectures for CIFAR-100 (section IV-B), 100 classes;
* ``resnet18``, ``resnet34``: Tiny ImageNet (section IV-C), 200 classes, input 3x64x64, no first max-pool;
* ``mnist1d_mlp``, ``mnist1d_cnn``: the MNIST-1D baselines of Greydanus & Steinbach, 10 classes, input (40,);
* ``mnist1d_gap_cnn``: a small CNN with global average pooling over positions for MNIST-1D.

Convolutions are ``nn.Conv2d``/``nn.Conv1d`` and fully connected layers ``nn.Linear`` throughout.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mnist1d import MNIST1D_INPUT_SHAPE, build_mnist1d_cnn, build_mnist1d_gap_cnn, build_mnist1d_mlp
from .resnet import TINY_IMAGENET_INPUT_SHAPE, build_resnet
from .vgg import CIFAR_INPUT_SHAPE, LAYER_SPECS, build_vgg

__all__ = ["MODEL_NAMES", "build_model", "default_num_classes"]


def _vgg(depth: int) -> Callable[[int, tuple[int, ...]], nn.Module]:
    return lambda num_classes, input_shape: build_vgg(depth, num_classes, input_shape)


def _resnet(depth: int) -> Callable[[int, tuple[int, ...]], nn.Module]:
    return lambda num_classes, input_shape: build_resnet(depth, num_classes, input_shape)


# name -> (builder(num_classes, input_shape), paper number of classes, paper input shape)
_REGISTRY: dict[str, tuple[Callable[[int, tuple[int, ...]], nn.Module], int, tuple[int, ...]]] = {
    **{f"cnet{d}": (_vgg(d), 10, CIFAR_INPUT_SHAPE) for d in LAYER_SPECS},
    **{f"ccnet{d}": (_vgg(d), 100, CIFAR_INPUT_SHAPE) for d in LAYER_SPECS},
    "resnet18": (_resnet(18), 200, TINY_IMAGENET_INPUT_SHAPE),
    "resnet34": (_resnet(34), 200, TINY_IMAGENET_INPUT_SHAPE),
    "mnist1d_mlp": (build_mnist1d_mlp, 10, MNIST1D_INPUT_SHAPE),
    "mnist1d_cnn": (build_mnist1d_cnn, 10, MNIST1D_INPUT_SHAPE),
    "mnist1d_gap_cnn": (build_mnist1d_gap_cnn, 10, MNIST1D_INPUT_SHAPE),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _entry(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def default_num_classes(name: str) -> int:
    """The number of classes the paper (or the MNIST-1D baseline) uses for model ``name``."""
    return _entry(name)[1]


def build_model(
    name: str, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """A freshly initialised model ``name`` (one of ``MODEL_NAMES``).

    ``num_classes`` defaults to ``default_num_classes(name)``; ``input_shape`` (one sample, without the
    batch dimension) defaults to the model's data set: (3, 32, 32), (3, 64, 64) or (40,).
    Initialisation draws from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.
    """
    builder, paper_classes, paper_shape = _entry(name)
    if num_classes is None:
        num_classes = paper_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if input_shape is None:
        input_shape = paper_shape
    try:
        input_shape = tuple(int(s) for s in input_shape)
    except TypeError:
        expected = f"a tuple of ints such as {paper_shape}"
        raise TypeError(f"input_shape must be {expected}, got {input_shape!r}") from None
    return builder(num_classes, input_shape)
