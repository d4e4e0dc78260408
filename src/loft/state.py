"""The optimizer state of the LoRA pairs: one :class:`BatchState` per batch of pairs.

A batch of pairs (same shapes, dtype, device, param group, step count and scaling) is stepped
together, so its state is kept stacked: ``(b, ...)`` tensors owned by one :class:`BatchState`.
:class:`PairStates` records which batch holds each pair's state, regroups pairs when the
batches change (a pair without gradients drops out of step with its batch, say) and produces the
per-parameter view that ``state_dict()`` and ``optimizer.state[param]`` show:

==============  ====================  ====================
key             A (``r x n``)         B (``m x r``)
==============  ====================  ====================
``step``        int                   int
``exp_avg``     ``(r, n)``            ``(r, m)``
``exp_avg_sq``  ``(n, p)`` packed     ``(m, p)`` packed
``partner``     ``U = s B``: ``(m, r)``  ``A^T``: ``(n, r)``
==============  ====================  ====================

(``p = r (r + 1) / 2``, or ``r`` with ``second_moment_calibration`` off.) A batch state knows
nothing of the optimizer: it can live wherever its batch is stepped (one rank of several, say),
and its per-parameter view is made on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .linalg import PackedIndex
from .pairs import LoRAPair

__all__ = ["BatchState", "PairState", "PairStates", "ParamStateView", "STATE_KEYS", "SideState"]

#: the tensor-valued per-parameter state keys of a LoRA factor (besides the int ``step``)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "partner")


@dataclass
class SideState:
    """The stacked state of one side of a batch of pairs (mutated in place by
    :func:`loft.functional.apply_step`).

    ``exp_avg``: ``(b, r, k)``; ``exp_avg_sq``: packed grams ``(b, k, p)``; ``partner``: the
    partner the moments are expressed in, ``(b, l, r)``.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    partner: Tensor


class PairState:
    """The LoFT state of a batch of ``b`` pairs: the steps they took (all the same) and, for the
    A side and the B side, a :class:`SideState` (``sides``)."""

    def __init__(self, step: int, sides: tuple[SideState, SideState]) -> None:
        self.step = step
        self.sides = sides

    @classmethod
    def zeros(cls, b: int, m: int, n: int, r: int, packed_size: int, dtype: torch.dtype,
              device: torch.device) -> PairState:
        """A fresh state (step 0, zero moments) for ``b`` pairs ``A (r, n)``, ``B (m, r)`` with
        ``packed_size`` entries per gram (``r (r + 1) / 2``, or ``r`` without second-moment
        calibration)."""
        sides = tuple(
            SideState(torch.zeros(b, r, k, dtype=dtype, device=device),
                      torch.zeros(b, k, packed_size, dtype=dtype, device=device),
                      torch.zeros(b, l, r, dtype=dtype, device=device))
            for k, l in ((n, m), (m, n))
        )
        return cls(0, sides)  # type: ignore[arg-type]

    def match_layout(self, index: PackedIndex) -> None:
        """Convert the grams to ``index``'s layout when ``second_moment_calibration`` was switched.

        Full grams -> diagonal: their diagonals, exactly Adam's elementwise ``v`` of the same
        gradients. Diagonal -> full grams: diagonal grams (zero off the diagonal), which rebuild
        the same ``V`` the simple variant did; the off-diagonal entries then accumulate.
        """
        for st in self.sides:
            b, k, p = st.exp_avg_sq.shape
            if p == index.size:
                continue
            if index.diagonal_only:
                rows, cols = torch.triu_indices(index.r, index.r, device=st.exp_avg_sq.device)
                st.exp_avg_sq = st.exp_avg_sq[..., torch.nonzero(rows == cols).flatten()].contiguous()
            else:
                grams = st.exp_avg_sq.new_zeros(b, k, index.size)
                grams[..., index.diag] = st.exp_avg_sq
                st.exp_avg_sq = grams


class BatchState(PairState):
    """The :class:`PairState` of ``pairs`` (in batch order), stepped together:
    ``sides`` holds the A side's and the B side's :class:`SideState`
    (``exp_avg`` ``(b, r, k)``, ``exp_avg_sq`` ``(b, k, p)``, ``partner`` ``(b, l, r)``).
    """

    def __init__(self, pairs: list[LoRAPair], step: int, sides: tuple[SideState, SideState]) -> None:
        super().__init__(step, sides)
        self.pairs = pairs

    @classmethod
    def for_pairs(cls, pairs: list[LoRAPair], packed_size: int, dtype: torch.dtype, device: torch.device) -> BatchState:
        """A fresh state (step 0, zero moments) for ``pairs`` with ``packed_size`` entries per gram."""
        (m, n), r = pairs[0].shape, pairs[0].rank
        fresh = PairState.zeros(len(pairs), m, n, r, packed_size, dtype, device)
        return cls(pairs, 0, fresh.sides)

    @classmethod
    def gather(cls, rows: list[tuple[BatchState, int]]) -> BatchState:
        """A new batch made of row ``i`` of each ``(batch, i)`` (copies; the step counts must agree)."""
        steps = {batch.step for batch, _ in rows}
        if len(steps) != 1:
            raise ValueError(f"BatchState.gather: rows of batches at different steps {sorted(steps)}")
        sides = tuple(
            SideState(
                *(torch.stack([getattr(batch.sides[s], key)[i] for batch, i in rows]) for key in STATE_KEYS)
            )
            for s in (0, 1)
        )
        return cls([batch.pairs[i] for batch, i in rows], steps.pop(), sides)  # type: ignore[arg-type]

    def param_state(self, i: int, side: int) -> dict[str, Any]:
        """The per-parameter state of pair ``i``'s factor A (``side`` 0) or B (1): views of the stacks."""
        st = self.sides[side]
        return {"step": self.step, **{key: getattr(st, key)[i] for key in STATE_KEYS}}


class PairStates:
    """Which :class:`BatchState` holds each pair's state, and the regrouping of pairs into batches."""

    def __init__(self) -> None:
        self._where: dict[LoRAPair, tuple[BatchState, int]] = {}

    def __contains__(self, pair: LoRAPair) -> bool:
        return pair in self._where

    def step_of(self, pair: LoRAPair) -> int:
        """Steps taken by ``pair`` (0 before its first)."""
        held = self._where.get(pair)
        return 0 if held is None else held[0].step

    def param_state(self, pair: LoRAPair, side: int) -> dict[str, Any]:
        """The per-parameter state of ``pair``'s A (``side`` 0) or B (1); empty before its first step."""
        held = self._where.get(pair)
        return {} if held is None else held[0].param_state(held[1], side)

    def stored_partners(self, pairs: list[LoRAPair], side: int) -> Tensor:
        """The partners the moments of ``pairs`` (all with state) are expressed in, stacked
        ``(b, l, r)``: the batch's own stack when the pairs are exactly one batch, in order."""
        held = [self._where[pair] for pair in pairs]
        first = held[0][0]
        if first.pairs == pairs:
            return first.sides[side].partner
        return torch.stack([batch.sides[side].partner[i] for batch, i in held])

    def set_value(self, pair: LoRAPair, side: int, key: str, value: Any) -> None:
        """Write ``value`` into ``pair``'s ``key`` of side ``side`` (A 0, B 1), in its batch's stacks
        (copied, cast to the state's dtype and device). ``step`` and entries before the pair's first
        step are refused: see :class:`ParamStateView`."""
        held = self._where.get(pair)
        name = f"{pair.name or 'a LoRA pair'}.{'AB'[side]}"
        if key == "step":
            raise KeyError(
                f"optimizer.state[{name}]['step'] cannot be set alone: the pairs stepped together share one step count. "
                "Load a whole state with optimizer.load_state_dict() instead."
            )
        if key not in STATE_KEYS:
            raise KeyError(f"optimizer.state[{name}] has the keys step, {', '.join(STATE_KEYS)}; not {key!r}.")
        if held is None:
            raise KeyError(
                f"optimizer.state[{name}] is empty until the pair's first step, so {key!r} cannot be set yet; give it "
                "a state with optimizer.load_state_dict()."
            )
        batch, i = held
        target = getattr(batch.sides[side], key)[i]
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"optimizer.state[{name}][{key!r}] has shape {tuple(target.shape)}, got {tuple(value.shape)}.")
        target.copy_(value)

    def batches(self) -> list[BatchState]:
        """Every batch state, each once."""
        return list({id(batch): batch for batch, _ in self._where.values()}.values())

    def batch_for(self, pairs: list[LoRAPair], fresh: BatchState | None = None) -> BatchState:
        """The state of exactly these pairs as one batch, regrouping if they are held elsewhere.

        ``pairs`` must all have state (then the rows are gathered from their batches, which keep
        the rest of their pairs) or none (then ``fresh``, a zero state for them, is installed).
        """
        held = [self._where.get(pair) for pair in pairs]
        if all(h is None for h in held):
            assert fresh is not None and fresh.pairs == pairs
            self._install(fresh)
            return fresh
        assert all(h is not None for h in held), "a batch mixes pairs with and without state"
        first = held[0][0]  # type: ignore[index]
        if first.pairs == pairs:
            return first
        batch = BatchState.gather(held)  # type: ignore[arg-type]
        self._remove(pairs)
        self._install(batch)
        return batch

    def install(self, batch: BatchState) -> None:
        """Hold ``batch`` (replacing any state of its pairs): used when loading a state dict."""
        self._remove(batch.pairs)
        self._install(batch)

    def clear(self) -> None:
        self._where.clear()

    def _install(self, batch: BatchState) -> None:
        for i, pair in enumerate(batch.pairs):
            self._where[pair] = (batch, i)

    def _remove(self, pairs: list[LoRAPair]) -> None:
        """Take ``pairs`` out of their batches; a batch left with other pairs keeps only their rows."""
        leaving = set(pairs)
        for batch in {id(self._where[p][0]): self._where[p][0] for p in pairs if p in self._where}.values():
            rows = [i for i, p in enumerate(batch.pairs) if p not in leaving]
            for p in batch.pairs:
                self._where.pop(p, None)
            if rows:
                self._install(BatchState.gather([(batch, i) for i in rows]))


class ParamStateView(MutableMapping):
    """``optimizer.state[param]`` of a LoRA factor: a view of its batch's state.

    The state itself lives in a :class:`BatchState`; this mapping looks it up at each access, so
    it always shows the current values (tensors are views of the batch's stacks). As torch's
    contract says, it is writable: ``state[p]["exp_avg"] = t`` copies ``t`` into the stacks (same
    shape; cast to the state's dtype), and in-place changes of the tensors it returns change the
    state. Two writes are refused with a ``KeyError`` that says what to do instead: ``step``
    (shared by the pairs stepped together) and any key before the pair's first step (there is no
    state yet); deleting a key is refused too (a factor's state is all four keys or none).
    """

    def __init__(self, states: PairStates, pair: LoRAPair, side: int) -> None:
        self._states, self._pair, self._side = states, pair, side

    def _current(self) -> dict[str, Any]:
        return self._states.param_state(self._pair, self._side)

    def __getitem__(self, key: str) -> Any:
        return self._current()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._states.set_value(self._pair, self._side, key, value)

    def __delitem__(self, key: str) -> None:
        raise KeyError(
            f"The LoFT state of {self._pair.name or 'a LoRA pair'}.{'AB'[self._side]} is all of step, "
            f"{', '.join(STATE_KEYS)} or none: a key cannot be deleted alone. Load another state with "
            "optimizer.load_state_dict()."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __repr__(self) -> str:
        return f"ParamStateView({self._pair.name or 'pair'}.{'AB'[self._side]}: {sorted(self._current())})"
