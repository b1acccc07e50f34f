"""push: export, infra-validate and publish a blessed model as a new TF Serving version.

``<model_repo>/<model_name>/<version>/`` with an integer version (unix seconds, strictly
increasing). TF Serving loads a version once ``saved_model.pb`` appears, so that file is
always written last; a local push is staged in a dot-folder (which servers ignore) and
renamed into place in one step. Rerunning a push of the same model finds the version that
already holds it (by a hash of its weights and labels) and pushes nothing.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Model

from common import storage
from components import examples
from components.component import step_component
from components.config import GraftConfig
from components.evaluate import EVALUATION_FILE, served_version

log = logging.getLogger(__name__)
METADATA_FILE = "graft_metadata.json"
COMPLETE_MARKER = "saved_model.pb"  # TF Serving treats a version as complete once it exists


class NotBlessedError(RuntimeError):
    """The pusher was handed a model its evaluation did not bless."""


@dataclass
class PushResult:
    version: int
    pushed: bool  # False when an identical model was already there
    reason: str
    uri: str


def model_hash(model_dir: str | Path) -> str:
    """A hash of what the model computes (weights + labels), stable across re-saves."""
    import keras

    digest = hashlib.sha256((Path(model_dir) / examples.LABELS_FILE).read_bytes())
    for weight in keras.models.load_model(Path(model_dir) / "model.keras").weights:
        digest.update(weight.path.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def _versions(model_root: str) -> list[int]:
    return sorted(int(d) for d in storage.list_dirs(model_root) if d.isdigit())


def _is_complete(model_root: str, version: int) -> bool:
    return storage.exists(storage.join(model_root, str(version), COMPLETE_MARKER))


def existing_version_with(model_root: str, content_hash: str) -> int | None:
    for version in reversed(_versions(model_root)):
        metadata_uri = storage.join(model_root, str(version), METADATA_FILE)
        if _is_complete(model_root, version) and storage.exists(metadata_uri):
            if json.loads(storage.read_text(metadata_uri)).get("content_hash") == content_hash:
                return version
    return None


def next_version(model_root: str, now: float | None = None) -> int:
    """Unix seconds, but always above every version already there (clocks go backwards)."""
    existing = _versions(model_root)
    return max(int(now if now is not None else time.time()), (existing[-1] + 1) if existing else 0)


def remove_incomplete_versions(model_root: str) -> list[int]:
    """Delete version folders an interrupted push left without saved_model.pb."""
    removed = [v for v in _versions(model_root) if not _is_complete(model_root, v)]
    for version in removed:
        storage.delete_tree(storage.join(model_root, str(version)))
        log.warning("push: removed incomplete version %d left by an interrupted push", version)
    return removed


def publish(export_dir: Path, model_root: str, version: int) -> str:
    """Copy an export into place as ``version``, saved_model.pb last; atomic locally."""
    target = storage.join(model_root, str(version))
    if storage.is_gcs(model_root):
        storage.copy_tree(str(export_dir), target, last=(COMPLETE_MARKER,))
        return target
    Path(model_root).mkdir(parents=True, exist_ok=True)
    staging = Path(model_root) / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    try:
        storage.copy_tree(str(export_dir), str(staging), last=(COMPLETE_MARKER,))
        os.rename(staging, target)  # one step: the version appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    from serving.export import export_saved_model, infra_validate

    model_dir, evaluation_path = Path(model_dir), Path(evaluation_path)
    if evaluation_path.is_dir():
        evaluation_path = evaluation_path / EVALUATION_FILE
    evaluation = json.loads(evaluation_path.read_text())
    if not evaluation.get("blessed"):
        raise NotBlessedError(f"Refusing to push an unblessed model: {evaluation.get('reason')}")
    model_root = storage.join(model_repo, model_name)
    content_hash = model_hash(model_dir)
    existing = existing_version_with(model_root, content_hash)
    if existing is not None:
        log.info("push: version %d already holds this model; nothing pushed", existing)
        return PushResult(
            existing,
            False,
            "identical model already pushed",
            storage.join(model_root, str(existing)),
        )
    remove_incomplete_versions(model_root)

    test_images, _ = examples.load_arrays(examples_dir, "test")
    warmup = [
        encode_png(image if image.shape[-1] == 3 else image[..., 0]) for image in test_images[:4]
    ]
    export_dir = Path(tempfile.mkdtemp(prefix="graft-export-")) / "model"
    export_saved_model(model_dir, export_dir, warmup_images=warmup, top_k=config.top_k)
    check = infra_validate(export_dir, model_dir, test_images[:32].astype("float32"))
    log.info("push: infra-validation passed: %s", check)

    training = (
        json.loads((model_dir / "training.json").read_text())
        if (model_dir / "training.json").exists()
        else {}
    )
    version = next_version(model_root)
    state = data_state or {}
    metadata = {
        "model_name": model_name, "version": version, "content_hash": content_hash,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent_version": served_version(model_repo, model_name),
        "data_fingerprint": state.get("fingerprint", ""), "data_image_count": state.get("image_count"),
        "metrics": {k: v for k, v in evaluation["metrics"].items() if k != "confusion_matrix"},
        "blessing_reason": evaluation["reason"], "champion": evaluation.get("champion"),
        "base": training.get("base"), "chosen": training.get("chosen"), "params": {**training.get("params", {}), **config.settings()},
        "labels": examples.read_labels(examples_dir), "infra_validation": check,
    }  # fmt: skip
    (export_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    (export_dir / "MODEL_CARD.md").write_text(model_card(metadata))
    uri = publish(export_dir, model_root, version)
    log.info("push: published version %d to %s", version, uri)

    if verify is not None and not verify(version):
        storage.delete_tree(uri)
        raise RuntimeError(
            f"Version {version} did not become AVAILABLE in the server; removed it from {model_root}"
        )
    return PushResult(version, True, "pushed", uri)


@step_component
def push(
    model: Input[Model],
    examples: Input[Dataset],
    evaluation: Input[Artifact],
    data_state: Input[Artifact],
    model_repo: str,
    model_name: str,
    top_k: int = 3,
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
