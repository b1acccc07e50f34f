"""The one configuration graft runs with, and the one place its defaults are written.

Config travels one way: ``GraftConfig`` -> pipeline parameters (one per field, same name,
same default: pipeline/pipeline.py derives them) -> each step's KFP component, whose
signature names the fields that step uses and rebuilds them with ``step_config(locals())``.
The CLI changes fields by the same names everywhere (``graft run/watch --set``,
``graft submit/schedule --param``):

    cfg = with_overrides(GraftConfig(), ["image_size=64", "views=2"])
    cfg, sources = resolve({"image_size": 28}, ["views=2"])  # default < the base's < --set

KFP serializes only a component function's source, so the defaults in component
signatures are literals; tests/unit/test_config.py fails when one differs from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields

# The one container image every component runs in; `graft compile --image` replaces it.
GRAFT_IMAGE = "graft:latest"


@dataclass(frozen=True)
class GraftConfig:
    # --- validate: what a usable dataset looks like ---
    min_images_per_class: int = 5  # at least one each for train, val and test; the hash split
    # may still leave a class of 5 without a test image (0.85^5 = 44%): validate names it
    min_classes: int = 2  # a classifier needs at least two labels
    min_side: int = 16  # smaller images carry too little signal after resizing
    max_side: int = 8192  # larger sides are almost always a mistake (scans, panoramas)
    max_pixels: int = 40_000_000  # decompression-bomb guard (PIL warns at ~89M)
    max_file_bytes: int = 30_000_000  # a 30 MB photo is unusual; a 3 GB one is an attack
    max_imbalance_ratio: float = 20.0  # largest/smallest class; beyond it accuracy lies
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG")  # what the serving signature decodes
    io_concurrency: int = 16  # storage reads/writes in flight at once: a GCS read waits tens of
    # ms; 16 in flight read 10x faster than one at a time at 20 ms/request (RESULTS.md "Scale").
    # A local reuse store's entries are read one at a time (storage.read_concurrency).

    # --- fan-out: the DAG's shape, fixed when the pipeline is built (not a run parameter) ---
    shards: int = 1  # validate, augment and the feature pass run as this many parallel tasks
    # (dsl.ParallelFor, all at once) over shards of the data by hash, gathered (dsl.Collected)
    # into examples and features equal byte for byte to shards=1; 1 keeps the one-task DAG.
    # KFP/Argo schedules the pods; on one machine it only adds overhead (RESULTS.md "Fan-out")

    # --- augment: examples the training steps read ---
    image_size: int = 96  # square side the base model sees; MobileNetV2 accepts 96..224
    channels: int = 3  # imagenet bases want RGB; grayscale sources are expanded
    views: int = 4  # K augmented views per training image, made once, reused every epoch
    val_fraction: float = 0.15  # share of images (by content hash) held out for early stopping
    test_fraction: float = 0.15  # share held out for evaluation and the champion comparison
    seed: int = 0  # fixes augmentation and initialisation so reruns reproduce
    reuse_budget_gb: float = 50.0  # size of the reuse store beside the model repository
    # (records and base features of each image, kept across runs: a retrain computes only new
    # images); past it the least recently used entries go. 0 keeps only the last run's

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
    fine_tune_max_epochs: int = 10  # an epoch reads each image once, its view rotating by
    # epoch, where the whole model trains; every stored record where the frozen part is cached;
    # 0 skips fine-tuning (the head-only model goes on: benchmarks/RESULTS.md, recipe)
    scratch_baseline: bool = False  # also train the same net from random init, for comparison
    precision: str = "auto"  # one dtype policy for every training step (a step that trained in
    # float16 and one that did not would not share weights safely): "auto" = mixed_float16 on
    # a GPU with float16 tensor cores, else float32; "float32"; "mixed_float16" (loss-scaled)
    replicas: int = 0  # devices training is mirrored over (tf.distribute.MirroredStrategy);
    # 0 = every visible GPU. batch_size stays the GLOBAL batch (each replica gets
    # batch_size/replicas) and learning rates are unchanged, so 1 and N replicas train the
    # same model; raise batch_size (and the LR with it) yourself to use more GPUs' memory.
    # Both training steps (tests/unit/test_replicas.py; limits in docs/RELIABILITY.md)

    # --- evaluate: when a candidate may replace the served model ---
    top_k: int = 3  # top-k accuracy reported and top-k labels returned by serving
    bless_min_accuracy: float = 0.5  # absolute floor on test accuracy
    bless_min_macro_recall: float = 0.5  # mean per-class recall floor: plain accuracy hides a
    # class the model never gets right (a 20:1 majority-class predictor scores 0.95, recall 0.5)
    bless_tolerance: float = 0.01  # how much worse than the champion overall is still fine
    bless_class_tolerance: float = 0.05  # per-class recall regression allowed vs the champion

    # --- push: how a blessed version reaches traffic (serving/rollout.py, README "Canary") ---
    rollout: str = "direct"  # "direct": the new version serves all traffic once published
    # (TF Serving's latest policy); "canary": loaded beside the served one, labelled `canary`
    # once AVAILABLE, checked on live requests, then promoted or rolled back by `graft rollout`
    canary_fraction: float = 0.1  # share of client requests sent to the canary (graft's
    # client routes by label): a bad canary reaches 1 request in 10, and at 10 req/s the
    # minimum below is met in under a minute
    canary_min_requests: int = 200  # paired requests (same input to canary and stable) before
    # promoting: at a true 5% error rate, 200 requests show <= 2 errors with probability 0.2%
    canary_max_error_rate: float = 0.01  # canary errors (RPC errors, NaN/inf outputs) above
    # stable's on the same requests; 2 in 200 is noise, a 5% failure is not
    canary_max_latency_ratio: float = 1.5  # canary p99 / stable p99 on the same requests
    # (sent together, so both see the same load): 2x slower is caught, load noise is not
    canary_min_agreement: float = 0.9  # top-1 agreement with stable on the same inputs: the
    # candidate was blessed on the test set, so live disagreement beyond 10% means broken
    # preprocessing or inputs unlike the test set
    canary_max_class_shift: float = 0.1  # total variation distance between the predicted-class
    # distributions of canary and stable: a canary that piles onto one class
    rollout_serving_base_path: str = ""  # the model's folder as the server sees it, written
    # as base_path in models.config; "" = where push writes (right for gs:// and local runs;
    # kind mounts .graft/kind-models at /models, so there: /models/<model_name>)

    def __post_init__(self):
        """Refuse values no step can work with, naming the setting (issues 16, 23: at start,
        not three steps into a run). Every source goes through here (defaults, a base's
        graft_settings.json, --set, --param, a step's parameters), so each value is first
        typed (a list, null or 1.5 for an int is refused, not passed on), then checked for
        what the step needs. Reads fields past StepConfig's guard: this checks every value,
        whichever a step was given. What needs the base itself (its layers, its input shape,
        its weights) is checked in components/backbones.py."""
        value = functools.partial(object.__getattribute__, self)
        problems, typed = [], set()
        for f in fields(GraftConfig):
            normal, problem = _typed(f.name, value(f.name), str(f.type))
            if problem:
                problems.append(problem)
                continue
            object.__setattr__(self, f.name, normal)
            typed.add(f.name)
        problems += [f"`{key}={value(key)!r}`: expected {rule}"
                     for key, rule, ok in _RULES if key in typed and not ok(value(key))]  # fmt: skip
        if problems:  # the pairs below assume every value has its type
            raise ValueError("Received " + "; ".join(problems))
        if value("max_side") < value("min_side"):
            problems.append(
                f"`max_side={value('max_side')}` is below `min_side={value('min_side')}`"
            )
        if value("val_fraction") + value("test_fraction") >= 1:
            problems.append(
                f"`val_fraction={value('val_fraction')}` + `test_fraction={value('test_fraction')}` "
                "leaves no training images: their sum must be below 1"
            )
        if problems:
            raise ValueError("Received " + "; ".join(problems))

    def settings(self) -> dict:
        """Every setting by name (a step's StepConfig: only the ones it was given)."""
        return dataclasses.asdict(self)


SETTINGS = tuple(f.name for f in fields(GraftConfig))
# Settings that shape the DAG itself: the pipeline is built (compiled) with them, so they are
# not pipeline parameters (a run cannot change how many tasks a compiled package declares).
DAG_SETTINGS = ("shards",)


class StepConfig(GraftConfig):
    """The settings one pipeline step was given. Reading a setting the step was not given
    raises, so a step can never silently run with a default in place of the user's value
    (the bug that dropped ``min_side`` on its way to validation)."""

    def __getattribute__(self, name: str):
        if name in _SETTING_NAMES:
            given = object.__getattribute__(self, "_given")
            if name not in given:
                raise AttributeError(
                    f"This step was not given the setting `{name}`: add `{name}` to its KFP "
                    "component's signature (the pipeline then passes it)"
                )
            object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        given = object.__getattribute__(self, "_given")
        return f"StepConfig({', '.join(f'{k}={v!r}' for k, v in given.items())})"

    def settings(self) -> dict:
        return dict(object.__getattribute__(self, "_given"))

    def used(self) -> dict:
        """The settings the step has read so far, by name: what shaped its outputs."""
        given = object.__getattribute__(self, "_given")
        return {k: kfp_value(given[k]) for k in sorted(object.__getattribute__(self, "_read"))}


_SETTING_NAMES = frozenset(SETTINGS)


def step_config(parameters: dict) -> StepConfig:
    """The config of one step from its component's parameters (pass ``locals()``): every
    parameter named like a setting, typed as GraftConfig types it; nothing else readable."""
    given = {k: v for k, v in parameters.items() if k in _SETTING_NAMES}
    typed = dataclasses.asdict(with_overrides(GraftConfig(), given))
    config = StepConfig(**typed)
    object.__setattr__(config, "_given", {k: typed[k] for k in given})
    object.__setattr__(config, "_read", set())
    return config


def resolve(
    base_settings: dict, overrides: list[str] | dict, *, override_label: str = "--set"
) -> tuple[GraftConfig, dict[str, str]]:
    """GraftConfig defaults, then the base's recorded settings, then ``overrides``.

    Returns the config and, per setting, where its value came from: "default", "base" or
    ``override_label``."""
    unknown = sorted(set(base_settings) - _SETTING_NAMES)
    if unknown:
        raise ValueError(
            f"The base records settings this graft does not know: {unknown} (a base saved by a "
            "newer graft?): upgrade graft, or use a base without them"
        )
    try:
        from_base = with_overrides(GraftConfig(), base_settings)
    except ValueError as err:
        from components.backbones import SETTINGS_ENTRY

        raise ValueError(
            f"The base's recorded settings ({SETTINGS_ENTRY} inside the .keras file) cannot be "
            f"used: {err}. Re-save the base with `graft pretrain`, or correct that entry"
        ) from None
    config = with_overrides(from_base, overrides)
    changed = (
        dict(overrides) if isinstance(overrides, dict) else dict(map(split_assignment, overrides))
    )
    sources = {
        name: override_label if name in changed else "base" if name in base_settings else "default"
        for name in SETTINGS
    }
    return config, sources


def describe_sources(config: GraftConfig, sources: dict[str, str]) -> str:
    """One line per source naming the settings that did not come from the defaults."""
    lines = []
    for source in sorted({s for s in sources.values() if s != "default"}):
        names = [n for n in SETTINGS if sources[n] == source]
        values = ", ".join(f"{n}={getattr(config, n)}" for n in names)
        lines.append(f"settings from {source}: {values}")
    lines.append("every other setting: its GraftConfig default")
    return "\n".join(lines)


def kfp_value(value):
    """A setting as a KFP parameter value (KFP has lists, not tuples)."""
    return list(value) if isinstance(value, tuple) else value


def _at_least(low):
    return lambda value: value >= low


def _fraction(value) -> bool:
    return 0 <= value < 1


def _share(value) -> bool:
    return 0 < value < 1


# What the serving signature's decoder (tf.io.decode_image) reads, as PIL names formats.
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
SEED_MAX = 2**31 - 1  # numpy seeds below 2**32, and augment adds small offsets to the seed
WEIGHTS_SUFFIXES = (".h5", ".weights.h5", ".keras")  # what Model.load_weights reads


def _base_name(value: str) -> bool:
    from components.backbones import APPLICATIONS

    return value in APPLICATIONS or (value.endswith(".keras") and len(value) > len(".keras"))


def _weights(value: str) -> bool:
    return value in ("imagenet", "none") or value.endswith(WEIGHTS_SUFFIXES)


def _formats(value: tuple) -> bool:
    return bool(value) and all(v in DECODABLE_FORMATS for v in value)


# Each setting's range: (name, what is expected, check). Every float is also finite
# (`_typed`): nan and inf reach no step.
_RULES = (
    ("min_images_per_class", ">= 3 (one each for train, val and test)", _at_least(3)),
    ("min_classes", ">= 2 (a classifier needs two labels)", _at_least(2)),
    ("min_side", ">= 1", _at_least(1)),
    ("max_pixels", ">= 1", _at_least(1)),
    ("max_file_bytes", ">= 1", _at_least(1)),
    ("max_imbalance_ratio", ">= 1", _at_least(1)),
    (
        "allowed_formats",
        "one or more of "
        + ", ".join(DECODABLE_FORMATS)
        + " (what the serving decoder reads; upper case, comma-separated)",
        _formats,
    ),  # fmt: skip
    ("image_size", ">= 1", _at_least(1)),
    ("channels", "1 or 3", lambda v: v in (1, 3)),
    ("views", ">= 0", _at_least(0)),
    ("val_fraction", "in (0, 1): early stopping needs validation images", _share),
    ("test_fraction", "in (0, 1): evaluate and the champion comparison need test images", _share),
    ("seed", f"0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX),
    ("io_concurrency", ">= 1", _at_least(1)),
    ("shards", ">= 1 (1: no fan-out)", _at_least(1)),
    ("reuse_budget_gb", ">= 0", _at_least(0)),
    (
        "base",
        "a keras.applications name (mobilenet_v2, resnet50, vgg16, efficientnet_b0) "
        "or the URI of a file ending exactly in .keras",
        _base_name,
    ),  # fmt: skip
    (
        "weights",
        "imagenet, none, or a weights file ending in " + ", ".join(WEIGHTS_SUFFIXES),
        _weights,
    ),  # fmt: skip
    ("head_hidden_units", ">= 0 (0: no hidden layer)", _at_least(0)),
    ("batch_size", ">= 1", _at_least(1)),
    ("head_learning_rate", "> 0 (the head starts from random weights)", lambda v: v > 0),
    ("head_max_epochs", ">= 1", _at_least(1)),
    ("patience", ">= 1", _at_least(1)),
    ("min_delta", ">= 0", _at_least(0)),
    ("dropout", "in [0, 1)", _fraction),
    ("fine_tune_layers", ">= 0", _at_least(0)),
    ("fine_tune_learning_rate", ">= 0", _at_least(0)),  # 0: weights kept (tests use it)
    ("fine_tune_max_epochs", ">= 0", _at_least(0)),
    (
        "precision",
        "one of auto, float32, mixed_float16",
        lambda v: v in ("auto", "float32", "mixed_float16"),
    ),
    ("replicas", ">= 0 (0: every visible GPU)", _at_least(0)),
    ("top_k", ">= 1", _at_least(1)),
    ("bless_min_accuracy", ">= 0", _at_least(0)),  # above 1 blesses nothing: tests use it
    ("bless_min_macro_recall", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("bless_tolerance", ">= 0", _at_least(0)),
    ("bless_class_tolerance", ">= 0", _at_least(0)),
    ("rollout", "direct or canary", lambda v: v in ("direct", "canary")),
    ("canary_fraction", "in (0, 1]", lambda v: 0 < v <= 1),
    ("canary_min_requests", ">= 1", _at_least(1)),
    ("canary_max_error_rate", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("canary_max_latency_ratio", ">= 1", _at_least(1)),
    ("canary_min_agreement", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("canary_max_class_shift", "in [0, 1]", lambda v: 0 <= v <= 1),
    (
        "rollout_serving_base_path",
        "empty or an absolute path or gs:// URI (TF Serving wants an absolute base_path)",
        lambda v: v == "" or v.startswith(("/", "gs://")),
    ),
)


def _typed(key: str, value, type_name: str):
    """(value in its field's type, None) or (None, why not). Strings are parsed elsewhere
    (``_coerce``); this is the gate for values that arrive typed (JSON, KFP, Python)."""
    kind = "a tuple" if "tuple" in type_name else type_name
    received = f"`{key}={value!r}` ({type(value).__name__})"
    if type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return None, f"`{key}={value}`: expected a finite number"
        value = float(value) if ok else value
    elif type_name == "str":
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
        kind = "a list of strings"
    if not ok:
        names = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}
        return None, f"{received}: expected {names.get(kind, kind)}"
    return value, None


def with_overrides(config: GraftConfig, assignments: list[str] | dict) -> GraftConfig:
    """Return ``config`` with ``key=value`` strings (or a dict) applied, values typed by field.

    Unknown keys and untypeable values raise ValueError naming the key and the
    value received.
    """
    types = {f.name: f.type for f in fields(GraftConfig)}
    items = (
        assignments.items()
        if isinstance(assignments, dict)
        else [split_assignment(a) for a in assignments]
    )
    changes = {}
    for key, value in items:
        if key not in types:
            known = ", ".join(sorted(types))
            raise ValueError(f"Unknown setting `{key}`. Known settings: {known}")
        changes[key] = _coerce(key, value, types[key])
    return dataclasses.replace(config, **changes)


def split_assignment(text: str, *, label: str = "") -> tuple[str, str]:
    """The one ``key=value`` parser (--set, --param, graft_settings, node selectors)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"Received `{(label + ' ' + text).strip()}`: expected key=value")
    return key.strip(), value.strip()


def _coerce(key: str, value, type_name: str):
    """A ``key=value`` string parsed as its field's type; typed values (a base's JSON, KFP
    parameters) pass unchanged to GraftConfig's own type check (``_typed``)."""
    if not isinstance(value, str):
        return value
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
        kind = {"int": "an int", "float": "a number", "bool": "true or false"}.get(
            type_name, type_name
        )
        raise ValueError(f"Received `{key}={value}`: expected {kind}") from err
