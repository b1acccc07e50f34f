"""Tiny real models for serving tests: a Keras classifier exported by graft's own exporter."""

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np

from components import datasets

LABELS = ("cat", "dog", "owl")
SIZE = 8


def make_model_dir(path: Path, seed: int) -> Path:
    """model.keras (8x8 gray pixels -> 3 softmax probabilities) + labels.txt."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    path.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path / "model.keras")
    (path / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    return path


def sample_images(count: int = 4, seed: int = 0) -> tuple[np.ndarray, list[bytes]]:
    """Random 8x8 gray images as uint8 pixels and as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(
        0, 256, size=(count, SIZE, SIZE, 1), dtype=np.uint8
    )
    return pixels, [datasets.encode_png(image[..., 0]) for image in pixels]


def write_examples(out: Path, count: int, seed: int = 3) -> Path:
    """An examples directory of ``count`` sample images in every split (what push reads)."""
    from components import examples

    pixels, _ = sample_images(count, seed=seed)
    for split in examples.SPLITS:
        examples.write_split(out, split, [(p, i % 3, 0, f"s{i}") for i, p in enumerate(pixels)])
    examples.write_metadata(out, list(LABELS), {"image_size": SIZE, "channels": 1, "views": 0})
    return out


_EXPORTS: dict[int, Path] = {}  # seed -> model dir + SavedModel built once per test process


def _exported(seed: int) -> Path:
    """``<cache>/model`` and ``<cache>/export`` for ``seed``, exported by graft's exporter the
    first time a seed is asked for. The export depends only on the seed (the weights) and the
    fixed warmup images, so tests get copies of one export instead of ~40 identical ones
    (each is seconds of Keras + SavedModel tracing; see benchmarks/RESULTS.md, test-fast)."""
    from serving.export import export_saved_model

    if seed not in _EXPORTS:
        cache = Path(tempfile.mkdtemp(prefix=f"graft-test-export-{seed}-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        model_dir = make_model_dir(cache / "model", seed)
        _, pngs = sample_images(2)
        export_saved_model(model_dir, cache / "export", warmup_images=pngs, top_k=2)
        _EXPORTS[seed] = cache
    return _EXPORTS[seed]


def export_version(repo: Path, name: str, version: int, seed: int, work: Path) -> Path:
    """Export a tiny model as ``<repo>/<name>/<version>`` with warmup requests (a fresh copy
    of the seed's export: tests may break or delete it); its model.keras is left at
    ``<work>/model-<version>-<seed>`` for keras_probabilities."""
    cache = _exported(seed)
    shutil.copytree(cache / "model", work / f"model-{version}-{seed}", dirs_exist_ok=True)
    target = repo / name / str(version)
    staged = work / f"export-{version}-{seed}"
    shutil.copytree(cache / "export", staged)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), str(target))  # a polling server sees the version whole, as push does
    return target


def keras_probabilities(work: Path, version: int, seed: int, pixels: np.ndarray) -> np.ndarray:
    import keras

    model = keras.models.load_model(work / f"model-{version}-{seed}" / "model.keras")
    return model.predict(pixels.astype("float32"), verbose=0)
