"""Split stages at a node: the lead scatters a unit's parts over MQTT, part nodes compute, the lead gathers.

Theory of operation. A stage whose assignment carries a ``SplitAssign`` runs on a device group. The
*lead* is the only member subscribed to the stage's input topic; it holds a frame's tensors in an
environment (name -> array) and runs the stage's units in order:

- a lead-only unit (``kind=""``) runs the unit slice on the lead;
- a split unit is scattered: every part's input (whole tensors, or the row range its ``SplitPart.inputs``
  names for spatial splits) goes in one ``PartRequest`` to ``part_in(..., node)``, quantized with the
  assignment's bit-width; while the requests are paced out, the lead computes its own part(s) on its
  inference thread; each part node runs its part slice and answers with a ``PartReply`` on
  ``part_gather(..., lead)``; the lead merges (concat on an axis, sum of partial sums, or the first
  part's copy) in part order and continues with the next unit.
- a tiled spatial unit (Galaxy+ overlap) gives every node several consecutive row tiles, each a part:
  the lead sends tile 0 of every node, then tile 1, ... (``send_order``), a part node answers each
  request as soon as it is computed, so a node computes tile ``t`` while tile ``t + 1`` is still on
  its link and tile ``t - 1``'s result is on the way back.

Dead or failing parts (the rule). The lead waits for a unit's replies at most ``part_timeout_ms`` of the
assignment (``timing.SPLIT_PART_TIMEOUT_S`` when 0). A reply carrying an error, or no reply in time,
makes the lead report ``PartTimeout``/``PartFailed`` on the fleet's error topic (naming the frame, unit,
part and node) and compute the whole unit itself from the unit slice it holds: the frame is never lost
and never waits longer than the timeout. The node that missed is then *down* for
``timing.SPLIT_RETRY_S``: while any part node of a unit is down, the lead runs that unit unsplit without
asking (one timeout per outage, not one per frame); after that it tries the split again. Late replies
of a frame already handled are dropped. The planner re-plans around a node that died (its will).

This module holds the pure pieces (roles, scatter, merge); ``fleetpipe.node.daemon`` does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetpipe.errors import StageError

__all__ = ["PartFailed", "PartTimeout", "SplitRole", "merge_parts", "scatter_part", "send_order"]


class PartTimeout(StageError):
    """A part node of a split stage did not answer in time (the lead computed the unit itself)."""


class PartFailed(StageError):
    """A part node of a split stage answered with an error (the lead computed the unit itself)."""


@dataclass(slots=True)
class SplitRole:
    """What one node does in a split stage: lead (runs units, scatters) or part (serves part requests).

    ``unit_runtimes[u]`` (lead only) runs the whole unit ``u``; ``part_runtimes[(u, i)]`` runs part ``i``
    of unit ``u``; ``part_index[u]`` lists this node's positions among the unit's parts (several for a
    tiled spatial unit, in row order); ``down_until`` maps node ids to the monotonic time until which the
    lead does not ask them.
    """

    split: Any
    lead: bool
    unit_runtimes: dict[int, Any] = field(default_factory=dict)
    part_runtimes: dict[tuple[int, int], Any] = field(default_factory=dict)
    part_index: dict[int, tuple[int, ...]] = field(default_factory=dict)
    down_until: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_node(cls, split: Any, node_id: str) -> SplitRole:
        """This node's role (part indices filled in; runtimes are loaded by the daemon)."""
        role = cls(split, split.lead == node_id)
        for u, unit in enumerate(split.units):
            mine = tuple(i for i, part in enumerate(unit.parts) if part.node_id == node_id)
            if mine:
                role.part_index[u] = mine
        return role

    def slices_needed(self) -> list[tuple[str, tuple[int, int], str, int]]:
        """``(what, key, slice_hash, size)`` for every slice this node must load: ``("unit", (u, -1), ...)``
        or ``("part", (u, i), ...)``."""
        out = []
        for u, unit in enumerate(self.split.units):
            if self.lead:
                out.append(("unit", (u, -1), unit.slice_hash, unit.slice_size))
            for i in self.part_index.get(u, ()):
                part = unit.parts[i]
                out.append(("part", (u, i), part.slice_hash, part.slice_size))
        return out

    def serves(self, unit: int, part: int) -> bool:
        """Whether part ``part`` of unit ``unit`` is this node's to compute."""
        return part in self.part_index.get(unit, ())

    def available(self, unit: int, now: float) -> bool:
        """Whether every part node of ``unit`` may be asked now (none is marked down)."""
        return all(self.down_until.get(p.node_id, 0.0) <= now for p in self.split.units[unit].parts)


def send_order(unit: Any, lead: str) -> list[int]:
    """The lead's remote parts in sending order: the first tile of every node, then the second, ..."""
    seen: dict[str, int] = {}
    ranked = []
    for i, part in enumerate(unit.parts):
        if part.node_id == lead:
            continue
        t = seen.get(part.node_id, 0)
        seen[part.node_id] = t + 1
        ranked.append((t, i))
    return [i for _, i in sorted(ranked)]


def scatter_part(feeds: Mapping[str, np.ndarray], part: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The inputs of one part: every unit input, restricted to the part's row ranges (contiguous copies)."""
    out = {n: feeds[n] for n in names}
    for name, axis, start, stop in part.inputs:
        if name not in out:
            raise StageError(f"part input {name!r} is not an input of the unit")
        arr = out[name]
        if axis >= arr.ndim or stop > arr.shape[axis]:
            raise StageError(f"part range {start}:{stop} on axis {axis} exceeds {name!r} of shape {arr.shape}")
        index = [slice(None)] * arr.ndim
        index[axis] = slice(start, stop)
        out[name] = np.ascontiguousarray(arr[tuple(index)])
    return out


def merge_parts(unit: Any, outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A split unit's outputs rebuilt from every part's outputs, in part order."""
    merged = {}
    for name, kind, axis in unit.merges:
        try:
            vals = [np.asarray(o[name]) for o in outputs]
        except KeyError:
            raise StageError(f"a part of unit {unit.first_layer}..{unit.last_layer} lacks output {name!r}") from None
        if kind == "concat":
            merged[name] = np.concatenate(vals, axis=axis)
        elif kind == "sum":
            acc = vals[0].astype(vals[0].dtype, copy=True)
            for v in vals[1:]:
                acc += v
            merged[name] = acc
        else:
            merged[name] = vals[0]
    return merged
