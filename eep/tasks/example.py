"""One task example, the unit every loader produces and every scorer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """A prompt with its gold answer(s) and, for multiple choice, the options.

    Generation tasks: `answers` holds every accepted gold string (the first is the canonical one
    the model is trained/expected to produce). Multiple-choice tasks: `options` are the
    continuations scored after the prompt and `label` is the index of the correct one; `answers`
    then holds the correct option text.
    """

    id: str
    prompt: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    label: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_multiple_choice(self) -> bool:
        """True when the example is scored by choosing among `options`."""
        return bool(self.options)
