"""torch_mltp.models: shapes, parameter counts from the paper's notation, initialisation statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_mltp.models import MODEL_NAMES, build_model, default_num_classes

INPUT_SHAPES = {"c": (3, 32, 32), "r": (3, 64, 64), "m": (40,)}


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    """Parameters of Conv(c_out, k) on c_in channels: weights + biases."""
    return c_in * c_out * k * k + c_out


def fc(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def vgg_parameters(depth: int, classes: int) -> int:
    """By hand from the paper's layer strings (section IV-A), for a 32x32 input (16x16 after one MP)."""
    return {
        1: conv(3, 256) + fc(256 * 16 * 16, 512) + fc(512, classes),
        2: conv(3, 128) + conv(128, 128) + fc(128 * 16 * 16, 256) + fc(256, classes),
        3: conv(3, 128) + conv(128, 128) + fc(128 * 16 * 16, 256) + fc(256, 256) + fc(256, classes),
        4: conv(3, 128)
        + conv(128, 128)
        + conv(128, 256)
        + conv(256, 256)
        + conv(256, 512)
        + conv(512, 512)
        + fc(512 * 4 * 4, 1024)
        + fc(1024, classes),
    }[depth]


# torchvision documents 11,689,512 (resnet18) and 21,797,672 (resnet34) parameters with the
# 1000-class head fc(512, 1000); removing the max-pool removes no parameters.
EXPECTED_PARAMETERS = {
    **{f"cnet{d}": vgg_parameters(d, 10) for d in range(1, 5)},
    **{f"ccnet{d}": vgg_parameters(d, 100) for d in range(1, 5)},
    "resnet18": 11_689_512 - fc(512, 1000) + fc(512, 200),
    "resnet34": 21_797_672 - fc(512, 1000) + fc(512, 200),
    # mnist1d MLPBase 40-100-100-10 and ConvBase (kernels 5, 3, 3; 25 channels; 25 * 5 features)
    "mnist1d_mlp": fc(40, 100) + fc(100, 100) + fc(100, 10),
    "mnist1d_cnn": (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + fc(25 * 5, 10),
    # 32 channels (kernels 5, 3, 3), averaged over positions: 32 features
    "mnist1d_gap_cnn": (1 * 32 * 5 + 32) + 2 * (32 * 32 * 3 + 32) + fc(32, 10),
}


def test_model_names():
    assert MODEL_NAMES == (
        "cnet1",
        "cnet2",
        "cnet3",
        "cnet4",
        "ccnet1",
        "ccnet2",
        "ccnet3",
        "ccnet4",
        "resnet18",
        "resnet34",
        "mnist1d_mlp",
        "mnist1d_cnn",
        "mnist1d_gap_cnn",
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_and_output_shape(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[name]
    classes = 10 if name.startswith(("cnet", "mnist1d")) else 100 if name.startswith("ccnet") else 200
    assert default_num_classes(name) == classes
    with torch.no_grad():
        assert model(torch.randn(2, *INPUT_SHAPES[name[0]])).shape == (2, classes)


def test_vgg_layer_types_and_names():
    """CNet4: 6 x (Conv2d 3x3 pad 1 + ReLU), 3 MaxPool2d(2) in ``features``; 2 Linear in ``classifier``."""
    model = build_model("cnet4")
    assert [type(m) for m in model.features] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 3
    assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert all(m.kernel_size == 2 and m.stride == 2 for m in model.features if isinstance(m, nn.MaxPool2d))
    assert [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)] == [
        (512 * 4 * 4, 1024),
        (1024, 10),
    ]


@pytest.mark.parametrize("name", ["cnet1", "cnet2", "cnet3", "cnet4", "ccnet3"])
def test_vgg_xavier_uniform_init_and_zero_bias(name):
    torch.manual_seed(0)
    layers = [m for m in build_model(name).modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers
    for layer in layers:
        weight = layer.weight.detach().double()
        receptive = weight[0, 0].numel() if weight.dim() == 4 else 1
        bound = math.sqrt(6.0 / ((weight.shape[1] + weight.shape[0]) * receptive))
        assert weight.abs().max().item() <= bound * (1 + 1e-6)  # float32 rounding of the bound
        # U(-a, a) has std a / sqrt(3); the estimate from >= 2560 draws is within 5 %
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert weight.abs().max().item() > 0.95 * bound
        assert torch.count_nonzero(layer.bias).item() == 0


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_without_maxpool(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    shapes = {}

    def record(module, args, output):
        shapes["layer1"] = output.shape

    model.layer1.register_forward_hook(record)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    assert shapes["layer1"] == (2, 64, 32, 32)  # only conv1's stride 2; 16x16 with the max-pool


def test_resnet_kaiming_init():
    torch.manual_seed(0)
    model = build_model("resnet18")
    weight = model.layer4[1].conv2.weight.detach().double()  # 512 x 512 x 3 x 3
    assert weight.mean().abs().item() < 1e-3
    assert weight.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.01)
    stem = model.conv1.weight.detach().double()  # 64 x 3 x 7 x 7: fan_out = 64 * 49
    assert stem.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 49)), rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert model.fc.weight.abs().max().item() <= 1 / math.sqrt(512)
    assert model.fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)


def test_mnist1d_mlp_is_the_residual_baseline():
    """logits = W3 (h + relu(W2 h + b2)) + b3 with h = relu(W1 x + b1), computed by hand."""
    torch.manual_seed(0)
    model = build_model("mnist1d_mlp")
    x = torch.randn(5, 40)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in linears]
    h = torch.relu(x @ w1.T + b1)
    expected = (h + torch.relu(h @ w2.T + b2)) @ w3.T + b3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_mnist1d_cnn_takes_flat_and_channel_signals():
    torch.manual_seed(0)
    model = build_model("mnist1d_cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (25, 5, 2, 1),
        (25, 3, 2, 1),
        (25, 3, 2, 1),
    ]
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(1)))
    assert build_model("mnist1d_cnn", input_shape=(1, 40)).linear.in_features == 125


def test_mnist1d_gap_cnn_averages_over_positions():
    torch.manual_seed(0)
    model = build_model("mnist1d_gap_cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (32, 5, 1, 2),
        (32, 3, 2, 1),
        (32, 3, 2, 1),
    ]
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(1)))
        # the classifier sees the mean over the 10 positions left of the third convolution
        features = model.conv3(model.conv2(model.conv1(x.unsqueeze(1)).relu()).relu()).relu()
        assert features.shape == (4, 32, 10) and torch.equal(features, model.features(x))
        torch.testing.assert_close(model(x), model.linear(features.mean(dim=2)))
        # a pattern moved by 4 positions (a multiple of the strides 2 x 2) in a zero signal: same output
        pattern = torch.zeros(1, 40)
        pattern[0, 12:20] = torch.randn(8)
        torch.testing.assert_close(model(pattern), model(pattern.roll(4, dims=1)))
        # any length: the average adapts
        assert build_model("mnist1d_gap_cnn", input_shape=(64,))(torch.randn(2, 64)).shape == (2, 10)
    assert isinstance(model.linear, nn.Linear) and model.linear.in_features == 32


def test_num_classes_and_input_shape_override():
    with torch.no_grad():
        assert build_model("cnet2", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
        model = build_model("cnet2", input_shape=(1, 64, 64))
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 10)
    assert model.classifier[1].in_features == 128 * 32 * 32
    assert build_model("mnist1d_mlp", input_shape=(60,)).linear1.in_features == 60


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cnet4", {"input_shape": (3, 36, 36)}),  # 36 is not divisible by 2**3
        ("cnet1", {"input_shape": (32, 32)}),
        ("resnet18", {"input_shape": (1, 64, 64)}),
        ("mnist1d_cnn", {"input_shape": (2, 40)}),
        ("mnist1d_gap_cnn", {"input_shape": (2, 40)}),
        ("cnet1", {"num_classes": 0}),
        ("cnet1", {"num_classes": 2.5}),
    ],
)
def test_invalid_arguments(name, kwargs):
    with pytest.raises(ValueError, match=r"expect|must be"):
        build_model(name, **kwargs)


@pytest.mark.parametrize("call", [lambda: build_model("vgg16"), lambda: default_num_classes("vgg16")])
def test_unknown_name_lists_choices(call):
    with pytest.raises(ValueError) as info:
        call()
    assert "vgg16" in str(info.value)
    assert all(name in str(info.value) for name in MODEL_NAMES)
