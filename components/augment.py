"""augment: split by content hash, decode + resize, K augmented views, TFRecord shards.

The split of an image is decided by the SHA-256 of its bytes alone, so adding images to
the bucket never moves an old image between train, val and test (a test image can never
leak into training on a later run). Augmented views are made here, once, with seeded
Keras preprocessing layers, so the head's feature cache can cover every view.
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
from kfp.dsl import Dataset, Input, Output

from common import storage
from components import examples
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)


def assign_split(sha256: str, val_fraction: float, test_fraction: float) -> str:
    """ "train", "val" or "test" from the content hash alone: stable as the dataset grows."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"Received `val_fraction={val_fraction}`, `test_fraction={test_fraction}`: "
            "each must be in [0, 1) and their sum below 1"
        )
    position = int(hashlib.sha256(f"graft-split:{sha256}".encode()).hexdigest()[:12], 16) / 16**12
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def load_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """uint8 [image_size, image_size, channels] pixels of an encoded image, decoded exactly
    as the exported serving signature decodes it (common/images.py)."""
    import tensorflow as tf

    from common.images import decode_square

    return decode_square(tf.constant(data), image_size, channels).numpy()


def augmenter(seed: int):
    """The augmentation that makes the stored views (train_head and fine_tune both train on them)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.08, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", seed=seed + 3),
            keras.layers.RandomContrast(0.2, seed=seed + 4),
        ],
        name="augmentation",
    )


def make_views(images: np.ndarray, views: int, seed: int, batch: int = 256) -> list[np.ndarray]:
    """``views`` augmented copies of ``images`` (uint8 [N,H,W,C]), deterministic for a seed."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = augmenter(seed)
    out = []
    for _ in range(views):
        parts = [
            np.asarray(layers(images[i : i + batch].astype("float32"), training=True))
            for i in range(0, len(images), batch)
        ]
        out.append(np.clip(np.rint(np.concatenate(parts)), 0, 255).astype(np.uint8))
    return out


def augment_dataset(
    data_uri: str,
    examples_dir: str | Path,
    config: GraftConfig,
    manifest_rows: list[dict] | None = None,
) -> dict:
    """Write the examples directory; return counts per split and the label list."""
    if manifest_rows is None:
        from components.validate import build_manifest

        manifest_rows = build_manifest(data_uri, config)
    rows = [r for r in manifest_rows if r.get("decodable") and r.get("label")]
    skipped = len(manifest_rows) - len(rows)
    if skipped:
        log.warning("augment: %d undecodable or unlabelled files left out", skipped)
    if not rows:
        raise ValueError(f"No usable images in {data_uri}")
    labels = sorted({r["label"] for r in rows})
    label_ids = {name: i for i, name in enumerate(labels)}

    by_split: dict[str, list] = {split: [] for split in examples.SPLITS}
    test_sources: list[dict] = []  # the champion is evaluated on these files (evaluate.py)
    for index, row in enumerate(sorted(rows, key=lambda r: r["relpath"]), start=1):
        split = row.get("split") or assign_split(
            row["sha256"], config.val_fraction, config.test_fraction
        )
        image = load_image(storage.read_bytes(row["uri"]), config.image_size, config.channels)
        by_split[split].append((image, label_ids[row["label"]], row["sha256"]))
        if split == "test":
            test_sources.append(row)
        if index % 500 == 0:
            log.info("augment: decoded %d/%d images", index, len(rows))

    counts = {}
    for split, items in by_split.items():
        records = [(image, label, 0, sha) for image, label, sha in items]
        if split == "train" and items and config.views > 0:
            originals = np.stack([image for image, _, _ in items])
            for view, augmented in enumerate(make_views(originals, config.views, config.seed), 1):
                records += [
                    (augmented[i], items[i][1], view, items[i][2]) for i in range(len(items))
                ]
        counts[split] = examples.write_split(examples_dir, split, records)
        log.info("augment: %s: %d images -> %d records", split, len(items), counts[split])
    missing = [s for s in ("train", "val") if not by_split[s]]
    if missing:
        raise ValueError(
            f"The {'/'.join(missing)} split is empty ({len(rows)} images): add images, "
            "or raise val_fraction/test_fraction"
        )
    spec = {"image_size": config.image_size, "channels": config.channels, "views": config.views,
            "counts": counts, "images": {s: len(v) for s, v in by_split.items()},
            "labels": labels, "seed": config.seed}  # fmt: skip
    examples.write_metadata(examples_dir, labels, spec)
    examples.write_sources(examples_dir, "test", test_sources)
    return spec


@step_component
def augment(
    data_uri: str,
    manifest: Input[Dataset],
    examples: Output[Dataset],
    image_size: int = 96,
    channels: int = 3,
    views: int = 4,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
):
    """Split, resize and augment the validated files into TFRecord examples."""
    import logging

    from components.augment import augment_dataset
    from components.config import GraftConfig
    from components.validate import read_manifest

    logging.basicConfig(level=logging.INFO)
    config = GraftConfig(image_size=image_size, channels=channels, views=views,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)  # fmt: skip
    spec = augment_dataset(data_uri, examples.path, config, read_manifest(manifest.path))
    examples.metadata.update({"counts": spec["counts"], "labels": spec["labels"]})
