"""A training step killed mid-training (a spot VM reclaimed, a KFP retry) resumes from its
last completed epoch when run again with the same outputs. The kill is real: fine_tune runs
in a subprocess, SIGKILLed once it logs that epoch k is saved (no sleeping)."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from components import datasets, training
from components.augment import augment_dataset
from components.config import GraftConfig
from components.fine_tune import fine_tune_model
from components.train_head import train_head_model
from tests.unit.test_training import tiny_base

ROOT = Path(__file__).resolve().parents[2]
CONFIG = GraftConfig(
    image_size=16, channels=3, views=1, batch_size=16, head_learning_rate=0.01, head_max_epochs=60,
    patience=10, fine_tune_layers=1, fine_tune_max_epochs=4, fine_tune_learning_rate=1e-3,
    dropout=0.0, min_delta=0.05,
)  # fmt: skip
STEP = """
import json, logging, sys
from components.config import GraftConfig
from components.fine_tune import fine_tune_model
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
examples_dir, head_dir, out_dir, settings = sys.argv[1:5]
fine_tune_model(examples_dir, head_dir, out_dir, GraftConfig(**json.loads(settings)))
"""


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    datasets.write_synthetic_dataset(str(root / "data"), num_classes=3, per_class=12, size=16, seed=2)  # fmt: skip
    config = replace(CONFIG, base=tiny_base(root / "base.keras", batch_norm=False))
    augment_dataset(str(root / "data"), root / "examples", config)
    assert train_head_model(root / "examples", root / "head", config).converged
    return root, config


def run_and_kill_after(epochs: int, root: Path, out_dir: Path, config) -> list[str]:
    """Run fine_tune in a subprocess and SIGKILL it once epoch ``epochs`` is saved."""
    settings = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()})  # fmt: skip
    args = [sys.executable, "-c", STEP, str(root / "examples"), str(root / "head"), str(out_dir), settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    step = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen = []
    for line in step.stderr:
        seen.append(line)
        if f"fine_tune: epoch {epochs} done and saved" in line:
            step.send_signal(signal.SIGKILL)
            break
    step.wait(timeout=60)
    assert step.returncode == -signal.SIGKILL, "".join(seen[-20:])
    return seen


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_killed_after_two_epochs_resumes_at_two_and_ends_like_an_uninterrupted_run(
    trained_head, tmp_path
):
    root, config = trained_head
    uninterrupted = fine_tune_model(root / "examples", root / "head", tmp_path / "whole", config)
    assert uninterrupted.resumed_from_epoch == 0 and uninterrupted.epochs == 4

    run_and_kill_after(2, root, tmp_path / "tuned", config)
    left = training.resume_dir(tmp_path / "tuned")
    assert (left / "frozen_part" / "complete.json").exists() and not (
        tmp_path / "tuned" / "training.json"
    ).exists()

    resumed = fine_tune_model(root / "examples", root / "head", tmp_path / "tuned", config)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs == 4  # the same total epochs
    assert resumed.cached["reused"] is True  # the complete frozen-part cache was not recomputed
    record = json.loads((tmp_path / "tuned" / "training.json").read_text())
    assert record["resumed_from_epoch"] == 2 and len(record["fine_tune_history"]["val_loss"]) == 4
    assert not left.exists()  # cleaned up once the outputs are written
    # The first two epochs are the killed run's own; the resumed ones read the epochs' own
    # order (training.shuffled_records: a function of the seed and the epoch).
    whole = json.loads((tmp_path / "whole" / "training.json").read_text())
    np.testing.assert_allclose(
        record["fine_tune_history"]["val_loss"], whole["fine_tune_history"]["val_loss"], rtol=0.05
    )
    assert abs(resumed.tuned_val_accuracy - uninterrupted.tuned_val_accuracy) <= 0.1
