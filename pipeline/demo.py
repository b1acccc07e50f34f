"""The main job, end to end and offline: `make demo` (or `python -m pipeline.demo`).

Fashion-MNIST classes 1,3,5,7,9 become a local bucket of PNG class folders; a small base
pretrained on the other five classes (`graft pretrain`'s output, shipped in components/bases/
with its provenance) is grafted onto them by the full pipeline under kfp.local; the pushed
version is served by the dev server and queried over gRPC with held-out test images.

    python -m pipeline.demo [--workdir .graft/demo] [--per-class 30] [--retrain]

`--retrain` also shows the retraining loop: a rerun on the same data skips training, new
images arrive, the next run is judged against the served version, and a blessed candidate
is pushed as the second version (versions are Unix seconds) and switched in while a client
keeps querying; a refused one is reported with the gate's reason, and the served version stays.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

from common import model_repository
from components import datasets
from components.config import describe_sources

TARGET_CLASSES = [1, 3, 5, 7, 9]
SOURCE_CLASSES = [0, 2, 4, 6, 8]
MODEL_NAME = "fashion"
# The base carries the settings it was measured with (components/pretrain.py); the demo
# changes only this: two augmented views instead of four keep it to minutes on two CPU cores.
DEMO_CHANGES = ["views=2"]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pretrained_base(cache_dir: Path) -> str:
    """The demo's base, pretrained on the source classes by `graft pretrain`: the one committed
    in components/bases/ (its provenance beside it), else made once into ``cache_dir``."""
    from components.pretrain import cached_base

    path, source = cached_base(cache_dir, SOURCE_CLASSES)
    how = {"shipped": "shipped with graft", "cached": "cached", "pretrained": "pretrained now"}
    say(f"base pretrained on Fashion-MNIST classes {SOURCE_CLASSES} ({how[source]}): {path}")
    return path


def test_images(per_class: int) -> tuple[list[bytes], list[str]]:
    """Held-out images of the target classes from Fashion-MNIST's test split, as PNG bytes."""
    images, labels = datasets.load_fashion_mnist("test")
    picked = datasets.pick_per_class(labels, TARGET_CLASSES, per_class, seed=123)
    payloads, truth = [], []
    for cls, indices in picked.items():
        for index in indices:
            payloads.append(datasets.encode_png(images[index]))
            truth.append(datasets.FASHION_MNIST_CLASSES[cls])
    return payloads, truth


def query(target: str, payloads: list[bytes], truth: list[str]) -> float:
    from serving.client import PredictClient

    client = PredictClient(target)
    predictions = []
    for start in range(0, len(payloads), 32):
        predictions += client.predict_images(MODEL_NAME, payloads[start : start + 32])
    for prediction, label in list(zip(predictions, truth, strict=True))[:: max(1, len(truth) // 5)]:
        top = ", ".join(
            f"{name} {p:.2f}"
            for name, p in zip(prediction.labels, prediction.probabilities, strict=False)
        )
        say(f"  true {label:<11} -> {top}")
    correct = sum(p.labels[0] == t for p, t in zip(predictions, truth, strict=True))
    return correct / len(truth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".graft/demo")
    parser.add_argument("--cache", default=".graft/cache")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args(argv)

    from pipeline.run import print_summary, run_local
    from serving.server import ModelServer

    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    bucket, repo, runs = str(workdir / "bucket"), str(workdir / "models"), workdir / "runs"
    started = time.monotonic()

    counts = datasets.export_fashion_mnist(
        bucket, classes=TARGET_CLASSES, per_class=args.per_class, seed=0
    )
    say(f"bucket {bucket}: {sum(counts.values())} PNGs in {len(counts)} classes")
    base = pretrained_base(Path(args.cache).resolve())
    from pipeline.settings import run_settings

    resolved = run_settings(DEMO_CHANGES, base=base, label="the demo")
    config = resolved.config
    for line in describe_sources(config, resolved.sources).splitlines():
        say(line)

    say("running the pipeline with kfp.local")
    summary = run_local(bucket, repo, MODEL_NAME, config, pipeline_root=runs)
    print_summary(summary)
    if not summary.pushed_version:
        raise SystemExit(f"[demo] no version was pushed: {summary.outcome}")

    payloads, truth = test_images(per_class=20)
    server = ModelServer(repo, MODEL_NAME)
    port = server.start(port=0)
    try:
        server.wait_for_version(int(summary.pushed_version), timeout=120)
        target = f"127.0.0.1:{port}"
        say(f"dev server on {target} serving version {summary.pushed_version}")
        accuracy = query(target, payloads, truth)
        say(f"accuracy over gRPC on {len(truth)} held-out test images: {accuracy:.3f}")
        if args.retrain:
            retrain_loop(bucket, repo, runs, config, target, server, payloads, truth)
    finally:
        server.stop()
        say("dev server stopped")
    say(f"done in {time.monotonic() - started:.0f}s; artifacts under {workdir}")


def retrain_loop(bucket, repo, runs, config, target, server, payloads, truth) -> None:
    """Rerun on the same data (skips), add data (pushes v2 while a client keeps querying)."""
    from pipeline.run import print_summary, run_local
    from serving.client import PredictClient

    say("rerun on unchanged data")
    same = run_local(bucket, repo, MODEL_NAME, config, pipeline_root=runs)
    say(f"  -> {same.outcome}")

    say("new images arrive in the bucket")
    images, labels = datasets.load_fashion_mnist("train")
    picked = datasets.pick_per_class(labels, TARGET_CLASSES, 60, seed=1)
    fresh = {
        datasets.FASHION_MNIST_CLASSES[c]: [images[i] for i in idx] for c, idx in picked.items()
    }
    datasets.write_class_folders(bucket, fresh, prefix="new_s1")

    stop, failures, answered = threading.Event(), [], []

    def keep_querying() -> None:
        client = PredictClient(target)
        while not stop.is_set():
            try:
                answered.append(client.predict_images(MODEL_NAME, payloads[:4]))
            except Exception as err:  # counted and reported: the point is that there are none
                failures.append(err)
            time.sleep(0.05)

    thread = threading.Thread(target=keep_querying, daemon=True)
    thread.start()
    summary = run_local(bucket, repo, MODEL_NAME, config, pipeline_root=runs)
    print_summary(summary)
    if summary.pushed_version:
        server.wait_for_version(int(summary.pushed_version), timeout=120)
    time.sleep(1)
    stop.set()
    thread.join()
    versions = model_repository.complete_versions(model_repository.model_root(repo, MODEL_NAME))
    if summary.pushed_version:
        say(f"versions in the repository: {versions}; "
            f"{len(answered)} requests answered during the switch, {len(failures)} failed")  # fmt: skip
    else:
        say(f"no new version ({summary.outcome}); still serving {versions}; "
            f"{len(answered)} requests answered meanwhile, {len(failures)} failed")  # fmt: skip
    say(f"accuracy now: {query(target, payloads, truth):.3f}")


if __name__ == "__main__":
    main()
