"""The per-epoch backup a killed step resumes from: Keras' BackupAndRestore vs graft's
``training.epoch_backup`` (one .npz), side by side in one run, on the two models graft fits
on the demo base at 10 labels/class: the head (one Dense layer on 250 cached feature rows)
and the whole small CNN being fine-tuned (50 images a rotating epoch).

Each side is the same ``model.fit`` with only the backup callback changed; the sides
alternate ``--repeats`` times and the median of the per-pair ratios is reported, with the
seconds spent inside the callbacks themselves. Last line: one JSON object.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.epoch_backup [--epochs 20] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import pretrained_base


def timed(callback, spent: list):
    """``callback`` with the wall time of its on_epoch_end / on_train_begin added to ``spent``."""
    for method in ("on_train_begin", "on_epoch_end"):
        original = getattr(callback, method)

        def wrapped(*args, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(callback, method, wrapped)
    return callback


def models(base_uri: str):
    """(name, build(), x, y) for the head on cached features and the whole fine-tuned CNN."""
    import keras

    from components.config import GraftConfig
    from components.train_head import assemble, build_head

    rng = np.random.default_rng(0)
    base = keras.models.load_model(base_uri)
    dim = base.output_shape[-1]
    features, labels = rng.normal(size=(250, dim)).astype("float32"), rng.integers(0, 5, 250)
    images, image_labels = rng.integers(0, 255, (50, 28, 28, 1)).astype("float32"), rng.integers(0, 5, 50)  # fmt: skip

    def head():
        return build_head(dim, 5, GraftConfig(), adapt_to=features)

    def whole():
        fresh = keras.models.load_model(base_uri)
        fresh.trainable = True
        return assemble(fresh, build_head(dim, 5, GraftConfig()), (28, 28, 1))

    return [("head", head, features, labels), ("whole_model", whole, images, image_labels)]


def run(build, x, y, side: str, epochs: int) -> tuple[float, float]:
    """Seconds of the fit and seconds inside the backup callback."""
    import keras

    from components.training import epoch_backup

    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    folder = Path(tempfile.mkdtemp(prefix=f"graft-backup-{side}-"))
    spent = [0.0]
    callback = (
        keras.callbacks.BackupAndRestore(str(folder), delete_checkpoint=False)
        if side == "keras_backup_and_restore"
        else epoch_backup(folder)
    )
    started = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[timed(callback, spent)],
              validation_data=(x[:25], y[:25]))  # fmt: skip
    return time.perf_counter() - started, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sides = ("keras_backup_and_restore", "graft_epoch_backup")
    summary = {}
    for name, build, x, y in models(pretrained_base()):
        run(build, x, y, sides[1], 2)  # warm: the first fit in a process pays for imports
        fits, inside = {s: [] for s in sides}, {s: [] for s in sides}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                seconds, callback_seconds = run(build, x, y, side, args.epochs)
                fits[side].append(seconds)
                inside[side].append(callback_seconds)
        ratios = [k / g for k, g in zip(fits[sides[0]], fits[sides[1]], strict=True)]
        summary[name] = {
            **{f"{s}_fit_s": round(statistics.median(fits[s]), 2) for s in sides},
            **{f"{s}_inside_s": round(statistics.median(inside[s]), 3) for s in sides},
            "fit_ratio_median": round(statistics.median(ratios), 2),
            "fit_ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        }
        print(f"{name}: {args.epochs} epochs, fit {summary[name]} ", flush=True)
    print(json.dumps({"epochs": args.epochs, "repeats": args.repeats, **summary,
                      "load_average": [round(v, 2) for v in os.getloadavg()]}))  # fmt: skip


if __name__ == "__main__":
    main()
