"""Detection data and rewards: letterbox geometry, YOLO-format loading, mAP and fidelity rewards."""

from __future__ import annotations

import copy
import gc
import pickle
import shutil
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from rl_pruner.detection.data import (
    class_names,
    label_path_for,
    letterbox,
    load_detection_batches,
    load_image_batches,
)
from rl_pruner.detection.reward import DetectionMAPReward, FidelityReward, detect
from rl_pruner.errors import DataError, InputError
from rl_pruner.models.yolov7 import YOLOv7, build_yolov7

GRAY = 114 / 255
SIZE = 160

# Hand-written boxes (class cx cy w h), rough outlines rather than careful annotations.
HORSE_LABELS = "0 0.30 0.55 0.40 0.50\n0 0.75 0.60 0.30 0.40\n"
IMAGE3_LABELS = "1 0.50 0.50 0.50 0.25\n"

# The same boxes in letterboxed pixels at SIZE = 160, computed by hand:
# horses.jpg is 773 x 512: scale 160 / 773, resized to 160 x round(105.98) = 106,
# padded by (160 - 106) // 2 = 27 rows on top.
HORSE_BOXES = [
    [0.10 * 160, 0.30 * 106 + 27, 0.50 * 160, 0.80 * 106 + 27, 0],  # 16, 58.8, 80, 111.8
    [0.60 * 160, 0.40 * 106 + 27, 0.90 * 160, 0.80 * 106 + 27, 0],  # 96, 69.4, 144, 111.8
]
# image3.jpg is 431 x 640: scale 0.25, resized to round(107.75) = 108 x 160,
# padded by (160 - 108) // 2 = 26 columns on the left.
IMAGE3_BOXES = [[0.25 * 108 + 26, 0.375 * 160, 0.75 * 108 + 26, 0.625 * 160, 1]]  # 53, 60, 107, 100


pytestmark = pytest.mark.usefixtures("two_torch_threads")

@pytest.fixture(scope="module")
def yolov7_dir(shared_data: Path) -> Path:
    path = shared_data / "yolov7"
    for name in ("horses.jpg", "image3.jpg", "yolov7-tiny.yaml"):
        if not (path / name).exists():
            pytest.skip(f"YOLOv7 reference file {path / name} not found")
    return path


@pytest.fixture()
def data_yaml(tmp_path: Path, yolov7_dir: Path) -> Path:
    """A two-image YOLO-format set: horses.jpg (2 horses, class 0) and image3.jpg (1 box, class 1)."""
    images = tmp_path / "set" / "images" / "train"
    labels = tmp_path / "set" / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    shutil.copy(yolov7_dir / "horses.jpg", images / "horses.jpg")
    shutil.copy(yolov7_dir / "image3.jpg", images / "image3.jpg")
    (labels / "horses.txt").write_text(HORSE_LABELS)
    (labels / "image3.txt").write_text(IMAGE3_LABELS)

    path = tmp_path / "set" / "data.yaml"
    path.write_text("train: images/train\nval: images/train\nnc: 2\nnames: [horse, object]\n")
    return path


@pytest.fixture(scope="module")
def tiny(yolov7_dir: Path) -> YOLOv7:
    torch.manual_seed(0)
    return build_yolov7(yolov7_dir / "yolov7-tiny.yaml").eval()


@pytest.fixture(scope="module")
def real_images(yolov7_dir: Path) -> list[Tensor]:
    return load_image_batches(yolov7_dir, SIZE, batch_size=2)


# --- letterbox ---


def test_letterbox_pads_wide_image(yolov7_dir: Path) -> None:
    with Image.open(yolov7_dir / "horses.jpg") as image:
        pixels, scale, padding = letterbox(image, SIZE)
        resized = image.convert("RGB").resize((160, 106), Image.Resampling.BILINEAR)

    assert pixels.shape == (3, SIZE, SIZE)
    assert pixels.dtype == torch.float32
    assert scale == pytest.approx(160 / 773)
    assert padding == (0.0, 27.0)
    assert torch.all(pixels[:, :27] == GRAY)
    assert torch.all(pixels[:, 133:] == GRAY)
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(pixels[:, 27:133], expected)


def test_letterbox_pads_tall_image(yolov7_dir: Path) -> None:
    with Image.open(yolov7_dir / "image3.jpg") as image:
        pixels, scale, padding = letterbox(image, SIZE)

    assert scale == 0.25
    assert padding == (26.0, 0.0)
    assert torch.all(pixels[:, :, :26] == GRAY)
    assert torch.all(pixels[:, :, 134:] == GRAY)
    assert not torch.all(pixels[:, :, 26] == GRAY)
    assert not torch.all(pixels[:, :, 133] == GRAY)


def test_letterbox_rejects_bad_size(yolov7_dir: Path) -> None:
    with Image.open(yolov7_dir / "horses.jpg") as image, pytest.raises(InputError, match="got 0"):
        letterbox(image, 0)


def test_label_box_lands_on_drawn_box(tmp_path: Path) -> None:
    # A black square on white, 320 x 160 pixels, at x 80..160 and y 40..120.
    image = Image.new("RGB", (320, 160), (255, 255, 255))
    image.paste((0, 0, 0), (80, 40, 160, 120))
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image.save(tmp_path / "images" / "square.png")
    (tmp_path / "labels" / "square.txt").write_text("0 0.375 0.5 0.25 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [square]\n")

    [(images, truths)] = load_detection_batches(tmp_path / "data.yaml", "train", 64, batch_size=1)

    # Scale 0.2: the image becomes 64 x 32 with 16 gray rows on top; the square spans
    # x 16..32 and y 16 + 8 = 24 .. 16 + 24 = 40.
    torch.testing.assert_close(truths[0], torch.tensor([[16.0, 24.0, 32.0, 40.0, 0.0]]))
    pixels = images[0]
    assert pixels[:, 25:39, 17:31].max() < 0.05
    assert pixels[:, 19:22, 17:31].min() > 0.95
    assert pixels[:, 25:39, 12:15].min() > 0.95
    assert torch.all(pixels[:, :16] == GRAY)


# --- labelled sets ---


def test_loader_returns_letterboxed_boxes(data_yaml: Path) -> None:
    batches = load_detection_batches(data_yaml, "train", SIZE, batch_size=2)

    assert len(batches) == 1
    images, truths = batches[0]
    assert images.shape == (2, 3, SIZE, SIZE)
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert len(truths) == 2
    torch.testing.assert_close(truths[0], torch.tensor(HORSE_BOXES, dtype=torch.float32))
    torch.testing.assert_close(truths[1], torch.tensor(IMAGE3_BOXES, dtype=torch.float32))
    assert class_names(data_yaml) == ["horse", "object"]


def test_loader_batches_and_limit(data_yaml: Path) -> None:
    batches = load_detection_batches(data_yaml, "val", SIZE, batch_size=1)
    subset = load_detection_batches(data_yaml, "train", SIZE, batch_size=4, limit=1, seed=3)
    again = load_detection_batches(data_yaml, "train", SIZE, batch_size=4, limit=1, seed=3)

    assert [len(images) for images, _ in batches] == [1, 1]
    assert len(subset) == 1
    assert subset[0][0].shape == (1, 3, SIZE, SIZE)
    assert torch.equal(subset[0][0], again[0][0])
    assert any(torch.equal(subset[0][0], images) for images, _ in batches)


def test_loader_reads_list_root_and_mapping(data_yaml: Path, tmp_path: Path) -> None:
    (data_yaml.parent / "train.txt").write_text("images/train/image3.jpg\n\n./images/train/horses.jpg\n")
    other = tmp_path / "elsewhere" / "data.yaml"
    other.parent.mkdir()
    other.write_text("path: ../set\ntrain: train.txt\nnames: {1: object, 0: horse}\n")

    [(images, truths)] = load_detection_batches(other, "train", SIZE, batch_size=2)

    assert class_names(other) == ["horse", "object"]
    assert images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(truths[0], torch.tensor(IMAGE3_BOXES, dtype=torch.float32))
    torch.testing.assert_close(truths[1], torch.tensor(HORSE_BOXES, dtype=torch.float32))


def test_missing_label_file_means_no_objects(data_yaml: Path) -> None:
    (data_yaml.parent / "labels" / "train" / "image3.txt").unlink()

    [(_, truths)] = load_detection_batches(data_yaml, "train", SIZE, batch_size=2)

    assert truths[1].shape == (0, 5)
    assert truths[0].shape == (2, 5)


def test_label_path_replaces_last_images_folder() -> None:
    path = Path("/data/images/set/images/train/x.jpg")
    assert label_path_for(path) == Path("/data/images/set/labels/train/x.txt")


def _write(relative: str, text: str) -> Callable[[Path], Path]:
    def mutate(yaml_path: Path) -> Path:
        (yaml_path.parent / relative).write_text(text)
        return yaml_path
    return mutate


def _write_bytes(relative: str, data: bytes) -> Callable[[Path], Path]:
    def mutate(yaml_path: Path) -> Path:
        (yaml_path.parent / relative).write_bytes(data)
        return yaml_path
    return mutate


def _missing_yaml(yaml_path: Path) -> Path:
    return yaml_path.parent / "absent.yaml"


def _empty_split_folder(yaml_path: Path) -> Path:
    (yaml_path.parent / "images" / "empty").mkdir()
    yaml_path.write_text("train: images/empty\nnames: [horse, object]\n")
    return yaml_path


def _image_outside_images_folder(yaml_path: Path) -> Path:
    shutil.copy(yaml_path.parent / "images" / "train" / "horses.jpg", yaml_path.parent / "loose.jpg")
    (yaml_path.parent / "list.txt").write_text("loose.jpg\n")
    yaml_path.write_text("train: list.txt\nnames: [horse, object]\n")
    return yaml_path


BAD_DATA_CASES = {
    "missing yaml": (_missing_yaml, "absent.yaml", "not found"),
    "malformed yaml": (_write("data.yaml", "train: [images/train\nnames: [a\n"), "data.yaml", "not valid YAML"),
    "yaml not a mapping": (_write("data.yaml", "- images/train\n"), "data.yaml", "must be a mapping"),
    "no names": (_write("data.yaml", "train: images/train\n"), "data.yaml", "no 'names' key"),
    "no split key": (_write("data.yaml", "val: images/train\nnames: [a, b]\n"), "data.yaml", "no 'train' key"),
    "nc mismatch": (_write("data.yaml", "train: images/train\nnc: 3\nnames: [a, b]\n"), "data.yaml", "nc: 3"),
    "names with gap": (_write("data.yaml", "train: images/train\nnames: {0: a, 2: b}\n"), "data.yaml", "[0, 2]"),
    "split folder missing": (_write("data.yaml", "train: images/absent\nnames: [a, b]\n"), "absent", "not found"),
    "folder without images": (_empty_split_folder, "empty", "contains no"),
    "four columns": (_write("labels/train/horses.txt", "0 0.5 0.5 0.2\n"), "horses.txt", "has 4 values"),
    "six columns": (_write("labels/train/horses.txt", "0 0.5 0.5 0.2 0.2 0.1\n"), "horses.txt", "has 6 values"),
    "not a number": (_write("labels/train/horses.txt", "0 0.5 abc 0.2 0.2\n"), "horses.txt", "not a number"),
    "not finite": (_write("labels/train/horses.txt", "0 0.5 nan 0.2 0.2\n"), "horses.txt", "not finite"),
    "coordinate above 1": (_write("labels/train/image3.txt", "1 0.5 1.5 0.2 0.2\n"), "image3.txt", "outside [0, 1]"),
    "coordinate below 0": (_write("labels/train/image3.txt", "1 -0.1 0.5 0.2 0.2\n"), "image3.txt", "outside"),
    "class too large": (_write("labels/train/horses.txt", "2 0.5 0.5 0.2 0.2\n"), "horses.txt", "has class 2"),
    "class not integer": (_write("labels/train/horses.txt", "0.5 0.5 0.5 0.2 0.2\n"), "horses.txt", "has class"),
    "binary label file": (_write_bytes("labels/train/horses.txt", b"\xff\xfe\x00"), "horses.txt", "cannot be read"),
    "unreadable image": (_write_bytes("images/train/broken.jpg", b"not a jpeg"), "broken.jpg", "cannot be read"),
    "no images folder": (_image_outside_images_folder, "loose.jpg", "not inside a folder named 'images'"),
}


@pytest.mark.parametrize("case", list(BAD_DATA_CASES))
def test_loader_rejects_bad_data(data_yaml: Path, case: str) -> None:
    mutate, file_name, message = BAD_DATA_CASES[case]
    yaml_path = mutate(data_yaml)

    with pytest.raises(DataError) as raised:
        load_detection_batches(yaml_path, "train", SIZE, batch_size=2)

    text = str(raised.value)
    assert file_name in text
    assert message in text
    assert "\n" not in text


def test_loader_rejects_bad_sizes(data_yaml: Path) -> None:
    with pytest.raises(InputError, match="multiple of 32"):
        load_detection_batches(data_yaml, "train", 100, batch_size=2)
    with pytest.raises(InputError, match="batch size"):
        load_detection_batches(data_yaml, "train", SIZE, batch_size=0)
    with pytest.raises(InputError, match="split must be one of"):
        load_detection_batches(data_yaml, "validation", SIZE, batch_size=2)


# --- unlabelled images ---


def test_image_batches_sorted_and_batched(data_yaml: Path) -> None:
    folder = data_yaml.parent / "images"
    batches = load_image_batches(folder, SIZE, batch_size=1)
    [labelled, _] = load_detection_batches(data_yaml, "train", SIZE, batch_size=1)

    assert [tuple(images.shape) for images in batches] == [(1, 3, SIZE, SIZE)] * 2
    assert torch.equal(batches[0], labelled[0])  # horses.jpg sorts first


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_image_batches_reject_bad_folder(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "images"
    if case != "missing":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    if case == "unreadable":
        (folder / "broken.png").write_bytes(b"\x89PNG broken")

    with pytest.raises(DataError) as raised:
        load_image_batches(folder, SIZE, batch_size=2)

    expected = "broken.png" if case == "unreadable" else str(folder)
    assert expected in str(raised.value)


# --- mAP reward ---


class GroundTruthDetector(nn.Module):
    """Returns the ground-truth boxes of known batches as decoded YOLO predictions.

    Each box becomes one prediction with objectness 0.9 and a one-hot class, so its
    confidence is 0.9. ``dropped`` lists (image, box) pairs left out, ``shifted`` those
    moved right by 10 % of their width, which gives IoU 0.9 / 1.1 = 0.82.
    """

    def __init__(
        self,
        batches: Sequence[tuple[Tensor, list[Tensor]]],
        n_classes: int,
        dropped: Sequence[tuple[int, int]] = (),
        shifted: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))  # gives the model a device
        self.known: list[tuple[Tensor, Tensor]] = []
        image_index = 0
        for images, truths in batches:
            rows = []
            for boxes in truths:
                rows.append(self._predictions(boxes, n_classes, image_index, dropped, shifted))
                image_index += 1
            self.known.append((images, nn.utils.rnn.pad_sequence(rows, batch_first=True)))

    @staticmethod
    def _predictions(
        boxes: Tensor, n_classes: int, image: int, dropped: Sequence[tuple[int, int]], shifted: Sequence[tuple[int, int]]
    ) -> Tensor:
        rows = []
        for index, (x1, y1, x2, y2, label) in enumerate(boxes.tolist()):
            if (image, index) in dropped:
                continue
            width, height = x2 - x1, y2 - y1
            centre_x = (x1 + x2) / 2 + (0.1 * width if (image, index) in shifted else 0.0)
            classes = [0.0] * n_classes
            classes[int(label)] = 1.0
            rows.append([centre_x, (y1 + y2) / 2, width, height, 0.9, *classes])
        # A zero row has objectness 0, which NMS drops, so images without boxes pad cleanly.
        return torch.tensor(rows).reshape(-1, 5 + n_classes) if rows else torch.zeros(1, 5 + n_classes)

    def forward(self, images: Tensor) -> Tensor:
        for known_images, predictions in self.known:
            if torch.equal(known_images, images):
                return predictions * self.weight
        raise LookupError("images not among the batches this detector was built for")


@pytest.fixture()
def labelled_batches(data_yaml: Path) -> list[tuple[Tensor, list[Tensor]]]:
    return load_detection_batches(data_yaml, "train", SIZE, batch_size=1)


def test_map_reward_perfect_detector(labelled_batches: list[tuple[Tensor, list[Tensor]]]) -> None:
    reward = DetectionMAPReward(labelled_batches)

    values = reward.evaluate(GroundTruthDetector(labelled_batches, n_classes=2))

    assert reward.metric == "map50"
    assert values["reward"] == pytest.approx(1.0)
    assert values["map50"] == pytest.approx(1.0)
    assert values["map50_95"] == pytest.approx(1.0)


def test_map_reward_missed_object(labelled_batches: list[tuple[Tensor, list[Tensor]]]) -> None:
    reward = DetectionMAPReward(labelled_batches, metric="map50_95")
    detector = GroundTruthDetector(labelled_batches, n_classes=2, dropped=[(0, 1)])

    values = reward.evaluate(detector)

    # Horse class: one of two horses found, precision 1 at recall 0.5, so 51 of COCO's
    # 101 recall points (0, 0.01, ..., 0.5) have precision 1. The other class scores 1.
    expected = (51 / 101 + 1.0) / 2
    assert values["map50"] == pytest.approx(expected)
    assert values["map50_95"] == pytest.approx(expected)
    assert values["reward"] == values["map50_95"]


def test_map_reward_detection_cap(labelled_batches: list[tuple[Tensor, list[Tensor]]]) -> None:
    reward = DetectionMAPReward(labelled_batches, max_detections=1)

    values = reward.evaluate(GroundTruthDetector(labelled_batches, n_classes=2))

    # One detection per image: one of the two horses is cut, as if missed.
    expected = (51 / 101 + 1.0) / 2
    assert values["map50"] == pytest.approx(expected)
    assert values["map50_95"] == pytest.approx(expected)


def test_map_reward_metric_choice(labelled_batches: list[tuple[Tensor, list[Tensor]]]) -> None:
    detector = GroundTruthDetector(labelled_batches, n_classes=2, shifted=[(1, 0)])

    by_map50 = DetectionMAPReward(labelled_batches, metric="map50").evaluate(detector)
    by_map50_95 = DetectionMAPReward(labelled_batches, metric="map50_95").evaluate(detector)

    # The shifted box has IoU 0.82, so it matches at thresholds 0.50 to 0.80 (7 of 10).
    assert by_map50["map50"] == pytest.approx(1.0)
    assert by_map50["map50_95"] == pytest.approx((1.0 + 0.7) / 2)
    assert by_map50["reward"] == by_map50["map50"]
    assert by_map50_95["reward"] == pytest.approx(0.85)


def test_map_reward_rejects_bad_input(labelled_batches: list[tuple[Tensor, list[Tensor]]]) -> None:
    no_boxes = [(images, [torch.zeros(0, 5) for _ in truths]) for images, truths in labelled_batches]

    with pytest.raises(DataError, match="empty"):
        DetectionMAPReward([])
    with pytest.raises(DataError, match="no ground-truth box"):
        DetectionMAPReward(no_boxes)
    with pytest.raises(InputError, match="metric must be one of map50, map50_95"):
        DetectionMAPReward(labelled_batches, metric="top1")
    with pytest.raises(InputError, match="conf_threshold"):
        DetectionMAPReward(labelled_batches, conf_threshold=1.5)
    with pytest.raises(InputError, match="max_detections must be a positive number"):
        DetectionMAPReward(labelled_batches, max_detections=0)
    with pytest.raises(InputError, match="ground-truth tensors"):
        DetectionMAPReward([(labelled_batches[0][0], [])])


def test_map_reward_on_real_detector(data_yaml: Path, tiny: YOLOv7) -> None:
    reward = DetectionMAPReward(load_detection_batches(data_yaml, "train", SIZE, batch_size=2))

    values = reward.evaluate(tiny)

    assert set(values) == {"reward", "map50", "map50_95"}
    assert values["map50_95"] >= 0.0
    assert values["map50_95"] <= values["map50"]
    assert values["map50"] <= 1.0
    assert values["reward"] == values["map50"]


# --- fidelity reward ---


def test_detect_restores_mode(tiny: YOLOv7, real_images: list[Tensor]) -> None:
    tiny.train()
    try:
        detections = detect(tiny, real_images[0], conf_threshold=0.0, iou_threshold=0.65, max_detections=7)
        assert tiny.training
    finally:
        tiny.eval()

    assert len(detections) == 2
    assert all(boxes.shape == (7, 6) for boxes in detections)
    assert not tiny.training


@pytest.fixture(scope="module")
def fidelity(tiny: YOLOv7, real_images: list[Tensor]) -> FidelityReward:
    return FidelityReward(tiny, real_images, conf_threshold=0.0)


def test_fidelity_dense_scores_one(tiny: YOLOv7, fidelity: FidelityReward) -> None:
    values = fidelity.evaluate(tiny)

    assert fidelity.metric == "fidelity_map50"
    assert fidelity.n_ground_truths == 2 * 100
    assert values["fidelity_map50"] == pytest.approx(1.0)
    assert values["fidelity_map50_95"] == pytest.approx(1.0)
    assert values["reward"] == values["fidelity_map50"]


def test_fidelity_perturbed_scores_lower(tiny: YOLOv7, fidelity: FidelityReward) -> None:
    perturbed = copy.deepcopy(tiny)
    with torch.no_grad():
        perturbed.model[10].conv.weight.mul_(0.5)

    values = fidelity.evaluate(perturbed)

    assert values["fidelity_map50"] < 0.99
    assert values["fidelity_map50_95"] <= values["fidelity_map50"]
    assert values["reward"] == values["fidelity_map50"]


def test_fidelity_pickles_without_model(tiny: YOLOv7, real_images: list[Tensor]) -> None:
    dense = copy.deepcopy(tiny)
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in dense.parameters())
    reward = FidelityReward(
        dense, real_images, metric="fidelity_map50_95", conf_threshold=0.0, max_ground_truths=10
    )
    dense_reference = weakref.ref(dense)

    del dense
    gc.collect()
    pickled = pickle.dumps(reward)
    restored = pickle.loads(pickled)

    assert dense_reference() is None
    assert len(pickled) < parameter_bytes / 10
    assert [len(boxes) for boxes in restored.ground_truths[0]] == [10, 10]
    # tiny has the dense copy's weights, so the restored reward scores it 1.
    values = restored.evaluate(tiny)
    assert values["reward"] == values["fidelity_map50_95"]
    assert values["fidelity_map50_95"] == pytest.approx(1.0)


def test_fidelity_rejects_no_confident_box(tiny: YOLOv7, real_images: list[Tensor]) -> None:
    # Confidence is at most 1, so no detection is above a threshold of 1.
    with pytest.raises(DataError) as raised:
        FidelityReward(tiny, real_images, conf_threshold=1.0)

    assert "reward.conf_threshold" in str(raised.value)
    assert "untrained" in str(raised.value)


def test_fidelity_rejects_bad_arguments(tiny: YOLOv7, real_images: list[Tensor]) -> None:
    with pytest.raises(DataError, match="empty"):
        FidelityReward(tiny, [])
    with pytest.raises(InputError, match="metric must be one of"):
        FidelityReward(tiny, real_images, metric="map50")
    with pytest.raises(InputError, match="max_ground_truths must be a positive number"):
        FidelityReward(tiny, real_images, max_ground_truths=0)
    with pytest.raises(InputError, match="image batch 0"):
        FidelityReward(tiny, [real_images[0][0]])
