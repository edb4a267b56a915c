"""The built-in synthetic task suite: small generated tasks that need different skills.

Every prompt starts with its task name as a tag (`add 47+5=`) and ends with `=`; answers are
short strings the model ends with its EOS token. The tasks are sized so the built-in ~3M-parameter
MoE (`eep/builtin/tiny-moe`) learns each to >= 95% exact match, while each needs a different
skill, so experts can specialise and pruning has something to lose.

| task      | kind            | prompt                | answer  |
|-----------|-----------------|-----------------------|---------|
| add       | generate        | `add 47+85=`          | `132`   |
| reverse   | generate        | `reverse kqzd=`       | `dzqk`  |
| sort      | generate        | `sort 52813=`         | `12358` |
| caesar    | generate        | `caesar xyzab=`       | `abcde` |
| count     | generate        | `count a in bacdab=`  | `2`     |
| lookup    | generate        | `lookup c a1 c7=`     | `7`     |
| compare   | multiple_choice | `compare 47 82=`      | options `47` / `82`, the larger |

Sizes were chosen from measured training runs: at 6 letters reversal was still at 16% exact match
when 3-5 letters were at 99%; counting in strings of varying length and lookup among 3 pairs
stayed near chance/62% within the training budget, so count strings have a fixed length (every
position sits at a fixed offset) and lookup has 2 pairs.

Splits never share a prompt: each generated example belongs to the split given by a stable hash
of its prompt, so a prompt is in the same split whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable

from eep.tasks.example import Example

SPLITS: tuple[str, ...] = ("train", "search", "dev", "test")

_LETTERS = string.ascii_lowercase
_DIGITS = string.digits
_CAESAR_SHIFT = 3
_WORD_LENGTHS = (3, 5)  # reverse and caesar
_COUNT_ALPHABET = "abcd"  # few letters, so counts spread over 0..6 instead of mostly 0 or 1
_COUNT_LENGTH = 6
_LOOKUP_KEYS = "abcdefgh"
_LOOKUP_PAIRS = 2
# Give up on a split after this many draws in a row that bring no new prompt: the split's share
# of the task's prompt space is then (almost surely) exhausted.
_MAX_FRUITLESS_DRAWS = 20_000


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a}+{b}=", str(a + b)


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(_LETTERS, k=rng.randint(*_WORD_LENGTHS)))
    return f"reverse {word}=", word[::-1]


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices(_DIGITS, k=rng.randint(3, 6)))
    return f"sort {digits}=", "".join(sorted(digits))


def _gen_caesar(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(_LETTERS, k=rng.randint(*_WORD_LENGTHS)))
    shifted = "".join(_LETTERS[(_LETTERS.index(c) + _CAESAR_SHIFT) % 26] for c in word)
    return f"caesar {word}=", shifted


def _gen_count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(_COUNT_ALPHABET)
    text = "".join(rng.choices(_COUNT_ALPHABET, k=_COUNT_LENGTH))
    return f"count {letter} in {text}=", str(text.count(letter))


def _gen_lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(_LOOKUP_KEYS, _LOOKUP_PAIRS)
    values = rng.choices(_DIGITS, k=_LOOKUP_PAIRS)
    query = rng.randrange(_LOOKUP_PAIRS)
    pairs = " ".join(k + v for k, v in zip(keys, values, strict=True))
    return f"lookup {keys[query]} {pairs}=", values[query]


def _gen_compare(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    a, b = rng.sample(range(10, 100), 2)  # 2 digits each: options of equal length
    options = (str(a), str(b))
    return f"compare {a} {b}=", options, 0 if a > b else 1


_GENERATE: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _gen_add,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "caesar": _gen_caesar,
    "count": _gen_count,
    "lookup": _gen_lookup,
}
_MULTIPLE_CHOICE: dict[str, Callable[[random.Random], tuple[str, tuple[str, ...], int]]] = {
    "compare": _gen_compare,
}
# Longest answer (or option) in characters; the tokenizer is character-level.
_MAX_ANSWER_CHARS: dict[str, int] = {
    "add": 3,
    "reverse": 5,
    "sort": 6,
    "caesar": 5,
    "count": 1,
    "lookup": 1,
    "compare": 2,
}

SYNTHETIC_TASKS: tuple[str, ...] = (*_GENERATE, *_MULTIPLE_CHOICE)


def _check_name(name: str) -> None:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(
            f"unknown synthetic task {name!r}; the tasks are: {', '.join(SYNTHETIC_TASKS)}"
        )


def split_of(prompt: str) -> str:
    """The split a prompt belongs to (stable: a hash of the prompt alone)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 20
    if bucket < 2:
        return "test"
    if bucket == 2:
        return "dev"
    if bucket == 3:
        return "search"
    return "train"


def task_kind(name: str) -> str:
    """The kind of a synthetic task: "generate" or "multiple_choice"."""
    _check_name(name)
    return "multiple_choice" if name in _MULTIPLE_CHOICE else "generate"


def max_new_tokens(name: str) -> int:
    """Tokens a generation needs for the task's longest answer plus EOS."""
    _check_name(name)
    return _MAX_ANSWER_CHARS[name] + 1


def make_examples(name: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of task `name` in `split`, deterministic for (name, split, n, seed)."""
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # String seeds hash stably (sha512) in `random`, unlike hash() of a tuple across processes.
    rng = random.Random(f"eep-synthetic/{name}/{split}/{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    fruitless = 0
    while len(examples) < n:
        if name in _MULTIPLE_CHOICE:
            prompt, options, label = _MULTIPLE_CHOICE[name](rng)
            answers = (options[label],)
        else:
            prompt, answer = _GENERATE[name](rng)
            options, label, answers = (), None, (answer,)
        if prompt in seen or split_of(prompt) != split:
            fruitless += 1
            if fruitless >= _MAX_FRUITLESS_DRAWS:
                raise ValueError(
                    f"task {name!r} split {split!r} cannot yield {n} distinct examples "
                    f"(found {len(examples)})"
                )
            continue
        fruitless = 0
        seen.add(prompt)
        examples.append(
            Example(
                id=f"{name}-{split}-{len(examples)}",
                prompt=prompt,
                answers=answers,
                options=options,
                label=label,
                meta={"task": name},
            )
        )
    return examples
