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

The layers below the unfrozen top do not change while it trains, and graft's views are made
once and stored, so what those layers hand up is the same every epoch: like train_head's
feature cache, it is computed once (``frozen_frontier``) and only the top runs each epoch.
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
from components import examples
from components.component import step_component
from components.config import GraftConfig
from components.evaluate import guard_decision
from components.train_head import labelled_outputs, progress_callback

log = logging.getLogger(__name__)
CANDIDATE_FILE = "finetuned_candidate.keras"  # the fine-tuned model, whether chosen or not
# Above this many bytes of cached frozen activations, every epoch runs the whole base again.
FROZEN_CACHE_BYTES = 1 << 30


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
    guard: dict = field(default_factory=dict)  # evaluate.GuardDecision: counts, McNemar p-value


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


def flattened(model):
    """``model`` with its nested functional models (an application inside graft's base)
    replayed inline: one graph of the very same layer objects, so the line between frozen
    and trainable layers can be drawn inside the nested model."""
    import keras

    def replay(functional, tensors):
        def operation(op):
            if isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth"):
                return lambda *args, **kwargs: replay(op, args[0] if len(args) == 1 else args)
            return op

        return functional._run_through_graph(tensors, operation_fn=operation)

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
    return keras.Model(inputs, replay(model, inputs), name=f"{model.name}_flat")


def frozen_frontier(base) -> list:
    """The tensors of ``base``'s graph that no trainable weight influences but that a trainable
    layer or the output consumes: everything the frozen lower part hands up. Empty when no
    weighted layer is frozen below the trainable ones (caching would save nothing)."""
    nodes = base._nodes_by_depth  # Keras' own map of the functional graph; deepest = inputs
    live, frontier, frozen_work = set(), {}, False
    for depth in sorted(nodes, reverse=True):
        for node in nodes[depth]:
            if node.is_input:
                continue
            inputs = node.input_tensors
            if node.operation.trainable_weights or any(id(t) in live for t in inputs):
                live.update(id(t) for t in node.output_tensors)
                frontier.update((id(t), t) for t in inputs if id(t) not in live)
            elif node.operation.weights:
                frozen_work = True
    frontier.update((id(t), t) for t in base.outputs if id(t) not in live)
    return list(frontier.values()) if frozen_work else []


def output_shapes(model, input_shape: tuple) -> list[tuple]:
    """The shape of each of ``model``'s outputs for inputs of ``input_shape``, as a list."""
    shapes = model.compute_output_shape(input_shape)
    return [tuple(shapes)] if isinstance(shapes[0], int | None) else [tuple(s) for s in shapes]


def _on_frozen_activations(model, base, flat, frontier: list, shapes: list):
    """``model`` from ``frontier`` (tensors of ``flat``, the flattened ``base``) up: the same
    layer objects (training it trains ``model``), fed the frozen part's cached outputs."""
    import keras

    def one_or_all(tensors: list):
        return tensors if len(tensors) > 1 else tensors[0]

    upper = keras.Model(one_or_all(frontier), one_or_all(flat.outputs))
    inputs = [
        keras.Input(shape[1:], dtype=t.dtype) for t, shape in zip(frontier, shapes, strict=True)
    ]
    x = upper(one_or_all(inputs), training=False)
    after_base = model.layers[model.layers.index(base) + 1 :]  # pooling, then the head
    for layer in after_base:
        x = layer(x)
    return keras.Model(inputs, x, name="fine_tune_top")


def _what_to_fit(model, base, examples_dir, spec: dict, config: GraftConfig):
    """(the model fit trains, fit's data arguments, validation data, the cache's record).

    With frozen weighted layers below the unfrozen top (and their outputs under
    FROZEN_CACHE_BYTES), the frozen part runs once here and the top trains on its cached
    outputs; otherwise the whole model trains on the stored records, streamed."""
    import keras

    counts = spec["counts"]
    flat = flattened(base)
    frontier = frozen_frontier(flat)
    if frontier:
        lower = keras.Model(flat.inputs, frontier)
        image_shape = (None, spec["image_size"], spec["image_size"], spec["channels"])
        shapes = output_shapes(lower, image_shape)  # the base's own sizes may be None
        records = counts["train"] + counts["val"]
        cache_bytes = sum(4 * int(np.prod(shape[1:])) for shape in shapes) * records
        if cache_bytes > FROZEN_CACHE_BYTES:
            log.info("fine_tune: the frozen part's outputs would take %.1f GB (> %.1f); running "
                     "the whole base every epoch", cache_bytes / 1e9, FROZEN_CACHE_BYTES / 1e9)  # fmt: skip
            frontier = []
    if not frontier:
        # Every stored record, originals and their augmented views, as the head saw them.
        # Originals alone with fresh augmentation each epoch (the tutorials' way) stayed 1
        # point under scratch at 100 labels/class; see benchmarks/RESULTS.md.
        shuffled = examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed)  # fmt: skip
        train = {"x": shuffled, "shuffle": False}  # the dataset is shuffled already
        return model, train, examples.batches(examples_dir, "val", config.batch_size), {}

    started = time.perf_counter()
    progress = Progress(log, "fine_tune: the frozen part, once", records, unit="records")
    train_x, train_y = labelled_outputs(
        lower, examples.dataset(examples_dir, "train"), counts["train"], progress, pool=False
    )
    val_x, val_y = labelled_outputs(
        lower, examples.dataset(examples_dir, "val"), counts["val"], progress, pool=False
    )
    progress.done()
    cached = {"tensors": [t.name for t in frontier], "bytes": cache_bytes,
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    log.info("fine_tune: the frozen part ran once over %d records (%.1f MB cached, %.1fs); only "
             "the top trains each epoch", records, cache_bytes / 1e6, cached["seconds"])  # fmt: skip
    unpack = (lambda xs: xs) if len(frontier) > 1 else (lambda xs: xs[0])
    train = {"x": unpack(train_x), "y": train_y, "batch_size": config.batch_size, "shuffle": True}
    top = _on_frozen_activations(model, base, flat, frontier, shapes)
    return top, train, (unpack(val_x), val_y), cached


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
    model = keras.models.load_model(head_model_dir / MODEL_FILE)
    spec = examples.read_spec(examples_dir)
    counts = spec["counts"]
    base = find_base(model)
    unfrozen = unfreeze_top(
        base, layers=config.fine_tune_layers, from_layer=config.fine_tune_from_layer
    )
    trained, train, val, cached = _what_to_fit(model, base, examples_dir, spec, config)
    for compiled in {id(model): model, id(trained): trained}.values():
        compiled.compile(
            optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    def val_correct() -> np.ndarray:
        """One bool per validation image, in order: does the model being trained get it right."""
        if isinstance(val, tuple):
            predicted = trained.predict(val[0], batch_size=config.batch_size, verbose=0)
            return predicted.argmax(axis=1) == val[1]
        truth = np.concatenate([labels for _, labels in val.as_numpy_iterator()])
        return trained.predict(val, verbose=0).argmax(axis=1) == truth

    head_correct = val_correct()  # the weights are still the head model's
    head_accuracy = float(head_correct.mean())
    history = trained.fit(
        **train, validation_data=val, epochs=config.fine_tune_max_epochs, verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
            keras.callbacks.TensorBoard(str(out_dir / "tensorboard")),
            progress_callback("fine_tune", counts["train"], config.batch_size),
        ],
    ).history  # fmt: skip
    tuned_correct = val_correct()
    tuned_accuracy = float(tuned_correct.mean())
    steps = int(trained.optimizer.iterations.numpy())
    model.save(out_dir / CANDIDATE_FILE)  # kept either way, so the comparison can be inspected

    guard = guard_decision(head_correct, tuned_correct)
    chosen, reason = guard.chosen, guard.reason
    log.info("fine_tune: chose %s: %s", chosen, reason)
    epochs = len(history.get("val_loss", []))
    result = FineTuneResult(
        chosen, reason, head_accuracy, tuned_accuracy, unfrozen, epochs, steps, cached
    )
    result.guard = asdict(guard)  # the choice's evidence, recorded in training.json
    return _keep_and_record(result, head_model_dir, out_dir, head_record, config, history)


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
