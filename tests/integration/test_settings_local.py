"""Settings end to end under kfp.local: every GraftConfig field reaches, and is read by, each
step that takes it; a pretrained base needs no --set; a contradiction stops the CLI first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common import model_repository as repository
from common import storage
from components import datasets
from components.config import DAG_SETTINGS, SETTINGS, GraftConfig, kfp_value, with_overrides
from pipeline.cli import app
from pipeline.run import run_local
from tests.unit.test_config import COMPONENTS, settings_taken

pytestmark = pytest.mark.slow

# A value other than the default for every setting, chosen so the tiny run still goes
# through every gate to a pushed version.
EVERY_SETTING_CHANGED = {
    "min_images_per_class": 4,
    "min_classes": 3,
    "min_side": 17,
    "max_side": 4096,
    "max_pixels": 39_000_000,
    "max_file_bytes": 29_000_000,
    "max_imbalance_ratio": 19.0,
    "io_concurrency": 3,
    "allowed_formats": ("PNG",),
    "image_size": 24,
    "channels": 1,
    "views": 1,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "seed": 1,
    "base": None,  # the gray base written by the test
    "weights": "none",
    "head_hidden_units": 4,
    "dropout": 0.1,
    "batch_size": 16,
    "head_learning_rate": 0.01,
    "head_max_epochs": 30,
    "patience": 2,
    "min_delta": 0.05,  # the tiny head reaches val accuracy 1.0 and keeps shaving its loss
    "fine_tune_layers": 1,
    "fine_tune_from_layer": "top_conv",
    "fine_tune_learning_rate": 1e-4,
    "fine_tune_max_epochs": 1,
    "scratch_baseline": True,
    "top_k": 2,
    "bless_min_accuracy": 0.05,
    "bless_tolerance": 0.02,
    "bless_class_tolerance": 0.1,
    "precision": "float32",
    "replicas": 1,
    "bless_min_macro_recall": 0.2,
    "rollout": "canary",  # the first version: nothing served to compare with, it serves alone
    "canary_fraction": 0.2,
    "canary_min_requests": 50,
    "canary_max_error_rate": 0.02,
    "canary_max_latency_ratio": 2.0,
    "canary_min_agreement": 0.8,
    "canary_max_class_shift": 0.2,
    "rollout_serving_base_path": "/models/every",
    "reuse_budget_gb": 1.0,
}


def _gray_base(path: Path) -> str:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="low_conv")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="top_conv")(x)
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    return str(path)


def _recorded_settings(task_dir: Path) -> dict:
    """The ``settings`` a step recorded on its output artifact (what it read)."""
    output = json.loads((task_dir / "executor_output.json").read_text())
    for entry in output.get("artifacts", {}).values():
        for artifact in entry.get("artifacts", []):
            if "settings" in artifact.get("metadata", {}):
                return artifact["metadata"]["settings"]
    return {}


def test_every_setting_reaches_and_is_read_by_each_step_that_takes_it(tmp_path):
    changed = {**EVERY_SETTING_CHANGED, "base": _gray_base(tmp_path / "gray.keras")}
    # shards shapes the DAG (tests/unit/test_compile.py): a run has no parameter for it
    run_settings_ = set(SETTINGS) - set(DAG_SETTINGS)
    assert set(changed) == run_settings_
    assert all(changed[name] != getattr(GraftConfig(), name) for name in run_settings_)
    bucket = str(tmp_path / "bucket")
    datasets.write_synthetic_dataset(bucket, num_classes=3, per_class=20, size=32, seed=0)
    repo = str(tmp_path / "models")

    summary = run_local(bucket, repo, "every", with_overrides(GraftConfig(), changed),
                        pipeline_root=tmp_path / "runs")  # fmt: skip

    assert summary.pushed_version is not None, summary.outcome
    version_dir = Path(repo, "every", summary.pushed_version)
    pushed_params = json.loads((version_dir / "graft_metadata.json").read_text())["params"]
    reached = set()
    for component in COMPONENTS:
        expected = {name: kfp_value(changed[name]) for name in settings_taken(component)}
        if component.name == "push":  # push has no output artifact: the version records it
            recorded = {name: pushed_params[name] for name in expected}
        else:
            recorded = _recorded_settings(Path(summary.run_dir, component.name))
        assert recorded == expected, component.name
        reached |= set(recorded)
    assert reached == run_settings_


def test_a_pretrained_base_runs_with_no_set_and_a_contradiction_is_refused_first(tmp_path):
    if not Path(datasets.DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip(f"needs Fashion-MNIST at {datasets.DEBIAN_FASHION_MNIST} (make system-deps)")
    runner = CliRunner()
    base, bucket, repo = tmp_path / "base.keras", tmp_path / "fm", tmp_path / "models"
    pretrained = runner.invoke(app, [
        "pretrain", "--out", str(base), "--per-class", "100", "--epochs", "1",
    ])  # fmt: skip
    assert pretrained.exit_code == 0, pretrained.output
    assert "it carries the settings image_size=28, channels=1" in pretrained.output
    exported = runner.invoke(app, [
        "data", "fashion-mnist", "--classes", "1,3,5,7,9", "--per-class", "30", "--out", str(bucket),
    ])  # fmt: skip
    assert exported.exit_code == 0, exported.output

    refused = runner.invoke(app, [
        "run", "--data", str(bucket), "--model-repo", str(repo), "--base", str(base),
        "--set", "channels=3", "--pipeline-root", str(tmp_path / "refused"),
    ])  # fmt: skip
    assert refused.exit_code == 2
    assert "set channels=1" in refused.output
    assert not (tmp_path / "refused").exists()

    ran = runner.invoke(app, [
        "run", "--data", str(bucket), "--model-repo", str(repo), "--base", str(base),
        "--model-name", "fm", "--pipeline-root", str(tmp_path / "runs"), "--json",
    ])  # fmt: skip
    assert ran.exit_code == 0, ran.output[-3000:]
    assert "from base: image_size=28, channels=1" in ran.output
    summary = json.loads(ran.output[ran.output.rindex('{\n  "run_dir"') :])
    assert summary["pushed_version"], summary["outcome"]
    assert repository.versions(storage.join(str(repo), "fm")) == [int(summary["pushed_version"])]


def test_a_run_not_started_by_the_cli_is_refused_by_its_first_step(tmp_path):
    """What a cluster run started from the KFP UI gets: check_data refuses, nothing else runs."""
    base = _gray_base(tmp_path / "gray.keras")
    bucket = str(tmp_path / "bucket")
    datasets.write_synthetic_dataset(bucket, num_classes=3, per_class=6, size=32, seed=0)
    config = with_overrides(GraftConfig(), {"base": base, "channels": 3})

    summary = run_local(bucket, str(tmp_path / "models"), "m", config,
                        pipeline_root=tmp_path / "runs")  # fmt: skip

    assert summary.ran() == ["check-data"]
    assert "check-data FAILED" in summary.outcome
