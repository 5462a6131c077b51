"""Listwise parsing and repair, sliding windows, and NDCG@10 (pure, plain lists)."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.listwise import SlidingWindows, ndcg_at_k, parse_ranking, window_bounds


# -- parse and repair --------------------------------------------------------------------------
def test_a_clean_answer_needs_no_repair() -> None:
    p = parse_ranking("<think>[2] is best.</think><answer>[2] > [3] > [1]</answer>", 3)
    assert p.reject is None and p.order == [1, 2, 0] and p.repairs == {} and p.ranked == 3


def test_text_before_think_end_is_dropped_even_when_it_names_ids() -> None:
    text = "<think>maybe [1] > [2] > [3]? no.</think> [3] > [1] > [2]"
    assert parse_ranking(text, 3).order == [2, 0, 1]


def test_unicode_digits_and_full_width_brackets_are_mapped_and_counted() -> None:
    p = parse_ranking("<answer>［３］ > [١] > [2]</answer>", 3)
    assert p.order == [2, 0, 1] and p.repairs == {"unicode_digits": 2}


def test_duplicates_unknown_and_missing_ids_are_repaired_and_counted() -> None:
    p = parse_ranking("[4] > [2] > [4] > [9] > [0] > [1]", 5, min_ranked=2)
    assert p.reject is None
    assert p.order == [3, 1, 0, 2, 4]  # missing [3], [5] appended in window order
    assert p.repairs == {"duplicates": 1, "unknown_ids": 2, "missing_appended": 2}
    assert p.ranked == 3


def test_bare_numbers_are_read_when_there_are_no_brackets() -> None:
    p = parse_ranking("2 > 1 > 3", 3)
    assert p.order == [1, 0, 2] and p.repairs == {"unbracketed": 1}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty_answer"),
        (None, "empty_answer"),
        ("<think>I should compare [1] and [2] but", "think_without_answer"),
        ("I cannot rank these passages.", "no_ranking"),
        ("<think>x</think><answer></answer>", "no_ranking"),
        ("[1] > [1] > [1]", "too_few_ranked"),
        ("[2]", "too_few_ranked"),
    ],
)
def test_answers_that_rank_too_little_are_rejected(text, reason) -> None:
    assert parse_ranking(text, 5, min_ranked=3).reject == reason


# -- sliding windows ---------------------------------------------------------------------------
def test_window_bounds_go_back_to_front_and_cover_the_front() -> None:
    assert window_bounds(100, 20, 10) == [(80 - 10 * i, 100 - 10 * i) for i in range(9)]
    assert window_bounds(25, 20, 10) == [(5, 25), (0, 15)]
    assert window_bounds(7, 20, 10) == [(0, 7)]
    assert window_bounds(0) == []


def _scripted_teacher(hidden: dict[str, float]):
    """A teacher that sorts a window by a hidden score, as the rank stage's answers would."""

    def rank(ids: tuple[str, ...]) -> list[int]:
        text = " > ".join(
            f"[{i + 1}]" for i in sorted(range(len(ids)), key=lambda i: -hidden[ids[i]])
        )
        return parse_ranking(f"<think>sorted</think><answer>{text}</answer>", len(ids)).order

    return rank


def test_one_pass_puts_the_ten_best_on_top_in_order() -> None:
    rng = np.random.default_rng(3)
    ids = [f"d{i}" for i in range(100)]
    hidden = dict(zip(ids, rng.random(100), strict=True))
    teacher = _scripted_teacher(hidden)
    sw = SlidingWindows(ids, window=20, step=10, depth=100)
    calls = 0
    while (w := sw.next_window()) is not None:
        sw.apply(w, teacher(w.doc_ids))
        calls += 1
    assert calls == 9
    truth = sorted(ids, key=lambda d: -hidden[d])
    assert sw.order[:10] == truth[:10]
    assert sorted(sw.order) == sorted(ids)


def test_passes_until_stable_recover_the_hidden_order_exactly_over_100() -> None:
    rng = np.random.default_rng(11)
    ids = [f"d{i}" for i in range(130)]
    hidden = dict(zip(ids, rng.random(130), strict=True))
    teacher = _scripted_teacher(hidden)
    sw = SlidingWindows(ids, window=20, step=10, depth=100, passes=20)
    while (w := sw.next_window()) is not None:
        sw.apply(w, teacher(w.doc_ids))
    assert sw.order[:100] == sorted(ids[:100], key=lambda d: -hidden[d])
    assert sw.order[100:] == ids[100:]  # below the depth: untouched
    assert sw.done
    # Each pass settles 10 more places; the last pass changes nothing and stops the walk.
    assert len({w.pass_index for w, _ in sw.log}) <= 10


def test_a_window_is_asked_again_until_applied_and_checked() -> None:
    sw = SlidingWindows([f"d{i}" for i in range(5)], window=4, step=2)
    w = sw.next_window()
    assert sw.next_window() == w and w.doc_ids == ("d1", "d2", "d3", "d4")
    with pytest.raises(ValueError):
        sw.apply(w, [0, 0, 1, 2])
    sw.skip(w)
    w2 = sw.next_window()
    assert (w2.start, w2.end) == (0, 3)  # end 5 - step 2, clamped at the front
    sw.apply(w2, [2, 1, 0])
    assert sw.order == ["d2", "d1", "d0", "d3", "d4"] and sw.next_window() is None


# -- NDCG@10 -------------------------------------------------------------------------------
def test_ndcg_matches_the_definition_and_is_none_without_relevant_docs() -> None:
    assert ndcg_at_k(["a", "b", "c"], {"a": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], {"a": 1}) == pytest.approx(1 / np.log2(3))
    graded = ndcg_at_k(["b", "a"], {"a": 2, "b": 1})
    # trec_eval's gain is the grade itself (not 2^grade - 1).
    assert graded == pytest.approx((1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3)))
    assert ndcg_at_k(["x"] + [f"n{i}" for i in range(10)] + ["a"], {"a": 1}) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}) is None
