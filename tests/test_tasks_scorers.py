"""Scorers: multiple choice, SQuAD-style generation metrics, and the EEP authors' rules."""

from __future__ import annotations

import math

import pytest

from eep.tasks import scorers
from eep.tasks.example import Example
from eep.tasks.registry import resolve_task
from eep.tasks.scorers import (
    aggregate,
    char_similarity,
    choice_length,
    compat_hit,
    em_inclusion,
    exact_match,
    first_capital,
    first_option,
    general_postprocess,
    last_number,
    make_scorer,
    normalize_answer,
    numbers_equal,
    primary_metric,
    score_choices,
    score_generation,
    score_multiple_choice,
    search_metric,
    split_metric,
    squad_inclusion,
    squad_postprocess,
    token_f1,
    truncate_at_stop,
)

# --------------------------------------------------------------------------- multiple choice


def test_acc_is_argmax_of_summed_loglik():
    scores = score_choices([-3.0, -1.0, -2.0], [" a", " b", " c"], 1)
    assert scores["acc"] == 1.0 and scores["acc_norm"] == 1.0
    assert score_choices([-3.0, -1.0, -2.0], [" a", " b", " c"], 0)["acc"] == 0.0


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc():
    # A long option with a lower total but a higher per-character log-likelihood.
    options = [" no", " absolutely yes"]  # lengths 2 and 14 (the delimiter space is not counted)
    logliks = [-2.0, -7.0]  # per char: -1.0 vs -0.5
    assert {k: v for k, v in score_choices(logliks, options, 1).items() if k != "label_prob"} == {
        "acc": 0.0, "acc_norm": 1.0,
    }
    assert {k: v for k, v in score_choices(logliks, options, 0).items() if k != "label_prob"} == {
        "acc": 1.0, "acc_norm": 0.0,
    }


def test_choice_length_matches_lm_eval():
    # lm-eval scores " " + choice but divides by len(choice); it counts str characters.
    assert choice_length(" yes") == 3
    assert choice_length("yes") == 3
    assert choice_length("  two") == 4  # only one delimiter space is dropped
    assert choice_length(" café") == 4  # characters, not UTF-8 bytes (5)
    assert choice_length("") == 1  # never divide by zero


def test_ties_go_to_the_first_option():
    assert score_choices([-1.0, -1.0], [" x", " y"], 0)["acc"] == 1.0
    assert score_choices([-1.0, -1.0], [" x", " y"], 1)["acc"] == 0.0


def test_score_choices_rejects_bad_input():
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 options"):
        score_choices([-1.0, -2.0], ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match="out of range"):
        score_choices([-1.0, -2.0], ["a", "b"], 2)
    with pytest.raises(ValueError, match="NaN"):
        score_choices([math.nan, -2.0], ["a", "b"], 0)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear ", "apple pear"),
        ("Theatre", "theatre"),  # "the" inside a word stays
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_takes_any_gold():
    assert exact_match("the Nile", ["Amazon", "Nile"]) == 1.0
    assert exact_match("Nile river", ["Nile"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_token_f1():
    assert token_f1("the big red dog", ["red dog"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("cat", ["dog", "cat"]) == 1.0
    assert token_f1("cat", ["dog"]) == 0.0
    # Repeated tokens count only as often as they appear in both.
    assert token_f1("a dog dog", ["dog"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # SQuAD 2.0 "no answer": an empty gold scores 1 only against an empty prediction.
    assert token_f1("", [""]) == 1.0
    assert token_f1("something", [""]) == 0.0
    assert token_f1("x", []) == 0.0


def test_truncate_at_stop_uses_earliest_stop():
    assert truncate_at_stop("42\nQuestion: next", ["Question:", "\n"]) == "42"
    assert truncate_at_stop("no stop here", ["\n"]) == "no stop here"
    assert truncate_at_stop("abc", ["", "c"]) == "ab"  # an empty stop string is ignored


def test_generation_scorer_cuts_and_extracts():
    ex = Example("g", "Q:", ("12",))
    scorer = scorers.GenerationScorer(stop=("\n\n",), answer_extract="last_number")
    assert scorer.score(ex, "3 * 4 = 12 pens.\n#### 12\n\nQuestion: 5 + 5 = 10") == {
        "exact_match": 1.0,
        "f1": 1.0,
        "char_similarity": 1.0,
    }
    plain = scorers.GenerationScorer(stop=("\n",))
    assert plain.score(ex, " 12\nmore")["exact_match"] == 1.0


# --------------------------------------------------------------------------- EEP-compat rules


@pytest.mark.parametrize(
    ("text", "letter"),
    [("A", "A"), (" B. No", "B"), ("yes, so A", "A"), ("answer: b", ""), ("", ""), ("Yes", "Y")],
)
def test_first_capital(text, letter):
    assert first_capital(text) == letter


@pytest.mark.parametrize(
    ("text", "letters", "letter"),
    [
        ("B", "AB", "B"),  # a bare letter
        ("A: Yes", "AB", "A"),  # the authors' opening check: letter + colon
        ("B, because the passage says so", "AB", "B"),
        (" C Neutral", "ABC", "C"),  # leading space allowed
        ("A. Contradiction", "ABC", "A"),  # "." is not in the opening check; the cascade finds it
        ("The answer is (C).", "ABC", "C"),
        ("Based on the text, the correct answer is B", "AB", "B"),
        ("I think it's C", "ABC", "C"),  # a lone letter closing the output
        ("the relation is neutral", "ABC", ""),  # no capital option letter anywhere
        # The cushion takes an option letter anywhere, even inside a word: "Both" -> B.
        ("Both sentences agree", "AB", "B"),
        ("Clearly B or A", "ABC", "A"),  # a letter closing the output beats an earlier one
        # The "1." rule spans the rest of the line; inside a matched span the first letter in
        # `letters` order wins, not the first in the text (OpenCompass quirk).
        ("1)Bx,Ay", "ABC", "A"),
    ],
)
def test_first_option(text, letters, letter):
    assert first_option(text, letters) == letter


def test_general_postprocess_cuts_and_strips():
    assert general_postprocess("The Red Sox, in 2004.") == "Red Sox"
    assert general_postprocess("an answer\nsecond line") == "answer"
    assert general_postprocess("1,000 people") == "1"  # cut at the comma
    assert general_postprocess("Über-Café!") == "ÜberCafé"  # \w is unicode-aware
    assert general_postprocess("THE Apple") == "Apple"  # articles dropped in any case, case kept


def test_squad_postprocess_cuts_only_at_newline():
    assert squad_postprocess("1,000 people. Yes\nmore") == "1000 people Yes"


def test_em_inclusion_is_substring_of_normalised_prediction():
    assert em_inclusion("The answer: 12 points.", ["12"]) == 1.0
    assert em_inclusion("12", ["2"]) == 1.0  # the authors' rule: gold "2" matches "12"
    assert em_inclusion("Pell ran", ["Pell"]) == 1.0
    assert em_inclusion("pell", ["Pell"]) == 0.0  # case-sensitive, as theirs
    assert em_inclusion("Rivertown, then more", ["the Rivertown"]) == 1.0  # normalised gold
    assert em_inclusion("Paris.", ["London"]) == 0.0
    assert em_inclusion("Kestrel. Observatory", ["Kestrel Observatory"]) == 0.0  # cut at "."


def test_squad_inclusion():
    golds = ["1871", "in 1871"]
    assert squad_inclusion("It was built in 1871.", golds) == 1.0
    assert squad_inclusion("The answer is 1871", golds) == 1.0
    assert squad_inclusion("1870\n1871", golds) == 0.0  # first line only
    impossible = ["impossible to answer"]
    assert squad_inclusion("It is Impossible to answer.", impossible) == 1.0
    assert squad_inclusion("Nobody knows", impossible) == 0.0
    # The gold is normalised without cutting at commas; the prediction is cut at the first comma.
    assert squad_inclusion("1,000 people", ["1,000"]) == 0.0
    assert squad_inclusion("about 1000 people", ["1,000"]) == 1.0
    # The text after the last "answer is" is used.
    assert squad_inclusion("my answer is no, the answer is Grey Point", ["Grey Point"]) == 1.0


def test_last_number():
    assert last_number("3 * 4 = 12 pens. #### 12") == "12"
    assert last_number("It costs -3.5 dollars") == "-3.5"
    assert last_number("so 7.\nQuestion: what is 9 + 1? 10") == "7"  # cut at "Question:"
    assert last_number("1,000") == "000"  # commas split numbers, as in the authors' rule
    assert last_number("no digits") == ""


def test_numbers_equal():
    assert numbers_equal("12", "12")
    assert numbers_equal("12.0", "12")
    assert not numbers_equal("000", "1000")
    assert not numbers_equal("", "3")


def test_compat_hit_dispatch():
    assert compat_hit("first_capital", "B", ("B",)) == 1.0
    assert compat_hit("first_option", "The answer is C", ("C",), "ABC") == 1.0
    assert compat_hit("em_inclusion", "Quinn.", ("Quinn",)) == 1.0
    assert compat_hit("squad_inclusion", "in 1871", ("1871",)) == 1.0
    assert compat_hit("last_number", "so 12.0", ("12",)) == 1.0
    assert compat_hit("last_number", "no number", ("12",)) == 0.0
    with pytest.raises(ValueError, match="unknown eep-compat rule"):
        compat_hit("nope", "x", ("x",))


# --------------------------------------------------------------------------- scorer objects


def test_label_prob_is_the_softmax_of_the_logliks_at_the_label():
    scores = score_choices([-1000.0, -1001.0], [" a", " b"], 1)  # far below exp's range
    assert scores["label_prob"] == pytest.approx(1 / (1 + math.e))
    assert score_choices([-math.inf, -math.inf], [" a", " b"], 0)["label_prob"] == 0.5


def test_char_similarity_is_dense_and_one_only_for_an_exact_match():
    assert char_similarity("olleh", ["olleh"]) == 1.0 == exact_match("olleh", ["olleh"])
    # Nearly right beats wrong; both are exact-match failures.
    near, far = char_similarity("olleb", ["olleh"]), char_similarity("xyz", ["olleh"])
    assert 0.0 == far < near == pytest.approx(0.8) and exact_match("olleb", ["olleh"]) == 0.0
    # Normalised like exact_match, the best gold counts, no gold scores 0.
    assert char_similarity(" The Cat.", ["dog", "cat"]) == 1.0
    assert char_similarity("x", []) == 0.0


def test_search_metric_defaults_to_primary_and_applies_to_search_and_dev():
    plain = resolve_task("add")
    assert search_metric(plain) == "exact_match"
    dense = resolve_task({"name": "add", "source": {"kind": "builtin", "name": "add"},
                          "search_metric": "char_similarity"})
    assert [split_metric(dense, s) for s in ("search", "dev", "test")] == [
        "char_similarity", "char_similarity", "exact_match",
    ]


def test_primary_metric_per_scorer():
    assert primary_metric(resolve_task("boolq")) == "acc"
    assert primary_metric(resolve_task("hellaswag")) == "acc_norm"  # set in the spec
    assert primary_metric(resolve_task("squad")) == "exact_match"
    assert primary_metric(resolve_task("boolq_eep")) == "acc"
    assert primary_metric(resolve_task("add")) == "exact_match"


def test_make_scorer_from_specs():
    mc = make_scorer(resolve_task("boolq"))
    assert mc.metrics == ("acc", "acc_norm", "label_prob") and mc.primary == "acc"
    ex = Example("b", "Q?", (" yes",), (" no", " yes"), 1)
    assert mc.score(ex, [-2.0, -0.5]) == {
        "acc": 1.0, "acc_norm": 1.0, "label_prob": pytest.approx(1 / (1 + math.exp(-1.5))),
    }

    compat = make_scorer(resolve_task("cb_eep"))
    assert compat.metrics == ("acc",)
    ex = Example("c", "[INST]...[/INST]", ("B",), label=1)
    assert compat.score(ex, "B. Entailment") == {"acc": 1.0}
    assert compat.score(ex, "A. Contradiction") == {"acc": 0.0}


def test_score_generation_and_multiple_choice_check_the_task_kind():
    squad = resolve_task("squad")
    ex = Example("s", "Q:", ("1871", "in 1871"))
    assert score_generation(squad, ex, " In 1871.\nTitle: x") == {
        "exact_match": 1.0, "f1": 1.0, "char_similarity": 1.0,
    }
    with pytest.raises(ValueError, match="log-likelihood, not generation"):
        score_generation(resolve_task("boolq"), ex, "yes")
    with pytest.raises(ValueError, match="generation, not log-likelihood"):
        score_multiple_choice(squad, ex, [-1.0])
    mc = Example("b", "Q?", (" yes",), (" no", " yes"), 1)
    assert score_multiple_choice(resolve_task("boolq"), mc, [-1.0, -3.0])["acc"] == 0.0


def test_aggregate_means():
    assert aggregate([{"acc": 1.0, "f1": 0.5}, {"acc": 0.0, "f1": 1.0}]) == {"acc": 0.5, "f1": 0.75}
    with pytest.raises(ValueError):
        aggregate([])
