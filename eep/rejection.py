"""Early rejection: stop scoring a candidate once a confidence bound says it cannot matter.

The Evaluator scores a split in slices of a fixed random order of its examples, so the examples
scored so far are a simple random sample of the split. Slices double: the checks come after
`slice`, 2 `slice`, 4 `slice`, ... examples, because a batch never straddles two slices and many
small batches cost more per example than a few large ones (on the CPU, a 16-row batch of the deep
built-in model costs well over a quarter of a 64-row one). After each slice it bounds the score the
whole split would give, `(sum of seen hits + unseen * U) / total`, where U is a one-sided upper
confidence bound on the mean of the unseen hits at level `confidence`:

- hits in [0, 1] (accuracy, exact match, F1, similarity): the Wilson score bound. A [0, 1]
  variable of mean p has variance at most p (1 - p), so the Bernoulli bound is valid for all of
  them, and unlike mean + z * sd / sqrt(n) it does not collapse to 0 after a run of misses;
- other hits (log-likelihoods, minus KL): mean + z * sd / sqrt(n), the normal bound.

If that bound is below the strategy's threshold (the score a candidate must reach to change what
the strategy does next, or to be a finalist), the candidate is rejected. The bound is checked
after every slice, so the chance of a wrong rejection is somewhat above 1 - confidence.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RejectionRule:
    """When to check (after `slice` examples, then each time the count doubles) and how sure to be."""

    confidence: float = 0.95
    slice: int = 16

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.slice < 2:
            raise ValueError(f"slice must be >= 2 examples, got {self.slice}")

    def slice_of(self, position: int) -> int:
        """The slice of the example at `position` of the random order: sizes s, s, 2s, 4s, ..."""
        return (position // self.slice).bit_length()

    @property
    def z(self) -> float:
        """The one-sided normal quantile of `confidence`."""
        return statistics.NormalDist().inv_cdf(self.confidence)

    def upper_bound(self, hits: Sequence[float], total: int) -> float:
        """Upper confidence bound on the mean hit over `total` examples, `hits` being a random sample."""
        n = len(hits)
        if n == 0:
            return math.inf
        if n >= total:
            return statistics.fmean(hits)
        mean = statistics.fmean(hits)
        unseen = self._unseen_bound(hits, mean)
        return (mean * n + unseen * (total - n)) / total

    def _unseen_bound(self, hits: Sequence[float], mean: float) -> float:
        n, z = len(hits), self.z
        if all(0.0 <= h <= 1.0 for h in hits):
            centre = mean + z * z / (2 * n)
            spread = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
            return min(1.0, (centre + spread) / (1 + z * z / n))
        sd = statistics.stdev(hits) if n > 1 else math.inf
        return mean + z * sd / math.sqrt(n)
