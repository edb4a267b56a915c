"""Teacher-forced fitness: one forward over prompt + gold answer per example, no generation.

- `likelihood` (metric `loglik`): the mean log-probability of the gold answer's tokens given the
  prompt (generation tasks: the first accepted answer; multiple choice: the correct option),
  averaged over examples. Nats, <= 0, higher is better. The Evaluator scores it with the same
  option log-probability sums as multiple choice (`Evaluator._option_logprob_sums`), divided by
  the answer's length.
- `kl` (metric `neg_kl`): minus the mean KL(full || candidate) of the next-token distributions
  at every position of prompt + gold answer (each position that predicts a token of the row),
  averaged per example and then over examples. The labels are only used to build the rows, so
  any text works. The full model's distributions are computed once per evaluator and kept as
  their `top` largest log-probabilities plus the mass of the rest; the KL is then the exact KL
  between the two distributions coarsened to those `top` tokens and one "rest" bucket: a lower
  bound of the full KL (data processing), equal to it when `top` >= the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FITNESS_KINDS: tuple[str, ...] = ("accuracy", "likelihood", "kl")
FORCED_METRICS = {"likelihood": "loglik", "kl": "neg_kl"}
DEFAULT_KL_TOP = 64


def gold_continuation(example) -> str:
    """The text a teacher-forced row appends to the prompt: the correct option or first answer."""
    if example.options:
        return example.options[example.label]
    if not example.answers:
        raise ValueError(f"example {example.id!r} has no gold answer to teacher-force")
    return example.answers[0]


@dataclass
class Reference:
    """The full model's next-token distributions over one row, coarsened to top-k + rest.

    Position i predicts token i + 1 of the row's real tokens (padding excluded), so a row of n
    tokens has n - 1 positions, whatever batch it is scored in.
    """

    top_logprobs: torch.Tensor  # [n-1, k] float32
    top_index: torch.Tensor  # [n-1, k] int64
    rest_logprob: torch.Tensor  # [n-1] float32: log of the mass outside the top k

    @classmethod
    def of_row(cls, logits: torch.Tensor, attention_mask: torch.Tensor, top: int) -> Reference:
        """From one row's logits [T, V] and its left-padded attention mask [T]."""
        logprobs = torch.log_softmax(_predicting(logits, attention_mask).float(), dim=-1)
        k = min(top, logprobs.shape[-1])
        values, index = logprobs.topk(k, dim=-1)
        return cls(values, index, _log_rest(logprobs, index))


def kl_per_row(
    logits: torch.Tensor, attention_mask: torch.Tensor, refs: list[Reference]
) -> list[float]:
    """Mean KL(full || candidate) over each row's positions (coarsened, see the module docstring)."""
    out = []
    for row, ref in enumerate(refs):
        terms = position_kl(logits[row], attention_mask[row], ref)
        out.append(float(terms.double().mean()) if terms.numel() else 0.0)
    return out


def position_kl(logits: torch.Tensor, attention_mask: torch.Tensor, ref: Reference) -> torch.Tensor:
    """KL(full || candidate) at each predicting position [n-1] of one row; differentiable."""
    logq = torch.log_softmax(_predicting(logits, attention_mask).float(), dim=-1)
    index = ref.top_index.to(logq.device)
    p_log = ref.top_logprobs.to(logq.device)
    terms = (p_log.exp() * (p_log - logq.gather(-1, index))).sum(dim=-1)
    if index.shape[-1] < logq.shape[-1]:
        # Only with tokens outside the top: else the rest's log-mass is -inf on both sides, the
        # term 0 and its gradient NaN.
        p_rest_log = ref.rest_logprob.to(logq.device)
        p_rest = p_rest_log.exp()
        # 0 * log(0 / q) = 0: a rest bucket with no mass contributes nothing.
        rest = p_rest * (p_rest_log - _log_rest(logq, index))
        terms = terms + torch.where(p_rest > 0, rest, 0.0)
    return terms


def _log_rest(logprobs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside `index` (a logsumexp over the other tokens)."""
    return logprobs.scatter(-1, index, float("-inf")).logsumexp(dim=-1)


def _predicting(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits [n-1, V] of a row's real positions that predict a real token (left padding)."""
    n = int(attention_mask.sum())
    width = logits.shape[0]
    return logits[width - n : width - 1]
