"""What validate accepts is exactly what augment trains on, what check_data fingerprints,
and what serving decodes to the same pixels (issue 16, items 8 and 9)."""

import io
import os
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from common import storage
from components.augment import augment_dataset, load_image
from components.check_data import fingerprint_uri
from components.config import GraftConfig
from components.validate import validate_dataset

CONFIG = GraftConfig(min_images_per_class=5, views=0, image_size=16)


def _png(seed: int, size=(24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _write(root: Path, relpaths: list[str]) -> None:
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(zlib.crc32(relpath.encode())))  # distinct content per path


def _class_folders(root: Path, labels=("cat", "dog"), per_class=6, prefix="") -> list[str]:
    relpaths = [f"{prefix}{label}/{i}.png" for label in labels for i in range(per_class)]
    _write(root, relpaths)
    return relpaths


def _refused(root: Path) -> dict[str, list[str]]:
    result = validate_dataset(str(root), None, CONFIG, raise_on_failure=False)
    assert not result.ok
    return {f.expectation: f.files for f in result.failures}


# --- item 8: layouts validate could read but training could not use honestly ---------------


def test_presplit_folders_mixed_with_class_folders_are_refused_naming_the_class_files(tmp_path):
    for split in ("train", "val", "test"):
        _class_folders(tmp_path, prefix=f"{split}/")
    loose = _class_folders(tmp_path, labels=("owl",))
    assert _refused(tmp_path)["expect_one_layout"] == sorted(loose)


def test_presplit_layout_without_val_is_refused(tmp_path):
    for split in ("train", "test"):
        _class_folders(tmp_path, prefix=f"{split}/")
    assert _refused(tmp_path)["expect_every_split"] == ["val/ is missing"]


def test_class_present_only_in_test_is_refused_naming_where_it_is_missing(tmp_path):
    for split in ("train", "val", "test"):
        _class_folders(tmp_path, prefix=f"{split}/")
    _write(tmp_path, [f"test/owl/{i}.png" for i in range(6)])
    assert _refused(tmp_path)["expect_every_class_in_every_split"] == [
        "train/owl/ has no images",
        "val/owl/ has no images",
    ]


@pytest.mark.parametrize(
    "relpath", [".DS_Store", "cat/.DS_Store", "cat/._0.png", ".thumbnails/0.png", "cat/.hidden.png"]
)
def test_hidden_files_and_folders_are_refused_by_name(tmp_path, relpath):
    _class_folders(tmp_path)
    _write(tmp_path, [relpath])
    assert _refused(tmp_path)["expect_no_hidden_paths"] == [relpath]


def test_symlinked_files_and_folders_are_refused_by_name(tmp_path):
    root = tmp_path / "data"
    _class_folders(root)
    _class_folders(tmp_path / "elsewhere", labels=("owl",))
    os.symlink(tmp_path / "elsewhere" / "owl", root / "owl")  # a folder outside the dataset
    os.symlink(root / "cat" / "0.png", root / "dog" / "link.png")
    assert _refused(root)["expect_no_symlinks"] == ["dog/link.png", "owl"]


@pytest.mark.parametrize(
    "labels",
    [("cat", "Cat"), (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"))],
    ids=["case", "unicode-normalisation"],
)
def test_labels_that_cannot_be_told_apart_are_refused(tmp_path, labels):
    _class_folders(tmp_path, labels=labels)
    files = _refused(tmp_path)["expect_distinct_labels"]
    assert len(files) == 12 and {f.split("/")[0] for f in files} == set(labels)


def test_label_with_a_control_character_is_refused(tmp_path):
    _class_folders(tmp_path, labels=("cat", "dog\tbad"))
    assert len(_refused(tmp_path)["expect_printable_labels"]) == 6


def test_a_file_given_as_the_dataset_is_refused_clearly(tmp_path):
    (tmp_path / "one.png").write_bytes(_png(0))
    with pytest.raises(ValueError, match="a file; expected a directory of <label>/ class folders"):
        validate_dataset(str(tmp_path / "one.png"), None, CONFIG)


def test_what_validate_accepts_is_what_augment_trains_on_and_check_data_fingerprints(tmp_path):
    """Odd but honest names: spaces, unicode, upper-case and misleading extensions."""
    root = tmp_path / "data"
    relpaths = _class_folders(root, labels=("cat", "dog", "été fleur"))
    _write(root, ["cat/UPPER.PNG", "dog/really a png.jpeg", "dog/no_extension", "cat/photo.webp"])
    result = validate_dataset(str(root), None, CONFIG)
    validated = sorted(r["relpath"] for r in result.rows)
    assert validated == sorted(relpaths + ["cat/UPPER.PNG", "dog/really a png.jpeg",
                                           "dog/no_extension", "cat/photo.webp"])  # fmt: skip

    spec = augment_dataset(str(root), tmp_path / "examples", CONFIG, result.rows)
    assert sum(spec["images"].values()) == len(validated)  # every accepted file, no other
    assert fingerprint_uri(str(root)).count == len(validated)
    before = fingerprint_uri(str(root)).digest
    (root / "dog" / "no_extension").write_bytes(_png(99))  # a file without an image suffix
    assert fingerprint_uri(str(root)).digest != before


# --- item 9: training and serving decode every accepted image to the same pixels ------------


def _kinds() -> dict[str, bytes]:
    """Every colour mode, bit depth and metadata case we could make with PIL."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))

    def save(image, fmt, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    exif = rgb.getexif()
    exif[0x0112] = 6  # "rotate 90": neither side applies it (common/images.py)
    sixteen = Image.fromarray(rng.integers(0, 65536, (40, 30)).astype(np.uint16))
    return {
        "rgb.png": save(rgb, "PNG"),
        "gray.png": save(rgb.convert("L"), "PNG"),
        "bilevel.png": save(rgb.convert("1"), "PNG"),
        "palette.png": save(rgb.convert("P"), "PNG"),
        "gray-alpha.png": save(rgb.convert("LA"), "PNG"),
        "rgba.png": save(rgb.convert("RGBA"), "PNG"),
        "16bit.png": save(sixteen, "PNG"),
        "interlaced.png": save(rgb, "PNG", interlace=1),
        "rgb.jpg": save(rgb, "JPEG", quality=90),
        "gray.jpg": save(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": save(rgb.convert("CMYK"), "JPEG"),
        "progressive.jpg": save(rgb, "JPEG", progressive=True),
        "exif-rotated.jpg": save(rgb, "JPEG", exif=exif.tobytes()),
        "wide.png": save(rgb.resize((90, 20)), "PNG"),
    }


def _export_for(tmp_path: Path, size: int, channels: int) -> Path:
    """A real graft export of a model whose outputs move with every input pixel."""
    import keras

    from serving.export import export_saved_model

    keras.utils.set_random_seed(channels)
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(64)(x))
    model_dir = tmp_path / f"model-{channels}"
    model_dir.mkdir()
    keras.Model(inputs, outputs).save(model_dir / "model.keras")
    (model_dir / "labels.txt").write_text("a\nb\nc\n")
    return export_saved_model(model_dir, tmp_path / f"export-{channels}", warmup_images=[])


@pytest.mark.parametrize("channels", [1, 3])
def test_training_and_serving_decode_every_accepted_image_kind_to_the_same_pixels(
    tmp_path, channels
):
    kinds = _kinds()
    root = tmp_path / "data"
    for label in ("a", "b"):
        for name, data in kinds.items():
            storage.write_bytes(str(root / label / f"{label}-{name}"), data)
    config = GraftConfig(min_images_per_class=5, image_size=16, channels=channels, min_side=16)
    accepted = validate_dataset(str(root), None, config, raise_on_failure=False)
    decodable = {r["relpath"].split("-", 1)[1] for r in accepted.rows if r["decodable"]}
    assert decodable == set(kinds)  # nothing here is refused: all decode in serving too

    signatures = tf.saved_model.load(str(_export_for(tmp_path, 16, channels))).signatures
    for name, data in kinds.items():
        trained_on = load_image(data, 16, channels)  # what augment stores
        assert trained_on.shape == (16, 16, channels) and trained_on.dtype == np.uint8
        by_bytes = signatures["serving_default"](images=tf.constant([data]))["probabilities"]
        by_pixels = signatures["predict_pixels"](pixels=tf.constant(trained_on[None], tf.float32))
        np.testing.assert_allclose(
            by_bytes.numpy(), by_pixels["probabilities"].numpy(), rtol=0, atol=1e-6, err_msg=name
        )


def test_a_16bit_png_keeps_its_picture_when_decoded_for_training():
    """The old PIL path clipped 16-bit values to white; the shared decoder scales them."""
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    pixels = load_image(buffer.getvalue(), 32, 1)[..., 0]
    np.testing.assert_allclose(pixels, np.round(ramp / 257.0), atol=1)


def test_the_serving_decoders_verdict_says_why_it_refuses():
    from common.images import check_decodable

    assert check_decodable(_png(0)) is None
    assert check_decodable(b"GIF87a-not-really" + bytes(40)) == (
        "Invalid GIF data (size 57), failed to slurp gif file: Wrong record type detected"
    )
