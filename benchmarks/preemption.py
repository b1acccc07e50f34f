"""fine_tune killed 3 times at random moments and run again each time (a spot VM reclaimed,
a KFP retry) vs the same step uninterrupted, side by side in one run.

Each killed run is a subprocess SIGKILLed at a random moment inside a random epoch (after
the line of the previous epoch, plus a random share of an epoch's duration); the next run
resumes from the last epoch saved. Reported: final val accuracy of both, epochs lost per
kill (epochs the killed run had completed minus where the next run resumed), and whether
the resumed run trained the same total epochs. The last line is one JSON object.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.preemption [--per-class 30] [--epochs 8] [--kills 3] [--seed 0] [--data fashion|synthetic]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = """
import json, logging, sys
from components.config import GraftConfig
from components.fine_tune import fine_tune_model
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
settings = json.loads(sys.argv[4])
settings["allowed_formats"] = tuple(settings["allowed_formats"])
fine_tune_model(sys.argv[1], sys.argv[2], sys.argv[3], GraftConfig(**settings))
"""


def tiny_base(path: Path, channels: int) -> str:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, filters in enumerate((16, 16, 32)):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv_{i}")(x)
    keras.Model(inputs, x, name="tiny").save(path)
    return str(path)


def killed_run(work: Path, out: Path, config, after_epoch: int, rng: random.Random) -> int:
    """Run fine_tune until ``after_epoch`` is saved, then SIGKILL it a random share of an
    epoch later; returns the epochs it had completed when killed."""
    settings = json.dumps(asdict(config), default=list)
    args = [sys.executable, "-c", STEP, str(work / "examples"), str(work / "head"), str(out), settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    step = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    done, stamps = 0, []
    for line in step.stderr:
        if "done and saved" in line and "fine_tune: epoch" in line:
            done = int(line.split("fine_tune: epoch ")[1].split()[0])
            stamps.append(time.perf_counter())
            if done >= after_epoch:
                epoch_seconds = stamps[-1] - stamps[-2] if len(stamps) > 1 else 1.0
                time.sleep(rng.uniform(0, 0.9) * epoch_seconds)  # somewhere inside the next epoch
                break
    step.send_signal(signal.SIGKILL)
    for line in step.stderr:  # epochs finished while the kill was on its way
        if "done and saved" in line and "fine_tune: epoch" in line:
            done = int(line.split("fine_tune: epoch ")[1].split()[0])
    step.wait()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("fashion", "synthetic"), default="fashion",
                        help="Fashion-MNIST's odd classes (28 px gray) or graft's synthetic images")  # fmt: skip
    args = parser.parse_args()

    from components import datasets, examples
    from components.augment import augment_dataset
    from components.config import GraftConfig
    from components.fine_tune import fine_tune_model
    from components.train_head import train_head_model
    from components.training import _epochs_done, resume_dir

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="graft-preempt-"))
    channels, size = (1, 28) if args.data == "fashion" else (3, 32)
    config = GraftConfig(
        image_size=size, channels=channels, views=2, batch_size=16, head_learning_rate=0.01,
        head_max_epochs=60, patience=args.epochs, min_delta=0.01, dropout=0.0,
        fine_tune_layers=2, fine_tune_max_epochs=args.epochs, fine_tune_learning_rate=1e-3,
        seed=args.seed,
    )  # fmt: skip
    if args.data == "fashion":
        datasets.export_fashion_mnist(str(work / "data"), classes=[1, 3, 5, 7, 9], per_class=args.per_class, seed=args.seed)  # fmt: skip
    else:
        datasets.write_synthetic_dataset(str(work / "data"), num_classes=4, per_class=args.per_class, size=32, seed=args.seed)  # fmt: skip
    config = replace(config, base=tiny_base(work / "base.keras", channels))
    augment_dataset(str(work / "data"), work / "examples", config)
    train_head_model(work / "examples", work / "head", config)

    whole = fine_tune_model(work / "examples", work / "head", work / "whole", config)
    kill_at = sorted(rng.sample(range(1, args.epochs - 1), args.kills))
    lost, completed, resumed_at = [], 0, []
    for k in kill_at:
        completed = killed_run(work, work / "tuned", config, k, rng)
        # the next run (killed or final) resumes from what the resume folder holds
        resume = _epochs_done(resume_dir(work / "tuned") / "fine_tune" / "backup")
        resumed_at.append(resume)
        lost.append(completed - resume)
    tuned = fine_tune_model(work / "examples", work / "head", work / "tuned", config)
    record = {
        "uninterrupted_val_accuracy": round(whole.tuned_val_accuracy, 4),
        "killed_val_accuracy": round(tuned.tuned_val_accuracy, 4),
        "points_apart": round(100 * abs(whole.tuned_val_accuracy - tuned.tuned_val_accuracy), 2),
        "kills_after_epoch": kill_at, "resumed_at": resumed_at, "epochs_lost_per_kill": lost,
        "epochs": [whole.epochs, tuned.epochs], "val_images": examples.read_spec(work / "examples")["counts"]["val"],
    }  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
