"""Talking to Kubeflow Pipelines: compile with one image, submit runs, manage schedules.

    graft compile --image us-docker.pkg.dev/p/graft/graft:0.1.0 -o pipeline.yaml
    graft submit --host https://kfp.example.com --package pipeline.yaml --param data_uri=gs://b/d
    graft schedule create --host ... --cron "0 0 3 * * *" --package pipeline.yaml --param ...

kfp fixes a component's image when the function is decorated; `compile_pipeline` writes
the spec and then points every executor at the one image given, so the image is a
deploy-time choice, not a code change.
"""

import contextlib
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


class KfpApiError(RuntimeError):
    """The KFP API server could not be reached or refused a call; the message says which."""


@contextlib.contextmanager
def _api_calls(host: str):
    """Turn transport and API errors into one KfpApiError naming the host."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except urllib3.exceptions.HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise KfpApiError(
            f"Cannot reach the KFP API server at {host} ({reason}): check --host "
            "(e.g. http://localhost:8080 after kubectl port-forward)"
        ) from None
    except ApiException as err:
        raise KfpApiError(
            f"The KFP API server at {host} answered {err.status} {err.reason}: {err.body or ''}".strip()
        ) from None


def _package_file(package_path: str | Path) -> str:
    if not Path(package_path).is_file():
        raise FileNotFoundError(
            f"No compiled pipeline at {package_path}: run `graft compile -o {package_path}` first"
        )
    return str(package_path)


def client(host: str):
    import kfp

    with _api_calls(host):
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
    package = _package_file(package_path)
    with _api_calls(host):
        run = client(host).create_run_from_pipeline_package(
            package, arguments=params, experiment_name=experiment, run_name=run_name
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
    package = _package_file(package_path)
    with _api_calls(host):
        kfp_client = client(host)
        experiment_id = kfp_client.create_experiment(name=experiment).experiment_id
        job = kfp_client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=name,
            cron_expression=validate_cron(cron),
            max_concurrency=1,
            no_catchup=True,
            pipeline_package_path=package,
            params=params,
            enable_caching=True,
        )
    return job.recurring_run_id


def list_schedules(host: str) -> list[dict]:
    with _api_calls(host):
        response = client(host).list_recurring_runs(page_size=100)
    return [
        {"id": r.recurring_run_id, "name": r.display_name, "status": r.status,
         "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else None}
        for r in (response.recurring_runs or [])
    ]  # fmt: skip


def delete_schedule(host: str, schedule_id: str) -> None:
    with _api_calls(host):
        client(host).delete_recurring_run(schedule_id)
