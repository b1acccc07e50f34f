"""File names of what graft's steps hand each other, in one place.

A model directory (train_head's and fine_tune's output, push's input) holds::

    <model>/model.keras      the Keras model (the chosen one)
    <model>/labels.txt       one class name per line; line i is class id i
    <model>/training.json    how it was trained: base, params, history, which model was chosen

An examples directory (augment's output) also holds ``labels.txt``; an evaluation directory
holds ``evaluation.json``. The model repository's own names (``saved_model.pb``,
``graft_metadata.json``) live in ``common/model_repository.py``.

    from common.artifacts import MODEL_FILE
    keras.models.load_model(Path(model_dir) / MODEL_FILE)
"""

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
TRAINING_FILE = "training.json"
EVALUATION_FILE = "evaluation.json"
