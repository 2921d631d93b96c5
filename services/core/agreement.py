"""Agreement between labelers who ranked the same task: pairwise agreement and Kendall's tau-b.

A ranking with ties is a best-first permutation plus ``tied_with_next`` (K-1 booleans): it gives every
response a *tier* (0 = best; tied responses share a tier). Two labelers' rankings of one task compare
response pair by response pair (i < j): each labeler says i is better, j is better, or they are tied.

- **pairwise agreement**: the fraction of the C(K,2) response pairs on which both say the same (a tie
  agrees only with a tie) — the figure InstructGPT reports (≈ 73% between its labelers);
- **Kendall's tau-b**: (concordant − discordant) / sqrt((n0 − t1)(n0 − t2)), with n0 = C(K,2) and t1, t2
  the pairs each labeler tied; undefined (None) when either labeler tied every pair.

Aggregates are means over comparisons (one per task and pair of its labelers), overall and per labeler.
No database here: the store feeds it rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations


def tiers(ranking: Sequence[int], tied_with_next: Sequence[bool] | None = None) -> list[int]:
    """Tier of each response index (0 = best): ranking [2, 0, 1] with ties [True, False] → [0, 1, 0]."""
    ties = list(tied_with_next or [False] * (len(ranking) - 1))
    out = [0] * len(ranking)
    tier = 0
    for pos, idx in enumerate(ranking):
        if pos and not ties[pos - 1]:
            tier += 1
        out[idx] = tier
    return out


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def compare(a: Sequence[int], b: Sequence[int]) -> tuple[float, float | None]:
    """(pairwise agreement, Kendall's tau-b or None) of two labelers' tiers of the same K responses."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"tiers must have the same length >= 2, got {len(a)} and {len(b)}")
    n0 = same = concordant = discordant = tied_a = tied_b = 0
    for i, j in combinations(range(len(a)), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        n0 += 1
        same += sa == sb
        tied_a += sa == 0
        tied_b += sb == 0
        if sa and sb:
            concordant += sa == sb
            discordant += sa != sb
    denom = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return same / n0, ((concordant - discordant) / denom if denom else None)


@dataclass
class Summary:
    compared: int = 0  # comparisons (task, pair of labelers)
    pairwise: float = 0.0  # mean pairwise agreement
    kendall_tau: float = 0.0  # mean tau-b over the comparisons where it is defined
    _agree_sum: float = 0.0
    _tau_sum: float = 0.0
    _tau_n: int = 0

    def add(self, agree: float, tau: float | None) -> None:
        self.compared += 1
        self._agree_sum += agree
        self.pairwise = self._agree_sum / self.compared
        if tau is not None:
            self._tau_sum += tau
            self._tau_n += 1
            self.kendall_tau = self._tau_sum / self._tau_n

    def as_dict(self) -> dict:
        return {"compared": self.compared, "pairwise": self.pairwise, "kendall_tau": self.kendall_tau}


def summarize(rankings: Iterable[tuple[str, str, list[int]]]) -> tuple[Summary, dict[str, Summary]]:
    """``rankings``: (task id, labeler id, tiers) rows. Returns (overall, per labeler) over every pair of
    labelers that ranked the same task (a labeler's summary counts the comparisons they are part of)."""
    by_task: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)
    for task_id, labeler, t in rankings:
        by_task[task_id].append((labeler, t))
    overall, per = Summary(), defaultdict(Summary)
    for rows in by_task.values():
        for (la, ta), (lb, tb) in combinations(rows, 2):
            agree, tau = compare(ta, tb)
            overall.add(agree, tau)
            per[la].add(agree, tau)
            per[lb].add(agree, tau)
    return overall, dict(sorted(per.items()))
