"""check_data: has the dataset changed since the served version was trained?

The fingerprint is a digest of every object's (path, size, checksum) from the bucket
listing (GCS md5/crc32c + generation; local sha256), sorted so listing order never
matters. Every file counts, whatever its name: validate refuses a dataset holding anything
that is not an image of a class, so the files fingerprinted are exactly the files trained on.
The push step records it in the version's metadata; on the next run this first step
compares, and unchanged data ends the run before anything expensive happens. Being first,
it also refuses settings that contradict the base (runs not started by the graft CLI, which
checks the same before it starts one).
"""

import hashlib
from dataclasses import dataclass

from kfp.dsl import Artifact, Output

from common import storage
from components.component import step_component


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    count: int  # files counted into the digest


def dataset_fingerprint(files: list[storage.FileInfo]) -> Fingerprint:
    """Order-independent digest over (relpath, size, checksum) of every file."""
    images = sorted((f.relpath, f.size, f.checksum) for f in files)
    digest = hashlib.sha256()
    for relpath, size, checksum in images:
        digest.update(f"{relpath}\0{size}\0{checksum}\n".encode())
    return Fingerprint(digest.hexdigest(), len(images))


def fingerprint_uri(data_uri: str) -> Fingerprint:
    return dataset_fingerprint(storage.list_files(data_uri))


def should_train(
    current: Fingerprint, served: dict | None, *, force: bool = False, min_new_images: int = 0
) -> tuple[bool, str]:
    """Train or skip, and why, in one sentence."""
    if force:
        return True, "forced"
    if served is None:
        return True, "no version is served yet"
    version = served.get("version", "?")
    if served.get("data_fingerprint") == current.digest:
        return False, f"data unchanged since version {version} ({current.count} images)"
    recorded = served.get("data_image_count")
    if min_new_images and recorded is not None and current.count - int(recorded) < min_new_images:
        return False, (
            f"only {current.count - int(recorded)} new images since version {version}; "
            f"min_new_images={min_new_images}"
        )
    return True, f"data changed since version {version} ({current.count} images now)"


@step_component
def check_data(
    data_uri: str,
    model_repo: str,
    model_name: str,
    data_state: Output[Artifact],
    force: bool = False,
    min_new_images: int = 0,
    base: str = "mobilenet_v2",
    weights: str = "imagenet",
    image_size: int = 96,
    channels: int = 3,
    fine_tune_from_layer: str = "",
) -> bool:
    """Refuse settings the base rules out; fingerprint the dataset; return whether to train
    (the gate for everything after)."""
    import json

    from common.model_repository import check_writable, served_metadata
    from components.backbones import check_base_settings
    from components.check_data import fingerprint_uri, should_train
    from components.config import step_config

    config = step_config(locals())
    check_base_settings(config)
    data_state.metadata["settings"] = config.used()

    check_writable(model_repo, model_name)  # a read-only or full repository: say so before training
    current = fingerprint_uri(data_uri)
    served = served_metadata(model_repo, model_name)
    train, reason = should_train(current, served, force=force, min_new_images=min_new_images)
    state = {"fingerprint": current.digest, "image_count": current.count, "reason": reason,
             "served_version": (served or {}).get("version"), "train": train}  # fmt: skip
    with open(data_state.path, "w") as fh:
        json.dump(state, fh, indent=2)
    print(f"check_data: {'train' if train else 'skip'}: {reason}")
    return train
