"""validate passes a clean export and stops each kind of bad data, naming the files."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import datasets
from components.config import GraftConfig
from components.validate import DataValidationError, validate_dataset

CONFIG = GraftConfig(min_images_per_class=5)


@pytest.fixture
def clean(tmp_path) -> Path:
    root = tmp_path / "data"
    # a seed whose content-hash split gives every class val and test images
    datasets.export_fashion_mnist(str(root), classes=[1, 3, 5], per_class=6, seed=6)
    return root


def png(size=(20, 20), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid tiny PNG whose header declares a huge image (rewritten IHDR, CRC fixed)."""
    data = bytearray(png())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def failures(root) -> dict[str, list[str]]:
    with pytest.raises(DataValidationError) as raised:
        validate_dataset(str(root), None, CONFIG)
    result = validate_dataset(str(root), None, CONFIG, raise_on_failure=False)
    assert not result.ok
    assert raised.value.args[0].startswith("dataset failed validation")
    return {f.description: f.files for f in result.failures}


def test_clean_fashion_mnist_export_passes_and_writes_reports(clean, tmp_path):
    result = validate_dataset(str(clean), tmp_path / "report", CONFIG)
    assert result.ok and result.files == 18
    assert result.per_label == {"dress": 6, "sandal": 6, "trouser": 6}
    assert all(o["success"] for o in result.expectations) and len(result.expectations) == 12
    assert "Dataset valid" in (tmp_path / "report" / "validation_report.html").read_text()
    assert len((tmp_path / "report" / "manifest.jsonl").read_text().splitlines()) == 18


@pytest.mark.parametrize(
    "name, content, rule",
    [
        (
            "corrupt.jpg",
            b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
            "every file decodes as an image",
        ),
        ("truncated.png", png(seed=3)[:120], "every file decodes as an image"),
        ("empty.png", b"", "files are 1..30000000 bytes"),
        ("text.jpg", b"this is not an image\n", "every file decodes as an image"),
        ("tiny.png", png(size=(8, 8)), "image sides are at least 16px"),
        ("bomb.png", bomb_png(), "images have at most 40000000 pixels"),
    ],
    ids=[
        "corrupt-jpeg",
        "truncated-png",
        "zero-byte",
        "text-as-jpg",
        "too-small",
        "decompression-bomb",
    ],
)
def test_bad_file_is_reported_by_name(clean, name, content, rule):
    (clean / "dress" / name).write_bytes(content)
    found = failures(clean)
    assert f"dress/{name}" in found[rule]


def test_unsupported_format_gif_is_reported(clean):
    buffer = io.BytesIO()
    Image.new("L", (20, 20)).save(buffer, "GIF")
    (clean / "sandal" / "anim.gif").write_bytes(buffer.getvalue())
    assert failures(clean)["formats are JPEG, PNG"] == ["sandal/anim.gif"]


def test_empty_class_folder_is_reported(clean):
    (clean / "coat").mkdir()
    assert failures(clean)["every class folder holds images: add images to it or remove it"] == [
        "coat"
    ]


def test_class_with_too_few_images_names_its_files(clean):
    for extra in sorted((clean / "trouser").iterdir())[2:]:
        extra.unlink()
    assert sorted(failures(clean)["every class has at least 5 images"]) == [
        "trouser/train_s6_00000.png",
        "trouser/train_s6_00001.png",
    ]


def test_single_class_is_reported(tmp_path):
    root = tmp_path / "one"
    datasets.export_fashion_mnist(str(root), classes=[1], per_class=6)
    assert failures(root)["there are at least 2 classes"] == ["labels found: ['trouser']"]


def test_same_image_under_two_labels_is_reported(clean):
    (clean / "sandal" / "copy.png").write_bytes(
        (clean / "dress" / "train_s6_00000.png").read_bytes()
    )
    assert sorted(failures(clean)["no identical image under two labels"]) == [
        "dress/train_s6_00000.png",
        "sandal/copy.png",
    ]


def test_same_image_in_train_and_test_is_reported(tmp_path):
    root = tmp_path / "presplit"
    for split in ("train", "test"):
        datasets.export_fashion_mnist(
            str(root / split), classes=[1, 3], per_class=6, seed=0 if split == "train" else 1
        )
    leaked = root / "test" / "dress" / "leak.png"
    leaked.write_bytes((root / "train" / "dress" / "train_s0_00003.png").read_bytes())
    assert sorted(failures(root)["no identical image in two splits"]) == [
        "test/dress/leak.png",
        "train/dress/train_s0_00003.png",
    ]


def test_gray_rgb_and_rgba_mix_is_accepted_and_converted_later(clean):
    """Rule: channel counts may differ; augment converts every image to config.channels."""
    (clean / "dress" / "rgb.png").write_bytes(png(mode="RGB"))
    (clean / "dress" / "rgba.png").write_bytes(png(mode="RGBA"))
    result = validate_dataset(str(clean), None, CONFIG)
    assert {row["channels"] for row in result.rows} == {1, 3, 4}


def test_file_names_with_spaces_and_unicode_are_accepted(clean):
    (clean / "dress" / "été photo 1.png").write_bytes(png(seed=9))
    result = validate_dataset(str(clean), None, CONFIG)
    assert "dress/été photo 1.png" in {row["relpath"] for row in result.rows}


def test_imbalanced_classes_name_the_small_class(clean):
    for index in range(6, 130):
        (clean / "dress" / f"more_{index}.png").write_bytes(png(seed=index))
    found = failures(clean)["largest/smallest class is at most 20.0"]
    assert found and all(path.startswith(("sandal/", "trouser/")) for path in found)


def test_file_at_the_wrong_depth_is_reported(clean):
    (clean / "loose.png").write_bytes(png())
    assert (
        "loose.png"
        in failures(clean)[
            "every file sits in a <label>/ folder (or <split>/<label>/): move the files listed into one"
        ]
    )


# --- one notion of "an image file" for every rule (issue 23, class 8) -------------------------


def test_a_class_of_extension_less_pngs_is_a_class_like_any_other(clean):
    (clean / "noext").mkdir()
    for i in range(6):
        (clean / "noext" / f"image_{i}").write_bytes(png(seed=i))
    result = validate_dataset(str(clean), None, CONFIG)
    assert result.ok and result.per_label["noext"] == 6


@pytest.mark.parametrize("reserved", ["test", "train", "val"])
def test_a_class_folder_named_like_a_split_is_refused_as_a_reserved_name(clean, reserved):
    (clean / reserved).mkdir()
    for i in range(6):
        (clean / reserved / f"{i}.png").write_bytes(png(seed=i))
    with pytest.raises(DataValidationError) as refused:
        validate_dataset(str(clean), None, CONFIG)
    message = str(refused.value)
    assert f"rename {reserved}/" in message and "pre-split layout" in message
    assert f"{reserved}/0.png" in message
    assert "sits in a <label>/ folder" not in message  # one reason per file, the right one


def test_an_empty_class_folder_is_refused_with_what_to_do(clean):
    (clean / "nothing").mkdir()
    with pytest.raises(DataValidationError, match="holds images: add images to it or remove it"):
        validate_dataset(str(clean), None, CONFIG)
