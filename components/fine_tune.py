"""fine_tune: unfreeze the top of the base, train gently, keep it only if it helps.

Runs only from a converged head (the pipeline gates on it and this step checks again).
BatchNorm layers stay frozen, so their moving statistics are never rewritten by a few
small batches. It trains on the stored records, the originals and the augmented views
augment wrote, as the head did; where the whole model trains, an epoch reads each image
once, its view rotating from epoch to epoch (examples.rotated_view). The result is compared with the head-only model on
validation: on small data fine-tuning can lose (the Keras guide's own run does), and
unless it gets more validation images right than the head (or as many at a lower
validation loss), the head-only model is what this step outputs, saying so. (A stricter
"more than one standard error" rule kept the head on 18 of 27 benchmark runs, though
fine-tuning won on test in 24; see benchmarks/RESULTS.md.)

The layers below the unfrozen top do not change while it trains, so what they hand up is
computed once and only the top trains each epoch, where that is the same computation
(components/frozen.py decides, and training.json says why when it is not). The training
machinery (precision, devices, the one fit with early stopping and resumption) is
components/training.py.
"""

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from common.artifacts import LABELS_FILE, MODEL_FILE, TRAINING_FILE
from common.progress import Progress
from components import examples, features, frozen, training
from components.component import step_component
from components.config import GraftConfig
from components.evaluate import guard_decision
from components.frozen import unfreeze_top

log = logging.getLogger(__name__)
CANDIDATE_FILE = "finetuned_candidate.keras"  # the fine-tuned model, whether chosen or not
# Above this many bytes of cached frozen activations (on local disk, in shards streamed by
# tf.data: memory does not grow with them), every epoch runs the whole base again.
FROZEN_CACHE_BYTES = 64 << 30


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
    steps: int = 0  # optimizer steps taken
    cached: dict = field(default_factory=dict)  # the frozen part's cache: tensors, bytes, seconds
    uncached_reason: str = ""  # why the whole model trained every epoch, when it did
    resumed_from_epoch: int = 0  # epochs a killed earlier run of this step had completed
    precision: str = "float32"  # the dtype policy the step trained with
    replicas: int = 1
    optimizer: str = ""  # LossScaleOptimizer under mixed_float16 (float16 gradients underflow)
    guard: dict = field(default_factory=dict)  # evaluate.GuardDecision: counts, McNemar p-value


def _validation(examples_dir, spec: dict, config: GraftConfig):
    """The validation images for the whole model's fit: in memory where they fit
    (training.validation_data), else streamed batches."""
    return training.validation_data(
        examples.dataset(examples_dir, "val"), rows=spec["counts"]["val"],
        row_bytes=4 * spec["image_size"] ** 2 * spec["channels"],
        batches=lambda: examples.batches(examples_dir, "val", config.batch_size),
    )  # fmt: skip


def _what_to_fit(model, examples_dir, spec: dict, config: GraftConfig, out_dir: Path):
    """(the model fit trains, fit's data arguments, validation data, the cache's record, why
    there is no cache).

    With frozen weighted layers below the unfrozen top that compute in training what they
    compute in inference (and their outputs under FROZEN_CACHE_BYTES), the frozen part runs
    once here into shards on disk (or a killed earlier run's complete shards are read) and
    the top trains on its cached outputs, streamed and shuffled across shards; otherwise the whole model trains on the stored records, streamed."""
    counts = spec["counts"]
    part = frozen.split(model)
    reason = part.refusal
    if part.frontier:
        lower = frozen.lower_part(part)
        image_shape = (None, spec["image_size"], spec["image_size"], spec["channels"])
        shapes = frozen.output_shapes(lower, image_shape)  # the base's own sizes may be None
        records = counts["train"] + counts["val"]
        cache_bytes = sum(4 * int(np.prod(shape[1:])) for shape in shapes) * records
        if cache_bytes > FROZEN_CACHE_BYTES:
            reason = (f"the frozen part's outputs would take {cache_bytes / 1e9:.1f} GB "
                      f"(> FROZEN_CACHE_BYTES {FROZEN_CACHE_BYTES / 1e9:.1f} GB)")  # fmt: skip
    if reason:
        log.info("fine_tune: the whole model trains every epoch: %s", reason)
        # The stored records, originals and their augmented views, as the head saw them, but
        # each image once per epoch, its view rotating: an epoch of all of them cost views + 1
        # passes of the whole model. Originals alone with fresh augmentation each epoch (the
        # tutorials' way) stayed 1 point under scratch at 100 labels/class (RESULTS.md). The
        # order and the view are functions of (seed, epoch): a resumed run and two replicas
        # read what one uninterrupted device does.
        train = training.Epochs(
            lambda epoch: examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed, epoch=epoch, rotate=True),
            steps=-(-examples.images(spec, "train") // config.batch_size),
        )  # fmt: skip
        return model, train, _validation(examples_dir, spec, config), {}, reason

    started = time.perf_counter()
    names = frozen.frontier_names(part)
    key = training.cache_key(
        settings=config.settings(), spec=spec, frontier=names, step="fine_tune"
    )
    folder = training.resume_dir(out_dir) / "frozen_part"
    made = features.is_complete(folder, key)
    reused = made is not None
    if made is None:  # a killed earlier run's complete shards are reused, else made
        features.clear(folder)
        progress = Progress(log, "fine_tune: the frozen part, once", records, unit="records")
        stored = {split: _frozen_outputs(lower, examples_dir, split, progress) for split in ("train", "val")}  # fmt: skip
        written = {split: features.write_shards(folder, split, rows) for split, rows in stored.items()}  # fmt: skip
        progress.done()
        made = {"counts": written, "shapes": [list(s) for s in _concrete(lower, spec)]}
        features.mark_complete(folder, key, **made)
    shapes = [tuple(s) for s in made["shapes"]]
    cached = {"tensors": names, "bytes": cache_bytes, "reused": reused,
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    log.info("fine_tune: the frozen part ran once over %d records (%.1f MB cached on disk, %.1fs); "
             "only the top trains each epoch", records, cache_bytes / 1e6, cached["seconds"])  # fmt: skip
    train, val = features.training_data(folder, shapes, counts, config)
    return frozen.cached_top(part, [(None, *s) for s in shapes]), train, val, cached, ""


def _concrete(lower, spec: dict) -> list[tuple]:
    """The frozen part's output shapes for one stored image, without the batch axis."""
    image_shape = (1, spec["image_size"], spec["image_size"], spec["channels"])
    return [tuple(s[1:]) for s in frozen.output_shapes(lower, image_shape)]


def _frozen_outputs(lower, examples_dir, split: str, progress):
    """``(outputs, label)`` per record of ``split``, in stored order: the frozen part run in
    one padded batch shape per split (``training.feature_batch_size``), one batch in memory
    at a time."""
    batch = training.feature_batch_size(examples.read_spec(examples_dir)["counts"][split])
    for images, labels in examples.dataset(examples_dir, split).batch(batch).as_numpy_iterator():
        count = len(labels)
        padded = np.zeros((batch, *images.shape[1:]), "float32")
        padded[:count] = images
        values = lower.predict_on_batch(padded)
        values = [np.asarray(v, "float32")[:count] for v in (values if isinstance(values, list | tuple) else [values])]  # fmt: skip
        for k in range(count):
            yield [v[k] for v in values], labels[k]
        progress.advance(count)


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
    if not config.fine_tune_max_epochs:  # the head-only model asked for: nothing to load or train
        accuracy = float(head_record.get("val_accuracy", 0.0))
        reason = "fine_tune_max_epochs=0: no fine-tuning; kept the head-only model"
        log.info("fine_tune: %s", reason)
        return _keep_and_record(
            FineTuneResult("head", reason, accuracy, accuracy, [], 0),
            head_model_dir, out_dir, head_record, config, {},
        )  # fmt: skip
    keras.utils.set_random_seed(config.seed)
    spec = examples.read_spec(examples_dir)
    counts = spec["counts"]
    with training.training_setup(config.precision, config.replicas) as setup:
        with setup.strategy.scope():
            model = keras.models.load_model(head_model_dir / MODEL_FILE)
            unfrozen = unfreeze_top(
                find_base(model), layers=config.fine_tune_layers, from_layer=config.fine_tune_from_layer
            )  # fmt: skip
            trained, train, val, cached, uncached = _what_to_fit(model, examples_dir, spec, config, out_dir)  # fmt: skip
            for compiled in {id(model): model, id(trained): trained}.values():
                compiled.compile(optimizer=setup.optimizer(config.fine_tune_learning_rate),
                                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip

        def val_outcomes() -> tuple[np.ndarray, float]:
            """(one bool per validation image, in order: does the model being trained get it
            right; the mean cross-entropy over them), for the guard."""
            if isinstance(val, tuple):
                predicted, truth = trained.predict(val[0], batch_size=config.batch_size, verbose=0), val[1]  # fmt: skip
            else:
                truth = np.concatenate([labels for _, labels in val.as_numpy_iterator()])
                predicted = trained.predict(val, verbose=0)
            losses = keras.losses.sparse_categorical_crossentropy(truth, predicted)
            loss = float(np.mean(keras.ops.convert_to_numpy(losses)))
            return predicted.argmax(axis=1) == truth, loss

        head_correct, head_loss = val_outcomes()  # the weights are still the head model's
        run = training.fit(
            trained, train, val, config=config, epochs=config.fine_tune_max_epochs,
            out_dir=out_dir, what="fine_tune", name="fine_tune",
            records=counts["train"] if cached else examples.images(spec, "train"),
        )  # fmt: skip
        tuned_correct, tuned_loss = val_outcomes()
        steps = int(trained.optimizer.iterations.numpy())
        model.save(out_dir / CANDIDATE_FILE)  # kept either way, so the comparison can be inspected
    head_accuracy, tuned_accuracy = float(head_correct.mean()), float(tuned_correct.mean())

    guard = guard_decision(head_correct, tuned_correct, head_loss=head_loss, tuned_loss=tuned_loss)
    chosen, reason = guard.chosen, guard.reason
    log.info("fine_tune: chose %s: %s", chosen, reason)
    result = FineTuneResult(
        chosen, reason, head_accuracy, tuned_accuracy, unfrozen, run.epochs, steps, cached,
        uncached, run.resumed_from_epoch, setup.policy, setup.replicas,
        type(trained.optimizer).__name__, asdict(guard),
    )  # fmt: skip
    kept = _keep_and_record(result, head_model_dir, out_dir, head_record, config, run.history)
    training.finished(out_dir)
    return kept


def _keep_and_record(
    result: FineTuneResult, head_model_dir: Path, out_dir: Path, head_record: dict, config, history
) -> FineTuneResult:
    """Write the chosen model, the labels and the training record to ``out_dir``."""
    chosen = (
        out_dir / CANDIDATE_FILE if result.chosen == "fine_tuned" else head_model_dir / MODEL_FILE
    )
    shutil.copyfile(chosen, out_dir / MODEL_FILE)
    shutil.copyfile(head_model_dir / LABELS_FILE, out_dir / LABELS_FILE)
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
    min_delta: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    precision: str = "auto",
    replicas: int = 0,
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
