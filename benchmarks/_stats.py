"""The statistics the evidence reports use: seed summaries, paired tests (a t test across seeds,
or a bootstrap over seeds and eval examples), verdicts (one claim at a time and, with Holm's
correction, over a table of claims), equivalence within a margin, grid edges.

Pure functions over lists of numbers (scipy does the distributions), so the rules that turn
results into the words "holds", "does not hold", "inconclusive" and "equivalent" are tested on
their own (tests/test_evidence_stats.py).

What a failure to find a difference means: nothing, on its own. A report says "inconclusive" for
it, and calls two arms *equivalent* only when the 90% interval of their difference lies inside
``+-EQUIVALENCE_MARGIN`` (two one-sided tests at 5%).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from scipy import stats as _scipy_stats

#: two-sided significance level of every verdict
ALPHA = 0.05
#: equivalence margin of an accuracy difference: +-0.5 points (the margin the rank-1 experiment,
#: ``evidence_rank1.py``, pre-registered)
EQUIVALENCE_MARGIN = 0.005


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
    """A paired comparison of ``a`` against ``b`` over the same seeds (a t test across seeds: the
    seeds' spread only; the eval set's own sampling error is not in it)."""

    n: int
    diff: float  # mean of a - b
    lo: float  # 95% interval of the mean difference
    hi: float
    p: float  # two-sided paired t test; 1.0 when every difference is zero
    lo90: float = math.nan  # 90% interval (for equivalence: two one-sided tests at 5%)
    hi90: float = math.nan

    #: what the test is, for a report's caption
    DESCRIBES = "paired t test across seeds (the seeds' spread only: it leaves out the test set's own sampling error)"

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (``a`` against ``b``, significant at :data:`ALPHA`) or ``inconclusive``."""
        if self.p < ALPHA:
            return "better" if self.diff > 0 else "worse"
        return "inconclusive"

    def within(self, margin: float = EQUIVALENCE_MARGIN) -> bool:
        """Equivalence within ``+-margin``: the 90% interval lies inside it (TOST at 5%)."""
        return -margin < self.lo90 and self.hi90 < margin

    def fmt(self) -> str:
        return f"{self.diff:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}], p = {self.p:.3g}"

    def fmt90(self) -> str:
        return f"[{self.lo90:+.3f}, {self.hi90:+.3f}]"


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
        return Paired(s.n, s.mean, s.mean, s.mean, p, s.mean, s.mean)
    p = float(_scipy_stats.ttest_rel(a, b).pvalue)
    half90 = float(_scipy_stats.t.ppf(0.95, s.n - 1)) * s.se
    return Paired(s.n, s.mean, s.lo, s.hi, p, s.mean - half90, s.mean + half90)


def untrained(records: Sequence[dict[str, Any]]) -> list[float]:
    """The untrained model's accuracy (``eval_accuracy_before``), one value per seed.

    Every arm of a seed scores the same untrained model (the seed's fresh head; the adapters start
    as the identity), so the records of many arms repeat each seed's value: pooling them would
    count one seed as many and shrink the interval. A seed's value is the mean over its records
    (they agree), in seed order; records without the value are skipped."""
    by_seed: dict[int, list[float]] = {}
    for r in records:
        if r.get("eval_accuracy_before") is not None:
            by_seed.setdefault(r["run"]["seed"], []).append(r["eval_accuracy_before"])
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def best_cells(values: dict[tuple[str, int], Any], test: Callable[[Any, Any], Any] | None = None) -> set[tuple[str, int]]:
    """The arms (method, rank) that are better than every other arm of their rank, after Holm.

    Each arm with others at its rank is one claim, "better than each of them": its p is the
    largest p of its tests against them when it is ahead of every one, else 1 (an intersection of
    tests, each at :data:`ALPHA`). :func:`holm` runs over every such claim of the table, so that a
    bold cell is as strict as a verdict after Holm in a claims table. ``test(a, b)``: a paired test
    of two arms' values (default :func:`paired`)."""
    test = test or paired
    done: dict[tuple[Any, Any], tuple[float, float]] = {}  # (a, b) -> (diff of a - b, p); each pair tested once

    def diff_p(a: tuple[str, int], b: tuple[str, int]) -> tuple[float, float]:
        if (b, a) in done:
            diff, p = done[(b, a)]
            return -diff, p
        t = test(values[a], values[b])
        done[(a, b)] = (t.diff, t.p)
        return done[(a, b)]

    claims: dict[tuple[str, int], float] = {}
    for arm in values:
        others = [o for o in values if o[1] == arm[1] and o != arm]
        if not others:
            continue
        tests = [diff_p(arm, o) for o in others]
        claims[arm] = max(p for _, p in tests) if all(d > 0 for d, _ in tests) else 1.0
    arms = list(claims)
    return {arm for arm, q in zip(arms, holm([claims[a] for a in arms])) if q < ALPHA}


def method_rows(
    values: dict[tuple[str, int], Any], methods: Sequence[str], ranks: Sequence[int], bold: bool = True,
    test: Callable[[Any, Any], Any] | None = None, fmt: Callable[[Any], str] | None = None,
) -> list[str]:
    """Markdown rows ``| method | cell per rank |`` of per-seed ``values`` by (method, rank): each
    cell ``fmt(values[arm])`` (default: the :func:`summarize` of the accuracies), bold (unless not
    ``bold``) where :func:`best_cells` finds the arm better than every other of its rank after
    Holm's correction over the table (``test``: default :func:`paired`), empty where the arm is
    missing."""
    fmt = fmt or (lambda v: summarize(v).fmt())
    best = best_cells(values, test) if bold else set()
    rows = []
    for method in methods:
        cells = []
        for r in ranks:
            arm = (method, r)
            if arm not in values:
                cells.append("")
                continue
            text = fmt(values[arm])
            cells.append(f"**{text}**" if arm in best else text)
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def claim_verdict(test: Any) -> str:
    """A claim "a beats b": ``holds`` when a is significantly better, ``does not hold`` when b is
    significantly better, else ``inconclusive`` (no difference found, which on its own says neither
    that the claim is false nor that the two are level: see :func:`equivalence`)."""
    return {"better": "holds", "worse": "does not hold", "inconclusive": "inconclusive"}[test.verdict]


def equivalence(test: Any, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Whether a comparison shows the two arms level: ``equivalent`` when the 90% interval of the
    difference lies inside ``+-margin`` (two one-sided tests at 5%), else ``not shown``."""
    return "equivalent" if test.within(margin) else "not shown"


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


def claim_rows(tests: Sequence[tuple[str, Any]], margin: float | None = EQUIVALENCE_MARGIN) -> list[str]:
    """A markdown claims table, after a paragraph saying what its verdicts mean: one row per
    ``(claim, test)`` (a :class:`Paired` or a :class:`Bootstrap`, all of one kind), its own verdict,
    Holm's adjusted p and verdict over every claim of the table as one family (:func:`holm`), and
    the 90% interval with the :func:`equivalence` verdict at ``+-margin`` (an accuracy margin, said
    in points). ``margin=None`` leaves the equivalence columns out: for a difference that is not an
    accuracy (a loss, say), where no margin was set in advance."""
    kind = type(tests[0][1]).DESCRIBES if tests else Paired.DESCRIBES
    text = (f"Test: {kind}. Verdict: the claim alone (p < {ALPHA} to hold; 'inconclusive': no difference found, "
            f"which is not evidence that the two are level). Verdict after Holm: every claim of the table taken as "
            f"one family (Holm's step-down correction), which keeps the chance of any false verdict in the table at "
            f"or below {ALPHA}.")
    header = f"| claim | difference [95% interval], p | verdict | Holm p ({len(tests)} claims) | verdict after Holm |"
    if margin is not None:
        text += (f" Level within +-{margin * 100:g} points: 'equivalent' when the 90% interval of the "
                 f"difference lies inside +-{margin:g} (two one-sided tests at 5%, claim by claim), else 'not shown'.")
        header += f" 90% interval | level within +-{margin * 100:g} points |"
    rows = [text, "", header, "|---" * header.count("|", 1) + "|"]
    for (claim, t), q in zip(tests, holm([t.p for _, t in tests])):
        row = f"| {claim} | {t.fmt()} | {claim_verdict(t)} | {q:.3g} | {claim_verdict(replace(t, p=q))} |"
        if margin is not None:
            row += f" {t.fmt90()} | {equivalence(t, margin)} |"
        rows.append(row)
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

    #: what the test is, for a report's caption
    DESCRIBES = ("paired bootstrap over seeds and test examples (both the seeds' spread and the test set's own "
                 "sampling error)")

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (``a`` against ``b``, significant at :data:`ALPHA`) or ``inconclusive``."""
        if self.p < ALPHA:
            return "better" if self.diff > 0 else "worse"
        return "inconclusive"

    def within(self, margin: float = EQUIVALENCE_MARGIN) -> bool:
        """Equivalence within ``+-margin``: the 90% interval lies inside it (TOST at 5%)."""
        return -margin < self.lo90 and self.hi90 < margin

    def fmt(self) -> str:
        return (f"{self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] (90%: [{self.lo90:+.4f}, {self.hi90:+.4f}]), "
                f"p = {self.p:.3g}")

    def fmt90(self) -> str:
        return f"[{self.lo90:+.4f}, {self.hi90:+.4f}]"


def _correctness(runs: Sequence[str | Sequence[int]]) -> Any:
    """``(runs, examples)`` 0/1 floats."""
    import numpy as np

    rows = [np.frombuffer(r.encode(), dtype=np.uint8) - ord("0") if isinstance(r, str) else np.asarray(r) for r in runs]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("paired_bootstrap() needs every run scored on the same eval examples")
    return np.stack(rows).astype(np.float64)


#: replicates drawn at a time by :func:`_bootstrap_draws` (part of the random stream: changing it
#: changes every bootstrap's draws)
_BOOT_CHUNK = 1000


@functools.lru_cache(maxsize=4)
def _bootstrap_draws(n: int, s: int, n_boot: int, seed: int) -> tuple[Any, Any]:
    """The random draws of :func:`paired_bootstrap` for ``n`` examples, ``s`` seeds, ``n_boot``
    replicates and ``seed``: each replicate's count of every example (``(n_boot, n)``, multinomial
    draws, float32) and the seeds it picks (``(n_boot, s)``), drawn :data:`_BOOT_CHUNK` replicates
    at a time (the counts of a chunk, then its picks).

    They depend on those four numbers only, never on the runs compared, so every bootstrap of a
    report (the same examples, seeds and ``seed``) shares one set, drawn once per process: drawing
    multinomials over thousands of examples is most of a bootstrap's time. Both arrays are
    read-only; the counts are integers up to ``n``, exact in float32 for ``n < 2**24``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    counts, picks = [], []
    for start in range(0, n_boot, _BOOT_CHUNK):
        k = min(_BOOT_CHUNK, n_boot - start)
        counts.append(rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float32))
        picks.append(rng.integers(0, s, size=(k, s)))
    out = np.concatenate(counts), np.concatenate(picks)
    for array in out:
        array.setflags(write=False)
    return out


def _drawn_sums(counts: Any, d: Any) -> Any:
    """``counts @ d.T`` in float64 (``(replicates, seeds)``: each seed's summed difference on each
    replicate's examples). Where ``d`` is a difference of 0/1 correctness (every entry -1, 0 or 1)
    and ``n < 2**24``, every product and partial sum is an integer below ``2**24`` and float32
    computes it exactly, in half the memory traffic; otherwise float64."""
    import numpy as np

    if d.shape[1] < 2**24 and np.isin(d, (-1.0, 0.0, 1.0)).all():
        return (counts @ d.T.astype(np.float32)).astype(np.float64)
    return counts.astype(np.float64) @ d.T


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
    counts, pick = _bootstrap_draws(n, s, n_boot, seed)
    per_seed = _drawn_sums(counts, d) / n  # (replicates, seeds): each seed's difference on the drawn examples
    reps = np.take_along_axis(per_seed, pick, axis=1).mean(1)
    diff = float(d.mean())
    lo, hi, lo90, hi90 = (float(q) for q in np.quantile(reps, [0.025, 0.975, 0.05, 0.95]))
    p = (1 + int(np.sum(np.abs(reps - diff) >= abs(diff)))) / (n_boot + 1)
    return Bootstrap(s, n, diff, lo, hi, lo90, hi90, min(1.0, p))
