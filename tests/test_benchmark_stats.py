"""The statistics the alignment benchmark reports about its judge (no model needed)."""

from __future__ import annotations

import pytest

from benchmarks.alignment import _auc, _ranks, _spearman


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    # Positives 3, 2, 1 against the negative 1: two wins and a tie.
    assert _auc([3, 2, 1, 1], [True, True, False, True]) == pytest.approx(2.5 / 3)
    assert _auc([0.9, 0.1], [True, False]) == 1.0
    assert _auc([0.1, 0.9], [True, False]) == 0.0
    assert _auc([1.0, 2.0], [True, True]) is None


def test_spearman_uses_average_ranks() -> None:
    assert list(_ranks([5, 1, 5, 2])) == [2.5, 0.0, 2.5, 1.0]
    assert _spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert _spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert _spearman([0, 0, 0], [1, 2, 3]) is None  # a constant judge ranks nothing
