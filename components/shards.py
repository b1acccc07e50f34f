"""Fan-out: validate, augment and the feature pass over shards of the data, gathered into
results equal byte for byte to one task's (the ``shards`` setting).

    graft compile --image REGISTRY/graft:TAG --shards 8 -o pipeline.yaml
    graft run --data DIR --model-repo REPO --set shards=4      # kfp.local, same DAG

Each shard is one iteration of a ``dsl.ParallelFor`` (pipeline/pipeline.py); KFP (Argo on a
cluster, kfp.local here) runs and schedules them, and a gather task takes ``dsl.Collected``
of their artifacts. graft schedules nothing itself.

Which shard a file belongs to is a range of a hash's space, ``[k/N, (k+1)/N)``, so it never
changes as the dataset grows:

- validate_shard: the hash of the file's path (validate reads the file to learn its
  content, so the content hash is not known yet);
- augment_shard and features_shard: the image's SHA-256 from the manifest. augment writes
  every split in content-hash order, so a shard is one contiguous run of it and the shards
  concatenated in order are that order again.

Why the gathered result is the same bytes as one task's:

- validate: shards only inspect files (the rows of the manifest: the reading and decoding
  that cost). Rules about a row (decodes, format, bytes, sides) could run per shard, but
  the set-level ones (images per class, number of classes, imbalance, one image under two
  labels or in two splits, every class in val and test, the layout, empty folders) are only
  true or false of all rows together, so the whole suite runs once over the gathered
  manifest, by validate's own function: the report is the one shards=1 writes.
- augment: a shard decodes its originals with augment's own per-image work. The augmented
  views are drawn by seeded layers batch by batch (VIEW_BATCH images of the whole split in
  record order), so a shard replays that sequence: for every batch of the whole split it
  calls the same layers on the batch with its own images in their places (zeros elsewhere,
  each image is augmented on its own) or, for a batch without any of its images, on one
  blank image, which draws the seeds a call draws and costs nearly nothing.
- features: a shard runs the base over its records in the batch shape of the whole pass
  (zero-padded, as train_head pads), so each record meets the same kernels.
The gather copies the serialized records (or feature rows) into shards=1's order.
"""

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import List  # noqa: UP035  (kfp reads Input[List[...]] annotations)

import numpy as np
from kfp.dsl import HTML, Dataset, Input, Output

from common import storage
from common.progress import Progress
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)

SHARD_FILE = "shard.json"  # in every shard artifact: which shard of how many, what it holds
ROWS_FILE = "rows.jsonl"
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"


class ShardsError(ValueError):
    """The shards handed to a gather do not make one whole dataset; the message says why."""


def shard_of(hex_digest: str, shards: int) -> int:
    """The shard of a hex digest: the range of the hash space it falls in (order-keeping:
    a larger digest never lands in a smaller shard)."""
    if shards < 1:
        raise ValueError(f"Received `shards={shards}`: expected >= 1")
    return (int(hex_digest[:16], 16) * shards) >> 64


def path_shard(relpath: str, shards: int) -> int:
    """validate's shard of a file, from its path (its content is not read yet)."""
    return shard_of(hashlib.sha256(f"graft-shard:{relpath}".encode()).hexdigest(), shards)


def _write_info(artifact_dir: Path, info: dict) -> None:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    (artifact_dir / SHARD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def ordered_parts(part_dirs: list) -> list[tuple[dict, Path]]:
    """The shard artifacts as (info, dir) in shard order; refuses a missing, repeated or
    foreign shard (a gather must never write a dataset with a shard left out)."""
    parts = []
    for part in part_dirs:
        path = Path(part)
        if not (path / SHARD_FILE).exists():
            raise ShardsError(f"{path} holds no {SHARD_FILE}: not the output of a shard task")
        parts.append((json.loads((path / SHARD_FILE).read_text()), path))
    parts.sort(key=lambda item: item[0]["shard"])
    counts = {info["shards"] for info, _ in parts}
    got = [info["shard"] for info, _ in parts]
    if len(counts) != 1 or got != list(range(next(iter(counts), 0))) or not parts:
        raise ShardsError(
            f"Received shards {got} of {sorted(counts)}: a gather needs each shard 0..N-1 "
            "exactly once, all of one fan-out"
        )
    return parts


# --- validate -----------------------------------------------------------------------------


def shard_manifest_rows(
    data_uri: str, config: GraftConfig, shard: int, shards: int, inspections: dict | None = None
) -> list[dict]:
    """The manifest rows of one shard's files (validate's own inspection of each)."""
    from components.validate import build_manifest

    return build_manifest(data_uri, config, select=lambda path: path_shard(path, shards) == shard,
                          inspections=inspections)  # fmt: skip


def gather_manifest(data_uri: str, part_dirs: list, config: GraftConfig) -> list[dict]:
    """The shards' rows as one manifest, in the listing's order (what shards=1 writes).
    A file listed now but in no shard, or in a shard but gone, means the dataset changed
    while it was being validated: refused, so the report covers exactly what is there."""
    rows = {}
    for _, part in ordered_parts(part_dirs):
        for line in (part / ROWS_FILE).read_text().splitlines():
            row = json.loads(line)
            rows[row["relpath"]] = row
    listed = [f.relpath for f in storage.list_files(data_uri, checksums=False,
                                                    concurrency=config.io_concurrency)]  # fmt: skip
    appeared = [p for p in listed if p not in rows]
    gone = sorted(set(rows) - set(listed))
    if appeared or gone:
        raise ShardsError(
            f"{data_uri} changed while its shards were validated ({len(appeared)} file(s) new, "
            f"e.g. {appeared[:3]}; {len(gone)} gone, e.g. {gone[:3]}): rerun the pipeline"
        )
    return [rows[p] for p in listed]


# --- augment ------------------------------------------------------------------------------


def _own_block(split_rows: list[dict], shard: int, shards: int) -> tuple[int, list[dict]]:
    """(start, rows): this shard's contiguous run of a split in record order."""
    positions = [i for i, r in enumerate(split_rows) if shard_of(r["sha256"], shards) == shard]
    if positions and positions != list(range(positions[0], positions[-1] + 1)):
        raise AssertionError("a split's rows are not in content-hash order")  # plan_splits sorts
    start = positions[0] if positions else 0
    return start, [split_rows[i] for i in positions]


def _view_dir(artifact_dir: Path, view: int) -> Path:
    return Path(artifact_dir) / f"view-{view}"


def _shard_views(originals_path: str, start: int, own: int, total: int, config):
    """For each view 1..K, an iterator of this shard's augmented images (own images, in
    order), drawn as augment draws them over the whole split of ``total`` images."""
    from components.augment import VIEW_BATCH, view_batches

    shape = (config.image_size, config.image_size, config.channels)
    image_bytes = int(np.prod(shape))
    end = start + own
    spans = [(lo, min(lo + VIEW_BATCH, total)) for lo in range(0, total, VIEW_BATCH)]

    def originals():
        with open(originals_path, "rb") as fh:
            for lo, hi in spans:
                first, last = max(lo, start), min(hi, end)
                if first >= last:  # none of ours: one blank image draws the call's seeds
                    yield np.zeros((1, *shape), np.uint8)
                    continue
                batch = np.zeros((hi - lo, *shape), np.uint8)
                fh.seek((first - start) * image_bytes)
                mine = np.frombuffer(fh.read((last - first) * image_bytes), np.uint8)
                batch[first - lo : last - lo] = mine.reshape(-1, *shape)
                yield batch

    def own_images(batches):
        for (lo, hi), batch in zip(spans, batches, strict=True):
            first, last = max(lo, start), min(hi, end)
            yield from batch[max(first - lo, 0) : max(last - lo, 0)]

    return (own_images(batches) for batches in view_batches(originals, config.views, config.seed))


def _originals(rows, label_ids, config, progress, keep):
    """augment's view-0 records of ``rows`` (its own decode), the pixels also to ``keep``."""
    from components.augment import _decoded

    for image, row in _decoded(rows, config, progress):
        if keep is not None:
            keep.write(image.tobytes())
        yield image, label_ids[row["label"]], 0, row["sha256"]


def augment_shard_dataset(
    data_uri: str, out_dir, config, manifest_rows: list[dict], shard: int, shards: int
) -> dict:
    """One shard's records, one folder per view (``view-0`` the originals), each holding
    augment's TFRecord shards of every split; returns what ``shard.json`` records."""
    from components import examples
    from components.augment import plan_splits

    out_dir = Path(out_dir)
    labels, by_split = plan_splits(manifest_rows, config, data_uri)
    label_ids = {name: i for i, name in enumerate(labels)}
    blocks = {split: _own_block(rows, shard, shards) for split, rows in by_split.items()}
    progress = Progress(log, f"augment shard {shard}: read and decoded",
                        sum(len(rows) for _, rows in blocks.values()))  # fmt: skip
    records = {}
    for split in ("val", "test", "train"):
        start, rows = blocks[split]
        with tempfile.NamedTemporaryFile(prefix=f"graft-{split}-originals-") as originals:
            keep = originals if split == "train" and config.views > 0 and rows else None
            originals_records = _originals(rows, label_ids, config, progress, keep)
            counts = [examples.write_split(_view_dir(out_dir, 0), split, originals_records)]
            if split == "train" and config.views > 0:
                if keep is None:  # no train image in this shard: its view folders are empty
                    views = [iter(())] * config.views
                else:
                    originals.flush()
                    views = _shard_views(originals.name, start, len(rows), len(by_split[split]), config)  # fmt: skip
                for view, images in enumerate(views, start=1):
                    own = ((image, label_ids[row["label"]], view, row["sha256"])
                           for image, row in zip(images, rows, strict=True))  # fmt: skip
                    counts.append(examples.write_split(_view_dir(out_dir, view), split, own))
        records[split] = counts
    record_total = len(by_split["train"]) * (1 + config.views) + len(by_split["val"])
    info = {"shard": shard, "shards": shards, "records": records,
            "image_size": config.image_size, "channels": config.channels, "views": config.views,
            "feature_pass_records": record_total}  # fmt: skip
    for view in range(1 + config.views):  # each view folder reads as examples (examples.dataset)
        counts = {split: records[split][view] if view < len(records[split]) else 0
                  for split in examples.SPLITS}  # fmt: skip
        (_view_dir(out_dir, view) / examples.SPEC_FILE).write_text(json.dumps(
            {"image_size": config.image_size, "channels": config.channels, "counts": counts}))  # fmt: skip
    _write_info(out_dir, info)
    return info


def _records_of(part: Path, view: int, split: str):
    """The serialized records of one shard's view of a split, in stored order."""
    import tensorflow as tf

    paths = sorted(str(p) for p in _view_dir(part, view).glob(f"{split}-*.tfrecord"))
    for path in paths:
        yield from tf.data.TFRecordDataset(path).as_numpy_iterator()


def gather_example_shards(part_dirs: list, examples_dir, config, manifest_rows: list[dict]) -> dict:
    """The shards' records as one examples directory, in shards=1's order (per split: view
    0 of every shard in shard order, then view 1, ...), with its spec, labels and sources."""
    from components import examples
    from components.augment import plan_splits, write_examples_metadata

    parts = ordered_parts(part_dirs)
    labels, by_split = plan_splits(manifest_rows, config)
    counts = {}
    for split in examples.SPLITS:
        views = 1 + config.views if split == "train" else 1
        serialized = (record for view in range(views) for _, part in parts
                      for record in _records_of(part, view, split))  # fmt: skip
        counts[split] = examples.write_serialized(examples_dir, split, serialized)
        expected = len(by_split[split]) * views
        if counts[split] != expected:
            raise ShardsError(
                f"The shards hold {counts[split]} {split} records, the manifest makes {expected}: "
                "were they made from another manifest or other settings?"
            )
    return write_examples_metadata(examples_dir, config, labels, by_split, counts)


# --- the feature pass ---------------------------------------------------------------------


def _feature_blocks(views: int) -> list[tuple[str, int]]:
    """The feature pass's record order: train view 0, 1, ..., K, then val (cached_features)."""
    return [("train", view) for view in range(1 + views)] + [("val", 0)]


def features_of_shard(shard_dir, out_dir, config) -> dict:
    """The base's pooled features of one augment shard's train and val records, in the
    batch shape of the whole pass; writes features.npy, labels.npy and shard.json."""
    from components import examples, training
    from components.backbones import build_base

    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    info = json.loads((shard_dir / SHARD_FILE).read_text())
    blocks = _feature_blocks(info["views"])
    rows = [info["records"][split][view] for split, view in blocks]
    out_dir.mkdir(parents=True, exist_ok=True)
    features, labels = np.zeros((0, 0), "float32"), np.zeros(0, np.int64)
    if sum(rows):
        records = None
        for (split, view), count in zip(blocks, rows, strict=True):
            if count:
                block = examples.dataset(_view_dir(shard_dir, view), split)
                records = block if records is None else records.concatenate(block)
        batch = training.feature_batch_size(info["feature_pass_records"])
        with training.training_setup(config.precision, config.replicas) as setup:
            with setup.strategy.scope():
                base = build_base(config.base, image_size=info["image_size"],
                                  channels=info["channels"], weights=config.weights)  # fmt: skip
                base.trainable = False
            progress = Progress(log, f"features shard {info['shard']}", sum(rows), unit="records")
            outputs, labels = training.labelled_outputs(base, records, sum(rows), progress,
                                                        pool=True, batch=batch)  # fmt: skip
            progress.done()
        features = outputs[0]
    np.save(out_dir / FEATURES_FILE, features)
    np.save(out_dir / LABELS_FILE, labels)
    out = {"shard": info["shard"], "shards": info["shards"], "blocks": rows,
           "train_rows": sum(rows[:-1]), "base": config.base, "weights": config.weights}  # fmt: skip
    _write_info(out_dir, out)
    return out


def gather_feature_shards(part_dirs: list, out_dir) -> dict:
    """The shards' feature rows in the feature pass's order (block by block, each block
    shard by shard), written to one features.npy without holding them twice."""
    parts = ordered_parts(part_dirs)
    loaded = [(info, np.load(part / FEATURES_FILE, mmap_mode="r"), np.load(part / LABELS_FILE))
              for info, part in parts]  # fmt: skip
    dims = {f.shape[1] for info, f, _ in loaded if len(f)}
    if len(dims) > 1:
        raise ShardsError(f"The shards' features have different widths {sorted(dims)}")
    total = sum(len(f) for _, f, _ in loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gathered = np.lib.format.open_memmap(
        out_dir / FEATURES_FILE, mode="w+", dtype="float32", shape=(total, next(iter(dims), 0))
    )
    labels, filled = np.empty(total, np.int64), 0
    offsets = [np.cumsum([0, *info["blocks"]]) for info, _, _ in loaded]
    for block in range(len(loaded[0][0]["blocks"])):
        for (_, features, part_labels), offset in zip(loaded, offsets, strict=True):
            lo, hi = offset[block], offset[block + 1]
            gathered[filled : filled + hi - lo] = features[lo:hi]
            labels[filled : filled + hi - lo] = part_labels[lo:hi]
            filled += hi - lo
    gathered.flush()
    del gathered
    np.save(out_dir / LABELS_FILE, labels)
    first = loaded[0][0]
    info = {"records": total, "train_rows": sum(i["train_rows"] for i, _, _ in loaded),
            "shards": first["shards"], "base": first["base"], "weights": first["weights"]}  # fmt: skip
    (out_dir / "features.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def read_gathered_features(features_dir, config) -> dict:
    """gather_features' output as train_head's feature cache: features, labels, train_rows;
    refused when another base made them."""
    features_dir = Path(features_dir)
    info = json.loads((features_dir / "features.json").read_text())
    made_by = (info["base"], info["weights"])
    if made_by != (config.base, config.weights):
        raise ShardsError(
            f"The gathered features were made by base={made_by[0]} weights={made_by[1]}, "
            f"this step trains on base={config.base} weights={config.weights}"
        )
    return {"features": np.load(features_dir / FEATURES_FILE),
            "labels": np.load(features_dir / LABELS_FILE),
            "train_rows": np.asarray(info["train_rows"])}  # fmt: skip


# --- KFP components -----------------------------------------------------------------------


@step_component
def validate_shard(
    data_uri: str,
    shard: int,
    shards: int,
    manifest_shard: Output[Dataset],
    model_repo: str = "",
    model_name: str = "",
    max_pixels: int = 40_000_000,
    max_file_bytes: int = 30_000_000,
    io_concurrency: int = 16,
):
    """Inspect one shard's files: their manifest rows (validate_gathered judges them all);
    with ``model_repo``, only the files changed since the model's last validate are read."""
    import json
    from pathlib import Path

    from components.config import step_config
    from components.shards import ROWS_FILE, _write_info, shard_manifest_rows
    from components.validate import (
        INSPECTIONS_FILE,
        inspections_uri,
        read_inspections,
        write_inspections,
    )

    config = step_config(locals())
    inspections = read_inspections(inspections_uri(model_repo, model_name)) if model_repo else None
    rows = shard_manifest_rows(data_uri, config, shard, shards, inspections)
    out = Path(manifest_shard.path)
    _write_info(out, {"shard": shard, "shards": shards, "files": len(rows)})
    (out / ROWS_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if inspections is not None:  # this shard's: validate_gathered writes them all at once
        write_inspections(str(out / INSPECTIONS_FILE), {r["uri"]: inspections[r["uri"]] for r in rows})
    manifest_shard.metadata.update({"shard": shard, "files": len(rows)})


@step_component
def validate_gathered(
    data_uri: str,
    manifest_shards: Input[List[Dataset]],  # noqa: UP006
    manifest: Output[Dataset],
    validation_report: Output[HTML],
    model_repo: str = "",
    model_name: str = "",
    min_images_per_class: int = 5,
    min_classes: int = 2,
    min_side: int = 16,
    max_side: int = 8192,
    max_pixels: int = 40_000_000,
    max_file_bytes: int = 30_000_000,
    max_imbalance_ratio: float = 20.0,
    allowed_formats: list = ["JPEG", "PNG"],  # noqa: B006 (KFP reads the literal; never mutated)
    io_concurrency: int = 16,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
):
    """validate_data's outputs from the gathered shards: the whole suite on every row; the
    shards' inspections become the model's (what validate_data keeps)."""
    from pathlib import Path

    from components.config import step_config
    from components.shards import gather_manifest
    from components.validate import (
        INSPECTIONS_FILE,
        inspections_uri,
        publish_validation,
        read_inspections,
    )

    config = step_config(locals())
    rows = gather_manifest(data_uri, [p.path for p in manifest_shards], config)
    saved, inspections = "", None
    if model_repo:
        saved, inspections = inspections_uri(model_repo, model_name), {}
        for part in manifest_shards:
            inspections.update(read_inspections(str(Path(part.path) / INSPECTIONS_FILE)))
    publish_validation(data_uri, config, manifest, validation_report, rows=rows,
                       inspections_at=saved, inspections=inspections)  # fmt: skip


@step_component
def augment_shard(
    data_uri: str,
    manifest: Input[Dataset],
    shard: int,
    shards: int,
    examples_shard: Output[Dataset],
    image_size: int = 96,
    channels: int = 3,
    views: int = 4,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    io_concurrency: int = 16,
):
    """augment's records of one shard of the validated files (gather_examples joins them)."""
    import logging

    from components.config import step_config
    from components.shards import augment_shard_dataset
    from components.validate import read_manifest

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    info = augment_shard_dataset(
        data_uri, examples_shard.path, config, read_manifest(manifest.path), shard, shards
    )
    examples_shard.metadata.update({"shard": shard, "records": info["records"]})


@step_component
def gather_examples(
    manifest: Input[Dataset],
    examples_shards: Input[List[Dataset]],  # noqa: UP006
    examples: Output[Dataset],
    image_size: int = 96,
    channels: int = 3,
    views: int = 4,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
):
    """augment's output, from the shards' records: the examples shards=1 writes."""
    from components.config import step_config
    from components.shards import gather_example_shards
    from components.validate import read_manifest

    config = step_config(locals())
    spec = gather_example_shards([p.path for p in examples_shards], examples.path, config,
                  read_manifest(manifest.path))  # fmt: skip
    examples.metadata.update(
        {"counts": spec["counts"], "labels": spec["labels"], "settings": config.used()}
    )


@step_component
def features_shard(
    examples_shard: Input[Dataset],
    shard_features: Output[Dataset],
    base: str = "mobilenet_v2",
    weights: str = "imagenet",
    precision: str = "auto",
    replicas: int = 0,
):
    """The frozen base's features of one shard's train and val records."""
    import logging

    from components.config import step_config
    from components.shards import features_of_shard

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    info = features_of_shard(examples_shard.path, shard_features.path, config)
    shard_features.metadata.update({"shard": info["shard"], "rows": sum(info["blocks"])})


@step_component
def gather_features(
    features_shards: Input[List[Dataset]],  # noqa: UP006
    features: Output[Dataset],
):
    """The shards' features in the feature pass's order: train_head's feature cache."""
    from components.shards import gather_feature_shards

    info = gather_feature_shards([p.path for p in features_shards], features.path)
    features.metadata.update(info)
