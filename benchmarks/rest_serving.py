"""REST against gRPC on the realistic model, and what infra-validation costs per push; one run.

    .venv/bin/python -m benchmarks.rest_serving [--requests 120] [--rounds 4] [--pushes 2] [--images 32]

1. One `graft serve` (in this process) on MobileNetV2 + graft's head at 224 px (random
   weights: cost, not accuracy), exported the way push exports it. One-image requests, a
   224-px photo-like PNG, answered over gRPC (PredictClient) and over REST (RestClient:
   JSON, {"b64": ...}), the two alternated in ``--rounds`` blocks so the machine's drifting
   load falls on both alike. p50/p99 per API and REST/gRPC ratios.
2. serving/infra_validation.py's ``infra_validate`` on the same export (with 4 warmup
   records, as push writes), ``--pushes`` times:
   wall seconds per push (child `graft serve` start, load, warmup, ``--images`` golden
   requests over each API, stop), and the first-request-after-warmup figure it records.
The last line is JSON; it carries the load average at the start and the end.
"""

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import export_mobilenet_model, percentile_ms, photo_like

SIZE = 224


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pushes", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    if min(args.requests, args.rounds, args.pushes, args.images) < 1:
        raise SystemExit(f"Received {vars(args)}: every count must be >= 1")
    import numpy as np
    from PIL import Image

    from serving.client import PredictClient, RestClient
    from serving.export import write_warmup
    from serving.infra_validation import infra_validate
    from serving.server import ModelServer

    start_load = load_average()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-rest-"))
    export_dir = export_mobilenet_model(work / "repo", "bench", SIZE)
    buffer = io.BytesIO()
    Image.fromarray(photo_like(SIZE)).save(buffer, "PNG")
    image = buffer.getvalue()

    server = ModelServer(str(work / "repo"), "bench")
    grpc_port = server.start(0, rest_api_port=0)
    clients = {
        "grpc": PredictClient(f"127.0.0.1:{grpc_port}", timeout=120),
        "rest": RestClient(f"127.0.0.1:{server.rest_port}", timeout=120),
    }
    for client in clients.values():  # each path answers once before timing
        client.predict_images("bench", [image])
    latency = {side: [] for side in clients}
    for round_ in range(args.rounds):
        for side in clients if round_ % 2 == 0 else reversed(list(clients)):
            for _ in range(-(-args.requests // args.rounds)):
                started = time.perf_counter()
                clients[side].predict_images("bench", [image])
                latency[side].append(time.perf_counter() - started)
    server.stop(1)
    figures = {
        side: {"p50_ms": round(percentile_ms(v, 50), 2), "p99_ms": round(percentile_ms(v, 99), 2)}
        for side, v in latency.items()
    }
    for side, f in figures.items():
        print(
            f"over {side:4}: p50 {f['p50_ms']} ms p99 {f['p99_ms']} ms ({len(latency[side])} requests)"
        )

    pixels = np.stack([photo_like(SIZE, seed=i) for i in range(args.images)])
    write_warmup(export_dir, [image] * 4)  # as push exports: 4 warmup records
    pushes = []
    for _ in range(args.pushes):
        started = time.perf_counter()
        record = infra_validate(export_dir, work / "bench-keras", pixels)
        pushes.append({"seconds": round(time.perf_counter() - started, 1), **record})
        print(
            f"infra-validation: {pushes[-1]['seconds']} s, first request {record['first_request_ms']} ms "
            f"= {record['first_request_over_p50']}x the gRPC p50 {record['grpc']['p50_ms']} ms"
        )
    out = {
        "model": f"mobilenet_v2 {SIZE}px, batch 1 PNG",
        "grpc": figures["grpc"],
        "rest": figures["rest"],
        "rest_over_grpc_p50": round(figures["rest"]["p50_ms"] / figures["grpc"]["p50_ms"], 3),
        "rest_over_grpc_p99": round(figures["rest"]["p99_ms"] / figures["grpc"]["p99_ms"], 3),
        "infra_validation_seconds": [p["seconds"] for p in pushes],
        "infra_validation_first_over_p50": [p["first_request_over_p50"] for p in pushes],
        "infra_validation_images": args.images,
        "load_average_start": start_load,
        "load_average_end": load_average(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
