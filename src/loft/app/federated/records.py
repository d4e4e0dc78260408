"""Tensors and optimizer state as Flower records (what travels in a ``Message`` and what a
ClientApp keeps in ``context.state`` between rounds).

* :func:`tensors_record` / :func:`record_tensors`: ``{name: tensor}`` <-> ``ArrayRecord`` (dtype
  and shape kept, float64 included).
* :func:`factors_record` / :func:`record_factors`: :data:`loft.federated.Factors`
  (``name -> (A (r, n), B (m, r))``) as an ``ArrayRecord`` with keys ``name.A`` / ``name.B``, or
  only one side of every pair (``only="A"`` / ``"B"``: what a message carries when the other
  factor is known to both ends), completed from the known factors on receipt.
* :func:`record_bytes`: the tensor bytes an ``ArrayRecord`` carries (what
  :func:`loft.federated.message_bytes` counts).
* :func:`state_to_records` / :func:`records_to_state`: any ``Optimizer.state_dict()`` (nested
  dicts, lists, tuples, numbers, strings, tensors: LoFTAdamW's and AdamW's) as one
  ``ArrayRecord`` of its tensors plus one ``ConfigRecord`` holding the rest as JSON, and back,
  equal value for value (tests/test_flower.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from ...federated import Factors

__all__ = ["factors_record", "record_bytes", "record_factors", "record_tensors", "records_to_state",
           "state_to_records", "tensors_record"]


def tensors_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``{name: tensor}`` as an ``ArrayRecord`` (copies, on the CPU)."""
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ``ArrayRecord``, keyed as they were sent."""
    return dict(record.to_torch_state_dict())


def factors_record(factors: Factors, only: str | None = None) -> ArrayRecord:
    """:data:`~loft.federated.Factors` as an ``ArrayRecord`` (``name.A``, ``name.B``); with
    ``only="A"`` (or ``"B"``) just that factor of every pair."""
    if only not in (None, "A", "B"):
        raise ValueError(f"only must be 'A', 'B' or None, got {only!r}")
    flat: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        if only != "B":
            flat[f"{name}.A"] = a
        if only != "A":
            flat[f"{name}.B"] = b
    return tensors_record(flat)


def record_factors(record: ArrayRecord, known: Factors | None = None) -> Factors:
    """The inverse of :func:`factors_record`: a pair the record holds one factor of takes the
    other from ``known`` (the factors the receiver already has); ValueError naming the first
    factor found in neither."""
    flat = record_tensors(record)
    names = sorted({k.rsplit(".", 1)[0] for k in flat})
    out: Factors = {}
    for n in names:
        pair = []
        for side, s in enumerate("AB"):
            if f"{n}.{s}" in flat:
                pair.append(flat[f"{n}.{s}"])
            elif known is not None and n in known:
                pair.append(known[n][side])
            else:
                raise ValueError(f"factor record has no {n + '.' + s!r}, and the receiver does not know it")
        out[n] = (pair[0], pair[1])
    return out


def record_bytes(record: ArrayRecord) -> int:
    """The tensor bytes an ``ArrayRecord`` carries: ``numel * itemsize`` of each array, as
    :func:`loft.federated.message_bytes` counts (Flower's own per-array headers not included)."""
    return sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize for array in record.values())


def state_to_records(state: dict[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """An optimizer ``state_dict`` as ``(tensors, skeleton)``: the tensors in an ``ArrayRecord``
    (keys ``t0``, ``t1`` ...), everything else as JSON in a ``ConfigRecord`` whose tensors are
    ``{"t": key}`` placeholders. Dict keys keep their types (torch uses integer parameter ids)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = obj
            return {"t": key}
        if isinstance(obj, dict):
            return {"d": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"u": [encode(v) for v in obj]}
        if isinstance(obj, list):
            return {"l": [encode(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"v": obj}
        raise TypeError(f"optimizer state holds a {type(obj).__name__}, which loft cannot send as a Flower record")

    skeleton = json.dumps(encode(state))
    return tensors_record(tensors), ConfigRecord({"skeleton": skeleton})


def records_to_state(tensors: ArrayRecord, skeleton: ConfigRecord) -> dict[str, Any]:
    """The inverse of :func:`state_to_records`."""
    values = record_tensors(tensors)

    def decode(node: dict[str, Any]) -> Any:
        (kind, body), = node.items()
        if kind == "t":
            return values[body]
        if kind == "d":
            return {decode(k): decode(v) for k, v in body}
        if kind == "u":
            return tuple(decode(v) for v in body)
        if kind == "l":
            return [decode(v) for v in body]
        return body

    return decode(json.loads(str(skeleton["skeleton"])))
