"""Pretrained bases: a keras.applications name or a URI to a `.keras` base.

Every base returned here takes raw pixels (0..255, float32, [N, H, W, C]) and carries its
own preprocessing inside the graph, so the exported SavedModel cannot skew from training.
Preprocessing is built from standard layers (no Lambda), so `.keras` files load safely.
"""

import tempfile
from pathlib import Path

import numpy as np

from common import storage

# name -> (keras.applications constructor, preprocessing mode)
APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", "tf"),  # scales to [-1, 1]
    "resnet50": ("ResNet50", "caffe"),  # RGB->BGR, ImageNet mean subtracted
    "vgg16": ("VGG16", "caffe"),
    "efficientnet_b0": ("EfficientNetB0", "none"),  # rescales inside the application itself
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _caffe_preprocessing():
    """RGB->BGR and mean subtraction as a frozen 1x1 convolution (a standard layer)."""
    import keras

    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel, in_channel in enumerate((2, 1, 0)):
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="caffe_preprocess")
    layer.build((None, None, None, 3))
    layer.set_weights([kernel, -np.asarray(CAFFE_MEAN_BGR, dtype="float32")])
    return layer


def _local_copy(uri: str, suffix: str) -> str:
    if not storage.is_gcs(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(f"No such file: {uri}")
        return uri
    target = Path(tempfile.mkdtemp(prefix="graft-base-")) / f"base{suffix}"
    storage.download_file(uri, target)
    return str(target)


def build_base(base: str, *, image_size: int, channels: int, weights: str = "imagenet"):
    """The feature extractor named by ``base`` (application name or .keras URI)."""
    import keras

    if base.endswith(".keras"):
        model = keras.models.load_model(_local_copy(base, ".keras"))
        have = model.input_shape[-1]
        if have != channels:
            raise ValueError(
                f"The base {base} takes {have}-channel images but `channels={channels}`: "
                f"set channels={have}"
            )
        return model
    if base not in APPLICATIONS:
        raise ValueError(
            f"Received `base={base!r}`: expected one of {sorted(APPLICATIONS)} or a .keras URI"
        )
    constructor, mode = APPLICATIONS[base]
    if weights in ("none", "", None):
        weights_arg, weights_file = None, None
    elif weights == "imagenet":
        weights_arg, weights_file = "imagenet", None  # keras downloads once and caches
    else:
        weights_arg, weights_file = None, _local_copy(weights, Path(weights).suffix or ".h5")
    application = getattr(keras.applications, constructor)(
        include_top=False, weights=weights_arg, input_shape=(image_size, image_size, 3)
    )
    if weights_file:
        application.load_weights(weights_file)
    inputs = keras.Input((image_size, image_size, channels), name="pixels")
    x = keras.layers.Concatenate(name="gray_to_rgb")([inputs] * 3) if channels == 1 else inputs
    if mode == "tf":
        x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    elif mode == "caffe":
        x = _caffe_preprocessing()(x)
    outputs = application(x)
    return keras.Model(inputs, outputs, name=f"base_{base}")


def leaf_layers(model) -> list:
    """Every non-container layer of ``model``, nested models flattened, in graph order."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += leaf_layers(layer)
        else:
            out.append(layer)
    return out


def find_base(model):
    """The nested base model inside a graft model (the first sub-model)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"Model {model.name} has no nested base model")
