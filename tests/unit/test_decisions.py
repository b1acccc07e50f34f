"""The pure decisions the pipeline's gates show: convergence, blessing, skip-or-train."""

import html

import pytest

from common.storage import FileInfo
from components.check_data import Fingerprint, dataset_fingerprint, should_train
from components.evaluate import classification_metrics, is_blessed
from components.training import head_converged

# --- head_converged: scripted val-loss histories -------------------------------------------


def test_head_converges_when_val_loss_plateaus_for_patience_epochs():
    losses = [1.0, 0.6, 0.4, 0.35, 0.351, 0.352, 0.353]
    assert head_converged(losses, patience=3, min_delta=0.01, max_epochs=50)


def test_head_still_improving_at_max_epochs_has_not_converged():
    losses = [1.0 - 0.05 * i for i in range(10)]
    assert not head_converged(losses, patience=3, min_delta=0.01, max_epochs=10)


def test_noisy_plateau_counts_improvements_smaller_than_min_delta_as_none():
    losses = [1.0, 0.5, 0.499, 0.502, 0.4985, 0.5]  # wiggles under min_delta
    assert head_converged(losses, patience=3, min_delta=0.01, max_epochs=50)
    assert not head_converged(losses, patience=3, min_delta=0.0001, max_epochs=50)


def test_plateau_reached_exactly_at_the_budget_counts_and_one_epoch_never_does():
    assert head_converged([1.0, 0.5, 0.5, 0.5], patience=2, min_delta=0.01, max_epochs=4)
    assert not head_converged([1.0], patience=1, min_delta=0.01, max_epochs=1)
    with pytest.raises(ValueError, match="patience=0"):
        head_converged([1.0], patience=0, min_delta=0.0, max_epochs=3)


# --- is_blessed: the decision table --------------------------------------------------------

THRESHOLDS = {"min_accuracy": 0.7, "tolerance": 0.01, "class_tolerance": 0.05}


def model(accuracy, **recalls):
    return {
        "accuracy": accuracy,
        "version": 7,
        "per_class": {k: {"recall": v} for k, v in recalls.items()},
    }


@pytest.mark.parametrize(
    "candidate, champion, blessed, phrase",
    [
        (model(0.69, a=0.7), None, False, "below the floor"),
        (model(0.70, a=0.7), None, True, "no champion"),  # exactly at the floor passes
        (
            model(0.80, a=0.8, b=0.8),
            model(0.82, a=0.8, b=0.8),
            False,
            "worse than champion version 7",
        ),
        (
            model(0.81, a=0.8, b=0.8),
            model(0.82, a=0.8, b=0.8),
            True,
            "no class regressed",
        ),  # within tolerance
        (model(0.90, a=0.99, b=0.70), model(0.85, a=0.80, b=0.80), False, "b 0.700 < 0.800"),
        (
            model(0.90, a=0.95, b=0.75),
            model(0.85, a=0.80, b=0.80),
            True,
            "vs champion",
        ),  # b exactly at tolerance
        (
            model(0.90, a=0.9, new=0.1),
            model(0.85, a=0.8, gone=1.0),
            True,
            "vs champion",
        ),  # only shared classes
    ],
)
def test_blessing_decision_table(candidate, champion, blessed, phrase):
    decision, reason = is_blessed(candidate, champion, **THRESHOLDS)
    assert decision is blessed
    assert phrase in reason


def counted(accuracy, **right_of):
    """A model whose per-class recall comes from (right, support) counts."""
    return {"accuracy": accuracy, "version": 7,
            "per_class": {k: {"recall": r / n, "support": n} for k, (r, n) in right_of.items()}}  # fmt: skip


@pytest.mark.parametrize(
    "champion_right, right, support, blessed",
    [
        (14, 13, 14, True),  # make demo-retrain, round one: 1 image of 14 is noise
        (14, 11, 14, True),  # Newcombe 95% lower bound of the fall: -0.042
        (14, 10, 14, False),  # +0.012: the fall is real
        (8, 6, 8, True),  # make demo-retrain, round two: 2 of 8 (1.000 -> 0.750) is noise
        (8, 5, 8, True),  # -0.027
        (8, 4, 8, False),  # +0.068
        (100, 95, 100, True),  # real (+0.003) but not beyond bless_class_tolerance (0.05)
        (100, 94, 100, False),  # real (+0.011) and 0.06 > 0.05
        (95, 87, 100, True),  # -0.001
        (95, 86, 100, False),  # +0.008
    ],
)
def test_per_class_gate_allows_sampling_noise_and_refuses_beyond_it(
    champion_right, right, support, blessed
):
    champion = counted(0.90, a=(champion_right, support), b=(support, support))
    candidate = counted(0.95, a=(right, support), b=(support, support))
    decision, reason = is_blessed(candidate, champion, **THRESHOLDS)
    assert decision is blessed, reason
    if not blessed:
        expected = f"a {right / support:.3f} < {champion_right / support:.3f} ({right}/{support} {champion_right}/{support} right; fall at least"
        assert expected in reason
    else:
        assert "no class regressed beyond sampling noise" in reason


def test_evaluation_report_states_the_per_class_rule():
    from components.evaluate import CLASS_RULE, Evaluation, render_html, render_markdown

    metrics = {"accuracy": 1.0, "examples": 2, "labels": ["a"], "confusion_matrix": [[2]],
               "per_class": {"a": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}}  # fmt: skip
    evaluation = Evaluation(metrics, None, True, "no champion")
    assert "Newcombe interval" in CLASS_RULE and "bless_class_tolerance" in CLASS_RULE
    assert CLASS_RULE in render_markdown(evaluation)
    assert html.escape(CLASS_RULE) in render_html(evaluation)


def test_classification_metrics_on_hand_made_predictions():
    import numpy as np

    y = np.array([0, 0, 1, 1, 2])
    probabilities = np.array(
        [[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0, 0.4, 0.6]]
    )
    metrics = classification_metrics(y, probabilities, ["a", "b", "c"], top_k=2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["top_2_accuracy"] == pytest.approx(5 / 5)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert metrics["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_class"]["c"]["f1"] == 1.0


# --- fingerprint + should_train ------------------------------------------------------------


def files(*entries):
    return [FileInfo(f"/r/{p}", p, size, checksum) for p, size, checksum in entries]


def test_fingerprint_is_order_independent_and_counts_every_file_validate_sees():
    a = files(("x/1.png", 10, "sha256:aa"), ("y/2.jpg", 20, "sha256:bb"))
    assert dataset_fingerprint(a) == dataset_fingerprint(list(reversed(a)))
    assert dataset_fingerprint(a).count == 2
    # validate refuses a README or a photo named .webp, so they must change the fingerprint
    for extra in (("README.txt", 5, "sha256:cc"), ("x/3.WEBP", 5, "sha256:dd")):
        assert dataset_fingerprint(a + files(extra)).digest != dataset_fingerprint(a).digest


@pytest.mark.parametrize(
    "change",
    [
        files(
            ("x/1.png", 10, "sha256:ab"), ("y/2.jpg", 20, "sha256:bb")
        ),  # one byte changed -> checksum
        files(
            ("x/1.png", 10, "sha256:aa"), ("y/2.jpg", 20, "sha256:bb"), ("y/3.png", 1, "sha256:dd")
        ),
        files(("z/1.png", 10, "sha256:aa"), ("y/2.jpg", 20, "sha256:bb")),  # relabelled (moved)
    ],
    ids=["content", "added", "moved"],
)
def test_fingerprint_changes_with_content_additions_and_moves(change):
    base = files(("x/1.png", 10, "sha256:aa"), ("y/2.jpg", 20, "sha256:bb"))
    assert dataset_fingerprint(change).digest != dataset_fingerprint(base).digest


def test_fingerprint_of_real_files_changes_when_one_byte_changes(tmp_path):
    from components.check_data import fingerprint_uri

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG....")
    before = fingerprint_uri(str(tmp_path))
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG...!")
    assert fingerprint_uri(str(tmp_path)).digest != before.digest


@pytest.mark.parametrize(
    "served, force, min_new, train, phrase",
    [
        (None, False, 0, True, "no version is served"),
        (
            {"version": 3, "data_fingerprint": "d1", "data_image_count": 10},
            False,
            0,
            False,
            "unchanged since version 3",
        ),
        ({"version": 3, "data_fingerprint": "d1", "data_image_count": 10}, True, 0, True, "forced"),
        (
            {"version": 3, "data_fingerprint": "old", "data_image_count": 10},
            False,
            0,
            True,
            "changed since version 3",
        ),
        (  # no file list recorded: the change cannot be counted, and the reason says so
            {"version": 3, "data_fingerprint": "old", "data_image_count": 8},
            False,
            5,
            True,
            "records no file list",
        ),
        (
            {"version": 3, "data_fingerprint": "old", "data_image_count": 5},
            False,
            5,
            True,
            "changed",
        ),
    ],
)
def test_should_train_decision_table(served, force, min_new, train, phrase):
    decision, reason = should_train(
        Fingerprint("d1", 10), served, force=force, min_new_images=min_new
    )
    assert decision is train
    assert phrase in reason
