"""Run a compiled graft package locally with every step in graft's image (kfp.local DockerRunner).

    graft run --image graft:dev --data gs://b/fm --model-repo gs://b/models --base gs://b/base.keras
    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 graft run --image graft:dev ...   (emulator)

The steps run in containers on the host network (so a GCS emulator on 127.0.0.1 is reachable,
and STORAGE_EMULATOR_HOST is passed in), as the image's uid 10001. DockerRunner mounts only the
pipeline root, so local data, bases and model repositories must live under it; gs:// is the
cluster-like path. The package is the one `graft compile --image` writes, less its retry
policies: on a cluster a retry outlasts a node or bucket hiccup, but here storage calls already
retry transient errors, and the 30/60/120 s backoff only delays the report of a deterministic
failure (bad data, a bug) by minutes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FORWARDED_ENV = ("STORAGE_EMULATOR_HOST",)  # what a step needs from the caller's environment


def strip_retries(package: str | Path, out: str | Path) -> int:
    """Write ``package`` to ``out`` without retry policies; return how many were removed."""
    documents = list(yaml.safe_load_all(Path(package).read_text()))
    removed = 0

    def strip(node):
        nonlocal removed
        if isinstance(node, dict):
            removed += node.pop("retryPolicy", None) is not None
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(documents[0])
    Path(out).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return removed


def refuse_unmounted_paths(pipeline_root: Path, **uris: str) -> None:
    """Raise ValueError naming each local path a step's container would not see."""
    outside = []
    for name, uri in uris.items():
        if not uri or uri.startswith("gs://") or ("/" not in uri and not uri.endswith(".keras")):
            continue  # gs://, empty, or a keras.applications name like mobilenet_v2
        path = Path(uri).resolve()
        if path != pipeline_root and pipeline_root not in path.parents:
            outside.append(f"{name}={uri}")
    if outside:
        raise ValueError(
            f"With --image, each step runs in a container that sees only the pipeline root "
            f"({pipeline_root}) and gs:// URIs; received {', '.join(outside)}. Move them under "
            f"{pipeline_root} (--pipeline-root) or to gs://"
        )


def check_engine_has(image: str) -> None:
    """Raise ValueError unless a Docker Engine answers and holds ``image`` (nothing is pulled
    silently: a local run of an image that was never built is a mistake, not a download)."""
    try:
        import docker
    except ImportError:
        raise ValueError(
            "--image needs the docker Python package: pip install 'graft[containers]'"
        ) from None
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as err:
        raise ValueError(
            f"--image {image}: no Docker Engine answers ({err}); start one or set DOCKER_HOST "
            "(docs/CLUSTER.md, 'Running the pipeline in containers')"
        ) from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ValueError(
            f"--image {image}: the engine has no such image; build it with "
            f"`docker build -t {image} .` or `make image`"
        ) from None
    finally:
        client.close()


def run_package(package: str | Path, arguments: dict, pipeline_root: Path, environment: dict):
    """Run a compiled package under DockerRunner (outputs under ``pipeline_root/<run>/``)."""
    import tempfile

    from kfp import components, local

    # The steps run as uid 10001, not as the caller, and write their run directories here.
    # Sticky like /tmp, so each user can remove only their own runs.
    pipeline_root.chmod(0o1777)
    with tempfile.TemporaryDirectory(prefix="graft-package-") as work:
        local_package = Path(work, "pipeline.local.yaml")
        strip_retries(package, local_package)
        pipeline = components.load_component_from_file(str(local_package))
    local.init(
        runner=local.DockerRunner(network_mode="host", environment=dict(environment)),
        pipeline_root=str(pipeline_root),
        raise_on_error=False,  # a failed step is reported in the summary, with its name
    )
    pipeline(**arguments)


def run_in_image(image: str, arguments: dict, config, pipeline_root: Path, environment: dict):
    """What `graft run --image` does: compile for ``image`` (no GPU settings), then run it."""
    import tempfile

    from pipeline.kfp_api import compile_pipeline
    from pipeline.pipeline import build_pipeline

    refuse_unmounted_paths(pipeline_root, data=arguments["data_uri"],
                           model_repo=arguments["model_repo"], base=config.base,
                           weights=config.weights)  # fmt: skip
    check_engine_has(image)
    if not arguments["model_repo"].startswith("gs://"):
        # push runs as uid 10001 and creates version folders here (sticky, as the root).
        repo = Path(arguments["model_repo"])
        repo.mkdir(parents=True, exist_ok=True)
        repo.chmod(0o1777)
    with tempfile.TemporaryDirectory(prefix="graft-package-") as work:
        package = compile_pipeline(build_pipeline(gpu=None, retries=False, shards=config.shards),
                                   Path(work, "pipeline.yaml"), image=image)  # fmt: skip
        run_package(package, arguments, pipeline_root, environment)
