"""Metric functions against rankings worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.retrieval.metrics import average_precision, precision_at, recall_at


def test_ap_by_hand():
    # Relevant at ranks 1, 3, 6 of 3 relevant: (1/1 + 2/3 + 3/6) / 3 = 0.7222...
    assert average_precision([1, 0, 1, 0, 0, 1]) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # Perfect and worst-placed rankings.
    assert average_precision([1, 1, 0, 0]) == 1.0
    assert average_precision([0, 0, 0, 1]) == pytest.approx(0.25)


def test_ap_counts_relevant_items_missing_from_the_ranking():
    # Two found at ranks 1 and 2, two more never returned: (1 + 1 + 0 + 0) / 4.
    assert average_precision([1, 1, 0], total_relevant=4) == pytest.approx(0.5)


def test_query_with_no_relevant_image():
    assert average_precision([0, 0, 0]) == 0.0
    assert average_precision([], total_relevant=0) == 0.0
    assert precision_at([0, 0, 0], 3) == 0.0


def test_ties_in_labels_do_not_matter_only_positions():
    # Two rankings with the same relevance pattern have the same AP, whatever the ids.
    assert average_precision([True, False, True]) == average_precision([1, 0, 1])


def test_precision_at_k_by_hand():
    assert precision_at([1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1], 10) == pytest.approx(0.4)
    # Fewer than k results: the missing ones count as not relevant.
    assert precision_at([1, 1], 10) == pytest.approx(0.2)


def test_recall_at_k_by_hand():
    exact = [[1, 2, 3, 4], [5, 6, 7, 8]]
    approx = [[1, 2, 9, 4], [8, 7, 6, 5]]  # order inside the top k does not matter
    assert recall_at(approx, exact, 4) == pytest.approx((3 / 4 + 1) / 2)
    assert recall_at(approx, exact, 2) == pytest.approx((1 + 0) / 2)
