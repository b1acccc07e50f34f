"""The whole pipeline under kfp.local with shards=1 and shards=N on the same small dataset,
side by side in one run: wall time of each run, of its data steps (validate, augment, the
feature pass and their gathers), and whether the gathered examples are byte-identical.

kfp.local runs every task on this machine, so N shards share its cores: on 2 cores a
speed-up is not expected (each shard is a fresh Python + TensorFlow process), only the
overhead of the fan-out is measured. The gain is on a cluster, where each shard is a pod.
The last line is one JSON object.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.fan_out [--per-class 40] [--shards 4]
"""

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from components import datasets
from components.config import GraftConfig, with_overrides
from pipeline.run import run_local
from tests.integration.conftest import TINY, make_tiny_base

DATA_STEPS = ("validate", "augment", "features", "gather")  # task names that hold these


def _digests(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}  # fmt: skip


def _data_seconds(run_dir: str) -> float:
    """From the first data step's start to the last one's end, read off the task folders'
    files (kfp.local writes executor_output.json when a task ends)."""
    ends = [p.stat().st_mtime for p in Path(run_dir).rglob("executor_output.json")
            if any(s in p.parent.name for s in DATA_STEPS)]  # fmt: skip
    check = Path(run_dir, "check-data", "executor_output.json").stat().st_mtime
    return max(ends) - check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="graft-fan-out-"))
    base = make_tiny_base(work / "base.keras")
    bucket = str(work / "bucket")
    datasets.write_synthetic_dataset(bucket, num_classes=3, per_class=args.per_class, size=32, seed=1)  # fmt: skip
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = {}
    for shards in (1, args.shards):
        config: GraftConfig = with_overrides(GraftConfig(), [*TINY, f"base={base}", f"shards={shards}"])  # fmt: skip
        started = time.perf_counter()
        summary = run_local(bucket, str(work / f"models{shards}"), "fan", config,
                            pipeline_root=work / f"runs{shards}")  # fmt: skip
        seconds = time.perf_counter() - started
        examples_task = "augment" if shards == 1 else "gather-examples"
        results[shards] = {
            "seconds": round(seconds, 1),
            "data_step_seconds": round(_data_seconds(summary.run_dir), 1),
            "pushed": summary.pushed_version is not None,
            "examples": _digests(summary.tasks[examples_task].artifacts["examples"]),
        }
        print(f"shards={shards}: {seconds:.1f} s (data steps {results[shards]['data_step_seconds']} s), {summary.outcome}")  # fmt: skip
    one, many = results[1], results[args.shards]
    identical = one["examples"] == many["examples"]
    ratio = many["seconds"] / one["seconds"]
    data_ratio = many["data_step_seconds"] / one["data_step_seconds"]
    print(f"shards={args.shards} / shards=1: whole run x{ratio:.2f}, data steps x{data_ratio:.2f}; "
          f"examples identical: {identical}")  # fmt: skip
    print(json.dumps({
        "benchmark": "fan_out", "images": 3 * args.per_class, "shards": args.shards,
        "seconds_shards_1": one["seconds"], f"seconds_shards_{args.shards}": many["seconds"],
        "data_seconds_shards_1": one["data_step_seconds"],
        f"data_seconds_shards_{args.shards}": many["data_step_seconds"],
        "ratio": round(ratio, 2), "data_ratio": round(data_ratio, 2),
        "examples_identical": identical, "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
