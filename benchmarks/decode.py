"""augment's per-image decode (components/augment.py ``load_image``): ``decode_square`` op by
op (eagerly, as before 2026-12-03) against one traced graph call per image (now), on the same
PNGs in one run, sides alternated, through the same storage thread pool augment uses.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.decode [--images 2000] [--size 64]

Both sides must give the same pixels (checked); the last line is JSON.
"""

import argparse
import json
import os
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="source PNG side, pixels")
    parser.add_argument("--image-size", type=int, default=32, help="decoded side, pixels")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from common import storage
    from common.images import decode_square
    from components.augment import load_image
    from components.datasets import encode_png

    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
            for _ in range(args.images)]  # fmt: skip

    def eager(data):
        return decode_square(tf.constant(data), args.image_size, 3).numpy()

    def graph(data):
        return load_image(data, args.image_size, 3)

    sides = {"eager": eager, "graph": graph}
    for decode in sides.values():  # first calls (the trace) outside the timing
        decode(pngs[0])
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    pixels = {}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            pixels[name] = list(storage.map_bounded(sides[name], pngs))
            seconds[name].append(round(time.perf_counter() - start, 2))
    same = all(np.array_equal(a, b) for a, b in zip(pixels["eager"], pixels["graph"], strict=True))
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "images": args.images,
        "source_px": args.size,
        "image_size": args.image_size,
        "seconds": seconds,
        "images_per_second": {n: round(args.images / s, 1) for n, s in best.items()},
        "speedup": round(best["eager"] / best["graph"], 2),
        "same_pixels": same,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"eager {best['eager']} s, graph {best['graph']} s for {args.images} images: "
          f"{result['speedup']}x; same pixels: {same}")  # fmt: skip
    print(json.dumps(result))
    if not same:
        raise SystemExit("the two decodes differ")
    return result


if __name__ == "__main__":
    main()
