"""Head training: the tutorials' way (frozen base re-run every epoch, augmentation on the
fly) vs graft's feature cache (base run once over K pre-made views), same data, same
epoch budget, one run. The two sides alternate ``--repeats`` times (2 shared cores are
noisy: a single pair once gave 8.5x and the next 11.0x); the ratio reported is the median
of the per-pair ratios, with the lowest and highest beside it.

    .venv/bin/python -m benchmarks.head_training [--per-class 30] [--epochs 20] [--views 4] [--size 96] [--repeats 3]

The last line is one JSON object with the figures.
"""

import argparse
import json

import numpy as np

from benchmarks.common import Timer, pretrained_base, target_images


def tutorial_way(base, x, y, x_val, y_val, args, config) -> tuple[float, float]:
    """Augmentation layers + frozen base + head in one model: the base runs every step."""
    import keras

    from components.augment import augmenter
    from components.train_head import assemble, build_head
    from components.training import pooled_features

    keras.utils.set_random_seed(args.seed)
    with Timer() as timer:
        # the same head, standardised by the base's features of the un-augmented images
        head = build_head(base.output_shape[-1], 5, config, adapt_to=pooled_features(base, x, 256))
        inputs = keras.Input(x.shape[1:])
        augmented = augmenter(args.seed)(inputs)
        model = keras.Model(inputs, assemble(base, head, x.shape[1:])(augmented))
        model.compile(
            optimizer=keras.optimizers.Adam(config.head_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x, y, epochs=args.epochs * (1 + args.views), batch_size=32, verbose=0)
    return timer.seconds, float(model.evaluate(x_val, y_val, verbose=0)[1])


def feature_cache(base, x, y, x_val, y_val, args, config) -> tuple[float, float]:
    """graft: K views made once, base features computed once, head trained on features."""
    import keras

    from components.augment import make_views
    from components.train_head import build_head
    from components.training import pooled_features

    keras.utils.set_random_seed(args.seed)
    with Timer() as timer:
        views = np.concatenate([x, *make_views(x.astype("uint8"), args.views, args.seed)])
        labels = np.concatenate([y] * (1 + args.views))
        features = pooled_features(base, views, 256)
        head = build_head(features.shape[-1], 5, config, adapt_to=features)
        head.compile(
            optimizer=keras.optimizers.Adam(config.head_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        head.fit(features, labels, epochs=args.epochs, batch_size=32, verbose=0)
    return timer.seconds, float(
        head.evaluate(pooled_features(base, x_val, 256), y_val, verbose=0)[1]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument(
        "--size",
        type=int,
        default=96,
        help="images are upscaled to this side (a bigger base input)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from components.config import GraftConfig

    x, y = target_images(args.per_class, args.seed)
    x_val, y_val = target_images(200, args.seed + 1, split="test")
    resize = lambda a: tf.image.resize(a.astype("float32"), (args.size, args.size)).numpy()  # noqa: E731
    x, x_val = resize(x), resize(x_val)
    config = GraftConfig(head_learning_rate=0.003, dropout=0.2)
    base = keras.models.load_model(pretrained_base())
    base.trainable = False

    print(f"same budget: {len(x)} images x {args.epochs * (1 + args.views)} augmented passes; "
          f"{args.size}px; {args.repeats} alternating pairs")  # fmt: skip
    pairs = []
    for repeat in range(1, args.repeats + 1):
        seconds_seed, acc_seed = tutorial_way(base, x, y, x_val, y_val, args, config)
        seconds_cache, acc_cache = feature_cache(base, x, y, x_val, y_val, args, config)
        pairs.append((seconds_seed, seconds_cache, acc_seed, acc_cache))
        print(f"pair {repeat}: tutorial (base every step) {seconds_seed:.1f}s val acc {acc_seed:.4f} | "
              f"feature cache (base once) {seconds_cache:.1f}s val acc {acc_cache:.4f} | "
              f"{seconds_seed / seconds_cache:.1f}x", flush=True)  # fmt: skip
    ratios = [s / c for s, c, _, _ in pairs]
    median = int(np.argsort(ratios)[len(ratios) // 2])
    seconds_seed, seconds_cache, acc_seed, acc_cache = pairs[median]
    print(f"median speedup {ratios[median]:.1f}x (lowest {min(ratios):.1f}x, highest {max(ratios):.1f}x), "
          f"accuracy difference {100 * (acc_cache - acc_seed):+.1f} points")  # fmt: skip
    print(json.dumps({"speedup": round(ratios[median], 2), "speedup_min": round(min(ratios), 2),
                      "speedup_max": round(max(ratios), 2), "seconds_seed": round(seconds_seed, 2),
                      "seconds_cache": round(seconds_cache, 2), "acc_seed": round(acc_seed, 4),
                      "acc_cache": round(acc_cache, 4), "per_class": args.per_class, "epochs": args.epochs,
                      "views": args.views, "size": args.size, "repeats": args.repeats}))  # fmt: skip


if __name__ == "__main__":
    main()
