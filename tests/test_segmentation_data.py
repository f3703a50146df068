"""Segmentation data: Fashion-MNIST scenes (recipe, determinism, a small prepared build) and the
input pipeline (shapes, joint augmentation alignment, nearest resizing, seg_folder mistakes)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from repvgg_keras import preprocessing
from train import fashion_mnist_debian, fashion_mnist_scenes, segmentation_data, segmentation_folder
from train.fashion_mnist_scenes import FashionMnistScenes, ScenesConfig
from train.sources import DatasetNotFound

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_debian.available(), reason="Debian's Fashion-MNIST files are absent"
)

B = FashionMnistScenes


@pytest.fixture(scope="module")
def garments():
    return fashion_mnist_scenes.read_garments("test")


def _scene(garments, i, split_seed=1):
    return fashion_mnist_scenes.compose_scene(
        *garments,
        np.random.default_rng((split_seed, i)),
        B.CANVAS_SIZE,
        B.GARMENT_COUNTS,
        B.GARMENT_SIZES,
        B.THRESHOLD,
    )


@needs_fashion_mnist
def test_scenes_are_deterministic(garments):
    for i in range(5):
        first, again = _scene(garments, i), _scene(garments, i)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_scene(garments, 0)[0], _scene(garments, 1)[0])
    assert not np.array_equal(_scene(garments, 0, 0)[0], _scene(garments, 0, 1)[0])


@needs_fashion_mnist
def test_scene_labels_follow_the_visible_garments(garments):
    images, labels = garments
    overlapping = 0
    counts = set()
    for i in range(150):
        image, mask, count = _scene(garments, i)
        counts.add(count)
        assert image.shape == mask.shape == (64, 64) and image.dtype == mask.dtype == np.uint8
        assert mask.max() <= 10 and mask.max() >= 1
        # The mask is background exactly where the canvas stayed black.
        np.testing.assert_array_equal(mask == 0, image == 0)
        assert (image[mask > 0] >= B.THRESHOLD).all()
        placements = fashion_mnist_scenes.draw_placements(
            np.random.default_rng((1, i)), len(images), 64, B.GARMENT_COUNTS, B.GARMENT_SIZES
        )
        assert len(placements) == count
        # Redraw each garment's foreground: every pixel shows the last garment covering it.
        expected_mask = np.zeros((64, 64), np.uint8)
        covered = np.zeros((64, 64), np.int32)
        for index, size, top, left in placements:
            assert 0 <= top and top + size <= 64 and 0 <= left and left + size <= 64
            foreground = np.zeros((64, 64), bool)
            foreground[top : top + size, left : left + size] = (
                fashion_mnist_scenes.resize_garment(images[index], size) >= B.THRESHOLD
            )
            covered += foreground
            expected_mask[foreground] = labels[index] + 1
        np.testing.assert_array_equal(mask, expected_mask)
        last_index, size, top, left = placements[-1]
        top_garment = fashion_mnist_scenes.resize_garment(images[last_index], size)
        window = image[top : top + size, left : left + size]
        on_top = top_garment >= B.THRESHOLD
        np.testing.assert_array_equal(window[on_top], top_garment[on_top])
        overlapping += bool((covered > 1).any())
    assert counts == {1, 2, 3, 4}
    assert overlapping >= 10


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    builder = FashionMnistScenes(
        data_dir=str(tmp_path_factory.mktemp("scenes")),
        config=ScenesConfig(name="tiny", train_scenes=24, test_scenes=10),
    )
    builder.download_and_prepare()
    return builder


@needs_fashion_mnist
def test_prepared_build_holds_the_composed_scenes(tiny_scenes, garments):
    info = tiny_scenes.info
    assert info.splits["train"].num_examples == 24 and info.splits["test"].num_examples == 10
    assert info.metadata["num_classes"] == 11
    assert info.metadata["class_names"] == segmentation_data.CLASS_NAMES
    stored = list(tiny_scenes.as_dataset(split="test").as_numpy_iterator())
    assert stored[0]["image"].shape == stored[0]["segmentation_mask"].shape == (64, 64, 1)
    expected = sorted(_scene(garments, i)[0].tobytes() for i in range(10))
    assert sorted(e["image"][..., 0].tobytes() for e in stored) == expected
    for example in stored:
        np.testing.assert_array_equal(example["image"] == 0, example["segmentation_mask"] == 0)
        assert 1 <= example["num_garments"] <= 4


def test_scenes_configs_share_their_test_scenes_and_unknown_ones_are_refused():
    configs = {c.name: c for c in FashionMnistScenes.BUILDER_CONFIGS}
    assert configs["default"].train_scenes == 10_000 and configs["large"].train_scenes == 50_000
    assert configs["large"].test_scenes == configs["default"].test_scenes == 2_000
    with pytest.raises(DatasetNotFound, match="has the configs default, large, not 'huge'"):
        segmentation_data._scenes_builder("fashion_mnist_scenes/huge", None)


@needs_fashion_mnist
def test_scenes_pipeline_shapes(tiny_scenes, monkeypatch):
    monkeypatch.setattr(segmentation_data, "_scenes_builder", lambda name, data_dir: tiny_scenes)
    train, evaluation, info = segmentation_data.load(
        "fashion_mnist_scenes", image_size=48, batch_size=4, seed=0
    )
    assert (info.num_classes, info.train_examples, info.eval_examples) == (11, 24, 10)
    assert info.eval_split == "test" and info.class_names[0] == "background"
    first = list(train.take(3))
    for images, masks in first:
        assert images.shape == (4, 48, 48, 3) and images.dtype == tf.float32
        assert masks.shape == (4, 48, 48) and masks.dtype == tf.int32
        assert set(np.unique(masks)) <= set(range(11)) | {255}
    again, _, _ = segmentation_data.load(
        "fashion_mnist_scenes", image_size=48, batch_size=4, seed=0
    )
    for (images, masks), (images_again, masks_again) in zip(first, again.take(3)):
        np.testing.assert_array_equal(images, images_again)  # seeded: same order, same crops
        np.testing.assert_array_equal(masks, masks_again)
    sizes = [int(masks.shape[0]) for _, masks in evaluation]
    assert sizes == [4, 4, 2]  # the remainder is kept
    for images, masks in evaluation.take(1):
        assert images.shape == (4, 48, 48, 3) and masks.shape == (4, 48, 48)
        assert set(np.unique(masks)) <= set(range(11))  # no padding at evaluation


# --- seg_folder ----------------------------------------------------------------------------------

STEP = 50  # synthetic folders: gray level = class * STEP


def _write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _blocks(rng, height, width, classes, cell=12):
    grid = rng.choice(classes, (height // cell + 1, width // cell + 1))
    return np.kron(grid, np.ones((cell, cell), np.int64))[:height, :width].astype(np.uint8)


def _seg_folder(root, classes=(0, 1, 2, 3, 4), counts=(("train", 6), ("test", 3)), palette=False):
    """Gray images whose intensity encodes the class of their mask (blocks of 12x12 pixels)."""
    rng = np.random.default_rng(7)
    for split, count in counts:
        for i in range(count):
            height, width = (40, 56) if i % 2 else (56, 40)
            mask = _blocks(rng, height, width, classes)
            _write_png(root / split / "images" / f"{i}.png", (mask * STEP).astype(np.uint8))
            if palette:  # indices with random colours: read as colours they would not match
                (root / split / "masks").mkdir(parents=True, exist_ok=True)
                mask_image = Image.frombytes("P", (width, height), mask.tobytes())
                mask_image.putpalette(list(rng.integers(0, 256, 768)))
                mask_image.save(root / split / "masks" / f"{i}.png")
            else:
                _write_png(root / split / "masks" / f"{i}.png", mask)
    return root


def _pixels(images):
    """Undo the ImageNet normalisation: 0..255 pixels."""
    scale, offset = preprocessing.scale_and_offset("imagenet", 3)
    return (np.asarray(images) - offset) / scale


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    root = _seg_folder(tmp_path / "seg", palette=True)
    train, _, info = segmentation_data.load(
        f"seg_folder:{root}", image_size=32, batch_size=6, seed=3
    )
    assert info.num_classes == 5 and info.class_names is None
    checked = padded = 0
    for images, masks in train.take(6):
        pixels, masks = _pixels(images), np.asarray(masks)
        np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-3)  # gray -> 3 channels
        gray = pixels[..., 0]
        # Away from block edges (a flat 3x3 neighbourhood) the image gives the mask's class.
        padding = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padding, (3, 3), axis=(1, 2))
        flat = windows.max(axis=(-1, -2)) - windows.min(axis=(-1, -2)) < 0.5
        labelled = masks != segmentation_data.IGNORE_LABEL
        inside = flat & labelled
        np.testing.assert_array_equal(np.round(gray[inside] / STEP), masks[inside])
        checked += inside.sum()
        # Padding: black image under the ignore label.
        assert np.abs(gray[~labelled]).max(initial=0) < 1e-3
        padded += (~labelled).sum()
    assert checked > 0.4 * 6 * 6 * 32 * 32
    assert padded > 0  # scales below 1 pad


def test_nearest_resizing_never_invents_labels(tmp_path):
    root = _seg_folder(tmp_path / "seg", classes=(0, 3, 5))
    (root / "classes.txt").write_text("\n".join("abcdef"))  # 1, 2 and 4 appear in no mask
    masks = root / "train" / "masks" / "0.png"
    mask = np.asarray(Image.open(masks)).copy()
    mask[:4] = 255
    _write_png(masks, mask)
    train, evaluation, info = segmentation_data.load(
        f"seg_folder:{root}", image_size=27, batch_size=3, seed=1
    )
    assert info.num_classes == 6
    seen = set()
    for _, masks in list(train.take(8)) + list(evaluation):
        seen |= set(np.unique(masks).tolist())
    assert seen <= {0, 3, 5, 255} and {0, 3, 5} <= seen


def test_class_names_from_classes_txt(tmp_path):
    root = _seg_folder(tmp_path / "seg", classes=(0, 1, 2))
    (root / "classes.txt").write_text("sky\nroad\ncar\ntree\n")
    folder = segmentation_folder.scan_segmentation_folder(str(root))
    assert folder.num_classes == 4 and folder.class_names == ["sky", "road", "car", "tree"]
    (root / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(ValueError, match="class index 2 but classes.txt names 2 classes"):
        segmentation_folder.scan_segmentation_folder(str(root))


def test_seg_folder_skips_bad_pairs_and_names_them(tmp_path):
    root = _seg_folder(tmp_path / "seg", counts=(("train", 4), ("validation", 2)))
    gray = np.full((24, 24), 50, np.uint8)
    _write_png(root / "train" / "images" / "lonely.png", gray)
    _write_png(root / "train" / "masks" / "orphan.png", gray // STEP)
    _write_png(root / "train" / "images" / "sizes.png", gray)
    _write_png(root / "train" / "masks" / "sizes.png", np.ones((20, 24), np.uint8))
    (root / "train" / "images" / "broken.png").write_bytes(b"not a png")
    _write_png(root / "train" / "masks" / "broken.png", gray // STEP)
    _write_png(root / "train" / "images" / "colour.png", gray)
    _write_png(root / "train" / "masks" / "colour.png", np.zeros((24, 24, 3), np.uint8))
    warnings = io.StringIO()
    folder = segmentation_folder.scan_segmentation_folder(str(root), warn=warnings)
    message = warnings.getvalue()
    assert message.startswith("warning: skipped 5 file(s)") and message.count("\n") == 1
    for expected in (
        "train/images/lonely.png (no mask)",
        "train/masks/orphan.png (no image)",
        "train/images/sizes.png (image 24x24 but mask 24x20)",
        "train/images/broken.png (unreadable image)",
        "train/images/colour.png (unreadable mask (mode RGB",
    ):
        assert expected in message, message
    assert folder.eval_split == "validation"
    assert [len(folder.examples[s]) for s in ("train", "validation")] == [4, 2]


def test_mask_values_that_are_no_class_are_named_with_the_remedy(tmp_path):
    """A stray 200 among 0..4 (no classes.txt) would make a 201-class model; a 16-bit mask's 1000
    failed later on an ignore_label no flag sets; both now name the mask."""
    root = _seg_folder(tmp_path / "seg")
    stray = root / "train" / "masks" / "3.png"
    mask = np.asarray(Image.open(stray)).copy()
    mask[0, 0] = 200
    _write_png(stray, mask)
    with pytest.raises(ValueError) as caught:
        segmentation_folder.scan_segmentation_folder(str(root))
    message = str(caught.value)
    for expected in ("no classes.txt", "5..199 appear in no mask", "3.png holds the value 200",
                     "train/masks/3.png", "Mark stray pixels 255", "classes.txt naming"):  # fmt: skip
        assert expected in message, message
    (root / "classes.txt").write_text("\n".join("abcde"))
    with pytest.raises(ValueError, match="train/masks/3.png holds class index 200 but classes.txt"):
        segmentation_folder.scan_segmentation_folder(str(root))
    deep = root / "test" / "masks" / "1.png"
    Image.fromarray(np.full(np.asarray(Image.open(deep)).shape, 1000, np.uint16)).save(deep)
    assert Image.open(deep).mode == "I;16"
    with pytest.raises(ValueError, match=r"test/masks/1.png holds the value 1000; mask values are "
                       r"class indices 0..254, and 255 marks pixels to ignore"):  # fmt: skip
        segmentation_folder.scan_segmentation_folder(str(root))


def test_two_images_of_one_name_are_refused_and_other_files_named(tmp_path):
    root = _seg_folder(tmp_path / "seg")
    warnings = io.StringIO()
    (root / "train" / "images" / "notes.txt").write_text("about")
    _write_png(root / "train" / "images" / "6.png", np.zeros((24, 24), np.uint8))
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "train" / "masks" / "6.jpg")
    folder = segmentation_folder.scan_segmentation_folder(str(root), warn=warnings)
    assert len(folder.examples["train"]) == 6
    for expected in ("train/images/notes.txt (not a .jpg/.png/.gif/.bmp file)",
                     "train/masks/6.jpg (not a .png file)", "train/images/6.png (no mask)"):  # fmt: skip
        assert expected in warnings.getvalue(), warnings.getvalue()
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(root / "train" / "images" / "1.jpg")
    with pytest.raises(ValueError, match=r"train/images/1.jpg and train/images/1.png share the "
                       "name '1'.*rename or remove one"):  # fmt: skip
        segmentation_folder.scan_segmentation_folder(str(root))


def test_seg_folder_mistakes_are_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        segmentation_folder.scan_segmentation_folder(str(tmp_path / "absent"))
    (tmp_path / "nosplits").mkdir()
    with pytest.raises(DatasetNotFound, match="has no train/ or test/"):
        segmentation_folder.scan_segmentation_folder(str(tmp_path / "nosplits"))
    root = _seg_folder(tmp_path / "seg", counts=(("train", 2),))
    (root / "test" / "images").mkdir(parents=True)
    warnings = io.StringIO()
    with pytest.raises(ValueError, match=r"no usable image/mask pair in test/"):
        segmentation_folder.scan_segmentation_folder(str(root), warn=warnings)
    assert warnings.getvalue() == ""


def test_unprepared_tfds_dataset_is_refused_without_download(tmp_path):
    with pytest.raises(DatasetNotFound, match="is not prepared"):
        segmentation_data.load(
            "oxford_iiit_pet", image_size=32, batch_size=2, data_dir=str(tmp_path)
        )
