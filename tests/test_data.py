from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from rl_pruner.data import (
    IMAGENET_NORMALIZATION,
    Normalization,
    build_image_folder,
    load_batches,
    make_loader,
    resolve_image_folder,
    split_indices,
    subset_indices,
)
from rl_pruner.errors import DataError, InputError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Solid colour of every synthetic image, and its class folders with their image counts.
PIXEL = (255, 0, 128)
SYNTHETIC_CLASSES = {"cat": 3, "ant": 2}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default cache at a temporary directory so no test writes to the home directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RL_PRUNER_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def cifar_test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.fixture(scope="session")
def cifar_test_root(cifar_test_archive: Path, cifar_test_cache: Path) -> Path:
    """CIFAR-10 test archive, extracted once for the whole session."""
    return resolve_image_folder(cifar_test_archive, cache_dir=cifar_test_cache)


def write_image_folder(root: Path, size: tuple[int, int] = (8, 6)) -> Path:
    """Write a small ImageFolder of solid-colour PNG images and return its root."""
    for class_name, n_images in SYNTHETIC_CLASSES.items():
        class_dir = root / class_name
        class_dir.mkdir(parents=True)
        for index in range(n_images):
            Image.new("RGB", size, PIXEL).save(class_dir / f"{index:04d}.png")
    return root


def write_archive(source: Path, archive: Path, arcname: str = "test") -> Path:
    mode = "w" if archive.name.endswith(".tar") else "w:gz"
    with tarfile.open(archive, mode) as tar:
        tar.add(source, arcname=arcname)
    return archive


# Normalization


def test_normalization_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        Normalization(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2))


def test_normalization_rejects_zero_std() -> None:
    with pytest.raises(ValueError, match="positive"):
        Normalization(mean=(0.5,), std=(0.0,))


# resolve_image_folder on the real CIFAR-10 test archive


def test_cifar_archive_has_ten_classes(cifar_test_root: Path) -> None:
    dataset = build_image_folder(cifar_test_root, image_size=None)

    assert dataset.classes == CIFAR_CLASSES
    assert len(dataset) == 10_000
    assert cifar_test_root.name == "test"


def test_cifar_archive_second_resolve_reuses_cache(
    cifar_test_archive: Path, cifar_test_cache: Path, cifar_test_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mtime_before = cifar_test_root.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="rl_pruner.data")

    again = resolve_image_folder(cifar_test_archive, cache_dir=cifar_test_cache)

    assert again == cifar_test_root
    assert again.stat().st_mtime_ns == mtime_before
    assert any("reusing extracted copy" in record.getMessage() for record in caplog.records)
    assert not any("extracting" in record.getMessage() for record in caplog.records)
    assert len(list(cifar_test_cache.iterdir())) == 1


def test_cifar_load_batches_shapes(cifar_test_root: Path) -> None:
    dataset = build_image_folder(cifar_test_root, image_size=None)
    indices = subset_indices(len(dataset), 40, seed=0)

    batches = load_batches(dataset, indices, batch_size=16, disable_progress=True)

    assert [len(labels) for _, labels in batches] == [16, 16, 8]
    assert batches[0][0].shape == (16, 3, 32, 32)
    assert batches[0][1].dtype == torch.int64
    assert torch.cat([labels for _, labels in batches]).tolist() == [dataset.targets[i] for i in indices]


# resolve_image_folder on directories


def test_resolve_directory_returns_it(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")

    assert resolve_image_folder(root) == root


@pytest.mark.parametrize("wrappers", [["test"], ["cifar", "test"]])
def test_resolve_descends_single_wrapper_folders(tmp_path: Path, wrappers: list[str]) -> None:
    root = write_image_folder(tmp_path.joinpath("data", *wrappers))
    (tmp_path / "data" / "README.txt").write_text("CIFAR-10 test split\n")

    assert resolve_image_folder(tmp_path / "data") == root


def test_resolve_keeps_single_class_folder(tmp_path: Path) -> None:
    class_dir = tmp_path / "data" / "cat"
    class_dir.mkdir(parents=True)
    Image.new("RGB", (4, 4), PIXEL).save(class_dir / "0000.png")

    assert resolve_image_folder(tmp_path / "data") == tmp_path / "data"
    assert build_image_folder(tmp_path / "data", image_size=None).classes == ["cat"]


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")
    (root / ".ipynb_checkpoints").mkdir()

    dataset = build_image_folder(root, image_size=None)

    assert dataset.classes == ["ant", "cat"]


# resolve_image_folder on archives


@pytest.mark.parametrize("archive_name", ["test.tar.gz", "test.tgz", "test.tar"])
def test_resolve_archive_extracts_to_cache(tmp_path: Path, isolated_cache: Path, archive_name: str) -> None:
    source = write_image_folder(tmp_path / "source")
    archive = write_archive(source, tmp_path / archive_name)

    root = resolve_image_folder(archive)

    assert root.is_relative_to(isolated_cache)
    assert root.name == "test"
    assert sorted(path.name for path in root.iterdir()) == ["ant", "cat"]
    assert len(list((root / "cat").iterdir())) == 3


def test_resolve_archive_cache_dir_overrides_environment(tmp_path: Path, isolated_cache: Path) -> None:
    archive = write_archive(write_image_folder(tmp_path / "source"), tmp_path / "test.tar.gz")
    explicit = tmp_path / "explicit-cache"

    root = resolve_image_folder(archive, cache_dir=explicit)

    assert root.is_relative_to(explicit)
    assert not isolated_cache.exists()


def test_changed_archive_is_extracted_again(tmp_path: Path, isolated_cache: Path) -> None:
    archive = write_archive(write_image_folder(tmp_path / "source"), tmp_path / "test.tar.gz")
    first = resolve_image_folder(archive)

    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = resolve_image_folder(archive)

    assert second != first
    assert second.is_dir()
    assert len(list(isolated_cache.iterdir())) == 2


def test_interrupted_extraction_leaves_no_cache(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = write_archive(write_image_folder(tmp_path / "source"), tmp_path / "test.tar.gz")

    def extract_then_interrupt(self: tarfile.TarFile, path: str, *args: object, **kwargs: object) -> None:
        (Path(path) / "partial.jpg").write_bytes(b"\xff\xd8")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tarfile.TarFile, "extractall", extract_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            resolve_image_folder(archive)

    assert list(isolated_cache.iterdir()) == []
    assert resolve_image_folder(archive).name == "test"


def test_archive_member_outside_destination_rejected(tmp_path: Path, isolated_cache: Path) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_text("outside\n")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.txt")

    with pytest.raises(DataError) as raised:
        resolve_image_folder(archive)

    assert str(archive) in str(raised.value)
    assert not (isolated_cache.parent / "escaped.txt").exists()
    assert list(isolated_cache.iterdir()) == []


def test_unwritable_cache_raises_data_error(tmp_path: Path) -> None:
    archive = write_archive(write_image_folder(tmp_path / "source"), tmp_path / "test.tar.gz")
    not_a_directory = tmp_path / "cache-file"
    not_a_directory.write_text("")

    with pytest.raises(DataError, match="RL_PRUNER_CACHE") as raised:
        resolve_image_folder(archive, cache_dir=not_a_directory)

    assert str(not_a_directory) in str(raised.value)


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no-such-data"


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a data set\n")
    return path


def _truncated_archive(tmp_path: Path) -> Path:
    intact = write_archive(write_image_folder(tmp_path / "source"), tmp_path / "intact.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    data = intact.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return truncated


def _text_named_archive(tmp_path: Path) -> Path:
    path = tmp_path / "fake.tgz"
    path.write_text("not an archive\n")
    return path


def _empty_directory(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def _images_without_classes(tmp_path: Path) -> Path:
    path = tmp_path / "flat"
    path.mkdir()
    Image.new("RGB", (4, 4), PIXEL).save(path / "0000.png")
    return path


def _archive_without_classes(tmp_path: Path) -> Path:
    image = _images_without_classes(tmp_path) / "0000.png"
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image, arcname="0000.png")
    return archive


@pytest.mark.parametrize(
    ("make_path", "expected"),
    [
        (_missing, "not found"),
        (_text_file, "neither a directory nor"),
        (_truncated_archive, "failed to extract"),
        (_text_named_archive, "failed to extract"),
        (_empty_directory, "no class folders"),
        (_images_without_classes, "no class folders"),
        (_archive_without_classes, "no class folders"),
    ],
)
def test_resolve_invalid_input_names_path(tmp_path: Path, make_path: Callable[[Path], Path], expected: str) -> None:
    path = make_path(tmp_path)

    with pytest.raises(DataError) as raised:
        resolve_image_folder(path)

    message = str(raised.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


# build_image_folder


def test_build_native_size_normalizes_pixels(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", size=(8, 6))

    dataset = build_image_folder(root, image_size=None)
    image, label = dataset[0]

    expected = torch.tensor(
        [(value / 255 - mean) / std for value, mean, std in zip(PIXEL, IMAGENET_NORMALIZATION.mean, IMAGENET_NORMALIZATION.std)]
    )
    assert dataset.classes == ["ant", "cat"]
    assert len(dataset) == 5
    assert image.shape == (3, 6, 8)
    assert label == 0
    torch.testing.assert_close(image[:, 0, 0], expected)


def test_build_resizes_and_center_crops(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", size=(40, 20))

    image, _ = build_image_folder(root, image_size=16)[0]

    assert image.shape == (3, 16, 16)


@pytest.mark.parametrize(("image_size", "expected_shape"), [(None, (3, 6, 8)), (4, (3, 4, 4))])
def test_build_augment_keeps_shape(tmp_path: Path, image_size: int | None, expected_shape: tuple[int, ...]) -> None:
    root = write_image_folder(tmp_path / "data", size=(8, 6))

    image, _ = build_image_folder(root, image_size=image_size, augment=True)[0]

    assert image.shape == expected_shape


def test_build_empty_class_raises(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")
    (root / "bee").mkdir()

    with pytest.raises(DataError, match="without images") as raised:
        build_image_folder(root, image_size=None)

    assert str(root) in str(raised.value)


def test_build_rejects_zero_image_size(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")

    with pytest.raises(InputError, match="got 0"):
        build_image_folder(root, image_size=0)


# subset_indices and split_indices


def test_subset_pinned_values() -> None:
    # Pinned so that a change in NumPy's random stream shows up as a test failure.
    assert subset_indices(20, 5, seed=0) == [2, 4, 6, 13, 19]
    assert subset_indices(20, 5, seed=1) == [1, 7, 10, 16, 18]
    assert split_indices(20, [3, 4], seed=7) == [[3, 8, 12], [10, 13, 14, 16]]


def test_subset_is_deterministic_and_sorted() -> None:
    first = subset_indices(10_000, 500, seed=3)

    assert first == subset_indices(10_000, 500, seed=3)
    assert first == sorted(first)
    assert len(set(first)) == 500
    assert all(0 <= index < 10_000 for index in first)
    assert first != subset_indices(10_000, 500, seed=4)


@pytest.mark.parametrize("limit", [None, 100, 1_000])
def test_subset_without_limit_is_everything(limit: int | None) -> None:
    assert subset_indices(100, limit, seed=0) == list(range(100))


def test_subset_rejects_zero_limit() -> None:
    with pytest.raises(DataError, match="got 0"):
        subset_indices(100, 0, seed=0)


def test_split_is_disjoint_with_requested_sizes() -> None:
    calibration, reward = split_indices(50_000, [1_000, 5_000], seed=11)

    assert len(calibration) == 1_000
    assert len(reward) == 5_000
    assert set(calibration).isdisjoint(reward)
    assert calibration == sorted(calibration)
    assert reward == sorted(reward)
    assert [calibration, reward] == split_indices(50_000, [1_000, 5_000], seed=11)


def test_first_split_equals_subset() -> None:
    assert split_indices(1_000, [100, 200], seed=5)[0] == subset_indices(1_000, 100, seed=5)


def test_split_can_use_every_index() -> None:
    first, second = split_indices(10, [4, 6], seed=0)

    assert sorted(first + second) == list(range(10))


def test_split_too_large_raises() -> None:
    with pytest.raises(DataError, match="6000 exceed the 5000 images"):
        split_indices(5_000, [1_000, 5_000], seed=0)


def test_split_rejects_negative_seed() -> None:
    with pytest.raises(InputError, match="seed"):
        split_indices(10, [2], seed=-1)


# make_loader and load_batches


def test_loader_shuffle_is_seeded() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(100))

    def order(seed: int) -> list[int]:
        loader = make_loader(dataset, batch_size=100, shuffle=True, seed=seed)
        return next(iter(loader))[0].tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(100))


def test_loader_reads_only_indices() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(100))

    loader = make_loader(dataset, [5, 7, 9], batch_size=2)

    assert [batch[0].tolist() for batch in loader] == [[5, 7], [9]]


def test_loader_rejects_index_out_of_range() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    with pytest.raises(DataError, match=r"\[10\] are outside the data set of 10 images"):
        make_loader(dataset, [0, 10])


def test_loader_rejects_zero_batch_size() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    with pytest.raises(InputError, match="batch size"):
        make_loader(dataset, batch_size=0)


def test_load_batches_keeps_index_order(tmp_path: Path) -> None:
    dataset = build_image_folder(write_image_folder(tmp_path / "data"), image_size=None)

    batches = load_batches(dataset, [0, 2, 4], batch_size=2, disable_progress=True)

    assert [len(labels) for _, labels in batches] == [2, 1]
    assert batches[0][0].shape == (2, 3, 6, 8)
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 1, 1]


def test_load_batches_all_images(tmp_path: Path) -> None:
    dataset = build_image_folder(write_image_folder(tmp_path / "data"), image_size=None)

    batches = load_batches(dataset, None, batch_size=4, disable_progress=True)

    assert sum(len(labels) for _, labels in batches) == 5
