"""Many small local files, one at a time vs through the storage pool, side by side.

    .venv/bin/python -m benchmarks.local_io [--files 30000] [--size 3920] [--concurrency 16]

The reuse store keeps one small file per image and kind (3,920 bytes: a 28 px image and its
4 views), and a warm retrain reads and writes tens of thousands of them. Writes ``--files``
files with ``storage.write_many`` and reads them back with ``storage.read_many``, at
concurrency 1 and at ``--concurrency``, in alternating order over 3 rounds; reports the
best of each and the ratios (pool seconds over one-at-a-time seconds, > 1: the pool is
slower). The last line is one JSON object.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import storage


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=30000)
    parser.add_argument("--size", type=int, default=3920)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-local-io-"))
    data = bytes(range(256)) * (args.size // 256 + 1)
    data = data[: args.size]
    seconds = {"write_1": [], "write_pool": [], "read_1": [], "read_pool": []}
    try:
        for round_ in range(3):
            for concurrency in (1, args.concurrency) if round_ % 2 == 0 else (args.concurrency, 1):
                name = "1" if concurrency == 1 else "pool"
                folder = root / f"r{round_}-{name}"
                uris = [str(folder / f"{i % 256:02x}" / f"{i:064x}") for i in range(args.files)]
                pairs = [(u, data) for u in uris]
                seconds[f"write_{name}"].append(
                    timed(storage.write_many, pairs, concurrency=concurrency)
                )
                seconds[f"read_{name}"].append(
                    timed(lambda *a, **k: sum(map(len, storage.read_many(*a, **k))), uris,
                          concurrency=concurrency)
                )  # fmt: skip
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: round(min(v), 3) for k, v in seconds.items()}
    for op in ("write", "read"):
        print(f"{op} {args.files} files of {args.size} bytes: one at a time {best[op + '_1']:.2f}s, "
              f"{args.concurrency} threads {best[op + '_pool']:.2f}s "
              f"({best[op + '_pool'] / best[op + '_1']:.2f}x)")  # fmt: skip
    print(json.dumps({
        "files": args.files, "bytes": args.size, "concurrency": args.concurrency,
        "best_seconds": best, "all_seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "pool_over_one_write": round(best["write_pool"] / best["write_1"], 2),
        "pool_over_one_read": round(best["read_pool"] / best["read_1"], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
