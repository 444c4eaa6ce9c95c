"""From an intra-stage plan (``fleetpipe.planner.intra``) to what the fleet runs: slices and split assignments.

Theory of operation. ``intra_problem`` turns the planner's pipeline ``Problem`` plus the model's
per-layer split information into an ``IntraProblem`` whose exchanged bytes are what the runtime sends:
activations (between stages, and scattered/gathered inside a split stage) travel quantized at the
assignment's bit-width, so float bytes are scaled by ``bits / 32``, and every message costs
``msg_ms``. ``deploy`` materialises a solved ``IntraPlan``: a single or replicated stage gets its slice
as in pipeline mode; a split stage gets one slice per unit (run by the lead; also the lead's fallback
when a part does not answer) and, for split units, one part slice per group member from
``fleetpipe.models.split`` with shares proportional to each member's speed on the unit (a tiled spatial
unit: ``tiles`` consecutive row tiles per member, each a part of its own). A unit that
``split_model`` refuses (a fused spatial unit through an op that mixes rows, a pass-through tensor)
runs on the lead alone: the deployment is always correct, only slower than the model said.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetpipe import slices, wire
from fleetpipe.planner.intra import IntraPlan, IntraProblem, IntraStage, tile_shares

__all__ = ["MSG_MS", "StageDeploy", "deploy", "intra_problem", "part_priors", "split_info", "unit_split"]

log = logging.getLogger("fleetpipe.planner")

#: Fixed cost of one MQTT message through the broker on a LAN (publish + broker + delivery), in ms.
MSG_MS = 1.0


@dataclass(frozen=True, slots=True)
class StageDeploy:
    """One stage ready to publish: nodes (the lead first for a split stage), slices by hash, the split."""

    first: int
    last: int
    mode: str
    nodes: tuple[str, ...]
    slice_hash: str
    slice_size: int
    blobs: dict[str, bytes]
    split: wire.SplitAssign | None
    predicted_ms: float


def split_info(proto: Any, graph: Any) -> list[Any]:
    """Per-layer split kinds and spatial halos (``fleetpipe.models.split.layer_split_info``)."""
    from fleetpipe.models.split import layer_split_info

    return layer_split_info(proto, graph)


def intra_problem(problem: Any, info: Sequence[Any], bits: int, msg_ms: float = MSG_MS,
                  part_factors: dict | None = None) -> IntraProblem:
    """The intra-stage problem of ``problem`` with bytes as sent at ``bits`` and ``msg_ms`` per message
    (``part_factors``: measured split parts, ``fleetpipe.planner.split_profile``; parts not measured get
    the median factor of the measured parts of their kind)."""
    scale = bits / 32.0
    base = IntraProblem.from_problem(problem, [i.kinds for i in info], [i.halo_rows for i in info],
                                     [i.in_rows for i in info], [i.out_rows for i in info], msg_ms)
    return IntraProblem(base.compute_ms, base.in_bytes * scale, base.out_bytes * scale, problem.bw_mbps, base.kinds,
                        base.halo_rows, base.in_rows, base.out_rows, msg_ms, dict(part_factors or {}),
                        part_priors(part_factors or {}))


def part_priors(factors: dict) -> dict[str, float]:
    """Per split kind, the median of the measured part factors (what an unmeasured part is assumed to take)."""
    by_kind: dict[str, list[float]] = {}
    for (_, _, kind, _), fs in factors.items():
        by_kind.setdefault(kind, []).extend(fs)
    return {k: float(np.median(v)) for k, v in by_kind.items()}


def deploy(proto: Any, graph: Any, plan: IntraPlan, p: IntraProblem, names: Sequence[str],
           part_timeout_ms: float = 0.0) -> list[StageDeploy]:
    """Slices and split assignments of every stage of ``plan`` (device ``d`` is node ``names[d]``)."""
    from fleetpipe.models.slicing import slice_bytes

    out = []
    for st in plan.stages:
        data = slice_bytes(proto, graph, st.first, st.last)
        digest = slices.content_hash(data)
        if st.mode != "split":
            nodes = tuple(names[d] for d in st.devices)
            out.append(StageDeploy(st.first, st.last, st.mode, nodes, digest, len(data), {digest: data}, None,
                                   st.latency_ms))
            continue
        blobs: dict[str, bytes] = {}
        units = [_unit(proto, graph, st, u, p, names, blobs) for u in st.units]
        lead = names[st.lead]
        if not any(u.kind for u in units):  # every split was refused: the lead runs the stage alone
            out.append(StageDeploy(st.first, st.last, "single", (lead,), digest, len(data), {digest: data}, None,
                                   st.latency_ms))
            continue
        nodes = (lead, *(names[d] for d in st.devices if d != st.lead))
        split = wire.SplitAssign(lead=lead, units=tuple(units), part_timeout_ms=part_timeout_ms, msg_ms=p.msg_ms)
        out.append(StageDeploy(st.first, st.last, "split", nodes, digest, len(data), blobs, split, st.latency_ms))
    return out


def unit_split(proto: Any, graph: Any, st: IntraStage, u: Any, p: IntraProblem) -> tuple[Any, Any, list[int]]:
    """``(unit slice, its StageSplit, the device of every part)`` of split unit ``u`` of stage ``st``: shares
    proportional to each member's speed on the unit, ``u.tiles`` consecutive row tiles per member of a
    spatial unit (device ``i`` computes tiles ``i*T .. i*T+T-1``). Raises ``SplitError`` where it cannot."""
    from fleetpipe.models.slicing import slice_model
    from fleetpipe.models.split import split_model

    speed = [1.0 / max(float(np.sum(p.compute_ms[u.first : u.last + 1, d])), 1e-12) for d in st.devices]
    tiles = max(1, int(u.tiles)) if u.kind == "spatial" else 1
    unit = slice_model(proto, graph, u.first, u.last)
    return unit, split_model(unit, u.kind, tile_shares(speed, tiles)), [d for d in st.devices for _ in range(tiles)]


def _unit(proto: Any, graph: Any, st: IntraStage, u: Any, p: IntraProblem, names: Sequence[str],
          blobs: dict[str, bytes]) -> wire.SplitUnit:
    from fleetpipe.models.slicing import slice_bytes
    from fleetpipe.models.split import SplitError

    data = slice_bytes(proto, graph, u.first, u.last)
    digest = slices.content_hash(data)
    blobs[digest] = data
    ins, outs = tuple(graph.inputs_of(u.first)), tuple(graph.crossing(u.last))
    if not u.kind:
        return wire.SplitUnit(u.first, u.last, "", digest, len(data), ins, outs, predicted_ms=u.latency_ms)
    try:
        _, sp, devices = unit_split(proto, graph, st, u, p)
    except SplitError as exc:
        log.warning("planner: layers %d..%d cannot be split %s (%s); the lead runs them", u.first, u.last,
                    u.kind, exc)
        return wire.SplitUnit(u.first, u.last, "", digest, len(data), ins, outs, predicted_ms=u.latency_ms)
    parts = []
    for d, part in zip(devices, sp.parts, strict=True):
        h = slices.content_hash(part.model)
        blobs[h] = part.model
        parts.append(wire.SplitPart(names[d], h, len(part.model),
                                    tuple((s.name, s.axis, s.start, s.stop) for s in part.inputs)))
    merges = tuple((m.output, m.kind, m.axis) for m in sp.merges)
    if set(sp.inputs) != set(ins) or set(sp.outputs) != set(outs):
        log.warning("planner: split of layers %d..%d changes the unit's tensors; the lead runs them", u.first, u.last)
        return wire.SplitUnit(u.first, u.last, "", digest, len(data), ins, outs, predicted_ms=u.latency_ms)
    return wire.SplitUnit(u.first, u.last, u.kind, digest, len(data), ins, outs, tuple(parts), merges, u.latency_ms)
