"""Head training: the tutorials' way (frozen base re-run every epoch, augmentation on the
fly) vs graft's feature cache (base run once over K pre-made views), same data, same
epoch budget, one run. Prints the wall-time ratio and both validation accuracies.

    .venv/bin/python -m benchmarks.head_training [--per-class 30] [--epochs 20] [--views 4] [--size 96]

The last line is one JSON object with the figures.
"""

import argparse
import json

import numpy as np

from benchmarks.common import Timer, pretrained_base, target_images


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
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from components.augment import augmenter, make_views
    from components.config import GraftConfig
    from components.train_head import assemble, build_head, pooled_features

    keras.utils.set_random_seed(args.seed)
    x, y = target_images(args.per_class, args.seed)
    x_val, y_val = target_images(200, args.seed + 1, split="test")
    resize = lambda a: tf.image.resize(a.astype("float32"), (args.size, args.size)).numpy()  # noqa: E731
    x, x_val = resize(x), resize(x_val)
    config = GraftConfig(head_learning_rate=0.003, dropout=0.2)
    base = keras.models.load_model(pretrained_base())
    base.trainable = False

    # Tutorial style: augmentation layers in the model, the frozen base runs every step.
    keras.utils.set_random_seed(args.seed)
    with Timer() as seed_time:
        # the same head, standardised by the base's features of the un-augmented images
        head = build_head(base.output_shape[-1], 5, config, adapt_to=pooled_features(base, x, 256))
        inputs = keras.Input(x.shape[1:])
        augmented = augmenter(args.seed)(inputs)
        tutorial = keras.Model(inputs, assemble(base, head, x.shape[1:])(augmented))
        tutorial.compile(
            optimizer=keras.optimizers.Adam(config.head_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        tutorial.fit(x, y, epochs=args.epochs * (1 + args.views), batch_size=32, verbose=0)
    acc_seed = float(tutorial.evaluate(x_val, y_val, verbose=0)[1])

    # graft: K views made once, base features computed once, head trained on features.
    keras.utils.set_random_seed(args.seed)
    with Timer() as cache_time:
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
    acc_cache = float(head.evaluate(pooled_features(base, x_val, 256), y_val, verbose=0)[1])

    speedup = seed_time.seconds / cache_time.seconds
    print(
        f"same budget: {len(x)} images x {args.epochs * (1 + args.views)} augmented passes; {args.size}px"
    )
    print(f"tutorial (base every step): {seed_time.seconds:.1f}s  val acc {acc_seed:.4f}")
    print(f"feature cache (base once):  {cache_time.seconds:.1f}s  val acc {acc_cache:.4f}")
    print(f"speedup {speedup:.1f}x, accuracy difference {100 * (acc_cache - acc_seed):+.1f} points")
    print(json.dumps({"speedup": round(speedup, 2), "seconds_seed": round(seed_time.seconds, 2),
                      "seconds_cache": round(cache_time.seconds, 2), "acc_seed": round(acc_seed, 4),
                      "acc_cache": round(acc_cache, 4), "per_class": args.per_class, "epochs": args.epochs,
                      "views": args.views, "size": args.size}))  # fmt: skip


if __name__ == "__main__":
    main()
