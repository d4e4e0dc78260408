"""The statistics the evidence reports use: seed summaries, paired tests, verdicts (one claim at a
time and, with Holm's correction, over a table of claims), grid edges.

Pure functions over lists of numbers (scipy does the distributions), so the rules that turn
results into the words "holds", "does not hold" and "inconclusive" are tested on their own
(tests/test_evidence_stats.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Sequence

from scipy import stats as _scipy_stats

#: two-sided significance level of every verdict
ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Mean over seeds, its standard error and 95% t interval (``n`` values)."""

    n: int
    mean: float
    se: float
    lo: float
    hi: float

    def fmt(self, digits: int = 3) -> str:
        """``0.803 +- 0.004 [0.792, 0.814]`` (mean +- standard error [95% interval])."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} +- {self.se:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def summarize(values: Sequence[float]) -> Summary:
    """Mean, standard error (sample sd / sqrt n) and the 95% Student t interval of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize() needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    se = statistics.stdev(values) / math.sqrt(n)
    half = float(_scipy_stats.t.ppf(0.975, n - 1)) * se
    return Summary(n, mean, se, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of ``a`` against ``b`` over the same seeds."""

    n: int
    diff: float  # mean of a - b
    lo: float  # 95% interval of the mean difference
    hi: float
    p: float  # two-sided paired t test; 1.0 when every difference is zero

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (``a`` against ``b``, significant at :data:`ALPHA`) or ``inconclusive``."""
        if self.p < ALPHA:
            return "better" if self.diff > 0 else "worse"
        return "inconclusive"

    def fmt(self) -> str:
        return f"{self.diff:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}], p = {self.p:.3g}"


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t test of ``a`` against ``b`` (``a[i]`` and ``b[i]`` share seed ``i``: data order and
    initialisation), with the 95% interval of the mean difference."""
    if len(a) != len(b):
        raise ValueError(f"paired() needs the same seeds on both sides, got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise ValueError("paired() needs at least two seeds")
    d = [x - y for x, y in zip(a, b)]
    s = summarize(d)
    if statistics.pstdev(d) == 0.0:  # identical differences: no variance, the test is undefined
        p = 1.0 if s.mean == 0.0 else 0.0
        return Paired(s.n, s.mean, s.mean, s.mean, p)
    p = float(_scipy_stats.ttest_rel(a, b).pvalue)
    return Paired(s.n, s.mean, s.lo, s.hi, p)


def method_rows(
    values: dict[tuple[str, int], Sequence[float]], methods: Sequence[str], ranks: Sequence[int], bold: bool = True
) -> list[str]:
    """Markdown rows ``| method | cell per rank |`` of per-seed ``values`` by (method, rank): each
    cell the :func:`summarize` of its arm, bold (unless not ``bold``) where the arm is better than
    every other arm of that rank in :func:`paired` tests, empty where the arm is missing."""
    rows = []
    for method in methods:
        cells = []
        for r in ranks:
            arm = (method, r)
            if arm not in values:
                cells.append("")
                continue
            others = [o for o in values if o[1] == r and o != arm]
            best = bold and bool(others) and all(paired(values[arm], values[o]).verdict == "better" for o in others)
            text = summarize(values[arm]).fmt()
            cells.append(f"**{text}**" if best else text)
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def claim_verdict(test: Paired) -> str:
    """A claim "a beats b": ``holds`` when a is significantly better, ``does not hold`` when b is
    significantly better, else ``inconclusive``."""
    return {"better": "holds", "worse": "does not hold", "inconclusive": "inconclusive"}[test.verdict]


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values of a family of tests, in the order given.

    The i-th smallest p (from 0) is multiplied by ``m - i``, capped at 1 and made non-decreasing
    in that order. Calling a claim significant when its adjusted p is below :data:`ALPHA` keeps the
    chance of *any* false verdict in the family at or below :data:`ALPHA` (Holm 1979)."""
    m = len(ps)
    adjusted = [1.0] * m
    running = 0.0
    for i, j in enumerate(sorted(range(m), key=lambda j: ps[j])):
        running = max(running, min(1.0, (m - i) * ps[j]))
        adjusted[j] = running
    return adjusted


def claim_rows(tests: Sequence[tuple[str, Paired]]) -> list[str]:
    """A markdown claims table, after a paragraph saying what its verdicts mean: one row per
    ``(claim, paired test)``, its own verdict, and Holm's adjusted p and verdict over every claim of
    the table as one family (:func:`holm`)."""
    rows = [f"Verdict: the claim alone (p < {ALPHA} to hold). Verdict after Holm: every claim of the table "
            f"taken as one family (Holm's step-down correction), which keeps the chance of any false verdict "
            f"in the table at or below {ALPHA}.", "",
            f"| claim | difference [95% interval], p | verdict | Holm p ({len(tests)} claims) | verdict after Holm |",
            "|---|---|---|---|---|"]
    for (claim, t), q in zip(tests, holm([t.p for _, t in tests])):
        rows.append(f"| {claim} | {t.fmt()} | {claim_verdict(t)} | {q:.3g} | {claim_verdict(replace(t, p=q))} |")
    return rows


def edge_to_extend(grid: Sequence[float], scores: Sequence[tuple[float, float]]) -> int:
    """Where a learning-rate grid must grow for its optimum to lie inside it.

    ``grid`` ascending; ``scores[i]`` = (accuracy, -loss) of ``grid[i]``, higher is better.
    Returns -1 (add a point below), +1 (above) or 0 (the best point is inside)."""
    if len(grid) != len(scores) or len(grid) < 3:
        raise ValueError("edge_to_extend() needs one score per grid point and at least 3 points")
    if list(grid) != sorted(grid):
        raise ValueError("edge_to_extend() needs an ascending grid")
    best = max(range(len(grid)), key=lambda i: scores[i])
    return -1 if best == 0 else 1 if best == len(grid) - 1 else 0


@dataclass(frozen=True)
class Bootstrap:
    """A paired comparison of ``a`` against ``b`` by a bootstrap over seeds *and* eval examples.

    ``diff``: the observed mean accuracy difference; ``lo``/``hi``: its 95% percentile interval,
    ``lo90``/``hi90``: the 90% one (for equivalence: two one-sided tests at 5%); ``p``: two-sided,
    from the bootstrap distribution shifted to the null (at least ``1 / (n_boot + 1)``)."""

    seeds: int
    examples: int
    diff: float
    lo: float
    hi: float
    lo90: float
    hi90: float
    p: float

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (``a`` against ``b``, significant at :data:`ALPHA`) or ``inconclusive``."""
        if self.p < ALPHA:
            return "better" if self.diff > 0 else "worse"
        return "inconclusive"

    def within(self, margin: float) -> bool:
        """Equivalence within ``+-margin``: the 90% interval lies inside it (TOST at 5%)."""
        return -margin < self.lo90 and self.hi90 < margin

    def fmt(self) -> str:
        return (f"{self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] (90%: [{self.lo90:+.4f}, {self.hi90:+.4f}]), "
                f"p = {self.p:.3g}")


def _correctness(runs: Sequence[str | Sequence[int]]) -> Any:
    """``(runs, examples)`` 0/1 floats."""
    import numpy as np

    rows = [np.frombuffer(r.encode(), dtype=np.uint8) - ord("0") if isinstance(r, str) else np.asarray(r) for r in runs]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("paired_bootstrap() needs every run scored on the same eval examples")
    return np.stack(rows).astype(np.float64)


def paired_bootstrap(a: Sequence[str | Sequence[int]], b: Sequence[str | Sequence[int]], n_boot: int = 10000,
                     seed: int = 0) -> Bootstrap:
    """Paired bootstrap of the accuracy difference ``a - b``, over seeds and eval examples.

    ``a[i]``, ``b[i]``: which eval examples seed ``i``'s run of each arm got right (a string of
    ``0``/``1`` or a 0/1 sequence, every run on the same examples in the same order). Each
    replicate draws the seeds with replacement (a seed keeps its pair: same data order and
    initialisation on both sides) and, independently, the examples with replacement, the same
    draw for every seed and both arms: the eval set is itself one sample, so its sampling error
    (about 0.9 points of accuracy on 2,000 examples) is part of the interval, which a t test
    across seeds leaves out."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap() needs the same seeds on both sides, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("paired_bootstrap() needs at least two seeds")
    ca, cb = _correctness(a), _correctness(b)
    if ca.shape != cb.shape:
        raise ValueError("paired_bootstrap() needs both arms scored on the same eval examples")
    d = ca - cb  # (seeds, examples)
    s, n = d.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for start in range(0, n_boot, 1000):
        k = min(1000, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)  # (k, examples)
        per_seed = weights @ d.T / n  # (k, seeds): each seed's difference on the drawn examples
        pick = rng.integers(0, s, size=(k, s))
        reps[start:start + k] = np.take_along_axis(per_seed, pick, axis=1).mean(1)
    diff = float(d.mean())
    lo, hi, lo90, hi90 = (float(q) for q in np.quantile(reps, [0.025, 0.975, 0.05, 0.95]))
    p = (1 + int(np.sum(np.abs(reps - diff) >= abs(diff)))) / (n_boot + 1)
    return Bootstrap(s, n, diff, lo, hi, lo90, hi90, min(1.0, p))
