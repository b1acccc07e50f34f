"""Scale: validate's manifest, augment and train_head at N images, each step in its own
process, measuring wall time, images/s and peak RSS; then GCS reads through the storage
pool vs one at a time, against the GCS emulator behind the project's fault-injecting proxy
adding a fixed latency per request (no failures injected).

    .venv/bin/python -m benchmarks.scale [--sizes 1000,10000,30000] [--gcs-sizes 1000] \\
        [--latency-ms 20] [--concurrency 16] [--work .graft/bench-scale]

Data: the Fashion-MNIST training set (Debian's dataset-fashion-mnist), N/10 images per
class as PNG class folders. Settings: image_size 96, channels 3, views 4, head_max_epochs 2
(as in issue 15's measurement). Base: MobileNetV2 with weights=none (random init, no
network): the forward-pass cost of the default base, not its accuracy.

train_head's floor is one forward pass of the same base over the stored train+val records
(Keras ``predict`` over the shards, pooled), measured in its own process.

The last line is one JSON object: ``peak_rss_mb`` and ``ms_per_image`` per N (per step),
the goals' ratios, and the GCS figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("manifest", "augment", "train_head", "floor")
BASE_NOTE = "mobilenet_v2, weights=none (random init: no network; cost of the default base)"


def config(io_concurrency: int = 16):
    from components.config import GraftConfig

    return GraftConfig(image_size=96, channels=3, views=4, base="mobilenet_v2", weights="none",
                       head_max_epochs=2, io_concurrency=io_concurrency)  # fmt: skip


# --- the child processes --------------------------------------------------------------------


def child_step(step: str, data_uri: str, work: Path, concurrency: int) -> dict:
    """Run one step in this process; return its own timing (imports excluded)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config(concurrency)
    if step == "manifest":
        from components.validate import build_manifest, write_manifest

        started = time.perf_counter()
        rows = build_manifest(data_uri, cfg)
        write_manifest(work / "manifest.jsonl", rows)
        return {"seconds": time.perf_counter() - started, "items": len(rows)}
    if step == "augment":
        from components.augment import augment_dataset
        from components.validate import read_manifest

        rows = read_manifest(work / "manifest.jsonl")
        started = time.perf_counter()
        spec = augment_dataset(data_uri, work / "examples", cfg, rows)
        return {"seconds": time.perf_counter() - started, "items": sum(spec["images"].values()),
                "records": sum(spec["counts"].values())}  # fmt: skip
    if step == "train_head":
        from components.train_head import train_head_model

        started = time.perf_counter()
        result = train_head_model(work / "examples", work / "head", cfg)
        return {"seconds": time.perf_counter() - started,
                "feature_seconds": result.feature_seconds, "head_seconds": result.head_seconds}  # fmt: skip
    if step == "floor":
        import keras

        from components import examples
        from components.backbones import build_base

        started = time.perf_counter()
        base = build_base(cfg.base, image_size=96, channels=3, weights=cfg.weights)
        pooled = keras.Sequential([base, keras.layers.GlobalAveragePooling2D()])
        records = examples.dataset(work / "examples", "train").concatenate(
            examples.dataset(work / "examples", "val")
        )
        features = pooled.predict(records.map(lambda x, y: x).batch(256).prefetch(2), verbose=0)
        return {"seconds": time.perf_counter() - started, "records": len(features)}
    raise ValueError(f"Received `step={step!r}`: expected one of {STEPS}")


def child_emulator() -> None:
    """A GCS emulator server in its own process (its CPU is not the client's GIL).

    The emulator's stock server handles one connection at a time, closes it after each
    answer and queues at most 5 connections: concurrent clients then wait on refused SYNs
    (1 s retransmits). A bucket does not behave like that, so here it serves each
    connection on its own thread, with Nagle off (no 40 ms delayed-ACK stalls)."""
    import http.server

    from gcp_storage_emulator.server import RequestHandler, create_server

    class ThreadedServer(http.server.ThreadingHTTPServer):
        request_queue_size = 128

    http.server.HTTPServer = ThreadedServer  # the emulator builds its server from this name
    RequestHandler.disable_nagle_algorithm = True

    from tests.conftest import free_port

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    print(f"http://127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


def child_proxy(upstream: str, latency_ms: float) -> None:
    """The fault-injecting proxy with no failures and a fixed latency per request."""
    from tests.faults import FlakyProxy

    with FlakyProxy(upstream, every=0, latency=latency_ms / 1000) as proxy:
        print(proxy.address, flush=True)
        sys.stdin.read()


# --- the parent -----------------------------------------------------------------------------


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run ``python -m benchmarks.scale --child ...``; return its JSON plus wall time and peak
    RSS (os.wait4 gives this child's own rusage, not the maximum over all children)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--child", *args],
                               stdout=subprocess.PIPE, env={**os.environ, **(env or {})})  # fmt: skip
    out = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"child {args} failed with exit code {process.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def server(args: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--child", *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    return process, process.stdout.readline().decode().strip()


def stop(process: subprocess.Popen) -> None:
    process.stdin.close()
    process.wait(timeout=30)


def write_dataset(uri: str, n: int, concurrency: int) -> int:
    """N/10 Fashion-MNIST training images per class as PNG class folders under ``uri``."""
    from common import storage
    from components import datasets

    images, labels = datasets.load_fashion_mnist("train")
    picked = datasets.pick_per_class(labels, list(range(10)), n // 10, seed=0)
    files = (
        (storage.join(uri, datasets.FASHION_MNIST_CLASSES[c], f"fm_{i:05d}.png"),
         datasets.encode_png(images[i]))
        for c, indices in picked.items() for i in indices
    )  # fmt: skip
    return storage.write_many(files, concurrency=concurrency)


def measure_local(n: int, work: Path, concurrency: int, steps=STEPS) -> dict:
    data = work / "data"
    if not data.exists():
        write_dataset(str(data), n, concurrency)
    results = {}
    for step in steps:
        result = run_child([step, "--data", str(data), "--work", str(work),
                            "--concurrency", str(concurrency)])  # fmt: skip
        result["images_per_second"] = n / result["seconds"]
        result["ms_per_image"] = 1000 * result["seconds"] / n
        results[step] = result
        print(f"N={n} {step}: {result['seconds']:.1f}s in the step ({result['wall_seconds']:.1f}s "
              f"process), {result['images_per_second']:.1f} images/s, {result['ms_per_image']:.2f} "
              f"ms/image, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    return results


def measure_gcs(n: int, work: Path, latency_ms: float, concurrency: int, repeats: int) -> dict:
    """Reads through the pool vs one at a time, alternating; then manifest and augment
    reading the bucket through the latency proxy."""
    from common import storage

    emulator, emulator_url = server(["emulator"])
    proxy, proxy_url = server(
        ["proxy", "--upstream", emulator_url, "--latency-ms", str(latency_ms)]
    )
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator_url  # upload straight to the emulator
        storage.gcs_client().create_bucket("scale")
        uri = "gs://scale/data"
        write_dataset(uri, n, concurrency)
        os.environ["STORAGE_EMULATOR_HOST"] = proxy_url  # from here on, every request waits
        storage._client.cache_clear()
        uris = [f.uri for f in storage.list_files(uri, concurrency=concurrency)]
        sample = uris[: min(len(uris), 300)]  # one-at-a-time reads of every file take too long
        pairs = []
        for _ in range(repeats):
            timings = {}
            for label, workers in (("one_at_a_time", 1), ("pool", concurrency)):
                started = time.perf_counter()
                read = sum(len(b) for b in storage.read_many(sample, concurrency=workers))
                timings[label] = len(sample) / (time.perf_counter() - started)
            pairs.append(timings)
            print(f"GCS reads at {latency_ms:.0f} ms/request: one at a time {timings['one_at_a_time']:.1f} "
                  f"files/s, pool of {concurrency} {timings['pool']:.1f} files/s "
                  f"({timings['pool'] / timings['one_at_a_time']:.1f}x; {read} bytes)", flush=True)  # fmt: skip
        ratios = sorted(p["pool"] / p["one_at_a_time"] for p in pairs)
        steps = {}
        for step in ("manifest", "augment"):
            result = run_child([step, "--data", uri, "--work", str(work), "--concurrency",
                                str(concurrency)], env={"STORAGE_EMULATOR_HOST": proxy_url})  # fmt: skip
            result["images_per_second"] = n / result["seconds"]
            result["ms_per_image"] = 1000 * result["seconds"] / n
            steps[step] = result
            print(f"GCS N={n} {step}: {result['seconds']:.1f}s, {result['images_per_second']:.1f} "
                  f"images/s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
        return {"latency_ms": latency_ms, "concurrency": concurrency, "files_read": len(sample),
                "reads_per_second": pairs, "pool_speedup_median": ratios[len(ratios) // 2],
                "pool_speedup_min": ratios[0], "pool_speedup_max": ratios[-1], "steps": steps}  # fmt: skip
    finally:
        stop(proxy)
        stop(emulator)


def local_summary(local: dict, measured=STEPS) -> dict:
    small, large = min(local), max(local)
    steps = [s for s in measured if s != "floor"]  # the pipeline's steps; the floor is a reference
    summary = {
        "peak_rss_mb": {n: {s: round(r[s]["peak_rss_mb"]) for s in measured} for n, r in local.items()},
        "ms_per_image": {n: {s: round(r[s]["ms_per_image"], 3) for s in measured} for n, r in local.items()},
        "seconds": {n: {s: round(r[s]["seconds"], 1) for s in measured} for n, r in local.items()},
        "rss_growth_mb": {s: round(local[large][s]["peak_rss_mb"] - local[small][s]["peak_rss_mb"])
                          for s in steps},
        "ms_per_image_ratio": {s: round(local[large][s]["ms_per_image"] / local[small][s]["ms_per_image"], 2)
                               for s in steps},
    }  # fmt: skip
    if "floor" in measured:
        summary["train_head_over_floor"] = {
            n: round(r["train_head"]["seconds"] / r["floor"]["seconds"], 2) for n, r in local.items()}  # fmt: skip
    if "train_head" in measured:
        # the same ratio inside one process (the feature pass is the floor's work), which the
        # other helpers' load on the shared cores cannot skew between two processes
        summary["train_head_over_its_feature_pass"] = {
            n: round(r["train_head"]["seconds"] / r["train_head"]["feature_seconds"], 2)
            for n, r in local.items()}  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,30000", help="N images, comma-separated")
    parser.add_argument("--gcs-sizes", default="1000", help="N for the GCS part ('' to skip)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating GCS read pairs")
    parser.add_argument("--work", default=".graft/bench-scale")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="local steps to measure, in order (the floor is a reference pass, "
                             "not a pipeline step: leave it out to save its time at large N)")  # fmt: skip
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind = args.child[0]
        if kind == "emulator":
            return child_emulator()
        if kind == "proxy":
            return child_proxy(args.upstream, args.latency_ms)
        print(json.dumps(child_step(kind, args.data, Path(args.work), args.concurrency)))
        return None

    sizes = [int(s) for s in args.sizes.split(",") if s]
    gcs_sizes = [int(s) for s in args.gcs_sizes.split(",") if s]
    work = Path(args.work).resolve()
    print(f"base: {BASE_NOTE}; image_size 96, channels 3, views 4, head_max_epochs 2; "
          f"io_concurrency {args.concurrency}; sizes {sizes}; GCS sizes {gcs_sizes}", flush=True)  # fmt: skip
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown {unknown}; expected some of {','.join(STEPS)}")
    local = {n: measure_local(n, work / f"local-{n}", args.concurrency, steps) for n in sizes}
    gcs = {n: measure_gcs(n, work / f"gcs-{n}", args.latency_ms, args.concurrency, args.repeats)
           for n in gcs_sizes}  # fmt: skip

    summary = {
        "base": BASE_NOTE,
        "image_size": 96, "channels": 3, "views": 4, "head_max_epochs": 2,
        "io_concurrency": args.concurrency, "sizes": sizes,
        "gcs": {n: {"pool_speedup_median": round(g["pool_speedup_median"], 1),
                    "pool_speedup_min": round(g["pool_speedup_min"], 1),
                    "pool_speedup_max": round(g["pool_speedup_max"], 1),
                    "latency_ms": g["latency_ms"], "files_read": g["files_read"],
                    "ms_per_image": {s: round(v["ms_per_image"], 3) for s, v in g["steps"].items()},
                    "peak_rss_mb": {s: round(v["peak_rss_mb"]) for s, v in g["steps"].items()}}
                for n, g in gcs.items()},
    }  # fmt: skip
    if local:
        summary.update(local_summary(local, steps))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
