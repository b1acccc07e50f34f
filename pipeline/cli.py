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

import typer
from rich.console import Console

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
    from components.datasets import DatasetError
    from components.storage import StorageError

    try:
        yield
    except (StorageError, DatasetError, FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(
            f"Received `{text}`: expected comma-separated integers like 1,3,5"
        ) from err


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
        counts = write_synthetic_dataset(
            out, num_classes=classes, per_class=per_class, size=size, seed=seed
        )
    typer.echo(f"wrote {sum(counts.values())} PNGs in {len(counts)} classes to {out}")


# --- run / compile (the pipeline) ---------------------------------------------------------


def _config(base: str | None, settings: list[str] | None):
    from components.config import GraftConfig, with_overrides

    config = with_overrides(GraftConfig(), settings or [])
    return with_overrides(config, {"base": base}) if base else config


@app.command("run")
def run(
    data: str = typer.Option(
        ..., help="Dataset: local dir or gs://bucket/prefix of class folders."
    ),
    model_name: str = typer.Option("graft", help="Model name under the model repository."),
    model_repo: str = typer.Option(
        ..., help="Model repository (local dir or gs://) TF Serving reads."
    ),
    base: str = typer.Option(None, help="keras.applications name or URI of a .keras base."),
    set_: list[str] = typer.Option(None, "--set", help="Config override key=value (repeatable)."),
    force: bool = typer.Option(False, help="Train even if the data did not change."),
    min_new_images: int = typer.Option(0, help="Skip unless at least this many images are new."),
    pipeline_root: str = typer.Option(
        ".graft/runs", help="Where kfp.local keeps each step's outputs."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Run the whole pipeline locally (kfp.local) and print what each step did."""
    import json

    from pipeline.run import print_summary, run_local

    with user_errors():
        config = _config(base, set_)
        summary = run_local(
            data,
            model_repo,
            model_name,
            config,
            pipeline_root=pipeline_root,
            force=force,
            min_new_images=min_new_images,
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
) -> None:
    """Compile the pipeline to a KFP v2 spec with one image and the GPU node pool."""
    from pipeline.kfp_api import compile_pipeline
    from pipeline.pipeline import GpuPool, build_pipeline

    with user_errors():
        gpu = None
        if not no_gpu:
            key, sep, value = gpu_node_selector.partition("=")
            if not sep or not key or not value:
                raise ValueError(
                    f"Received `--gpu-node-selector {gpu_node_selector}`: expected key=value"
                )
            gpu = GpuPool(accelerator_type, gpus, (key, value), gpu_toleration)
        compile_pipeline(build_pipeline(gpu), output, image=image)
    where = "no GPUs" if gpu is None else f"training on {gpu_node_selector} x{gpus}"
    typer.echo(f"wrote {output} (image {image}, {where})")


if __name__ == "__main__":
    app()
