"""The exceptions of the optimizer core (no imports: every core module may raise them)."""

from __future__ import annotations

__all__ = ["RanksNotResponding", "UnsupportedDistributedSetup"]


class UnsupportedDistributedSetup(RuntimeError):
    """A parallel set-up that shards LoRA factors or optimizer state in a way LoFT cannot follow exactly."""


class RanksNotResponding(RuntimeError):
    """Another rank did not reach the optimizer's construction-time check in time."""
