"""push: export, infra-validate and publish a blessed model as a new TF Serving version.

The version layout, what makes a version complete, and how a number is claimed and
published all live in ``common/model_repository.py``: this step exports the model,
checks the export answers like the Keras model, claims the next version number
atomically (so concurrent pushes never share one), and publishes with saved_model.pb
last. A model identical (by a hash of its weights and labels) to the served version is not
pushed again; a candidate judged against another version than the one served now is
refused (it goes back to evaluation).
"""

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kfp.dsl import Artifact, Dataset, Input, Model

from common import model_repository as repository
from common import storage
from common.artifacts import EVALUATION_FILE, LABELS_FILE, MODEL_FILE, TRAINING_FILE
from components import examples
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)


class NotBlessedError(RuntimeError):
    """The pusher was handed a model its evaluation did not bless."""


@dataclass
class PushResult:
    version: int
    pushed: bool  # False when the served version already holds an identical model
    reason: str
    uri: str


def model_hash(model_dir: str | Path) -> str:
    """A hash of what the model computes (weights + labels), stable across re-saves."""
    import keras

    digest = hashlib.sha256((Path(model_dir) / LABELS_FILE).read_bytes())
    for weight in keras.models.load_model(Path(model_dir) / MODEL_FILE).weights:
        digest.update(weight.path.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


class ChampionChangedError(RuntimeError):
    """The version served now is not the one the candidate was judged against."""


def served_now(model_root: str) -> int | None:
    """The version a server serves now (the newest complete one that loads), loaded here
    exactly as evaluate loads its champion."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="graft-served-") as work:

        def load(version: int, uri: str) -> None:
            tf.saved_model.load(str(storage.download_tree(uri, Path(work, str(version)))))

        version, _, _ = repository.newest_loading(model_root, load)
    return version


def _named(version: int | None) -> str:
    return "no version (nothing served)" if version is None else f"version {version}"


def model_card(metadata: dict) -> str:
    metrics = metadata.get("metrics", {})
    return (
        f"# {metadata['model_name']} version {metadata['version']}\n\n"
        f"- base: {metadata.get('base')}\n- labels: {', '.join(metadata.get('labels', []))}\n"
        f"- test accuracy: {metrics.get('accuracy', 'n/a')} on {metrics.get('examples', '?')} images\n"
        f"- blessing: {metadata.get('blessing_reason')}\n- parent version: {metadata.get('parent_version')}\n"
        f"- data fingerprint: {metadata.get('data_fingerprint')} ({metadata.get('data_image_count')} images)\n"
        f"- created: {metadata['created_at']}\n\n"
        "Inputs: `serving_default` takes encoded JPEG/PNG bytes (`images`); `predict_pixels` takes "
        "float32 pixels 0..255. Outputs: `probabilities`, top-k `classes` and `labels`.\n"
    )


def push_model(
    model_dir: str | Path,
    evaluation_path: str | Path,
    examples_dir: str | Path,
    model_repo: str,
    model_name: str,
    config: GraftConfig,
    *,
    data_state: dict | None = None,
    verify: Callable[[int], bool] | None = None,
) -> PushResult:
    """Export, infra-validate and publish ``model_dir``; refuses an unblessed model."""
    from components.datasets import encode_png
    from serving.export import export_saved_model
    from serving.infra_validation import infra_validate

    model_dir, evaluation_path = Path(model_dir), Path(evaluation_path)
    if evaluation_path.is_dir():
        evaluation_path = evaluation_path / EVALUATION_FILE
    evaluation = json.loads(evaluation_path.read_text())
    if not evaluation.get("blessed"):
        raise NotBlessedError(f"Refusing to push an unblessed model: {evaluation.get('reason')}")
    model_root = repository.model_root(model_repo, model_name)
    content_hash = model_hash(model_dir)
    served = served_now(model_root)
    # Only the served version counts: an older one holding this model (data reverted to an
    # earlier state) is not what clients get, so the model is pushed again as the newest.
    if served is not None and (
        repository.read_metadata(model_root, served).get("content_hash") == content_hash
    ):
        log.info("push: the served version %d already holds this model; nothing pushed", served)
        return PushResult(served, False, f"identical to the served version {served}",
                          repository.version_uri(model_root, served))  # fmt: skip
    if "champion" not in evaluation:
        log.warning("push: %s does not say which version the candidate was judged against "
                    "(not written by evaluate); the champion is not re-checked", evaluation_path)  # fmt: skip
    else:
        judged = (evaluation["champion"] or {}).get("version")
        if judged != served:
            raise ChampionChangedError(
                f"Refusing to push: the candidate was judged against {_named(judged)}, but "
                f"{_named(served)} is served now (pushed or removed since evaluation). Run "
                "the pipeline again so evaluate judges the candidate against what is served."
            )
    from serving import rollout

    running = rollout.in_progress(model_root)
    if running is not None:  # a second version must not start while one is being judged
        raise rollout.RolloutError(
            f"Refusing to push: the rollout of version {running['canary']} is still "
            f"{running['state']}; wait for `graft rollout watch` to decide (or decide with "
            "`graft rollout promote|rollback`), then run again"
        )
    repository.remove_abandoned(model_repo, model_name)

    # 32 test images are enough for warmup and infra-validation: never the whole split.
    test_images = [image.numpy() for image, _ in examples.dataset(examples_dir, "test").take(32)]
    if not test_images:
        raise ValueError(
            f"No test images in {examples_dir}: nothing to warm up or infra-validate with"
        )
    test_images = np.stack(test_images)
    warmup = [
        encode_png(image if image.shape[-1] == 3 else image[..., 0]) for image in test_images[:4]
    ]
    training_path = model_dir / TRAINING_FILE
    training = json.loads(training_path.read_text()) if training_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="graft-export-") as work:
        export_dir = Path(work) / "model"
        export_saved_model(model_dir, export_dir, warmup_images=warmup, top_k=config.top_k,
                           max_pixels=config.max_pixels)  # fmt: skip
        check = infra_validate(export_dir, model_dir, test_images[:32].astype("float32"))
        log.info("push: infra-validation passed: %s", check)
        reference = _drift_reference(export_dir, examples_dir)
        parent = served
        claim = repository.claim_version(model_repo, model_name)
        try:
            state = data_state or {}
            metadata = {
                "model_name": model_name, "version": claim.version, "content_hash": content_hash,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "parent_version": parent, "pushed_by": claim.owner,
                "data_fingerprint": state.get("fingerprint", ""), "data_image_count": state.get("image_count"),
                "metrics": {k: v for k, v in evaluation["metrics"].items() if k != "confusion_matrix"},
                "blessing_reason": evaluation["reason"], "champion": evaluation.get("champion"),
                "base": training.get("base"), "chosen": training.get("chosen"), "params": {**training.get("params", {}), **config.settings()},
                "labels": examples.read_labels(examples_dir), "infra_validation": check,
                "drift_reference": reference,
            }  # fmt: skip
            (export_dir / repository.METADATA_FILE).write_text(
                json.dumps(metadata, indent=2, default=str)
            )
            (export_dir / repository.MODEL_CARD_FILE).write_text(model_card(metadata))
            if state.get("files") is not None:  # what the next run counts its changes against
                (export_dir / repository.DATA_FILES_FILE).write_text(json.dumps(state["files"]))
        except BaseException:
            repository.release(claim)
            raise
        uri = repository.publish(export_dir, claim)
    log.info("push: published version %d to %s", claim.version, uri)
    started = _start_rollout(model_repo, model_name, config, parent, claim.version)

    if verify is not None and not verify(claim.version):
        if started:  # the servers go back to stable alone before the files disappear
            rollout.enter(model_root, rollout.current(model_root), "aborted",
                          reason=f"version {claim.version} did not become AVAILABLE")  # fmt: skip
        try:
            repository.unpublish(model_root, claim.version)
        except repository.ModelRepositoryError as err:
            raise RuntimeError(
                f"Version {claim.version} did not become AVAILABLE in the server, and rolling "
                f"it back failed: {err}"
            ) from err
        raise RuntimeError(
            f"Version {claim.version} did not become AVAILABLE in the server; removed it from {model_root}"
        )
    if started and verify is not None:  # AVAILABLE, verified: label it (load first, label after)
        rollout.enter(model_root, rollout.current(model_root), rollout.CANARY,
                      reason="AVAILABLE (push verified): canary label set")  # fmt: skip
    return PushResult(claim.version, True, "pushed", uri)


def _start_rollout(model_repo: str, model_name: str, config, parent: int | None, version: int):
    """With ``rollout=canary``: load ``version`` beside ``parent`` (True: a rollout started).
    With nothing served, or ``rollout=direct`` while the servers read models.config, the
    new version serves alone."""
    from serving import rollout

    root = repository.model_root(model_repo, model_name)
    where = config.rollout_serving_base_path
    if config.rollout == "canary" and parent is not None:
        rollout.begin(model_repo, model_name, stable=parent, canary=version,
                      thresholds=rollout.Thresholds.from_config(config), serving_base_path=where)  # fmt: skip
        return True
    if config.rollout == "canary" or storage.exists(rollout.config_uri(root)):
        why = "nothing served to compare with" if parent is None else "rollout=direct"
        rollout.serve_only(model_repo, model_name, version, reason=f"pushed, {why}",
                           serving_base_path=where)  # fmt: skip
    return False


def _drift_reference(export_dir: Path, examples_dir) -> dict | None:
    """The base's embeddings of a sample of the training images, stored beside the version
    for `graft watch --on-drift` (components/drift.py)."""
    from components import drift

    settings = drift.DriftConfig()
    images, per_label = drift.reference_images(examples_dir, settings.reference_size, settings.seed)
    info = {"source": "train split originals (no augmented views), seeded shuffle",
            "seed": settings.seed, "per_label": per_label}  # fmt: skip
    return drift.write_reference(export_dir, images, info) if images else None


@step_component
def push(
    model: Input[Model],
    examples: Input[Dataset],
    evaluation: Input[Artifact],
    data_state: Input[Artifact],
    model_repo: str,
    model_name: str,
    top_k: int = 3,
    max_pixels: int = 40_000_000,
    rollout: str = "direct",
    canary_fraction: float = 0.1,
    canary_min_requests: int = 200,
    canary_max_error_rate: float = 0.01,
    canary_max_latency_ratio: float = 1.5,
    canary_min_agreement: float = 0.9,
    canary_max_class_shift: float = 0.1,
    rollout_serving_base_path: str = "",
    verify_target: str = "",
    verify_timeout_seconds: float = 300.0,
) -> str:
    """Publish the blessed model as a new version; return the version now holding it."""
    import json
    import logging
    from pathlib import Path

    from components.config import step_config
    from components.push import push_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    state_path = Path(data_state.path)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    verify = None
    if verify_target:  # e.g. tf-serving.graft.svc:8500: roll back a version the server cannot load
        from serving.client import wait_until_available

        verify = wait_until_available(verify_target, model_name, timeout=verify_timeout_seconds)
    result = push_model(model.path, evaluation.path, examples.path, model_repo, model_name,
                        config, data_state=state, verify=verify)  # fmt: skip
    return str(result.version)
