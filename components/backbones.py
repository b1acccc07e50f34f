"""Pretrained bases: a keras.applications name or a URI to a `.keras` base.

Every base returned here takes raw pixels (0..255, float32, [N, H, W, C]) and carries its
own preprocessing inside the graph, so the exported SavedModel cannot skew from training.
Preprocessing is built from standard layers (no Lambda), so `.keras` files load safely.

A `.keras` base also carries its settings (read without TensorFlow, in milliseconds):
what its input shape fixes (channels; the image size when it is fixed) and, in a
``graft_settings.json`` entry `graft pretrain` adds to the file, the settings it is known
to work with. `graft run` starts from these; `check_base_settings` refuses a config that
contradicts what the base fixes.

    facts = base_facts("base.keras"); facts.settings()  # {"channels": 1, "image_size": 28, ...}
"""

import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
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
# graft's own input layers around an application: fixed arithmetic, never trained
# (fine-tuning them would let the exported model's preprocessing drift from the base's).
PREPROCESSING_LAYERS = frozenset({"gray_to_rgb", "preprocess", "caffe_preprocess"})
MIN_APPLICATION_SIZE = 32  # keras.applications refuse smaller inputs without the top
# Where keras.applications download imagenet weights (no top) from, and the file names they
# cache them under (tests/unit/test_config.py compares these with Keras' own).
KERAS_WEIGHTS_ORIGIN = "https://storage.googleapis.com/"
IMAGENET_WEIGHTS = {
    "mobilenet_v2": ("tensorflow/keras-applications/mobilenet_v2/",
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"),
    "resnet50": ("tensorflow/keras-applications/resnet/",
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": ("tensorflow/keras-applications/vgg16/",
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnet_b0": ("keras-applications/", "efficientnetb0_notop.h5"),
}  # fmt: skip
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)  # sizes with their own weights; others get 224
SETTINGS_ENTRY = "graft_settings.json"  # inside a .keras base, next to Keras' config.json
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseFacts:
    fixed: dict = field(default_factory=dict)  # what the input shape fixes: channels, image_size
    recorded: dict = field(default_factory=dict)  # settings saved with the base (graft pretrain)

    def settings(self) -> dict:
        """The settings a run with this base starts from (what the base fixes wins)."""
        return {**self.recorded, **self.fixed}


def record_settings(keras_path: str | Path, settings: dict) -> None:
    """Store ``settings`` inside the .keras file (Keras ignores entries it does not know)."""
    with zipfile.ZipFile(keras_path, "a") as archive:
        if SETTINGS_ENTRY in archive.namelist():
            raise ValueError(f"{keras_path} already records its settings")
        archive.writestr(SETTINGS_ENTRY, json.dumps(settings, indent=2, sort_keys=True))


def _input_shape(keras_config: dict) -> list | None:
    for layer in keras_config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            return layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
    return (keras_config.get("build_config") or {}).get("input_shape")


def base_facts(base: str) -> BaseFacts:
    """What a base fixes and records; nothing for keras.applications names (graft builds
    those for any image size and channel count)."""
    if not base.endswith(".keras"):
        return BaseFacts()
    path = _local_copy(base, ".keras")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            shape = _input_shape(json.loads(archive.read("config.json")))
            recorded = json.loads(archive.read(SETTINGS_ENTRY)) if SETTINGS_ENTRY in names else {}
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ValueError(f"The base {base} is not a readable .keras file: {err}") from err
    fixed = {}
    if shape and len(shape) == 4:
        if shape[-1] is not None:
            fixed["channels"] = int(shape[-1])
        if shape[1] is not None and shape[1] == shape[2]:
            fixed["image_size"] = int(shape[1])
        elif shape[1] is not None or shape[2] is not None:
            raise ValueError(
                f"The base {base} takes {shape[1]}x{shape[2]} images: graft feeds square "
                "images, so give it a base with a square or free input size"
            )
    return BaseFacts(fixed, recorded)


def contradictions(base: str, fixed: dict, *, channels: int, image_size: int) -> list[str]:
    """One sentence per setting the base's input shape rules out, with the fix."""
    problems = []
    if "channels" in fixed and channels != fixed["channels"]:
        problems.append(
            f"The base {base} takes {fixed['channels']}-channel images but "
            f"`channels={channels}`: set channels={fixed['channels']} "
            "(or leave channels unset: graft takes it from the base)"
        )
    if "image_size" in fixed and image_size != fixed["image_size"]:
        size = fixed["image_size"]
        problems.append(
            f"The base {base} takes {size}x{size} images but `image_size={image_size}`: "
            f"set image_size={size} (or leave image_size unset: graft takes it from the base)"
        )
    return problems


def check_base_settings(config, facts: BaseFacts | None = None, *, readable: bool = True) -> None:
    """Refuse, before any work, a config the base cannot run with: channels/image_size its
    input shape rules out, an image size below what keras.applications builds, a weights
    file for a base that takes none (or that does not exist), a fine_tune_from_layer the
    base does not have. ``readable=False``: the base is only readable where the run runs
    (a bucket only the cluster reaches); what needs the base itself is left to its step."""
    facts = base_facts(config.base) if facts is None and readable else facts or BaseFacts()
    problems = contradictions(
        config.base, facts.fixed, channels=config.channels, image_size=config.image_size
    )
    if config.base in APPLICATIONS and config.image_size < MIN_APPLICATION_SIZE:
        problems.append(
            f"`image_size={config.image_size}`: keras.applications bases ({config.base}) take "
            f"images of at least {MIN_APPLICATION_SIZE}x{MIN_APPLICATION_SIZE}; set "
            f"image_size >= {MIN_APPLICATION_SIZE} or give --base a .keras base"
        )
    weights_file = config.weights not in ("imagenet", "none")
    if weights_file and config.base not in APPLICATIONS:
        problems.append(
            f"`weights={config.weights}` cannot apply to the base {config.base}: a .keras base "
            "carries its own weights; drop the weights setting (it is for keras.applications "
            "names)"
        )
    elif weights_file and not storage.is_gcs(config.weights) and not Path(config.weights).is_file():
        problems.append(f"`weights={config.weights}`: no such file")
    if problems:
        raise ValueError("; ".join(problems))
    if config.fine_tune_from_layer and readable:
        names = fine_tunable_layers(config)
        if config.fine_tune_from_layer not in names:
            raise ValueError(
                f"Received `fine_tune_from_layer={config.fine_tune_from_layer!r}`: the base "
                f"{config.base} has no layer with weights of that name; its layers with "
                f"weights, bottom to top: {', '.join(names)}"
            )


def fine_tunable_layers(config) -> list[str]:
    """The names fine_tune's ``fine_tune_from_layer`` can take: the base's layers with
    weights, in graph order (the base is built here, without weights, to read them)."""
    model = build_base(config.base, image_size=config.image_size, channels=config.channels,
                       weights="none")  # fmt: skip
    return [layer.name for layer in leaf_layers(model) if layer.weights]


def imagenet_weights(base: str, image_size: int) -> tuple[str, str]:
    """(download URL, file name in Keras' cache) of a keras.applications base's imagenet
    weights without the top, as keras.applications names them."""
    folder, name = IMAGENET_WEIGHTS[base]
    rows = image_size if image_size in MOBILENET_V2_SIZES else 224  # what MobileNetV2 loads
    name = name.format(rows=rows)
    return f"{KERAS_WEIGHTS_ORIGIN}{folder}{name}", name


def check_weights_available(config, *, keras_home: str | None = None, timeout: float = 10.0):
    """Refuse at start a run whose imagenet weights are neither in Keras' cache nor
    downloadable from here (no network: the run would fail at train_head, three steps in).
    ``keras_home``: Keras' cache folder (KERAS_HOME, else ~/.keras, as Keras reads it)."""
    import urllib.error
    import urllib.request

    if config.base not in APPLICATIONS or config.weights != "imagenet":
        return
    url, name = imagenet_weights(config.base, config.image_size)
    home = Path(keras_home or Path.home() / ".keras").expanduser()
    if not os.access(home, os.W_OK):
        home = Path("/tmp/.keras")  # where keras.utils.get_file caches then
    if (home / "models" / name).is_file():
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
    constructor = APPLICATIONS[config.base][0]
    raise ValueError(
        f"The base {config.base} needs its imagenet weights ({name}): they are not in Keras' "
        f"cache ({home / 'models'}) and cannot be downloaded from {url} ({reason}). "
        "Without network: give --base a .keras base (`graft pretrain --out base.keras` "
        "makes one offline), or pre-download the weights where there is network "
        f'(`python -c "import keras; keras.applications.{constructor}(include_top=False, '
        f'input_shape=({config.image_size}, {config.image_size}, 3))"`) and copy '
        f"~/.keras/models/{name} here, or set weights=<that file>"
    )


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
        _, height, width, have = model.input_shape
        fixed = {"channels": have, **({"image_size": height} if height and height == width else {})}
        problems = contradictions(base, fixed, channels=channels, image_size=image_size)
        if problems:
            raise ValueError("; ".join(problems))
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
    try:
        application = getattr(keras.applications, constructor)(
            include_top=False, weights=weights_arg, input_shape=(image_size, image_size, 3)
        )
    except Exception as err:  # keras.utils.get_file raises a bare Exception for a failed fetch
        if "URL fetch failure" not in str(err):
            raise
        raise ValueError(
            f"The imagenet weights of `base={base!r}` could not be downloaded ({err}). Where "
            "there is no network, give a copy of that file with `--set weights=PATH.h5`, or a "
            "base that needs no download: `graft pretrain --out base.keras`, then "
            "`--base base.keras`."
        ) from err
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
