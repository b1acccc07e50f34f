"""fine_tune settings side by side on the demo's transfer task: one head per (budget, seed),
then fine_tune from that same head once per variant; test accuracy of the model the step
chooses (and of its fine-tuned candidate) and the step's seconds.

    .venv/bin/python -m benchmarks.fine_tune_variants [--budgets 100,30,10] [--seeds 3,4] [--variants graft,patience3,top4]

Base, data (validation drawn with the labelled images, never one of them:
common.train_and_validation), views and every other setting are what `graft run --base <the
demo base>` uses (benchmarks/recipe.py's graft side). Variants run in the order given, each from the same
head; the first is the reference of the ratios. Last line: one JSON object with per-budget
means and, per variant, the largest accuracy loss against the reference (points) and the
mean seconds ratio.
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import pretrained_base, target_images, train_and_validation

# fine_tune stops on `patience` too; the head is already trained (with the base's patience 10)
# when a variant runs, so a variant's patience is fine_tune's alone.
VARIANTS = {
    "graft": {},  # what `graft run --base <the demo base>` does: all 12 layers, patience 10
    "patience3": {"patience": 3},
    "top4": {"fine_tune_layers": 4},  # the last block only: the frozen part is cached
    "top8": {"fine_tune_layers": 8},  # the last two blocks
    "top4_patience3": {"fine_tune_layers": 4, "patience": 3},
    "epochs5": {"fine_tune_max_epochs": 5},
    "epochs10": {"fine_tune_max_epochs": 10},  # the guide's fine-tuning epochs
    "batch128": {"batch_size": 128},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="100,30,10")
    parser.add_argument("--seeds", default="3,4")
    parser.add_argument("--variants", default="graft,patience3,top4")
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        raise SystemExit(f"Received `--variants` {unknown}: expected some of {sorted(VARIANTS)}")

    import keras

    from benchmarks.recipe import accuracy_on, graft_config
    from benchmarks.transfer_quality import write_examples
    from components.fine_tune import CANDIDATE_FILE, fine_tune_model
    from components.train_head import MODEL_FILE, train_head_model

    config = graft_config(pretrained_base())
    x_test, y_test = target_images(None, 0, split="test")
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            x, y, x_val, y_val = train_and_validation(budget, seed)  # disjoint, as recipe's
            work, run = (
                Path(tempfile.mkdtemp(prefix="graft-ft-variants-")),
                replace(config, seed=seed),
            )
            write_examples(work / "ex", x, y, x_val, y_val, run.views, seed)
            train_head_model(work / "ex", work / "head", run)
            head = accuracy_on(keras.models.load_model(work / "head" / MODEL_FILE), x_test, y_test)
            row = {"budget": budget, "seed": seed, "head": head}
            for name in names:
                started = time.perf_counter()
                result = fine_tune_model(work / "ex", work / "head", work / name, replace(run, **VARIANTS[name]))  # fmt: skip
                row[name] = {
                    "seconds": round(time.perf_counter() - started, 1), "epochs": result.epochs,
                    "chosen": result.chosen, "cached": bool(result.cached), "guard": result.guard,
                    "candidate": accuracy_on(keras.models.load_model(work / name / CANDIDATE_FILE), x_test, y_test),
                    "accuracy": accuracy_on(keras.models.load_model(work / name / MODEL_FILE), x_test, y_test),
                }  # fmt: skip
            rows.append(row)
            print(f"budget {budget:>3}/class seed {seed}: head {head:.4f}; " + "; ".join(
                f"{n} {row[n]['accuracy']:.4f} ({row[n]['chosen']}, candidate {row[n]['candidate']:.4f}) "
                f"in {row[n]['seconds']:.1f}s, {row[n]['epochs']} epochs" for n in names), flush=True)  # fmt: skip

    reference, summary = names[0], {}
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        summary[str(budget)] = {
            n: {"accuracy": round(float(np.mean([r[n]["accuracy"] for r in group])), 4),
                "seconds": round(float(np.mean([r[n]["seconds"] for r in group])), 1)}
            for n in names
        }  # fmt: skip
    versus = {
        n: {"max_loss_points": round(max(100 * (r[reference]["accuracy"] - r[n]["accuracy"]) for r in rows), 2),
            "seconds_ratio": round(float(np.mean([r[n]["seconds"] / r[reference]["seconds"] for r in rows])), 2)}
        for n in names[1:]
    }  # fmt: skip
    for n, v in versus.items():
        print(f"{n} vs {reference}: largest accuracy loss {v['max_loss_points']:+.2f} points, "
              f"mean seconds ratio {v['seconds_ratio']:.2f}")  # fmt: skip
    print(json.dumps({"mean": summary, "versus_" + reference: versus, "budgets": args.budgets,
                      "seeds": args.seeds, "test_images": int(len(y_test))}))  # fmt: skip


if __name__ == "__main__":
    main()
