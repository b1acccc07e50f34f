"""Drift detection on Fashion-MNIST: requests to detect a shift, and false alarms in a week.

    .venv/bin/python -m benchmarks.drift [--seeds 5] [--requests-per-day 2000] [--onset 1000]

A graft model is the shipped base (components/bases/fashion-base-v2-0-2-4-6-8.keras, no
network) with a head for the five target classes (1,3,5,7,9), exported as push exports it
(serving/export.py, with its ``embeddings`` signature). Its reference is what push stores:
the embeddings of ``DriftConfig.reference_size`` training originals. Traffic is held-out
Fashion-MNIST test images of the target classes, PNG-encoded as a client sends them,
embedded by the export's signature and fed to ``DriftDetector`` with graft's default
DriftConfig (window, step, alpha, permutations, hysteresis):

- detection: ``--onset`` unshifted requests, then shifted traffic; the figure is the
  number of requests logged after the onset when the alarm came (goal <= 500), for
  blur (Gaussian, sigma 2: PIL's GaussianBlur radius is the standard deviation),
  +40% brightness (pixels x 1.4, clipped) and an unseen class (one the model never saw:
  ``--unseen``, of 0,2,4,6,8; bag by default) at 20% of traffic;
- false alarms: 7 days x ``--requests-per-day`` unshifted requests in random order (the
  test images reshuffled for every pass when a week needs more than there are).
Each is repeated over ``--seeds`` seeds (traffic order and reference sample). The last line
is JSON with the worst (largest) detection delay per shift and the false alarms.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHIPPED_BASE = Path(__file__).parents[1] / "components/bases/fashion-base-v2-0-2-4-6-8.keras"
TARGET = (1, 3, 5, 7, 9)
SHIFTS = ("blur", "brightness", "unseen_class")


def blur(images: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(sigma)))
                     for i in images])  # fmt: skip


def brighter(images: np.ndarray, factor: float = 1.4) -> np.ndarray:
    return np.clip(images.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def export_fashion_model(work: Path) -> Path:
    """The shipped base + an (untrained) head for the target classes, exported as push does:
    embeddings depend on the base alone."""
    import keras

    from components.config import GraftConfig
    from components.train_head import assemble, build_head
    from serving.export import export_saved_model

    keras.utils.set_random_seed(0)
    base = keras.models.load_model(SHIPPED_BASE)
    base.trainable = False
    head = build_head(base.output_shape[-1], len(TARGET), GraftConfig())
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    assemble(base, head, (28, 28, 1)).save(model_dir / "model.keras")
    (model_dir / "labels.txt").write_text("".join(f"c{c}\n" for c in TARGET))
    return export_saved_model(model_dir, work / "export", warmup_images=[], top_k=1)


class Embedder:
    """Fashion-MNIST pixels -> embeddings through an export's ``embeddings`` signature."""

    def __init__(self, export_dir: Path):
        import tensorflow as tf

        self.signature = tf.saved_model.load(str(export_dir)).signatures["embeddings"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from components.datasets import encode_png
        from components.drift import embed_images

        return embed_images(self.signature, [encode_png(i) for i in images])


def fashion(split: str):
    from components.datasets import load_fashion_mnist

    return load_fashion_mnist(split)


def reference_sample(train_images, train_labels, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(np.isin(train_labels, TARGET))
    return train_images[rng.choice(keep, size=size, replace=False)]


def shifted_stream(kind: str, normal: np.ndarray, unseen: np.ndarray, count: int, rng):
    """``count`` requests of shifted traffic drawn from held-out images."""
    picked = normal[rng.choice(len(normal), size=count, replace=False)]
    if kind == "blur":
        return blur(picked)
    if kind == "brightness":
        return brighter(picked)
    mask = rng.random(count) < 0.2  # the unseen class at 20% of traffic
    picked[mask] = unseen[rng.choice(len(unseen), size=int(mask.sum()), replace=False)]
    return picked


def detection_delay(detector, onset_embeddings, shifted_embeddings, step: int):
    """Requests after the onset when the detector alarmed (None: it did not)."""
    for start in range(0, len(onset_embeddings), step):
        if detector.add(onset_embeddings[start : start + step]) is not None:
            return "alarm before the onset"
    for start in range(0, len(shifted_embeddings), step):
        if detector.add(shifted_embeddings[start : start + step]) is not None:
            return start + min(step, len(shifted_embeddings) - start)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests-per-day", type=int, default=2000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--onset", type=int, default=1000)
    parser.add_argument("--after-onset", type=int, default=1000, help="shifted requests sent")
    parser.add_argument("--unseen", type=int, default=8, help="Fashion-MNIST class never trained")
    args = parser.parse_args()
    if args.unseen in TARGET or not 0 <= args.unseen <= 9:
        raise SystemExit(f"error: --unseen {args.unseen}: pick one of 0,2,4,6,8")
    from components.drift import DriftConfig, DriftDetector

    config = DriftConfig()
    start_load = [round(v, 2) for v in os.getloadavg()]
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-drift-"))
    embed = Embedder(export_fashion_model(work))
    train_images, train_labels = fashion("train")
    test_images, test_labels = fashion("test")
    normal = test_images[np.isin(test_labels, TARGET)]
    unseen = test_images[test_labels == args.unseen]
    normal_embeddings = embed(normal)
    print(f"embedded {len(normal)} held-out images; load average {start_load}", flush=True)

    delays = {kind: [] for kind in SHIFTS}
    false_alarms, tests = [], []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        reference = embed(reference_sample(train_images, train_labels, config.reference_size, seed))
        for kind in SHIFTS:
            detector = DriftDetector(reference, DriftConfig(seed=seed))
            onset = normal_embeddings[rng.choice(len(normal), size=args.onset, replace=False)]
            shifted = embed(shifted_stream(kind, normal, unseen, args.after_onset, rng))
            delays[kind].append(detection_delay(detector, onset, shifted, config.step))
            print(f"seed {seed} {kind}: alarm {delays[kind][-1]} requests after the onset",
                  flush=True)  # fmt: skip
        week = args.days * args.requests_per_day
        passes = -(-week // len(normal))
        order = np.concatenate([rng.permutation(len(normal)) for _ in range(passes)])[:week]
        detector = DriftDetector(reference, DriftConfig(seed=seed))
        alarms = 0
        for start in range(0, week, config.step):
            alarms += (
                detector.add(normal_embeddings[order[start : start + config.step]]) is not None
            )
        false_alarms.append(alarms)
        tests.append(detector.tests)
        print(f"seed {seed}: {alarms} alarms over {args.days} days ({week} requests, "
              f"{detector.tests} tests)", flush=True)  # fmt: skip

    def worst(values):
        numeric = [v for v in values if isinstance(v, int)]
        return max(numeric) if len(numeric) == len(values) else "missed"

    summary = {kind: worst(v) for kind, v in delays.items()}
    print(f"worst detection delay (requests after onset): {summary}; false alarms over "
          f"{args.days} days: {sum(false_alarms)} in {sum(tests)} tests", flush=True)  # fmt: skip
    print(json.dumps({
        "benchmark": "drift", "seeds": args.seeds, "config": vars(config),
        "unseen_class": args.unseen, "onset": args.onset, "detection_delay_worst": summary,
        "detection_delays": delays, "requests_per_day": args.requests_per_day,
        "days": args.days, "false_alarms": false_alarms, "tests_in_week": tests,
        "seconds": round(time.time() - started, 1), "load_average_start": start_load,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
