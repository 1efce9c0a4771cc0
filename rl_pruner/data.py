"""Image classification data sets: locating, loading, subsetting and caching batches.

Accepted layouts for a data set path:

- A directory in torchvision's ImageFolder layout, ``<root>/<class name>/<image file>``.
  Class folders sorted by name give the label indices, so ``airplane`` is label 0 in
  CIFAR-10. Folders whose names start with a dot (``.ipynb_checkpoints``) are ignored.
- A directory whose only subfolder is in that layout, for example
  ``<root>/test/<class name>/<image file>``. Any number of such single-folder levels is
  skipped, but a single folder that contains only images is taken as one class.
- A ``.tar``, ``.tar.gz`` or ``.tgz`` archive of either directory layout. It is extracted
  once into a cache directory and reused while the archive's path, size and modification
  time stay the same. The cache directory is ``cache_dir`` when given, else
  ``$RL_PRUNER_CACHE``, else ``~/.cache/rl-pruner/datasets``.

Image files are read with torchvision's default loader (PIL), converted to RGB.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from rl_pruner.errors import DataError, InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Batch = tuple[Tensor, Tensor]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_ENV_VAR = "RL_PRUNER_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/rl-pruner/datasets")

LAYOUT_HINT = "a directory in ImageFolder layout (<class>/<image>) or a .tar, .tar.gz or .tgz archive of one"

# Ratio of crop size to resized shorter side in the classic ImageNet evaluation of
# torchvision's reference scripts (resize to 256, center-crop 224).
CENTER_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of pixels scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"normalization mean {self.mean} and std {self.std} must have one value per channel each"
            )
        if any(value <= 0 for value in self.std):
            raise ValueError(f"normalization std {self.std} must be positive in every channel")


# The CIFAR-10 ResNet checkpoints that this project loads were trained with these
# statistics as well.
IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class _VisibleImageFolder(datasets.ImageFolder):
    """ImageFolder that skips class folders whose names start with a dot."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(path.name for path in _visible_subdirectories(Path(directory)))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}


def resolve_image_folder(path: PathLike, cache_dir: PathLike | None = None) -> Path:
    """Locate the ImageFolder root of a data set directory or archive.

    An archive is extracted into the cache on first use and the extracted copy is
    reused afterwards (see the module docstring for the cache location). Raises
    DataError naming ``path`` when it is missing, is neither a directory nor a supported
    archive, cannot be extracted, or contains no class folders.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"data set not found: {source}; pass {LAYOUT_HINT}")

    if source.is_dir():
        directory = source
    elif source.is_file() and source.name.lower().endswith(ARCHIVE_SUFFIXES):
        directory = _extract_cached(source, _cache_root(cache_dir))
    else:
        raise DataError(f"data set {source} is neither a directory nor a .tar, .tar.gz or .tgz archive; pass {LAYOUT_HINT}")

    return _find_class_root(directory, source)


def build_image_folder(
    path: PathLike,
    *,
    image_size: int | None,
    normalization: Normalization = IMAGENET_NORMALIZATION,
    augment: bool = False,
    cache_dir: PathLike | None = None,
) -> datasets.ImageFolder:
    """Load an image classification data set with evaluation or training transforms.

    ``path`` takes any layout that :func:`resolve_image_folder` accepts. With
    ``image_size=None`` the images keep their native size, as for 32x32 CIFAR, so every
    image in the data set must have the same size to be batched. With an ``image_size``
    in pixels, evaluation resizes the shorter side to ``image_size / 0.875`` and
    center-crops ``image_size`` (256 and 224 for ImageNet models). ``augment=True`` adds
    random horizontal flips and random crops for training. At native size the crops
    come from the image zero-padded by 4 pixels, and with an ``image_size`` they are
    torchvision's RandomResizedCrop. The dataset's ``classes`` are the sorted class
    folder names, and label ``i`` is ``classes[i]``.
    """
    if image_size is not None and image_size < 1:
        raise InputError(f"image size must be a positive number of pixels or None for native size, got {image_size}")

    root = resolve_image_folder(path, cache_dir)
    transform = _build_transform(image_size, normalization, augment)
    try:
        dataset = _VisibleImageFolder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise DataError(f"data set {path} has a class folder without images: {err}; remove it or add images") from err

    logger.info("loaded %d images in %d classes from %s", len(dataset), len(dataset.classes), root)
    return dataset


def subset_indices(n_total: int, limit: int | None, seed: int) -> list[int]:
    """Return a sorted, seeded random subset of ``limit`` indices from ``range(n_total)``.

    ``limit=None`` or ``limit >= n_total`` returns every index. The subset depends only
    on the arguments and equals ``split_indices(n_total, [limit], seed)[0]``. It comes
    from NumPy's PCG64 generator, whose stream NumPy may change between releases, so a
    test pins known values.
    """
    _check_count("data set size", n_total)
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 1:
        raise DataError(f"image limit must be a positive number of images or None for all, got {limit}")
    return split_indices(n_total, [limit], seed)[0]


def split_indices(n_total: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Carve disjoint, seeded random subsets of ``range(n_total)`` with the given sizes.

    Each subset is sorted. No index appears in two subsets, so a calibration split and a
    reward split carved from the same training data never overlap. The same arguments
    give the same subsets.
    """
    _check_count("data set size", n_total)
    for size in sizes:
        _check_count("split size", size)
    if sum(sizes) > n_total:
        raise DataError(
            f"split sizes {' + '.join(str(size) for size in sizes)} = {sum(sizes)} exceed the {n_total} images "
            "in the data set; lower the split sizes or use a larger data set"
        )
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")

    permutation = np.random.default_rng(seed).permutation(n_total)
    splits = []
    start = 0
    for size in sizes:
        splits.append(sorted(int(index) for index in permutation[start : start + size]))
        start += size
    return splits


def make_loader(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Create a DataLoader over ``dataset``, or over its ``indices`` only when given.

    With ``shuffle=True`` the order is drawn from a generator seeded with ``seed``, so
    two loaders with the same seed yield the same order.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be a positive number of images, got {batch_size}")
    if num_workers < 0:
        raise InputError(f"number of data loader workers must be 0 or more, got {num_workers}")

    source = dataset if indices is None else _subset(dataset, indices)
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def load_batches(
    dataset: Dataset,
    indices: Sequence[int] | None,
    batch_size: int,
    *,
    num_workers: int = 0,
    disable_progress: bool = False,
) -> list[Batch]:
    """Read the images at ``indices`` once and return them as in-memory batches.

    Returns a list of ``(images, labels)`` pairs in index order, where the last batch
    may be smaller. ``indices=None`` reads the whole data set. Memory use is that of the
    decoded tensors, for example about 61 MB for 5,000 CIFAR images in float32. The
    progress bar goes to stderr and is hidden when stderr is not a terminal.
    """
    loader = make_loader(dataset, indices, batch_size=batch_size, num_workers=num_workers)
    batches: list[Batch] = []
    progress = tqdm(loader, desc="loading images", unit="batch", disable=True if disable_progress else None)
    for images, labels in progress:
        batches.append((images, labels))

    n_images = sum(len(labels) for _, labels in batches)
    logger.info("cached %d images in %d batches", n_images, len(batches))
    return batches


def _build_transform(image_size: int | None, normalization: Normalization, augment: bool) -> transforms.Compose:
    steps: list[object] = []
    if image_size is None:
        if augment:
            steps += [_PadAndRandomCrop(padding=4), transforms.RandomHorizontalFlip()]
    elif augment:
        steps += [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps += [transforms.Resize(round(image_size / CENTER_CROP_FRACTION)), transforms.CenterCrop(image_size)]

    steps += [transforms.ToTensor(), transforms.Normalize(normalization.mean, normalization.std)]
    return transforms.Compose(steps)


class _PadAndRandomCrop:
    """Zero-pad an image on every side and crop it back to its own size at a random offset.

    With a padding of 4 pixels this is the usual CIFAR training crop, here for images of any size.
    """

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        return transforms.RandomCrop((height, width), padding=self.padding)(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding})"


def _subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    n_total = len(dataset)  # type: ignore[arg-type]
    out_of_range = [index for index in indices if not 0 <= index < n_total]
    if out_of_range:
        raise DataError(
            f"image indices {out_of_range[:5]} are outside the data set of {n_total} images; "
            "use indices from 0 to the data set size minus 1"
        )
    return Subset(dataset, list(indices))


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise DataError(f"{name} must be 0 or more, got {value}")


def _visible_subdirectories(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith(".")]


def _find_class_root(directory: Path, source: Path) -> Path:
    """Descend through single wrapper folders to the folder whose subfolders are the classes."""
    root = directory
    while True:
        subdirectories = _visible_subdirectories(root)
        if not subdirectories:
            raise DataError(f"data set {source} contains no class folders; pass {LAYOUT_HINT}")

        # ImageFolder ignores loose files next to the class folders, so a README beside
        # a single wrapper folder does not stop the descent.
        if len(subdirectories) == 1 and _visible_subdirectories(subdirectories[0]):
            root = subdirectories[0]
            continue
        return root


def _cache_root(cache_dir: PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_environment = os.environ.get(CACHE_ENV_VAR)
    if from_environment:
        return Path(from_environment).expanduser()
    return DEFAULT_CACHE_DIR.expanduser()


def _cache_key(archive: Path) -> str:
    """Hash the archive's absolute path, size and modification time, so a changed archive is extracted again."""
    stat = archive.stat()
    identity = f"{archive.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _extract_cached(archive: Path, cache_root: Path) -> Path:
    """Extract ``archive`` into ``cache_root`` unless an earlier extraction is there.

    The archive goes into a temporary folder that is renamed into place only when
    extraction has finished, so a failed or interrupted extraction never leaves a
    partial cache entry. NOTE: a process killed with SIGKILL still leaves its temporary
    folder (``.<name>-<key>-*``) behind, and it is never cleaned up.
    """
    target = cache_root / f"{_archive_stem(archive)}-{_cache_key(archive)}"
    if target.is_dir():
        logger.info("reusing extracted copy of %s at %s", archive, target)
        return target

    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    except OSError as err:
        raise DataError(
            f"cannot create the data set cache in {cache_root}: {err}; set {CACHE_ENV_VAR} to a writable directory"
        ) from err

    logger.info("extracting %s into %s", archive, target)
    started = time.perf_counter()
    try:
        _extract_archive(archive, staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    logger.info("extracted %s in %.1f s", archive, time.perf_counter() - started)
    return target


def _extract_archive(archive: Path, destination: Path) -> None:
    # An explicit compression mode gives a one-line error for a damaged archive,
    # where "r:*" lists the failure of every decompressor it tried.
    mode = "r:" if archive.name.lower().endswith(".tar") else "r:gz"
    try:
        with tarfile.open(archive, mode=mode) as tar:
            if hasattr(tarfile, "data_filter"):
                # The "data" filter rejects absolute paths, links and paths that leave
                # the destination, and device files.
                tar.extractall(destination, filter="data")
            else:
                # Python before 3.11.4 has no extraction filters: check the members here.
                tar.extractall(destination, members=_safe_members(tar, archive, destination))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        reason = " ".join(str(err).split())
        raise DataError(
            f"failed to extract data set archive {archive}: {reason}; replace it with an intact .tar, .tar.gz or .tgz file"
        ) from err
    except OSError as err:
        raise DataError(
            f"failed to write the contents of {archive} into {destination.parent}: {err}; "
            f"free disk space or set {CACHE_ENV_VAR} to another directory"
        ) from err


def _safe_members(tar: tarfile.TarFile, archive: Path, destination: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders of ``tar`` that stay inside ``destination``; raise DataError otherwise."""
    root = destination.resolve()
    members = []
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
            raise tarfile.TarError(f"member {member.name!r} is not a regular file or folder inside the archive")
        members.append(member)
    return members


def _move_into_place(staging: Path, target: Path) -> None:
    try:
        staging.rename(target)
    except OSError:
        # Another process finished extracting the same archive first, so its copy is used.
        if not target.is_dir():
            raise
        logger.info("another process extracted %s first; using its copy", target)


def open_dataset(
    path: str,
    *,
    image_size: int | None,
    normalization: Normalization = IMAGENET_NORMALIZATION,
    split: str = "train",
    seed: int = 0,
) -> Dataset:
    """Open a data set by path: an ImageFolder layout, or ``builtin:<name>`` for a bundled one.

    ``builtin:digits`` is scikit-learn's handwritten digits (see :mod:`rl_pruner.demo`);
    ``split`` ("train" or "test") and ``seed`` choose its part. Other paths ignore both.
    """
    if str(path).startswith("builtin:"):
        from rl_pruner.demo import load_builtin_dataset

        return load_builtin_dataset(str(path), split, seed)
    return build_image_folder(path, image_size=image_size, normalization=normalization)
