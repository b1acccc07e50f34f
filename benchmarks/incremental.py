"""Incremental retrain: the cost of validate + augment + features after +5% new images, with
the reuse store beside the model repository, against the cold run's (issue 25).

    .venv/bin/python -m benchmarks.incremental [--images 2000] [--new-fraction 0.05] \\
        [--work .graft/bench-incremental]

Three runs, each in its own process (seconds measured inside the steps, imports excluded):
1. cold: N images, an empty store;
2. warm: the same N plus new images (5%), the store the cold run filled;
3. control: the same N + 5% images, a second, empty store (a cold run on the warm run's data).
Each runs validate's manifest (keeping its inspections beside the model, as the pipeline's
validate_data does), augment and train_head (the head on the base's features).

Data: Fashion-MNIST target classes 1,3,5,7,9 (Debian's dataset-fashion-mnist, its train and
test splits together: at most 7,000 a class), N/5 per class as PNG class folders. Base: the
shipped offline base (components/bases/, pretrained on the other five classes) with its
recorded settings (28 px, 1 channel), views 4.

Reports the warm run's cost over the cold run's (goal <= 0.15), the warm and control val
accuracy (same data: the chosen accuracy within noise), and whether the old images' records
(examples shards) and features (store entries) are byte-identical between the cold run and
the warm run (reused) and the control run (computed again). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLASSES = [1, 3, 5, 7, 9]
BASE = Path(__file__).resolve().parent.parent / "components/bases/fashion-base-v2-0-2-4-6-8.keras"


def config():
    from components.backbones import base_facts
    from components.config import resolve

    cfg, _ = resolve(base_facts(str(BASE)).settings(), {"base": str(BASE), "weights": "none",
                                                        "views": 4, "head_max_epochs": 30})  # fmt: skip
    return cfg


def child_run(data: Path, work: Path, repo: Path) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    import tensorflow  # noqa: F401 (imports excluded from every step's seconds)

    from components.augment import augment_dataset, store_for
    from components.train_head import train_head_model
    from components.validate import (
        build_manifest,
        inspections_uri,
        read_inspections,
        write_inspections,
    )

    cfg = config()
    store = store_for(str(repo), cfg)
    started = time.perf_counter()  # as the pipeline's validate_data: the model's inspections
    saved = inspections_uri(str(repo), "incremental")
    inspections = read_inspections(saved)
    rows = build_manifest(str(data), cfg, inspections=inspections)
    write_inspections(saved, inspections)
    manifest = time.perf_counter() - started
    started = time.perf_counter()
    spec = augment_dataset(str(data), work / "examples", cfg, rows, store)
    augment = time.perf_counter() - started
    result = train_head_model(work / "examples", work / "head", cfg, store)
    return {"manifest_seconds": manifest, "augment_seconds": augment,
            "feature_seconds": result.feature_seconds, "head_seconds": result.head_seconds,
            "val_accuracy": result.val_accuracy, "epochs": result.epochs,
            "images": sum(spec["images"].values()), "augment_reuse": spec["reuse"],
            "features_reuse": result.reuse}  # fmt: skip


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.incremental", "--child", *args],
                         check=True, stdout=subprocess.PIPE, env={**os.environ}).stdout.decode()  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def fashion_mnist():
    """Fashion-MNIST's train and test splits as one: 7,000 images a class, so 30,000 images
    of the 5 classes and 5% more fit (the train split alone has 6,000 a class)."""
    import numpy as np

    from components import datasets

    splits = [datasets.load_fashion_mnist(split) for split in ("train", "test")]
    return np.concatenate([x for x, _ in splits]), np.concatenate([y for _, y in splits])


def write_images(root: Path, picked: dict, start: float, stop: float) -> int:
    from common import storage
    from components import datasets

    images, _ = fashion_mnist()
    files = []
    for cls, indices in picked.items():
        part = indices[int(start * len(indices)) : int(stop * len(indices))]
        files += [(str(root / datasets.FASHION_MNIST_CLASSES[cls] / f"fm_{i:05d}.png"),
                   datasets.encode_png(images[i])) for i in part]  # fmt: skip
    return storage.write_many(files)


def records_by_image(examples_dir: Path) -> dict:
    """(sha256, view) -> the record's image bytes, over every split."""
    import tensorflow as tf

    from components import examples

    out = {}
    for split in examples.SPLITS:
        for record in tf.data.TFRecordDataset(examples.shard_paths(examples_dir, split)):
            f = tf.train.Example.FromString(record.numpy()).features.feature
            key = (f["sha256"].bytes_list.value[0].decode(), f["view"].int64_list.value[0])
            out[key] = f["image"].bytes_list.value[0]
    return out


def store_entries(repo: Path, kind: str) -> dict:
    from common.reuse_store import STORE_DIR

    return {p.name: p.read_bytes() for p in (repo / STORE_DIR / kind).rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--new-fraction", type=float, default=0.05)
    parser.add_argument("--work", default=".graft/bench-incremental")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data, work, repo = map(Path, args.child)
        print(json.dumps(child_run(data, work, repo)))
        return

    from components import datasets

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    per_class = args.images // len(CLASSES)
    _, labels = fashion_mnist()
    total = int(round(per_class * (1 + args.new_fraction)))
    picked = datasets.pick_per_class(labels, CLASSES, total, seed=0)
    old_share = per_class / total
    write_images(work / "data", picked, 0, old_share)
    print(
        f"base {BASE.name}; {per_class * len(CLASSES)} images, then +{args.new_fraction:.0%}",
        flush=True,
    )
    cold = run_child(str(work / "data"), str(work / "cold"), str(work / "repo"))
    print("cold:", json.dumps(cold), flush=True)
    write_images(work / "data", picked, old_share, 1)
    warm = run_child(str(work / "data"), str(work / "warm"), str(work / "repo"))
    print("warm:", json.dumps(warm), flush=True)
    control = run_child(str(work / "data"), str(work / "control"), str(work / "repo-control"))
    print("control:", json.dumps(control), flush=True)

    def cost(run: dict) -> float:
        return run["manifest_seconds"] + run["augment_seconds"] + run["feature_seconds"]

    cold_records = records_by_image(work / "cold" / "examples")
    warm_records = records_by_image(work / "warm" / "examples")
    control_records = records_by_image(work / "control" / "examples")
    records_identical = all(warm_records[k] == v for k, v in cold_records.items())
    records_recomputed_identical = all(control_records[k] == v for k, v in cold_records.items())
    first = store_entries(work / "repo", "features")
    again = store_entries(work / "repo-control", "features")
    old_features = [k for k in first if k in again]
    import numpy as np

    max_diff = max((float(np.max(np.abs(np.frombuffer(first[k], "float32")
                                        - np.frombuffer(again[k], "float32"))))
                    for k in old_features), default=0.0)  # fmt: skip
    summary = {
        "images_cold": cold["images"], "images_warm": warm["images"],
        "cost_ratio": round(cost(warm) / cost(cold), 3),
        "cost_seconds": {"cold": round(cost(cold), 1), "warm": round(cost(warm), 1),
                         "control": round(cost(control), 1)},
        "steps_warm_over_cold": {s: round(warm[f"{s}_seconds"] / cold[f"{s}_seconds"], 3)
                                 for s in ("manifest", "augment", "feature")},
        "val_accuracy": {"cold": cold["val_accuracy"], "warm": warm["val_accuracy"],
                         "control": control["val_accuracy"]},
        "reuse_warm": {"augment": warm["augment_reuse"]["reused"],
                       "augment_computed": warm["augment_reuse"]["computed"],
                       "features": warm["features_reuse"]["reused"],
                       "features_computed": warm["features_reuse"]["computed"]},
        "old_records_identical_reused": records_identical and len(cold_records) > 0,
        "old_records_identical_recomputed": records_recomputed_identical,
        "old_features_compared": len(old_features),
        "old_features_identical_recomputed": all(first[k] == again[k] for k in old_features),
        "old_features_max_abs_diff_recomputed": max_diff,
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
