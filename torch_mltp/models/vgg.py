"""The VGG-inspired networks CNet1-4 (CIFAR-10) and CCNet1-4 (CIFAR-100) of Deng & Zhang, section IV.

The paper writes them as layer strings; ``LAYER_SPECS`` holds those strings verbatim as tuples:

* ``("conv", c)`` = ``Conv(c, 3)``: a 3x3 convolution with ``c`` output channels, "same" padding, then ReLU;
* ``"mp"`` = ``MP``: 2x2 max pooling with stride 2;
* ``("fc", m)`` = ``Fc(m)``: a fully connected layer with ``m`` units, then ReLU.

The final ``Softmax(n)`` is a plain ``nn.Linear`` producing logits (the softmax is in the cross-entropy
loss).  CNet<k> and CCNet<k> share the spec of depth ``k``; only the number of classes differs.
All conv/linear weights are Xavier (Glorot) uniform, all biases zero, as in the paper.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

LAYER_SPECS: dict[int, tuple] = {
    1: (("conv", 256), "mp", ("fc", 512)),
    2: (("conv", 128), ("conv", 128), "mp", ("fc", 256)),
    3: (("conv", 128), ("conv", 128), "mp", ("fc", 256), ("fc", 256)),
    4: (
        ("conv", 128),
        ("conv", 128),
        "mp",
        ("conv", 256),
        ("conv", 256),
        "mp",
        ("conv", 512),
        ("conv", 512),
        "mp",
        ("fc", 1024),
    ),
}

CIFAR_INPUT_SHAPE = (3, 32, 32)


def build_vgg(
    depth: int, num_classes: int, input_shape: tuple[int, ...] = CIFAR_INPUT_SHAPE
) -> nn.Sequential:
    """Build CNet<depth>/CCNet<depth> as ``Sequential(features=..., classifier=...)`` for ``input_shape``.

    ``input_shape`` is ``(channels, height, width)``; height and width must be divisible by
    ``2 ** (number of MP layers)`` so that the flattened size is exact.
    """
    spec = LAYER_SPECS[depth]
    num_pools = sum(1 for layer in spec if layer == "mp")
    if len(input_shape) != 3 or any(s <= 0 for s in input_shape):
        raise ValueError(f"cnet/ccnet expect input_shape (channels, height, width), got {input_shape}")
    channels, height, width = input_shape
    if height % 2**num_pools or width % 2**num_pools:
        raise ValueError(
            f"cnet{depth}/ccnet{depth} have {num_pools} max-pooling layers, so height and width must be "
            f"divisible by {2**num_pools}; got input_shape {input_shape}"
        )

    features: list[nn.Module] = []
    classifier: list[nn.Module] = [nn.Flatten()]
    flat_size = None
    for layer in spec:
        if layer == "mp":
            features.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        elif layer[0] == "conv":
            features += [nn.Conv2d(channels, layer[1], kernel_size=3, padding=1), nn.ReLU()]
            channels = layer[1]
        else:  # ("fc", m): the first one consumes the flattened feature map
            in_features = flat_size if flat_size is not None else channels * height * width
            classifier += [nn.Linear(in_features, layer[1]), nn.ReLU()]
            flat_size = layer[1]
    classifier.append(nn.Linear(flat_size, num_classes))

    model = nn.Sequential(
        OrderedDict(features=nn.Sequential(*features), classifier=nn.Sequential(*classifier))
    )
    xavier_init_(model)
    return model


def xavier_init_(model: nn.Module) -> None:
    """Glorot uniform weights, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), and zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight, gain=1.0)
            nn.init.zeros_(module.bias)
