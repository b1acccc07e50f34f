"""pretrain: a small CNN base trained on source classes, for offline transfer.

    graft pretrain --classes 0,2,4,6,8 --out .graft/cache/fashion-base.keras

Where there is no network there are no imagenet weights; this gives the demo and the tests
a real pretrained base: Fashion-MNIST's classes 0,2,4,6,8 as the source task, the other
five as the target. The saved base takes 0..255 grayscale pixels of any size >= 16
(fully convolutional) and outputs a feature map; the head pools it.
"""

import logging
import tempfile
from pathlib import Path

import numpy as np

from components import datasets, storage

log = logging.getLogger(__name__)


def small_cnn(channels: int = 1, width: int = 32):
    """Three conv blocks with BatchNorm; input 0..255 pixels, output a feature map."""
    import keras

    inputs = keras.Input((None, None, channels), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    for block, filters in enumerate((width, width * 2, width * 4)):
        for conv in range(2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"b{block}_conv{conv}"
            )(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"b{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"b{block}_relu{conv}")(x)
        if block < 2:
            x = keras.layers.MaxPooling2D(name=f"b{block}_pool")(x)
    return keras.Model(inputs, x, name="graft_small_cnn")


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

    keras.utils.set_random_seed(seed)
    images, labels = datasets.load_fashion_mnist("train", data_dir=data_dir)
    picked = datasets.pick_per_class(labels, list(classes), per_class, seed)
    index = np.concatenate(list(picked.values()))
    x = images[index][..., None].astype("float32")
    y = np.concatenate([np.full(len(v), i) for i, v in enumerate(picked.values())])
    order = np.random.default_rng(seed).permutation(len(x))  # validation_split takes the tail
    x, y = x[order], y[order]
    base = small_cnn()
    pooled = keras.layers.GlobalAveragePooling2D()(base.output)
    classifier = keras.Model(
        base.input, keras.layers.Dense(len(classes), activation="softmax")(pooled)
    )
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = classifier.fit(
        x, y, epochs=epochs, batch_size=64, validation_split=0.1, verbose=2, shuffle=True
    )
    local = Path(tempfile.mkdtemp(prefix="graft-pretrain-")) / "base.keras"
    base.save(local)
    storage.upload_file(local, out_uri)
    summary = {
        "classes": list(classes),
        "examples": len(x),
        "val_accuracy": float(history.history["val_accuracy"][-1]),
    }
    log.info("pretrained base saved to %s: %s", out_uri, summary)
    return summary
