"""The benchmarks compare fairly: validation images are never training images."""

import numpy as np
import pytest

from benchmarks.common import TARGET, train_and_validation_indices, validation_per_class
from components import datasets


@pytest.fixture(scope="module")
def fashion_labels():
    return datasets.load_fashion_mnist("train")[1]


@pytest.mark.parametrize("budget", [10, 30, 100])
@pytest.mark.parametrize("seed", [0, 1, 6])
def test_validation_never_holds_a_training_image(fashion_labels, budget, seed):
    train, validation = train_and_validation_indices(fashion_labels, budget, seed)
    assert set(train.tolist()).isdisjoint(validation.tolist())
    for cls in TARGET:
        assert (fashion_labels[train] == cls).sum() == budget
        assert (fashion_labels[validation] == cls).sum() == validation_per_class(budget)
    again = train_and_validation_indices(fashion_labels, budget, seed)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, validation), strict=True))


def test_the_draw_differs_across_seeds(fashion_labels):
    first, _ = train_and_validation_indices(fashion_labels, 10, 0)
    second, _ = train_and_validation_indices(fashion_labels, 10, 1)
    assert not np.array_equal(first, second)
