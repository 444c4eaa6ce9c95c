"""The split-stage I/O of a node (``NodeDaemon`` mixes it in): load a role's slices, lead or serve parts.

``fleetpipe.node.split`` holds the protocol's pure pieces and the rule for parts that do not answer;
this module does the I/O on the daemon's loop. A lead runs its units in order (``_run_split``) and
scatters each split unit (``_scatter_gather``): it builds and encodes every remote part's request,
queues them from a task (first tiles first), computes its own part(s) on its inference thread while
the others compute theirs, gathers the replies (at most the part timeout), merges, and from what the
unit took estimates the cost of one part message (``_observe_exchange``, reported as
``NodeHealth.msg_ms_est``). A part node answers every ``PartRequest`` in arrival order
(``_process_part``), with an error reply instead of silence when it cannot.

The mixin uses the daemon's ``name``, ``fleet``, ``config``, ``slots``, ``stats``, ``_outbox``,
``_part_waiters``, ``_background``, ``_fetch_slice`` and ``_report``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from fleetpipe import codec, timing, topics, wire
from fleetpipe.errors import FleetpipeError, RuntimeLoadError, StageError, StaleEpoch
from fleetpipe.node.runtime import create_runtime
from fleetpipe.node.runtime.verify import checked_kind
from fleetpipe.node.split import PartFailed, PartTimeout, SplitRole, merge_parts, scatter_part, send_order

__all__ = ["SplitMember"]

log = logging.getLogger("fleetpipe.node")


class SplitMember:
    """Split-stage I/O for ``NodeDaemon`` (lead and part roles); see the module docstring."""

    name: str
    fleet: str
    config: Any
    slice_limits: Any
    slots: dict[int, Any]
    stats: Any
    _outbox: asyncio.Queue[tuple[str, bytes, Any]]
    _part_waiters: dict[tuple[int, str, int, int], asyncio.Future[Any]]
    _background: set[asyncio.Task[None]]

    async def _fetch_slice(self, slice_hash: str, size: int) -> bytes:
        raise NotImplementedError

    async def _report(self, exc: BaseException, frame_id: str | None) -> None:
        raise NotImplementedError

    async def _load_split(self, assign: Any) -> tuple[SplitRole, Any, str, int]:
        """Load every unit/part slice this node's role in a split stage needs (one runtime per slice)."""
        role = SplitRole.for_node(assign.split, self.name)
        first, kind, size = None, "", 0
        for what, key, digest, nbytes in role.slices_needed():
            data = await self._fetch_slice(digest, nbytes)
            kind = await asyncio.to_thread(checked_kind, data, self.slice_limits)  # refused before any session
            size += len(data)
            runtime = create_runtime(kind, threads=self.config.threads)
            await asyncio.to_thread(runtime.load, data)
            if what == "unit":
                role.unit_runtimes[key[0]] = runtime
            else:
                role.part_runtimes[key] = runtime
            first = first or runtime
        if first is None:
            raise RuntimeLoadError(f"node {self.name} has nothing to run in split stage {assign.stage}")
        return role, first, kind, size
    async def _run_split(self, slot: Any, frame_id: str, inputs: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Lead of a split stage: run the units in order, scattering and gathering the split ones."""
        role, assign = slot.split, slot.assign
        assert role is not None
        start = time.monotonic()
        env = dict(inputs)
        for u, unit in enumerate(role.split.units):
            feeds = {n: env[n] for n in unit.input_names}
            if unit.kind and role.available(u, time.monotonic()):
                outs = await self._scatter_gather(slot, frame_id, u, feeds)
            else:
                outs, ms = await slot.executor.run(feeds, role.unit_runtimes[u])
                if not unit.kind and unit.predicted_ms > 0:
                    self.stats.lead_units.append((ms, unit.predicted_ms))
            env.update(outs)
        return {n: env[n] for n in assign.output_names}, (time.monotonic() - start) * 1000

    async def _scatter_gather(self, slot: Any, frame_id: str, u: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """One split unit: send the parts, compute ours, gather; a missing part falls back to the whole unit.

        Remote parts go out in ``send_order`` (first tiles first); the lead's own parts (one, or its row
        tiles) are computed one after the other while the others compute theirs.
        """
        role, assign = slot.split, slot.assign
        assert role is not None
        unit = role.split.units[u]
        loop = asyncio.get_running_loop()
        waiting: dict[int, asyncio.Future[Any]] = {}
        mine = role.part_index[u]
        t0 = time.monotonic()
        sent_bytes = 0
        requests: list[tuple[str, bytes, Any]] = []
        try:
            for i in send_order(unit, self.name):
                part = unit.parts[i]
                pf = scatter_part(feeds, part, unit.input_names)
                tensors = tuple((n, codec.encode_tensor(_as_array(a), bits=_bits_for(a, assign.bits)))
                                for n, a in pf.items())
                req = wire.PartRequest(fleet=self.fleet, epoch=assign.epoch, stage=assign.stage, frame_id=frame_id,
                                       unit=u, part=i, lead=self.name, tensors=tensors, sent_ts=time.time())
                waiting[i] = self._part_waiters[(assign.epoch, frame_id, u, i)] = loop.create_future()
                payload = wire.encode(req)
                sent_bytes += len(payload)
                topic = topics.part_in(self.fleet, assign.epoch, assign.stage, part.node_id, self.name)
                requests.append((topic, payload, None))
            # Queued by a task, so our own part starts while a slow link still drains the outbox (several
            # tiles per node are more requests than the outbox holds).
            task = asyncio.create_task(self._queue_all(requests))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            own, own_ms = {}, 0.0
            for i in mine:
                own[i], ms = await slot.executor.run(scatter_part(feeds, unit.parts[i], unit.input_names),
                                                     role.part_runtimes[(u, i)])
                own_ms += ms
            timeout = role.split.part_timeout_ms / 1000 or timing.SPLIT_PART_TIMEOUT_S
            done, _pending = await asyncio.wait(waiting.values(), timeout=timeout)
            failure: StageError | None = None
            outs: list[Any] = [None] * len(unit.parts)
            for i, out in own.items():
                outs[i] = out
            for i, fut in waiting.items():
                node = unit.parts[i].node_id
                if fut not in done:
                    role.down_until[node] = time.monotonic() + timing.SPLIT_RETRY_S
                    failure = PartTimeout(f"frame {frame_id}: part {i} of unit {u} (layers {unit.first_layer}.."
                                          f"{unit.last_layer}) on {node} did not answer within {timeout:.2f} s; "
                                          f"the lead computes the unit itself")
                elif fut.result().error or fut.result().node_id != node:
                    failure = PartFailed(f"frame {frame_id}: part {i} of unit {u} on {node} failed: "
                                         f"{fut.result().error or 'reply from ' + fut.result().node_id}")
                else:
                    outs[i] = {n: codec.decode_tensor(t) for n, t in fut.result().tensors}
            if failure is None:
                self._observe_exchange(unit, role.split.msg_ms, t0, own_ms, sent_bytes,
                                       [f.result() for f in waiting.values()])
                try:
                    return merge_parts(unit, outs)
                except (StageError, ValueError) as exc:
                    failure = PartFailed(f"frame {frame_id}: unit {u} parts do not merge: {exc}")
        finally:
            for i in waiting:
                self._part_waiters.pop((assign.epoch, frame_id, u, i), None)
        assert failure is not None
        await self._report(failure, frame_id)
        whole, _ = await slot.executor.run(feeds, role.unit_runtimes[u])
        return whole

    def _observe_exchange(self, unit: Any, planned_msg_ms: float, t0: float, own_ms: float, sent_bytes: int,
                          replies: list[Any]) -> None:
        """The per-message cost that makes this split unit's prediction match what it took.

        The plan predicted ``unit.predicted_ms`` with ``planned_msg_ms`` per message; compute predictions
        are first corrected by how this lead's lead-only units ran against theirs (profiles drift), and what
        is left over is charged to the unit's ``2 (k - 1)`` messages. The health reports the median.
        """
        elapsed = (time.monotonic() - t0) * 1000
        lead_units = self.stats.lead_units
        ratio = sum(m for m, _ in lead_units) / sum(p for _, p in lead_units) if lead_units else 1.0
        msgs = max(2 * len(replies), 1)
        compute_pred = max(unit.predicted_ms - msgs * planned_msg_ms, 0.0)
        per_msg = max((elapsed - ratio * compute_pred) / msgs, 0.0)
        self.stats.msg_ms.append(per_msg)
        if log.isEnabledFor(logging.DEBUG):
            got = sum(_reply_bytes(r) for r in replies)
            log.debug("node %s: split unit %d..%d %.1f ms (predicted %.1f, compute x%.2f): own %.1f, parts %s, "
                      "%d bytes -> %.2f ms per message", self.name, unit.first_layer, unit.last_layer, elapsed,
                      unit.predicted_ms, ratio, own_ms, [round(r.compute_ms, 1) for r in replies], sent_bytes + got,
                      per_msg)

    async def _process_part(self, req: Any, recv_ts: float) -> None:
        """Part node of a split stage: run our part of a unit and answer the lead (an error reply on failure)."""
        slot = self.slots.get(req.epoch)
        role = slot.split if slot is not None else None
        error, compute_ms = "", 0.0
        tensors: tuple[tuple[str, Any], ...] = ()
        try:
            if slot is None or role is None:
                raise StaleEpoch(f"part request of frame {req.frame_id} for epoch {req.epoch}; node holds "
                                 f"{sorted(self.slots)}")
            ours = req.stage == slot.assign.stage and req.lead == role.split.lead
            if not ours or not role.serves(req.unit, req.part):
                raise StageError(f"part request of frame {req.frame_id}: stage {req.stage} unit {req.unit} part "
                                 f"{req.part} from {req.lead} is not ours")
            t_start = time.time()
            inputs = {name: codec.decode_tensor(t) for name, t in req.tensors}
            t_dec = time.time()
            outputs, compute_ms = await slot.executor.run(inputs, role.part_runtimes[(req.unit, req.part)])
            t_comp = time.time()
            self.stats.compute_ms.append(compute_ms)
            unit = role.split.units[req.unit]
            bits = slot.assign.bits
            tensors = tuple((n, codec.encode_tensor(_as_array(outputs[n]), bits=_bits_for(outputs[n], bits)))
                            for n in unit.output_names)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("node %s: part %s u%d p%d: in %.2f ms, queued %.2f, decode %.2f, compute %.2f (%.2f wall), "
                          "encode %.2f", self.name, req.frame_id, req.unit, req.part, (recv_ts - req.sent_ts) * 1000,
                          (t_start - recv_ts) * 1000, (t_dec - t_start) * 1000, compute_ms, (t_comp - t_dec) * 1000,
                          (time.time() - t_comp) * 1000)
        except (FleetpipeError, ValueError, TypeError, KeyError) as exc:
            await self._report(exc, req.frame_id)
            error = f"{type(exc).__name__}: {exc}"[:500]  # the lead falls back at once instead of timing out
        reply = wire.PartReply(fleet=self.fleet, epoch=req.epoch, stage=req.stage, frame_id=req.frame_id,
                               unit=req.unit, part=req.part, node_id=self.name, tensors=tensors,
                               compute_ms=round(compute_ms, 3), sent_ts=time.time(), error=error)
        topic = topics.part_gather(self.fleet, req.epoch, req.stage, req.lead, self.name)
        await self._outbox.put((topic, wire.encode(reply), None))
        self.stats.frames_out += 1
    async def _queue_all(self, items: list[tuple[str, bytes, Any]]) -> None:
        for item in items:
            await self._outbox.put(item)


def _reply_bytes(reply: Any) -> int:
    """Payload bytes of a part reply's tensors (what crossed the link, give or take the header)."""
    return sum(memoryview(t.data).nbytes for _, t in reply.tensors)


def _as_array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _bits_for(array: Any, bits: int) -> int:
    return bits if np.issubdtype(np.asarray(array).dtype, np.floating) else 32
