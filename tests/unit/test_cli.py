"""The CLI on bad input: one clear line and exit code 2, never a traceback."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app


def run(*args):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_validate_missing_uri(tmp_path):
    result = run("validate", "--data", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: Received `--data {tmp_path / 'nope'}`: no such directory; expected a directory "
        "of <label>/ class folders (write one with `graft data synthetic --out DIR`)"
    ]


def test_validate_empty_bucket(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("validate", "--data", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert "holds no files" in result.output


def test_validate_non_image_file_names_it(tmp_path):
    from components import datasets

    datasets.export_fashion_mnist(str(tmp_path / "d"), classes=[1, 3], per_class=6)
    (tmp_path / "d" / "dress" / "notes.txt").write_text("hello")
    result = run("validate", "--data", str(tmp_path / "d"), "--report", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "dress/notes.txt" in result.output
    assert (tmp_path / "r" / "validation_report.json").exists()


def test_validate_clean_data_exits_zero(tmp_path):
    from components import datasets

    datasets.export_fashion_mnist(str(tmp_path / "d"), classes=[1, 3], per_class=6)
    assert run("validate", "--data", str(tmp_path / "d")).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "--data", "/x", "--model-repo", "/y", "--set", "nope=1"],
            "Unknown setting `nope`",
        ),
        (["run", "--data", "/x", "--model-repo", "/y", "--set", "views=many"], "views=many"),
        (
            ["data", "fashion-mnist", "--classes", "1,x", "--out", "/tmp/z"],
            "comma-separated integers",
        ),
        (["predict", "--model", "m", "/definitely/missing.png"], "missing.png"),
        (["watch", "--data", "/x", "--every", "soon"], "30s, 10m or 1h"),
    ],
)
def test_bad_arguments_give_one_clear_error(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_data_fashion_mnist_writes_class_folders(tmp_path):
    result = run(
        "data",
        "fashion-mnist",
        "--classes",
        "1,3",
        "--per-class",
        "4",
        "--out",
        str(tmp_path / "fm"),
    )
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "fm").iterdir()) == ["dress", "trouser"]
    assert len(list((tmp_path / "fm" / "dress").glob("*.png"))) == 4
