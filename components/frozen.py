"""The frozen part of a model being fine-tuned: what to unfreeze, and what can be cached.

Layers below the unfrozen top do not change while it trains, and graft's views are made
once and stored, so what those layers hand up is the same every epoch: it is computed once
and only the top runs each epoch. That holds only where the frozen part computes in
training what it computes in inference: Keras passes ``training=True`` into every nested
layer during ``fit`` (whatever ``training=False`` the graph was built with), so a Dropout
or stochastic-depth layer in the frozen part would train differently cached; there the
cache is refused, with the reason.

    part = split(model)          # the whole model, nested models inline, traced once
    part.frontier, part.refusal  # the tensors to cache; why not to, if so
    top = cached_top(part, shapes)

Public Keras APIs where there are some: ``keras.models.clone_model`` (reusing the layer
objects, with a ``call_function`` that inlines nested models and records who feeds whom) and
``keras.Model(inputs, outputs)`` over the existing graph. One private attribute is read: a
KerasTensor's ``_keras_history`` (which layer made it), to find a nested model's outputs
among the tensors its layers produced when replayed inline.
"""

from dataclasses import dataclass, field


@dataclass
class FrozenSplit:
    flat: object  # keras.Model: the whole model, nested models inline, same layer objects
    frontier: list = field(default_factory=list)  # tensors of ``flat`` to cache (may be empty)
    refusal: str = ""  # why the frozen part cannot be cached, when it cannot


def unfreeze_top(base, *, layers: int, from_layer: str = "") -> list[str]:
    """Make the top ``layers`` weighted layers of ``base`` (or those from ``from_layer`` up)
    trainable; BatchNorm layers among them count but stay frozen, and graft's own
    preprocessing layers (backbones.PREPROCESSING_LAYERS) are never counted or unfrozen.
    Returns the names of the layers now trainable."""
    import keras

    from components.backbones import PREPROCESSING_LAYERS, leaf_layers

    leaves = [layer for layer in leaf_layers(base) if layer.weights]
    leaves = [layer for layer in leaves if layer.name not in PREPROCESSING_LAYERS]
    if from_layer:
        names = [layer.name for layer in leaves]
        if from_layer not in names:
            raise ValueError(
                f"Received `fine_tune_from_layer={from_layer!r}`: no such layer in {base.name} "
                f"(graft's preprocessing layers {sorted(PREPROCESSING_LAYERS)} are never tuned)"
            )
        start = names.index(from_layer)
    else:
        start = max(0, len(leaves) - layers)
    top = leaves[start:]
    base.trainable = True
    unfrozen = []
    for layer in leaf_layers(base):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = (not is_bn) and layer in top
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def _changes_in_training(layer) -> bool:
    """Whether ``layer`` may compute differently under ``training=True`` while frozen.
    A frozen BatchNormalization runs in inference mode whatever ``training`` says (Keras 3);
    any other layer whose call takes ``training`` (Dropout, noise, stochastic depth, a
    custom layer) is assumed to."""
    import keras

    if not isinstance(layer, keras.layers.Layer):
        return False  # a raw op (keras.ops.add in a functional graph) has no training mode
    if isinstance(layer, keras.layers.BatchNormalization) and not layer.trainable:
        return False
    return bool(getattr(layer, "_call_has_training_arg", False))


def split(model) -> FrozenSplit:
    """Trace ``model`` once: inline its nested functional models and find the frontier, the
    tensors no trainable weight influences that a trainable part (or the output) consumes.
    No frontier when no weighted layer is frozen below the trainable ones (nothing to save)."""
    import keras
    from keras import tree

    live, frontier, frozen_work, stochastic, produced = set(), {}, False, [], {}

    def is_tensor(value) -> bool:
        return isinstance(value, keras.KerasTensor)

    def call(operation, *args, **kwargs):
        if isinstance(operation, keras.Model) and not isinstance(operation, keras.Sequential):
            # Replays the nested model's layers on this graph's tensors (through ``call``).
            # The model clone_model builds around them re-creates its inputs and outputs,
            # so its own outputs are looked up in what its last layers produced.
            keras.models.clone_model(
                operation, input_tensors=args[0] if len(args) == 1 else list(args),
                clone_function=lambda op: op, call_function=call,
            )  # fmt: skip
            replayed = [produced[id(t._keras_history.operation)][t._keras_history.tensor_index]
                        for t in operation.outputs]  # fmt: skip
            produced[id(operation)] = replayed  # a model nested in a nested model
            return replayed if len(replayed) > 1 else replayed[0]
        nonlocal frozen_work
        inputs = [t for t in tree.flatten((args, kwargs)) if is_tensor(t)]
        outputs = operation(*args, **kwargs)
        produced[id(operation)] = tree.flatten(outputs)
        weights = getattr(operation, "weights", [])
        if getattr(operation, "trainable_weights", []) or any(id(t) in live for t in inputs):
            live.update(id(t) for t in tree.flatten(outputs) if is_tensor(t))
            frontier.update((id(t), t) for t in inputs if id(t) not in live)
        else:
            frozen_work = frozen_work or bool(weights)
            if _changes_in_training(operation):
                stochastic.append(f"{operation.name} ({type(operation).__name__})")
        return outputs

    flat = keras.models.clone_model(model, clone_function=lambda op: op, call_function=call)
    frontier.update((id(t), t) for t in flat.outputs if id(t) not in live)
    if not frozen_work:
        return FrozenSplit(flat, [], "no frozen weighted layer below the trainable ones")
    if stochastic:
        return FrozenSplit(flat, [], (
            f"the frozen part holds layers that compute differently while training "
            f"({', '.join(stochastic[:5])}{' ...' if len(stochastic) > 5 else ''}): Keras runs "
            "them in training mode during fit, so cached outputs would train another model"
        ))  # fmt: skip
    return FrozenSplit(flat, list(frontier.values()))


def frontier_names(part: FrozenSplit) -> list[str]:
    """The frontier as ``layer:output index`` names (stable across processes, unlike the
    tensors' own generated names), for the record and the cache's key."""
    return [f"{t._keras_history.operation.name}:{t._keras_history.tensor_index}" for t in part.frontier]  # fmt: skip


def lower_part(part: FrozenSplit):
    """The frozen part: the whole model's inputs -> the frontier (its outputs are cached)."""
    import keras

    return keras.Model(part.flat.inputs, part.frontier)


def output_shapes(model, input_shape: tuple) -> list[tuple]:
    """The shape of each of ``model``'s outputs for inputs of ``input_shape``, as a list."""
    shapes = model.compute_output_shape(input_shape)
    return [tuple(shapes)] if isinstance(shapes[0], int | None) else [tuple(s) for s in shapes]


def cached_top(part: FrozenSplit, shapes: list[tuple]):
    """The model from the frontier up, fed the frozen part's cached outputs (of ``shapes``):
    the same layer objects as the whole model, so training it trains the whole model."""
    import keras

    def one_or_all(tensors: list):
        return tensors if len(tensors) > 1 else tensors[0]

    upper = keras.Model(one_or_all(part.frontier), one_or_all(part.flat.outputs))
    inputs = [
        keras.Input(shape[1:], dtype=t.dtype)
        for t, shape in zip(part.frontier, shapes, strict=True)
    ]
    return keras.Model(inputs, upper(one_or_all(inputs)), name="fine_tune_top")
