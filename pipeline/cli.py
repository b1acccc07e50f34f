"""The `graft` command line: every user-facing entry point.

    graft data fashion-mnist --classes 1,3,5 --per-class 30 --out /tmp/bucket/fm
    graft validate --data /tmp/bucket/fm
    graft --help

Errors a user can fix (bad URI, bad data, bad setting) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from serving.config import DEFAULTS as SERVER

app = typer.Typer(
    help="graft: transfer learning from a bucket of labelled images to TF Serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Write example datasets as class folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one clear line and exit code 2."""
    from common.model_repository import ModelRepositoryError
    from common.storage import StorageError
    from components.datasets import DatasetError
    from pipeline.kfp_api import KfpApiError
    from serving.client import ServingError
    from serving.rollout import RolloutError
    from serving.server import ServerStartError

    fixable = (StorageError, DatasetError, ServingError, ModelRepositoryError, KfpApiError,
               ServerStartError, RolloutError, FileNotFoundError, ValueError)  # fmt: skip
    try:
        yield
    except fixable as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(
            f"Received `{text}`: expected comma-separated integers like 1,3,5"
        ) from err


def _check_count(flag: str, value: int, *, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"Received `{flag} {value}`: expected >= {minimum}")


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"Received `--target {target}`: expected host:port with a port 1..65535")


# --- data -------------------------------------------------------------------------------


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    out: str = typer.Option(..., help="Local dir or gs://bucket/prefix to write class folders to."),
    classes: str = typer.Option("1,3,5,7,9", help="Fashion-MNIST class ids, comma-separated."),
    per_class: int = typer.Option(30, help="Images per class."),
    seed: int = typer.Option(0, help="Which images are picked."),
    split: str = typer.Option("train", help="Source split: train or test."),
) -> None:
    """Export a Fashion-MNIST subset as PNG class folders (folder = class name)."""
    from components.datasets import export_fashion_mnist

    with user_errors():
        _check_count("--per-class", per_class)
        counts = export_fashion_mnist(
            out, classes=_int_list(classes), per_class=per_class, seed=seed, split=split
        )
    total = sum(counts.values())
    typer.echo(f"wrote {total} PNGs ({', '.join(f'{k}={v}' for k, v in counts.items())}) to {out}")


@data_app.command("synthetic")
def data_synthetic(
    out: str = typer.Option(..., help="Local dir or gs://bucket/prefix."),
    classes: int = typer.Option(3, help="Number of classes."),
    per_class: int = typer.Option(20, help="Images per class."),
    size: int = typer.Option(32, help="Image side in pixels."),
    seed: int = typer.Option(0),
) -> None:
    """Write small synthetic images whose class is learnable (for trying graft out)."""
    from components.datasets import write_synthetic_dataset

    with user_errors():
        _check_count("--per-class", per_class)
        _check_count("--classes", classes)
        _check_count("--size", size)
        counts = write_synthetic_dataset(
            out, num_classes=classes, per_class=per_class, size=size, seed=seed
        )
    typer.echo(f"wrote {sum(counts.values())} PNGs in {len(counts)} classes to {out}")


# --- run / compile (the pipeline) ---------------------------------------------------------


def _run_settings(base: str | None, settings: list[str] | None):
    """Defaults < the base's settings < --set, checked against the base; says where each
    setting came from."""
    from components.config import describe_sources
    from pipeline.settings import run_settings

    resolved = run_settings(settings or [], base=base)
    console.print(
        describe_sources(resolved.config, resolved.sources), highlight=False, soft_wrap=True
    )
    return resolved.config


@app.command("run")
def run(
    data: str = typer.Option(
        ..., help="Dataset: local dir or gs://bucket/prefix of class folders."
    ),
    model_name: str = typer.Option("graft", help="Model name under the model repository."),
    model_repo: str = typer.Option(
        ..., help="Model repository (local dir or gs://) TF Serving reads."
    ),
    base: str = typer.Option(
        None, help="keras.applications name or URI of a .keras base (its settings apply)."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Setting key=value over the base's and the defaults (repeatable)."
    ),
    force: bool = typer.Option(False, help="Train even if the data did not change."),
    min_new_images: int = typer.Option(0, help="Skip unless at least this many images are new."),
    pipeline_root: str = typer.Option(
        ".graft/runs", help="Where kfp.local keeps each step's outputs."
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print the run summary as JSON at the end of stdout (after the steps' logs).",
    ),
    image: str = typer.Option(
        None, help="Run every step inside this image (Docker Engine; see docs/CLUSTER.md)."
    ),
) -> None:
    """Run the whole pipeline locally (kfp.local) and print what each step did."""
    import json
    import os

    from pipeline.in_containers import FORWARDED_ENV
    from pipeline.run import print_summary, run_local
    from pipeline.settings import preflight_local

    with user_errors():
        config = _run_settings(base, set_)
        _check_count("--min-new-images", min_new_images, minimum=0)
        if image:  # paths no container can see are the first thing to say
            from pipeline.in_containers import refuse_unmounted_paths

            refuse_unmounted_paths(Path(pipeline_root).resolve(), data=data, model_repo=model_repo,
                                   base=config.base, weights=config.weights)  # fmt: skip
        # A local repository a container writes to is probed by check_data in the container,
        # as the uid that will write there.
        preflight_local(data, model_repo, model_name, config,
                        probe_repository=not (image and not model_repo.startswith("gs://")))  # fmt: skip
        summary = run_local(
            data,
            model_repo,
            model_name,
            config,
            pipeline_root=pipeline_root,
            force=force,
            min_new_images=min_new_images,
            image=image,
            container_env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
        )
    print_summary(summary)
    if json_out:
        typer.echo(json.dumps(summary.to_json(), indent=2, default=str))
    if "FAILED" in summary.outcome:
        raise typer.Exit(1)


@app.command("compile")
def compile_(
    image: str = typer.Option(..., help="The one image every component runs in."),
    output: str = typer.Option("pipeline.yaml", "-o", "--output", help="Where to write the spec."),
    gpu_node_selector: str = typer.Option(
        "cloud.google.com/gke-accelerator=nvidia-l4", help="key=value of the GPU node pool."
    ),
    gpu_toleration: str = typer.Option("nvidia.com/gpu", help="Taint key the GPU pool carries."),
    accelerator_type: str = typer.Option("nvidia.com/gpu", help="Accelerator resource name."),
    gpus: int = typer.Option(1, help="GPUs per training step."),
    no_gpu: bool = typer.Option(False, "--no-gpu", help="Drop all GPU settings."),
    shards: int = typer.Option(
        1, min=1, help="Fan validate, augment and the feature pass out over N parallel tasks."
    ),
) -> None:
    """Compile the pipeline to a KFP v2 spec with one image and the GPU node pool."""
    from pipeline.kfp_api import compile_pipeline
    from pipeline.pipeline import GpuPool, build_pipeline

    with user_errors():
        gpu = None
        if not no_gpu and gpus < 1:
            raise ValueError(
                f"Received `--gpus {gpus}` with the GPU node selector {gpu_node_selector}: "
                "training steps would wait for a GPU node and use none; give --gpus >= 1 or --no-gpu"
            )
        if not no_gpu:
            key, sep, value = gpu_node_selector.partition("=")
            if not sep or not key or not value:
                raise ValueError(
                    f"Received `--gpu-node-selector {gpu_node_selector}`: expected key=value"
                )
            gpu = GpuPool(accelerator_type, gpus, (key, value), gpu_toleration)
        compile_pipeline(build_pipeline(gpu, shards=shards), output, image=image)
    where = "no GPUs" if gpu is None else f"training on {gpu_node_selector} x{gpus}"
    fan_out = f", {shards} shards" if shards > 1 else ""
    typer.echo(f"wrote {output} (image {image}, {where}{fan_out})")


# --- validate / pretrain --------------------------------------------------------------------


@app.command("validate")
def validate(
    data: str = typer.Option(
        ..., help="Dataset: local dir or gs://bucket/prefix of class folders."
    ),
    report: str = typer.Option(
        None,
        help="Directory for the JSON + HTML report and the manifest. Files unchanged since the "
        "last report there (its inspections.jsonl) are not read again.",
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Validation setting key=value (repeatable), e.g. min_side=32."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Read and inspect every file, whatever --report holds."
    ),
) -> None:
    """Check a dataset against the validation suite; exit 0 when it is trainable."""
    from rich.table import Table

    from components.config import SETTINGS, GraftConfig, with_overrides
    from components.validate import (
        INSPECTIONS_FILE,
        read_inspections,
        validate_data,
        validate_dataset,
        write_inspections,
    )
    from pipeline.settings import check_dataset_exists, check_writable_output

    with user_errors():
        used = [name for name in validate_data.component_spec.inputs if name in SETTINGS]
        for text in set_ or []:
            key = text.partition("=")[0].strip()
            if key in SETTINGS and key not in used:
                raise ValueError(
                    f"Received `--set {text}`: validation does not use `{key}`; "
                    f"it uses {', '.join(used)}"
                )
        config = with_overrides(GraftConfig(), set_ or [])
        check_dataset_exists(data)
        inspections, before = None, {}
        if report:
            check_writable_output("--report", report, folder=True)
            saved = str(Path(report) / INSPECTIONS_FILE)
            inspections = {} if fresh else read_inspections(saved)
            before = dict(inspections)
        result = validate_dataset(
            data, report, config, raise_on_failure=False, inspections=inspections
        )
        if report:
            write_inspections(saved, inspections)
    title = f"{data}: {result.files} files"
    if before:
        reused = sum(inspections.get(uri) is entry for uri, entry in before.items())
        title += f" ({reused} unchanged since the last report, not read again)"
    table = Table(title=title)
    table.add_column("rule")
    table.add_column("result")
    for outcome in result.expectations:
        mark = (
            "[green]pass[/]"
            if outcome["success"]
            else "[red]FAIL[/] " + ", ".join(outcome["unexpected"][:5])
        )
        table.add_row(outcome["description"], mark)
    console.print(table)
    console.print("per label: " + ", ".join(f"{k}={v}" for k, v in result.per_label.items()))
    if report:
        console.print(f"report: {report}/validation_report.html")
    if not result.ok:
        console.print(f"[bold red]error:[/] {result.summary()}", highlight=False)
        raise typer.Exit(2)


@app.command("pretrain")
def pretrain(
    out: str = typer.Option(..., help="Where to save the base (.keras), local or gs://."),
    classes: str = typer.Option("0,2,4,6,8", help="Fashion-MNIST source classes."),
    per_class: int = typer.Option(2000, help="Training images per class."),
    epochs: int = typer.Option(3, help="Training epochs."),
    seed: int = typer.Option(0),
) -> None:
    """Train a small CNN base on Fashion-MNIST source classes, to transfer from offline."""
    from components.pretrain import pretrain_base
    from pipeline.settings import check_writable_output

    if not out.endswith(".keras"):
        console.print(
            f"[bold red]error:[/] Received `--out {out}`: the base is saved as a .keras file"
        )
        raise typer.Exit(2)
    with user_errors():
        _check_count("--epochs", epochs)
        _check_count("--per-class", per_class)
        check_writable_output("--out", out)
        summary = pretrain_base(
            out, classes=_int_list(classes), per_class=per_class, epochs=epochs, seed=seed
        )
    from components.pretrain import PRETRAINED_SETTINGS

    typer.echo(
        f"saved base to {out} (source val accuracy {summary['val_accuracy']:.3f}, "
        f"rotation val accuracy {summary['val_rotation_accuracy']:.3f}); it carries the settings "
        + ", ".join(f"{k}={v}" for k, v in PRETRAINED_SETTINGS.items())
        + " (graft run uses them; --set overrides)"
    )


# --- serve / predict ----------------------------------------------------------------------


@app.command("serve")
def serve(
    model_repo: str = typer.Option(
        None, help="Model repository (local dir or gs://); or use --model-config-file."
    ),
    model_name: str = typer.Option(None, help="Model name (folder under the repository)."),
    port: int = typer.Option(SERVER["port"], help="gRPC port."),
    rest_api_port: int = typer.Option(
        SERVER["rest_api_port"], help="REST port (TF Serving's REST API); 0 = off."
    ),
    host: str = typer.Option(
        SERVER["host"], help="Address to bind; 0.0.0.0 to accept remote clients."
    ),
    versions: str = typer.Option(
        SERVER["versions"], help="Version policy: latest:N, specific:V1,V2 or all."
    ),
    poll_seconds: float = typer.Option(
        SERVER["poll_seconds"], help="How often to look for new versions."
    ),
    max_message_mb: int = typer.Option(
        SERVER["max_message_mb"], help="Largest request/response in MB."
    ),
    max_batch: int = typer.Option(SERVER["max_batch"], help="Most rows one request may carry."),
    max_workers: int = typer.Option(
        None,
        help="gRPC worker threads (default: 8, or with --batching enough to fill --max-batch-size).",
        show_default=False,
    ),
    batching: bool = typer.Option(
        False, help="Merge concurrent small requests into one model call."
    ),
    max_batch_size: int = typer.Option(
        SERVER["max_batch_size"], help="With --batching: rows per merged call."
    ),
    batch_timeout_ms: float = typer.Option(
        SERVER["batch_timeout_ms"], help="With --batching: how long a request waits for company."
    ),
    batch_threads: int = typer.Option(
        None,
        help="With --batching: merged calls run at once (default: the CPU count, as TF Serving).",
        show_default=False,
    ),
    monitoring_config_file: str = typer.Option(
        None,
        help="TF Serving MonitoringConfig text proto; prometheus_config { enable: true } serves "
        "metrics on the REST port (default path /monitoring/prometheus/metrics).",
        show_default=False,
    ),
    tls_cert: str = typer.Option(None, help="PEM certificate: serve TLS (with --tls-key)."),
    tls_key: str = typer.Option(None, help="PEM private key for --tls-cert."),
    enable_serialization_as_tensor_content: bool = typer.Option(
        SERVER["enable_serialization_as_tensor_content"],
        help="Answer numeric outputs in tensor_content (TF Serving's flag), not float_val...",
    ),
    model_config_file: str = typer.Option(
        None, help="TF Serving ModelServerConfig text file: several models, policies, labels."
    ),
    model_config_file_poll_wait_seconds: float = typer.Option(
        SERVER["model_config_file_poll_wait_seconds"],
        help="Re-read --model-config-file this often (0: read it once).",
    ),
    allow_version_labels_for_unavailable_models: bool = typer.Option(
        SERVER["allow_version_labels_for_unavailable_models"],
        help="Let a config label a version that is not loaded yet (TF Serving's flag).",
    ),
    request_log: str = typer.Option(
        None,
        help="Folder (local or gs://) for a log of answered requests: TF Serving PredictionLog "
        "records in rotated TFRecord files (a model config's logging_config overrides it).",
        show_default=False,
    ),
    log_sample_rate: float = typer.Option(
        SERVER["log_sample_rate"], help="With --request-log: share of requests logged (0..1)."
    ),
    log_max_file_mb: int = typer.Option(
        SERVER["log_max_file_mb"], help="With --request-log: a log file is closed at this size."
    ),
    log_max_file_seconds: float = typer.Option(
        SERVER["log_max_file_seconds"], help="With --request-log: ...or this old."
    ),
) -> None:
    """Serve a model repository (or a model config file's models) over TF Serving's gRPC and
    REST APIs until SIGTERM/Ctrl-C."""
    import logging

    from serving.config import ServerConfig
    from serving.server import ModelServer

    logging.basicConfig(level=logging.INFO)
    with user_errors():
        config = ServerConfig(host=host, port=port, rest_api_port=rest_api_port, versions=versions,
                              poll_seconds=poll_seconds, max_message_mb=max_message_mb, max_batch=max_batch,
                              max_workers=max_workers, batching=batching, max_batch_size=max_batch_size,
                              batch_timeout_ms=batch_timeout_ms, batch_threads=batch_threads,
                              monitoring_config_file=monitoring_config_file, tls_cert=tls_cert,
                              tls_key=tls_key, model_config_file=model_config_file,
                              model_config_file_poll_wait_seconds=model_config_file_poll_wait_seconds,
                              allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
                              enable_serialization_as_tensor_content=enable_serialization_as_tensor_content,
                              request_log=request_log, log_sample_rate=log_sample_rate,
                              log_max_file_mb=log_max_file_mb, log_max_file_seconds=log_max_file_seconds)  # fmt: skip
        ModelServer(model_repo, model_name, config).serve_forever()


@app.command("predict")
def predict(
    images: list[str] = typer.Argument(..., help="JPEG/PNG files (local or gs://)."),
    target: str = typer.Option(
        None,
        help="host:port of TF Serving or graft serve (default: 127.0.0.1:8500, or :8501 with --rest).",
        show_default=False,
    ),
    model: str = typer.Option(..., help="Model name."),
    version: int = typer.Option(None, help="A specific version (default: the latest served)."),
    timeout: float = typer.Option(10.0, help="Deadline per request in seconds."),
    rest: bool = typer.Option(False, "--rest", help="Use TF Serving's REST API instead of gRPC."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classify images over gRPC (or REST) and print the top-k labels with probabilities."""
    import json

    from common import storage
    from serving.client import PredictClient, RestClient

    if target is None:
        target = f"127.0.0.1:{SERVER['rest_api_port'] if rest else SERVER['port']}"
    with user_errors():
        if timeout <= 0:
            raise ValueError(f"Received `--timeout {timeout}`: expected seconds > 0")
        _check_target(target)
        payloads = [storage.read_bytes(path) for path in images]
        client = (RestClient if rest else PredictClient)(target, timeout=timeout)
        predictions = client.predict_images(model, payloads, version=version)
    if json_out:
        rows = [{"image": path, "version": p.version, "labels": p.labels, "probabilities": p.probabilities}
                for path, p in zip(images, predictions, strict=True)]  # fmt: skip
        typer.echo(json.dumps(rows, indent=2))
        return
    for path, p in zip(images, predictions, strict=True):
        top = ", ".join(
            f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probabilities, strict=True)
        )
        served = "latest; REST answers carry no version" if p.version is None else p.version
        typer.echo(f"{path}: {top}  (version {served})")


# --- submit / schedule / watch --------------------------------------------------------------

schedule_app = typer.Typer(help="Recurring runs on a KFP API server.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


PARAM_HELP = (
    "Pipeline parameter key=value (repeatable): data_uri, model_repo, model_name, force, "
    "min_new_images, verify_target, or any setting (the names --set takes)."
)


def _cluster_params(
    param: list[str] | None, set_: list[str] | None, *, label: str = "--param/--set"
) -> dict:
    """--param/--set -> the run's parameters; settings start from the base's, like graft run."""
    from components.config import describe_sources
    from pipeline.settings import cluster_parameters

    params, resolved = cluster_parameters([*(param or []), *(set_ or [])], label=label)
    console.print(
        describe_sources(resolved.config, resolved.sources), highlight=False, soft_wrap=True
    )
    if resolved.note:
        console.print(f"note: {resolved.note}", highlight=False)
    return params


def _package(package: str | None, image: str | None) -> str:
    """A compiled pipeline: the one given, or one compiled now with ``image``."""
    if package:
        return package
    import tempfile

    from pipeline.kfp_api import compile_pipeline
    from pipeline.pipeline import GpuPool, build_pipeline

    if not image:
        raise ValueError(
            "Give --package pipeline.yaml (from `graft compile`) or --image to compile one now"
        )
    path = f"{tempfile.mkdtemp(prefix='graft-')}/pipeline.yaml"
    compile_pipeline(build_pipeline(GpuPool()), path, image=image)
    return path


@app.command("submit")
def submit(
    host: str = typer.Option(..., help="KFP API server URL."),
    package: str = typer.Option(None, help="Compiled pipeline (graft compile)."),
    image: str = typer.Option(None, help="Compile now with this image instead of --package."),
    param: list[str] = typer.Option(None, help=PARAM_HELP),
    set_: list[str] = typer.Option(None, "--set", help="Same as --param, for settings."),
    experiment: str = typer.Option("graft"),
    run_name: str = typer.Option(None),
) -> None:
    """Start one pipeline run on a Kubeflow Pipelines cluster."""
    from pipeline.kfp_api import submit as submit_run

    with user_errors():
        params = _cluster_params(param, set_)
        run_id = submit_run(host, _package(package, image), params=params,
                            experiment=experiment, run_name=run_name)  # fmt: skip
    typer.echo(f"submitted run {run_id}")


@schedule_app.command("create")
def schedule_create(
    host: str = typer.Option(..., help="KFP API server URL."),
    cron: str = typer.Option("0 0 3 * * *", help="6-field KFP cron (sec min hour dom month dow)."),
    package: str = typer.Option(None, help="Compiled pipeline (graft compile)."),
    image: str = typer.Option(None, help="Compile now with this image instead of --package."),
    param: list[str] = typer.Option(None, help=PARAM_HELP),
    set_: list[str] = typer.Option(None, "--set", help="Same as --param, for settings."),
    name: str = typer.Option("graft-retrain"),
    experiment: str = typer.Option("graft"),
) -> None:
    """Create a recurring run (one at a time, no catch-up). Unchanged data makes it cheap."""
    from pipeline.kfp_api import create_schedule, validate_cron

    with user_errors():
        validate_cron(cron)
        params = _cluster_params(param, set_)
        schedule_id = create_schedule(host, _package(package, image), cron=cron, params=params,
                                      name=name, experiment=experiment)  # fmt: skip
    typer.echo(f"created recurring run {schedule_id} ({cron})")


@schedule_app.command("list")
def schedule_list(host: str = typer.Option(..., help="KFP API server URL.")) -> None:
    """List recurring runs."""
    from pipeline.kfp_api import list_schedules

    with user_errors():
        for row in list_schedules(host):
            typer.echo(f"{row['id']}  {row['name']}  {row['cron']}  {row['status']}")


@schedule_app.command("delete")
def schedule_delete(
    schedule_id: str = typer.Argument(..., help="Recurring run id."),
    host: str = typer.Option(..., help="KFP API server URL."),
) -> None:
    """Delete a recurring run."""
    from pipeline.kfp_api import delete_schedule

    with user_errors():
        delete_schedule(host, schedule_id)
    typer.echo(f"deleted recurring run {schedule_id}")


@app.command("watch")
def watch(
    data: str = typer.Option(..., help="Dataset prefix to watch (local dir or gs://)."),
    every: str = typer.Option("10m", help="Poll interval: 30s, 10m, 1h."),
    model_name: str = typer.Option("graft"),
    model_repo: str = typer.Option(None, help="Model repository (local runs)."),
    host: str = typer.Option(
        None, help="Submit runs to this KFP API server instead of running locally."
    ),
    package: str = typer.Option(None, help="Compiled pipeline for --host."),
    base: str = typer.Option(
        None, help="keras.applications name or URI of a .keras base (its settings apply)."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Setting key=value for every run it starts, local or --host."
    ),
    stable_checks: int = typer.Option(2, help="Identical listings needed before a change counts."),
    max_polls: int = typer.Option(None, help="Stop after this many polls (default: run forever)."),
    on_drift: bool = typer.Option(
        False, help="Also start a run when logged requests drift from the training images."
    ),
    request_log: str = typer.Option(
        None, help="With --on-drift: the folder `graft serve --request-log` writes (or gs://)."
    ),
) -> None:
    """Poll the data; when its fingerprint changes and settles (or, with --on-drift, the
    served version's requests drift from its training images), start a run."""
    import logging

    from common.model_repository import check_model_name
    from pipeline.settings import check_dataset_exists, preflight_local
    from pipeline.watch import local_trigger, parse_duration, submit_trigger
    from pipeline.watch import watch as watch_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with user_errors():
        seconds = parse_duration(every)
        _check_count("--stable-checks", stable_checks)
        if max_polls is not None:
            _check_count("--max-polls", max_polls)
        if on_drift and not (request_log and model_repo):
            raise ValueError(
                "--on-drift needs --request-log (where graft serve logs requests) and "
                "--model-repo (where the versions' reference embeddings are)"
            )
        if request_log and not on_drift:
            raise ValueError("--request-log is read only with --on-drift: add --on-drift")
        if host:
            settings = [*(set_ or []), *([f"base={base}"] if base else [])]
            params = _cluster_params(None, settings, label="--set")
            check_model_name(model_name)
            check_dataset_exists(data)  # the watcher itself lists it every poll
            trigger = submit_trigger(
                host, _package(package, None), data, model_name, model_repo, params
            )
            retrain = submit_trigger(host, _package(package, None), data, model_name,
                                     model_repo, params, force=True)  # fmt: skip
        else:
            if not model_repo:
                raise ValueError(
                    "Give --model-repo for local runs (or --host to submit to a cluster)"
                )
            config = _run_settings(base, set_)
            preflight_local(data, model_repo, model_name, config)
            trigger = local_trigger(data, model_repo, model_name, config)
            retrain = local_trigger(data, model_repo, model_name, config, force=True)
        drift = None
        if on_drift:
            from components.drift import DriftMonitor

            drift = DriftMonitor(model_repo, model_name, request_log).check
        watch_loop(
            data,
            every_seconds=seconds,
            trigger=trigger,
            stable_checks=stable_checks,
            max_polls=max_polls,
            drift=drift,
            on_drift=retrain,
        )


# --- rollout (serving/rollout.py) ----------------------------------------------------------

rollout_app = typer.Typer(
    help="Canary rollouts: judge a pushed version on live requests, promote or roll back.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")
REPO_HELP = "Model repository (local dir or gs://) holding the versions and models.config."
TARGET_HELP = "host:port of the server(s) reading models.config (TF Serving or graft serve)."


def _controller(
    model_repo: str,
    model_name: str,
    target: str,
    timeout: float = 10.0,
    mirror_from: str = "",
    mirror_rate: float = 20.0,
):
    from serving.client import CanaryRouter, PredictClient
    from serving.rollout import (
        LoggedRequests,
        MirroredTraffic,
        RepositoryObservations,
        RolloutController,
    )

    _check_target(target)
    controller = RolloutController(model_repo, model_name, PredictClient(target, timeout=timeout))
    if mirror_from:
        router = CanaryRouter(PredictClient(target, timeout=timeout), model_name,
                              sink=RepositoryObservations(controller.root).write)  # fmt: skip
        controller.mirror = MirroredTraffic(LoggedRequests(mirror_from, model_name), router,
                                            rate=mirror_rate)  # fmt: skip
    return controller


def _finish(controller, poll_seconds: float, timeout: float | None) -> None:
    from serving.rollout import FINAL_STATES, describe

    if poll_seconds <= 0:
        raise ValueError(f"Received `--poll-seconds {poll_seconds}`: expected seconds > 0")
    event = controller.run(poll_seconds=poll_seconds, timeout=timeout)
    if event is None:
        raise ValueError(f"No rollout was ever started in {controller.root}: nothing to watch")
    typer.echo(describe([event])[0])
    if event["state"] not in FINAL_STATES:
        console.print(f"still {event['state']} after {timeout}s: run `graft rollout watch` again")
        raise typer.Exit(1)


@rollout_app.command("watch")
def rollout_watch(
    model_repo: str = typer.Option(..., help=REPO_HELP),
    model_name: str = typer.Option("graft", help="Model name under the model repository."),
    target: str = typer.Option("127.0.0.1:8500", help=TARGET_HELP),
    poll_seconds: float = typer.Option(2.0, help="How often to read the observations."),
    timeout: float = typer.Option(None, help="Give up after this many seconds (default: never)."),
    mirror_from: str = typer.Option(
        "",
        help="A `graft serve --request-log` URI (local or gs://): replay logged requests "
        "to canary and stable, for clients that cannot route (default: routed requests only).",
    ),
    mirror_rate: float = typer.Option(
        20.0,
        help="At most this many logged requests replayed a second (each to both labels): "
        "the default reaches canary_min_requests=200 in 10 s at 40 extra predicts/s.",
    ),
) -> None:
    """Drive the current rollout to its decision: label the canary once it is AVAILABLE,
    judge it on the routed (or mirrored) requests, promote or roll back, record every step.
    Resumes from the recorded state after a restart."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with user_errors():
        if mirror_rate <= 0:
            raise ValueError(f"Received `--mirror-rate {mirror_rate}`: expected replays/s > 0")
        controller = _controller(model_repo, model_name, target, mirror_from=mirror_from,
                                 mirror_rate=mirror_rate)  # fmt: skip
        _finish(controller, poll_seconds, timeout)


@rollout_app.command("init")
def rollout_init(
    model_repo: str = typer.Option(..., help=REPO_HELP),
    model_name: str = typer.Option("graft", help="Model name under the model repository."),
    serving_base_path: str = typer.Option(
        "", help="The model's folder as the server sees it (default: where the versions are)."
    ),
) -> None:
    """Write models.config serving the newest complete version (`stable` on it), so servers
    can start with --model-config-file before the first canary push."""
    from common.model_repository import served_version
    from serving.rollout import config_uri, serve_only

    with user_errors():
        version = served_version(model_repo, model_name)
        if version is None:
            raise ValueError(
                f"No complete version of {model_name} in {model_repo}: push one first "
                "(a canary-mode push writes models.config itself)"
            )
        serve_only(model_repo, model_name, version, reason="graft rollout init",
                   serving_base_path=serving_base_path)  # fmt: skip
        from common.model_repository import model_root

        where = config_uri(model_root(model_repo, model_name))
    typer.echo(f"wrote {where}: version {version}, stable={version}")


@rollout_app.command("status")
def rollout_status(
    model_repo: str = typer.Option(..., help=REPO_HELP),
    model_name: str = typer.Option("graft", help="Model name under the model repository."),
    json_out: bool = typer.Option(False, "--json", help="Print the history as JSON lines."),
) -> None:
    """Show the rollout history (every state, decision and its figures), oldest first."""
    import json

    from common.model_repository import model_root
    from serving.rollout import describe, read_history

    with user_errors():
        events = read_history(model_root(model_repo, model_name))
    if not events:
        typer.echo(f"no rollout recorded for {model_name} in {model_repo}")
        return
    for line in (json.dumps(e, default=str) for e in events) if json_out else describe(events):
        typer.echo(line)


def _decide(decision: str, model_repo, model_name, target, reason, poll_seconds, timeout):
    with user_errors():
        controller = _controller(model_repo, model_name, target)
        controller.decide(decision, by="user", reason=reason)
        _finish(controller, poll_seconds, timeout)


def _decision_command(decision: str, doc: str):
    """`graft rollout promote|rollback`: the same options, one decision each."""

    def command(
        model_repo: str = typer.Option(..., help=REPO_HELP),
        model_name: str = typer.Option("graft", help="Model name under the model repository."),
        target: str = typer.Option("127.0.0.1:8500", help=TARGET_HELP),
        reason: str = typer.Option("", help="Recorded with the decision."),
        poll_seconds: float = typer.Option(1.0, help="How often to check the server."),
        timeout: float = typer.Option(300.0, help="Give up after this many seconds."),
    ) -> None:
        _decide(decision, model_repo, model_name, target, reason, poll_seconds, timeout)

    command.__doc__ = doc
    command.__name__ = f"rollout_{decision}"
    return command


rollout_promote = rollout_app.command("promote")(_decision_command(
    "promote", "Promote the canary now: `stable` moves to it, then the old version is unloaded."
))  # fmt: skip
rollout_rollback = rollout_app.command("rollback")(_decision_command(
    "rollback", "Roll the canary back now: its label is removed and the version marked rejected."
))  # fmt: skip


if __name__ == "__main__":
    app()
