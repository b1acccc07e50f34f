"""Infra-validation: a `graft serve` child per candidate vs one shared child, side by side.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.infra_validation [--candidates 6]

Each round validates the same exported candidate (tests/serving_models' tiny model, 8 golden
images, 2 warmup requests) ``--candidates`` times with a child each, then as many times
inside ``shared_server()`` (the first check there starts the child), alternating the order
of the two sides between rounds. A push in a test process pays what one check costs here.
The last line is one JSON object.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _checks(export_dir, model_dir, pixels, count: int) -> list[float]:
    from serving.infra_validation import infra_validate

    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        infra_validate(export_dir, model_dir, pixels)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from serving.infra_validation import shared_server
    from tests.serving_models import export_version, sample_images

    work = Path(tempfile.mkdtemp(prefix="graft-bench-infra-"))
    export_dir = export_version(work / "exports", "m", 1, seed=1, work=work)
    model_dir = work / "model-1-1"
    pixels, _ = sample_images(8, seed=5)
    sides = {"child_each": [], "shared_child": []}
    for round_ in range(args.rounds):
        order = ["child_each", "shared_child"][:: 1 if round_ % 2 == 0 else -1]
        for side in order:
            started = time.perf_counter()
            if side == "shared_child":
                with shared_server():
                    per_check = _checks(export_dir, model_dir, pixels, args.candidates)
            else:
                per_check = _checks(export_dir, model_dir, pixels, args.candidates)
            total = time.perf_counter() - started
            sides[side].append({"total_s": round(total, 2),
                                "per_check_s": [round(s, 2) for s in per_check]})  # fmt: skip
            print(f"round {round_} {side}: {total:.1f} s for {args.candidates} candidates "
                  f"({', '.join(f'{s:.1f}' for s in per_check)})", flush=True)  # fmt: skip
    each = statistics.median(r["total_s"] for r in sides["child_each"])
    shared = statistics.median(r["total_s"] for r in sides["shared_child"])
    print(json.dumps({
        "candidates": args.candidates, "rounds": args.rounds,
        "child_each_median_s": round(each, 2), "shared_child_median_s": round(shared, 2),
        "speedup": round(each / shared, 2), "load_average": [round(x, 2) for x in os.getloadavg()],
        "sides": sides,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
