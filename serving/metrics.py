"""TF Serving's Prometheus metrics for `graft serve`: the same names, labels and text format.

    echo 'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }' > mon.txt
    graft serve --model-repo R --model-name M --monitoring-config-file mon.txt
    curl http://127.0.0.1:8501/monitoring/prometheus/metrics

Read from TF Serving 2.20 (servables/tensorflow/util.cc, saved_model_warmup_util.cc,
model_servers/http_server.cc, prediction_service_impl.cc, util/prometheus_exporter.cc) and
TensorFlow's saved_model loader:

- ``/tensorflow/serving/request_count`` {model_name, status}: every Predict/Classify/Regress
  over gRPC and every REST request; status is the canonical code name (OK, NOT_FOUND, ...).
- ``/tensorflow/serving/request_latency`` {model_name, API, entrypoint}: successful requests
  only, microseconds; API is the gRPC method (Predict) or the REST verb (predict, "" for a
  status GET), entrypoint GRPC or REST.
- ``/tensorflow/serving/runtime_latency`` {model_name, API, runtime}: the model call itself;
  runtime is "TF1", the label TF Serving gives its SavedModel session runtime.
- ``/tensorflow/serving/model_warmup_latency`` {model_path, status} and
  ``/tensorflow/serving/model_warmup_records_read`` {model_path, status}: status is
  TF Serving's status string ("OK" on success).
- ``/tensorflow/cc/saved_model/load_attempt_count`` {model_path, status: success|fail} and
  ``/tensorflow/cc/saved_model/load_latency`` {model_path}: microseconds, successful loads.

TF Serving labels none of these by version or signature; graft adds
``/graft/serving/request_count`` {model_name, version, signature_name, API, entrypoint,
status} so a canary's version can be told apart (a name TF Serving does not use, so no
TF Serving dashboard is confused by it).

Names are sanitised as prometheus_exporter.cc does ("/" and any character outside
[a-zA-Z0-9_] become ":"), histograms use TensorFlow's Exponential(10, 1.8, 33) buckets, and
the page lists metrics sorted by name, as TF Serving's std::map does.
"""

import bisect
import re
import sys
import threading
import time
from functools import partial
from types import SimpleNamespace

import grpc

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
RUNTIME = "TF1"  # TF Serving's runtime label for SavedModel sessions (predict_util.cc)
METERED_APIS = ("Predict", "Classify", "Regress")  # what prediction_service_impl.cc counts


def exponential_buckets(scale: float, growth: float, count: int) -> list[float]:
    """TensorFlow's monitoring::Buckets::Exponential: limits, then DBL_MAX as the last one
    (multiplied step by step, as TensorFlow does, so the limits print alike)."""
    limits = [scale]
    while len(limits) < count:
        limits.append(limits[-1] * growth)
    return limits + [sys.float_info.max]


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)  # up to ~25 minutes in microseconds


def metric_name(name: str) -> str:
    """prometheus_exporter.cc's GetPrometheusMetricName."""
    name = re.sub(r"[^a-zA-Z0-9_]", ":", name)
    return f"_{name}" if name[:1].isdigit() else name


def label_name(name: str) -> str:
    """prometheus_exporter.cc's SanatizeLabelName."""
    name = re.sub(r"[^a-zA-Z0-9]", "_", name)
    return f"_{name}" if name[:1].isdigit() else name


def label_value(value: str) -> str:
    """prometheus_exporter.cc's SanitizeLabelValue: backslash and double quote escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _number(value: float) -> str:
    """absl::StrCat's rendering of a double (six significant digits)."""
    return f"{value:g}"


class Counter:
    def __init__(self, name: str, labels: tuple[str, ...]):
        self.name, self.labels = name, labels
        self.cells: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def add(self, *values: str, by: int = 1) -> None:
        with self._lock:
            self.cells[values] = self.cells.get(values, 0) + by

    def lines(self) -> list[str]:
        name = metric_name(self.name)
        lines = [f"# TYPE {name} counter"]
        with self._lock:
            cells = list(self.cells.items())
        for values, count in cells:
            lines.append(f"{name}{{{_labels(self.labels, values)}}} {count}")
        return lines


class Histogram:
    def __init__(self, name: str, labels: tuple[str, ...], limits: list[float] = LATENCY_BUCKETS):
        self.name, self.labels, self.limits = name, labels, limits
        self.cells: dict[tuple, list] = {}  # values -> [bucket counts, sum]
        self._lock = threading.Lock()

    def observe(self, value: float, *values: str) -> None:
        # TensorFlow's histogram puts a value in the first bucket whose limit exceeds it.
        index = min(bisect.bisect_right(self.limits, value), len(self.limits) - 1)
        with self._lock:
            counts, total = self.cells.get(values, ([0] * len(self.limits), 0.0))
            counts[index] += 1
            self.cells[values] = (counts, total + value)

    def lines(self) -> list[str]:
        name = metric_name(self.name)
        lines = [f"# TYPE {name} histogram"]
        with self._lock:
            cells = [
                (values, list(counts), total) for values, (counts, total) in self.cells.items()
            ]
        for values, counts, total in cells:
            labels = _labels(self.labels, values)
            prefix = f"{name}_bucket{{{labels}{',' if labels else ''}"
            cumulative = 0
            for i, count in enumerate(counts):
                cumulative += count
                limit = _number(self.limits[i]) if i < len(counts) - 1 else "+Inf"
                lines.append(f'{prefix}le="{limit}"}} {cumulative}')
            lines.append(f"{name}_sum{{{labels}}} {_number(total)}")
            lines.append(f"{name}_count{{{labels}}} {cumulative}")
        return lines


def _labels(names: tuple[str, ...], values: tuple) -> str:
    return ",".join(
        f'{label_name(n)}="{label_value(str(v))}"' for n, v in zip(names, values, strict=True)
    )


class Metrics:
    """One server's metrics; ``page()`` is the Prometheus text TF Serving would answer."""

    def __init__(self):
        self.request_count = Counter("/tensorflow/serving/request_count", ("model_name", "status"))
        self.request_latency = Histogram(
            "/tensorflow/serving/request_latency", ("model_name", "API", "entrypoint")
        )
        self.runtime_latency = Histogram(
            "/tensorflow/serving/runtime_latency", ("model_name", "API", "runtime")
        )
        self.warmup_latency = Histogram(
            "/tensorflow/serving/model_warmup_latency", ("model_path", "status")
        )
        self.warmup_records = Counter(
            "/tensorflow/serving/model_warmup_records_read", ("model_path", "status")
        )
        self.load_attempts = Counter(
            "/tensorflow/cc/saved_model/load_attempt_count", ("model_path", "status")
        )
        self.load_latency = Counter("/tensorflow/cc/saved_model/load_latency", ("model_path",))
        # TF Serving's request_logger.cc counter; graft's drop count (a full writer queue).
        self.request_log_count = Counter(
            "/tensorflow/serving/request_log_count", ("model_name", "status_code")
        )
        self.request_log_dropped = Counter("/graft/serving/request_log_dropped", ("model_name",))
        self.versioned_requests = Counter(
            "/graft/serving/request_count",
            ("model_name", "version", "signature_name", "API", "entrypoint", "status"),
        )

    def record_request(
        self, model: str, api: str, entrypoint: str, code: grpc.StatusCode, micros: float,
        *, version: str = "", signature: str = "",
    ) -> None:  # fmt: skip
        self.request_count.add(model, code.name)
        if code == grpc.StatusCode.OK:
            self.request_latency.observe(micros, model, api, entrypoint)
        if api.lower() in ("predict", "classify", "regress"):
            self.versioned_requests.add(model, version, signature, api, entrypoint, code.name)

    def page(self) -> str:
        metrics = [v for v in vars(self).values() if isinstance(v, Counter | Histogram)]
        lines = []
        for metric in sorted(metrics, key=lambda m: m.name):
            if metric.cells:  # TF Serving lists only metrics that have points
                lines += metric.lines()
        return "\n".join(lines) + "\n"


class TimedModel:
    """A loaded SessionModel (serving/savedmodel.py) whose session runs record their wall
    time as runtime_latency, under the API that ran them (TF Serving records Predict,
    Classify and Regress; ``api=None``, as for MultiInference, records nothing)."""

    def __init__(self, model, metrics: Metrics, model_name: str):
        self._model, self._metrics, self._name = model, metrics, model_name

    def run(
        self, feeds: list[str], fetches: list[str], values: list, *, api: str | None = "Predict"
    ):
        start = time.perf_counter()
        result = self._model.run(feeds, fetches, values)
        if api is not None:
            micros = (time.perf_counter() - start) * 1e6
            self._metrics.runtime_latency.observe(micros, self._name, api, RUNTIME)
        return result

    def signature(self, name: str):
        """The signature, run through this model (so batched Predict calls are timed too)."""
        from serving.savedmodel import Signature

        return Signature(name, self._model.signature_defs[name], self)

    def __getattr__(self, name):  # signature_defs, path, session, close, ...
        return getattr(self._model, name)


class StatusContext:
    """A servicer context that remembers the status a servicer set or aborted with.

    With ``context=None`` it stands alone (REST): abort raises ``Aborted``; otherwise it
    forwards to the real gRPC context, which raises as gRPC does."""

    class Aborted(Exception):
        def __init__(self, code: grpc.StatusCode, details: str):
            super().__init__(details)
            self.code, self.details = code, details

    def __init__(self, context=None):
        self._context = context
        self.code, self.details = grpc.StatusCode.OK, ""

    def abort(self, code, details):
        self.code, self.details = code, details
        if self._context is None:
            raise StatusContext.Aborted(code, details)
        self._context.abort(code, details)

    def set_code(self, code):
        self.code = code
        if self._context is not None:
            self._context.set_code(code)

    def set_details(self, details):
        self.details = details
        if self._context is not None:
            self._context.set_details(details)

    def __getattr__(self, name):  # time_remaining, invocation_metadata, is_active, ...
        if self._context is None:
            raise AttributeError(f"REST requests have no gRPC context attribute {name!r}")
        return getattr(self._context, name)


def _metered_call(method, metrics: Metrics, api: str, entrypoint: str, request, context):
    status = StatusContext(context)
    start = time.perf_counter()
    try:
        response = method(request, status)
    except BaseException:
        code = status.code if status.code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN
        metrics.record_request(
            request.model_spec.name, api, entrypoint, code, 0.0,
            signature=request.model_spec.signature_name,
        )  # fmt: skip
        raise
    micros = (time.perf_counter() - start) * 1e6
    spec = response.model_spec if hasattr(response, "model_spec") else request.model_spec
    metrics.record_request(
        request.model_spec.name, api, entrypoint, status.code, micros,
        version=str(spec.version.value) if spec.HasField("version") else "",
        signature=spec.signature_name or request.model_spec.signature_name,
    )  # fmt: skip
    return response


def metered(servicer, metrics: Metrics, entrypoint: str):
    """An object with ``servicer``'s methods, Predict/Classify/Regress counted and timed: the
    servicer's bodies stay untouched (add_*Servicer_to_server reads only the methods)."""
    wrapped = SimpleNamespace(
        **{name: getattr(servicer, name) for name in dir(servicer) if name[:1].isupper()}
    )
    for api in METERED_APIS:
        method = partial(_metered_call, getattr(servicer, api), metrics, api, entrypoint)
        setattr(wrapped, api, method)
    return wrapped


def read_monitoring_config(path: str | None) -> str | None:
    """The Prometheus page's path from a TF Serving MonitoringConfig text proto, or None when
    there is no file or it does not enable Prometheus."""
    if path is None:
        return None
    from google.protobuf import text_format

    config = _monitoring_config_class()()
    try:
        with open(path) as fh:
            text_format.Parse(fh.read(), config)
    except text_format.ParseError as err:
        raise ValueError(
            f"--monitoring-config-file {path}: not a MonitoringConfig text proto ({err}); "
            'expected e.g. prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }'
        ) from None
    if not config.prometheus_config.enable:
        return None
    wanted = config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH
    if not wanted.startswith("/"):
        raise ValueError(f"--monitoring-config-file {path}: path {wanted!r} must start with /")
    return wanted


def _monitoring_config_class():
    """tensorflow_serving/config/monitoring_config.proto, which the pip package lacks."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(
        name="graft_monitoring_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=8, label=1)  # bool, optional
    prometheus.field.add(name="path", number=2, type=9, label=1)  # string
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config", number=1, type=11, label=1,
        type_name=".tensorflow.serving.PrometheusConfig",
    )  # fmt: skip
    pool.Add(proto)
    descriptor = pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    return message_factory.GetMessageClass(descriptor)
