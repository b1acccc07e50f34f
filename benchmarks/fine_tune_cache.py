"""fine_tune with the frozen part cached (it runs once) vs the whole base every epoch, same
head, same stored views, same epochs, one run. The two sides alternate ``--repeats`` times;
the ratio reported is the median of the per-pair ratios.

    .venv/bin/python -m benchmarks.fine_tune_cache [--base mobilenet_v2] [--size 96] [--layers 20] [--per-class 30] [--views 4] [--epochs 3] [--repeats 2]

``--base mobilenet_v2`` (random weights: cost, not accuracy, is measured) with graft's
default depth of 20 layers is what a user's own run looks like; ``--base demo --size 28
--layers 4`` is the demo's small pretrained CNN with its last block unfrozen. Validation
accuracy of both sides is printed: they train the same layers from the same head on the
same records, only the order of the batches differs. The last line is one JSON object.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Timer, pretrained_base, target_images, train_records


def write_examples(out: Path, args) -> None:
    """The target images at ``--size`` px (upscaled, RGB for an RGB base) and their views."""
    import tensorflow as tf

    from components import examples

    channels = 1 if args.base == "demo" else 3
    x, y = target_images(args.per_class, args.seed)
    x_val, y_val = target_images(max(5, args.per_class // 5), args.seed + 100)

    def resized(images):
        out = tf.image.resize(images.astype("float32"), (args.size, args.size)).numpy()
        return np.repeat(out, channels, axis=-1).round().astype("uint8")

    x, x_val = resized(x), resized(x_val)
    train = train_records(x, y, args.views, args.seed)
    val = [(img, int(lbl), 0, f"v{i}") for i, (img, lbl) in enumerate(zip(x_val, y_val, strict=True))]  # fmt: skip
    counts = {"train": examples.write_split(out, "train", train)}
    counts["val"] = examples.write_split(out, "val", val)
    counts["test"] = examples.write_split(out, "test", val[:1])
    spec = {"image_size": args.size, "channels": channels, "views": args.views, "counts": counts}
    examples.write_metadata(out, [str(c) for c in range(5)], spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="mobilenet_v2", help="a keras.applications name, or demo")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=20, help="fine_tune_layers")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from components import fine_tune
    from components.config import GraftConfig
    from components.train_head import train_head_model

    work = Path(tempfile.mkdtemp(prefix="graft-fine-tune-cache-"))
    write_examples(work / "examples", args)
    demo = args.base == "demo"
    config = GraftConfig(
        base=pretrained_base() if demo else args.base, weights="none",
        image_size=args.size, channels=1 if demo else 3, views=args.views, seed=args.seed,
        head_learning_rate=0.01, head_max_epochs=20, fine_tune_layers=args.layers,
        fine_tune_learning_rate=1e-4, fine_tune_max_epochs=args.epochs,
        patience=args.epochs + 1,  # every epoch runs on both sides (the head is trained first)
    )  # fmt: skip
    head = train_head_model(work / "examples", work / "head", config)
    if not head.converged:  # fine_tune refuses an unconverged head; mark it for the benchmark
        record = json.loads((work / "head" / "training.json").read_text())
        (work / "head" / "training.json").write_text(json.dumps({**record, "converged": True}))
    cap = fine_tune.FROZEN_CACHE_BYTES
    pairs = []
    for repeat in range(1, args.repeats + 1):
        runs = {}
        for side, limit in (("whole", 0), ("cached", cap)) if repeat % 2 else (("cached", cap), ("whole", 0)):  # fmt: skip
            fine_tune.FROZEN_CACHE_BYTES = limit
            with Timer() as timer:
                result = fine_tune.fine_tune_model(work / "examples", work / "head", work / f"{side}{repeat}", config)  # fmt: skip
            runs[side] = (timer.seconds, result)
        fine_tune.FROZEN_CACHE_BYTES = cap
        (whole, w), (cached, c) = runs["whole"], runs["cached"]
        assert c.cached and not w.cached and c.steps == w.steps, (
            c.steps,
            w.steps,
            c.cached,
            "both sides must train the same steps",
        )
        pairs.append((whole, cached, w.tuned_val_accuracy, c.tuned_val_accuracy, c.cached))
        print(f"pair {repeat}: whole base every epoch {whole:.1f}s (val acc {w.tuned_val_accuracy:.4f}) | "
              f"frozen part cached {cached:.1f}s, of which the one pass {c.cached['seconds']:.1f}s "
              f"(val acc {c.tuned_val_accuracy:.4f}) | {whole / cached:.2f}x", flush=True)  # fmt: skip
    ratios = [whole / cached for whole, cached, *_ in pairs]
    median = int(np.argsort(ratios)[len(ratios) // 2])
    whole, cached, acc_whole, acc_cached, cache = pairs[median]
    print(f"median speedup {ratios[median]:.2f}x (lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x); "
          f"{len(cache['tensors'])} cached tensors, {cache['bytes'] / 1e6:.1f} MB")  # fmt: skip
    print(json.dumps({"speedup": round(ratios[median], 2), "speedup_min": round(min(ratios), 2),
                      "speedup_max": round(max(ratios), 2), "seconds_whole": round(whole, 2),
                      "seconds_cached": round(cached, 2), "val_acc_whole": round(acc_whole, 4),
                      "val_acc_cached": round(acc_cached, 4), "cached_mb": round(cache["bytes"] / 1e6, 1),
                      "base": args.base, "size": args.size, "layers": args.layers,
                      "per_class": args.per_class, "views": args.views, "epochs": args.epochs,
                      "repeats": args.repeats}))  # fmt: skip


if __name__ == "__main__":
    main()
