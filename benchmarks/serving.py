"""Serving overhead and throughput of `graft serve`, one run, loopback only.

    .venv/bin/python -m benchmarks.serving [--models tiny,mobilenet_v2] [--requests 300] [--clients 16] [--seconds 5]

For each model, exported the way push exports (serving_default: encoded image bytes in):
- ``tiny``: a small conv classifier at 96 px (~0.7 ms per call in-process): the server's own
  overhead, exaggerated.
- ``mobilenet_v2``: graft's default base (MobileNetV2, random weights: cost, not accuracy,
  matters) with graft's head at 224 px: what a realistic model costs.
1. p50/p99 latency of one-image requests through gRPC vs calling the same SavedModel
   signature in-process (the ratio is the server's overhead).
2. In-process cost per image at batch 1, 4 and 16: the most batching can gain on this machine.
3. Throughput with 16 concurrent clients for a fixed time, dynamic batching off vs on.
The last line is JSON: per-model figures, and the goals' figures for the realistic model.
"""

import argparse
import io
import json
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import export_mobilenet_model, export_tiny_model, percentile_ms, photo_like

SIZES = {"tiny": 96, "mobilenet_v2": 224}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,mobilenet_v2")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    args = parser.parse_args()

    figures = {}
    for model in args.models.split(","):
        if model not in SIZES:
            raise SystemExit(f"Received `--models {model}`: expected some of {sorted(SIZES)}")
        figures[model] = measure(model, args)
    out = {"models": figures, "clients": args.clients}
    realistic = figures.get("mobilenet_v2")
    if realistic:
        out.update(p50_ratio=realistic["p50_ratio"], batching_ratio=realistic["batching_ratio"])
    print(json.dumps(out))


def measure(model: str, args) -> dict:
    import tensorflow as tf
    from PIL import Image

    from serving.client import PredictClient
    from serving.server import ModelServer

    size = SIZES[model]
    work = Path(tempfile.mkdtemp(prefix=f"graft-bench-{model}-"))
    export = export_tiny_model if model == "tiny" else export_mobilenet_model
    export_dir = export(work / "repo", "bench", size)
    buffer = io.BytesIO()
    Image.fromarray(photo_like(size)).save(buffer, "PNG")
    image = buffer.getvalue()
    requests = args.requests if model == "tiny" else max(50, args.requests // 3)

    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    signature(images=tf.constant([image]))
    in_process = []
    for _ in range(requests):
        started = time.perf_counter()
        signature(images=tf.constant([image]))
        in_process.append(time.perf_counter() - started)
    per_image_ms = {}  # what batching can gain at best: does a bigger call cost less per image?
    for rows in (1, 4, 16):
        batch = tf.constant([image] * rows)
        signature(images=batch)
        started = time.perf_counter()
        for _ in range(5):
            signature(images=batch)
        per_image_ms[rows] = round((time.perf_counter() - started) / 5 / rows * 1000, 2)
    del signature

    server = ModelServer(str(work / "repo"), "bench", max_workers=args.clients)
    target = f"127.0.0.1:{server.start(0)}"
    client = PredictClient(target)
    client.predict_images("bench", [image])
    over_grpc = []
    for _ in range(requests):
        started = time.perf_counter()
        client.predict_images("bench", [image])
        over_grpc.append(time.perf_counter() - started)
    server.stop(1)

    unbatched = throughput(work, image, args, batching=False)
    batched = throughput(work, image, args, batching=True)
    p50_ratio = percentile_ms(over_grpc, 50) / percentile_ms(in_process, 50)
    p99_ratio = percentile_ms(over_grpc, 99) / percentile_ms(in_process, 99)
    batching_ratio = batched["rps"] / unbatched["rps"]
    print(f"{model}, batch 1, {size}px PNG, {requests} requests each:")
    print(
        f"  in-process p50 {percentile_ms(in_process, 50):.2f} ms p99 {percentile_ms(in_process, 99):.2f} ms"
    )
    print(
        f"  over gRPC  p50 {percentile_ms(over_grpc, 50):.2f} ms p99 {percentile_ms(over_grpc, 99):.2f} ms"
    )
    print(f"  gRPC/in-process: p50 {p50_ratio:.2f}x, p99 {p99_ratio:.2f}x")
    print(
        "  in-process ms per image at batch "
        + ", ".join(f"{k}: {v}" for k, v in per_image_ms.items())
    )
    for label, run in (("batching off", unbatched), ("batching on", batched)):
        print(f"  {args.clients} clients x {args.seconds:.0f}s, {label}: {run['rps']:.1f} requests/s, "
              f"{run['failed']} failed, {run['calls']} model calls")  # fmt: skip
    print(f"  throughput batching on/off: {batching_ratio:.2f}x", flush=True)
    return {"size": size, "requests": requests,
            "p50_ratio": round(p50_ratio, 2), "p99_ratio": round(p99_ratio, 2),
            "grpc_p50_ms": round(percentile_ms(over_grpc, 50), 2), "grpc_p99_ms": round(percentile_ms(over_grpc, 99), 2),
            "inproc_p50_ms": round(percentile_ms(in_process, 50), 2), "inproc_p99_ms": round(percentile_ms(in_process, 99), 2),
            "rps_batching_off": round(unbatched["rps"], 1), "rps_batching_on": round(batched["rps"], 1),
            "batching_ratio": round(batching_ratio, 2), "model_calls_on": batched["calls"],
            "inproc_ms_per_image_at_batch": per_image_ms,
            "failed": unbatched["failed"] + batched["failed"]}  # fmt: skip


def throughput(work: Path, image: bytes, args, *, batching: bool) -> dict:
    """Requests/s from ``args.clients`` threads for ``args.seconds`` against a fresh server."""
    from serving.client import PredictClient
    from serving.server import ModelServer

    server = ModelServer(str(work / "repo"), "bench", max_workers=args.clients, batching=batching,
                         max_batch_size=args.clients, batch_timeout_ms=args.batch_timeout_ms)  # fmt: skip
    target = f"127.0.0.1:{server.start(0)}"
    PredictClient(target).predict_images("bench", [image])
    done, failures, stop = [], [], threading.Event()

    def worker():
        own = PredictClient(target)
        while not stop.is_set():
            try:
                own.predict_images("bench", [image])
                done.append(1)
            except Exception as err:  # counted: the figure is only honest with its failures
                failures.append(err)

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    calls = server.batcher.calls if server.batcher else len(done)
    server.stop(1)
    return {"rps": len(done) / elapsed, "failed": len(failures), "calls": calls}


if __name__ == "__main__":
    main()
