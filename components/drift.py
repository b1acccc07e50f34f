"""Drift: do the images clients send still look like the images the model was trained on?

    graft watch --data D --model-repo R --model-name M --on-drift --request-log LOGS

At push, a version stores its own base's embeddings of a sample of the training images
(``graft_reference_embeddings.npy`` + ``.json``, beside saved_model.pb). The embeddings
come from the version's ``embeddings`` signature (serving/export.py): the exported graph's
decoding, resizing and base, so reference and requests are embedded by the very same
graph, fine-tuned weights included, with no Keras, base file or network needed later.

The watcher reads the request log (serving/request_log.py: PredictionLog files), embeds
each logged ``serving_default`` request's images with the version that answered it, and
compares the newest ``window`` of them with that version's reference by a kernel two-sample
test: MMD (RBF kernel, bandwidth by the median heuristic on the pooled sample) with a
permutation p-value. Drift is an alarm when p < ``alpha``. Hysteresis: after an alarm the
detector is disarmed until a full window of requests logged after the alarmed one tests
normal (p >= ``rearm_p``), so one burst, however long, alarms once (also across a watcher
restart: the recorded alarm disarms it); a retrained version starts its own windows
against its own reference.
Every alarm is recorded in ``<model repo>/<model>/.drift/`` with its figures.

The pure parts (``mmd_test``, ``DriftDetector``) take arrays; ``DriftMonitor`` adds the
repository and the log.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common import model_repository as repository
from common import storage

log = logging.getLogger(__name__)
REFERENCE_FILE = "graft_reference_embeddings.npy"
REFERENCE_INFO_FILE = "graft_reference_embeddings.json"
EMBEDDINGS_SIGNATURE = "embeddings"  # serving/export.py: images (tf.string) -> embeddings
DRIFT_DIR = ".drift"  # one JSON record per alarm, beside the versions


@dataclass(frozen=True)
class DriftConfig:
    # Logged requests per test: 300 detected blur, +40% brightness and an unseen class at
    # 20% of traffic on Fashion-MNIST within 500 requests (benchmarks/RESULTS.md).
    window: int = 300
    # A new test after this many new requests: the detection delay is at most this on
    # top of what the window needs, and tests stay few (~1 per 100 requests).
    step: int = 100
    # p below this is drift. Tests repeat all week: 0.001 gave no alarm over 7 simulated
    # days of unshifted traffic (benchmarks/drift.py), where 0.05 would alarm about daily.
    alpha: float = 0.001
    # Permutations for the p-value: its floor is 1/(permutations + 1), so it must be well
    # below alpha; a test stops early once p cannot fall below alpha.
    permutations: int = 2000
    # Hysteresis: after an alarm, no new alarm for the same version until a full window of
    # later requests tests p >= this (traffic looked normal again): a burst that lasts
    # through many windows, or a retrain that does not fix it, alarms once.
    rearm_p: float = 0.05
    # Reference images embedded at push (training originals, a seeded sample).
    reference_size: int = 1000
    seed: int = 0


@dataclass
class MMDResult:
    statistic: float  # biased MMD^2 of window vs reference
    p_value: float
    bandwidth: float  # the RBF sigma the median heuristic chose
    permutations: int  # run (fewer than asked when stopped early)


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", z, z)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * (z @ z.T), 0.0)


def median_bandwidth(squared: np.ndarray) -> float:
    """The median heuristic: sigma = median pairwise distance over the pooled sample."""
    upper = squared[np.triu_indices_from(squared, k=1)]
    median = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    return float(np.sqrt(median))


def mmd_test(
    reference: np.ndarray,
    window: np.ndarray,
    *,
    permutations: int = DriftConfig.permutations,
    alpha: float = DriftConfig.alpha,
    seed: int = 0,
    batch: int = 100,
) -> MMDResult:
    """MMD two-sample test of ``window`` against ``reference`` (rows are embeddings).

    MMD^2 = a' K a with a = 1/m on the window's rows and -1/n on the reference's; the
    permutation distribution relabels the pooled rows, ``batch`` relabellings per matrix
    product. p = (1 + #{permuted >= observed}) / (1 + permutations run)."""
    reference = np.asarray(reference, np.float64)
    window = np.asarray(window, np.float64)
    if len(reference) < 2 or len(window) < 2:
        raise ValueError(
            f"An MMD test needs >= 2 rows on each side (got {len(window)} and {len(reference)})"
        )
    pooled = np.concatenate([window, reference])
    squared = _squared_distances(pooled)
    sigma = median_bandwidth(squared)
    kernel = np.exp(-squared / (2.0 * sigma**2))
    m, total = len(window), len(pooled)
    signs = np.concatenate([np.full(m, 1.0 / m), np.full(total - m, -1.0 / (total - m))])
    observed = float(signs @ kernel @ signs)
    rng = np.random.default_rng(seed)
    exceed, run = 0, 0
    while run < permutations:
        size = min(batch, permutations - run)
        relabelled = np.stack([rng.permutation(signs) for _ in range(size)], axis=1)
        stats = np.einsum("ij,ij->j", relabelled, kernel @ relabelled)
        exceed += int(np.sum(stats >= observed - 1e-12))
        run += size
        if (1 + exceed) / (1 + permutations) >= alpha:
            break  # p cannot fall below alpha any more: no drift, stop paying
    return MMDResult(observed, (1 + exceed) / (1 + run), sigma, run)


@dataclass
class DriftAlarm:
    version: int
    p_value: float
    statistic: float
    bandwidth: float
    window_requests: int
    reference_images: int
    alpha: float
    first_request_time: float  # timestamp_secs of the window's oldest and newest request
    last_request_time: float
    requests_seen: int  # logged requests of this version read so far
    detected_at: str = ""
    reason: str = ""


@dataclass
class DriftDetector:
    """A stream of request embeddings against one reference, tested every ``step`` new
    requests on the newest ``window``; after an alarm, only requests after it count."""

    reference: np.ndarray
    config: DriftConfig = field(default_factory=DriftConfig)
    version: int = 0
    _embeddings: list = field(default_factory=list)
    _times: list = field(default_factory=list)
    _since_test: int = 0
    _usable_from: int = 0  # index of the first request after the last alarm
    armed: bool = True  # False after an alarm, until a later full window tests normal
    tests: int = 0

    def add(self, embeddings: np.ndarray, times=None) -> DriftAlarm | None:
        """Add requests one batch at a time; the alarm if a test on the way found drift."""
        times = np.zeros(len(embeddings)) if times is None else np.asarray(times, float)
        alarm = None
        for start in range(0, len(embeddings), self.config.step):
            chunk = slice(start, start + self.config.step)
            self._embeddings.extend(np.asarray(embeddings[chunk], np.float32))
            self._times.extend(times[chunk])
            self._since_test += len(embeddings[chunk])
            alarm = alarm or self._maybe_test()
        drop = len(self._embeddings) - self.config.window
        if drop > 0:  # bounded memory: only the newest window is ever tested again
            del self._embeddings[:drop], self._times[:drop]
            self._usable_from = max(0, self._usable_from - drop)
        return alarm

    def _maybe_test(self) -> DriftAlarm | None:
        usable = len(self._embeddings) - self._usable_from
        if usable < self.config.window or self._since_test < self.config.step:
            return None
        self._since_test = 0
        self.tests += 1
        window = np.stack(self._embeddings[-self.config.window :])
        result = mmd_test(self.reference, window, permutations=self.config.permutations,
                          alpha=self.config.alpha, seed=self.config.seed + self.tests)  # fmt: skip
        if not self.armed:
            if result.p_value >= self.config.rearm_p:
                self.armed = True  # normal again: the next drift is a new one
                log.info("drift: version %d re-armed (p=%.3g)", self.version, result.p_value)
            return None
        if result.p_value >= self.config.alpha:
            return None
        self.armed = False
        self._usable_from = len(self._embeddings)  # the next window starts after this one
        times = self._times[-self.config.window :]
        return DriftAlarm(
            self.version, result.p_value, result.statistic, result.bandwidth,
            self.config.window, len(self.reference), self.config.alpha,
            float(min(times)), float(max(times)), len(self._embeddings),
            reason=f"MMD p={result.p_value:.4g} < alpha={self.config.alpha} over the last "
            f"{self.config.window} logged requests against {len(self.reference)} training images",
        )  # fmt: skip


# --- embeddings: at push and in the watcher ---------------------------------------------


def embed_images(signature, images: list[bytes], batch: int = 256) -> np.ndarray:
    """Embeddings [N, D] of encoded images through a version's ``embeddings`` signature."""
    import tensorflow as tf

    out = []
    for start in range(0, len(images), batch):
        chunk = tf.constant(images[start : start + batch], dtype=tf.string)
        out.append(signature(images=chunk)[EMBEDDINGS_SIGNATURE].numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def reference_images(examples_dir: str | Path, count: int, seed: int = 0) -> tuple[list, dict]:
    """PNG bytes of up to ``count`` training originals (no augmented views), a seeded shuffle,
    and how many per label: what the request log's images are compared with."""
    from components import examples
    from components.datasets import encode_png

    labels = examples.read_labels(examples_dir)
    images, per_label = [], {}
    ds = examples.dataset(examples_dir, "train", originals_only=True, shuffle_seed=seed)
    for image, label in ds.take(count):
        pixels = image.numpy()
        images.append(encode_png(pixels if pixels.shape[-1] == 3 else pixels[..., 0]))
        name = labels[int(label)]
        per_label[name] = per_label.get(name, 0) + 1
    return images, per_label


def write_reference(export_dir: str | Path, images: list[bytes], info: dict) -> dict | None:
    """Embed ``images`` with the export's own ``embeddings`` signature and store them beside
    it; None (and nothing written) when the export has no such signature."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    if EMBEDDINGS_SIGNATURE not in loaded.signatures:
        log.info("push: the model has no nested base: no reference embeddings for drift")
        return None
    embeddings = embed_images(loaded.signatures[EMBEDDINGS_SIGNATURE], images)
    np.save(Path(export_dir) / REFERENCE_FILE, embeddings.astype(np.float32))
    info = {**info, "count": len(embeddings), "dimensions": int(embeddings.shape[1]),
            "signature": EMBEDDINGS_SIGNATURE}  # fmt: skip
    (Path(export_dir) / REFERENCE_INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def read_reference(version_uri: str) -> np.ndarray | None:
    uri = storage.join(version_uri, REFERENCE_FILE)
    if not storage.exists(uri):
        return None
    import io

    return np.load(io.BytesIO(storage.read_bytes(uri)))


def record_alarm(model_root: str, alarm: DriftAlarm) -> str:
    """Write the alarm to ``<model_root>/.drift/<UTC>-v<version>.json``; its URI."""
    alarm.detected_at = alarm.detected_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamp = alarm.detected_at.replace("-", "").replace(":", "")
    uri = storage.join(model_root, DRIFT_DIR, f"{stamp}-v{alarm.version}.json")
    storage.write_text(uri, json.dumps(asdict(alarm), indent=2))
    return uri


def read_alarms(model_root: str) -> list[dict]:
    """Every recorded drift alarm of a model, oldest first."""
    folder = storage.join(model_root, DRIFT_DIR)
    try:
        files = storage.list_files(folder, checksums=False)
    except storage.StorageError:
        return []
    return [json.loads(storage.read_text(f.uri)) for f in files if f.relpath.endswith(".json")]


class DriftMonitor:
    """``check()`` reads new request-log files, embeds the requests of the newest version
    that has a reference, and returns a (recorded) DriftAlarm when drift is significant."""

    def __init__(self, model_repo: str, model_name: str, request_log: str,
                 config: DriftConfig = DriftConfig()):  # fmt: skip
        self.root = repository.model_root(model_repo, model_name)
        self.model_name, self.request_log, self.config = model_name, request_log, config
        self._read: set[str] = set()
        self._detector: DriftDetector | None = None
        self._signature = None
        self.skipped = 0  # logged requests drift cannot use (no images input, other version)

    def _version(self) -> int | None:
        for version in sorted(repository.complete_versions(self.root), reverse=True):
            if storage.exists(
                storage.join(repository.version_uri(self.root, version), REFERENCE_FILE)
            ):
                return version
        return None

    def _start(self, version: int) -> None:
        import tensorflow as tf

        from common.storage import download_tree

        uri = repository.version_uri(self.root, version)
        local = Path(uri) if not storage.is_gcs(uri) else download_tree(
            uri, Path(storage_temp()) / str(version)
        )  # fmt: skip
        self._signature = tf.saved_model.load(str(local)).signatures[EMBEDDINGS_SIGNATURE]
        self._detector = DriftDetector(read_reference(uri), self.config, version)
        # Hysteresis across restarts: requests up to this version's last alarm are spent.
        alarms = [a for a in read_alarms(self.root) if a.get("version") == version]
        self._spent_until = max((a["last_request_time"] for a in alarms), default=-1.0)
        self._detector.armed = not alarms  # a restart never re-alarms the same burst
        log.info("drift: version %d against %d reference images", version,
                 len(self._detector.reference))  # fmt: skip

    def check(self) -> DriftAlarm | None:
        from serving.request_log import log_files, read_prediction_logs

        version = self._version()
        if version is None:
            return None
        if self._detector is None or self._detector.version != version:
            self._start(version)
        alarm = None
        for path in log_files(self.request_log):
            if path in self._read:
                continue
            self._read.add(path)
            images, times = [], []
            for _, record in read_prediction_logs(path, model_name=self.model_name):
                request = record.predict_log.request
                answered = record.log_metadata.model_spec.version.value
                if (
                    record.WhichOneof("log_type") != "predict_log"
                    or answered != version
                    or "images" not in request.inputs
                    or record.log_metadata.timestamp_secs <= self._spent_until
                ):
                    self.skipped += 1
                    continue
                encoded = list(request.inputs["images"].string_val)
                images += encoded
                times += [record.log_metadata.timestamp_secs] * len(encoded)  # fmt: skip
            if images:
                found = self._detector.add(embed_images(self._signature, images), times)
                alarm = alarm or found
        if alarm is not None:
            uri = record_alarm(self.root, alarm)
            self._spent_until = alarm.last_request_time
            log.warning("drift: version %d: %s (recorded in %s)", version, alarm.reason, uri)
        return alarm


def storage_temp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="graft-drift-")
