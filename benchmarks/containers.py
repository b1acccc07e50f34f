"""The whole pipeline with every step inside graft's image (kfp.local DockerRunner) vs as
subprocesses of this Python (SubprocessRunner): same data, same settings, same base, one run.
The sides alternate ``--repeats`` times; every run trains (force, a fresh model repository).

    .venv/bin/python -m benchmarks.containers [--per-class 50] [--repeats 2] [--image graft:bench]

Needs a Docker Engine, or root on Debian to start graft's private one (pipeline/image.py);
the image is built from the working tree first (cached layers make that quick). The last line
is one JSON object with the figures.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from components import datasets
from components.config import GraftConfig, with_overrides
from pipeline import image as engines
from pipeline.run import run_local
from tests.integration.conftest import TINY
from tests.integration.conftest import make_tiny_base as tiny_base

SETTINGS = TINY  # the integration tests' tiny settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image", default="graft:bench")
    args = parser.parse_args()

    engine = engines.acquire()
    os.environ["DOCKER_HOST"] = engine.host
    try:
        built = engines.build_image(engine.client(), args.image, log=print)
        root = Path(tempfile.mkdtemp(prefix="graft-bench-containers-"))
        store = root / "store"  # under the pipeline root: the only local path containers see
        data = str(store / "data")
        datasets.write_synthetic_dataset(data, num_classes=args.classes, per_class=args.per_class,
                                         size=32, seed=0)  # fmt: skip
        config = with_overrides(
            GraftConfig(), [*SETTINGS, f"base={tiny_base(store / 'base.keras')}"]
        )
        seconds = {"containers": [], "subprocesses": []}
        for repeat in range(args.repeats):
            for side in ("containers", "subprocesses"):
                repo = str(store / f"models-{side}-{repeat}")
                start = time.perf_counter()
                summary = run_local(data, repo, "bench", config, pipeline_root=root,
                                    force=True, image=args.image if side == "containers" else None)  # fmt: skip
                seconds[side].append(round(time.perf_counter() - start, 1))
                assert summary.pushed_version, f"{side}: {summary.outcome}"
                print(f"{side} run {repeat + 1}: {seconds[side][-1]} s ({summary.outcome})")
    finally:
        engine.stop()
    ratios = [c / s for c, s in zip(seconds["containers"], seconds["subprocesses"], strict=True)]
    print(json.dumps({
        "images": args.classes * args.per_class, "repeats": args.repeats,
        "containers_s": seconds["containers"], "subprocesses_s": seconds["subprocesses"],
        "containers_over_subprocesses_median": round(statistics.median(ratios), 2),
        "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
        "image": args.image, "base": built["base"], "image_mb": round(built["size_bytes"] / 1e6),
        "image_build_s": built["seconds"], "engine": engine.how,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
