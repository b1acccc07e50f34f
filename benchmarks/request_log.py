"""What `graft serve --request-log` costs in throughput, measured side by side in one run.

    .venv/bin/python -m benchmarks.request_log [--model tiny] [--clients 16] [--seconds 3] [--rounds 4]

Two servers over the same exported model (the way push exports it: serving_default takes
encoded image bytes), one without a request log and one with ``--request-log`` at sample
rate 1.0 (every request written), both loaded before the first run. ``--clients`` client
threads in a separate process send one-image requests back-to-back for ``--seconds``;
the two servers alternate over ``--rounds`` rounds (order reversed every other round) so
the machine's drifting load falls on both alike. ``tiny`` is a small conv classifier at
96 px (~1 ms a call: the logger's share is exaggerated), ``mobilenet_v2`` graft's default
base at 224 px. After the runs the logged server is stopped and its records counted: every
answered request must be in the log unless counted as dropped.

The last line is JSON: requests/s with and without the log, their ratio (goal >= 0.90),
records written and dropped, and the load average.
"""

import argparse
import io
import json
import multiprocessing
import tempfile
from pathlib import Path

from benchmarks.common import export_mobilenet_model, export_tiny_model, photo_like
from benchmarks.serving import client_run, load_average

SIZES = {"tiny": 96, "mobilenet_v2": 224}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if min(args.clients, args.rounds) < 1 or args.seconds <= 0:
        raise SystemExit("error: --clients and --rounds must be >= 1, --seconds > 0")
    from PIL import Image

    from serving.request_log import read_prediction_logs
    from serving.server import ModelServer

    start_load = load_average()
    print(f"load average {start_load} at the start", flush=True)
    work = Path(tempfile.mkdtemp(prefix="graft-bench-log-"))
    export = export_tiny_model if args.model == "tiny" else export_mobilenet_model
    export(work / "repo", "bench", SIZES[args.model])
    buffer = io.BytesIO()
    Image.fromarray(photo_like(SIZES[args.model])).save(buffer, format="JPEG", quality=90)
    image = buffer.getvalue()

    logs = work / "logs"
    servers = {
        "off": ModelServer(str(work / "repo"), "bench", max_workers=args.clients),
        "log": ModelServer(str(work / "repo"), "bench", max_workers=args.clients,
                           request_log=str(logs), log_sample_rate=1.0),
    }  # fmt: skip
    targets = {label: f"127.0.0.1:{server.start(0)}" for label, server in servers.items()}
    totals = {label: {"done": 0, "failed": 0, "seconds": 0.0} for label in servers}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: TF does not survive fork
    with context.Pool(1) as pool:
        for target in targets.values():  # every server answers once before timing
            pool.apply(client_run, (target, image, 1, 0.0))
        for round_ in range(args.rounds):
            for label in targets if round_ % 2 == 0 else reversed(list(targets)):
                run = pool.apply(client_run, (targets[label], image, args.clients, args.seconds))
                for key in totals[label]:
                    totals[label][key] += run[key]
                print(f"round {round_ + 1} {label}: {run['done'] / run['seconds']:.1f} req/s "
                      f"({run['failed']} failed)", flush=True)  # fmt: skip
    logger = servers["log"].request_log.loggers[0]
    for server in servers.values():
        server.stop(1)
    written = sum(1 for _ in read_prediction_logs(str(logs)))
    rps = {label: t["done"] / t["seconds"] for label, t in totals.items()}
    ratio = rps["log"] / rps["off"]
    print(f"{args.model}, {args.clients} clients: {rps['off']:.1f} req/s without the log, "
          f"{rps['log']:.1f} with it at rate 1.0: ratio {ratio:.3f} (goal >= 0.90); "
          f"{written} records written, {logger.dropped} dropped", flush=True)  # fmt: skip
    print(json.dumps({
        "benchmark": "request_log", "model": args.model, "clients": args.clients,
        "seconds_each": args.seconds * args.rounds, "rps_without_log": round(rps["off"], 1),
        "rps_with_log": round(rps["log"], 1), "ratio": round(ratio, 3),
        "failed": {k: t["failed"] for k, t in totals.items()}, "records_written": written,
        "records_dropped": logger.dropped, "load_average_start": start_load,
        "load_average_end": load_average(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
