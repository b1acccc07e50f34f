"""The examples format: what augment writes and the training/evaluation steps read.

An examples directory holds TFRecord shards per split plus two small files:

    <examples>/train-00000-of-00002.tfrecord   original + K augmented views
    <examples>/val-00000-of-00001.tfrecord     originals only
    <examples>/test-00000-of-00001.tfrecord    originals only
    <examples>/labels.txt                      one class name per line; line i is class id i
    <examples>/spec.json                       image_size, channels, views, counts per split
    <examples>/test-sources.jsonl              {"uri", "label"} of each test image's source file

Each record is a tf.train.Example with ``image`` (raw uint8 bytes, HxWxC, already
resized), ``label`` (int64 class id), ``view`` (0 = the original image, 1..K =
augmented copies) and ``sha256`` (of the source file, so a record can be traced
back to the image it came from). Records go image by image in content-hash order, each
image's original followed by its views (train only), so an image's records are adjacent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from common.artifacts import LABELS_FILE

SPLITS = ("train", "val", "test")
SPEC_FILE = "spec.json"


def _example(image: np.ndarray, label: int, view: int, sha256: str) -> bytes:
    """One record's tf.train.Example bytes. Filled in place (``.value.append``), which builds
    the same bytes 2.5x faster than nested constructors (13.0 -> 5.2 us a record, a warm
    augment at 30k images writes 150k records; benchmarks/example_bytes.py)."""
    import tensorflow as tf

    example = tf.train.Example()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(image.tobytes())
    feature["label"].int64_list.value.append(int(label))
    feature["view"].int64_list.value.append(int(view))
    feature["sha256"].bytes_list.value.append(sha256.encode())
    # deterministic: the feature map's order otherwise follows the process's string hash
    # seed, so the same record had other bytes in every process (a fan-out's shards, reruns)
    return example.SerializeToString(deterministic=True)


def write_split(
    examples_dir: str | Path,
    split: str,
    records: Iterable[tuple[np.ndarray, int, int, str]],
    *,
    per_shard: int = 2000,
) -> int:
    """Write ``(image uint8 HxWxC, label, view, sha256)`` records as shards; return the count.

    ``records`` is consumed one at a time and each record is written as it arrives, so
    any iterator works and memory does not grow with the split. Shards are named
    ``-of-NNNNN`` once the count is known (a rename at the end)."""
    serialized = (_example(*record) for record in records)
    return write_serialized(examples_dir, split, serialized, per_shard=per_shard)


def write_serialized(
    examples_dir: str | Path, split: str, serialized: Iterable[bytes], *, per_shard: int = 2000
) -> int:
    """``write_split`` for records already serialized (tf.train.Example bytes): how the
    fan-out gathers its shards' records unchanged (components/shards.py)."""
    import tensorflow as tf

    if split not in SPLITS:
        raise ValueError(f"Received `split={split!r}`: expected one of {SPLITS}")
    examples_dir = Path(examples_dir)
    examples_dir.mkdir(parents=True, exist_ok=True)
    for stale in examples_dir.glob(f".{split}-*.tfrecord.partial"):
        stale.unlink()  # left by an interrupted run
    partial, writer, count = [], None, 0
    try:
        for record in serialized:
            if count % per_shard == 0:
                if writer is not None:
                    writer.close()
                partial.append(examples_dir / f".{split}-{len(partial):05d}.tfrecord.partial")
                writer = tf.io.TFRecordWriter(str(partial[-1]))
            writer.write(record)
            count += 1
        if writer is None:  # an empty split still gets its one (empty) shard
            partial.append(examples_dir / f".{split}-00000.tfrecord.partial")
            writer = tf.io.TFRecordWriter(str(partial[-1]))
    finally:
        if writer is not None:
            writer.close()
    for index, path in enumerate(partial):
        path.replace(examples_dir / f"{split}-{index:05d}-of-{len(partial):05d}.tfrecord")
    return count


def write_metadata(examples_dir: str | Path, labels: list[str], spec: dict) -> None:
    examples_dir = Path(examples_dir)
    (examples_dir / LABELS_FILE).write_text("".join(f"{name}\n" for name in labels))
    (examples_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))


def sources_path(examples_dir: str | Path, split: str) -> Path:
    return Path(examples_dir) / f"{split}-sources.jsonl"


def write_sources(examples_dir: str | Path, split: str, sources: Iterable[dict]) -> None:
    """Where each image of ``split`` came from ({"uri", "label"} per line): evaluate sends
    the champion the original files, so it prepares them its own way."""
    lines = "".join(json.dumps({"uri": s["uri"], "label": s["label"]}) + "\n" for s in sources)
    sources_path(examples_dir, split).write_text(lines)


def read_sources(examples_dir: str | Path, split: str) -> list[dict]:
    path = sources_path(examples_dir, split)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: rerun augment (it records each image's source)"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_labels(examples_dir: str | Path) -> list[str]:
    path = Path(examples_dir) / LABELS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {examples_dir} an augment output?")
    return [line for line in path.read_text().splitlines() if line]


def read_spec(examples_dir: str | Path) -> dict:
    return json.loads((Path(examples_dir) / SPEC_FILE).read_text())


def shard_paths(examples_dir: str | Path, split: str) -> list[str]:
    paths = sorted(str(p) for p in Path(examples_dir).glob(f"{split}-*.tfrecord"))
    if not paths:
        raise FileNotFoundError(f"No {split} shards in {examples_dir}")
    return paths


# Records the training shuffle may hold at once, in bytes of pixels: a split that fits is
# shuffled whole (a fixed 4096-record buffer over class-grouped records gave batches of a few
# classes); a larger one is shuffled 256 MiB at a time over interleaved, shuffled shards.
SHUFFLE_BUFFER_BYTES = 256 << 20


def shuffle_buffer(spec: dict, split: str) -> int:
    """Records in the training shuffle's buffer: the whole split where it fits in
    SHUFFLE_BUFFER_BYTES, else as many as do (at least 1)."""
    from components.training import shuffle_block

    record_bytes = spec["image_size"] ** 2 * spec["channels"]
    return shuffle_block(spec.get("counts", {}).get(split) or 1, record_bytes, SHUFFLE_BUFFER_BYTES)


def _parser(examples_dir: str | Path):
    """The record parse: ``(image uint8 HxWxC, label, view, sha256)`` from one record."""
    import tensorflow as tf

    spec = read_spec(examples_dir)
    shape = (spec["image_size"], spec["image_size"], spec["channels"])
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "view": tf.io.FixedLenFeature([], tf.int64),
        "sha256": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record):
        parsed = tf.io.parse_single_example(record, features)
        image = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), shape)
        return image, parsed["label"], parsed["view"], parsed["sha256"]

    return parse


def dataset(
    examples_dir: str | Path,
    split: str,
    *,
    originals_only: bool = False,
    shuffle_seed: int | None = None,
    epoch=0,
    rotate: bool = False,
):
    """A tf.data.Dataset of ``(image uint8 HxWxC, label int64)`` for one split.

    With ``shuffle_seed``, records come in epoch ``epoch``'s order for that seed
    (``training.shuffled_records``: shards in a shuffled order, interleaved record by record,
    runs of ``shuffle_buffer`` records permuted), the same order every time it is read;
    without, records come in stored order. With ``rotate``, each image comes once, as the
    view ``rotated_view`` picks for ``epoch``."""
    import tensorflow as tf

    from components import training

    spec = read_spec(examples_dir)
    parse_record = _parser(examples_dir)

    def parse(record):
        image, label, view, sha256 = parse_record(record)
        if rotate:  # the view this epoch reads stands in as view 0, so ``keep`` keeps it alone
            view = view - rotated_view(epoch, sha256, spec.get("views", 0))
        return image, label, view

    keep = (lambda image, label, view: tf.equal(view, 0)) if originals_only or rotate else None
    paths = shard_paths(examples_dir, split)
    if shuffle_seed is None:
        ds = tf.data.TFRecordDataset(paths).map(parse)
        ds = ds if keep is None else ds.filter(keep)
    else:
        ds = training.shuffled_records(paths, parse, seed=shuffle_seed, epoch=epoch,
                                       block=shuffle_buffer(spec, split), keep=keep)  # fmt: skip
    return ds.map(lambda image, label, view: (image, label))


def rotated_view(epoch, sha256, views: int):
    """The view of one image an epoch reads: (epoch + the image's offset) mod (views + 1), the
    offset a hash of its sha256, so every epoch mixes originals and views and views + 1
    epochs read every stored record once. ``epoch`` may be a tensor (``training.Epochs``)."""
    import tensorflow as tf

    offset = tf.strings.to_hash_bucket_fast(sha256, views + 1)
    return (tf.cast(epoch, tf.int64) + offset) % (views + 1)


def images(spec: dict, split: str) -> int:
    """Images in a split: its records over the 1 + views each image has (augment writes them
    all, so this is exact)."""
    return spec["counts"][split] // (1 + spec.get("views", 0))


def keyed_dataset(examples_dir: str | Path, split: str):
    """``(image uint8 HxWxC, label, view, sha256)`` records of one split, in stored order:
    what the feature pass needs to key each image's features in the reuse store."""
    import tensorflow as tf

    return tf.data.TFRecordDataset(shard_paths(examples_dir, split)).map(_parser(examples_dir))


def batches(
    examples_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    epoch=0,
    rotate: bool = False,
):
    """``(images float32 [B,H,W,C], labels)`` batches streamed from the shards, for Keras.

    With ``shuffle_seed``, records come in epoch ``epoch``'s order as ``dataset`` says (memory
    bounded by SHUFFLE_BUFFER_BYTES whatever the split's size). The record count from
    spec.json is attached, so Keras knows an epoch's length. With ``rotate``, an epoch holds
    each image once (``dataset``): one pass over the originals' count, not views + 1."""
    import tensorflow as tf

    ds = dataset(examples_dir, split, shuffle_seed=shuffle_seed, epoch=epoch, rotate=rotate)
    spec = read_spec(examples_dir)
    records = images(spec, split) if rotate else spec.get("counts", {}).get(split)
    if records:  # TFRecords hide their size; telling tf.data keeps Keras' epochs exact
        ds = ds.apply(tf.data.experimental.assert_cardinality(records))
    return ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)


def load_arrays(
    examples_dir: str | Path, split: str, *, originals_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One split as numpy arrays ``(images uint8 [N,H,W,C], labels int64 [N])``: the whole
    split in memory, for tests and small tools; the pipeline's steps stream ``batches``."""
    images, labels = [], []
    for image, label in dataset(examples_dir, split, originals_only=originals_only):
        images.append(image.numpy())
        labels.append(int(label))
    spec = read_spec(examples_dir)
    empty = (0, spec["image_size"], spec["image_size"], spec["channels"])
    return (
        np.stack(images) if images else np.zeros(empty, np.uint8),
        np.asarray(labels, dtype=np.int64),
    )
