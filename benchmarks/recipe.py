"""graft's training vs the Keras "Transfer learning & fine-tuning" guide's recipe, side by side.

    .venv/bin/python -m benchmarks.recipe [--budgets 10,30,100] [--seeds 0,1,2] [--set KEY=VALUE]

Same base (the demo's, pretrained offline on Fashion-MNIST classes 0,2,4,6,8), same labelled
images, same validation images (drawn with them, never one of them), same label budget; target
classes 1,3,5,7,9; accuracy on the full target test split (5000 images); wall time of each
side's training.

- guide: the recipe as the guide writes it: augmentation layers inside the model
  (RandomFlip("horizontal"), RandomRotation(0.1)), base frozen and called with
  training=False, pooling -> Dropout(0.2) -> Dense logits, Adam() for a fixed number of
  epochs; then the whole base unfrozen (BatchNorm stays in inference mode because the base is
  called with training=False) and trained at 1e-5 for a fixed number of epochs. The guide's
  code runs 2 + 1 epochs to keep its page fast and speaks of 10 fine-tuning epochs in its
  prose ("after 10 epochs, fine-tuning gains us a nice improvement"). Variants (--guide-epochs):
  20 + 10, and 100 + 20 because at 10 labels/class 20 epochs are only 40 optimizer steps.
- guide_standardised_early_stopping: the guide with graft's two head tricks, standardised
  features (a Normalization layer adapted on the training features) and early stopping on
  val loss (graft's patience, best weights restored, the longest variant's epochs as caps):
  graft's margin over it is what the pipeline adds beyond those tricks.
- graft: what `graft run --base <this base>` does with no --set (the settings the base
  carries, GraftConfig defaults for the rest): K augmented views made once
  (augment's layers), train_head on cached features with early stopping, the convergence
  gate, fine_tune with its guard (the tuned model only if it gets more validation images
  right). The time counts the views, both training steps and their model saves.

The sides take turns going first per (budget, seed), in one process, after an untimed warm-up
of every side on 2 labels/class (1-2 epochs a phase): the first training in a process pays
once for TensorFlow's and Keras' lazy loading and first-call setup (about 4 s here), which
is neither recipe's cost and would land on whichever side happens to go first. Each side
starts from a clean Keras state (``keras.backend.clear_session()`` and a garbage collection),
as each of graft's steps does in its own process: without it, the tf.functions and models of
every earlier side stay in the process, and graft's fine_tune at 100 labels/class took 23 s in
the seventh row of a run against 13-14 s on its own (RESULTS, 2026-12-07). Last line: one JSON
object with mean accuracies and seconds, `min_margin_points` (smallest over budgets of graft's
mean accuracy minus the MOST accurate guide variant's, in points) and `min_speedup` (smallest
over budgets of the FASTEST guide variant's mean training time over graft's): both figures
are taken against the guide variant least favourable to graft. The same two figures for
graft's head-only model (what train_head outputs, views + head phase only, before any
fine-tuning) are `head_min_margin_points` and `head_min_speedup`: how soon graft has a model
better than the guide's final one. `standardised_min_margin_points` is graft's margin over
guide_standardised_early_stopping alone.
"""

import argparse
import gc
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import pretrained_base, target_images, train_and_validation

STANDARDISED = "guide_standardised_early_stopping"


def guide_recipe(
    base_uri: str, x, y, x_val, y_val, *, head_epochs: int, tune_epochs: int, seed: int,
    standardise: bool = False, patience: int | None = None,
):  # fmt: skip
    """The Keras guide's two phases on numpy arrays; returns the trained model.

    ``standardise`` puts a Normalization layer (adapted on the training images' pooled
    features) between the frozen base and the head; ``patience`` stops each phase early on
    val loss and restores its best weights, the epoch counts becoming caps. Those are the
    two tricks graft's head uses, so the guide with them shows what graft adds beyond them."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.models.load_model(base_uri)
    base.trainable = False
    augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)],
        name="augmentation",
    )
    inputs = keras.Input(x.shape[1:])
    features = base(augmentation(inputs), training=False)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D()(features)
    if standardise:
        pooled = keras.Model(inputs, features).predict(x.astype("float32"), verbose=0)
        normalise = keras.layers.Normalization()
        normalise.adapt(pooled)
        features = normalise(features)
    outputs = keras.layers.Dense(5)(keras.layers.Dropout(0.2)(features))
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(), loss=loss, metrics=["accuracy"])
    data = dict(x=x.astype("float32"), y=y, batch_size=32, verbose=0,
                validation_data=(x_val.astype("float32"), y_val))  # fmt: skip

    def callbacks():
        if patience is None:
            return []
        return [keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)]

    model.fit(epochs=head_epochs, callbacks=callbacks(), **data)
    base.trainable = True  # the guide unfreezes the whole base; training=False keeps BN frozen
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=loss, metrics=["accuracy"])
    model.fit(epochs=tune_epochs, callbacks=callbacks(), **data)
    return model


def graft_training(work: Path, x, y, x_val, y_val, config) -> tuple[Path, dict]:
    """Views + train_head + (gate) fine_tune, exactly the steps' functions.
    Returns the chosen model's file and the seconds each phase took (the head-only model
    is in ``work / "head"``)."""
    from benchmarks.transfer_quality import write_examples
    from components.fine_tune import fine_tune_model
    from components.train_head import MODEL_FILE, train_head_model

    phases, started = {}, time.perf_counter()
    write_examples(work / "ex", x, y, x_val, y_val, config.views, config.seed)
    phases["views"], started = time.perf_counter() - started, time.perf_counter()
    head = train_head_model(work / "ex", work / "head", config)
    phases["head"], started = time.perf_counter() - started, time.perf_counter()
    if not head.converged:
        return work / "head" / MODEL_FILE, phases
    fine_tune_model(work / "ex", work / "head", work / "tuned", config)
    phases["fine_tune"] = time.perf_counter() - started
    return work / "tuned" / MODEL_FILE, phases


def warm_up(base: str, config, variants: dict) -> float:
    """Every side once on 2 labels/class with 1-2 epochs a phase, untimed; returns its seconds."""
    import keras

    started = time.perf_counter()
    x, y, x_val, y_val = train_and_validation(2, seed=99)
    short = replace(config, head_max_epochs=20, patience=1, fine_tune_max_epochs=1)
    work = Path(tempfile.mkdtemp(prefix="graft-recipe-warmup-"))
    models = [keras.models.load_model(graft_training(work, x, y, x_val, y_val, short)[0])]
    for variant in variants.values():
        epochs = {"head_epochs": 1, "tune_epochs": 1}
        if "patience" in variant:
            epochs = {**epochs, "standardise": variant.get("standardise", False), "patience": 1}
        models.append(guide_recipe(base, x, y, x_val, y_val, seed=99, **epochs))
    for model in models:
        accuracy_on(model, x_val, y_val)
    return time.perf_counter() - started


def accuracy_on(model, x_test, y_test) -> float:
    scores = model.predict(x_test.astype("float32"), batch_size=512, verbose=0)
    return float((scores.argmax(1) == y_test).mean())


def graft_config(base: str, assignments: list[str] = ()):
    """The settings `graft run --base <the demo base> [--set k=v ...]` trains with: the
    base's own, then the assignments."""
    from pipeline.settings import run_settings

    return run_settings(list(assignments), base=base).config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="10,30,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a graft setting, as `graft run --set` (e.g. fine_tune_max_epochs=0: head only)",
    )  # fmt: skip
    parser.add_argument(
        "--guide-epochs",
        default="20+10,100+20",
        help="head+fine-tune epochs of each guide variant: the guide's prose numbers, and a "
        "longer run for budgets where 20 epochs are too few optimizer steps",
    )
    args = parser.parse_args()

    import keras

    base = pretrained_base()
    config = graft_config(base, args.set)
    variants = {}
    for v in args.guide_epochs.split(","):
        head_epochs, tune_epochs = (int(e) for e in v.split("+"))
        variants[f"guide_{v}"] = {"head_epochs": head_epochs, "tune_epochs": tune_epochs}
    # The guide plus graft's two head tricks: the longest variant's epochs as caps.
    longest = max(variants.values(), key=lambda kw: kw["head_epochs"] + kw["tune_epochs"])
    variants[STANDARDISED] = {**longest, "standardise": True, "patience": config.patience}
    x_test, y_test = target_images(None, 0, split="test")
    print(f"graft settings: views={config.views} head_lr={config.head_learning_rate} "
          f"patience={config.patience} fine_tune_layers={config.fine_tune_layers} "
          f"fine_tune_lr={config.fine_tune_learning_rate}; "
          f"guide variants {list(variants)}", flush=True)  # fmt: skip
    print(f"warm-up (untimed): {warm_up(base, config, variants):.1f}s", flush=True)
    rows = []
    for index, (budget, seed) in enumerate(
        (int(b), int(s)) for b in args.budgets.split(",") for s in args.seeds.split(",")
    ):
        x, y, x_val, y_val = train_and_validation(budget, seed)  # disjoint, as transfer_quality
        row = {"budget": budget, "seed": seed}
        sides = ["graft", *variants]
        sides = sides[index % len(sides) :] + sides[: index % len(sides)]  # rotate who goes first
        for side in sides:
            keras.backend.clear_session()  # each side starts from a clean Keras state,
            gc.collect()  # as each of graft's steps does in its own process
            started = time.perf_counter()
            if side == "graft":
                work = Path(tempfile.mkdtemp(prefix=f"graft-recipe-{budget}-{seed}-"))
                model_file, phases = graft_training(
                    work, x, y, x_val, y_val, replace(config, seed=seed)
                )
                row["graft_phases"] = {k: round(v, 1) for k, v in phases.items()}
                row["graft_seconds"] = time.perf_counter() - started
                row["head_seconds"] = phases["views"] + phases["head"]
                head_model = keras.models.load_model(work / "head" / model_file.name)
                row["head"] = accuracy_on(head_model, x_test, y_test)
                model = keras.models.load_model(model_file)
            else:
                model = guide_recipe(base, x, y, x_val, y_val, seed=seed, **variants[side])
                row[f"{side}_seconds"] = time.perf_counter() - started
            row[side] = accuracy_on(model, x_test, y_test)
        rows.append(row)
        guides = ", ".join(
            f"{v} {row[v]:.4f} in {row[v + '_seconds']:.1f}s ({row[v + '_seconds'] / row['graft_seconds']:.2f}x)"
            for v in variants
        )
        print(f"budget {budget:>3}/class seed {seed}: graft {row['graft']:.4f} in "
              f"{row['graft_seconds']:.1f}s {row['graft_phases']} (head-only {row['head']:.4f}); "
              f"{guides}", flush=True)  # fmt: skip

    summary = {}
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        keys = ["graft", "head", *variants]
        mean = {k: float(np.mean([r[k] for r in group])) for k in keys}
        seconds = {k: float(np.mean([r[k + "_seconds"] for r in group])) for k in keys}
        best_guide = max(variants, key=lambda v: mean[v])
        summary[str(budget)] = {
            **{k: round(mean[k], 4) for k in keys},
            **{f"{k}_seconds": round(seconds[k], 1) for k in keys},
            "best_guide": best_guide,
            "margin_points": round(100 * (mean["graft"] - mean[best_guide]), 2),
            "speedup": round(min(seconds[v] for v in variants) / seconds["graft"], 2),
            "head_margin_points": round(100 * (mean["head"] - mean[best_guide]), 2),
            "head_speedup": round(min(seconds[v] for v in variants) / seconds["head"], 2),
            "standardised_margin_points": round(100 * (mean["graft"] - mean[STANDARDISED]), 2),
        }
        s = summary[str(budget)]
        print(f"budget {budget:>3}: mean graft {mean['graft']:.4f} in {seconds['graft']:.1f}s; "
              + "; ".join(f"{v} {mean[v]:.4f} in {seconds[v]:.1f}s" for v in variants)
              + f"; graft - best guide {s['margin_points']:+.2f} points; "
              f"speedup vs the fastest guide {s['speedup']:.2f}x; head-only {mean['head']:.4f} in "
              f"{seconds['head']:.1f}s: {s['head_margin_points']:+.2f} points, {s['head_speedup']:.2f}x")  # fmt: skip
    print(json.dumps({
        "mean": summary,
        "min_margin_points": min(s["margin_points"] for s in summary.values()),
        "min_speedup": min(s["speedup"] for s in summary.values()),
        "head_min_margin_points": min(s["head_margin_points"] for s in summary.values()),
        "head_min_speedup": min(s["head_speedup"] for s in summary.values()),
        "standardised_min_margin_points": min(
            s["standardised_margin_points"] for s in summary.values()
        ),
        "seeds": args.seeds, "guide_epochs": args.guide_epochs, "graft_set": args.set,
        "views": config.views, "test_images": int(len(y_test)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
