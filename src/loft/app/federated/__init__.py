"""``loft federate``: federated fine-tuning on Flower (docs/federated.md).

* :mod:`.config`: :class:`FederateConfig`, the run's settings and their checks (nothing heavy);
* :mod:`.bench`: the model, data, optimizer, local steps and evaluation that the server and every
  client build from the same settings, with ``loft finetune``'s own loading code;
* :mod:`.records`: tensors, factors and optimizer state as Flower records;
* :mod:`.client`: the ``ClientApp`` (local steps; the optimizer state kept in ``context.state``);
* :mod:`.server`: the ``ServerApp`` (rounds, aggregation with :mod:`loft.federated`, evaluation);
* :mod:`.run`: :func:`federate`, one run in Flower's simulation engine, and its output folder.

Importing this package imports neither Flower nor torch; the modules above do.
"""

from __future__ import annotations

from .config import AGGREGATORS, FED_METHODS, RESIDUALS, FederateConfig

__all__ = ["AGGREGATORS", "FED_METHODS", "RESIDUALS", "FederateConfig"]
