"""torch_mltp.data on tiny fabricated copies of the data sets in their official formats (fabricate.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from fabricate import cifar_checksum_attributes, write_cifar, write_tiny_imagenet
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from torch_mltp.data import DATASET_NAMES, DatasetError, default_model_names, load_dataset
from torch_mltp.data.transforms import PerImageStandardize
from torch_mltp.models import MODEL_NAMES

CIFAR_CLASSES = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def standardised(image_hwc: np.ndarray) -> np.ndarray:
    """The paper's per-image standardisation, written independently: CHW float64."""
    x = image_hwc.astype(np.float64) / 255.0
    return ((x - x.mean()) / max(x.std(), 1.0 / math.sqrt(x.size))).transpose(2, 0, 1)


def windows_matching(output: torch.Tensor, padded: np.ndarray) -> list[tuple[int, int, bool]]:
    """All (top, left, flipped) such that ``output`` equals that window of ``padded`` (flipped or not)."""
    size = output.shape[-1]
    windows = sliding_window_view(padded, (size, size), axis=(1, 2))  # (C, tops, lefts, size, size)
    matches = []
    for flipped in (False, True):
        target = output.numpy()[:, :, ::-1] if flipped else output.numpy()
        corner_fits = np.abs(windows[..., 0, 0] - target[:, None, None, 0, 0]).max(axis=0) < 1e-5
        matches += [
            (int(top), int(left), flipped)
            for top, left in zip(*np.nonzero(corner_fits))
            if np.abs(windows[:, top, left] - target).max() < 1e-5
        ]
    return matches


def assert_pad_crop_flip(dataset, index: int, unaugmented: np.ndarray, padding: int) -> None:
    """Over 20 seeds, each training sample is exactly one window of the zero-padded image, possibly
    flipped; both orientations and several offsets occur; the same seed gives the same sample."""
    padded = np.pad(unaugmented, ((0, 0), (padding, padding), (padding, padding)))
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, _ = dataset[index]
        assert image.dtype == torch.float32
        assert image.shape == unaugmented.shape
        matches = windows_matching(image, padded)
        assert len(matches) == 1, matches
        seen.add(matches[0])
        torch.manual_seed(seed)
        assert torch.equal(dataset[index][0], image)
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 5


# ---------------------------------------------------------------- registry


def test_dataset_names_and_default_models():
    assert DATASET_NAMES == ("mnist1d", "cifar10", "cifar100", "tiny-imagenet")
    assert default_model_names("cifar10") == ("cnet1", "cnet2", "cnet3", "cnet4")
    assert default_model_names("cifar100") == ("ccnet1", "ccnet2", "ccnet3", "ccnet4")
    assert default_model_names("tiny-imagenet") == ("resnet18", "resnet34")
    assert default_model_names("mnist1d") == ("mnist1d_mlp", "mnist1d_cnn")
    assert all(set(default_model_names(name)) <= set(MODEL_NAMES) for name in DATASET_NAMES)


@pytest.mark.parametrize("call", [lambda: load_dataset("imagenet", "."), lambda: default_model_names("svhn")])
def test_unknown_dataset_lists_choices(call):
    with pytest.raises(ValueError) as info:
        call()
    assert all(name in str(info.value) for name in DATASET_NAMES)


# ---------------------------------------------------------------- per-image standardisation


def test_per_image_standardize_matches_numpy():
    x = np.random.default_rng(1).uniform(0, 1, (3, 5, 7))
    expected = (x - x.mean()) / x.std()
    got = PerImageStandardize()(torch.tensor(x, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_per_image_standardize_floors_std_at_one_over_sqrt_n():
    n = 3 * 4 * 4
    constant = torch.full((3, 4, 4), 0.7, dtype=torch.float64)
    assert PerImageStandardize()(constant).abs().max().item() < 1e-12  # zeros, not NaN
    nearly = constant.clone()
    nearly[0, 0, 0] += 1e-3  # std ~ 1e-4, far below the floor 1/sqrt(48)
    x = nearly.numpy()
    expected = (x - x.mean()) * math.sqrt(n)
    np.testing.assert_allclose(PerImageStandardize()(nearly).numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------- CIFAR-10/100


@pytest.fixture(params=["cifar10", "cifar100"])
def cifar(request, tmp_path, monkeypatch):
    """Fabricated CIFAR files; the torchvision class's md5 table is pointed at them, so its own integrity
    check still runs on the fake files instead of being switched off."""
    fake = write_cifar(tmp_path, request.param)
    dataset_class = CIFAR_CLASSES[request.param]
    for attribute, value in cifar_checksum_attributes(dataset_class, fake.md5).items():
        monkeypatch.setattr(dataset_class, attribute, value)
    return request.param, tmp_path, fake


def test_cifar_splits_labels_and_test_images(cifar):
    name, root, fake = cifar
    splits = load_dataset(name, root)
    assert (splits.name, splits.num_classes, splits.input_shape) == (
        name,
        10 if name == "cifar10" else 100,
        (3, 32, 32),
    )
    assert len(splits.train) == len(fake.train_labels) and len(splits.test) == len(fake.test_labels)
    assert [splits.train[i][1] for i in range(len(splits.train))] == fake.train_labels
    for i, image in enumerate(fake.test_images):
        tensor, label = splits.test[i]
        assert tensor.dtype == torch.float32 and label == fake.test_labels[i] and isinstance(label, int)
        np.testing.assert_allclose(tensor.numpy(), standardised(image), atol=1e-5)


def test_cifar_training_augmentation_is_pad4_crop_flip(cifar):
    name, root, fake = cifar
    splits = load_dataset(name, root)
    assert_pad_crop_flip(splits.train, 1, standardised(fake.train_images[1]), padding=4)


def test_cifar_splits_pickle(cifar):
    name, root, fake = cifar
    splits = load_dataset(name, root)
    test = pickle.loads(pickle.dumps(splits.test))
    np.testing.assert_allclose(test[1][0].numpy(), standardised(fake.test_images[1]), atol=1e-5)
    pickle.loads(pickle.dumps(splits.train))
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.num_classes = 3


def assert_one_line_naming(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing(tmp_path, name):
    folder = tmp_path / CIFAR_CLASSES[name].base_folder
    with pytest.raises(DatasetError) as error:
        load_dataset(name, tmp_path)
    assert_one_line_naming(error, "not found", str(folder), "download=True", CIFAR_CLASSES[name].filename)


def test_cifar_damaged_batch_fails_the_md5_check(cifar):
    name, root, fake = cifar
    batch = fake.folder / ("data_batch_1" if name == "cifar10" else "train")
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DatasetError) as error:
        load_dataset(name, root)
    assert_one_line_naming(error, "damaged", str(fake.folder))


def test_cifar_failed_download(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", tmp_path, download=True)
    assert_one_line_naming(error, "could not be downloaded", torchvision.datasets.CIFAR10.url, "no network")
    # what to do instead of downloading again: place the files by hand, in torchvision's layout
    assert "download=True" not in str(error.value) and "--download" not in str(error.value)
    folder = tmp_path / torchvision.datasets.CIFAR10.base_folder
    layout = f"extract it under {tmp_path}, so that {folder} holds data_batch_1"
    assert_one_line_naming(error, layout, "test_batch, batches.meta")


# ---------------------------------------------------------------- Tiny ImageNet


def decoded_rgb(path) -> np.ndarray:
    """HWC float64 in [0, 1]; grayscale replicated to three channels."""
    with Image.open(path) as image:
        pixels = np.asarray(image, dtype=np.float64) / 255.0
    return np.stack([pixels] * 3, axis=-1) if pixels.ndim == 2 else pixels


@pytest.fixture
def tiny(tmp_path):
    fake = write_tiny_imagenet(tmp_path)
    pixels = np.concatenate([decoded_rgb(path).reshape(-1, 3) for path, _ in fake.train])
    return tmp_path, fake, pixels.mean(axis=0), pixels.std(axis=0)


def test_tiny_imagenet_test_split_normalised_by_training_stats_with_shared_classes(tiny):
    root, fake, mean, std = tiny
    splits = load_dataset("tiny-imagenet", root)
    class_index = {wnid: i for i, wnid in enumerate(sorted(fake.wnids))}
    assert (splits.num_classes, splits.input_shape, splits.name) == (3, (3, 64, 64), "tiny-imagenet")
    assert len(splits.test) == len(fake.val) and len(splits.train) == len(fake.train)
    for i, (path, wnid) in enumerate(fake.val):
        image, label = splits.test[i]
        assert label == class_index[wnid]
        np.testing.assert_allclose(
            image.numpy(), ((decoded_rgb(path) - mean) / std).transpose(2, 0, 1), atol=1e-5
        )
    cached = json.loads((fake.folder / "mltp_channel_stats.json").read_text())
    np.testing.assert_allclose(cached["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(cached["std"], std, rtol=1e-9)


def test_tiny_imagenet_grayscale_becomes_three_equal_channels(tiny):
    root, fake, mean, std = tiny
    splits = load_dataset("tiny-imagenet", root)
    assert fake.val[0][0] in fake.grayscale
    image, _ = splits.test[0]
    raw = image.numpy() * std[:, None, None] + mean[:, None, None]
    assert image.shape == (3, 64, 64)
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[0], raw[2], atol=1e-5)


def test_tiny_imagenet_training_labels_and_pad8_crop_flip(tiny):
    """Each training sample is a window of exactly one fabricated image, whose folder gives its label."""
    root, fake, mean, std = tiny
    splits = load_dataset("tiny-imagenet", root)
    class_index = {wnid: i for i, wnid in enumerate(sorted(fake.wnids))}
    unaugmented = [((decoded_rgb(path) - mean) / std).transpose(2, 0, 1) for path, _ in fake.train]
    padded = [np.pad(image, ((0, 0), (8, 8), (8, 8))) for image in unaugmented]
    torch.manual_seed(0)
    source_of = []
    for i in range(len(splits.train)):
        image, label = splits.train[i]
        sources = [j for j, candidate in enumerate(padded) if windows_matching(image, candidate)]
        assert len(sources) == 1
        assert label == class_index[fake.train[sources[0]][1]]
        source_of.append(sources[0])
    assert sorted(source_of) == list(range(len(fake.train)))
    assert_pad_crop_flip(splits.train, 0, unaugmented[source_of[0]], padding=8)


def test_tiny_imagenet_channel_stats_cached_until_the_training_set_changes(tiny, monkeypatch):
    root, fake, mean, std = tiny
    load_dataset("tiny-imagenet", root)
    from torch_mltp.data import tiny_imagenet

    calls = []
    real = tiny_imagenet.channel_mean_std

    def counting(paths):
        calls.append(len(paths))
        return real(paths)

    monkeypatch.setattr(tiny_imagenet, "channel_mean_std", counting)
    splits = load_dataset("tiny-imagenet", root)
    assert calls == []
    path = fake.val[1][0]
    expected = ((decoded_rgb(path) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(splits.test[1][0].numpy(), expected, atol=1e-5)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(fake.folder / "train" / "n0100" / "images" / "n0100_9.JPEG")
    load_dataset("tiny-imagenet", root)
    assert calls == [len(fake.train) + 1]


def test_tiny_imagenet_splits_pickle(tiny):
    root, _, _, _ = tiny
    splits = load_dataset("tiny-imagenet", root)
    assert torch.equal(pickle.loads(pickle.dumps(splits.test))[2][0], splits.test[2][0])
    pickle.loads(pickle.dumps(splits.train))


@pytest.mark.parametrize("download", [False, True])
def test_tiny_imagenet_missing(tmp_path, download):
    with pytest.raises(DatasetError) as error:
        load_dataset("tiny-imagenet", tmp_path, download=download)
    assert_one_line_naming(
        error, str(tmp_path / "tiny-imagenet-200" / "wnids.txt"), TINY_URL, "val/val_annotations.txt"
    )
    if download:
        assert "not supported" in str(error.value)


def test_tiny_imagenet_val_class_not_in_wnids(tiny):
    root, fake, _, _ = tiny
    annotations = fake.folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(fake.val[2][1], "n9999")
    annotations.write_text("".join(lines))
    with pytest.raises(DatasetError) as error:
        load_dataset("tiny-imagenet", root)
    assert_one_line_naming(error, str(annotations), "line 3", "'n9999'", "wnids.txt", TINY_URL)


def test_tiny_imagenet_missing_val_annotations(tiny):
    root, fake, _, _ = tiny
    annotations = fake.folder / "val" / "val_annotations.txt"
    annotations.unlink()
    with pytest.raises(DatasetError) as error:
        load_dataset("tiny-imagenet", root)
    assert_one_line_naming(error, f"missing {annotations}", TINY_URL)


def test_tiny_imagenet_class_without_training_images(tiny):
    root, fake, _, _ = tiny
    images = fake.folder / "train" / "n0200" / "images"
    for path in images.iterdir():
        path.unlink()
    with pytest.raises(DatasetError) as error:
        load_dataset("tiny-imagenet", root)
    assert_one_line_naming(error, str(images), "n0200", TINY_URL)


# ---------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    """Generate once for the module; record the draws of the global RNGs right after generation."""
    root = tmp_path_factory.mktemp("mnist1d")
    np.random.seed(123)
    random.seed(7)
    splits = load_dataset("mnist1d", root)
    return root, splits, (np.random.random_sample(), random.random())


def test_mnist1d_generated_with_default_args(mnist1d):
    _, splits, _ = mnist1d
    assert (splits.name, splits.num_classes, splits.input_shape) == ("mnist1d", 10, (40,))
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    x, y = splits.train[0]
    assert x.dtype == torch.float32 and x.shape == (40,) and isinstance(y, int)
    inputs = torch.cat([splits.train.inputs, splits.test.inputs]).double()
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert labels.dtype == torch.int64
    # make_dataset draws 5000 // 10 signals per digit and standardises the whole set to mean 0, std 1
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    assert abs(inputs.mean().item()) < 1e-5 and abs(inputs.std(correction=0).item() - 1) < 1e-5


def test_mnist1d_generation_leaves_global_rngs_alone(mnist1d):
    _, _, (numpy_draw, python_draw) = mnist1d
    assert numpy_draw == np.random.RandomState(123).random_sample()
    assert python_draw == random.Random(7).random()


def test_mnist1d_second_load_reads_the_cache(mnist1d, monkeypatch):
    root, first, _ = mnist1d
    (cache,) = (root / "mnist1d").glob("*.npz")
    mtime = cache.stat().st_mtime_ns

    def regenerate(*args, **kwargs):
        raise AssertionError("MNIST-1D was regenerated instead of read from the cache")

    monkeypatch.setattr("mnist1d.data.make_dataset", regenerate)
    second = load_dataset("mnist1d", root)
    assert torch.equal(second.train.inputs, first.train.inputs)
    assert torch.equal(second.test.labels, first.test.labels)
    assert cache.stat().st_mtime_ns == mtime
    item = pickle.loads(pickle.dumps(second.test))[5]
    assert torch.equal(item[0], first.test[5][0]) and item[1] == first.test[5][1]


def test_mnist1d_damaged_cache_is_regenerated(tmp_path, monkeypatch):
    def tiny_dataset(value):
        return lambda args: {
            "x": np.full((3, 40), value),
            "y": np.arange(3),
            "x_test": np.zeros((2, 40)),
            "y_test": np.arange(2),
        }

    monkeypatch.setattr("mnist1d.data.make_dataset", tiny_dataset(1.0))
    load_dataset("mnist1d", tmp_path)
    (cache,) = (tmp_path / "mnist1d").glob("*.npz")
    cache.write_bytes(b"not an npz file")
    monkeypatch.setattr("mnist1d.data.make_dataset", tiny_dataset(2.0))
    splits = load_dataset("mnist1d", tmp_path)
    assert torch.equal(splits.train.inputs, torch.full((3, 40), 2.0))
    assert splits.train[2][1] == 2
