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


def test_wilson_interval_matches_the_closed_form_and_stays_in_range() -> None:
    from benchmarks.alignment import wilson_ci

    lo, hi = wilson_ci(30, 60)
    assert lo == pytest.approx(0.3960, abs=1e-3) and hi == pytest.approx(0.6040, abs=1e-3)
    assert wilson_ci(0, 10)[0] == 0.0 and 0.0 < wilson_ci(0, 10)[1] < 0.3
    assert wilson_ci(10, 10)[1] == 1.0
    assert all(x != x for x in wilson_ci(0, 0))  # nan: no data, no interval


def _row(wording: str, item: str, method: str, positive: bool, t: float, **kw: object) -> dict:
    return {
        "split": "dev",
        "wording": wording,
        "id": item,
        "method": method,
        "positive": positive,
        "compound": 0.5 if positive else -0.5,
        "elapsed_s": t,
        **kw,
    }


def test_tradeoff_report_compares_on_common_requests_and_matches_best_of_by_time() -> None:
    from benchmarks.alignment import search_diagnostics, tradeoff_report

    rows = []
    for i in range(4):
        item = f"s{i}"
        rows.append(_row("plain", item, "greedy", i == 0, 1.0, self_score=0.0))
        # Candidates: only the 3rd of 4 is positive, and the judge likes it best.
        cands = [
            {"text": "x", "score": s, "compound": c, "token_ids": [1]}
            for s, c in ((0.1, -0.5), (0.0, -0.5), (0.9, 0.6), (0.2, -0.5))
        ]
        rows.append(_row("plain", item, "best_of:4", True, 4.0, self_score=0.9, candidates=cands))
        rows.append(
            _row("plain", item, "best_of:2", False, 2.0, self_score=0.1, candidates=cands[:2])
        )
        rows.append(
            _row(
                "plain",
                item,
                "rain:x",
                True,
                3.8,
                self_score=-0.1 if i == 3 else 0.5,
                commits=[
                    {
                        "forced": None,
                        "candidates": [
                            {"p": 0.99, "n": 3, "v": 0.2, "greedy": True, "len": 8, "chosen": True},
                            {
                                "p": 0.01,
                                "n": 1,
                                "v": 0.6,
                                "greedy": False,
                                "len": 8,
                                "chosen": False,
                            },
                        ],
                    }
                ],
            )
        )
    rows.append(_row("plain", "s9", "greedy", True, 1.0))  # no other method: not compared
    block = tradeoff_report(rows)["by_wording"]["plain"]
    assert block["n_requests"] == 4
    m = block["methods"]
    assert m["greedy"]["rate"] == 0.25 and m["rain:x"]["rate"] == 1.0
    assert m["rain:x"]["time_ratio"] == pytest.approx(3.8)
    # Best-of-2 quality from the first two candidates of best-of-4 (none positive).
    assert m["best_of:2"]["rate"] == 0.0 and m["best_of:4"]["rate"] == 1.0
    assert m["best_of:2"]["time_ratio"] == pytest.approx(2.0)
    assert m["rain:x"]["self_below_greedy"] == 0.25
    gain = block["gains"]["rain:x"]
    assert gain["matched_best_of"] == "best_of:4"  # 4.0x is closest to 3.8x
    assert gain["vs_greedy_points"] == pytest.approx(75.0)
    assert gain["vs_best_of_points"] == pytest.approx(0.0)

    diag = search_diagnostics(rows)
    assert diag["whole_answers"]["within_request_agreement"] == 1.0
    d = diag["rain:x"]
    assert d["root_greedy_prior_share"] == pytest.approx(0.99)
    # Length-normalised (8th roots), the sibling gets a real share.
    assert d["root_greedy_prior_share_length_normalised"] == pytest.approx(
        0.99 ** (1 / 8) / (0.99 ** (1 / 8) + 0.01 ** (1 / 8))
    )
    assert d["committed_below_a_sibling"] == 1.0 and d["committed_below_greedy_sibling"] == 0.0
    assert d["final_self_below_greedy"] == 0.25
    # The offline final check keeps greedy's (negative) answer on s3.
    assert d["positive_rate_with_final_check_offline"] == 0.75
