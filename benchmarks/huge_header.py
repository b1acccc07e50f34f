"""A 50 KB PNG declaring 20000x20000 pixels, sent to an export's `serving_default`: the
graph before issue 23 (decode, then crop and resize: what `decode_square` does) against the
export now (the header checked against max_pixels first), side by side in one run.

    .venv/bin/python -m benchmarks.huge_header

Each side runs in its own subprocess, so its peak RSS is its own. The last line is JSON.
"""

import json
import resource
import subprocess
import sys
import time


def _measure(side: str) -> dict:
    import tempfile
    from pathlib import Path

    import tensorflow as tf

    from common.images import decode_square
    from serving.export import export_saved_model
    from tests.serving_models import make_model_dir
    from tests.unit.test_export_limits import huge_png

    image = huge_png()
    if side == "decode first":
        fn = tf.function(lambda e: decode_square(e, 8, 1))
        call = lambda: fn(tf.constant(image))  # noqa: E731
    else:
        work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
        export_saved_model(make_model_dir(work / "m", 1), work / "e", warmup_images=[])
        serve = tf.saved_model.load(str(work / "e")).signatures["serving_default"]
        call = lambda: serve(images=tf.constant([image]))  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        call()
        outcome = "answered"
    except tf.errors.InvalidArgumentError as err:
        outcome = "InvalidArgument: " + err.message.splitlines()[-2][:90]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": side, "file_bytes": len(image), "seconds": round(seconds, 3),
            "peak_rss_growth_mb": round((peak - before) / 1024, 1), "outcome": outcome}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--side":
        print(json.dumps(_measure(sys.argv[2])))
        return
    results = []
    for side in ("decode first", "header checked"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.huge_header", "--side", side],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1])
    print(json.dumps({"benchmark": "huge_header", "results": results}))


if __name__ == "__main__":
    main()
