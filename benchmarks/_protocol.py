"""What the evidence protocols (``evidence.py``, ``evidence_siqa.py``) share: the learning-rate
lattice, a runner over a results file, grid tuning that grows past an edge optimum, and the
provenance line of a report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Hashable, TypeVar

import _sweep
from _stats import edge_to_extend

from loft import lr_search as _lr_search

Arm = TypeVar("Arm", bound=Hashable)


#: the k-th learning rate of the shared lattice ``1e-4 * 2**k`` (3 significant digits, so a run's
#: JSON identity is stable): ..., 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, ... The one definition is
#: loft's own (``loft.lr_search.lattice``, which ``--lr auto`` searches over).
lattice = _lr_search.lattice


def score(rec: dict[str, Any] | list[dict[str, Any]]) -> tuple[float, float]:
    """What tuning maximises: accuracy, ties broken by lower loss (of one run, or the means over
    the runs of one grid point at several tuning seeds)."""
    recs = rec if isinstance(rec, list) else [rec]
    return (sum(r["eval_accuracy"] for r in recs) / len(recs), -sum(r["eval_loss"] for r in recs) / len(recs))


def accuracies(recs: list[dict[str, Any]]) -> list[float]:
    return [r["eval_accuracy"] for r in recs]


class Sweep:
    """Runs (or, with ``dry``, only looks up) runs in the results file ``path`` (JSONL)."""

    def __init__(self, path: Path, jobs: int, threads: int, dry: bool) -> None:
        self.path, self.jobs, self.threads, self.dry = path, jobs, threads, dry
        self.missing: list[dict[str, Any]] = []

    def results(self) -> dict[str, dict[str, Any]]:
        return _sweep.load_results(self.path)

    def get(self, runs: list[dict[str, Any]], partial: bool = False) -> dict[str, dict[str, Any]] | None:
        """Results of ``runs`` (running the missing ones unless dry). When dry and some miss: None,
        or with ``partial`` the results there are (the caller keeps what it can)."""
        have = self.results()
        missing = [r for r in runs if _sweep.key(r) not in have]
        if not missing:
            return have
        if self.dry:
            self.missing += [r for r in missing if r not in self.missing]
            return have if partial else None
        return _sweep.run_all(runs, self.path, jobs=self.jobs, threads=self.threads)


def tune_grids(
    sweep: Sweep,
    grids: dict[Arm, list[int]],
    run_of: Callable[[Arm, int], dict[str, Any] | list[dict[str, Any]]],
    max_points: int,
    order: Callable[[Arm], Any] | None = None,
    partial: bool = False,
) -> dict[Arm, dict[str, Any]]:
    """Each arm's learning-rate grid (consecutive lattice indices), grown one point past an edge
    optimum until the optimum is inside or the grid has ``max_points``. Each round runs every
    growing arm's grid in one batch (arms in ``order``), so the jobs stay busy across arms.
    ``run_of`` gives a grid point's run, or its runs at several tuning seeds (then a point's
    score is the mean, and its entry of ``records`` the list of records).
    Returns per arm ``grid``, ``records``, ``chosen`` (lattice index) and ``inside``. When
    ``sweep`` is dry and runs are missing: ``{}``, or with ``partial`` only the arms already
    settled (every run of their final grid present)."""
    grids = {arm: list(grid) for arm, grid in grids.items()}
    out: dict[Arm, dict[str, Any]] = {}
    pending = set(grids)

    def runs(arm: Arm, k: int) -> list[dict[str, Any]]:
        got = run_of(arm, k)
        return got if isinstance(got, list) else [got]

    def records(arm: Arm, k: int, res: dict[str, dict[str, Any]]) -> Any:
        got = run_of(arm, k)
        return [res[_sweep.key(r)] for r in got] if isinstance(got, list) else res[_sweep.key(got)]

    while pending:
        res = sweep.get([r for arm in sorted(pending, key=order) for k in grids[arm] for r in runs(arm, k)], partial)
        if res is None:
            return {}
        for arm in sorted(pending, key=order):
            if any(_sweep.key(r) not in res for k in grids[arm] for r in runs(arm, k)):  # not settled (``partial``)
                out.pop(arm, None)
                pending.discard(arm)
                continue
            recs = [records(arm, k, res) for k in grids[arm]]
            edge = edge_to_extend([lattice(k) for k in grids[arm]], [score(r) for r in recs])
            best = max(range(len(recs)), key=lambda i: score(recs[i]))
            out[arm] = {"grid": list(grids[arm]), "records": recs, "chosen": grids[arm][best], "inside": edge == 0}
            if edge == 0 or len(grids[arm]) >= max_points:  # inside, or out of extensions (the report says so)
                pending.discard(arm)
            else:
                grids[arm] = [grids[arm][0] - 1] + grids[arm] if edge < 0 else grids[arm] + [grids[arm][-1] + 1]
    return out


def provenance_line(recs: list[dict[str, Any]]) -> str:
    """``N runs; commits: ...; library versions: ...`` of a report, counted over ``recs``."""
    commits = Counter(r.get("provenance", {}).get("commit", "not recorded") for r in recs)
    libs = Counter(json.dumps(r.get("provenance", {}).get("versions", {}), sort_keys=True) for r in recs)
    return (f"{len(recs)} runs; commits: " + ", ".join(f"`{c}` ({n})" for c, n in commits.most_common())
            + "; library versions: " + "; ".join(f"{v} ({n})" for v, n in libs.most_common()) + ".")
