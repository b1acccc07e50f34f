"""The one configuration graft runs with.

Every step's core takes a ``GraftConfig``; the KFP components rebuild it from
their plain parameters, and the CLI changes fields with ``--set key=value``:

    cfg = with_overrides(GraftConfig(), ["image_size=64", "views=2"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

# The one container image every component runs in; `graft compile --image` replaces it.
GRAFT_IMAGE = "graft:latest"


@dataclass(frozen=True)
class GraftConfig:
    # --- validate: what a usable dataset looks like ---
    min_images_per_class: int = 5  # fewer than this cannot be split into train/val/test
    min_classes: int = 2  # a classifier needs at least two labels
    min_side: int = 16  # smaller images carry too little signal after resizing
    max_side: int = 8192  # larger sides are almost always a mistake (scans, panoramas)
    max_pixels: int = 40_000_000  # decompression-bomb guard (PIL warns at ~89M)
    max_file_bytes: int = 30_000_000  # a 30 MB photo is unusual; a 3 GB one is an attack
    max_imbalance_ratio: float = 20.0  # largest/smallest class; beyond it accuracy lies
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG")  # what the serving signature decodes

    # --- augment: examples the training steps read ---
    image_size: int = 96  # square side the base model sees; MobileNetV2 accepts 96..224
    channels: int = 3  # imagenet bases want RGB; grayscale sources are expanded
    views: int = 4  # K augmented views per training image, made once, reused every epoch
    val_fraction: float = 0.15  # share of images (by content hash) held out for early stopping
    test_fraction: float = 0.15  # share held out for evaluation and the champion comparison
    seed: int = 0  # fixes augmentation and initialisation so reruns reproduce

    # --- train_head: a new head on a frozen base ---
    base: str = "mobilenet_v2"  # keras.applications name, or a URI to a .keras base
    weights: str = "imagenet"  # "imagenet", "none", or a weights file/URI for a named base
    head_hidden_units: int = 0  # 0: pooling -> dropout -> softmax; >0 adds a dense layer
    dropout: float = 0.2  # regularises the small head on few labels
    batch_size: int = 32  # fits a 224px MobileNet on a small GPU and is fast on CPU
    head_learning_rate: float = 1e-3  # the head starts from random weights: a normal LR
    head_max_epochs: int = 50  # a cap; early stopping normally ends training first
    patience: int = 3  # epochs without val-loss improvement before stopping; with under ~100
    # validation images val loss is noisy: patience 10 gained 3.6 points at 10/class (RESULTS.md)
    min_delta: float = 1e-3  # smaller val-loss changes count as no improvement

    # --- fine_tune: only after the head converged ---
    fine_tune_layers: int = 20  # top N base layers unfrozen (BatchNorm stays frozen)
    fine_tune_from_layer: str = ""  # or unfreeze from this named layer upward
    fine_tune_learning_rate: float = 1e-5  # low, so pretrained features are nudged, not erased
    fine_tune_max_epochs: int = 10  # an epoch is every stored record: originals + their views
    scratch_baseline: bool = False  # also train the same net from random init, for comparison

    # --- evaluate: when a candidate may replace the served model ---
    top_k: int = 3  # top-k accuracy reported and top-k labels returned by serving
    bless_min_accuracy: float = 0.5  # absolute floor on test accuracy
    bless_tolerance: float = 0.01  # how much worse than the champion overall is still fine
    bless_class_tolerance: float = 0.05  # per-class recall regression allowed vs the champion

    def __post_init__(self):
        """Refuse values no step can work with, naming the setting (issue 16: at start,
        not three steps into a run)."""
        problems = [f"`{key}={getattr(self, key)}`: expected {rule}"
                    for key, rule, ok in _RULES if not ok(getattr(self, key))]  # fmt: skip
        if self.max_side < self.min_side:
            problems.append(f"`max_side={self.max_side}` is below `min_side={self.min_side}`")
        if self.val_fraction + self.test_fraction >= 1:
            problems.append(
                f"`val_fraction={self.val_fraction}` + `test_fraction={self.test_fraction}` "
                "leaves no training images: their sum must be below 1"
            )
        if problems:
            raise ValueError("Received " + "; ".join(problems))


def _at_least(low):
    return lambda value: value >= low


def _fraction(value) -> bool:
    return 0 <= value < 1


# Each setting's range: (name, what is expected, check).
_RULES = (
    ("min_images_per_class", ">= 1", _at_least(1)),
    ("min_classes", ">= 2 (a classifier needs two labels)", _at_least(2)),
    ("min_side", ">= 1", _at_least(1)),
    ("max_pixels", ">= 1", _at_least(1)),
    ("max_file_bytes", ">= 1", _at_least(1)),
    ("max_imbalance_ratio", ">= 1", _at_least(1)),
    ("image_size", ">= 1", _at_least(1)),
    ("channels", "1 or 3", lambda v: v in (1, 3)),
    ("views", ">= 0", _at_least(0)),
    ("val_fraction", "in [0, 1)", _fraction),
    ("test_fraction", "in [0, 1)", _fraction),
    ("batch_size", ">= 1", _at_least(1)),
    ("head_learning_rate", ">= 0", _at_least(0)),
    ("head_max_epochs", ">= 1", _at_least(1)),
    ("patience", ">= 1", _at_least(1)),
    ("dropout", "in [0, 1)", _fraction),
    ("fine_tune_layers", ">= 0", _at_least(0)),
    ("fine_tune_learning_rate", ">= 0", _at_least(0)),  # 0: weights kept (tests use it)
    ("fine_tune_max_epochs", ">= 0", _at_least(0)),
    ("top_k", ">= 1", _at_least(1)),
    ("bless_min_accuracy", ">= 0", _at_least(0)),  # above 1 blesses nothing: tests use it
    ("bless_tolerance", ">= 0", _at_least(0)),
    ("bless_class_tolerance", ">= 0", _at_least(0)),
)


def with_overrides(config: GraftConfig, assignments: list[str] | dict) -> GraftConfig:
    """Return ``config`` with ``key=value`` strings (or a dict) applied, values typed by field.

    Unknown keys and untypeable values raise ValueError naming the key and the
    value received.
    """
    types = {f.name: f.type for f in fields(GraftConfig)}
    items = (
        assignments.items()
        if isinstance(assignments, dict)
        else [_split_assignment(a) for a in assignments]
    )
    changes = {}
    for key, value in items:
        if key not in types:
            known = ", ".join(sorted(types))
            raise ValueError(f"Unknown setting `{key}`. Known settings: {known}")
        changes[key] = _coerce(key, value, types[key])
    return dataclasses.replace(config, **changes)


def _split_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"Received `{text}`: expected key=value")
    return key.strip(), value.strip()


def _coerce(key: str, value, type_name: str):
    if not isinstance(value, str):
        return tuple(value) if "tuple" in str(type_name) else value
    try:
        if type_name == "bool":
            lowered = value.lower()
            if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return lowered in {"true", "1", "yes"}
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if "tuple" in str(type_name):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value
    except ValueError as err:
        raise ValueError(f"Received `{key}={value}`: expected a {type_name}") from err
