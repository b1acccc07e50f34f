"""evaluate: test metrics for the candidate, and a champion/challenger blessing.

The champion is the version being served (common/model_repository.py). It is evaluated on
the same test images as the candidate, sent as the original file bytes through its own
``serving_default`` signature, so each model sees the images prepared the way it expects
(its own image size, channels and decoding), even after those settings changed between
runs. The candidate is blessed only if it clears an absolute floor, beats always answering
the majority class beyond sampling noise and reaches a macro-recall floor (FIRST_MODEL_RULE,
so a first model is never a coin flip), and is not worse than the champion beyond a
tolerance overall and, beyond sampling noise, per class (see ``class_regressions``). The
fine-tune guard's decision (``guard_decision``) lives here too: it is a judgement on held-out
images like the blessing. Classes are compared by name, so a champion with other labels is
still comparable.
"""

import html
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from common import model_repository as repository
from common import storage
from common.artifacts import EVALUATION_FILE, MODEL_FILE
from common.progress import Progress
from components import examples
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)
EVAL_BATCH = 256  # test images per forward pass: the test split is streamed, never loaded whole
# 95% two-sided. Both recalls are estimates from a handful of test images per class: one
# image of 14 (1.000 -> 0.929) or two of 8 (1.000 -> 0.750) is within their noise.
RECALL_CONFIDENCE_Z = 1.96
CLASS_RULE = (
    "a class counts as regressed only when its recall fell by more than bless_class_tolerance "
    "and the fall is beyond sampling noise: the 95% Newcombe interval (from the two Wilson "
    "intervals, given each model's test images of that class) of the champion's recall minus "
    "the candidate's lies entirely above 0"
)


FIRST_MODEL_RULE = (
    "a candidate is blessed only if its test accuracy clears bless_min_accuracy, the lower end "
    "of its 95% Wilson interval lies above the majority-class rate of the test images (what "
    "always answering the largest class scores), and its macro recall (the mean of the "
    "per-class recalls) is at least bless_min_macro_recall"
)
GUARD_RULE = (
    "fine_tune keeps the fine-tuned model only if it gets more validation images right than "
    "the head, or as many at a lower validation loss; the exact McNemar test on the images "
    "one gets right and the other wrong says whether that difference is beyond noise (p < 0.05), and is recorded either way"
)
GUARD_ALPHA = 0.05  # two-sided level at which the guard's choice counts as beyond noise


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, labels: list[str], top_k: int
) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1 and the confusion matrix."""
    predicted = probabilities.argmax(axis=1)
    k = min(top_k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for truth, guess in zip(y_true, predicted, strict=True):
        matrix[truth, guess] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp, predicted_i, actual_i = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual_i),
        }
    return {
        "accuracy": float((predicted == y_true).mean()) if len(y_true) else 0.0,
        f"top_{k}_accuracy": float((top == y_true[:, None]).any(axis=1).mean())
        if len(y_true)
        else 0.0,
        "examples": int(len(y_true)),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix.tolist(),
    }


def wilson_interval(recall: float, support: float, z: float = RECALL_CONFIDENCE_Z):
    """(low, high) of the Wilson score interval for a recall measured on ``support`` images.

    With no support given (``inf``) the recall is taken as exact.
    """
    if not math.isfinite(support):
        return recall, recall
    if support <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = recall + z2 / (2 * support)
    spread = z * math.sqrt(recall * (1 - recall) / support + z2 / (4 * support * support))
    scale = 1 + z2 / support
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def recall_drop_lower_bound(champion: dict, candidate: dict) -> float:
    """Lower end of the 95% Newcombe (hybrid score) interval of champion minus candidate
    recall; above 0 means the candidate is worse beyond sampling noise."""
    p1, n1 = champion["recall"], float(champion.get("support", math.inf))
    p2, n2 = candidate["recall"], float(candidate.get("support", math.inf))
    low1, _ = wilson_interval(p1, n1)
    _, high2 = wilson_interval(p2, n2)
    return (p1 - p2) - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2)


def class_regressions(candidate: dict, champion: dict, class_tolerance: float) -> list[str]:
    """Classes whose recall fell beyond ``class_tolerance`` AND beyond sampling noise."""
    out = []
    for name, theirs in champion["per_class"].items():
        mine = candidate["per_class"].get(name)
        if mine is None:
            continue
        low = recall_drop_lower_bound(theirs, mine)
        if mine["recall"] < theirs["recall"] - class_tolerance and low > 0:
            counts = " ".join(
                f"{round(m['recall'] * m['support'])}/{m['support']}"
                for m in (mine, theirs)
                if math.isfinite(float(m.get("support", math.inf)))
            )
            noise = f" ({counts} right; fall at least {low:.3f} at 95%)" if counts else ""
            out.append(f"{name} {mine['recall']:.3f} < {theirs['recall']:.3f}{noise}")
    return out


def better_than_chance(candidate: dict, *, min_macro_recall: float) -> tuple[bool, str]:
    """Whether ``candidate`` (``examples``, ``accuracy``, ``per_class`` with ``recall`` and
    ``support``) beats always answering the majority class beyond sampling noise and reaches
    the macro-recall floor, and why (FIRST_MODEL_RULE without the accuracy floor)."""
    examples, accuracy = candidate["examples"], candidate["accuracy"]
    supports = {name: c["support"] for name, c in candidate["per_class"].items()}
    majority_name = max(supports, key=supports.get)
    majority = supports[majority_name] / examples
    low, _ = wilson_interval(accuracy, examples)
    if low <= majority:
        return False, (
            f"test accuracy {accuracy:.4f} on {examples} images is not above the majority-class "
            f"rate {majority:.4f} (always answering {majority_name!r}) beyond sampling noise: "
            f"its 95% Wilson interval starts at {low:.4f}; add test images or a better model"
        )
    present = [c["recall"] for c in candidate["per_class"].values() if c["support"]]
    macro = float(np.mean(present))
    if macro < min_macro_recall:
        return False, (
            f"macro recall {macro:.4f} (mean recall over {len(present)} classes) is below "
            f"bless_min_macro_recall={min_macro_recall}"
        )
    return True, (
        f"accuracy's 95% lower bound {low:.4f} > majority-class rate {majority:.4f}, macro "
        f"recall {macro:.4f} >= {min_macro_recall}"
    )


def is_blessed(
    candidate: dict,
    champion: dict | None,
    *,
    min_accuracy: float,
    min_macro_recall: float,
    tolerance: float,
    class_tolerance: float,
) -> tuple[bool, str]:
    """Whether the candidate may replace the champion, and why, in one sentence.

    ``candidate`` holds ``accuracy``, ``examples`` and ``per_class`` {label: {"recall": r,
    "support": n}} (classification_metrics); ``champion`` the same, ``examples`` optional.
    Every candidate must meet FIRST_MODEL_RULE (a model no better than chance is never
    served, champion or not); against a champion, CLASS_RULE too.
    """
    accuracy = candidate["accuracy"]
    if accuracy < min_accuracy:
        return False, f"test accuracy {accuracy:.4f} is below the floor {min_accuracy:.4f}"
    above_chance, why = better_than_chance(candidate, min_macro_recall=min_macro_recall)
    if not above_chance:
        return False, why
    if champion is None:
        return (
            True,
            f"no champion; test accuracy {accuracy:.4f} clears the floor {min_accuracy:.4f}; {why}",
        )
    version = champion.get("version", "?")
    if accuracy < champion["accuracy"] - tolerance:
        return False, (
            f"test accuracy {accuracy:.4f} is worse than champion version {version} "
            f"({champion['accuracy']:.4f}) by more than {tolerance}"
        )
    regressed = class_regressions(candidate, champion, class_tolerance)
    if regressed:
        return False, (
            f"per-class recall regressed vs champion version {version} beyond {class_tolerance} "
            f"and beyond sampling noise: {'; '.join(regressed)}"
        )
    return (
        True,
        f"test accuracy {accuracy:.4f} vs champion version {version} {champion['accuracy']:.4f}; "
        "no class regressed beyond sampling noise",
    )


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: of the images exactly one of two models gets right,
    how surprising a split this uneven is if each model were equally likely to be the one."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**discordant)


@dataclass(frozen=True)
class GuardDecision:
    """fine_tune's choice between the head-only and the fine-tuned model (GUARD_RULE)."""

    chosen: str  # "fine_tuned" or "head"
    reason: str
    val_images: int
    head_right: int
    tuned_right: int
    only_tuned_right: int  # images the fine-tuned model gets right and the head wrong
    only_head_right: int
    p_value: float  # exact McNemar, two-sided
    beyond_noise: bool  # p_value < GUARD_ALPHA: the two differ beyond sampling noise
    head_loss: float | None = None  # mean val cross-entropy: breaks a tie in images right
    tuned_loss: float | None = None


def guard_decision(
    head_correct, tuned_correct, *, head_loss: float | None = None,
    tuned_loss: float | None = None, alpha: float = GUARD_ALPHA,
) -> GuardDecision:  # fmt: skip
    """Keep the fine-tuned model only if it gets more validation images right than the head,
    or as many with a lower validation loss (``head_loss``/``tuned_loss``: mean cross-entropy
    on the same images; without them a tie keeps the head), recording whether the difference
    is beyond noise.

    ``head_correct``/``tuned_correct``: one bool per validation image, same order. The choice
    itself does not wait for significance: on the benchmarks a stricter rule kept the head on
    18 of 27 runs where fine-tuning won on test in 24, and ties on 25-100 validation images
    are common: the loss, which fine_tune's early stopping already chose the weights by,
    decides them (benchmarks/RESULTS.md, "the guard's ties")."""
    head_correct = np.asarray(head_correct, dtype=bool)
    tuned_correct = np.asarray(tuned_correct, dtype=bool)
    if head_correct.shape != tuned_correct.shape or head_correct.ndim != 1:
        raise ValueError(
            f"Received {head_correct.shape} head and {tuned_correct.shape} tuned results: "
            "expected one bool per validation image for each, in the same order"
        )
    only_tuned = int((tuned_correct & ~head_correct).sum())
    only_head = int((head_correct & ~tuned_correct).sum())
    p_value = mcnemar_exact_p(only_tuned, only_head)
    beyond_noise = p_value < alpha
    images, head_right, tuned_right = (
        len(head_correct),
        int(head_correct.sum()),
        int(tuned_correct.sum()),
    )
    evidence = (
        f"{tuned_right} vs {head_right} of {images} validation images right; {only_tuned} only "
        f"the fine-tuned model gets, {only_head} only the head; exact McNemar p={p_value:.3g}: "
        + ("beyond noise" if beyond_noise else f"within noise (not below {alpha})")
    )
    losses_known = head_loss is not None and tuned_loss is not None
    if tuned_right > head_right:
        chosen = "fine_tuned"
        reason = (
            f"val accuracy {tuned_right / images:.4f} > head-only {head_right / images:.4f} "
            f"on {images} images ({evidence})"
        )
    elif tuned_right == head_right and losses_known and tuned_loss < head_loss:
        chosen = "fine_tuned"
        reason = (
            f"as many validation images right as the head-only model, at a lower val loss "
            f"({tuned_loss:.4f} < {head_loss:.4f}; {evidence})"
        )
    else:
        chosen = "head"
        reason = f"fine-tuning did not beat the head on validation ({evidence}); kept the head-only model"
    return GuardDecision(chosen, reason, images, head_right, tuned_right, only_tuned, only_head,
                         p_value, beyond_noise, head_loss, tuned_loss)  # fmt: skip


def champion_metrics(
    model_repo: str, model_name: str, sources: list[tuple[str, str]]
) -> dict | None:
    """Evaluate the served version on the test images by label name; None if nothing is served.

    The champion is the version a server would serve: the newest complete one that loads
    (``model_repository.newest_loading``); newer ones that do not load are listed under
    ``skipped`` with why. ``sources`` are (image URI, label) pairs: the original files,
    sent as bytes through the champion's own ``serving_default`` signature, which decodes,
    crops and resizes them to the image size and channels that version was trained with.
    """
    import tensorflow as tf

    root = repository.model_root(model_repo, model_name)
    predicted = []
    with tempfile.TemporaryDirectory(prefix="graft-champion-") as work:

        def load(version: int, uri: str):
            local = storage.download_tree(uri, Path(work, str(version)))
            return tf.saved_model.load(str(local)).signatures["serving_default"]

        version, signature, skipped = repository.newest_loading(root, load)
        if version is None:
            if skipped:
                log.warning("evaluate: no complete version loads (%s): judged against none",
                            "; ".join(f"{v}: {e}" for v, e in skipped.items()))  # fmt: skip
            return None
        progress = Progress(log, f"evaluate: champion version {version}", len(sources))
        for start in range(0, len(sources), 64):
            uris = [u for u, _ in sources[start : start + 64]]
            batch = list(storage.read_many(uris))
            out = signature(images=tf.constant(batch, tf.string))
            predicted += [row[0].decode() for row in out["labels"].numpy()]
            progress.advance(len(batch))
        progress.done()
    truth = [label for _, label in sources]
    per_class = {}
    for name in sorted(set(truth)):
        rows = [p for p, t in zip(predicted, truth, strict=True) if t == name]
        per_class[name] = {
            "recall": float(np.mean([p == name for p in rows])) if rows else 0.0,
            "support": len(rows),
        }
    accuracy = (
        float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])) if truth else 0.0
    )
    champion = {"version": version, "accuracy": accuracy, "per_class": per_class}
    if skipped:
        champion["skipped"] = {str(v): why for v, why in skipped.items()}
    return champion


@dataclass
class Evaluation:
    metrics: dict
    champion: dict | None
    blessed: bool
    reason: str


def evaluate_model(
    examples_dir: str | Path, model_dir: str | Path, out_dir: str | Path, config: GraftConfig,
    *, model_repo: str | None = None, model_name: str | None = None,
) -> Evaluation:  # fmt: skip
    """Evaluate on the test split, compare with the champion, write evaluation.json + reports."""
    import keras

    labels = examples.read_labels(examples_dir)
    model = keras.models.load_model(Path(model_dir) / MODEL_FILE)
    test = lambda: examples.batches(examples_dir, "test", EVAL_BATCH).as_numpy_iterator()  # noqa: E731
    total = examples.read_spec(examples_dir).get("counts", {}).get("test")
    predicted, truth = [], []
    progress = Progress(log, "evaluate: candidate", total)
    for images, batch_labels in test():
        predicted.append(model.predict_on_batch(images))
        truth.append(batch_labels)
        progress.advance(len(batch_labels))
    progress.done()
    if not truth:
        raise ValueError(
            f"The test split in {examples_dir} is empty: raise test_fraction or add images"
        )
    y, probabilities = np.concatenate(truth), np.concatenate(predicted)
    metrics = classification_metrics(y, probabilities, labels, config.top_k)
    champion = None
    if model_repo and model_name:
        sources = [(s["uri"], s["label"]) for s in examples.read_sources(examples_dir, "test")]
        champion = champion_metrics(model_repo, model_name, sources)
    blessed, reason = is_blessed(
        metrics, champion, min_accuracy=config.bless_min_accuracy,
        min_macro_recall=config.bless_min_macro_recall,
        tolerance=config.bless_tolerance, class_tolerance=config.bless_class_tolerance,
    )  # fmt: skip
    log.info("evaluate: accuracy %.4f on %d test images; %s: %s",
             metrics["accuracy"], len(y), "BLESSED" if blessed else "not blessed", reason)  # fmt: skip
    evaluation = Evaluation(metrics, champion, blessed, reason)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVALUATION_FILE).write_text(json.dumps(asdict(evaluation), indent=2))
    (out_dir / "report.md").write_text(render_markdown(evaluation))
    (out_dir / "report.html").write_text(render_html(evaluation))
    return evaluation


def render_markdown(evaluation: Evaluation) -> str:
    m = evaluation.metrics
    lines = [f"# Evaluation: {'blessed' if evaluation.blessed else 'NOT blessed'}", "", evaluation.reason, "",
             f"Blessing rule: {FIRST_MODEL_RULE}.", "", f"Per-class rule: {CLASS_RULE}.", "",
             f"accuracy {m['accuracy']:.4f} on {m['examples']} test images", "",
             "| class | precision | recall | f1 | support |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {n} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
              for n, s in m["per_class"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def render_html(evaluation: Evaluation) -> str:
    """The report with the confusion matrix as a shaded table (no plotting library needed)."""
    m = evaluation.metrics
    matrix = np.asarray(m["confusion_matrix"])
    peak = max(int(matrix.max()), 1)
    header = "".join(f"<th>{html.escape(n)}</th>" for n in m["labels"])
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td style='background:rgba(30,90,200,{v / peak:.2f})'>{v}</td>" for v in row)
        + "</tr>"
        for name, row in zip(m["labels"], matrix.tolist(), strict=True)
    )
    return (
        "<!doctype html><meta charset=utf-8><title>graft evaluation</title>"
        f"<h1>{'Blessed' if evaluation.blessed else 'NOT blessed'}</h1><p>{html.escape(evaluation.reason)}</p>"
        f"<p>Blessing rule: {html.escape(FIRST_MODEL_RULE)}.</p>"
        f"<p>Per-class rule: {html.escape(CLASS_RULE)}.</p>"
        f"<p>accuracy {m['accuracy']:.4f} on {m['examples']} test images</p>"
        f"<h2>Confusion matrix (rows: true, columns: predicted)</h2><table><tr><th></th>{header}</tr>{body}</table>"
        f"<pre>{html.escape(render_markdown(evaluation))}</pre>"
    )


@step_component
def evaluate(
    examples: Input[Dataset],
    model: Input[Model],
    eval_metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    eval_report: Output[HTML],
    evaluation: Output[Artifact],
    data_state: Input[Artifact],
    model_repo: str,
    model_name: str,
    top_k: int = 3,
    bless_min_accuracy: float = 0.5,
    bless_min_macro_recall: float = 0.5,
    bless_tolerance: float = 0.01,
    bless_class_tolerance: float = 0.05,
) -> bool:
    """Evaluate on the test split and decide the blessing (the push gate)."""
    import logging
    import shutil
    from pathlib import Path

    from components.config import step_config
    from components.evaluate import evaluate_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    result = evaluate_model(examples.path, model.path, evaluation.path, config,
                            model_repo=model_repo, model_name=model_name)  # fmt: skip
    for key, value in result.metrics.items():
        if isinstance(value, float):
            eval_metrics.log_metric(key, value)
    if result.champion:
        eval_metrics.log_metric("champion_accuracy", result.champion["accuracy"])
        eval_metrics.log_metric("champion_version", result.champion["version"])
    classification_metrics.log_confusion_matrix(
        result.metrics["labels"], result.metrics["confusion_matrix"]
    )
    shutil.copyfile(Path(evaluation.path) / "report.html", eval_report.path)
    evaluation.metadata.update(
        {"blessed": result.blessed, "reason": result.reason, "settings": config.used()}
    )
    if not result.blessed:  # check_data then skips this data + settings until the champion changes
        from components.check_data import record_refused

        record_refused(model_repo, model_name, data_state.path, result)
    return result.blessed
