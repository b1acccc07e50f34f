"""Shared set-up for the benchmarks: the Fashion-MNIST transfer protocol's pieces."""

import os
import time
from pathlib import Path

from components import datasets

CACHE = Path(os.environ.get("GRAFT_BENCH_CACHE", ".graft/cache"))
SOURCE, TARGET = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]


def pretrained_base() -> str:
    """The small CNN pretrained on the source classes (same file the demo caches)."""
    from components.pretrain import cached_base

    return cached_base(CACHE, SOURCE)[0]


def target_images(per_class: int, seed: int, split: str = "train"):
    """(images uint8 [N,28,28,1], labels 0..4) of the target classes."""
    import numpy as np

    images, labels = datasets.load_fashion_mnist(split)
    if per_class is None:
        keep = np.isin(labels, TARGET)
        return images[keep][..., None], np.searchsorted(TARGET, labels[keep])
    picked = datasets.pick_per_class(labels, TARGET, per_class, seed)
    index = np.concatenate(list(picked.values()))
    return images[index][..., None], np.searchsorted(TARGET, labels[index])


def train_records(x, y, views: int, seed: int) -> list[tuple]:
    """``examples.write_split`` records of the training images as augment writes them: each
    image's original, then its ``views`` augmented views, adjacent (the feature pass reads an
    image's records together and refuses them apart)."""
    from components.augment import make_views

    made = [x, *make_views(x, views, seed)]
    return [(made[view][i], int(y[i]), view, f"t{i}") for i in range(len(y)) for view in range(1 + views)]  # fmt: skip


def validation_per_class(budget: int) -> int:
    """Validation images per class for a label budget: in proportion to the labels one has."""
    return max(5, budget // 5)


def train_and_validation_indices(labels, budget: int, seed: int) -> tuple:
    """(train indices, validation indices) into Fashion-MNIST's train split: ``budget`` and
    ``validation_per_class(budget)`` images of each target class from ONE draw, so no image
    is in both (two independent draws put training images into validation)."""
    import numpy as np

    val = validation_per_class(budget)
    picked = datasets.pick_per_class(labels, TARGET, budget + val, seed)
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for cls in TARGET:
        drawn = rng.permutation(picked[cls])  # pick_per_class sorts: shuffle before cutting
        train.append(np.sort(drawn[:budget]))
        validation.append(np.sort(drawn[budget:]))
    return np.concatenate(train), np.concatenate(validation)


def train_and_validation(budget: int, seed: int):
    """``(x, y, x_val, y_val)`` of the target classes: ``budget`` labelled images per class
    and a disjoint validation set (``train_and_validation_indices``)."""
    import numpy as np

    images, labels = datasets.load_fashion_mnist("train")
    train, validation = train_and_validation_indices(labels, budget, seed)

    def arrays(index):
        return images[index][..., None], np.searchsorted(TARGET, labels[index])

    return (*arrays(train), *arrays(validation))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def export_tiny_model(repo: Path, name: str, size: int, channels: int = 3) -> Path:
    """A small conv classifier at ``size`` px exported the way push does, as version 1."""
    import keras

    from common.artifacts import LABELS_FILE, MODEL_FILE
    from serving.export import export_saved_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    model_dir = repo.parent / f"{name}-keras"
    model_dir.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(model_dir / MODEL_FILE)
    (model_dir / LABELS_FILE).write_text("a\nb\nc\nd\ne\n")
    return export_saved_model(model_dir, repo / name / "1", warmup_images=[], top_k=3)


def export_mobilenet_model(repo: Path, name: str, size: int = 224) -> Path:
    """A MobileNetV2 base (random weights: cost, not accuracy, matters) with graft's head,
    assembled and exported exactly as train_head and push do, as version 1."""
    import keras

    from components.backbones import build_base
    from components.config import GraftConfig
    from components.train_head import assemble, build_head
    from serving.export import export_saved_model

    keras.utils.set_random_seed(0)
    base = build_base("mobilenet_v2", image_size=size, channels=3, weights="none")
    base.trainable = False
    head = build_head(base.output_shape[-1], 5, GraftConfig())
    model_dir = repo.parent / f"{name}-keras"
    model_dir.mkdir(parents=True, exist_ok=True)
    assemble(base, head, (size, size, 3)).save(model_dir / "model.keras")
    (model_dir / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    return export_saved_model(model_dir, repo / name / "1", warmup_images=[], top_k=3)


def photo_like(size: int, seed: int = 0):
    """A smooth colour image with texture (uint8 HxWx3): compresses like a photo, not like noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx + yy))], -1)
    image = (image + 1) * 110 + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(image, 0, 255).astype("uint8")


def percentile_ms(values, q) -> float:
    import numpy as np

    return float(np.percentile(values, q) * 1000)
