"""Detection images and labels: letterboxing, YOLO-format labelled sets, unlabelled folders.

A labelled set is described by a data YAML in the YOLO format::

    path: ../datasets/coco128   # optional root; relative to this YAML's folder
    train: images/train2017     # an image folder, a .txt list of image paths, or a list of either
    val: images/train2017
    names: [person, bicycle, car]   # or {0: person, 1: bicycle, 2: car}
    nc: 3                           # optional, must equal the number of names

Relative split paths resolve against ``path`` when it is given, else against the
YAML's folder. Relative lines of a ``.txt`` list resolve against the list's folder.
The label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt``: the last
``images`` folder of the path becomes ``labels``. Each of its rows is
``class cx cy w h``, the box centre and size as fractions of the image width and
height. A missing label file means that the image contains no objects.

Images are letterboxed to ``size x size`` like the official YOLOv7 code does, and boxes
come back as x1, y1, x2, y2 in letterboxed pixels, the frame that a YOLOv7 model's
decoded predictions use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from rl_pruner.data import subset_indices
from rl_pruner.errors import DataError, InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
DetectionBatch = tuple[Tensor, list[Tensor]]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Gray of the letterbox padding in the official YOLOv7 code, as an 8-bit value.
PAD_VALUE = 114
# YOLOv7's coarsest detection level has a stride of 32 pixels.
MAX_STRIDE = 32
SPLITS = ("train", "val", "test")
LABEL_COLUMNS = ("class", "cx", "cy", "w", "h")


@dataclass(frozen=True)
class _LetterboxGeometry:
    """Placement of a resized image inside the square letterbox."""

    scale: float  # letterboxed pixels per original pixel
    width: int  # resized image width, before padding
    height: int
    left: int  # padding columns left of the image
    top: int  # padding rows above the image


def _letterbox_geometry(width: int, height: int, size: int) -> _LetterboxGeometry:
    # The official code rounds the resized size with Python's round() and splits the
    # padding as round(d - 0.1) before and round(d + 0.1) after, with d half the total.
    # For an odd total that puts the extra row or column after the image, as // does.
    scale = size / max(width, height)
    resized_width = round(width * scale)
    resized_height = round(height * scale)
    return _LetterboxGeometry(
        scale=scale,
        width=resized_width,
        height=resized_height,
        left=(size - resized_width) // 2,
        top=(size - resized_height) // 2,
    )


def letterbox(image: Image.Image, size: int) -> tuple[Tensor, float, tuple[float, float]]:
    """Resize ``image`` so that its long side is ``size`` pixels, then pad it to a square.

    The aspect ratio is kept, images smaller than ``size`` are enlarged, and the padding
    (gray, 114/255 in every channel) is split evenly between both sides, with the odd
    pixel after the image. This is the geometry of the official YOLOv7 ``letterbox`` at
    a square target shape. Resizing uses PIL's bilinear filter, which averages over
    the source pixels when shrinking, where the official code uses OpenCV's INTER_AREA
    (shrinking) or INTER_LINEAR (enlarging), so pixel values differ slightly.

    Returns:
        The ``(3, size, size)`` float tensor in [0, 1] (RGB), the scale (letterboxed
        pixels per original pixel) and the ``(left, top)`` padding in pixels.
    """
    if size < 1:
        raise InputError(f"letterbox size must be a positive number of pixels, got {size}")
    rgb = image.convert("RGB")
    geometry = _letterbox_geometry(rgb.width, rgb.height, size)

    resized = rgb.resize((geometry.width, geometry.height), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE, PAD_VALUE, PAD_VALUE))
    canvas.paste(resized, (geometry.left, geometry.top))

    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous(), geometry.scale, (float(geometry.left), float(geometry.top))


def class_names(data_yaml: PathLike) -> list[str]:
    """Read the class names of a data YAML, in class index order."""
    return _read_data_config(Path(data_yaml)).names


def load_detection_batches(
    data_yaml: PathLike,
    split: str,
    image_size: int,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
) -> list[DetectionBatch]:
    """Read the labelled images of one split once and return them as in-memory batches.

    Args:
        data_yaml: the data YAML (see the module docstring for its keys).
        split: ``train``, ``val`` or ``test``; the YAML must have that key.
        image_size: side of the square letterbox in pixels, a positive multiple of 32.
        batch_size: images per batch; the last batch may be smaller.
        limit: read only this many images, a seeded random subset (kept in path
            order); ``None`` reads all.
        seed: seed of the subset.

    Returns:
        ``(images, ground_truths)`` pairs: images ``(B, 3, S, S)`` in [0, 1], and per
        image a float ``(m, 5)`` tensor of x1, y1, x2, y2 (letterboxed pixels), class.
        Memory use is that of the decoded images, 12 x S x S bytes each (4.9 MB at 640).

    Raises:
        DataError: the YAML, a split path, an image or a label file is missing or invalid.
    """
    _check_sizes(image_size, batch_size)
    data_yaml = Path(data_yaml)
    config = _read_data_config(data_yaml)
    image_paths = _split_images(config, split)
    chosen = [image_paths[index] for index in subset_indices(len(image_paths), limit, seed)]

    batches: list[DetectionBatch] = []
    n_missing_labels = 0
    n_boxes = 0
    for start in range(0, len(chosen), batch_size):
        images, truths = [], []
        for image_path in chosen[start : start + batch_size]:
            image, geometry = _read_letterboxed(image_path, image_size)
            label_path = label_path_for(image_path)
            if not label_path.is_file():
                n_missing_labels += 1
            boxes = _read_labels(label_path, len(config.names))
            images.append(image)
            truths.append(_to_letterbox_pixels(boxes, geometry))
            n_boxes += len(boxes)
        batches.append((torch.stack(images), truths))

    if n_missing_labels:
        logger.warning(
            "%d of %d images of split %r in %s have no label file and count as images without objects",
            n_missing_labels, len(chosen), split, data_yaml,
        )
    logger.info("cached %d images with %d boxes in %d batches from %s", len(chosen), n_boxes, len(batches), data_yaml)
    return batches


def load_image_batches(
    folder: PathLike,
    image_size: int,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """Read the images under ``folder`` (recursively, sorted by path), letterboxed, as batches.

    Files with the suffixes in :data:`IMAGE_SUFFIXES` (any letter case) count as images.
    ``limit`` and ``seed`` pick a seeded random subset as in :func:`load_detection_batches`.

    Raises:
        DataError: the folder is missing, contains no image, or an image cannot be read.
    """
    _check_sizes(image_size, batch_size)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; pass a folder that contains .jpg, .jpeg, .png or .bmp files")
    image_paths = _images_in_folder(folder)
    chosen = [image_paths[index] for index in subset_indices(len(image_paths), limit, seed)]

    batches = []
    for start in range(0, len(chosen), batch_size):
        images = [_read_letterboxed(path, image_size)[0] for path in chosen[start : start + batch_size]]
        batches.append(torch.stack(images))
    logger.info("cached %d unlabelled images in %d batches from %s", len(chosen), len(batches), folder)
    return batches


def label_path_for(image_path: Path) -> Path:
    """Return the label file of an image: the last ``images`` folder becomes ``labels``, the suffix ``.txt``.

    Raises:
        DataError: no folder of the path is named ``images``, so the label file has no place.
    """
    parts = list(image_path.parts)
    folders = parts[:-1]
    if "images" not in folders:
        raise DataError(
            f"image {image_path} is not inside a folder named 'images', so its label file cannot be located; "
            "put images under .../images/ and their labels under the matching .../labels/"
        )
    index = len(folders) - 1 - folders[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


# --- data YAML ---


@dataclass(frozen=True)
class _DataConfig:
    source: Path
    root: Path
    splits: dict[str, Any]
    names: list[str]


def _read_data_config(data_yaml: Path) -> _DataConfig:
    if not data_yaml.is_file():
        raise DataError(f"data YAML {data_yaml} not found; pass the path of a YOLO-format data YAML")
    try:
        content = yaml.safe_load(data_yaml.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problem = " ".join(str(err).split())
        raise DataError(f"data YAML {data_yaml} is not valid YAML: {problem}; fix its syntax") from err
    if not isinstance(content, dict):
        raise DataError(
            f"data YAML {data_yaml} must be a mapping with keys train, val and names, got {type(content).__name__}"
        )
    if "names" not in content:
        raise DataError(f"data YAML {data_yaml} has no 'names' key; add the list of class names")

    names = _parse_names(content["names"], data_yaml)
    if "nc" in content and content["nc"] != len(names):
        raise DataError(
            f"data YAML {data_yaml} has nc: {content['nc']} but {len(names)} names; make nc equal the number of names"
        )

    root = data_yaml.parent
    if content.get("path"):
        root = data_yaml.parent / str(content["path"])
    splits = {split: content[split] for split in SPLITS if content.get(split) is not None}
    return _DataConfig(source=data_yaml, root=root, splits=splits, names=names)


def _parse_names(value: Any, data_yaml: Path) -> list[str]:
    if isinstance(value, list) and value:
        return [str(name) for name in value]
    if isinstance(value, dict) and value:
        indices = sorted(value)
        if indices != list(range(len(value))):
            raise DataError(
                f"data YAML {data_yaml}: 'names' keys must be the class indices 0 to {len(value) - 1}, "
                f"got {indices}; number the classes from 0 without gaps"
            )
        return [str(value[index]) for index in indices]
    raise DataError(
        f"data YAML {data_yaml}: 'names' must be a non-empty list or {{index: name}} mapping, got {value!r}"
    )


def _split_images(config: _DataConfig, split: str) -> list[Path]:
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split not in config.splits:
        raise DataError(f"data YAML {config.source} has no {split!r} key; add the image folder or list of that split")

    entries = config.splits[split]
    entries = entries if isinstance(entries, list) else [entries]
    image_paths: list[Path] = []
    for entry in entries:
        image_paths.extend(_entry_images(config.root / str(entry), config.source, split))
    if not image_paths:
        raise DataError(
            f"split {split!r} of data YAML {config.source} contains no images; "
            f"add .jpg, .jpeg, .png or .bmp files to {entries}"
        )
    return image_paths


def _entry_images(path: Path, source: Path, split: str) -> list[Path]:
    if path.is_dir():
        return _images_in_folder(path)
    if path.is_file() and path.suffix == ".txt":
        lines = [line.strip() for line in _read_text(path).splitlines()]
        listed = [path.parent / line for line in lines if line]
        for image_path in listed:
            if not image_path.is_file():
                raise DataError(f"image {image_path} listed in {path} not found; fix or remove that line")
        return listed
    raise DataError(
        f"split {split!r} of data YAML {source} points to {path}, which is not found or is neither a folder nor a "
        ".txt list of images; fix the path (relative paths resolve against 'path', else the YAML's folder)"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"text file {path} cannot be read: {err}; replace it with a UTF-8 text file") from err


def _images_in_folder(folder: Path) -> list[Path]:
    images = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not images:
        raise DataError(f"folder {folder} contains no .jpg, .jpeg, .png or .bmp image; add images or fix the path")
    return images


# --- images and labels ---


def _check_sizes(image_size: int, batch_size: int) -> None:
    if image_size < MAX_STRIDE or image_size % MAX_STRIDE:
        raise InputError(f"image size must be a positive multiple of {MAX_STRIDE} pixels, got {image_size}")
    if batch_size < 1:
        raise InputError(f"batch size must be a positive number of images, got {batch_size}")


def _read_letterboxed(path: Path, size: int) -> tuple[Tensor, _LetterboxGeometry]:
    # OpenCV's imread, which the official code uses, applies the EXIF orientation, so
    # labels are drawn on the rotated image; exif_transpose does the same here.
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {path} cannot be read: {err}; replace it with a valid image or remove it") from err
    pixels, _, _ = letterbox(image, size)
    return pixels, _letterbox_geometry(image.width, image.height, size)


def _read_labels(label_path: Path, n_classes: int) -> Tensor:
    """Read a label file as an ``(m, 5)`` tensor of class, cx, cy, w, h; missing file: no rows."""
    if not label_path.is_file():
        return torch.zeros(0, 5)

    rows = []
    for line_number, line in enumerate(_read_text(label_path).splitlines(), start=1):
        fields = line.split()
        if fields:
            rows.append(_parse_label_row(fields, n_classes, f"label file {label_path}, line {line_number}"))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)


def _parse_label_row(fields: Sequence[str], n_classes: int, where: str) -> list[float]:
    if len(fields) != len(LABEL_COLUMNS):
        raise DataError(
            f"{where} has {len(fields)} values, but a box row has 5: class cx cy w h "
            "(segmentation polygons are not supported); fix or remove that row"
        )
    try:
        values = [float(field) for field in fields]
    except ValueError as err:
        raise DataError(f"{where} contains a value that is not a number: {' '.join(fields)!r}; fix that row") from err
    if not all(np.isfinite(values)):
        raise DataError(f"{where} contains a value that is not finite: {' '.join(fields)!r}; fix that row")

    class_index = values[0]
    if class_index < 0 or class_index != int(class_index) or class_index >= n_classes:
        raise DataError(
            f"{where} has class {fields[0]}, but classes are integers from 0 to {n_classes - 1} "
            "(one per entry of 'names'); fix the class or add the class name"
        )
    if not all(0.0 <= value <= 1.0 for value in values[1:]):
        raise DataError(
            f"{where} has a coordinate outside [0, 1]: {' '.join(fields[1:])}; "
            "rows must give cx cy w h as fractions of the image width and height"
        )
    return values


def _to_letterbox_pixels(boxes: Tensor, geometry: _LetterboxGeometry) -> Tensor:
    """Convert ``(m, 5)`` class, cx, cy, w, h rows to x1, y1, x2, y2, class in letterboxed pixels."""
    classes, centre_x, centre_y, width, height = boxes.unbind(1)
    # A box that reaches past the image edge is cut at the edge, where the image ends.
    corners = torch.stack(
        (centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2), 1
    ).clamp(0.0, 1.0)
    scale = torch.tensor([geometry.width, geometry.height, geometry.width, geometry.height], dtype=boxes.dtype)
    offset = torch.tensor([geometry.left, geometry.top, geometry.left, geometry.top], dtype=boxes.dtype)
    pixels = corners * scale + offset
    return torch.cat((pixels, classes[:, None]), 1).to(torch.float32)
