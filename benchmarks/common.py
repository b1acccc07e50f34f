"""Shared set-up for the benchmarks: the Fashion-MNIST transfer protocol's pieces."""

import os
import time
from pathlib import Path

from components import datasets

CACHE = Path(os.environ.get("GRAFT_BENCH_CACHE", ".graft/cache"))
SOURCE, TARGET = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]


def pretrained_base() -> str:
    """The small CNN pretrained on the source classes (same file the demo caches)."""
    from components.pretrain import pretrain_base

    path = CACHE / "fashion-base-0-2-4-6-8.keras"
    if not path.exists():
        pretrain_base(str(path), classes=SOURCE)
    return str(path)


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


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
