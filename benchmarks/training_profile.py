"""Where graft's training time goes, per phase, at each label budget (one seed).

    .venv/bin/python -m benchmarks.training_profile [--budgets 10,30,100] [--seed 0]

Runs exactly what benchmarks.recipe times as "graft" (views, train_head, fine_tune on the
demo base with its own settings) and splits it: the feature pass and the head's fit (from
train_head's training.json), fine_tune (and whether its frozen part was cached, with why
not), and the time spent inside the per-epoch callbacks (graft's epoch backup, or Keras'
BackupAndRestore where a build still uses it; in-memory validation, or Keras' evaluate;
TensorBoard, early stopping), model saves, loads and predictions, measured by wrapping
those methods. Last line: one JSON object with every budget's figures.
"""

import argparse
import collections
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import pretrained_base, train_and_validation
from benchmarks.recipe import graft_config, graft_training

CALLBACK_METHODS = ("on_train_begin", "on_epoch_end", "on_train_batch_end", "on_train_end")


def time_methods(spent: dict, owner, methods, label: str) -> None:
    """Wrap ``owner.<method>`` so its wall time adds up in ``spent[label]``."""
    for method in methods:
        original = getattr(owner, method)

        def wrapped(*args, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        setattr(owner, method, wrapped)


def time_callbacks(spent: dict, module, factory: str, label: str) -> None:
    """Wrap ``module.<factory>`` (a function returning a Keras callback) so the callbacks it
    makes add their wall time in ``CALLBACK_METHODS`` to ``spent[label]``."""
    original = getattr(module, factory)

    def wrapped(*args, **kwargs):
        callback = original(*args, **kwargs)
        time_methods(spent, callback, CALLBACK_METHODS, label)
        return callback

    setattr(module, factory, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="10,30,100")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    spent = collections.defaultdict(float)
    from components import training

    time_methods(spent, keras.callbacks.BackupAndRestore, CALLBACK_METHODS, "backup_and_restore")
    time_callbacks(spent, training, "epoch_backup", "epoch_backup")
    time_callbacks(spent, training, "in_memory_validation", "in_memory_validation")
    time_methods(spent, keras.Model, ("evaluate",), "keras_validation")
    time_methods(spent, keras.callbacks.TensorBoard, CALLBACK_METHODS, "tensorboard")
    time_methods(spent, keras.callbacks.EarlyStopping, ("on_epoch_end",), "early_stopping_state")
    time_methods(spent, keras.Model, ("save",), "model_save")
    time_methods(spent, keras.Model, ("predict",), "predict")
    time_methods(spent, keras.models, ("load_model",), "load_model")

    base = pretrained_base()
    config = graft_config(base)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        x, y, x_val, y_val = train_and_validation(budget, args.seed)
        spent.clear()
        work = Path(tempfile.mkdtemp(prefix=f"graft-profile-{budget}-"))
        started = time.perf_counter()
        _, phases = graft_training(work, x, y, x_val, y_val, replace(config, seed=args.seed))
        total = time.perf_counter() - started
        head = json.loads((work / "head" / "training.json").read_text())
        tuned_file = work / "tuned" / "training.json"
        tuned = json.loads(tuned_file.read_text()) if tuned_file.exists() else {}
        row = {
            "budget": budget, "total_s": round(total, 1),
            "phases_s": {k: round(v, 1) for k, v in phases.items()},
            "feature_pass_s": round(head["feature_seconds"], 1),
            "head_fit_s": round(head["head_seconds"], 1), "head_epochs": head["epochs"],
            "train_records": int(len(y)) * (1 + config.views),
            "fine_tune_epochs": tuned.get("epochs"), "fine_tune_steps": tuned.get("steps"),
            "frozen_part_cached_s": tuned.get("cached", {}).get("seconds"),
            "uncached_reason": tuned.get("uncached_reason"),
            "inside_s": {k: round(v, 1) for k, v in spent.items()},
            "load_average": [round(v, 1) for v in os.getloadavg()],
        }  # fmt: skip
        rows.append(row)
        print(f"budget {budget:>3}/class: total {total:.1f}s {row['phases_s']}; feature pass "
              f"{row['feature_pass_s']}s, head fit {row['head_fit_s']}s ({row['head_epochs']} "
              f"epochs), fine_tune {row['fine_tune_epochs']} epochs / {row['fine_tune_steps']} "
              f"steps (cached: {row['frozen_part_cached_s']}; {row['uncached_reason']}); inside "
              f"{row['inside_s']}; load {row['load_average']}", flush=True)  # fmt: skip
    print(json.dumps({"rows": rows, "seed": args.seed, "views": config.views,
                      "fine_tune_layers": config.fine_tune_layers}))  # fmt: skip


if __name__ == "__main__":
    main()
