"""How an encoded image becomes the pixels a model sees: one function for training and serving.

augment decodes every training, validation and test image with ``decode_square``, and the
exported SavedModel's ``serving_default`` signature runs the same function inside its
graph, so a file sent to TF Serving becomes exactly the pixels the model was trained on
(16-bit PNGs, palettes, alpha, CMYK and grayscale JPEGs alike). validate accepts only files
``check_decodable`` accepts, so nothing that trains can fail to decode in serving.

    from common.images import decode_square
    pixels = decode_square(tf.constant(png_bytes), image_size=96, channels=3)  # uint8 [96, 96, 3]

EXIF orientation is not applied (tf.io.decode_image ignores it), on both sides alike.
"""

from __future__ import annotations

import re

# Bumped whenever ``decode_square`` changes what it makes of a file: part of the key of every
# stored record (common/reuse_store.py), with the TensorFlow version whose decoder runs it.
DECODER_VERSION = "decode_square-1"


def decoder_version() -> str:
    """The decoder's identity for the reuse store: graft's version of it and TensorFlow's."""
    import tensorflow as tf

    return f"{DECODER_VERSION}/tf-{tf.__version__}"


def decode_square(encoded, image_size: int, channels: int):
    """Encoded JPEG/PNG bytes (a scalar tf.string) -> uint8 [image_size, image_size, channels].

    Decoded to RGB (every colour mode and bit depth the decoder knows, alpha dropped),
    centre-cropped to a square, resized with antialiasing, converted to gray when
    ``channels`` is 1, rounded to 8 bits. Works eagerly and inside a tf.function.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
    )
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    if channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, (image_size, image_size, channels))


def check_decodable(data: bytes) -> str | None:
    """None when ``decode_square`` can decode ``data``; else the decoder's reason."""
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
        # "{{function_node ...}} Invalid GIF data ... [Op:DecodeImage]" -> the middle part
        message = re.sub(r"^\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]$", "", err.message.splitlines()[0])
        return message[:200]
    return None
