"""Where each pair's step runs, and how its factors get there and back.

The math of a step (:mod:`loft.functional`) needs a pair's *whole* factors and gradients. A
distributor gives :class:`~loft.LoFTAdamW` exactly that, for the pairs this process steps, and
sends the new factors to wherever the parameters live. It moves tensors and decides ownership;
it computes nothing of the algorithm.

Every distributor implements one interface, :class:`Distributor`, which the optimizer uses
without asking which kind it has (chosen once, by :func:`loft.distributed.make_distributor`, at
construction, and again only when a wrapper swaps the parameters for shards):

* :class:`LocalDistributor`: one process, or data parallelism where every rank holds the whole
  factors and steps every pair (DDP's default). No communication.
* :class:`OwnerDistributor` (the owners' common part): every pair has one owner rank (balanced by
  the cost of its step); only the owner keeps the pair's LoFT state and computes its step. Two
  kinds:

  - :class:`FSDP2Owners` (``fully_shard``: DTensor parameters, ``Shard(0)`` on a 1-D mesh):
    each rank holds rows of ``A`` (``r x n``) and ``B`` (``m x r``) and the reduce-scattered
    gradient of its rows. Per step, for each owner, one ``gather`` of every rank's rows of the
    owner's pairs (``A``, ``dL/dA``, ``B``, ``dL/dB``: ``2 (r n + m r)`` numbers a pair, never the
    ``m x n`` base weight), and after the step one ``scatter`` of each rank's rows of the new
    ``A`` and ``B``.
  - :class:`DDPOwners` (DDP with ``split_step=True``): every rank holds the whole factors and the
    all-reduced gradients, so nothing is gathered; each owner ``broadcast``\\ s its pairs' new
    factors (``r n + m r`` a pair).

  Decisions that depend on floating-point results (Cholesky fallbacks, rebalancing, which factor
  moved) are the owner's alone: the other ranks receive the factors, they never recompute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedDistributedSetup
from .pairs import LoRAPair

__all__ = ["DDPOwners", "Distributor", "FSDP2Owners", "LocalDistributor", "OwnerDistributor", "Whole", "all_finite", "assign_owners", "is_dtensor", "local_part", "shard_like", "step_cost"]


def is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_part(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class Whole:
    """A pair's whole factors and gradients as 2-D matrices in the parameters' dtype:
    ``a`` ``(r, n)``, ``b`` ``(m, r)``, ``grad_a`` ``(r, n)``, ``grad_b`` ``(m, r)`` (zeros for a
    factor without gradient)."""

    a: Tensor
    b: Tensor
    grad_a: Tensor
    grad_b: Tensor


def step_cost(pair: LoRAPair) -> int:
    """A pair's step cost, for balancing owners: the full-direction rebuild (``m n r``) plus
    both sides' packed grams (``(m + n) r (r + 1) / 2``) and the ``r x r`` work."""
    (m, n), r = pair.shape, pair.rank
    return m * n * r + (m + n) * r * (r + 1) // 2 + r**3


def assign_owners(pairs: list[LoRAPair], world: int, loads: list[int] | None = None) -> list[int]:
    """The owner rank of each pair: greedy by decreasing step cost onto the least-loaded rank
    (ties: the lower rank, then the earlier pair). Same-shape pairs have equal costs, so they are
    dealt round-robin and each rank gets about ``1/world`` of every shape (which it still steps as
    one batch). Depends only on the pairs' global shapes, so every rank computes the same map.
    ``loads``: the ranks' loads so far (updated in place), for pairs added later."""
    loads = [0] * world if loads is None else loads
    owners = [0] * len(pairs)
    costs = [step_cost(p) for p in pairs]
    for i in sorted(range(len(pairs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world), key=lambda k: (loads[k], k))
        owners[i] = owner
        loads[owner] += costs[i]
    return owners


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """The DTensor laid out as ``like`` (an FSDP2 parameter, ``Shard(0)``) whose whole value is
    ``whole`` (same shape): this rank's rows of it, no communication."""
    from torch.distributed.tensor import DTensor

    mesh = like.device_mesh  # type: ignore[attr-defined]
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = whole.shape[0]
    size = math.ceil(rows / world) if rows else 0
    start = min(rows, rank * size)
    local = whole[start : min(rows, start + size)].to(device=local_part(like).device, dtype=like.dtype, copy=True)
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())  # type: ignore[attr-defined]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor holds only finite numbers (one host sync)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors]).all())


def _matrix(t: Tensor) -> Tensor:
    """A 2-D view ``(rows, prod(other dims))`` (conv kernels flattened; an empty shard too)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _grad_matrix(param: Tensor) -> Tensor:
    g = param.grad
    return _matrix(param).new_zeros(_matrix(param).shape) if g is None else _matrix(g)


class Distributor(ABC):
    """Where each pair's step runs: the interface :class:`~loft.LoFTAdamW` steps through.

    A step asks :meth:`gather` for the whole factors and gradients of the pairs stepped here,
    hands each new factor to :meth:`write`, and calls :meth:`finish` (which sends them where the
    parameters live). Decisions every rank must share go through :meth:`sum` and
    :meth:`all_agree`; ``state_dict()`` goes through :meth:`all_states`. With owners, every method
    that communicates is a collective: every rank calls it, in the same order.
    """

    #: ranks the pairs are spread over, and this process's rank among them
    world: int = 1
    rank: int = 0
    #: bytes this rank sent in the distributor's collectives since construction
    sent_bytes: int = 0
    #: the factors are FSDP2 shards (DTensors)
    sharded: bool = False

    @abstractmethod
    def add_pairs(self, pairs: list[LoRAPair]) -> None:
        """Take on pairs added after construction (``add_param_group``)."""

    @abstractmethod
    def owns(self, pair: LoRAPair) -> bool:
        """Whether this rank steps ``pair`` and keeps its LoFT state."""

    @abstractmethod
    def gather(self, pairs: list[LoRAPair]) -> dict[LoRAPair, Whole]:
        """The whole factors and gradients of the pairs stepped here that have a gradient (on
        some rank). ``pairs``: every pair, in the same order on every rank."""

    @abstractmethod
    def write(self, pair: LoRAPair, side: int, value: Tensor) -> None:
        """A new factor of a pair stepped here (``side`` 0: ``A`` ``(r, n)``; 1: ``B`` ``(m, r)``)."""

    @abstractmethod
    def finish(self) -> None:
        """After the step: the new factors reach every rank's parameters."""

    @abstractmethod
    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a new tensor; ``t`` itself on one rank)."""

    def all_agree(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce of a scalar with owners)."""
        return not bool(self.sum(torch.tensor(float(not flag), device=device)))

    @abstractmethod
    def all_states(self, mine: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``mine`` (pair number -> its per-parameter states), for
        ``state_dict()``: CPU copies with owners, ``mine`` itself (views) on one rank."""

    @abstractmethod
    def counts_plain(self, p: Tensor) -> bool:
        """Whether this rank adds ``p``'s local gradient to the clipping norm."""

    @abstractmethod
    def known_writes(self, flags: tuple[int, int]) -> tuple[int, int]:
        """What this rank knows of a pair's factors since its last step, from what the owner
        wrote (``flags``: per factor 0 unchanged, 1 written, 2 maybe): a factor this rank did not
        write may have been changed by another (owners: 0 becomes 2, "compare")."""

    @property
    def template_device(self) -> torch.device | None:
        """Where ``state_dict()``'s step-0 templates live (``None``: each pair's own device)."""
        return None


class LocalDistributor(Distributor):
    """Every pair is stepped here, on the parameters themselves (one process, or replicated DDP)."""

    def add_pairs(self, pairs: list[LoRAPair]) -> None:
        pass

    def owns(self, pair: LoRAPair) -> bool:
        return True

    def gather(self, pairs: list[LoRAPair]) -> dict[LoRAPair, Whole]:
        """The pairs with a gradient, as views of the parameters and their gradients."""
        return {
            p: Whole(_matrix(p.A), _matrix(p.B), _grad_matrix(p.A), _grad_matrix(p.B))
            for p in pairs
            if p.A.grad is not None or p.B.grad is not None
        }

    def write(self, pair: LoRAPair, side: int, value: Tensor) -> None:
        param = pair.A if side == 0 else pair.B
        param.copy_(value.reshape(param.shape))

    def finish(self) -> None:
        pass

    def sum(self, t: Tensor) -> Tensor:
        return t

    def all_agree(self, flag: bool, device: torch.device) -> bool:
        return flag

    def all_states(self, mine: dict[int, Any]) -> dict[int, Any]:
        return mine

    def counts_plain(self, p: Tensor) -> bool:
        return True

    def known_writes(self, flags: tuple[int, int]) -> tuple[int, int]:
        return flags


class OwnerDistributor(Distributor):
    """One owner rank per pair (see the module docstring): ownership, reductions and the state's
    gathering, shared by :class:`DDPOwners` and :class:`FSDP2Owners`, which move the factors.

    ``group``: the process group (for FSDP2, the mesh's).
    """

    def __init__(self, pairs: list[LoRAPair], group: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, k) for k in range(self.world)]
        self._pairs: list[LoRAPair] = []
        self._owner: dict[LoRAPair, int] = {}
        self._loads = [0] * self.world
        self._current: dict[LoRAPair, Whole] = {}
        self._pending: dict[tuple[LoRAPair, int], Tensor] = {}
        self.sent_bytes = 0
        self.add_pairs(pairs)

    # ------------------------------------------------------------------ ownership
    def add_pairs(self, pairs: list[LoRAPair]) -> None:
        new = [p for p in pairs if p not in self._owner]
        dtypes = {p.A.dtype for p in self._pairs + new}
        if len(dtypes) > 1:
            raise UnsupportedDistributedSetup(
                f"LoRA factors of several dtypes ({sorted(map(str, dtypes))}) with a step split across ranks; "
                "keep the adapter in one dtype."
            )
        for p, owner in zip(new, assign_owners(new, self.world, self._loads)):
            self._owner[p] = owner
        self._pairs += new

    def owner(self, pair: LoRAPair) -> int:
        """The rank that steps ``pair``."""
        return self._owner[pair]

    def owns(self, pair: LoRAPair) -> bool:
        return self._owner[pair] == self.rank

    def owned(self) -> list[LoRAPair]:
        return [p for p in self._pairs if self.owns(p)]

    def write(self, pair: LoRAPair, side: int, value: Tensor) -> None:
        """Record a new factor of a pair this rank owns; :meth:`finish` sends it."""
        self._pending[(pair, side)] = value

    def finish(self) -> None:
        """Collective: every owner sends its pairs' new factors to every rank, which writes them
        into its parameters (or local shards)."""
        for owner in range(self.world):
            mine = [p for p in self._pairs if self._owner[p] == owner]
            if mine:
                self._send(owner, mine)
        self._current, self._pending = {}, {}

    @abstractmethod
    def _send(self, owner: int, mine: list[LoRAPair]) -> None:
        """Collective: ``owner``'s pairs ``mine`` reach every rank."""

    def _new_factor(self, pair: LoRAPair, side: int) -> Tensor:
        """The owner's factor after the step: the written one, or the one it gathered (a pair that
        did not move, or took no step, is sent unchanged)."""
        value = self._pending.get((pair, side))
        if value is not None:
            return value
        whole = self._current.get(pair)
        if whole is not None:
            return whole.a if side == 0 else whole.b
        return _matrix(pair.A if side == 0 else pair.B)

    # ------------------------------------------------------------------ reductions
    def sum(self, t: Tensor) -> Tensor:
        out = t.clone()
        self._dist.all_reduce(out, group=self.group)
        return out

    def all_states(self, mine: dict[int, Any]) -> dict[int, Any]:
        """Collective: each rank's owned pairs' states, copied to the CPU, gathered on every rank."""
        mine = {k: tuple({key: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for key, v in st.items()}
                         for st in sides) for k, sides in mine.items()}
        gathered: list[Any] = [None] * self.world
        self._dist.all_gather_object(gathered, mine, group=self.group)
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        return merged

    def counts_plain(self, p: Tensor) -> bool:
        """A sharded parameter's gradient is counted shard by shard on every rank; a replicated
        one only on rank 0 (it is the same everywhere)."""
        return is_dtensor(p) or self.rank == 0

    def known_writes(self, flags: tuple[int, int]) -> tuple[int, int]:
        return (2 if flags[0] == 0 else flags[0], 2 if flags[1] == 0 else flags[1])

    @property
    def template_device(self) -> torch.device | None:
        return torch.device("cpu")


class DDPOwners(OwnerDistributor):
    """Owners over whole factors (DDP with ``split_step=True``): nothing is gathered, each owner
    broadcasts its pairs' new factors."""

    def gather(self, pairs: list[LoRAPair]) -> dict[LoRAPair, Whole]:
        self._current, self._pending = {}, {}
        for p in pairs:
            if self.owns(p) and (p.A.grad is not None or p.B.grad is not None):
                self._current[p] = Whole(_matrix(p.A), _matrix(p.B), _grad_matrix(p.A), _grad_matrix(p.B))
        return dict(self._current)

    def _send(self, owner: int, mine: list[LoRAPair]) -> None:
        dtype = mine[0].A.dtype
        if owner == self.rank:
            buf = torch.cat([self._new_factor(p, s).to(dtype).reshape(-1) for p in mine for s in (0, 1)])
            self.sent_bytes += buf.numel() * buf.element_size() * (self.world - 1)
        else:
            buf = torch.empty(sum(p.A.numel() + p.B.numel() for p in mine), dtype=dtype, device=mine[0].A.device)
        self._dist.broadcast(buf, src=self._global[owner], group=self.group)
        if owner != self.rank:
            at = 0
            for p in mine:
                for t in (p.A, p.B):
                    t.copy_(buf[at : at + t.numel()].reshape(t.shape))
                    at += t.numel()
        else:
            for p in mine:  # the owner writes its own parameters
                for s, t in enumerate((p.A, p.B)):
                    if (p, s) in self._pending:
                        t.copy_(self._pending[(p, s)].reshape(t.shape))


class FSDP2Owners(OwnerDistributor):
    """Owners over FSDP2 shards (``Shard(0)`` DTensors over ``group``): each owner gathers its
    pairs' rows from every rank and scatters the new rows back."""

    sharded = True

    def _rows(self, total: int) -> list[int]:
        """Rows of a ``total``-row tensor held by each rank under ``Shard(0)`` (torch.chunk's split)."""
        size = math.ceil(total / self.world) if total else 0
        return [max(0, min(size, total - k * size)) for k in range(self.world)]

    def _offsets(self, total: int) -> list[int]:
        rows = self._rows(total)
        return [sum(rows[:k]) for k in range(self.world)]

    def _pair_numel(self, pair: LoRAPair, k: int) -> int:
        """Numbers rank ``k`` sends its owner for ``pair``: rows of A, dA, B, dB, and a flag."""
        (m, n), r = pair.shape, pair.rank
        return 2 * (self._rows(r)[k] * n + self._rows(m)[k] * r) + 1

    def gather(self, pairs: list[LoRAPair]) -> dict[LoRAPair, Whole]:
        self._current, self._pending = {}, {}
        stepped: dict[LoRAPair, Whole] = {}
        for owner in range(self.world):
            mine = [p for p in pairs if self._owner[p] == owner]
            if mine:
                stepped.update(self._gather_to(owner, mine))
        return stepped

    def _gather_to(self, owner: int, mine: list[LoRAPair]) -> dict[LoRAPair, Whole]:
        """Collective: every rank's rows of ``owner``'s pairs ``mine``, on the owner (whole
        factors and gradients of those with a gradient somewhere; nothing elsewhere)."""
        dtype, device = mine[0].A.dtype, local_part(mine[0].A).device
        sizes = [sum(self._pair_numel(p, k) for p in mine) for k in range(self.world)]
        parts: list[Tensor] = []
        for p in mine:
            flag = float(p.A.grad is not None or p.B.grad is not None)
            for t in (p.A, p.B):
                parts += [_matrix(local_part(t)).reshape(-1), _grad_matrix_local(t).reshape(-1)]
            parts.append(torch.tensor([flag], dtype=dtype, device=device))
        pad = torch.zeros(max(sizes) - sizes[self.rank], dtype=dtype, device=device)
        buf = torch.cat([x.to(dtype) for x in parts] + [pad])
        received = [torch.empty_like(buf) for _ in range(self.world)] if owner == self.rank else None
        self._dist.gather(buf, received, dst=self._global[owner], group=self.group)
        if owner != self.rank:
            self.sent_bytes += buf.numel() * buf.element_size()
            return {}
        assert received is not None
        stepped, offsets = {}, [0] * self.world
        for p in mine:
            (m, n), r = p.shape, p.rank
            pieces: list[list[Tensor]] = [[], [], [], []]  # A, dA, B, dB rows per rank
            flag = 0.0
            for k in range(self.world):
                at = offsets[k]
                for j, (rows, cols) in enumerate(((self._rows(r)[k], n), (self._rows(m)[k], r))):
                    for g in (0, 1):
                        count = rows * cols
                        pieces[2 * j + g].append(received[k][at : at + count].reshape(rows, cols))
                        at += count
                flag = max(flag, float(received[k][at]))
                offsets[k] = at + 1
            a, ga, b, gb = (torch.cat(x) for x in pieces)
            self._current[p] = Whole(a, b, ga, gb)
            if flag:
                stepped[p] = self._current[p]
        return stepped

    def _send(self, owner: int, mine: list[LoRAPair]) -> None:
        dtype = mine[0].A.dtype
        device = local_part(mine[0].A).device
        sizes = [sum(self._rows(p.rank)[k] * p.shape[1] + self._rows(p.shape[0])[k] * p.rank for p in mine)
                 for k in range(self.world)]
        size = max(sizes)
        outgoing = None
        if owner == self.rank:
            outgoing = []
            for k in range(self.world):
                parts = []
                for p in mine:
                    for s, total in ((0, p.rank), (1, p.shape[0])):
                        start, rows = self._offsets(total)[k], self._rows(total)[k]
                        parts.append(self._new_factor(p, s)[start : start + rows].reshape(-1).to(dtype))
                parts.append(torch.zeros(size - sizes[k], dtype=dtype, device=device))
                outgoing.append(torch.cat(parts))
            self.sent_bytes += sum(x.numel() for i, x in enumerate(outgoing) if i != self.rank) * outgoing[0].element_size()
        buf = torch.empty(size, dtype=dtype, device=device)
        self._dist.scatter(buf, outgoing, src=self._global[owner], group=self.group)
        at = 0
        for p in mine:
            for t in (p.A, p.B):
                local = local_part(t)
                local.copy_(buf[at : at + local.numel()].reshape(local.shape))
                at += local.numel()


def _grad_matrix_local(param: Tensor) -> Tensor:
    """This rank's rows of ``param``'s gradient as a matrix (zeros when there is none)."""
    local = _matrix(local_part(param))
    g = param.grad
    return local.new_zeros(local.shape) if g is None else _matrix(local_part(g))
