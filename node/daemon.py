"""The node daemon: birth, health, assignment, slice loading, stage execution, drain.

Theory of operation. A node connects with a last will (a retained ``NodeDeath`` on its state
topic) and publishes a retained ``NodeBirth`` with a fresh sequence number on every (re)connect.
It follows its retained assignment topic. An assignment names an epoch, a stage and a slice by
content hash; the node loads the slice (local cache, else retained chunks on MQTT, verified by
hash) on its inference thread and subscribes to the stage's input topic for that epoch (a shared
subscription, so replicas split the frames).

Frames flow through five tasks so compute overlaps codec work and transfer: the receiver puts
decoded frames in a bounded inbox (a full inbox blocks the MQTT thread, which pushes back on the
broker instead of dropping), the preparer checks a frame and decodes its tensors, the worker runs
the slice on the single inference thread, the finisher encodes the outputs, and the sender paces
bytes to the emulated link and publishes to the next stage or, from the last stage, to the client's
response topic. Preparer, worker and finisher hand over through one-frame queues, so while frame n
computes, frame n+1 is decoded and frame n-1 encoded (a stage's period is its compute, not compute
plus codec), and frames leave in arrival order.

Epochs switch in two phases: a new assignment is loaded (and reported loaded in the health) while
the previous epoch keeps serving; the switch happens when the planner publishes the plan of the new
epoch (the commit). Only then does the previous epoch's grace period start, so frames already in
flight under the old plan still complete, and an epoch the planner abandons (a member died while
loading) never takes the running one down; an empty assignment (left out of the plan) likewise
waits for the plan that leaves the node out. The node follows only plans of the planner whose birth
(``PlannerState``) it sees. A frame whose epoch it no longer holds is reported on the error topic
(``StaleEpoch``) and the client re-sends it under the new plan. Nothing bad from
the network crashes the daemon: each frame's failure becomes one error report.

A split stage (the assignment carries a ``SplitAssign``) runs on a group: the lead takes the stage's
frames as above and scatters/gathers its split units over the ``part_in``/``part_gather`` topics; the
other members only serve part requests (``fleetpipe.node.split`` has the protocol and the rule for a
part node that does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe import codec, signing, timing, topics, wire
from fleetpipe._aio import Stopped, unless_stopped
from fleetpipe._compat import wait_for
from fleetpipe.config import NodeConfig
from fleetpipe.deploy import sdnotify
from fleetpipe.errors import (
    DecodeError,
    FleetpipeError,
    InferenceError,
    RuntimeLoadError,
    StageError,
    StaleEpoch,
    UntrustedSlice,
)
from fleetpipe.metrics import metrics_payload
from fleetpipe.node.emulate import TokenBucket, parse_emulate
from fleetpipe.node.executor import InferenceExecutor
from fleetpipe.node.lifecycle import NodeLifecycle
from fleetpipe.node.profile import measure_speed, probe_capability, slice_layer_ms
from fleetpipe.node.runtime import available_providers, available_runtimes, create_runtime
from fleetpipe.node.runtime.verify import SliceLimits, checked_kind
from fleetpipe.node.split import SplitRole
from fleetpipe.node.split_io import SplitMember, _as_array, _bits_for
from fleetpipe.slices import content_hash
from fleetpipe.transport import Message, Will
from fleetpipe.transport.mqtt import MqttBus

__all__ = ["EXIT_BROKER", "EXIT_CONFIG", "EXIT_OK", "NodeDaemon"]

log = logging.getLogger("fleetpipe.node")

EXIT_OK = 0
EXIT_CONFIG = 2
# Running-mean memory of the early-exit centres: the last ~this many exits per label weigh in (COACH Eq. 7).
EXIT_CACHE_MEMORY = 50
EXIT_BROKER = 3
# On top of drain_timeout_s: the death publish and unsubscribes, each bounded by an ack (TimeoutStopSec is 30 s).
DRAIN_GRACE_S = 5.0

# Keep the previous epoch's slice this long after switching, so in-flight frames finish.
EPOCH_GRACE_S = 15.0
SLICE_FETCH_TIMEOUT_S = 30.0
#: GIL switch interval of a node process (CPython default 0.005): bounds how long the inference thread waits
#: for the GIL held by the loop thread's codec work.
GIL_SWITCH_S = 0.0005


@dataclass(slots=True)
class _Slot:
    """One loaded stage (an epoch's assignment) on this node."""

    assign: Any
    runtime: Any
    executor: InferenceExecutor
    topic: str
    retired_at: float | None = None
    # COACH: per-link adaptive bit-width (non-last stages), created on the first output.
    adaptive: Any = None
    # COACH: semantic cache for early exit when the assignment carries one (fleetpipe.context.SemanticCache).
    exit_cache: Any = None
    # Split stage: this node's role (lead or part) with the unit/part runtimes; None for an ordinary stage.
    split: SplitRole | None = None
    # Topics subscribed for this slot besides ``topic`` (a lead's part replies).
    extra_topics: tuple[str, ...] = ()

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.topic, *self.extra_topics) if self.topic else self.extra_topics


@dataclass(slots=True)
class _Stats:
    frames_in: int = 0
    frames_out: int = 0
    errors: int = 0
    compute_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    transfer_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    idle_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    bytes_out: int = 0
    last_done: float | None = None
    early_exits: int = 0
    msg_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    lead_units: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=50))  # (measured, predicted)


class NodeDaemon(SplitMember):
    """A fleetpipe node: ``NodeDaemon(config).run()`` blocks until SIGTERM/SIGINT, returns the exit code."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.fleet = config.fleet
        self.name = config.name
        self.device = parse_emulate(config.emulate or "host")
        self.seq = time.time_ns() // 1000
        self.lifecycle = NodeLifecycle()
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.exit_code = EXIT_OK
        self.stats = _Stats()
        self.slots: dict[int, _Slot] = {}
        self.epoch = -1
        self.committed = -1  # the newest epoch whose plan we saw (the planner's commit)
        self.planner: Any = None  # the planner's last PlannerState: we follow the plans of the one that is born
        self.bus: MqttBus | None = None
        self.bucket = TokenBucket(self.device.bandwidth_mbps) if self.device.bandwidth_mbps else None
        self.cache_dir = Path(os.path.expanduser(config.cache_dir))
        self.planner_key = signing.load_public_key(config.planner_key) if config.planner_key else None
        self.slice_limits = SliceLimits(max_bytes=config.max_slice_bytes, max_tensor_bytes=config.max_tensor_bytes,
                                        allow_fake=config.allow_fake_runtime)
        self._inbox: asyncio.Queue[tuple[wire.Activation | wire.PartRequest, float]] = asyncio.Queue(
            maxsize=config.queue_limit)
        # Lead of a split stage: (epoch, frame_id, unit, part) -> future of the part's reply.
        self._part_waiters: dict[tuple[int, str, int, int], asyncio.Future[Any]] = {}
        self._outbox: asyncio.Queue[tuple[str, bytes, Any]] = asyncio.Queue(maxsize=4)
        self._ready: asyncio.Queue[tuple[Any, float, _Slot, dict[str, np.ndarray]]] = asyncio.Queue(maxsize=1)
        self._computed: asyncio.Queue[tuple[Any, float, _Slot, dict[str, Any], float]] = asyncio.Queue(maxsize=1)
        self._last_send_end = 0.0
        self.plans: dict[int, Any] = {}  # epoch -> Plan (for the neighbours' predicted times)
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._chunk_limits: dict[str, int] = {}  # slice hash -> assigned size: caps the bytes buffered
        self._chunk_waiters: dict[str, asyncio.Future[bytes]] = {}
        self._load_task: asyncio.Task[None] | None = None
        self._capability: dict[str, Any] = {}
        self._speed = 0.0
        self._err_times: deque[float] = deque(maxlen=20)
        self._health_hist: deque[Any] = deque(maxlen=16)
        self._background: set[asyncio.Task[None]] = set()
        self._profiled: set[str] = set()  # slices whose layers were timed (wire.NodeProfile)
        self._host_profile: tuple[Any, tuple[float, ...]] | None = None  # (assign, host ms per layer)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until told to exit; returns a process exit code."""
        try:
            return asyncio.run(self.serve())
        except KeyboardInterrupt:
            return EXIT_OK

    async def serve(self) -> int:
        """Connect, serve frames, drain on exit."""
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        tune_malloc()
        # The loop thread decodes and encodes while the inference thread computes; with CPython's default 5 ms
        # switch interval the inference thread could wait that long for the GIL after every slice run.
        sys.setswitchinterval(GIL_SWITCH_S)
        self._capability = probe_capability(available_runtimes())
        speed = await asyncio.to_thread(measure_speed, 0.2, cpu_time=bool(self.config.emulate))
        self._speed = speed / max(self.device.compute_factor, 1e-9)
        will = Will(topics.node_state(self.fleet, self.name), wire.encode(self._death("connection lost")),
                    qos=1, retain=True)
        broker = self.config.broker
        # Advertise (and check the id is not taken) before connecting: a second process with our id would
        # otherwise take over our MQTT session (same client id) and the two would knock each other off.
        announcer = await self._announce() if self.config.announce else None
        if announcer is False:
            return EXIT_CONFIG
        sdnotify.notify(f"STATUS=waiting for the MQTT broker at {broker.url}")
        try:
            self.bus = MqttBus(broker.url or "", client_id=f"fp-{self.fleet}-{self.name}", will=will,
                               username=broker.username, password=broker.password(),
                               tls=broker.tls(), on_connect=self._on_connect, wait=True)
            await unless_stopped(self.bus.__aenter__(), self.should_exit)
        except (FleetpipeError, Stopped) as exc:
            if isinstance(exc, Stopped):
                log.info("node %s: stopped while waiting for the broker at %s", self.name, broker.url)
            else:
                log.error("node %s: cannot connect to broker %s: %s", self.name, broker.url, exc)
            if announcer:
                await announcer.__aexit__(None, None, None)
            return EXIT_OK if isinstance(exc, Stopped) else EXIT_BROKER
        self.lifecycle.handle("connect")
        log.info("node %s: connected to %s (fleet %s)", self.name, broker.url, self.fleet)
        sdnotify.notify(f"READY=1\nSTATUS=connected to {broker.url}; waiting for an assignment")
        # Load (or compile, on a machine's first run) the optional numba codec kernels while the slice loads,
        # not on the first frame.
        warm = asyncio.create_task(asyncio.to_thread(codec.warmup), name="codec-warmup")
        jobs = [("receiver", self._receiver()), ("preparer", self._preparer()), ("worker", self._worker()),
                ("finisher", self._finisher()), ("sender", self._sender()), ("health", self._health_loop())]
        tasks = [asyncio.create_task(coro, name=name) for name, coro in jobs]
        try:
            await self.should_exit.wait()
            # Bounded even when the broker is gone meanwhile (every unsubscribe/publish would wait for its ack).
            try:
                await wait_for(self._drain(tasks), self.config.drain_timeout_s + DRAIN_GRACE_S)
            except TimeoutError:
                log.warning("node %s: drain did not finish within %.0f s; stopping anyway", self.name,
                            self.config.drain_timeout_s + DRAIN_GRACE_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, warm, return_exceptions=True)
            for slot in self.slots.values():
                slot.executor.shutdown()
            await self.bus.__aexit__(None, None, None)
            if announcer:
                await announcer.__aexit__(None, None, None)
            log.info("node %s: stopped (exit code %d)", self.name, self.exit_code)
        return self.exit_code

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def handle(sig: signal.Signals) -> None:
            if sig == signal.SIGINT and self.should_exit.is_set():
                self.force_exit = True
                raise SystemExit(130)
            self.should_exit.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handle, sig)

    async def _announce(self) -> Any:
        """Start the zeroconf advert: the entered Announcer, None if advertising failed, False on a duplicate id."""
        from fleetpipe.discovery import Announcer
        from fleetpipe.transport import parse_broker_url

        url = self.config.broker.url or ""
        announcer = Announcer("node", self.name, self.fleet, parse_broker_url(url).port, {"broker": url},
                              interfaces=self.config.interfaces or None)
        try:
            return await announcer.__aenter__()
        except FleetpipeError as exc:
            if "duplicate" in str(exc):
                log.error("node %s: %s", self.name, exc)
                return False
            log.warning("node %s: zeroconf advert failed: %s", self.name, exc)
        except OSError as exc:  # no usable interface for multicast: discovery is optional
            log.warning("node %s: zeroconf advert failed: %s", self.name, exc)
        return None

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop taking frames, finish those in hand, publish death."""
        assert self.bus is not None
        log.info("node %s: draining", self.name)
        sdnotify.notify("STOPPING=1")
        with contextlib.suppress(FleetpipeError):
            self.lifecycle.handle("drain")
        for slot in self.slots.values():
            for topic in slot.topics:
                with contextlib.suppress(FleetpipeError):
                    await self.bus.unsubscribe(topic)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (self._inbox.qsize() or self._outbox.qsize() or self._in_hand) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with contextlib.suppress(FleetpipeError):
            await self.bus.publish(topics.node_state(self.fleet, self.name),
                                   wire.encode(self._death("clean shutdown")), qos=1, retain=True)

    async def _on_connect(self, _bus: object) -> None:
        """After every (re)connect: subscriptions are restored by the bus; re-announce ourselves."""
        assert self.bus is not None
        await self.bus.subscribe(topics.node_assign(self.fleet, self.name), qos=1)
        await self.bus.subscribe(topics.planner_state(self.fleet), qos=1)
        await self.bus.subscribe(topics.plan(self.fleet), qos=1)
        if self.config.emulate:
            await self.bus.subscribe(topics.node_control(self.fleet, self.name), qos=1)
        await self.bus.publish(topics.node_state(self.fleet, self.name), wire.encode(self._birth()),
                               qos=1, retain=True)

    # -- messages --------------------------------------------------------------------------------

    async def _receiver(self) -> None:
        assert self.bus is not None
        async for message in self.bus.messages():
            try:
                await self._dispatch(message)
            except Exception as exc:  # anything a message provokes is reported; the receiver never dies
                await self._report(exc, None)

    async def _dispatch(self, message: Message) -> None:
        spec, _ = topics.parse(message.topic)
        if spec is topics.NODE_ASSIGN:
            if not message.payload:
                await self._unassign()
                return
            self._start_load(self._decode_as(message, wire.StageAssign))
        elif spec is topics.STAGE_IN:  # the client id in the payload must be the one the topic (ACL) binds
            msg = self._decode_as(message, wire.Activation, check=False)
            try:
                self._check_topic(message, msg)
            except DecodeError as exc:  # reported with the frame id, like every refused frame
                await self._report(exc, msg.frame_id)
                return
            self.stats.frames_in += 1
            await self._inbox.put((msg, time.time()))
        elif spec is topics.PART_IN:
            msg = self._decode_as(message, wire.PartRequest)
            self.stats.frames_in += 1
            await self._inbox.put((msg, time.time()))
        elif spec is topics.PART_GATHER:
            msg = self._decode_as(message, wire.PartReply)
            waiter = self._part_waiters.get((msg.epoch, msg.frame_id, msg.unit, msg.part))
            if waiter is not None and not waiter.done():  # else late (the lead already computed it) or forged
                waiter.set_result(msg)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("node %s: part reply %s u%d p%d back in %.2f ms", self.name, msg.frame_id, msg.unit,
                              msg.part, (time.time() - msg.sent_ts) * 1000)
        elif spec is topics.NODE_CONTROL:
            self._emulation_control(self._decode_as(message, wire.EmulationControl))
        elif spec is topics.PLAN:
            if message.payload:
                self._on_plan(self._decode_as(message, wire.Plan))
        elif spec is topics.NODE_STATE:
            if message.payload:
                msg = self._decode_as(message, wire.PlannerState)
                if self.planner is None or msg.planner_id != self.planner.planner_id or msg.seq >= self.planner.seq:
                    self.planner = msg
        elif spec is topics.SLICE_CHUNK:
            self._on_chunk(self._decode_as(message, wire.SliceChunk))

    def _on_plan(self, plan: Any) -> None:
        """A plan: the commit of its epoch (the older epochs' grace starts now), if our planner published it."""
        if self.planner is not None and self.planner.online and plan.planner_id != self.planner.planner_id:
            raise DecodeError(f"plan epoch {plan.epoch} of planner {plan.planner_id!r} ignored: the planner is "
                              f"{self.planner.planner_id!r}")
        if plan.status != "active":
            return  # infeasible: keep serving what we hold until the planner can plan again
        self.plans[plan.epoch] = plan
        for old in sorted(self.plans)[:-3]:  # the newest three, however the epochs arrive
            del self.plans[old]
        if plan.epoch <= self.committed:
            return
        self.committed = int(plan.epoch)
        now = time.monotonic()
        for epoch, slot in self.slots.items():
            if epoch < plan.epoch and slot.retired_at is None:
                slot.retired_at = now
        if plan.epoch in self.slots or any(self.name in s.nodes for s in plan.stages):
            log.info("node %s: epoch %d committed", self.name, plan.epoch)
        elif self.slots:
            log.info("node %s: epoch %d committed without this node; draining %s", self.name, plan.epoch,
                     sorted(self.slots))

    def _decode_as(self, message: Message, cls: type[Any], *, check: bool = True) -> Any:
        """The message's payload decoded, if it is a ``cls`` that belongs on its topic; else DecodeError."""
        msg = wire.decode(message.payload)
        if not isinstance(msg, cls):
            raise DecodeError(f"expected a {cls.__name__} on {message.topic}, got {_describe(msg)}")
        if check:
            self._check_topic(message, msg)
        return msg

    def _check_topic(self, message: Message, msg: Any) -> None:
        """DecodeError unless ``msg`` belongs on its topic (``topics.check``) and to this node's fleet.

        Every identity the payload names (node, client, lead, slice) must be the one its topic names,
        which the broker's ACL binds to the publisher.
        """
        try:
            topics.check(message.topic, msg)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        if getattr(msg, "fleet", self.fleet) != self.fleet:
            raise DecodeError(f"a {type(msg).__name__} of fleet {msg.fleet!r} on {message.topic}")

    def _emulation_control(self, msg: Any) -> None:
        """Scripted change of the emulated device: slower compute and/or a different link bandwidth."""
        changes: dict[str, Any] = {}
        if msg.compute_factor is not None:
            changes["compute_factor"] = float(msg.compute_factor)
            for slot in self.slots.values():
                slot.executor.compute_factor = float(msg.compute_factor)
        if msg.bandwidth_mbps is not None:
            changes["bandwidth_mbps"] = float(msg.bandwidth_mbps)
            if self.bucket is None:
                self.bucket = TokenBucket(float(msg.bandwidth_mbps))
            else:
                self.bucket.set_rate(float(msg.bandwidth_mbps))
        self.device = dataclasses.replace(self.device, **changes)
        log.info("node %s: emulation now %s", self.name, changes)
        if "compute_factor" in changes and self._host_profile is not None:
            task = asyncio.create_task(self._publish_profile(), name="profile-republish")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- assignment and slices -------------------------------------------------------------------

    def _start_load(self, assign: Any) -> None:
        if (assign.fleet, assign.node_id) != (self.fleet, self.name):
            raise DecodeError(f"assignment for {assign.fleet}/{assign.node_id} arrived at {self.fleet}/{self.name}")
        if self.planner_key is not None:  # before anything is fetched or loaded
            signing.verify_assign(assign, self.planner_key)
        if not assign.slice_hash:
            raise RuntimeLoadError(f"assignment of epoch {assign.epoch} names no slice")
        if assign.epoch < self.epoch or (assign.epoch == self.epoch and assign.epoch in self.slots):
            log.info("node %s: ignoring assignment of old epoch %s (at %s)", self.name, assign.epoch, self.epoch)
            return
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self._load_task = asyncio.create_task(self._load(assign), name=f"load-e{assign.epoch}")

    async def _load(self, assign: Any) -> None:
        assert self.bus is not None
        log.info("node %s: assigned epoch %d stage %d/%d layers %d..%d (slice %s, %d bytes)", self.name, assign.epoch,
                 assign.stage, assign.n_stages, assign.first_layer, assign.last_layer, assign.slice_hash[:12],
                 assign.slice_size)
        sdnotify.notify(f"STATUS=loading epoch {assign.epoch} stage {assign.stage}")
        with contextlib.suppress(FleetpipeError):
            self.lifecycle.handle("assign")
        role, data = None, b""
        try:
            if assign.split is not None:
                role, runtime, kind, size = await self._load_split(assign)
            else:
                data = await self._fetch_slice(assign.slice_hash, assign.slice_size)
                # Refused before any session; parsing a big slice runs off the loop, as the load does.
                kind, size = await asyncio.to_thread(checked_kind, data, self.slice_limits), len(data)
                runtime = create_runtime(kind, threads=self.config.threads)
                await asyncio.to_thread(runtime.load, data)
            executor = InferenceExecutor(runtime, compute_factor=self.device.compute_factor)
        except Exception as exc:  # whatever the slice or the assignment holds, the old slot keeps serving
            with contextlib.suppress(FleetpipeError):
                self.lifecycle.handle("load_failed")
            why = f"no chunks within {SLICE_FETCH_TIMEOUT_S:.0f} s" if isinstance(exc, TimeoutError) else exc
            await self._report(RuntimeLoadError(f"cannot load slice {assign.slice_hash}: {why}"), None)
            return
        topic = topics.stage_in_filter(self.fleet, assign.epoch, assign.stage)
        group = topics.shared(topics.stage_group(self.fleet, assign.epoch, assign.stage), topic)
        extra: tuple[str, ...] = ()
        if role is not None and role.lead:
            extra = (topics.PART_GATHER.filter(fleet=self.fleet, epoch=assign.epoch, stage=assign.stage,
                                               lead=self.name),)
        elif role is not None:  # a part node never takes the stage's frames, only part requests from its lead
            group, extra = "", (topics.part_in(self.fleet, assign.epoch, assign.stage, self.name, assign.split.lead),)
        # Two-phase switch: the committed epoch keeps serving until the plan of this one arrives (``_on_plan``);
        # an older epoch that was never committed (abandoned by the planner) is dropped now.
        for epoch in [e for e in self.slots if self.committed < e < assign.epoch]:
            self._drop_slot(epoch)
        now = time.monotonic()
        for epoch, old in self.slots.items():
            if epoch < self.committed and old.retired_at is None:
                old.retired_at = now
        slot = _Slot(assign, runtime, executor, group, exit_cache=_exit_cache(assign.exit_cache), split=role,
                     extra_topics=extra)
        self.slots[assign.epoch] = slot
        self.epoch = assign.epoch
        # Timings of the previous slice say nothing about this one (the planner compares them to the plan).
        self.stats.compute_ms.clear()
        self.stats.idle_ms.clear()
        self.stats.msg_ms.clear()
        self.stats.lead_units.clear()
        for t in slot.topics:
            await self.bus.subscribe(t, qos=1)
        with contextlib.suppress(FleetpipeError):
            self.lifecycle.handle("loaded")
        await self._publish_health()  # tells the planner this epoch is loaded
        log.info("node %s: epoch %d stage %d layers %d..%d loaded (%s, %d bytes)", self.name, assign.epoch,
                 assign.stage, assign.first_layer, assign.last_layer, kind, size)
        sdnotify.notify(f"STATUS=serving epoch {assign.epoch} stage {assign.stage} "
                        f"layers {assign.first_layer}..{assign.last_layer}")
        if role is not None:
            log.info("node %s: split stage %d as %s (%d units)", self.name, assign.stage,
                     "lead" if role.lead else f"part of units {sorted(role.part_index)}", len(assign.split.units))
        elif kind == "onnx" and self.config.report_profile and assign.slice_hash not in self._profiled:
            self._profiled.add(assign.slice_hash)
            task = asyncio.create_task(self._report_profile(assign, data, executor), name=f"profile-e{assign.epoch}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _report_profile(self, assign: Any, data: bytes, executor: InferenceExecutor) -> None:
        """Time the loaded slice layer by layer on the inference thread and publish it (retained) for the planner."""
        assert self.bus is not None
        try:
            ms = await executor.call(slice_layer_ms, data, self.config.threads)
        except Exception as exc:  # a profile is a hint for the planner: never a reason to stop serving
            log.warning("node %s: cannot profile slice %s: %s", self.name, assign.slice_hash, exc)
            return
        if len(ms) != assign.last_layer - assign.first_layer + 1:  # grouped differently: layers would not line up
            log.info("node %s: slice %s profiles as %d layers, not %d; not reported", self.name, assign.slice_hash,
                     len(ms), assign.last_layer - assign.first_layer + 1)
            return
        self._host_profile = (assign, ms)
        await self._publish_profile()

    async def _publish_profile(self) -> None:
        """The last slice's layer times as this device runs them: an emulated device's are its host times
        stretched by its current factor (republished when a scripted slowdown changes it)."""
        if self._host_profile is None or self.bus is None:
            return
        assign, ms = self._host_profile
        factor = max(float(self.device.compute_factor), 1.0)
        msg = wire.NodeProfile(fleet=self.fleet, node_id=self.name, ts=time.time(), model_id=assign.model_id,
                               first_layer=assign.first_layer, last_layer=assign.last_layer,
                               layer_ms=tuple(t * factor for t in ms), threads=self.config.threads)
        with contextlib.suppress(FleetpipeError):
            await self.bus.publish(topics.node_profile(self.fleet, self.name), wire.encode(msg), qos=1, retain=True)
        log.info("node %s: layers %d..%d profiled: %.2f ms", self.name, assign.first_layer, assign.last_layer,
                 sum(msg.layer_ms))

    async def _unassign(self) -> None:
        # Left out of the next plan: the slots retire when that plan commits (``_on_plan``), not now; an
        # empty message from anyone else on an open broker must not take the node out.
        log.info("node %s: assignment cleared; serving epochs %s until the next plan commits", self.name,
                 sorted(self.slots))
        sdnotify.notify("STATUS=unassigned: serving until the next plan commits")
        with contextlib.suppress(FleetpipeError):
            self.lifecycle.handle("unassign")

    async def _fetch_slice(self, slice_hash: str, size: int) -> bytes:
        """Slice bytes from the local cache or from retained chunks on MQTT, verified by hash."""
        assert self.bus is not None
        if size > self.slice_limits.max_bytes:
            raise UntrustedSlice(f"slice {slice_hash} of {size} bytes exceeds the node's limit of "
                                 f"{self.slice_limits.max_bytes}")
        path = self.cache_dir / f"{slice_hash}.bin"
        if path.exists():
            data = path.read_bytes()
            if content_hash(data) == slice_hash:
                return data
            path.unlink()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._chunk_waiters[slice_hash] = future
        self._chunk_limits[slice_hash] = size
        filt = topics.SLICE_CHUNK.filter(fleet=self.fleet, slice_hash=slice_hash)
        await self.bus.subscribe(filt, qos=1)
        try:
            data = await wait_for(future, SLICE_FETCH_TIMEOUT_S)
        finally:
            self._chunk_waiters.pop(slice_hash, None)
            self._chunks.pop(slice_hash, None)
            self._chunk_limits.pop(slice_hash, None)
            with contextlib.suppress(FleetpipeError):
                await self.bus.unsubscribe(filt)
        if len(data) != size:
            raise RuntimeLoadError(f"slice {slice_hash}: got {len(data)} bytes, assignment says {size}")
        with contextlib.suppress(OSError):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return data

    def _on_chunk(self, chunk: Any) -> None:
        future = self._chunk_waiters.get(chunk.slice_hash)
        if future is None or future.done():
            return
        parts = self._chunks.setdefault(chunk.slice_hash, {})
        parts[chunk.index] = bytes(chunk.data)
        limit = self._chunk_limits.get(chunk.slice_hash, 0)
        if sum(map(len, parts.values())) > limit:  # memory stays bounded by the assignment's size
            future.set_exception(RuntimeLoadError(f"slice {chunk.slice_hash}: chunks exceed its {limit} bytes"))
            return
        # Chunks may disagree on ``count``: complete only when exactly indices 0..count-1 are here.
        if len(parts) == chunk.count and all(i in parts for i in range(chunk.count)):
            data = b"".join(parts[i] for i in range(chunk.count))
            if content_hash(data) != chunk.slice_hash:
                future.set_exception(RuntimeLoadError(f"slice {chunk.slice_hash}: hash mismatch"))
            else:
                future.set_result(data)

    # -- the frame path --------------------------------------------------------------------------

    # Three tasks per node, so a frame's codec work overlaps the previous frame's compute (COACH: no bubble
    # between a stage's compute and its own encode/decode): ``_preparer`` checks and decodes frame n+1 and
    # ``_finisher`` encodes frame n-1 while ``_worker`` computes frame n on the inference thread. The hand-offs
    # hold one frame each, so order is kept and at most three frames are in the node beyond the inbox.
    _in_hand = 0  # frames taken from the inbox and not yet queued for sending (or dropped with an error)

    async def _preparer(self) -> None:
        while True:
            frame, recv_ts = await self._inbox.get()
            self._in_hand += 1
            if isinstance(frame, wire.PartRequest):  # a part node of a split stage: answer it here, in order
                try:
                    await self._process_part(frame, recv_ts)
                finally:
                    self._in_hand -= 1
                continue
            try:
                slot, inputs = self._prepare(frame)
            except (FleetpipeError, ValueError, TypeError) as exc:
                self._in_hand -= 1
                await self._report(exc, frame.frame_id)
                continue
            await self._ready.put((frame, recv_ts, slot, inputs))
            await asyncio.sleep(0)  # let the worker hand this frame to the inference thread before the next decode

    async def _worker(self) -> None:
        while True:
            idle_from = time.monotonic()
            frame, recv_ts, slot, inputs = await self._ready.get()
            self.stats.idle_ms.append((time.monotonic() - idle_from) * 1000)
            try:
                if slot.split is not None:  # the lead of a split stage: scatter, compute its part, gather
                    outputs, compute_ms = await self._run_split(slot, frame.frame_id, inputs)
                else:
                    outputs, compute_ms = await slot.executor.run(inputs)
            except (FleetpipeError, ValueError, TypeError) as exc:
                self._in_hand -= 1
                await self._report(exc, frame.frame_id)
            else:
                self.stats.compute_ms.append(compute_ms)
                await self._computed.put((frame, recv_ts, slot, outputs, compute_ms))
            finally:
                self._retire_old_slots()

    async def _finisher(self) -> None:
        while True:
            frame, recv_ts, slot, outputs, compute_ms = await self._computed.get()
            try:
                await self._finish(frame, recv_ts, slot, outputs, compute_ms)
            except (FleetpipeError, ValueError, TypeError) as exc:
                await self._report(exc, frame.frame_id)
            finally:
                self._in_hand -= 1

    def _prepare(self, frame: Any) -> tuple[_Slot, dict[str, np.ndarray]]:
        """Check a frame against the slot of its epoch and decode its tensors (before any compute)."""
        slot = self.slots.get(frame.epoch)
        if slot is None:
            raise StaleEpoch(f"frame {frame.frame_id} is for epoch {frame.epoch}; node holds {sorted(self.slots)}")
        assign = slot.assign
        if frame.stage != assign.stage:
            raise StageError(f"frame {frame.frame_id} is for stage {frame.stage}; node holds stage {assign.stage}")
        # Checked before any compute: a forged frame costs a decode, never an inference.
        if frame.fleet != self.fleet:
            raise DecodeError(f"frame {frame.frame_id} is for fleet {frame.fleet!r}, not {self.fleet!r}")
        expected = topics.result(self.fleet, frame.client_id)
        if frame.reply_to != expected:
            raise DecodeError(f"frame {frame.frame_id}: reply_to {frame.reply_to!r} is not {expected!r}")
        names = sorted(name for name, _ in frame.tensors)
        if assign.input_names and names != sorted(assign.input_names):
            raise InferenceError(f"frame {frame.frame_id} has tensors {names}; stage {assign.stage} takes "
                                 f"{sorted(assign.input_names)}")
        if slot.split is not None and not slot.split.lead:
            raise StageError(f"frame {frame.frame_id}: node {self.name} is a part node of stage {assign.stage}")
        if slot.split is None:
            _check_headers(frame, slot.runtime)
        return slot, {name: codec.decode_tensor(t) for name, t in frame.tensors}

    async def _finish(self, frame: Any, recv_ts: float, slot: _Slot, outputs: dict[str, Any],
                      compute_ms: float) -> None:
        """Early exit, bit-width, encode and queue a computed frame for the next stage (or its client)."""
        assign = slot.assign
        last = assign.next_stage is None
        separable = None  # COACH task separability S of this frame, when the stage has an exit cache
        if not last and slot.exit_cache is not None:
            separable = await self._early_exit(slot, frame, outputs, recv_ts, compute_ms)
            if separable is True:
                return
        if last:
            bits = 32
        elif self.config.adaptive_bits:
            bits = self._choose_bits(slot, outputs, compute_ms, separable)
        else:
            bits = assign.bits
        tensors = tuple((name, codec.encode_tensor(_as_array(outputs[name]), bits=_bits_for(outputs[name], bits)))
                        for name in assign.output_names)
        hops = (*frame.hops, self._hop(assign.stage, recv_ts, compute_ms))
        if last:  # reply_to was checked against the client's result topic before the compute
            await self._reply(frame, tensors, hops)
        else:
            nxt = wire.Activation(fleet=self.fleet, epoch=frame.epoch, frame_id=frame.frame_id,
                                  client_id=frame.client_id, stage=assign.next_stage, tensors=tensors,
                                  reply_to=frame.reply_to, sent_ts=time.time(), hops=hops)
            topic = topics.stage_in(self.fleet, frame.epoch, assign.next_stage, frame.client_id)
            await self._outbox.put((topic, wire.encode(nxt), slot.adaptive))
        self.stats.frames_out += 1

    async def _early_exit(self, slot: _Slot, frame: Any, outputs: dict[str, Any], recv_ts: float,
                          compute_ms: float) -> bool | float | None:
        """COACH: answer a clearly separable frame here with the top label (Eq. 9 > S_ext).

        Returns True if it exited, else the frame's separability S (for bit relief), or None.

        Only single-sample frames of a single crossing tensor exit (a batch exits whole or not at all, so
        batches always run to the end). The label's centre follows the stream as a running mean (Eq. 7).
        """
        names = slot.assign.output_names
        act = _as_array(outputs[names[0]]) if len(names) == 1 else None
        if act is None or act.ndim < 1 or act.shape[0] != 1:
            return None
        cache = slot.exit_cache
        try:
            feature = cache.feature(act)[0]
            leave, label, s = cache.decide(feature)
        except ValueError:  # the slice's feature does not match the calibrated cache: never exit
            slot.exit_cache = None
            return None
        if not leave or label is None:
            return float(s)
        cache.update(feature, label)
        label_t = codec.encode_tensor(np.array([label], dtype=np.int64), bits=32)
        hops = (*frame.hops, self._hop(slot.assign.stage, recv_ts, compute_ms))
        await self._reply(frame, (("label", label_t),), hops, early_exit=True, label=int(label))
        self.stats.frames_out += 1
        self.stats.early_exits += 1
        return True

    def _hop(self, stage: int, recv_ts: float, compute_ms: float) -> wire.Hop:
        return wire.Hop(stage=stage, node_id=self.name, recv_ts=recv_ts, compute_ms=round(compute_ms, 3),
                        send_ts=time.time())

    async def _reply(self, frame: Any, tensors: Any, hops: Any, **extra: Any) -> None:
        """Queue a frame's Result for its client's result topic (``reply_to``, checked on arrival)."""
        result = wire.Result(fleet=self.fleet, frame_id=frame.frame_id, client_id=frame.client_id, epoch=frame.epoch,
                             tensors=tensors, hops=hops, ts=time.time(), **extra)
        await self._outbox.put((frame.reply_to, wire.encode(result), None))

    def _choose_bits(self, slot: _Slot, outputs: dict[str, Any], compute_ms: float,
                     separable: bool | float | None = None) -> int:
        """COACH Eq. 11 at the sending node: the highest bits whose transfer does not become the bubble.

        A clearly separable frame (S from the exit cache) may go below the assigned bits (bit relief), but never
        below the cut's accuracy floor the assignment carries (``min_bits``).
        """
        from fleetpipe.node.adapt import AdaptiveBits, BandwidthEstimator

        assign = slot.assign
        if slot.adaptive is None:
            nbytes32 = sum(int(np.asarray(outputs[n]).size) * 4 for n in assign.output_names)
            # A paced (emulated) link is measured exactly even for small messages; a real one is not.
            estimator = BandwidthEstimator(min_bytes=256 if self.bucket is not None else 2048)
            slot.adaptive = AdaptiveBits(min_bits=assign.bits, nbytes_at_32=nbytes32, initial_bits=assign.bits,
                                         estimator=estimator)
        plan = self.plans.get(assign.epoch)
        next_ms = compute_ms
        target = None
        if plan is not None and assign.next_stage is not None and assign.next_stage < len(plan.stages):
            next_ms = float(plan.stages[assign.next_stage].predicted_ms) or compute_ms
            target = float(plan.bottleneck_ms) or None
        own = _mean(self.stats.compute_ms) or compute_ms
        floor = None
        if isinstance(separable, float) and slot.exit_cache is not None:
            floor = slot.exit_cache.relieved_min_bits(assign.bits, separable)
            if assign.min_bits is not None:
                floor = max(floor, int(assign.min_bits))
        return int(slot.adaptive.decide(own, next_ms, min_bits=floor, target_ms=target).bits)

    async def _sender(self) -> None:
        assert self.bus is not None
        while True:
            topic, payload, adaptive = await self._outbox.get()
            start = time.monotonic()
            if self.bucket is not None:
                await self.bucket.consume(len(payload))
                paced = time.monotonic()
                # Emulated link: its occupancy is the pacing, from when it was free (or the message ready).
                busy = paced - max(start, self._last_send_end)
                self._last_send_end = paced
            try:
                await self.bus.publish(topic, payload, qos=1)
            except FleetpipeError as exc:
                await self._report(exc, None)
            end = time.monotonic()
            if self.bucket is None:
                busy = end - start  # a real link: until the broker has the whole message (PUBACK)
            self.stats.transfer_ms.append((end - start) * 1000)
            self.stats.bytes_out += len(payload)
            if adaptive is not None:
                adaptive.observe_transfer(len(payload), busy)

    def _retire_old_slots(self) -> None:
        now = time.monotonic()
        for epoch, slot in list(self.slots.items()):
            if slot.retired_at is not None and now - slot.retired_at > EPOCH_GRACE_S:
                self._drop_slot(epoch)

    def _drop_slot(self, epoch: int) -> None:
        slot = self.slots.pop(epoch)
        slot.executor.shutdown()
        for topic in slot.topics if self.bus is not None else ():
            task = asyncio.create_task(self._quiet_unsubscribe(topic))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _quiet_unsubscribe(self, topic: str) -> None:
        with contextlib.suppress(FleetpipeError):
            assert self.bus is not None
            await self.bus.unsubscribe(topic)

    # -- health and errors -----------------------------------------------------------------------

    async def _health_loop(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(timing.HEALTH_INTERVAL_S)
            self._retire_old_slots()
            await self._publish_health()

    async def _publish_health(self) -> None:
        assert self.bus is not None
        health = self._health()
        self._health_hist.append(health)
        with contextlib.suppress(FleetpipeError):
            await self.bus.publish(topics.node_health(self.fleet, self.name), wire.encode(health), qos=0)
            values = {**metrics_payload(self._health_hist, window_s=5.0), "bytes_out": float(self.stats.bytes_out),
                      "early_exits_total": float(self.stats.early_exits)}
            metrics = wire.Metrics(fleet=self.fleet, node_id=self.name, ts=health.ts, values=values)
            await self.bus.publish(topics.node_metrics(self.fleet, self.name), wire.encode(metrics), qos=0)
        sdnotify.notify("WATCHDOG=1")

    async def _report(self, exc: BaseException, frame_id: str | None) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        self._err_times.append(now)
        # Peer-chosen text: no control characters into the log or the report (no forged log lines).
        detail = "".join(c if c.isprintable() else "?" for c in str(exc)[:500])
        if len(self._err_times) < 20 or now - self._err_times[0] > 1.0:  # rate-limited log
            log.warning("node %s: %s: %s", self.name, type(exc).__name__, detail)
        if self.bus is None:
            return
        with contextlib.suppress(FleetpipeError, ValueError, TypeError):
            report = wire.ErrorReport(fleet=self.fleet, source=self.name, kind=type(exc).__name__,
                                      detail=detail, frame_id=frame_id, ts=time.time())
            await self.bus.publish(topics.error(self.fleet), wire.encode(report), qos=1)

    def _birth(self) -> Any:
        cap = self._capability
        return wire.NodeBirth(fleet=self.fleet, node_id=self.name, seq=self.seq, arch=cap.get("arch", "?"),
                              cores=int(cap.get("cores", 1)),
                              mem_bytes=int(self.device.mem_bytes or cap.get("mem_bytes", 0)),
                              runtimes=tuple(available_runtimes()), providers=tuple(available_providers()),
                              device_class=self.device.name, speed=float(self._speed),
                              emulate_factor=float(self.device.compute_factor),
                              bandwidth_mbps=self.device.bandwidth_mbps, profile=None, ts=time.time())

    def _death(self, reason: str) -> Any:
        return wire.NodeDeath(fleet=self.fleet, node_id=self.name, seq=self.seq, reason=reason, ts=time.time())

    def _health(self) -> Any:
        slot = self.slots.get(self.epoch)
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return wire.NodeHealth(
            fleet=self.fleet, node_id=self.name, seq=self.seq, ts=time.time(), load=load1,
            mem_used_bytes=_rss_bytes(), queue_depth=self._inbox.qsize(), frames_in=self.stats.frames_in,
            frames_out=self.stats.frames_out, errors=self.stats.errors,
            stage=slot.assign.stage if slot else None, epoch=max(self.epoch, 0),
            compute_ms_avg=_mean(self.stats.compute_ms), transfer_ms_avg=_mean(self.stats.transfer_ms),
            idle_ms_avg=_mean(self.stats.idle_ms), bits=_bits_in_use(slot),
            bandwidth_mbps_est=_bandwidth_estimate(slot, self.device.bandwidth_mbps),
            msg_ms_est=round(float(np.median(self.stats.msg_ms)), 3) if len(self.stats.msg_ms) >= 5 else None)


def _check_headers(frame: Any, runtime: Any) -> None:
    """Every tensor's declared dtype and shape against the slice's input specs, before anything is decoded:
    a forged header costs a comparison, never a 16x-expanded allocation (the wire bounds the total already)."""
    try:
        specs = {spec.name: spec for spec in runtime.input_specs()}
    except Exception:  # a runtime that cannot say: the runtime's own check after decoding still applies
        return
    for name, tensor in frame.tensors:
        spec = specs.get(name)
        problem = spec.header_mismatch(tensor.dtype, tensor.shape) if spec is not None else None
        if problem:
            raise InferenceError(f"frame {frame.frame_id}: input tensor {name!r} has {problem}")


def tune_malloc() -> bool:
    """Keep multi-MB receive buffers off mmap (glibc): avoids the page-fault cliff on large frames.

    paho reads each large message into a fresh buffer; with glibc's default 128 KB mmap threshold
    every frame maps and unmaps fresh pages (bench/transport.py measures the difference).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 256 << 20))


def _bits_in_use(slot: _Slot | None) -> int:
    if slot is None:
        return 32
    if slot.adaptive is not None:
        return int(slot.adaptive.bits)
    return 32 if slot.assign.next_stage is None else int(slot.assign.bits)


def _bandwidth_estimate(slot: _Slot | None, nominal: float | None) -> float | None:
    if slot is not None and slot.adaptive is not None and slot.adaptive.estimator.mbps:
        return round(float(slot.adaptive.estimator.mbps), 3)
    return nominal


def _describe(msg: Any) -> str:
    """Type and addressee of a message that arrived where it should not (for error reports)."""
    who = "/".join(str(getattr(msg, a)) for a in ("fleet", "node_id") if hasattr(msg, a))
    return f"{type(msg).__name__}({who})" if who else type(msg).__name__


def _mean(values: deque[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _exit_cache(doc: Any) -> Any:
    """The assignment's exit cache as a live SemanticCache (centres follow the stream), or None."""
    if doc is None:
        return None
    from fleetpipe.context import SemanticCache

    centres = np.asarray(doc.centres, dtype=np.float64)
    cache = SemanticCache(centres.shape[0], centres.shape[1], threshold=doc.threshold, max_count=EXIT_CACHE_MEMORY)
    cache.centres[:] = centres
    cache.counts[:] = np.asarray(doc.counts, dtype=np.int64)
    return cache
