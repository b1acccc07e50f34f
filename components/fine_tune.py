"""fine_tune: unfreeze the top of the base, train gently, keep it only if it helps.

Runs only from a converged head (the pipeline gates on it and this step checks again).
BatchNorm layers stay frozen, so their moving statistics are never rewritten by a few
small batches. It trains on every stored record, the originals and the augmented views
augment wrote, as the head did. The result is compared with the head-only model on
validation: on small data fine-tuning can lose (the Keras guide's own run does), and
unless it gets more validation images right than the head, the head-only model is what
this step outputs, saying so. (A stricter "more than one standard error" rule kept the
head on 18 of 27 benchmark runs, though fine-tuning won on test in 24; see
benchmarks/RESULTS.md.)
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from common.artifacts import LABELS_FILE, MODEL_FILE, TRAINING_FILE
from components import examples
from components.component import step_component
from components.config import GraftConfig
from components.train_head import progress_callback

log = logging.getLogger(__name__)
CANDIDATE_FILE = "finetuned_candidate.keras"  # the fine-tuned model, whether chosen or not


class HeadNotConvergedError(ValueError):
    """Fine-tuning from a head that has not converged would wreck the pretrained features."""


@dataclass
class FineTuneResult:
    chosen: str  # "fine_tuned" or "head"
    reason: str
    head_val_accuracy: float
    tuned_val_accuracy: float
    unfrozen_layers: list[str]
    epochs: int


def unfreeze_top(base, *, layers: int, from_layer: str = "") -> list[str]:
    """Make the top ``layers`` weighted layers (or those from ``from_layer`` up) trainable.
    BatchNorm stays frozen. Returns the names of the layers now trainable."""
    import keras

    from components.backbones import leaf_layers

    leaves = [layer for layer in leaf_layers(base) if layer.weights]
    if from_layer:
        names = [layer.name for layer in leaves]
        if from_layer not in names:
            raise ValueError(
                f"Received `fine_tune_from_layer={from_layer!r}`: no such layer in {base.name}"
            )
        start = names.index(from_layer)
    else:
        start = max(0, len(leaves) - layers)
    base.trainable = True
    unfrozen = []
    for layer in leaf_layers(base):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = (not is_bn) and layer in leaves[start:]
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def fine_tune_model(
    examples_dir: str | Path, head_model_dir: str | Path, out_dir: str | Path, config: GraftConfig
) -> FineTuneResult:
    """Fine-tune the head model; write the CHOSEN model (tuned or head) to ``out_dir``."""
    import keras

    from components.backbones import find_base

    head_model_dir, out_dir = Path(head_model_dir), Path(out_dir)
    head_record = json.loads((head_model_dir / TRAINING_FILE).read_text())
    if not head_record.get("converged"):
        raise HeadNotConvergedError(
            f"The head in {head_model_dir} did not converge ({head_record.get('epochs')} epochs): "
            "fine-tuning needs a converged head; raise head_max_epochs or check the data"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    model = keras.models.load_model(head_model_dir / MODEL_FILE)
    val = examples.batches(examples_dir, "val", config.batch_size)
    counts = examples.read_spec(examples_dir)["counts"]
    model.compile(
        optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    head_accuracy = float(model.evaluate(val, verbose=0)[1])

    unfrozen = unfreeze_top(
        find_base(model), layers=config.fine_tune_layers, from_layer=config.fine_tune_from_layer
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # Every stored record, originals and their augmented views, as the head saw them.
    # Originals alone with fresh augmentation each epoch (the tutorials' way) stayed 1 point
    # under scratch at 100 labels/class; see benchmarks/RESULTS.md.
    train = examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed)
    history = model.fit(
        train, validation_data=val, epochs=config.fine_tune_max_epochs, verbose=2,
        shuffle=False,  # the dataset is shuffled above
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
            keras.callbacks.TensorBoard(str(out_dir / "tensorboard")),
            progress_callback("fine_tune", counts["train"], config.batch_size),
        ],
    ).history  # fmt: skip
    tuned_accuracy = float(model.evaluate(val, verbose=0)[1])
    val_images = counts["val"]
    model.save(out_dir / CANDIDATE_FILE)  # kept either way, so the comparison can be inspected

    if round(tuned_accuracy * val_images) > round(head_accuracy * val_images):
        chosen, reason = (
            "fine_tuned",
            f"val accuracy {tuned_accuracy:.4f} > head-only {head_accuracy:.4f} on {val_images} images",
        )
        shutil.copyfile(out_dir / CANDIDATE_FILE, out_dir / MODEL_FILE)
    else:
        chosen = "head"
        reason = (
            f"fine-tuning did not beat the head on validation "
            f"({tuned_accuracy:.4f} vs {head_accuracy:.4f} on {val_images} images); kept the head-only model"
        )
        shutil.copyfile(head_model_dir / MODEL_FILE, out_dir / MODEL_FILE)
    log.info("fine_tune: chose %s: %s", chosen, reason)
    shutil.copyfile(head_model_dir / LABELS_FILE, out_dir / LABELS_FILE)
    result = FineTuneResult(
        chosen, reason, head_accuracy, tuned_accuracy, unfrozen, len(history["val_loss"])
    )
    record = {**head_record, "step": "fine_tune", **asdict(result),
              "params": {**head_record.get("params", {}), **config.settings()},
              "fine_tune_history": {k: [float(v) for v in vs] for k, vs in history.items()}}  # fmt: skip
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str))
    return result


@step_component
def fine_tune(
    examples: Input[Dataset],
    head_model: Input[Model],
    model: Output[Model],
    fine_tune_metrics: Output[Metrics],
    fine_tune_layers: int = 20,
    fine_tune_from_layer: str = "",
    fine_tune_learning_rate: float = 1e-5,
    fine_tune_max_epochs: int = 10,
    patience: int = 3,
    batch_size: int = 32,
    seed: int = 0,
):
    """Fine-tune the top of the base; output the chosen model: the tuned one if it validates
    better than the head-only one, else the head-only one."""
    import logging

    from components.config import step_config
    from components.fine_tune import fine_tune_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    result = fine_tune_model(examples.path, head_model.path, model.path, config)
    fine_tune_metrics.log_metric("head_val_accuracy", result.head_val_accuracy)
    fine_tune_metrics.log_metric("tuned_val_accuracy", result.tuned_val_accuracy)
    model.metadata.update(
        {"chosen": result.chosen, "reason": result.reason, "settings": config.used()}
    )
