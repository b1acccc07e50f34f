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
- augment: a shard writes augment's ``image_records`` of its own images (each image's
  original then its views, whose randomness is the image's own: seeded from its SHA-256),
  read from the reuse store beside the model repository where it holds them, so an image
  gets the same bytes in whichever shard or run it is made.
- features: a shard runs train_head's ``cached_features`` over its records (reading and
  filling the reuse store) in the batch shape of the whole pass (zero-padded, as train_head
  pads), so each record meets the same kernels; its output is feature shards on disk.
The gather copies the serialized records (or feature records) into shards=1's order: each
shard holds a contiguous run of every split, so that is the shards' records in shard order.
With a reuse store that holds some of the features, the records are the same but a shard
writes its reused images' features before its computed ones (as train_head does), so their
order can differ from shards=1's; the head's training shuffles them.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import List  # noqa: UP035  (kfp reads Input[List[...]] annotations)

from kfp.dsl import HTML, Dataset, Input, Output

from common import storage
from common.progress import Progress
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)

SHARD_FILE = "shard.json"  # in every shard artifact: which shard of how many, what it holds
ROWS_FILE = "rows.jsonl"


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


def augment_shard_dataset(
    data_uri: str,
    out_dir,
    config,
    manifest_rows: list[dict],
    shard: int,
    shards: int,
    store=None,
) -> dict:
    """One shard's records: augment's ``image_records`` of its rows (each image's original
    then its views, a function of the image alone), read from or put in the reuse ``store``,
    written as an examples directory of its own; returns what ``shard.json`` records."""
    from common import reuse_store
    from components import examples
    from components.augment import _split_records, plan_splits, write_examples_metadata

    out_dir = Path(out_dir)
    labels, by_split = plan_splits(manifest_rows, config, data_uri)
    label_ids = {name: i for i, name in enumerate(labels)}
    own = {split: _own_block(rows, shard, shards)[1] for split, rows in by_split.items()}
    progress = Progress(log, f"augment shard {shard}: images made or reused",
                        sum(map(len, own.values())))  # fmt: skip
    reuse, used = reuse_store.Reuse(store=store.uri if store else ""), []
    counts = {}
    for split in examples.SPLITS:
        records = _split_records(split, own[split], label_ids, config, progress, store, reuse, used)
        counts[split] = examples.write_split(out_dir, split, records)
    progress.done()
    if store:
        reuse.evicted = store.finish("records", used)
    write_examples_metadata(out_dir, config, labels, own, counts, reuse.as_dict())
    per = {split: 1 + (config.views if split == "train" else 0) for split in examples.SPLITS}
    info = {"shard": shard, "shards": shards, "records": counts, "reuse": reuse.as_dict(),
            "whole_records": {split: len(by_split[split]) * per[split] for split in by_split}}  # fmt: skip
    _write_info(out_dir, info)
    return info


def _records_of(part: Path, split: str):
    """The serialized records of one shard's split, in stored order."""
    import tensorflow as tf

    for path in sorted(str(p) for p in Path(part).glob(f"{split}-*.tfrecord")):
        yield from tf.data.TFRecordDataset(path).as_numpy_iterator()


def _summed(reuses: list[dict]) -> dict:
    """The shards' reuse counts as one step's."""
    return {"reused": sum(r["reused"] for r in reuses),
            "computed": sum(r["computed"] for r in reuses),
            "evicted": sum(r["evicted"] for r in reuses),
            "store": next((r["store"] for r in reuses if r["store"]), "")}  # fmt: skip


def gather_example_shards(part_dirs: list, examples_dir, config, manifest_rows: list[dict]) -> dict:
    """The shards' records as one examples directory, in shards=1's order (per split, the
    shards' records in shard order: each shard is a contiguous run of the content-hash
    order), with its spec, labels and sources."""
    from components import examples
    from components.augment import plan_splits, write_examples_metadata

    parts = ordered_parts(part_dirs)
    labels, by_split = plan_splits(manifest_rows, config)
    counts = {}
    for split in examples.SPLITS:
        serialized = (record for _, part in parts for record in _records_of(part, split))
        counts[split] = examples.write_serialized(examples_dir, split, serialized)
        expected = len(by_split[split]) * (1 + config.views if split == "train" else 1)
        if counts[split] != expected:
            raise ShardsError(
                f"The shards hold {counts[split]} {split} records, the manifest makes {expected}: "
                "were they made from another manifest or other settings?"
            )
    reuse = _summed([info["reuse"] for info, _ in parts])
    return write_examples_metadata(examples_dir, config, labels, by_split, counts, reuse)


# --- the feature pass ---------------------------------------------------------------------

FEATURE_SPLITS = ("train", "val")


def features_of_shard(shard_dir, out_dir, config, store=None) -> dict:
    """The base's features of one augment shard's train and val records as feature shards
    (train_head's ``cached_features``, reading and filling the reuse ``store``), in the batch
    shape of the whole pass; writes them and shard.json to ``out_dir``."""
    from components import training
    from components.backbones import build_base
    from components.train_head import cached_features

    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    info = json.loads((shard_dir / SHARD_FILE).read_text())
    spec = json.loads((shard_dir / "spec.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    with training.training_setup(config.precision, config.replicas) as setup:
        with setup.strategy.scope():
            base = build_base(config.base, image_size=spec["image_size"],
                              channels=spec["channels"], weights=config.weights)  # fmt: skip
            base.trainable = False
        made = cached_features(base, shard_dir, out_dir, store=store, policy=setup.policy,
                               batch_counts=info["whole_records"])  # fmt: skip
    out = {"shard": info["shard"], "shards": info["shards"], **made,
           "base": config.base, "weights": config.weights, "policy": setup.policy}  # fmt: skip
    _write_info(out_dir, out)
    return out


def gather_feature_shards(part_dirs: list, out_dir) -> dict:
    """The shards' feature records, split by split in shard order, as the feature shards
    train_head writes for shards=1 (components/features.py), copied unchanged."""
    import tensorflow as tf

    from components import features

    parts = ordered_parts(part_dirs)
    dims = {info["dim"] for info, _ in parts if info["dim"]}
    if len(dims) > 1:
        raise ShardsError(f"The shards' features have different widths {sorted(dims)}")
    made_by = {(info["base"], info["weights"], info["policy"]) for info, _ in parts}
    if len(made_by) > 1:
        raise ShardsError(f"The shards' features were made by different bases {sorted(made_by)}")
    counts = {}
    for split in FEATURE_SPLITS:
        paths = [str(p) for _, part in parts for p in sorted(part.glob(f"{split}-*.tfrecord"))]
        serialized = (
            r for path in paths for r in tf.data.TFRecordDataset(path).as_numpy_iterator()
        )
        counts[split] = features.write_serialized(out_dir, split, serialized)
    base, weights, policy = made_by.pop()
    info = {"dim": next(iter(dims), 0), "counts": counts, "shards": parts[0][0]["shards"],
            "reuse": _summed([info["reuse"] for info, _ in parts]),
            "base": base, "weights": weights, "policy": policy}  # fmt: skip
    features.mark_complete(out_dir, "fan-out", **info)
    return info


def read_gathered_features(features_dir, config) -> dict:
    """gather_features' facts (dim, counts, reuse) for train_head to train from its shards;
    refused when another base made them."""
    from components import features

    info = features.is_complete(features_dir, "fan-out")
    if info is None:
        raise ShardsError(f"{features_dir} holds no complete gathered feature shards")
    made_by = (info["base"], info["weights"])
    if made_by != (config.base, config.weights):
        raise ShardsError(
            f"The gathered features were made by base={made_by[0]} weights={made_by[1]}, "
            f"this step trains on base={config.base} weights={config.weights}"
        )
    return info


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
    model_repo: str = "",
    reuse_budget_gb: float = 50.0,
):
    """augment's records of one shard of the validated files (gather_examples joins them),
    reusing the records the reuse store beside ``model_repo`` holds."""
    import logging

    from components.augment import store_for
    from components.config import step_config
    from components.shards import augment_shard_dataset
    from components.validate import read_manifest

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    rows = read_manifest(manifest.path)
    store = store_for(model_repo, config)
    info = augment_shard_dataset(data_uri, examples_shard.path, config, rows, shard, shards, store)
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
    examples.metadata.update({"counts": spec["counts"], "labels": spec["labels"],
                              "reuse": spec["reuse"], "settings": config.used()})  # fmt: skip


@step_component
def features_shard(
    examples_shard: Input[Dataset],
    shard_features: Output[Dataset],
    base: str = "mobilenet_v2",
    weights: str = "imagenet",
    precision: str = "auto",
    replicas: int = 0,
    io_concurrency: int = 16,
    model_repo: str = "",
    reuse_budget_gb: float = 50.0,
):
    """The frozen base's features of one shard's train and val records, reusing those the
    reuse store beside ``model_repo`` holds."""
    import logging

    from components.augment import store_for
    from components.config import step_config
    from components.shards import features_of_shard

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    store = store_for(model_repo, config)
    info = features_of_shard(examples_shard.path, shard_features.path, config, store)
    shard_features.metadata.update({"shard": info["shard"], "records": info["counts"]})


@step_component
def gather_features(
    features_shards: Input[List[Dataset]],  # noqa: UP006
    features: Output[Dataset],
):
    """The shards' features in the feature pass's order: train_head's feature cache."""
    from components.shards import gather_feature_shards

    info = gather_feature_shards([p.path for p in features_shards], features.path)
    features.metadata.update(info)
