"""Request payload: encoded JPEG bytes (serving_default) vs a float32 pixel tensor
(predict_pixels) at 224x224x3, through `graft serve` over gRPC on loopback, one run.

    .venv/bin/python -m benchmarks.payload [--requests 100]

Prints request sizes, client+server time per request, and ratios; the last line is JSON.
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import export_tiny_model, percentile_ms, photo_like


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    import tensorflow as tf
    from PIL import Image
    from tensorflow_serving.apis import predict_pb2

    from serving.client import PredictClient
    from serving.server import ModelServer

    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    export_tiny_model(work / "repo", "payload", 224)
    server = ModelServer(str(work / "repo"), "payload", max_message_mb=16)
    target = f"127.0.0.1:{server.start(0)}"
    client = PredictClient(target, max_receive_mb=16)

    pixels = photo_like(224)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()

    def jpeg_request():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "payload"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([jpeg], dtype=tf.string))
        return request

    def pixels_request():
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "payload", "predict_pixels"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels[None].astype("float32")))
        return request

    results = {}
    for name, build in (("jpeg", jpeg_request), ("float32", pixels_request)):
        client.predict_raw(build())  # warm
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            client.predict_raw(build())  # building the request (serialising) is part of the cost
            times.append(time.perf_counter() - started)
        results[name] = {
            "bytes": build().ByteSize(),
            "p50_ms": percentile_ms(times, 50),
            "p99_ms": percentile_ms(times, 99),
        }
    server.stop(1)

    size_ratio = results["float32"]["bytes"] / results["jpeg"]["bytes"]
    time_ratio = results["float32"]["p50_ms"] / results["jpeg"]["p50_ms"]
    for name, r in results.items():
        print(
            f"{name:8} request {r['bytes']:>8} bytes  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
        )
    print(f"float32/jpeg: payload {size_ratio:.1f}x larger, p50 time {time_ratio:.2f}x")
    print(json.dumps({"payload_ratio": round(size_ratio, 1), "time_ratio_p50": round(time_ratio, 2),
                      "jpeg_bytes": results["jpeg"]["bytes"], "float32_bytes": results["float32"]["bytes"],
                      "jpeg_p50_ms": round(results["jpeg"]["p50_ms"], 2),
                      "float32_p50_ms": round(results["float32"]["p50_ms"], 2), "requests": args.requests}))  # fmt: skip


if __name__ == "__main__":
    main()
