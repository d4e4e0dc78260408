"""Counting host synchronisations: the points where Python waits for the device.

On a GPU every read of a tensor's value by the host (``bool(t)``, ``t.item()``, ``float(t)``,
``t.tolist()``, ``torch.equal``), every copy of a device tensor to the CPU and every linear
algebra call that checks its result on the host (``eigh``, ``svd``, ``cholesky``, ``inv``:
their error check reads an ``info`` tensor) stalls the stream until the queued kernels have
run. :class:`HostSyncCounter` counts them while it is active, on any device, so a CPU test can
bound what a GPU step will pay::

    with HostSyncCounter() as syncs:
        optimizer.step()
    syncs.count, syncs.events   # how many, and which (op names)

It sees Python-level reads through a :class:`~torch.overrides.TorchFunctionMode` and aten ops
through a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (a read seen at both levels is
counted once). ``ignore``: a predicate on the tensor being read that exempts it, e.g. torch
AdamW's step counters, which live on the CPU whatever the parameters' device and never
synchronise a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "host_values", "on_host", "to_host"]

_ACTIVE: list[HostSyncCounter] = []


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU: the one way the optimizer copies device values to the host (a sync on a
    GPU; counted by an active :class:`HostSyncCounter` on any device, also where it is free)."""
    for counter in _ACTIVE:
        counter.record("copy to host")
        counter.depth += 1
    try:
        return t.to("cpu")
    finally:
        for counter in _ACTIVE:
            counter.depth -= 1

def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (from :func:`to_host`) back on ``device`` without making the host wait for
    the stream: pinned and non-blocking on CUDA (the caching host allocator keeps the buffer
    alive until the copy is done); unchanged on the CPU."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


#: Python-level reads of a tensor's values by the host
_READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__"}
_aten = torch.ops.aten
#: aten ops that read device values on the host (or check a result there, on CUDA)
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "_local_scalar_dense",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten._linalg_eigh.default: "linalg.eigh (error check)",
    _aten._linalg_svd.default: "linalg.svd (error check)",
    _aten.linalg_cholesky_ex.default: None,  # the _ex variant does not check: no sync
    _aten.linalg_inv_ex.default: None,
    _aten.nonzero.default: "nonzero (data-dependent shape)",
    _aten.masked_select.default: "masked_select (data-dependent shape)",
}


def host_values(t: torch.Tensor) -> list:
    """``t``'s values as (nested) Python lists: one copy to the host (see :func:`to_host`)."""
    host = to_host(t)
    for counter in _ACTIVE:
        counter.depth += 1
    try:
        return host.tolist()
    finally:
        for counter in _ACTIVE:
            counter.depth -= 1


@contextmanager
def on_host() -> Iterator[None]:
    """Computation on host copies (after :func:`to_host`): nothing in it waits for a device, so
    an active :class:`HostSyncCounter` counts nothing in it."""
    for counter in _ACTIVE:
        counter.depth += 1
    try:
        yield
    finally:
        for counter in _ACTIVE:
            counter.depth -= 1


class _Functions(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        owner = self.owner
        counted = name in _READS and not owner.depth and args and isinstance(args[0], torch.Tensor) and not owner.ignored(args[0])
        if counted:
            owner.record(name)
        owner.depth += 1 if name in _READS else 0
        try:
            return func(*args, **(kwargs or {}))
        finally:
            owner.depth -= 1 if name in _READS else 0


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        owner = self.owner
        if not owner.depth:  # not already counted as a Python-level read
            name = _SYNC_OPS.get(func)
            if func is _aten._to_copy.default and kwargs.get("device") is not None:
                source = args[0].device if isinstance(args[0], torch.Tensor) else None
                if torch.device(kwargs["device"]).type == "cpu" and source is not None and source.type != "cpu":
                    name = "copy to host"
            if name and not (args and isinstance(args[0], torch.Tensor) and owner.ignored(args[0])):
                owner.record(name)
        return func(*args, **kwargs)


class HostSyncCounter:
    """Count host synchronisations inside a ``with`` block (see the module docstring)."""

    def __init__(self, ignore: Callable[[torch.Tensor], bool] | None = None) -> None:
        self._ignore = ignore
        self.events: Counter[str] = Counter()
        self.depth = 0
        self._modes: list[Any] = []

    @property
    def count(self) -> int:
        return sum(self.events.values())

    def ignored(self, t: torch.Tensor) -> bool:
        return self._ignore is not None and self._ignore(t)

    def record(self, name: str) -> None:
        self.events[name] += 1

    def __enter__(self) -> HostSyncCounter:
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
