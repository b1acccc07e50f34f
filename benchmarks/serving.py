"""Serving overhead and throughput of `graft serve`, one run, loopback only.

    .venv/bin/python -m benchmarks.serving [--models tiny,mobilenet_v2] [--requests 300] [--clients 16] [--seconds 3]
        [--batch-threads 1,2] [--batch-timeout-ms 2] [--rounds 4] [--clients-in-server]

For each model, exported the way push exports (serving_default: encoded image bytes in):
- ``tiny``: a small conv classifier at 96 px (~0.7 ms per call in-process): the server's own
  overhead, exaggerated.
- ``mobilenet_v2``: graft's default base (MobileNetV2, random weights: cost, not accuracy,
  matters) with graft's head at 224 px: what a realistic model costs.
1. p50/p99 latency of one-image requests through gRPC vs calling the same SavedModel
   signature in-process (the ratio is the server's overhead), the two alternated in
   ``--rounds`` blocks (measured one after the other, a quiet machine's drift showed as
   1.56x once where alternated blocks gave 1.05x-1.3x); the client is in this process.
2. In-process cost per image at batch 1, 4, 8 and 16, and what the first call at each new
   batch size costs (the signature's input shape is [None]: a new size does not retrace).
3. The batching ceiling, in-process, configurations alternated in ``--rounds`` rounds:
   ``clients`` threads each calling with batch 1 back-to-back (the best batching off can do)
   against one thread calling batch ``clients`` back-to-back and two threads calling half or
   full batches at once (what batching can do with one or two merged calls in flight). The
   best batched figure over the unbatched one is the most any batcher can gain here.
4. Throughput with ``clients`` concurrent clients for ``--seconds``, dynamic batching off
   against on with each ``--batch-threads`` setting; one server per setting, all loaded
   before the first run, runs alternated in ``--rounds`` rounds (order reversed every other
   round) so the machine's drifting load falls on all alike. The clients run as threads in
   a separate process (a TF Serving client never shares the server's GIL);
   ``--clients-in-server`` runs them in the server's process instead, as before 2026-11-26.
The last line is JSON: per-model figures, the load average, and the goals' figures for the
realistic model (``batching_ratio`` is for graft serve's default ``--batch-threads``).
"""

import argparse
import io
import json
import multiprocessing
import os
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
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--batch-threads", default=None,
                        help="comma-separated settings to compare (default: 1 and graft serve's default)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--clients-in-server", action="store_true")
    args = parser.parse_args()
    from serving.batching import default_batch_threads

    args.default_threads = default_batch_threads()
    wanted = args.batch_threads or f"1,{args.default_threads}"
    args.thread_settings = sorted({int(n) for n in wanted.split(",")})
    if args.rounds < 1 or min(args.thread_settings) < 1:
        raise SystemExit(
            f"Received `--rounds {args.rounds}`, `--batch-threads {wanted}`: expected >= 1"
        )

    figures = {}
    for model in args.models.split(","):
        if model not in SIZES:
            raise SystemExit(f"Received `--models {model}`: expected some of {sorted(SIZES)}")
        figures[model] = measure(model, args)
    out = {"models": figures, "clients": args.clients, "load_average": load_average(),
           "clients_in": "server process" if args.clients_in_server else "separate process"}  # fmt: skip
    realistic = figures.get("mobilenet_v2")
    if realistic:
        out.update(p50_ratio=realistic["p50_ratio"], batching_ratio=realistic["batching_ratio"],
                   batching_ceiling=realistic["batching_ceiling"])  # fmt: skip
    print(json.dumps(out))


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure(model: str, args) -> dict:
    import tensorflow as tf
    from PIL import Image

    from serving.client import PredictClient
    from serving.server import ModelServer

    size = SIZES[model]
    print(f"{model}: load average {load_average()} at the start", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"graft-bench-{model}-"))
    export = export_tiny_model if model == "tiny" else export_mobilenet_model
    export_dir = export(work / "repo", "bench", size)
    buffer = io.BytesIO()
    Image.fromarray(photo_like(size)).save(buffer, "PNG")
    image = buffer.getvalue()
    requests = args.requests if model == "tiny" else max(50, args.requests // 3)

    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    signature(images=tf.constant([image]))
    server = ModelServer(str(work / "repo"), "bench", max_workers=args.clients)
    client = PredictClient(f"127.0.0.1:{server.start(0)}")
    client.predict_images("bench", [image])
    calls = {"in_process": lambda: signature(images=tf.constant([image])),
             "grpc": lambda: client.predict_images("bench", [image])}  # fmt: skip
    latency = {"in_process": [], "grpc": []}
    for round_ in range(args.rounds):  # alternated: the machine drifts between blocks
        for side in calls if round_ % 2 == 0 else reversed(calls):
            for _ in range(-(-requests // args.rounds)):
                started = time.perf_counter()
                calls[side]()
                latency[side].append(time.perf_counter() - started)
    server.stop(1)
    in_process, over_grpc = latency["in_process"], latency["grpc"]
    per_image_ms, first_call_ms = {}, {}  # does a bigger call cost less per image?
    for rows in (1, 4, 8, 16):
        batch = tf.constant([image] * rows)
        started = time.perf_counter()
        signature(images=batch)  # the first call at this size (1 was called above)
        first_call_ms[rows] = round((time.perf_counter() - started) * 1000, 1)
        started = time.perf_counter()
        for _ in range(5):
            signature(images=batch)
        per_image_ms[rows] = round((time.perf_counter() - started) / 5 / rows * 1000, 2)
    ceiling = batching_ceiling(signature, image, args)

    runs = throughput(work, image, args)
    unbatched = runs["off"]
    ratios = {n: runs[n]["rps"] / unbatched["rps"] for n in args.thread_settings}
    default = args.default_threads if args.default_threads in ratios else args.thread_settings[-1]
    p50_ratio = percentile_ms(over_grpc, 50) / percentile_ms(in_process, 50)
    p99_ratio = percentile_ms(over_grpc, 99) / percentile_ms(in_process, 99)
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
    print(
        "  first call at a new batch size, ms: "
        + ", ".join(f"{k}: {v}" for k, v in first_call_ms.items())
        + " (steady: "
        + ", ".join(f"{k}: {round(v * k, 1)}" for k, v in per_image_ms.items())
        + ")"
    )
    print(
        f"  ceiling, in-process images/s over {args.rounds} rounds: "
        + ", ".join(f"{k}: {v}" for k, v in ceiling["images_per_s"].items())
        + f" -> batching can gain at most {ceiling['ratio']:.2f}x"
    )
    where = "in the server's process" if args.clients_in_server else "in a separate process"
    for label, run in runs.items():
        setting = "batching off" if label == "off" else f"batching on, {label} batch thread(s)"
        rows = (
            f", {run['rps'] * run['seconds'] / run['calls']:.1f} rows per call"
            if label != "off"
            else ""
        )
        print(
            f"  {args.clients} clients {where} x {run['seconds']:.0f}s, {setting}: {run['rps']:.1f} requests/s, "
            f"{run['failed']} failed, {run['calls']} model calls{rows}"
        )
    print(
        "  throughput batching on/off: "
        + ", ".join(f"{n} thread(s) {r:.2f}x" for n, r in ratios.items()),
        flush=True,
    )
    print(f"{model}: load average {load_average()} at the end", flush=True)
    return {"size": size, "requests": requests,
            "p50_ratio": round(p50_ratio, 2), "p99_ratio": round(p99_ratio, 2),
            "grpc_p50_ms": round(percentile_ms(over_grpc, 50), 2), "grpc_p99_ms": round(percentile_ms(over_grpc, 99), 2),
            "inproc_p50_ms": round(percentile_ms(in_process, 50), 2), "inproc_p99_ms": round(percentile_ms(in_process, 99), 2),
            "inproc_ms_per_image_at_batch": per_image_ms, "first_call_ms_at_batch": first_call_ms,
            "ceiling_images_per_s": ceiling["images_per_s"], "batching_ceiling": round(ceiling["ratio"], 2),
            "rps_batching_off": round(unbatched["rps"], 1),
            "rps_batching_on": {n: round(runs[n]["rps"], 1) for n in args.thread_settings},
            "model_calls_on": {n: runs[n]["calls"] for n in args.thread_settings},
            "batching_ratio_by_threads": {n: round(r, 2) for n, r in ratios.items()},
            "batching_ratio": round(ratios[default], 2), "batch_threads_default": args.default_threads,
            "failed": sum(run["failed"] for run in runs.values())}  # fmt: skip


def batching_ceiling(signature, image: bytes, args) -> dict:
    """Images/s in-process: ``clients`` threads at batch 1 against merged calls, alternated."""
    import tensorflow as tf

    n = args.clients
    shapes = {f"{n} x batch 1": (n, 1), f"1 x batch {n}": (1, n),
              f"2 x batch {n // 2}": (2, max(1, n // 2)), f"2 x batch {n}": (2, n)}  # fmt: skip
    images, seconds = dict.fromkeys(shapes, 0), dict.fromkeys(shapes, 0.0)
    for round_ in range(args.rounds):
        for label in shapes if round_ % 2 == 0 else reversed(shapes):
            threads, rows = shapes[label]
            batch = tf.constant([image] * rows)
            signature(images=batch)
            count, stop = [0] * threads, threading.Event()

            def worker(i, batch=batch, rows=rows, count=count, stop=stop):
                while not stop.is_set():
                    signature(images=batch)
                    count[i] += rows

            workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            started = time.perf_counter()
            for thread in workers:
                thread.start()
            time.sleep(args.ceiling_seconds)
            stop.set()
            for thread in workers:
                thread.join()
            seconds[label] += time.perf_counter() - started
            images[label] += sum(count)
    rates = {label: round(images[label] / seconds[label], 1) for label in shapes}
    unbatched = rates[f"{n} x batch 1"]
    best = max(rate for label, rate in rates.items() if not label.endswith("x batch 1"))
    return {"images_per_s": rates, "ratio": best / unbatched}


def throughput(work: Path, image: bytes, args) -> dict:
    """Requests/s from ``args.clients`` clients against batching off and each batch-threads
    setting: one server each, runs alternated over ``args.rounds`` rounds."""
    from serving.server import ModelServer

    servers = {"off": ModelServer(str(work / "repo"), "bench", max_workers=args.clients)}
    for n in args.thread_settings:
        servers[n] = ModelServer(str(work / "repo"), "bench", max_workers=args.clients, batching=True,
                                 max_batch_size=args.clients, batch_timeout_ms=args.batch_timeout_ms,
                                 batch_threads=n)  # fmt: skip
    targets = {label: f"127.0.0.1:{server.start(0)}" for label, server in servers.items()}
    totals = {label: {"done": 0, "failed": 0, "seconds": 0.0, "calls": 0} for label in servers}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: TF does not survive fork
    with context.Pool(1) as pool:
        for target in targets.values():  # every server answers once before timing
            client_run(target, image, 1, 0.0)
        for round_ in range(args.rounds):
            for label in targets if round_ % 2 == 0 else reversed(targets):
                batcher = servers[label].batcher
                calls_before = batcher.calls if batcher else 0
                job = (targets[label], image, args.clients, args.seconds)
                run = client_run(*job) if args.clients_in_server else pool.apply(client_run, job)
                total = totals[label]
                total["done"] += run["done"]
                total["failed"] += run["failed"]
                total["seconds"] += run["seconds"]
                total["calls"] += (batcher.calls - calls_before) if batcher else run["done"]
    for server in servers.values():
        server.stop(1)
    return {label: {"rps": t["done"] / t["seconds"], "seconds": t["seconds"], "failed": t["failed"],
                    "calls": t["calls"]} for label, t in totals.items()}  # fmt: skip


def client_run(target: str, image: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads sending one-image requests back-to-back for ``seconds``."""
    from serving.client import PredictClient

    done, failures, stop = [], [], threading.Event()

    def worker():
        own = PredictClient(target)
        try:
            own.predict_images("bench", [image])  # connected (and TF imported) before the clock
        except Exception as err:
            failures.append(err)
        ready.wait()
        while not stop.is_set():
            try:
                own.predict_images("bench", [image])
                done.append(1)
            except Exception as err:  # counted: the figure is only honest with its failures
                failures.append(err)

    ready = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"done": len(done), "failed": len(failures), "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main()
