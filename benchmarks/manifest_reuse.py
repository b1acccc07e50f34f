"""validate's manifest over N PNGs: cold (every file read, hashed, decoded twice) against a
repeat with the previous run's inspections (only the listing, plus the new files), in one run.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.manifest_reuse [--images 10000] [--new 0.05]

The repeat adds ``--new`` (a share of N) new images first, as a scheduled retrain would see.
The rows must equal a cold build's (checked). The last line is JSON.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--new", type=float, default=0.05, help="share of N added before the repeat")
    args = parser.parse_args(argv)

    import numpy as np

    from components import datasets, validate
    from components.config import GraftConfig

    work = Path(tempfile.mkdtemp(prefix="graft-bench-manifest-"))
    data = work / "data"
    rng = np.random.default_rng(0)

    def write(first: int, count: int) -> None:
        for i in range(first, first + count):
            image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            folder = data / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.png").write_bytes(datasets.encode_png(image))

    write(0, args.images)
    time.sleep(validate.SETTLED_NS / 1e9)  # the files settle, as a bucket's do between runs
    config = GraftConfig()
    inspections: dict = {}
    start = time.perf_counter()
    validate.build_manifest(str(data), config, inspections=inspections)
    cold = time.perf_counter() - start

    added = int(args.images * args.new)
    write(args.images, added)
    start = time.perf_counter()
    repeat = validate.build_manifest(str(data), config, inspections=inspections)
    reused = time.perf_counter() - start
    same = repeat == validate.build_manifest(str(data), config)
    result = {
        "images": args.images,
        "added": added,
        "cold_s": round(cold, 2),
        "repeat_s": round(reused, 2),
        "ratio": round(reused / cold, 3),
        "rows_equal_a_cold_build": same,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"cold {cold:.2f} s for {args.images} files; +{added} new then repeat {reused:.2f} s "
          f"({result['ratio']} of cold); rows equal a cold build: {same}")  # fmt: skip
    print(json.dumps(result))
    if not same:
        raise SystemExit("the repeat's rows differ from a cold build's")
    return result


if __name__ == "__main__":
    main()
