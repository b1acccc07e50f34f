"""Fixtures for the pipeline-level integration tests."""

import pytest

from components import datasets
from components.config import GraftConfig, with_overrides

# Tiny but learnable: 3 synthetic classes, 32px, a small conv base pretrained on others.
TINY = [
    "image_size=32",
    "views=1",
    "batch_size=16",
    "head_max_epochs=40",
    "patience=2",
    "head_learning_rate=0.01",
    "fine_tune_max_epochs=2",
    "fine_tune_layers=2",
    "bless_min_accuracy=0.3",
    "min_images_per_class=5",
]


def tiny_config(base: str, *extra: str) -> GraftConfig:
    return with_overrides(GraftConfig(), [*TINY, f"base={base}", *extra])


def make_tiny_base(path) -> str:
    """A small conv base pretrained for a few epochs on other synthetic images, saved as .keras
    at ``path`` (the benchmarks build the same one)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization(momentum=0.8)(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    base = keras.Model(inputs, x, name="tiny_base")
    source = datasets.synthetic_images(num_classes=3, per_class=60, size=32, seed=99)
    images = np.stack([img for imgs in source.values() for img in imgs]).astype("float32")
    labels = np.repeat(np.arange(3), 60)
    pooled = keras.layers.GlobalAveragePooling2D()(base.output)
    classifier = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    classifier.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    classifier.fit(images, labels, epochs=8, batch_size=16, verbose=0, shuffle=True)
    base.save(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    return make_tiny_base(tmp_path_factory.mktemp("base") / "base.keras")
