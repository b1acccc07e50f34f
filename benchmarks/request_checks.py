"""Issue 23's oversized-request class and issue 27's answer encoding, through `graft serve`
over gRPC on loopback, one run.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.request_checks

1. A 61-byte Predict declaring [1e6, 1e6, 8, 1] float pixels and a ~60-byte one declaring
   [1, 3e7] strings: time to the INVALID_ARGUMENT and the server process's peak-RSS growth
   (before the checks: UNKNOWN after a 3 PiB allocation attempt, and 2 s + 230 MB).
2. Encoding one [N, 1000] float32 output as TF Serving's default typed fields vs
   tensor_content (--enable-serialization-as-tensor-content), side by side.
The last line is one JSON object.
"""

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import export_tiny_model, percentile_ms


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    import grpc
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.server import ModelServer
    from serving.tensors import response_proto

    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    export_tiny_model(work / "repo", "checks", 32)
    server = ModelServer(str(work / "repo"), "checks")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{server.start(0)}")
    )

    def request(signature, alias, proto):
        r = predict_pb2.PredictRequest()
        r.model_spec.name, r.model_spec.signature_name = "checks", signature
        r.inputs[alias].CopyFrom(proto)
        return r

    pixels = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    for size in (10**6, 10**6, 8, 1):
        pixels.tensor_shape.dim.add().size = size
    strings = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"])
    for size in (1, 30_000_000):
        strings.tensor_shape.dim.add().size = size
    refusals = {}
    for name, req in (("huge_pixels", request("predict_pixels", "pixels", pixels)),
                      ("many_strings", request("serving_default", "images", strings))):  # fmt: skip
        before, started = _peak_rss_mb(), time.perf_counter()
        try:
            stub.Predict(req, timeout=60)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        refusals[name] = {"bytes": req.ByteSize(), "code": code,
                          "ms": round((time.perf_counter() - started) * 1e3, 2),
                          "peak_rss_growth_mb": round(_peak_rss_mb() - before, 1)}  # fmt: skip
        print(f"{name:13} {req.ByteSize():>4} bytes -> {code} in {refusals[name]['ms']} ms, "
              f"peak RSS +{refusals[name]['peak_rss_growth_mb']} MB")  # fmt: skip
    server.stop(1)

    encoding = {}
    for rows in (1, 100):
        output = np.random.default_rng(0).random((rows, 1000), dtype=np.float32)
        for label, content in (("typed_fields", False), ("tensor_content", True)):
            times = []
            for _ in range(50):
                started = time.perf_counter()
                proto = response_proto(output, tensor_content=content)
                proto.SerializeToString()
                times.append(time.perf_counter() - started)
            encoding[f"{label}_{rows}x1000_p50_ms"] = round(percentile_ms(times, 50), 3)
        print(f"[{rows}, 1000] float32 output: typed fields "
              f"{encoding[f'typed_fields_{rows}x1000_p50_ms']} ms, tensor_content "
              f"{encoding[f'tensor_content_{rows}x1000_p50_ms']} ms (p50 of 50)")  # fmt: skip
    print(json.dumps({"refusals": refusals, "encoding": encoding}))


if __name__ == "__main__":
    main()
