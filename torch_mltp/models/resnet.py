"""ResNet-18/34 for Tiny ImageNet (Deng & Zhang, section IV-C).

torchvision's ImageNet ResNets with 200 outputs and the first max-pooling layer removed ("as the input
image size is already very small"), so a 64x64 input reaches the residual stages at 32x32.

Initialisation ("Kaiming initialization" in the paper), applied explicitly here rather than relied upon:

* every ``nn.Conv2d``: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, i.e. N(0, 2 / fan_out)
  with fan_out = out_channels * k * k (He et al. 2015; the same draw torchvision makes);
* every ``nn.BatchNorm2d``: weight 1, bias 0;
* the final ``nn.Linear``: PyTorch's default, ``kaiming_uniform_(a=sqrt(5))`` for the weight, which is
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same range for the bias (torchvision's choice, kept as is).
"""

from __future__ import annotations

from torch import nn

TINY_IMAGENET_INPUT_SHAPE = (3, 64, 64)


def build_resnet(depth: int, num_classes: int, input_shape: tuple[int, ...] = TINY_IMAGENET_INPUT_SHAPE):
    """torchvision ``resnet18``/``resnet34`` with ``num_classes`` outputs and ``maxpool`` = identity."""
    if len(input_shape) != 3 or input_shape[0] != 3 or min(input_shape) <= 0:
        raise ValueError(f"resnet{depth} expects input_shape (3, height, width), got {input_shape}")
    from torchvision import models  # deferred: torchvision is only needed for the ResNets

    constructor = {18: models.resnet18, 34: models.resnet34}[depth]
    model = constructor(weights=None, num_classes=num_classes)
    model.maxpool = nn.Identity()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
