"""Issue 23 class 6: a tiny file declaring a huge image is refused by the exported
``serving_default`` from its header, with the limit validate applies, and never decoded."""

import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from components.config import GraftConfig
from components.validate import inspect_image
from serving.export import declared_size, export_saved_model
from tests.serving_models import make_model_dir, sample_images

HUGE = 20000  # 20000 x 20000 x 3 bytes = 1.2 GB once decoded


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(side: int = HUGE) -> bytes:
    """A valid 1-bit gray PNG of ``side`` x ``side`` black pixels: about 50 KB."""
    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))  # fmt: skip


def jpeg(side: int = 8, declared: int | None = None) -> bytes:
    """A real ``side`` x ``side`` JPEG whose frame header (SOF0) declares ``declared``."""
    data = bytearray(tf.io.encode_jpeg(tf.zeros([side, side, 3], tf.uint8)).numpy())
    if declared is not None:
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", declared, declared)  # height, width
    return bytes(data)


def gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 8


def bmp_header(width: int, height: int) -> bytes:
    return b"BM" + b"\x00" * 16 + struct.pack("<ii", width, height) + b"\x00" * 28


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    model_dir = make_model_dir(tmp / "model", seed=1)
    export_saved_model(model_dir, tmp / "export", warmup_images=[], top_k=2)
    return tf.saved_model.load(str(tmp / "export"))


@pytest.mark.parametrize(
    "image, size",
    [(huge_png(), (HUGE, HUGE)), (jpeg(declared=HUGE), (HUGE, HUGE)),
     (gif_header(300, 200), (300, 200)), (bmp_header(300, -200), (300, 200)),
     (jpeg(8), (8, 8)), (b"not an image at all", (0, 0)), (b"\x89PNG", (0, 0))],
    ids=["png", "jpeg", "gif", "bmp top-down", "small jpeg", "not an image", "short png"],
)  # fmt: skip
def test_declared_size_is_read_from_the_header(image, size):
    assert tuple(declared_size(tf.constant(image)).numpy()) == size


@pytest.mark.parametrize(
    "image",
    [huge_png(), jpeg(declared=HUGE), gif_header(HUGE, HUGE), bmp_header(HUGE, HUGE)],
    ids=["png", "jpeg", "gif", "bmp"],
)
def test_serving_refuses_an_image_declaring_more_than_max_pixels(exported, image):
    assert len(image) < 100_000  # the file is small; only its header is large
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        exported.signatures["serving_default"](images=tf.constant([image]))
    assert f"than max_pixels={GraftConfig().max_pixels}, the limit validate applies" in str(
        err.value
    )


def test_validate_refuses_the_same_file_with_the_same_setting():
    facts = inspect_image(huge_png(), GraftConfig())
    assert facts["error"] == (
        f"declares {HUGE}x{HUGE} pixels, over max_pixels={GraftConfig().max_pixels} (not decoded)"
    )


def test_serving_still_answers_normal_images(exported):
    _, pngs = sample_images(3)
    answer = exported.signatures["serving_default"](images=tf.constant([*pngs, jpeg(8)]))
    probabilities = answer["probabilities"].numpy()
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_the_limit_is_the_setting_given_and_enforced_by_the_export(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", seed=1)
    export_saved_model(model_dir, tmp_path / "export", warmup_images=[], max_pixels=64)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    serve = loaded.signatures["serving_default"]
    assert serve(images=tf.constant([jpeg(8)]))["probabilities"].shape == (1, 3)  # 64 pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="than max_pixels=64"):
        serve(images=tf.constant([jpeg(9)]))  # 81 pixels
