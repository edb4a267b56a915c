"""The task vocabulary: split, scorer, metric, rule and preprocess-step names, and their relations.

The lowest module of `eep.tasks`: `spec` validates against these names, `loaders` and `scorers`
implement them, and none of the three needs another to know what is allowed. Plain data only.
"""

from __future__ import annotations

from typing import Literal

SPLIT_NAMES: tuple[str, ...] = ("search", "dev", "test")
SplitName = Literal["search", "dev", "test"]
# Splits a search selects on; every other split (test, calibration) reports the primary metric.
SEARCH_SPLITS: frozenset[str] = frozenset({"search", "dev"})

ScorerName = Literal["multiple_choice", "generate", "eep-compat"]
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "label_prob"),
    "generate": ("exact_match", "f1", "char_similarity"),
    "eep-compat": ("acc",),
}
DEFAULT_PRIMARY: dict[str, str] = {
    "multiple_choice": "acc",
    "generate": "exact_match",
    "eep-compat": "acc",
}

# The EEP authors' answer rules (eep-compat scorer).
CompatRule = Literal[
    "first_capital", "first_option", "squad_inclusion", "em_inclusion", "last_number"
]
COMPAT_RULES: tuple[str, ...] = CompatRule.__args__
# Rules that read an option letter from the output; the others compare against answer strings.
LETTER_RULES: frozenset[str] = frozenset({"first_capital", "first_option"})

# Record rewrites (`preprocess` steps of a spec): the fields each reads, the fields it writes.
# The functions are in `eep.tasks.loaders.PREPROCESSORS`, which must name exactly these steps.
PREPROCESSOR_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wsc_mark_spans": (
        ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
        ("text",),
    ),
    "record_cloze": (("passage", "query"), ("passage", "query")),
    "gsm8k_final_answer": (("answer",), ("answer", "solution")),
    "hellaswag": (("activity_label", "ctx_a", "ctx_b", "endings"), ("query", "endings")),
    "winogrande_blank": (
        ("sentence", "option1", "option2"),
        ("context", "option1_filled", "option2_filled"),
    ),
}
