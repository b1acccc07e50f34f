"""tf.train.Example records built with nested constructors vs filled in place, side by side.

    .venv/bin/python -m benchmarks.example_bytes [--records 50000]

augment writes one Example per record (an image and each of its views) and the feature pass one
per feature row, whether the record was computed or read from the reuse store: 150,000 records
a warm retrain at 30k images. Builds the same augment record both ways (``nested``: Feature /
BytesList / Features constructors; ``in_place``: ``example.features.feature[k].*.value.append``,
as components/examples.py does), checks the bytes are equal, and reports microseconds per
record and the ratio, best of 3 rounds. The last line is one JSON object.
"""

import argparse
import json
import time

import numpy as np


def nested(image: np.ndarray, label: int, view: int, sha256: str) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "view": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(view)])),
        "sha256": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sha256.encode()])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def main() -> None:
    from components.examples import _example as in_place

    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=50000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    sha = "ab" * 32
    if nested(image, 3, 2, sha) != in_place(image, 3, 2, sha):
        raise SystemExit("the two constructions give different bytes")
    seconds = {"nested": [], "in_place": []}
    for round_ in range(3):
        for name, build in sorted({"nested": nested, "in_place": in_place}.items(), reverse=bool(round_ % 2)):  # fmt: skip
            started = time.perf_counter()
            for i in range(args.records):
                build(image, i % 5, i % 5, sha)
            seconds[name].append(time.perf_counter() - started)
    us = {k: round(1e6 * min(v) / args.records, 2) for k, v in seconds.items()}
    print(f"{args.records} records: nested {us['nested']} us, in place {us['in_place']} us "
          f"({us['nested'] / us['in_place']:.2f}x faster), same bytes")  # fmt: skip
    print(json.dumps({"records": args.records, "us_per_record": us, "same_bytes": True,
                      "speedup": round(us["nested"] / us["in_place"], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
