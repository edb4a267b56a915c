"""Scorers: turn (example, model output) into named per-example scores.

Three families, never mixed in one table:

- `multiple_choice`: the model's summed log-likelihood of each option after the prompt;
  `acc` is the argmax, `acc_norm` the argmax after dividing by the option's length in characters
  (lm-evaluation-harness' definition), `label_prob` the softmax of the log-likelihoods at the label.
- `generate`: greedy generation scored SQuAD-style, `exact_match` and token `f1`, each the max
  over the gold answers, and `char_similarity` (difflib's ratio of the normalised strings).
- `eep-compat`: the EEP authors' generation rules (their OpenCompass postprocessors), reproduced with their
  quirks so our numbers can be put next to theirs: an option letter read from the output
  (`first_capital`, `first_option`), inclusion matching for ReCoRD/DROP (`em_inclusion`) and
  SQuAD 2.0 (`squad_inclusion`), and GSM8K's `last_number`.

`label_prob` and `char_similarity` are dense: they move when a pruning makes an answer less wrong,
where `acc` and `exact_match` stay flat. They are offered as search metrics (`search_metric` of a
task spec) for landscapes where most candidates score 0; tables report the primary metric.

Everything here is a pure function of strings and numbers; `make_scorer` only reads a task spec's
attributes. The names (metrics, rules) live in `eep.tasks.vocab`, which the spec validates against.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from eep.tasks.example import Example
from eep.tasks.vocab import (  # noqa: F401  (METRICS, LETTER_RULES... are read from here too)
    COMPAT_RULES,
    DEFAULT_PRIMARY,
    LETTER_RULES,
    METRICS,
    SEARCH_SPLITS,
)

if TYPE_CHECKING:
    from eep.tasks.spec import TaskSpec


# --------------------------------------------------------------------------- multiple choice


def choice_length(option: str) -> int:
    """Characters lm-evaluation-harness divides by for `acc_norm`.

    lm-eval scores the continuation `" " + choice` but normalises by `len(choice)`, without its
    one-space target delimiter; our options carry that space, so one leading space is dropped.
    (It counts characters of a Python str, which equal bytes only for ASCII text.)
    """
    text = option[1:] if option.startswith(" ") else option
    return max(len(text), 1)  # an empty option would divide by zero


def score_choices(logliks: Sequence[float], options: Sequence[str], label: int) -> dict[str, float]:
    """`acc`, `acc_norm` (1.0 or 0.0) and `label_prob` of one multiple-choice example."""
    if len(logliks) != len(options):
        raise ValueError(f"got {len(logliks)} log-likelihoods for {len(options)} options")
    if not 0 <= label < len(options):
        raise ValueError(f"label {label} is out of range for {len(options)} options")
    normed = [ll / choice_length(opt) for ll, opt in zip(logliks, options, strict=True)]
    # Ties go to the first option, as numpy.argmax does in lm-eval.
    acc = _argmax(logliks) == label
    acc_norm = _argmax(normed) == label
    top = max(logliks)
    if math.isinf(top):  # every option impossible: no preference
        label_prob = 1.0 / len(logliks)
    else:
        # Shifted by the largest value: log-likelihoods can be far below exp's range.
        weights = [math.exp(ll - top) for ll in logliks]
        label_prob = weights[label] / sum(weights)
    return {"acc": float(acc), "acc_norm": float(acc_norm), "label_prob": label_prob}


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if math.isnan(v):
            raise ValueError("a log-likelihood is NaN")
        if v > values[best]:
            best = i
    return best


# --------------------------------------------------------------------------- generation


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1, the max over gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def char_similarity(prediction: str, golds: Sequence[str]) -> float:
    """difflib's ratio (2 x matched characters / total) of the normalised strings, max over golds.

    1.0 exactly when `exact_match` is 1.0; between 0 and 1 it grows with the characters in
    the right order, so a nearly right answer scores above a wrong one.
    """
    pred = normalize_answer(prediction)
    return max(
        (difflib.SequenceMatcher(None, pred, normalize_answer(g), autojunk=False).ratio() for g in golds),
        default=0.0,
    )


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD 2.0: an empty gold ("no answer") scores 1 only against an empty prediction.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut before the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


# --------------------------------------------------------------------------- EEP-compat rules


def first_capital(text: str) -> str:
    """The first uppercase character anywhere in `text`, or "" (OpenCompass `first-capital`)."""
    for ch in text:
        if ch.isupper():
            return ch
    return ""


def _option_patterns(letters: str) -> list[str]:
    cls = f"[{re.escape(letters)}]"
    # The English-relevant subset of OpenCompass' first_option_postprocess cascade, in its order
    # (its Chinese-phrase patterns cannot match English outputs and are left out).
    return [
        rf"[\s:,]{cls}[.,]?$",  # a lone letter closing the output: "... so, B."
        rf"[Tt]he answer is \(?{cls}\)?",
        rf"[Tt]he answer is option \(?{cls}\)?",
        rf"[Tt]he correct answer is \(?{cls}\)?",
        rf"[Tt]he correct answer is option \(?{cls}\)?",
        rf"[Tt]he answer to the question is \(?{cls}\)?",
        rf"(?:\s|^){cls}[\s.,:]",
        rf"(?:\s|^){cls}(?:\s|$)",
        r"1.\s?(.*?)$",  # sic: a "1" and the rest of the last line (a numbered-list rule)
        rf"{cls}:",
        cls,  # "cushion": any option letter anywhere, even inside a word ("Based" -> B)
    ]


def first_option(text: str, letters: str) -> str:
    """The option letter the EEP authors read from `text`, or "".

    First the authors' own check: the output opens with a letter followed by a space, colon or
    comma (we also accept the end of the output and leading whitespace). Otherwise the first
    pattern of the cascade that matches decides; inside the matched span the first of `letters`
    (in `letters` order, not text order) that occurs wins, as in OpenCompass.
    """
    cls = f"[{re.escape(letters)}]"
    opening = re.match(rf"\s*({cls})(?:[\s:,]|$)", text)
    if opening:
        return opening.group(1)
    for pattern in _option_patterns(letters):
        match = re.search(pattern, text)
        if match:
            span = match.group(0)
            for letter in letters:
                if letter in span:
                    return letter
    return ""


def general_postprocess(text: str) -> str:
    """OpenCompass `general`: cut at the first newline/period/comma, drop punctuation and
    articles (any case), collapse spaces. Case is kept."""
    text = re.split(r"[\n.,]", text, maxsplit=1)[0]
    return _strip_punctuation_articles(text)


def squad_postprocess(text: str) -> str:
    """The authors' `squad` postprocess (used on SQuAD gold answers): like `general_postprocess`
    but cut only at the first newline, so "1,000" becomes "1000" rather than "1"."""
    text = text.split("\n", 1)[0]
    return _strip_punctuation_articles(text)


def _strip_punctuation_articles(text: str) -> str:
    text = re.sub(r"[^\w\s]", "", text)
    text = re.sub(r"\b(a|an|the)\b", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


def em_inclusion(prediction: str, golds: Sequence[str]) -> float:
    """The authors' ReCoRD/DROP rule: correct when any gold answer, raw or normalised, is a
    substring of the normalised prediction (so gold "2" matches a predicted "12")."""
    pred = general_postprocess(prediction)
    candidates = {*golds, *(general_postprocess(g) for g in golds)}
    return float(any(c in pred for c in candidates))


def squad_inclusion(prediction: str, golds: Sequence[str]) -> float:
    """The authors' SQuAD 2.0 rule: first line, lower-cased, text after the last "answer is",
    `general_postprocess`; correct when any gold (`squad_postprocess`, lower-cased) is a
    substring. Unanswerable questions carry the gold "impossible to answer".

    A gold that normalises to "" matches everything, as in the authors' code.
    """
    pred = prediction.split("\n", 1)[0].lower()
    if "answer is" in pred:
        pred = pred.split("answer is")[-1]
    pred = general_postprocess(pred)
    return float(any(squad_postprocess(g).lower() in pred for g in golds))


_NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def last_number(text: str) -> str:
    """The last number in `text` before any "Question:" (GSM8K/DROP), or "".

    Commas are not part of a number here ("1,000" gives "000"), as in the authors' rule.
    """
    numbers = _NUMBER.findall(text.split("Question:", 1)[0])
    return numbers[-1] if numbers else ""


def numbers_equal(prediction: str, gold: str) -> bool:
    """Equal as strings, or as numbers within 1e-6 (the authors' GSM8K comparison)."""
    if prediction == gold:
        return True
    try:
        return abs(float(prediction) - float(gold)) < 1e-6
    except ValueError:
        return False


def compat_hit(rule: str, text: str, answers: Sequence[str], letters: str = "") -> float:
    """1.0 or 0.0: whether `text` is right under EEP-compat `rule`."""
    if rule == "first_capital":
        return float(first_capital(text) == answers[0])
    if rule == "first_option":
        return float(first_option(text, letters) == answers[0])
    if rule == "em_inclusion":
        return em_inclusion(text, answers)
    if rule == "squad_inclusion":
        return squad_inclusion(text, answers)
    if rule == "last_number":
        pred = last_number(text)
        return float(bool(pred) and any(numbers_equal(pred, g) for g in answers))
    raise ValueError(f"unknown eep-compat rule {rule!r}; the rules are: {', '.join(COMPAT_RULES)}")


# --------------------------------------------------------------------------- scorer objects


class Scorer(Protocol):
    """Turns one example and the model's output into named scores."""

    @property
    def metrics(self) -> tuple[str, ...]: ...

    @property
    def primary(self) -> str: ...

    def score(self, example: Example, output) -> dict[str, float]: ...


@dataclass(frozen=True)
class MultipleChoiceScorer:
    """Output: the summed log-likelihood of each of `example.options`."""

    primary: str = "acc"
    metrics: tuple[str, ...] = METRICS["multiple_choice"]

    def score(self, example: Example, output: Sequence[float]) -> dict[str, float]:
        """`acc` and `acc_norm` for one example."""
        if example.label is None:
            raise ValueError(f"example {example.id!r} has no label")
        return score_choices(output, example.options, example.label)


@dataclass(frozen=True)
class GenerationScorer:
    """Output: the decoded continuation; cut at `stop`, optionally reduced to its last number."""

    stop: tuple[str, ...] = ()
    answer_extract: str | None = None
    primary: str = "exact_match"
    metrics: tuple[str, ...] = METRICS["generate"]

    def score(self, example: Example, output: str) -> dict[str, float]:
        """`exact_match`, `f1` and `char_similarity` for one example."""
        text = truncate_at_stop(output, self.stop)
        if self.answer_extract == "last_number":
            text = last_number(text)
        return {
            "exact_match": exact_match(text, example.answers),
            "f1": token_f1(text, example.answers),
            "char_similarity": char_similarity(text, example.answers),
        }


@dataclass(frozen=True)
class EEPCompatScorer:
    """Output: the decoded continuation, judged by one of the authors' rules."""

    rule: str
    letters: str = ""
    stop: tuple[str, ...] = ()
    primary: str = "acc"
    metrics: tuple[str, ...] = METRICS["eep-compat"]

    def score(self, example: Example, output: str) -> dict[str, float]:
        """`acc` for one example."""
        text = truncate_at_stop(output, self.stop)
        return {"acc": compat_hit(self.rule, text, example.answers, self.letters)}


def primary_metric(spec: TaskSpec) -> str:
    """The metric a task's fitness is read from."""
    return spec.primary_metric or DEFAULT_PRIMARY[spec.scorer]


def search_metric(spec: TaskSpec) -> str:
    """The metric a search and its dev re-ranking maximise (default: the primary metric)."""
    return spec.search_metric or primary_metric(spec)


def split_metric(spec: TaskSpec, split: str) -> str:
    """The metric a split's score is read from: the search metric on search and dev, else primary."""
    return search_metric(spec) if split in SEARCH_SPLITS else primary_metric(spec)


def make_scorer(spec: TaskSpec) -> Scorer:
    """The scorer a task spec asks for."""
    primary = primary_metric(spec)
    if spec.scorer == "multiple_choice":
        return MultipleChoiceScorer(primary=primary)
    if spec.scorer == "generate":
        return GenerationScorer(
            stop=tuple(spec.stop), answer_extract=spec.answer_extract, primary=primary
        )
    if spec.scorer == "eep-compat":
        return EEPCompatScorer(
            rule=spec.compat_rule, letters=spec.option_letters or "", stop=tuple(spec.stop)
        )
    raise ValueError(f"unknown scorer {spec.scorer!r}")


def score_generation(spec: TaskSpec, example: Example, text: str) -> dict[str, float]:
    """Scores of one generated continuation under a `generate` or `eep-compat` task."""
    if spec.scorer == "multiple_choice":
        raise ValueError(f"task {spec.name!r} is scored by log-likelihood, not generation")
    return make_scorer(spec).score(example, text)


def score_multiple_choice(
    spec: TaskSpec, example: Example, logliks: Sequence[float]
) -> dict[str, float]:
    """Scores of one example's option log-likelihoods under a `multiple_choice` task."""
    if spec.scorer != "multiple_choice":
        raise ValueError(f"task {spec.name!r} is scored by generation, not log-likelihood")
    return make_scorer(spec).score(example, logliks)


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over examples (fractions in [0, 1], not percent)."""
    if not per_example:
        raise ValueError("no examples to aggregate")
    names = per_example[0].keys()
    return {name: sum(s[name] for s in per_example) / len(per_example) for name in names}
