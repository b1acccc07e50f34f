"""The pure decisions the pipeline's gates show: convergence, blessing, skip-or-train."""

import html

import numpy as np
import pytest

from common.storage import FileInfo
from components.check_data import Fingerprint, dataset_fingerprint, should_train
from components.evaluate import classification_metrics, is_blessed, wilson_interval
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

THRESHOLDS = {
    "min_accuracy": 0.7, "min_macro_recall": 0.5, "tolerance": 0.01, "class_tolerance": 0.05,
}  # fmt: skip


def model(accuracy, support=50, **recalls):
    """A model scored on ``support`` test images per class (50 clear chance at these accuracies)."""
    return {
        "accuracy": accuracy,
        "examples": support * len(recalls),
        "version": 7,
        "per_class": {k: {"recall": v, "support": support} for k, v in recalls.items()},
    }


@pytest.mark.parametrize(
    "candidate, champion, blessed, phrase",
    [
        (model(0.69, a=0.7, b=0.68), None, False, "below the floor"),
        (model(0.70, a=0.7, b=0.7), None, True, "no champion"),  # exactly at the floor passes
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
        (  # on 1000 images per class the fall of b is beyond noise
            model(0.90, 1000, a=0.99, b=0.70),
            model(0.85, 1000, a=0.80, b=0.80),
            False,
            "b 0.700 < 0.800",
        ),
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
    return {"accuracy": accuracy, "version": 7, "examples": sum(n for _, n in right_of.values()),
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


def scored(truth_and_guess: list[tuple[str, str, int]]) -> dict:
    """classification_metrics of a model given as (true label, predicted label, images) rows."""
    labels = sorted({row[0] for row in truth_and_guess})
    y, guess = [], []
    for truth, guessed, count in truth_and_guess:
        y += [labels.index(truth)] * count
        guess += [labels.index(guessed)] * count
    probabilities = np.eye(len(labels))[guess]
    return classification_metrics(np.asarray(y), probabilities, labels, top_k=1)


FIRST_MODEL = {"min_accuracy": 0.5, "min_macro_recall": 0.5, "tolerance": 0.01, "class_tolerance": 0.05}  # fmt: skip


@pytest.mark.parametrize(
    "rows, blessed, phrase",
    [
        # a coin flip on two balanced classes (0.5, the old floor, blessed it)
        ([("a", "a", 52), ("a", "b", 48), ("b", "b", 50), ("b", "a", 50)], False,
         "not above the majority-class rate 0.5000"),
        # always the majority class on 20:1 (accuracy 0.952 blessed by the old floor)
        ([("a", "a", 200), ("b", "a", 10)], False, "always answering 'a'"),
        # near-perfect on 20:1: the minority counts too, and it is learned
        ([("a", "a", 199), ("a", "b", 1), ("b", "b", 8), ("b", "a", 2)], True,
         "macro recall 0.8975"),
        # three test images all right: within noise of the 2:1 majority rate; more are needed
        ([("a", "a", 2), ("b", "b", 1)], False, "add test images"),
        # above chance, yet three of five classes never right: macro recall 0.4
        ([("a", "a", 400), ("b", "b", 100), ("c", "a", 100), ("d", "a", 100), ("e", "b", 100)],
         False, "macro recall 0.4000 (mean recall over 5 classes) is below"),
        ([("a", "a", 45), ("a", "b", 5), ("b", "b", 40), ("b", "a", 10)], True, "no champion"),
    ],
)  # fmt: skip
def test_a_first_model_must_beat_the_majority_class_beyond_noise_and_reach_macro_recall(
    rows, blessed, phrase
):
    decision, reason = is_blessed(scored(rows), None, **FIRST_MODEL)
    assert decision is blessed, reason
    assert phrase in reason


def test_a_candidate_no_better_than_chance_is_refused_even_against_a_weaker_champion():
    candidate = scored([("a", "a", 200), ("b", "a", 10)])
    champion = {
        **scored([("a", "a", 150), ("a", "b", 50), ("b", "b", 5), ("b", "a", 5)]),
        "version": 3,
    }
    decision, reason = is_blessed(candidate, champion, **FIRST_MODEL)
    assert not decision and "majority-class rate" in reason


def test_the_chance_rule_uses_the_wilson_lower_bound():
    # 60 of 100 on balanced classes: Wilson 95% starts at 0.5020 > 0.5, blessed; 59 of 100 is not.
    for right, blessed in ((60, True), (59, False)):
        rows = [("a", "a", right // 2 + right % 2), ("a", "b", 50 - right // 2 - right % 2),
                ("b", "b", right // 2), ("b", "a", 50 - right // 2)]  # fmt: skip
        decision, reason = is_blessed(scored(rows), None, **FIRST_MODEL)
        assert decision is blessed, reason
        low = wilson_interval(right / 100, 100)[0]
        assert (low > 0.5) is blessed and f"{low:.4f}" in reason


# --- the fine-tune guard: fine-tuned vs head-only on the same validation images --------------


def outcomes(both: int, only_tuned: int, only_head: int, neither: int):
    """(head correct, tuned correct) per validation image for the four paired counts."""
    head = [True] * both + [False] * only_tuned + [True] * only_head + [False] * neither
    tuned = [True] * both + [True] * only_tuned + [False] * only_head + [False] * neither
    return head, tuned


@pytest.mark.parametrize(
    "counts, chosen, beyond_noise",
    [
        ((6, 1, 0, 3), "fine_tuned", False),  # one image of ten: the choice is noise, recorded
        ((5, 2, 2, 1), "head", False),  # a tie keeps the head (no losses given)
        ((20, 10, 0, 10), "fine_tuned", True),  # 10 to 0: p = 2/1024
        ((20, 5, 0, 15), "fine_tuned", False),  # 5 to 0: p = 2/32 = 0.0625
        ((20, 0, 6, 14), "head", True),  # fine-tuning lost 6 to 0: p = 2/64
        ((0, 0, 0, 8), "head", False),  # neither right on anything: nothing to choose on
    ],
)
def test_guard_decision_table(counts, chosen, beyond_noise):
    from scipy.stats import binomtest

    from components.evaluate import guard_decision

    decision = guard_decision(*outcomes(*counts))
    both, only_tuned, only_head, neither = counts
    assert decision.chosen == chosen and decision.beyond_noise is beyond_noise
    assert (decision.only_tuned_right, decision.only_head_right) == (only_tuned, only_head)
    assert decision.val_images == sum(counts)
    expected = (
        binomtest(only_tuned, only_tuned + only_head).pvalue if only_tuned + only_head else 1.0
    )
    assert decision.p_value == pytest.approx(expected)
    assert f"p={decision.p_value:.3g}" in decision.reason
    assert ("beyond noise" if beyond_noise else "within noise") in decision.reason


@pytest.mark.parametrize(
    "head_loss, tuned_loss, chosen",
    [(0.40, 0.35, "fine_tuned"), (0.35, 0.40, "head"), (0.40, 0.40, "head"), (None, 0.35, "head")],
)
def test_a_tie_in_images_right_goes_to_the_lower_validation_loss(head_loss, tuned_loss, chosen):
    """25-100 validation images tie often (4 of 9 benchmark runs): the loss on the same images,
    which early stopping chose the fine-tuned weights by, decides; without both, the head."""
    from components.evaluate import guard_decision

    decision = guard_decision(*outcomes(5, 2, 2, 1), head_loss=head_loss, tuned_loss=tuned_loss)
    assert decision.chosen == chosen and (decision.head_loss, decision.tuned_loss) == (head_loss, tuned_loss)  # fmt: skip
    assert ("lower val loss" in decision.reason) is (chosen == "fine_tuned")
    more = guard_decision(*outcomes(5, 1, 2, 2), head_loss=0.9, tuned_loss=0.1)  # fewer right
    assert more.chosen == "head"  # a lower loss never outweighs fewer images right


def test_guard_decision_refuses_unpaired_results():
    from components.evaluate import guard_decision

    with pytest.raises(ValueError, match="one bool per validation image"):
        guard_decision([True, False], [True])


def test_evaluation_report_states_the_per_class_rule():
    from components.evaluate import (
        CLASS_RULE,
        FIRST_MODEL_RULE,
        Evaluation,
        render_html,
        render_markdown,
    )

    metrics = {"accuracy": 1.0, "examples": 2, "labels": ["a"], "confusion_matrix": [[2]],
               "per_class": {"a": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}}  # fmt: skip
    evaluation = Evaluation(metrics, None, True, "no champion")
    assert "Newcombe interval" in CLASS_RULE and "bless_class_tolerance" in CLASS_RULE
    for rule in (CLASS_RULE, FIRST_MODEL_RULE):
        assert rule in render_markdown(evaluation)
        assert html.escape(rule) in render_html(evaluation)
    assert (
        "majority-class rate" in FIRST_MODEL_RULE and "bless_min_macro_recall" in FIRST_MODEL_RULE
    )


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
