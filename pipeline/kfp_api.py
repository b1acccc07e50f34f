"""Talking to Kubeflow Pipelines: compile with one image, submit runs, manage schedules.

    graft compile --image us-docker.pkg.dev/p/graft/graft:0.1.0 -o pipeline.yaml
    graft submit --host https://kfp.example.com --package pipeline.yaml --param data_uri=gs://b/d
    graft schedule create --host ... --cron "0 0 3 * * *" --package pipeline.yaml --param ...

kfp fixes a component's image when the function is decorated; `compile_pipeline` writes
the spec and then points every executor at the one image given, so the image is a
deploy-time choice, not a code change.
"""

import re
from pathlib import Path

import yaml

CRON_FIELDS = 6  # KFP cron: second minute hour day-of-month month day-of-week


def set_image(package_path: str | Path, image: str) -> int:
    """Point every executor of a compiled pipeline at ``image``; return how many changed."""
    path = Path(package_path)
    documents = list(yaml.safe_load_all(path.read_text()))
    executors = documents[0]["deploymentSpec"]["executors"]
    for executor in executors.values():
        executor["container"]["image"] = image
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return len(executors)


def compile_pipeline(pipeline_func, out_path: str | Path, *, image: str) -> Path:
    """Compile ``pipeline_func`` to a KFP v2 YAML spec whose every step runs ``image``."""
    from kfp import compiler

    if not image or any(c.isspace() for c in image):
        raise ValueError(f"Received `image={image!r}`: expected a container image reference")
    compiler.Compiler().compile(pipeline_func, str(out_path))
    set_image(out_path, image)
    return Path(out_path)


def validate_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != CRON_FIELDS or not all(re.fullmatch(r"[\d*/,\-?A-Za-z]+", f) for f in fields):
        raise ValueError(
            f'Received `--cron "{cron}"`: KFP expects 6 fields '
            '(second minute hour day-of-month month day-of-week), e.g. "0 0 3 * * *"'
        )
    return cron


def client(host: str):
    import kfp

    return kfp.Client(host=host)


def submit(
    host: str,
    package_path: str | Path,
    *,
    params: dict,
    experiment: str = "graft",
    run_name: str | None = None,
) -> str:
    """Start one run of a compiled pipeline; return its run id."""
    run = client(host).create_run_from_pipeline_package(
        str(package_path), arguments=params, experiment_name=experiment, run_name=run_name
    )
    return run.run_id


def create_schedule(
    host: str,
    package_path: str | Path,
    *,
    cron: str,
    params: dict,
    name: str = "graft-retrain",
    experiment: str = "graft",
) -> str:
    """A recurring run: one at a time, and no catch-up burst after downtime."""
    kfp_client = client(host)
    experiment_id = kfp_client.create_experiment(name=experiment).experiment_id
    job = kfp_client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        cron_expression=validate_cron(cron),
        max_concurrency=1,
        no_catchup=True,
        pipeline_package_path=str(package_path),
        params=params,
        enable_caching=True,
    )
    return job.recurring_run_id


def list_schedules(host: str) -> list[dict]:
    response = client(host).list_recurring_runs(page_size=100)
    return [
        {"id": r.recurring_run_id, "name": r.display_name, "status": r.status,
         "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else None}
        for r in (response.recurring_runs or [])
    ]  # fmt: skip


def delete_schedule(host: str, schedule_id: str) -> None:
    client(host).delete_recurring_run(schedule_id)
