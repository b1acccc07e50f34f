"""augment: split by content hash, decode + resize, K augmented views, TFRecord shards.

The split of an image is decided by the SHA-256 of its bytes alone, so adding images to
the bucket never moves an old image between train, val and test (a test image can never
leak into training on a later run). A class the split leaves without a val or a test image
is refused, by name (``classes_short_of_a_split``), not silently left out of the gates. Augmented views are made here, once, with seeded
Keras preprocessing layers, so the head's feature cache can cover every view.
"""

import hashlib
import logging
import math
import threading
from pathlib import Path

import numpy as np
from kfp.dsl import Dataset, Input, Output

from common import reuse_store, storage
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


_DECODERS: dict[tuple[int, int], object] = {}
_DECODERS_LOCK = threading.Lock()


def _square_decoder(image_size: int, channels: int):
    """``decode_square`` traced once per size, here: one graph call per image, from any
    thread. Under a lock: the storage pool's threads all ask for it at once, and an unlocked
    cache (functools.cache) let each of them trace it (16 traces, ~2 s of a warm augment)."""
    import tensorflow as tf

    from common.images import decode_square

    with _DECODERS_LOCK:
        if (image_size, channels) not in _DECODERS:
            decode = tf.function(lambda encoded: decode_square(encoded, image_size, channels))
            _DECODERS[image_size, channels] = decode.get_concrete_function(
                tf.TensorSpec([], tf.string)
            )
        return _DECODERS[image_size, channels]


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


# Bumped whenever the views an image gets change: part of every stored record's key. 2: each
# image's randomness is keyed by its SHA-256 (issue 25); 1 drew one stream over the split.
AUGMENTER_VERSION = "augmenter-2"
VIEW_BATCH = 256  # images augmented per call: a speed knob only, views do not depend on it


def view_states(sha256: str, view: int, seed: int, layers: int) -> np.ndarray:
    """The seed-generator state of each augmentation layer for one view of one image: a
    function of the image's SHA-256, the view and ``seed`` alone, so an image gets the same
    views whichever images share its batch, run or shard."""
    digest = hashlib.sha512(f"graft-view:{seed}:{view}:{sha256}".encode()).digest()
    words = np.frombuffer(digest, "<u4")[: 2 * layers].astype(np.int64) & 0x7FFFFFFF
    return words.reshape(layers, 2)


class Views:
    """``views`` augmented copies of images, each image's randomness its own (``view_states``):
    the seeded Keras layers of ``augmenter``, run image by image inside one tf.function, with
    each layer's seed generator set from the image's key before it draws."""

    def __init__(self, seed: int):
        import tensorflow as tf

        self.seed = seed
        self.layers = augmenter(seed)
        generators = [layer.generator for layer in self.layers.layers]

        @tf.function(input_signature=[tf.TensorSpec((None, None, None, None), tf.uint8),
                                      tf.TensorSpec((None, len(generators), 2), tf.int64)])  # fmt: skip
        def augment(images, states):  # traced once: tracing the layers costs seconds
            out = tf.TensorArray(tf.uint8, size=tf.shape(images)[0])
            for i in tf.range(tf.shape(images)[0]):
                for j, generator in enumerate(generators):
                    generator.state.assign(states[i, j])
                x = self.layers(tf.cast(images[i : i + 1], tf.float32), training=True)
                out = out.write(i, tf.cast(tf.clip_by_value(tf.round(x[0]), 0, 255), tf.uint8))
            return out.stack()

        self._augment, self._count = augment, len(generators)

    def __call__(self, images: np.ndarray, shas: list[str], views: int) -> np.ndarray:
        """uint8 [N, 1 + views, H, W, C]: each image (view 0) then its ``views`` views."""
        out = [images]
        for view in range(1, views + 1):
            states = np.stack([view_states(sha, view, self.seed, self._count) for sha in shas])
            out.append(self._augment(images, states).numpy())
        return np.stack(out, axis=1)


def make_views(images: np.ndarray, views: int, seed: int, shas=None) -> list[np.ndarray]:
    """``views`` augmented copies of ``images`` (uint8 [N,H,W,C]), deterministic for a seed;
    ``shas`` key each image's randomness (default: the SHA-256 of its pixels). For arrays in
    memory (benchmarks); augment makes the same views image by image."""
    if shas is None:
        shas = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
    make = Views(seed)
    parts = [make(images[i : i + VIEW_BATCH], shas[i : i + VIEW_BATCH], views)
             for i in range(0, len(images), VIEW_BATCH)]  # fmt: skip
    both = np.concatenate(parts) if parts else np.zeros((0, 1 + views, *images.shape[1:]), "uint8")
    return [both[:, view] for view in range(1, views + 1)]


def record_facts(config: GraftConfig) -> dict:
    """Every fact besides the image that shapes its stored records: the reuse store's key."""
    import keras

    from common.images import decoder_version

    return {"image_size": config.image_size, "channels": config.channels, "views": config.views,
            "seed": config.seed, "decoder": decoder_version(),
            "augmenter": f"{AUGMENTER_VERSION}/keras-{keras.__version__}"}  # fmt: skip


def record_key(sha256: str, split: str, facts: dict) -> str:
    """The reuse store's key of one image's records (a train image's hold its views too)."""
    return reuse_store.key(sha256=sha256, split=split, **facts)


class ChangedSinceValidationError(ValueError):
    """A file's bytes no longer match the SHA-256 validate recorded for it."""


def _decoded(rows: list[dict], config: GraftConfig):
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

    yield from storage.map_bounded(load, rows, concurrency=config.io_concurrency)


def image_records(images: np.ndarray, shas: list[str], views: int, make: Views) -> np.ndarray:
    """uint8 [N, 1 + views, H, W, C]: what augment stores and writes for each image (its
    original, then its views). A function of each image alone (+ settings): call it on any
    subset, in any order, and an image gets the same bytes."""
    return make(images, shas, views) if views else images[:, None]


def _split_records(
    split: str, rows, label_ids, config: GraftConfig, progress: Progress, store, reuse, used
):
    """The split's records, image by image in ``rows``' order (content-hash order, so labels
    are mixed): each image's original (view 0), then its views 1..K (train only). Records
    found in the reuse ``store`` are read, the rest decoded and augmented, VIEW_BATCH images
    at a time, and stored. Appends each image's key to ``used``."""
    facts = record_facts(config)
    views = config.views if split == "train" else 0
    shape = (1 + views, config.image_size, config.image_size, config.channels)
    make = Views(config.seed) if views else None
    for start in range(0, len(rows), VIEW_BATCH):
        chunk = rows[start : start + VIEW_BATCH]
        keys = [record_key(row["sha256"], split, facts) for row in chunk]
        found = list(store.get_many("records", keys)) if store else [None] * len(chunk)
        found = [
            data if data is not None and len(data) == np.prod(shape) else None for data in found
        ]  # fmt: skip  (a short entry is recomputed, not trusted)
        missing = [i for i, data in enumerate(found) if data is None]
        if missing:
            decoded = np.stack(
                [image for image, _ in _decoded([chunk[i] for i in missing], config)]
            )
            made = image_records(decoded, [chunk[i]["sha256"] for i in missing], views, make)
            for i, records in zip(missing, made, strict=True):
                found[i] = records.tobytes()
            if store:
                store.put_many("records", ((keys[i], found[i]) for i in missing))
        reuse.computed += len(missing)
        reuse.reused += len(chunk) - len(missing)
        used.extend(keys)
        for row, data in zip(chunk, found, strict=True):
            records = np.frombuffer(data, np.uint8).reshape(shape)
            for view in range(1 + views):
                yield records[view], label_ids[row["label"]], view, row["sha256"]
            progress.advance()


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
    examples_dir: str | Path,
    config: GraftConfig,
    labels: list[str],
    by_split: dict,
    counts: dict,
    reuse: dict,
) -> dict:
    """spec.json, labels.txt and the test images' sources beside the shards; returns the spec
    (with the facts that key the records in the reuse store, and what was reused)."""
    counts = {split: counts[split] for split in examples.SPLITS}
    spec = {"image_size": config.image_size, "channels": config.channels, "views": config.views,
            "counts": counts, "images": {s: len(v) for s, v in by_split.items()},
            "labels": labels, "seed": config.seed, "record_facts": record_facts(config),
            "reuse": reuse}  # fmt: skip
    examples.write_metadata(examples_dir, labels, spec)
    # the champion is evaluated on these files (evaluate.py)
    examples.write_sources(examples_dir, "test", by_split["test"])
    return spec


def augment_dataset(
    data_uri: str,
    examples_dir: str | Path,
    config: GraftConfig,
    manifest_rows: list[dict] | None = None,
    store: reuse_store.ReuseStore | None = None,
) -> dict:
    """Write the examples directory; return counts per split, the label list and what was
    reused (``spec["reuse"]``).

    Streams: images are read ``config.io_concurrency`` at a time, decoded, augmented
    VIEW_BATCH at a time and written to the shards as they come; memory does not grow with
    the number of images. With a reuse ``store``, an image whose records are stored (same
    bytes, same settings) is neither read nor decoded nor augmented: its records are read."""
    if manifest_rows is None:
        from components.validate import build_manifest

        manifest_rows = build_manifest(data_uri, config)
    labels, by_split = plan_splits(manifest_rows, config, data_uri)
    label_ids = {name: i for i, name in enumerate(labels)}

    import tensorflow  # noqa: F401  (the writer's; loaded before the progress clock starts)

    progress = Progress(log, "augment: images made or reused", sum(map(len, by_split.values())))
    reuse, used = reuse_store.Reuse(store=store.uri if store else ""), []
    counts = {}
    for split in examples.SPLITS:
        split_rows = by_split[split]
        records = _split_records(split, split_rows, label_ids, config, progress, store, reuse, used)
        counts[split] = examples.write_split(examples_dir, split, records)
        log.info("augment: %s: %d images -> %d records", split, len(split_rows), counts[split])
    progress.done()
    if store:
        reuse.evicted = store.finish("records", used)
    log.info("augment: %d images' records reused, %d computed", reuse.reused, reuse.computed)
    return write_examples_metadata(examples_dir, config, labels, by_split, counts, reuse.as_dict())


def store_for(model_repo: str, config: GraftConfig) -> reuse_store.ReuseStore | None:
    """The reuse store beside ``model_repo`` ("" runs without one)."""
    if not model_repo:
        return None
    return reuse_store.ReuseStore.beside(
        model_repo, budget_gb=config.reuse_budget_gb, concurrency=config.io_concurrency
    )


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
    model_repo: str = "",
    reuse_budget_gb: float = 50.0,
):
    """Split, resize and augment the validated files into TFRecord examples, reusing the
    records of images the reuse store beside ``model_repo`` holds."""
    import logging

    from components.augment import augment_dataset, store_for
    from components.config import step_config
    from components.validate import read_manifest

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    store = store_for(model_repo, config)
    spec = augment_dataset(data_uri, examples.path, config, read_manifest(manifest.path), store)
    examples.metadata.update({"counts": spec["counts"], "labels": spec["labels"],
                              "reuse": spec["reuse"], "settings": config.used()})  # fmt: skip
