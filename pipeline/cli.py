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


if __name__ == "__main__":
    app()
