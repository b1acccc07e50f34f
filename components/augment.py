"""augment: split by content hash, decode + resize, K augmented views, TFRecord shards.

The split of an image is decided by the SHA-256 of its bytes alone, so adding images to
the bucket never moves an old image between train, val and test (a test image can never
leak into training on a later run). A class the split leaves without a val or a test image
is refused, by name (``classes_short_of_a_split``), not silently left out of the gates. Augmented views are made here, once, with seeded
Keras preprocessing layers, so the head's feature cache can cover every view.
"""

import functools
import hashlib
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
from kfp.dsl import Dataset, Input, Output

from common import storage
from common.progress import Progress
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


def classes_short_of_a_split(
    rows: list[dict], val_fraction: float, test_fraction: float
) -> list[str]:
    """One sentence per class that the content-hash split leaves without a val or a test image
    (rows with a pre-set ``split`` are validate's pre-split layout, checked there).

    Why refuse rather than move an image in: a split that never changes as data grows must
    be a function of the image alone (two datasets holding one image both grow into their
    union, where the image has one split), so some class of any size could hash entirely
    into train. Without a test image a class drops out of the champion gate, without a val
    image out of early stopping and the guard: training on it would be silently unjudged."""
    need = {split: fraction for split, fraction in (("val", val_fraction), ("test", test_fraction))
            if fraction > 0}  # fmt: skip
    by_class: dict[str, dict[str, int]] = {}
    for row in rows:
        if row.get("split") or not row.get("label") or not row.get("sha256"):
            continue
        counts = by_class.setdefault(row["label"], {"train": 0, "val": 0, "test": 0})
        counts[assign_split(row["sha256"], val_fraction, test_fraction)] += 1
    short = []
    for label, counts in sorted(by_class.items()):
        missing = [split for split in need if not counts[split]]
        if not missing:
            continue
        rarest = min(need[split] for split in missing)
        likely = math.ceil(math.log(0.1) / math.log(1 - rarest))
        short.append(
            f"class {label!r} has {sum(counts.values())} images and the content-hash split puts "
            f"none in {' or '.join(missing)} ({', '.join(f'{s}_fraction={need[s]}' for s in missing)}): "
            f"add images to {label}/ (each new one lands in {missing[0]} with probability "
            f"{need[missing[0]]}: about {math.ceil(1 / rarest)} more on average, {likely} more for "
            f"90% odds), or lay the dataset out as train/val/test/<label>/ folders"
        )
    return short


def load_image(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """uint8 [image_size, image_size, channels] pixels of an encoded image, decoded exactly
    as the exported serving signature decodes it (common/images.py): by the same graph,
    not op by op (eagerly, each image cost ~10 ms of op dispatch; benchmarks/decode.py)."""
    import tensorflow as tf

    return _square_decoder(image_size, channels)(tf.constant(data)).numpy()


@functools.cache
def _square_decoder(image_size: int, channels: int):
    """``decode_square`` traced once per size, here (threads calling a tf.function for the
    first time would each trace it): one graph call per image, from any thread."""
    import tensorflow as tf

    from common.images import decode_square

    decode = tf.function(lambda encoded: decode_square(encoded, image_size, channels))
    return decode.get_concrete_function(tf.TensorSpec([], tf.string))


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


VIEW_BATCH = 256  # images per call of the seeded augmentation layers: part of what fixes the
# views for a seed (each call draws the next random numbers), so it is not a tuning knob


def make_views(
    images: np.ndarray, views: int, seed: int, batch: int = VIEW_BATCH
) -> list[np.ndarray]:
    """``views`` augmented copies of ``images`` (uint8 [N,H,W,C]), deterministic for a seed.

    For arrays that fit in memory (benchmarks); augment streams the same computation
    through ``view_batches``."""

    def originals():
        return (images[i : i + batch] for i in range(0, len(images), batch))

    return [np.concatenate(list(view)) for view in view_batches(originals, views, seed)]


def view_batches(originals, views: int, seed: int):
    """For each view 1..K, an iterator of augmented uint8 batches.

    ``originals()`` returns a fresh iterator over the original images in batches of
    VIEW_BATCH, the same batches every time: the seeded layers draw their random numbers
    call by call, so the same batches in the same order give the same views. Views must
    be consumed in order (view 1 fully, then view 2, ...)."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = augmenter(seed)

    def one_view():
        for batch in originals():
            augmented = np.asarray(layers(batch.astype("float32"), training=True))
            yield np.clip(np.rint(augmented), 0, 255).astype(np.uint8)

    return (one_view() for _ in range(views))


class ChangedSinceValidationError(ValueError):
    """A file's bytes no longer match the SHA-256 validate recorded for it."""


def _decoded(rows: list[dict], config: GraftConfig, progress: Progress):
    """``(image, row)`` for each row in order: read through the storage pool, checked against
    the manifest's SHA-256 (the split was decided from it), decoded and resized in the pool."""

    def load(row: dict):
        data = storage.read_bytes(row["uri"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            raise ChangedSinceValidationError(
                f"{row['uri']} changed after validation (sha256 {digest[:12]}..., manifest "
                f"{row['sha256'][:12]}...): rerun the pipeline so validate sees the current file"
            )
        return load_image(data, config.image_size, config.channels), row

    for item in storage.map_bounded(load, rows, concurrency=config.io_concurrency):
        progress.advance()
        yield item
    if progress.count == progress.total:
        progress.done()  # the last split's originals: only its augmented views are left


def _split_records(rows, label_ids, config: GraftConfig, progress: Progress, originals_file):
    """The split's records: every original (view 0) in ``rows``' order (content-hash order,
    so labels are mixed), then view 1 of every original, then view 2, ... Originals go to
    ``originals_file`` (raw uint8 in TMPDIR, on local disk: N x H x W x C bytes) as they
    stream by, so the views can read them back in VIEW_BATCH batches without holding the
    split in memory."""
    shas, labels = [], []
    for image, row in _decoded(rows, config, progress):
        shas.append(row["sha256"])
        labels.append(label_ids[row["label"]])
        if originals_file is not None:
            originals_file.write(image.tobytes())
        yield image, labels[-1], 0, shas[-1]
    if originals_file is None or not rows:
        return
    originals_file.flush()
    shape = (config.image_size, config.image_size, config.channels)
    image_bytes = int(np.prod(shape))

    def originals():
        with open(originals_file.name, "rb") as fh:
            while chunk := fh.read(VIEW_BATCH * image_bytes):
                yield np.frombuffer(chunk, np.uint8).reshape(-1, *shape)

    made = Progress(log, "augment: augmented views made", len(rows) * config.views)
    for view, batches in enumerate(view_batches(originals, config.views, config.seed), start=1):
        index = 0
        for batch in batches:
            for image in batch:
                yield image, labels[index], view, shas[index]
                index += 1
            made.advance(len(batch))
    made.done()


def plan_splits(
    manifest_rows: list[dict], config: GraftConfig, data_uri: str = ""
) -> tuple[list[str], dict[str, list[dict]]]:
    """(the label list, each split's rows in record order): what augment writes, decided
    from the manifest alone (no file is read), so each shard of a fan-out sees the whole
    dataset's plan (components/shards.py). Refuses what augment cannot train on."""
    rows = [r for r in manifest_rows if r.get("decodable") and r.get("label")]
    skipped = len(manifest_rows) - len(rows)
    if skipped:
        log.warning("augment: %d undecodable or unlabelled files left out", skipped)
    if not rows:
        raise ValueError(f"No usable images in {data_uri}")
    labels = sorted({r["label"] for r in rows})

    by_split: dict[str, list] = {split: [] for split in examples.SPLITS}
    # Records go out in content-hash order, not class-folder order: a shuffle buffer smaller
    # than the split then still sees every class in proportion (path order made batches of
    # a few classes past ~800 images). The hash orders every split, whatever its folders.
    for row in sorted(rows, key=lambda r: (r["sha256"], r["relpath"])):
        split = row.get("split") or assign_split(
            row["sha256"], config.val_fraction, config.test_fraction
        )
        by_split[split].append(row)
    short = classes_short_of_a_split(rows, config.val_fraction, config.test_fraction)
    if short:  # validate refuses these too; a direct call must not train on them either
        raise ValueError("Every class needs a val and a test image: " + "; ".join(short))
    missing = [s for s in ("train", "val") if not by_split[s]]
    if missing:
        raise ValueError(
            f"The {'/'.join(missing)} split is empty ({len(rows)} images): add images, "
            "or raise val_fraction/test_fraction"
        )
    return labels, by_split


def write_examples_metadata(
    examples_dir: str | Path, config: GraftConfig, labels: list[str], by_split: dict, counts: dict
) -> dict:
    """spec.json, labels.txt and the test images' sources beside the shards; returns the spec."""
    counts = {split: counts[split] for split in examples.SPLITS}
    spec = {"image_size": config.image_size, "channels": config.channels, "views": config.views,
            "counts": counts, "images": {s: len(v) for s, v in by_split.items()},
            "labels": labels, "seed": config.seed}  # fmt: skip
    examples.write_metadata(examples_dir, labels, spec)
    # the champion is evaluated on these files (evaluate.py)
    examples.write_sources(examples_dir, "test", by_split["test"])
    return spec


def augment_dataset(
    data_uri: str,
    examples_dir: str | Path,
    config: GraftConfig,
    manifest_rows: list[dict] | None = None,
) -> dict:
    """Write the examples directory; return counts per split and the label list.

    Streams: images are read ``config.io_concurrency`` at a time, decoded, and written to
    the shards as they come; the training originals wait on local disk (not in memory)
    for the augmented views. Memory does not grow with the number of images."""
    if manifest_rows is None:
        from components.validate import build_manifest

        manifest_rows = build_manifest(data_uri, config)
    labels, by_split = plan_splits(manifest_rows, config, data_uri)
    label_ids = {name: i for i, name in enumerate(labels)}

    import tensorflow  # noqa: F401  (the writer's; loaded before the progress clock starts)

    progress = Progress(log, "augment: read and decoded", sum(map(len, by_split.values())))
    counts = {}
    for split in ("val", "test", "train"):  # train last: its views come after every decode
        split_rows = by_split[split]
        with tempfile.NamedTemporaryFile(prefix=f"graft-{split}-originals-") as originals_file:
            keep = originals_file if split == "train" and config.views > 0 else None
            records = _split_records(split_rows, label_ids, config, progress, keep)
            counts[split] = examples.write_split(examples_dir, split, records)
        log.info("augment: %s: %d images -> %d records", split, len(split_rows), counts[split])
    return write_examples_metadata(examples_dir, config, labels, by_split, counts)


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
    io_concurrency: int = 16,
):
    """Split, resize and augment the validated files into TFRecord examples."""
    import logging

    from components.augment import augment_dataset
    from components.config import step_config
    from components.validate import read_manifest

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    spec = augment_dataset(data_uri, examples.path, config, read_manifest(manifest.path))
    examples.metadata.update(
        {"counts": spec["counts"], "labels": spec["labels"], "settings": config.used()}
    )
