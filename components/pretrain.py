"""pretrain: a small CNN base trained on source classes, for offline transfer.

    graft pretrain --classes 0,2,4,6,8 --out .graft/cache/fashion-base.keras

The demo's base is this command's output, committed with its provenance (command, seed,
data, TensorFlow version, SHA-256): components/bases/fashion-base-v2-0-2-4-6-8.*.

Where there is no network there are no imagenet weights; this gives the demo and the tests
a real pretrained base: Fashion-MNIST's classes 0,2,4,6,8 as the source task, the other
five as the target. Two choices make its features transfer (benchmarks/RESULTS.md):
- the base is trained on two tasks at once, the source labels and which of four rotations
  an image was turned by (Gidaris et al. 2018). Labels alone teach what tells five
  upper-body garments apart; rotation needs the shape of the whole object.
- its output is every block's average- and max-pooled activations, concatenated: early
  blocks hold the generic edges and parts, the last block the source-specific ones.
The saved base takes 0..255 grayscale pixels of any size >= 16 and outputs that vector,
and carries ``PRETRAINED_SETTINGS`` (components/backbones.py reads them), so
`graft run --base base.keras` needs no `--set` to work with it.
"""

import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from common import storage
from components import datasets
from components.backbones import SETTINGS_ENTRY, record_settings

log = logging.getLogger(__name__)
RECIPE = "v2"  # v2: rotation task + multi-scale pooled output; bump when the recipe changes
# The settings this recipe's base was measured with (benchmarks/transfer_quality.py, the demo),
# stored inside every base it saves; `graft run` starts from them, `--set` still overrides.
PRETRAINED_SETTINGS = {
    "image_size": 28,  # Fashion-MNIST's own size: the base was pretrained on it
    "channels": 1,
    "head_learning_rate": 0.01,  # the standardised head on this base's features
    "head_max_epochs": 100,
    "min_delta": 0.005,
    # with 25-100 validation images val loss is noisy: patience 3 stopped heads after ~5
    # epochs, 3.6 points lower at 10 labels/class (benchmarks/RESULTS.md)
    "patience": 10,
    "fine_tune_max_epochs": 20,
    "fine_tune_layers": 12,  # every weighted layer of the small base (BatchNorm stays frozen)
    "fine_tune_learning_rate": 0.001,  # the learning rate the base was trained with
}


def small_cnn(channels: int = 1, width: int = 32):
    """Three conv blocks with BatchNorm; 0..255 pixels in, multi-scale pooled features out."""
    import keras

    inputs = keras.Input((None, None, channels), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    pooled = []
    for block, filters in enumerate((width, width * 2, width * 4)):
        for conv in range(2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"b{block}_conv{conv}"
            )(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"b{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"b{block}_relu{conv}")(x)
        pooled += [
            keras.layers.GlobalAveragePooling2D(name=f"b{block}_avg")(x),
            keras.layers.GlobalMaxPooling2D(name=f"b{block}_max")(x),
        ]
        if block < 2:
            x = keras.layers.MaxPooling2D(name=f"b{block}_pool")(x)
    features = keras.layers.Concatenate(name="features")(pooled)
    return keras.Model(inputs, features, name="graft_small_cnn")


def rotations(images: np.ndarray, labels: np.ndarray, seed: int):
    """Every image turned by 0, 90, 180 and 270 degrees, shuffled: (images, labels, turns)."""
    turned = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)])
    turns = np.repeat(np.arange(4), len(images))
    order = np.random.default_rng(seed).permutation(len(turned))  # validation_split takes the tail
    return turned[order], np.tile(labels, 4)[order], turns[order]


def pretrain_base(
    out_uri: str,
    *,
    classes: list[int] = (0, 2, 4, 6, 8),
    per_class: int = 2000,
    epochs: int = 3,
    seed: int = 0,
    data_dir=datasets.DEBIAN_FASHION_MNIST,
) -> dict:
    """Train ``small_cnn`` on Fashion-MNIST ``classes``; save the base (no classifier) to ``out_uri``."""
    import keras

    for name, value in (("epochs", epochs), ("per_class", per_class)):
        if value < 1:
            raise ValueError(f"Received `{name}={value}`: expected >= 1")
    keras.utils.set_random_seed(seed)
    images, labels = datasets.load_fashion_mnist("train", data_dir=data_dir)
    picked = datasets.pick_per_class(labels, list(classes), per_class, seed)
    index = np.concatenate(list(picked.values()))
    source_labels = np.concatenate([np.full(len(v), i) for i, v in enumerate(picked.values())])
    x, y, turns = rotations(images[index][..., None].astype("float32"), source_labels, seed)
    base = small_cnn()
    classifier = keras.Model(
        base.input,
        {
            "source_class": keras.layers.Dense(len(classes), activation="softmax", name="source_class")(base.output),
            "rotation": keras.layers.Dense(4, activation="softmax", name="rotation")(base.output),
        },
    )  # fmt: skip
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={"source_class": "sparse_categorical_crossentropy", "rotation": "sparse_categorical_crossentropy"},
        metrics={"source_class": ["accuracy"], "rotation": ["accuracy"]},
    )  # fmt: skip
    log.info("pretraining on %d images x 4 rotations, classes %s", len(index), list(classes))
    history = classifier.fit(
        x, {"source_class": y, "rotation": turns}, epochs=epochs, batch_size=64,
        validation_split=0.1, verbose=2, shuffle=True,
    ).history  # fmt: skip
    local = Path(tempfile.mkdtemp(prefix="graft-pretrain-")) / "base.keras"
    base.save(local)
    record_settings(local, PRETRAINED_SETTINGS)
    storage.upload_file(local, out_uri)
    summary = {
        "classes": list(classes),
        "examples": len(index),
        "val_accuracy": float(history["val_source_class_accuracy"][-1]),
        "val_rotation_accuracy": float(history["val_rotation_accuracy"][-1]),
    }
    log.info("pretrained base saved to %s: %s", out_uri, summary)
    return summary


SHIPPED_BASES = Path(__file__).parent / "bases"  # bases made by `graft pretrain`, with provenance


def base_file_name(classes) -> str:
    """The name carries the recipe's version, so a base made by an older recipe is never
    mistaken for this one."""
    return f"fashion-base-{RECIPE}-{'-'.join(map(str, classes))}.keras"


def cached_base(cache_dir: str | Path, classes: list[int] = (0, 2, 4, 6, 8)) -> tuple[str, str]:
    """The default base for ``classes`` and where it came from: ``"shipped"`` (committed in
    components/bases/ by `graft pretrain`, its command beside it: pretraining costs minutes
    on two cores, more than the whole pipeline), else ``"cached"`` in ``cache_dir``, else
    ``"pretrained"`` now into ``cache_dir``."""
    name = base_file_name(classes)
    if (SHIPPED_BASES / name).exists():
        return str(SHIPPED_BASES / name), "shipped"
    path = Path(cache_dir) / name
    if path.exists():
        if SETTINGS_ENTRY not in zipfile.ZipFile(path).namelist():  # cached before bases kept them
            record_settings(path, PRETRAINED_SETTINGS)
        return str(path), "cached"
    pretrain_base(str(path), classes=list(classes))
    return str(path), "pretrained"
