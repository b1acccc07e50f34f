"""SavedModel export for TF Serving: bytes in, named outputs out, warmup included.

    export_saved_model("model_dir", "export_dir", warmup_images=[png_bytes, ...], top_k=3)

Signatures (the contract the dev server, the client and TF Serving share):

- ``serving_default``: ``images`` tf.string [N] of encoded JPEG/PNG. Decoding, the center
  crop and resizing (common/images.py, the same function augment used) and the base's
  preprocessing all happen inside the graph, so a client sends file bytes and nothing can skew.
- ``predict_pixels``: ``pixels`` float32 [N, H, W, C] (0..255), for callers that decoded.

Before decoding, ``serving_default`` reads each image's declared width x height from its
header (JPEG SOF, PNG IHDR, GIF screen, BMP info header) and answers InvalidArgument for
more than ``max_pixels``, the limit validate applies (GraftConfig.max_pixels): a 400 KB PNG
declaring 20000x20000 pixels is refused without allocating its 1.2 GB. The export records
the limit in the refusal's message (and push in the version's metadata).

Both return ``probabilities`` float32 [N, classes], ``classes`` int32 [N, k] (top-k ids)
and ``labels`` string [N, k]. A model with a nested base (every graft model) also gets
``embeddings``: ``images`` as serving_default -> ``embeddings`` float32 [N, D], the base's
pooled features, which drift (components/drift.py) compares with the training images'. Warmup requests go to
``assets.extra/tf_serving_warmup_requests`` so the first real request is not slow.
"""

from pathlib import Path

from common.artifacts import LABELS_FILE, MODEL_FILE
from common.images import decode_square
from components.config import GraftConfig

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
IMAGES_INPUT, PIXELS_INPUT = "images", "pixels"
PIXELS_SIGNATURE = "predict_pixels"
OUTPUTS = ("probabilities", "classes", "labels")
EMBEDDINGS_SIGNATURE = EMBEDDINGS_OUTPUT = "embeddings"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_size(encoded):
    """(width, height) int64 an encoded image's header declares, read without decoding;
    (0, 0) for what is no JPEG/PNG/GIF/BMP (the decoder then refuses it with its reason)."""
    import tensorflow as tf

    def number(offset: int, size: int, *, big_endian: bool):
        raw = tf.cast(
            tf.io.decode_raw(tf.strings.substr(encoded, offset, size), tf.uint8), tf.int64
        )
        weights = 256 ** tf.range(size - 1, -1, -1, dtype=tf.int64) if big_endian else (
            256 ** tf.range(size, dtype=tf.int64)
        )  # fmt: skip
        return tf.reduce_sum(raw * weights)

    def signed32(value):  # BMP heights are negative for top-down rows
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)  # [h, w, c], header only
        return tf.stack([shape[1], shape[0]])

    def png():  # IHDR: width and height, big-endian uint32 at bytes 16..24
        return tf.stack([number(16, 4, big_endian=True), number(20, 4, big_endian=True)])

    def gif():  # logical screen: little-endian uint16 at bytes 6..10; frames are drawn on it
        return tf.stack([number(6, 2, big_endian=False), number(8, 2, big_endian=False)])

    def bmp():  # BITMAPINFOHEADER: little-endian int32 width, height at bytes 18..26
        return tf.stack([signed32(number(18, 4, big_endian=False)),
                         signed32(number(22, 4, big_endian=False))])  # fmt: skip

    def unknown():
        return tf.zeros([2], tf.int64)

    length = tf.strings.length(encoded)
    head = tf.strings.substr(encoded, 0, 8)  # shorter strings give a shorter head: no error
    is_png = tf.logical_and(tf.equal(head, PNG_SIGNATURE), length >= 24)
    is_gif = tf.logical_and(tf.strings.substr(encoded, 0, 3) == b"GIF", length >= 10)
    is_bmp = tf.logical_and(tf.strings.substr(encoded, 0, 2) == b"BM", length >= 26)
    return tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: tf.cond(
        is_png, png, lambda: tf.cond(is_gif, gif, lambda: tf.cond(is_bmp, bmp, unknown))
    ))  # fmt: skip


def _export_archive(
    model, labels: list[str], image_size: int, channels: int, top_k: int, max_pixels: int
):
    """Both signatures as a Keras ExportArchive.

    Not tf.saved_model.save on a tf.Module holding the Keras 3 model: that SavedModel
    loads with tf.saved_model.load but not with TF Serving's session loader, where every
    request fails "Could not find variable dense/bias" (tensorflow/tensorflow#72963); the
    archive tracks the model's variables so both loaders restore the same ones.
    """
    import keras
    import tensorflow as tf

    k = min(top_k, len(labels))
    label_table = tf.constant(labels)
    # A constant of the graph, not a variable: an extra variable made the checkpoint's
    # variable order differ between exports of the same architecture.
    limit = tf.constant(max_pixels, dtype=tf.int64, name="max_pixels")

    def answer(pixels):
        probabilities = tf.cast(model(pixels, training=False), tf.float32)
        top = tf.math.top_k(probabilities, k=k)
        classes = tf.cast(top.indices, tf.int32)
        return {"probabilities": probabilities, "classes": classes,
                "labels": tf.gather(label_table, classes)}  # fmt: skip

    def decode(encoded):
        size = declared_size(encoded)
        # Refused from the header, before the decoder allocates width x height x 3 bytes.
        check = tf.debugging.assert_less_equal(
            size[0] * size[1], limit,
            message=f"the image declares more pixels (width x height, read from its "
            f"header) than max_pixels={max_pixels}, the limit validate applies; not decoded",
        )  # fmt: skip
        with tf.control_dependencies([check]):
            # The very function augment decoded the training images with.
            return tf.cast(decode_square(encoded, image_size, channels), tf.float32)

    def images_to_pixels(images):
        return tf.map_fn(
            decode,
            images,
            fn_output_signature=tf.TensorSpec((image_size, image_size, channels), tf.float32),
        )

    def serve_images(images):
        return answer(images_to_pixels(images))

    def serve_pixels(pixels):
        return answer(pixels)

    base = nested_base(model)

    def serve_embeddings(images):
        features = tf.cast(base(images_to_pixels(images), training=False), tf.float32)
        if len(features.shape) == 4:  # as assemble pools a feature map for the head
            features = tf.reduce_mean(features, axis=[1, 2])
        return {EMBEDDINGS_OUTPUT: features}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve_images, [tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)]
    )
    archive.add_endpoint(
        PIXELS_SIGNATURE,
        serve_pixels,
        [tf.TensorSpec([None, image_size, image_size, channels], tf.float32, name=PIXELS_INPUT)],
    )
    if base is not None:  # drift compares requests with the training images in this space
        archive.add_endpoint(
            EMBEDDINGS_SIGNATURE,
            serve_embeddings,
            [tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)],
        )
    return archive


def nested_base(model):
    """The base inside a graft model (its first nested model), or None (a flat model)."""
    import keras

    return next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)


def write_warmup(export_dir: str | Path, images: list[bytes], model_name: str = "graft") -> Path:
    """PredictionLog records TF Serving (and graft serve) replay when loading a version."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = Path(export_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in images:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup(export_dir: str | Path) -> list:
    """The PredictRequests in a version's warmup file."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(str(Path(export_dir) / WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def export_saved_model(
    model_dir: str | Path,
    export_dir: str | Path,
    *,
    warmup_images: list[bytes],
    top_k: int = 3,
    max_pixels: int = GraftConfig.max_pixels,
) -> Path:
    """Export ``<model_dir>/model.keras`` + labels.txt as a TF Serving SavedModel whose
    ``serving_default`` refuses images declaring more than ``max_pixels`` pixels."""
    import keras

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    model = keras.models.load_model(model_dir / MODEL_FILE)
    labels = [line for line in (model_dir / LABELS_FILE).read_text().splitlines() if line]
    _, image_size, _, channels = model.input_shape
    _export_archive(model, labels, image_size, channels, top_k, max_pixels).write_out(
        str(export_dir), verbose=False
    )
    if warmup_images:
        write_warmup(export_dir, warmup_images)
    return export_dir
