"""One shuffled training epoch over feature shards (components/features.py ``batches``): the
block of records permuted together sized by bytes alone (SHUFFLE_BUFFER_BYTES // row bytes,
before 2026-12-04) against bounded by the split's size (now), same shards, sides alternated.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.shuffle_block [--records 250] [--dims 3,224,1280]

tf.data's batch sets aside room for a whole block, so small rows made a block of millions of
slots for a split of hundreds. Both sides must read the same order (checked); the last line
is JSON: seconds per epoch per feature width, and the ratio.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=250, help="the split's records")
    parser.add_argument("--dims", default="3,224,1280", help="feature widths (floats per row)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs timed per side")
    args = parser.parse_args(argv)

    import numpy as np

    from components import features

    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        folder = Path(tempfile.mkdtemp(prefix="graft-shuffle-block-"))
        rng = np.random.default_rng(dim)
        features.write_shards(folder, "train", (([rng.random(dim, "float32")], i % 10) for i in range(args.records)))  # fmt: skip
        bytes_bound = features.SHUFFLE_BUFFER_BYTES // (4 * dim)
        # count= bounds the block: the bytes bound alone is what the code did before
        sides = {"bytes_bound": bytes_bound, "split_bound": min(args.records, bytes_bound)}
        seconds, orders = {side: [] for side in sides}, {}
        for epoch in range(args.epochs):
            for side, block in sides.items() if epoch % 2 == 0 else reversed(sides.items()):
                started = time.perf_counter()
                read = features.dataset(folder, "train", [(dim,)], shuffle_seed=0, epoch=epoch, count=block)  # fmt: skip
                order = [(float(x[0]), int(y)) for x, y in read.as_numpy_iterator()]
                seconds[side].append(time.perf_counter() - started)
                orders.setdefault(epoch, []).append(order)
        if any(a != b for a, b in orders.values()):
            raise SystemExit(f"dim {dim}: the two blocks read different orders")
        median = {side: statistics.median(values) for side, values in seconds.items()}
        row = {"dim": dim, "records": args.records, "block_before": bytes_bound,
               "block_now": sides["split_bound"], "epoch_s_before": round(median["bytes_bound"], 4),
               "epoch_s_now": round(median["split_bound"], 4),
               "speedup": round(median["bytes_bound"] / median["split_bound"], 2)}  # fmt: skip
        print(f"dim {dim:5d}: block {bytes_bound} -> {row['block_now']}: "
              f"{row['epoch_s_before']:.4f} s -> {row['epoch_s_now']:.4f} s an epoch, {row['speedup']}x")  # fmt: skip
        rows.append(row)
    result = {"rows": rows, "epochs": args.epochs, "load_average": [round(v, 1) for v in os.getloadavg()]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
