"""The planner service: the async shell around the pure state, control and partition functions.

Theory of operation. The service follows every node's retained state (birth/death) and health,
folds them into ``FleetState`` (``state.apply``), and asks ``control.decide`` what to do after each
event and tick. A ``Replan`` builds a ``Problem`` from the model graph and the alive nodes' measured
capabilities, solves it, slices the model, publishes the slices (retained chunks, content
addressed), then each node's retained assignment under a new epoch. It publishes the retained plan
(the signal clients switch on) only when every assigned node reports in its health that it has
loaded the new epoch, so a client never sends a frame to a stage nobody has subscribed yet. Nodes
left out of the plan get their retained assignment cleared.

Two-phase epochs. Publishing the plan is the commit: nodes keep serving the previous epoch until
they see the new plan, and only then start the old epoch's grace timer. When an assigned node dies
(or stops answering) while loading, the epoch is abandoned whole: the previous epoch's assignments
are restored (nodes that joined with it are cleared) and the plan is not published, so the fleet
runs on as before, and the control step re-plans from the live set if it differs from the plan.

The planner has a birth and a last-will death (``PlannerState`` on ``node/planner/state``, with a
session id fresh per process) and stamps that id on its plans. Nodes and clients follow only the
plan of the planner whose birth they see. On start the retained plan is resumed (epoch count kept,
running pipeline left alone) only if the previous planner (the one on the state topic) published
it, and only after it is checked against the live fleet: a member that is gone triggers a re-plan.
A plan or assignment it did not publish (a forgery on an open broker, junk) is overwritten with its
own. When no plan fits the alive nodes, it publishes an *infeasible* plan (no stages, naming what is
short) so clients fail their frames with ``FleetUnavailable`` instead of re-sending them to nodes
that are gone; the next membership change re-plans.

With ``intra="latency"`` (``"pipeline"``: single-device stages only) a re-plan solves
``fleetpipe.planner.intra.solve_intra`` instead (stages may be replicated or split across a device
group, bytes costed as sent at the plan's bit-width) and publishes split assignments
(``fleetpipe.planner.split_deploy``); a split stage's plan entry lists its lead first.
Intra plans are not fine-tuned at run time (ScalPipe applies to pipeline plans): they are re-solved
when membership changes, and when the leads of split stages measure that a part message costs more
than the plan assumed (``NodeHealth.msg_ms_est``; the assumed cost starts at ``MSG_MS_START`` and only
goes up), so a split that does not pay on the real fleet is dropped; and splits are used only when
they promise ``SPLIT_MIN_GAIN`` (10 %) over the best plan without them (the model's error margin).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe import signing, slices, timing, topics, wire
from fleetpipe._aio import Stopped, in_daemon_thread, unless_stopped
from fleetpipe.client import DEFAULT_WINDOW
from fleetpipe.config import PlannerConfig
from fleetpipe.deploy import sdnotify
from fleetpipe.errors import ConfigError, DecodeError, FleetpipeError, InfeasiblePlan
from fleetpipe.metrics import FleetView, pipeline_payload
from fleetpipe.planner import control, state
from fleetpipe.ratelog import RateLimitedLog
from fleetpipe.transport import Message, Will
from fleetpipe.transport.mqtt import MqttBus

__all__ = ["EXIT_BROKER", "EXIT_CONFIG", "EXIT_OK", "ModelInfo", "PlannerService", "build_problem", "load_model_info"]

log = logging.getLogger("fleetpipe.planner")

# Process exit codes (the node's are the same numbers): 0 a clean stop (SIGTERM/SIGINT, in any state),
# 2 bad configuration, 3 the broker refused us (bad credentials) or is unusable.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_BROKER = 3
LOAD_TIMEOUT_S = 60.0
# Intra plans: first guess of one message's fixed cost (ms); re-plan when leads measure this much more.
MSG_MS_START = 1.0
RECALIBRATE_RATIO = 1.5
# Intra plans: split stages only when they promise at least this relative latency gain over no splits.
SPLIT_MIN_GAIN = 0.1
DEFAULT_BANDWIDTH_MBPS = 1000.0
EXIT_BAD_MODEL = 2  # the model cannot be loaded, pinned or run here (said in one log line)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model as the planner needs it: proto (TFLite: bytes), layer graph and host per-layer times."""

    model_id: str
    proto: Any
    graph: Any
    host_ms: np.ndarray
    host_speed: float
    # fleetpipe.models.source.LoadedModel: slices, runs and verifies the model whatever its format
    loaded: Any = None

    @property
    def kind(self) -> str:
        """``"onnx"`` or ``"tflite"``."""
        return "onnx" if self.loaded is None else str(self.loaded.kind)

    def slice(self, first: int, last: int) -> bytes:
        """The standalone slice file of layers ``first..last`` (0-based, inclusive), in the model's format."""
        if self.loaded is not None:
            return bytes(self.loaded.slice(first, last))
        from fleetpipe.models.slicing import slice_bytes

        return bytes(slice_bytes(self.proto, self.graph, first, last))


def load_model_info(path: str, input_shape: Any = None, profile: str | None = None) -> ModelInfo:
    """Load the model (``.onnx``, ``.tflite`` or ``zoo:NAME``), group its layers and profile them on this host.

    ``input_shape``: ``{name: shape}`` or ``NAME=D,D,...`` strings (``fleetpipe.models.shapes``). The
    model goes through ``fleetpipe.models.source.open_model`` (dynamic batch as 1, constants folded,
    checked runnable here); a TFLite model is profiled with LiteRT. With ``profile`` (a JSON file),
    per-layer host times and the host speed are read from it when it holds this model's layers, else
    measured and written there: plans made from the same file are comparable run to run (a 2-core
    host's profile varies by up to 2x under load).
    """
    from fleetpipe.models.profile import profile_layers, profile_tflite_layers
    from fleetpipe.models.shapes import parse_input_shapes
    from fleetpipe.models.source import open_model
    from fleetpipe.node.profile import measure_speed

    shapes = dict(input_shape) if isinstance(input_shape, Mapping) else parse_input_shapes(input_shape)
    loaded = open_model(path, shapes or None)
    proto, graph = loaded.model, loaded.graph
    if loaded.kind == "tflite":
        model_id = slices.content_hash(bytes(proto))[:12]
    else:
        model_id = slices.content_hash(loaded.reference.SerializeToString())[:12]
    cached = _read_profile(profile, model_id, len(graph.layers)) if profile else None
    if cached is not None:
        return ModelInfo(model_id, proto, graph, cached[0], cached[1], loaded)
    if loaded.kind == "tflite":
        prof = profile_tflite_layers(proto, graph, runs=5)
    else:
        prof = profile_layers(proto, graph, runs=5)
    host_ms = np.asarray(prof.per_layer_ms, dtype=np.float64)
    # By CPU time, like an emulated node's own figure: nodes starting up beside the planner (a test fleet, the
    # demo) would otherwise slow the host's figure, and with it every emulated device's predicted time.
    info = ModelInfo(model_id, proto, graph, host_ms, measure_speed(0.2, cpu_time=True), loaded)
    if profile:
        import json

        with contextlib.suppress(OSError):
            Path(profile).write_text(json.dumps({"model_id": model_id, "host_ms": host_ms.tolist(),
                                                 "host_speed": info.host_speed}))
    return info


def _read_profile(path: str, model_id: str, n_layers: int) -> tuple[np.ndarray, float] | None:
    """``(host_ms, host_speed)`` from a profile file written for this model, or None."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
        host_ms = np.asarray(doc["host_ms"], dtype=np.float64)
        speed = float(doc["host_speed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("model_id") != model_id or host_ms.shape != (n_layers,) or not np.all(host_ms >= 0):
        return None
    return host_ms, speed


def build_problem(model: ModelInfo, nodes: dict[str, Any], bits: int, min_bits: Any = None,
                  compute: np.ndarray | None = None) -> Any:
    """A planner ``Problem`` for the alive nodes: per-node layer times ``compute[L, D]`` (columns in the
    order of ``nodes``; default: scaled from the host profile, see ``fleetpipe.planner.reported``).

    Activations cross at ``bits`` (or, per cut, at the calibrated ``min_bits`` when given); integer
    tensors crossing a cut are charged at full size.
    """
    from fleetpipe.planner.problem import Problem

    names = tuple(nodes)
    graph = model.graph
    if compute is None:
        compute = np.empty((len(graph.layers), len(names)))
        for d, name in enumerate(names):
            compute[:, d] = model.host_ms * node_slowdown(nodes[name].birth, model.host_speed)
    elif compute.shape != (len(graph.layers), len(names)):
        raise ValueError(f"compute is {compute.shape}, want {(len(graph.layers), len(names))}")
    out_bytes = np.array([_wire_bytes(graph, layer) for layer in graph.layers])
    cut_bits = np.full(len(graph.layers), bits, dtype=np.int64) if min_bits is None else np.asarray(min_bits)
    bw = np.array([[min(_bw(nodes[a].birth), _bw(nodes[b].birth)) for b in names] for a in names])
    mem = np.array([float(nodes[n].birth.mem_bytes or 1 << 40) for n in names])
    # The client's input and result cross each node's own link like any cut (fleetpipe#23 item 2), and a
    # client keeps DEFAULT_WINDOW frames in flight, so a plan's latency bounds its rate too.
    client = np.array([_bw(nodes[n].birth) for n in names])
    return Problem(layer_names=tuple(layer.name for layer in graph.layers), compute_ms=compute,
                   out_bytes=out_bytes, param_bytes=np.array([layer.param_bytes for layer in graph.layers]),
                   input_bytes=graph.input_bytes, device_names=names, mem_bytes=mem, bw_mbps=bw,
                   device_types=tuple(nodes[n].birth.device_class for n in names), name=model.model_id,
                   min_bits=cut_bits, client_mbps=client, window=DEFAULT_WINDOW)


def node_slowdown(birth: Any, host_speed: float) -> float:
    """How much slower than this host a node runs a layer.

    An emulated node on this host runs exactly ``emulate_factor`` times slower by construction; a real
    device's factor comes from the speed figure both sides measured with the same benchmark.
    """
    if birth.emulate_factor and birth.emulate_factor > 1.0:
        return float(birth.emulate_factor)
    if birth.speed and host_speed:
        return max(host_speed / float(birth.speed), 1e-3)
    return 1.0


class PlannerService:
    """``PlannerService(config).run()``: plan the fleet until SIGTERM/SIGINT."""

    def __init__(self, config: PlannerConfig, model: ModelInfo | None = None) -> None:
        self.config = config
        self.fleet = config.fleet
        self.model = model
        self.state = state.FleetState()
        self.policy = control.Policy(debounce_s=timing.REPLAN_DEBOUNCE_S, min_nodes=config.min_nodes,
                                     expect_nodes=config.expect_nodes, deviation=config.replan_threshold,
                                     health_grace_s=2 * timing.HEALTH_INTERVAL_S)
        self.should_exit = asyncio.Event()
        self.bus: MqttBus | None = None
        self._bad = RateLimitedLog(log)
        self._signing_key = signing.load_private_key(config.signing_key) if config.signing_key else None
        self._first_seen: float | None = None
        self._replanning: asyncio.Task[None] | None = None
        # Slices this planner holds retained on the broker (digest -> chunk count), and those the epoch being
        # adopted uses; once that epoch is published every other slice is cleared (the broker stays bounded).
        self._published_slices: dict[str, int] = {}
        self._epoch_slices: set[str] = set()
        self._assigned: set[str] = set()
        self._loaded: dict[str, int] = {}
        self._retained: dict[str, bytes] = {}
        self.view = FleetView(config.fleet)
        # ScalPipe monitoring of the current plan: (problem as measured, PlanResult) and the monitor.
        self.current: tuple[Any, Any] | None = None
        self.monitor: Any = None
        self._monitor_epoch = -1
        self._measured: dict[int, float] = {}
        self._cooldown_until = 0.0
        self._published_epoch = -1
        self.calibration = _load_calibration(config, model)
        # Per-cut bit floors without a calibration (fleetpipe.planner.bitwidth), and the last plan's choice.
        self._finder: Any = None
        self.bit_plan: Any = None
        self.last_result: Any = None
        self._split_info: list[Any] | None = None
        # Intra plans: the fixed cost of one message the plan assumes, raised to what split leads measure.
        self._msg_ms = MSG_MS_START if config.intra_msg_ms is None else config.intra_msg_ms
        # Measured split parts of this model (fleetpipe.planner.split_profile), kept across re-plans.
        self._part_factors: dict[tuple[int, int, str, int], tuple[float, ...]] = {}
        self._msg_est: dict[str, float] = {}
        # Sparkplug primary host: this process's session id, stamped on its plans, birth and death.
        self.planner_id = uuid.uuid4().hex[:16]
        self._seq = 0
        # The planner that held the state topic before us (the one whose retained plan we may resume), if any.
        self._previous_planner: str | None = None
        # The committed epoch's assignments (topic -> payload), restored when a newer epoch is abandoned.
        self._committed: dict[str, bytes] = {}
        self._restored_at: dict[str, float] = {}
        # Galaxy+ fast restore: per node of the current plan, the plan without it (problem, result), solved in the
        # background after each plan, so a node's death re-plans without solving on the critical path.
        self._fallbacks: dict[str, tuple[Any, Any]] = {}
        self._phases: dict[str, float] = {}  # re-plan phase -> monotonic time it ended ("start": when it began)
        self._short_since: float | None = None  # since when the alive nodes cannot run the active plan
        # The last cost matrix (reports version, node names, compute_ms): a re-plan for a subset of those nodes
        # (a death) takes its columns instead of re-fitting the estimator (seconds on a Pi-class host).
        self._costs_version = 0
        self._costs_changed_at = 0.0
        self._cost_refresh: asyncio.Task[Any] | None = None
        self._cost_cache: tuple[int, tuple[str, ...], np.ndarray] | None = None
        self._fallback_task: asyncio.Task[None] | None = None
        # Per-layer times the nodes measured on their slices (wire.NodeProfile); set once the model is loaded.
        self.costs: Any = None if model is None else self._reported_costs(model)

    @property
    def min_bits(self) -> Any:
        """Per-cut calibrated bit floor for the planner's problem, or None (uncalibrated)."""
        return None if self.calibration is None else self.calibration.min_bits_array()

    def run(self) -> int:
        """Run until told to exit; returns a process exit code."""
        try:
            return asyncio.run(self.serve())
        except KeyboardInterrupt:
            return 0

    async def serve(self) -> int:
        """Connect, follow the fleet, plan."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.should_exit.set)
        try:
            if self.model is None:
                sdnotify.notify(f"STATUS=loading model {self.config.model}")
                self.model = await unless_stopped(in_daemon_thread(
                    load_model_info, self.config.model, self.config.input_shape, self.config.profile),
                    self.should_exit)
                log.info("planner: model %s with %d layers", self.model.model_id, len(self.model.graph.layers))
                self.calibration = _load_calibration(self.config, self.model)
                self.costs = self._reported_costs(self.model)
            broker = self.config.broker
            sdnotify.notify(f"STATUS=waiting for the MQTT broker at {broker.url}")
            will = Will(topics.planner_state(self.fleet),
                        wire.encode(self._state_msg(False, "connection lost", ts=0.0)), qos=1, retain=True)
            self.bus = MqttBus(broker.url or "", client_id=f"fp-{self.fleet}-planner", username=broker.username,
                               password=broker.password(), tls=broker.tls(), on_connect=self._on_connect, wait=True,
                               will=will)
            await unless_stopped(self.bus.__aenter__(), self.should_exit)
        except Stopped:
            log.info("planner: stopped before it was connected")
            return EXIT_OK
        except FleetpipeError as exc:
            if self.model is None or self.bus is None:
                # The model cannot be read, pinned or run here, or the config is bad: before anything is
                # deployed; the CLI prints the one line and exits EXIT_BAD_MODEL (2).
                raise
            log.error("planner: cannot connect to %s: %s", broker.url, exc)
            return EXIT_BROKER
        log.info("planner: connected to %s (fleet %s)", broker.url, self.fleet)
        sdnotify.notify(f"READY=1\nSTATUS=connected to {broker.url}; waiting for nodes")
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._tick())]
        if self.config.announce:
            tasks.append(asyncio.create_task(self._announce()))
        try:
            await self.should_exit.wait()
        finally:
            for task in [*tasks, self._replanning, self._fallback_task, self._cost_refresh]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*[t for t in tasks if t], return_exceptions=True)
            with contextlib.suppress(FleetpipeError):
                await self.bus.publish(topics.planner_state(self.fleet),
                                       wire.encode(self._state_msg(False, "clean shutdown")), qos=1, retain=True)
            await self.bus.__aexit__(None, None, None)
            log.info("planner: stopped")
        return EXIT_OK

    def _state_msg(self, online: bool, reason: str = "", ts: float | None = None) -> Any:
        return wire.PlannerState(fleet=self.fleet, planner_id=self.planner_id, seq=self._seq, online=online,
                                 ts=time.time() if ts is None else ts, reason=reason)

    async def _announce(self) -> None:
        from fleetpipe.discovery import Announcer
        from fleetpipe.transport import parse_broker_url

        url = self.config.broker.url or ""
        try:
            async with Announcer("planner", "planner", self.fleet, parse_broker_url(url).port, {"broker": url},
                                 interfaces=self.config.interfaces or None):
                await self.should_exit.wait()
        except (FleetpipeError, OSError) as exc:
            log.warning("planner: zeroconf advert failed: %s", exc)

    async def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message and remember it, to restore it if the broker loses it."""
        assert self.bus is not None
        if payload:
            self._retained[topic] = payload
        else:
            self._retained.pop(topic, None)
        await self.bus.publish(topic, payload, qos=1, retain=True)

    async def _on_connect(self, _bus: object) -> None:
        assert self.bus is not None
        # A broker restarted without persistence has lost our retained plan, assignments and slices.
        for topic, payload in list(self._retained.items()):
            await self.bus.publish(topic, payload, qos=1, retain=True)
        # node/+/state holds node/planner/state too: the previous planner's retained state comes before the plan.
        await self.bus.subscribe(topics.NODE_STATE.filter(fleet=self.fleet), qos=1)
        await self.bus.subscribe(topics.NODE_HEALTH.filter(fleet=self.fleet), qos=0)
        await self.bus.subscribe(topics.plan(self.fleet), qos=1)
        await self.bus.subscribe(topics.NODE_PROFILE.filter(fleet=self.fleet), qos=1)
        await self.bus.subscribe(topics.NODE_ASSIGN.filter(fleet=self.fleet), qos=1)
        self._seq += 1
        await self.bus.publish(topics.planner_state(self.fleet), wire.encode(self._state_msg(True)), qos=1,
                               retain=True)

    async def _receive(self) -> None:
        assert self.bus is not None
        async for message in self.bus.messages():
            try:
                self._fold(message)
            except (DecodeError, ValueError) as exc:
                self._bad.warning("planner: bad message on %s: %s", message.topic, exc)
            await self._guard_retained(message)
            self._step()

    async def _guard_retained(self, message: Message) -> None:
        """A retained topic we own (plan, assignments, our state) now holds something we did not publish (junk,
        a forgery, the late will of the planner before us): publish ours again (at most once a second each)."""
        assert self.bus is not None
        topic = message.topic
        if topic == topics.planner_state(self.fleet):
            ours = wire.encode(self._state_msg(True))
            if self._is_our_birth(message.payload):
                return
        elif topic in self._retained:
            ours = self._retained[topic]
            if bytes(message.payload) == ours:
                return
        else:
            return
        now = time.monotonic()
        if now - self._restored_at.get(topic, -1e9) < 1.0:
            return
        self._restored_at[topic] = now
        log.warning("planner: %s holds a message we did not publish; restoring ours", topic)
        with contextlib.suppress(FleetpipeError):
            await self.bus.publish(topic, ours, qos=1, retain=True)

    def _is_our_birth(self, payload: bytes) -> bool:
        try:
            msg = wire.decode(payload)
        except DecodeError:
            return False
        return isinstance(msg, wire.PlannerState) and msg.planner_id == self.planner_id and msg.online

    def _fold(self, message: Message) -> None:
        if not message.payload:
            return
        msg = wire.decode(message.payload)
        # Identity from the topic, which the ACL binds: a birth, death, health or profile naming another node
        # (or fleet) than its topic is refused here, before it touches any state.
        topics.check(message.topic, msg)
        now = time.monotonic()
        self.view.apply(msg)
        if isinstance(msg, wire.PlannerState):
            if msg.fleet == self.fleet and msg.planner_id != self.planner_id and self._previous_planner is None \
                    and self.state.plan is None and self._published_epoch < 0:
                self._previous_planner = msg.planner_id
        elif isinstance(msg, wire.NodeBirth):
            if msg.fleet != self.fleet:
                return
            if self._first_seen is None:
                self._first_seen = now
            self.state = state.apply(self.state, state.Birth(msg, now))
        elif isinstance(msg, wire.NodeDeath):
            self.state = state.apply(self.state, state.Death(msg, now))
        elif isinstance(msg, wire.NodeHealth):
            self.state = state.apply(self.state, state.Health(msg, now))
            if msg.stage is not None:
                self._loaded[msg.node_id] = int(msg.epoch)
                self._observe_stage_time(msg, now)
            if msg.msg_ms_est is not None and self.config.intra and msg.epoch == self._published_epoch:
                self._msg_est[msg.node_id] = float(msg.msg_ms_est)
        elif isinstance(msg, wire.NodeProfile) and msg.fleet == self.fleet and self.costs is not None:
            if self.costs.add(msg):
                self._costs_version += 1
                self._costs_changed_at = now
                log.debug("planner: %s timed layers %d..%d: %.2f ms", msg.node_id, msg.first_layer, msg.last_layer,
                          sum(msg.layer_ms))
        elif isinstance(msg, wire.Plan) and msg.fleet == self.fleet and msg.planner_id != self.planner_id:
            self._foreign_plan(msg, message, now)
        elif isinstance(msg, wire.StageAssign) and message.topic not in self._retained and self.state.plan is not None \
                and msg.epoch == self.state.plan.epoch and msg.node_id in self._assigned and not self._committed_full():
            # A resumed plan's retained assignments: the committed epoch we restore if a newer one is abandoned.
            self._retained[message.topic] = self._committed[message.topic] = bytes(message.payload)

    def _committed_full(self) -> bool:
        return len(self._committed) >= len(self._assigned)

    def _foreign_plan(self, msg: Any, message: Message, now: float) -> None:
        """A plan we did not publish: resume it once at start if the planner before us published it and it is
        active; otherwise supersede it (our next epoch outnumbers it; ``_guard_retained`` restores ours)."""
        resumable = (self.state.plan is None and self._published_epoch < 0 and msg.status == "active"
                     and msg.planner_id == (self._previous_planner or "") and self._same_model(msg))
        if not resumable:
            log.warning("planner: superseding plan epoch %d of planner %r (not ours)", msg.epoch, msg.planner_id)
            self.state = dataclasses.replace(self.state, epoch=max(self.state.epoch, int(msg.epoch)))
            return
        log.info("planner: resuming from retained plan epoch %d (checked against the live fleet first)", msg.epoch)
        mine = dataclasses.replace(msg, planner_id=self.planner_id)
        # planned_membership -1: the control step compares the plan's members with the live fleet before it
        # leaves the pipeline alone, and re-plans if one is gone.
        self.state = state.apply(self.state, state.PlanPublished(mine, -1, now))
        self._assigned = {n for s in msg.stages for n in s.nodes}
        self._published_epoch = int(msg.epoch)
        self._retained[message.topic] = wire.encode(mine)  # re-stamped with our id (same epoch): _guard_retained

    def _same_model(self, plan: Any) -> bool:
        """A retained plan is resumed only if it runs this planner's model (else the next plan replaces it)."""
        if self.model is None or plan.model_id == self.model.model_id:
            return True
        log.info("planner: retained plan epoch %d runs model %s, not %s; planning anew", plan.epoch, plan.model_id,
                 self.model.model_id)
        self.state = dataclasses.replace(self.state, epoch=max(self.state.epoch, int(plan.epoch)))  # supersede it
        return False

    def _observe_stage_time(self, health: Any, now: float) -> None:
        """Feed a single-device stage's measured compute time to the deviation monitor."""
        if self.monitor is None or self.current is None or health.epoch != self._monitor_epoch:
            return
        if health.stage is None or not health.compute_ms_avg or health.frames_out < 3:
            return
        _, result = self.current
        if health.stage >= len(result.stages) or len(result.stages[health.stage].devices) != 1:
            return
        self.monitor.observe(int(health.stage), float(health.compute_ms_avg), now)
        self._measured[int(health.stage)] = float(health.compute_ms_avg)

    async def _tick(self) -> None:
        last_metrics = 0.0
        while True:
            await asyncio.sleep(min(timing.HEALTH_INTERVAL_S, 0.25))
            self.state = state.apply(self.state, state.Tick(time.monotonic(), timing.LEASE_S))
            self._step()
            self._refresh_costs()
            sdnotify.notify("WATCHDOG=1")
            if time.monotonic() - last_metrics >= 1.0:
                last_metrics = time.monotonic()
                await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        """Pipeline-level figures (throughput, latency, bottleneck utilisation) for any MQTT client."""
        assert self.bus is not None
        values = pipeline_payload(self.view.snapshot(time.time()))
        msg = wire.Metrics(fleet=self.fleet, node_id=topics.PLANNER_ID, ts=time.time(), values=values)
        with contextlib.suppress(FleetpipeError, ValueError):
            await self.bus.publish(topics.node_metrics(self.fleet, topics.PLANNER_ID), wire.encode(msg), qos=0)

    def _step(self) -> None:
        if self._replanning is not None and not self._replanning.done():
            return
        now = time.monotonic()
        for command in control.decide(self.state, now, self.policy, self._first_seen):
            if isinstance(command, control.Replan):
                log.info("planner: re-planning epoch %d (%s)", command.epoch, command.reason)
                self._replanning = asyncio.create_task(self._replan(command))
                return
            if isinstance(command, control.WaitForNodes):
                log.debug("planner: waiting for nodes (%d/%d)", command.alive, command.needed)
                plan = self.state.plan
                short = plan is not None and plan.status == "active" and self.model is not None and \
                    not {n for s in plan.stages for n in s.nodes} <= set(self.state.alive())
                if not short:
                    self._short_since = None
                    return
                # Too few nodes for a lease more: a node that only missed its lease (busy, stopped a moment)
                # comes back before that and its frames are re-sent; a fleet that stays short fails them.
                self._short_since = self._short_since if self._short_since is not None else now
                if now - self._short_since >= timing.LEASE_S:
                    self._short_since = None
                    why = f"{command.alive} alive node(s), the planner needs {command.needed}"
                    replan = control.Replan(why, tuple(self.state.alive()), self.state.epoch + 1)
                    self._replanning = asyncio.create_task(
                        self._publish_infeasible(replan, why, self.state.membership))
                return
        recal = self._exchange_recalibration()
        if recal is not None:
            log.info("planner: re-planning epoch %d (%s)", recal.epoch, recal.reason)
            self._replanning = asyncio.create_task(self._replan(recal))
            return
        if self.config.adapt and self.monitor is not None and self.current is not None and now >= self._cooldown_until:
            deviations = [d for d in self.monitor.deviating(now) if self._hurts(d)]
            if deviations:
                self._replanning = asyncio.create_task(self._fine_tune(deviations))

    def _exchange_recalibration(self) -> control.Replan | None:
        """Split stages whose leads measure a dearer message than planned: re-plan with the measured cost.

        The cost only goes up (the largest lead estimate), so this converges: once splits no longer pay, no
        split stage is left to measure, and the plan stays.
        """
        if not self._msg_est or self.state.plan is None or self.config.intra_msg_ms is not None:
            return None
        measured = max(self._msg_est.values())
        if measured <= self._msg_ms * RECALIBRATE_RATIO + 0.2:
            return None
        old, self._msg_ms = self._msg_ms, measured
        self._msg_est.clear()
        alive = tuple(self.state.alive())
        return control.Replan(f"split exchanges cost {measured:.1f} ms per message, planned {old:.1f} ms", alive,
                              self.state.epoch + 1)

    def _hurts(self, deviation: Any) -> bool:
        """A stage running slower than predicted only matters once it is slower than the plan's bottleneck."""
        assert self.current is not None
        _, result = self.current
        predicted = self.monitor.predicted_ms[deviation.stage]
        return bool(deviation.ratio * predicted > result.report.bottleneck_ms * (1 + self.config.replan_threshold))

    async def _replan(self, command: control.Replan) -> None:
        """Solve for the alive nodes from scratch (or take the precomputed plan without a lost node) and publish
        a new epoch."""
        assert self.model is not None
        membership = self.state.membership
        self._phases = {"start": time.monotonic()}
        fallback = self._fallback_for(command.node_ids)
        if fallback is not None:
            log.info("planner: epoch %d from the precomputed plan without %s", command.epoch, fallback[0])
            await self._adopt(*fallback[1], command.epoch, membership)
            return
        nodes = {n: self.state.nodes[n] for n in command.node_ids}
        try:
            # Only losses: the last cost matrix's columns do, even if profiles came in since (the run-time
            # fine-tuning corrects what they change); a refit takes seconds on the critical path.
            members = {n for st in getattr(self.state.plan, "stages", ()) for n in st.nodes}
            losses = bool(members) and set(nodes) <= members
            problem = build_problem(self.model, nodes, self.config.bits, self.min_bits,
                                    await asyncio.to_thread(self._compute_ms, nodes, losses))
            self._phases["costs"] = time.monotonic()
            if self.config.intra:
                try:
                    plan, ip = await asyncio.to_thread(self._solve_intra, problem)
                    await self._adopt_intra(problem, ip, plan, command.epoch, membership)
                    return
                except (FleetpipeError, ValueError) as exc:  # a bug or an unsplittable model: say so, plan pipeline
                    if isinstance(exc, InfeasiblePlan):
                        raise
                    log.error("planner: intra plan failed (%s: %s); planning pipeline stages", type(exc).__name__, exc)
                    await self._publish_error(type(exc).__name__, f"intra plan failed: {exc}")
            problem, result = await asyncio.to_thread(self._solve_bits, problem)
            self._phases["solve"] = time.monotonic()
        except InfeasiblePlan as exc:
            log.error("planner: no feasible plan: %s", exc)
            await self._publish_error("InfeasiblePlan", str(exc))
            await self._publish_infeasible(command, str(exc), membership)
            return
        await self._adopt(problem, result, command.epoch, membership)

    def _log_phases(self, epoch: int) -> None:
        """How long this epoch's re-plan took, phase by phase (costs, solve, slicing, assign+load)."""
        marks = sorted(self._phases.items(), key=lambda kv: kv[1])
        if not marks or marks[0][0] != "start":
            return
        parts = [f"{name} {1000 * (t - prev):.0f} ms" for (_, prev), (name, t) in itertools.pairwise(marks)]
        log.info("planner: epoch %d re-plan took %.0f ms (%s)", epoch, 1000 * (marks[-1][1] - marks[0][1]),
                 ", ".join(parts))
        self._phases = {}

    def _fallback_for(self, alive: tuple[str, ...]) -> tuple[str, tuple[Any, Any]] | None:
        """The precomputed plan for exactly ``alive`` (the last problem's devices minus one), if there is one."""
        if self.config.intra or self.current is None:
            return None
        names = tuple(self.current[0].device_names)
        lost = [n for n in names if n not in alive]
        if len(lost) != 1 or len(names) != len(alive) + 1 or lost[0] not in self._fallbacks:
            return None
        problem, result = self._fallbacks[lost[0]]
        return (lost[0], (problem, result)) if tuple(problem.device_names) == tuple(alive) else None

    async def _precompute_fallbacks(self, problem: Any, result: Any) -> None:
        """Solve the current problem without each node its plan uses, one at a time, off the critical path."""
        used = sorted({d for st in result.stages for d in st.devices})
        for d in used:
            try:
                sub = problem.without_devices([d])
                self._fallbacks[problem.device_names[d]] = await asyncio.to_thread(self._solve_bits, sub, False)
            except (FleetpipeError, ValueError):
                continue  # no plan without it: the re-plan will say so (infeasible)
        log.info("planner: fallback plans ready without each of %s",
                 ",".join(problem.device_names[d] for d in used))

    async def _publish_infeasible(self, command: control.Replan, why: str, membership: int) -> None:
        """Tell clients (retained) that the fleet cannot run the model now, and which planned nodes are gone."""
        assert self.model is not None
        gone = sorted({n for s in getattr(self.state.plan, "stages", ()) for n in s.nodes} - set(command.node_ids))
        detail = why + (f" (nodes gone: {', '.join(gone)})" if gone else "") + \
            f"; alive: {', '.join(command.node_ids) or 'none'}"
        plan = wire.Plan(fleet=self.fleet, epoch=command.epoch, model_id=self.model.model_id, stages=(),
                         ts=time.time(), planner_id=self.planner_id, status="infeasible", detail=detail[:1000])
        self._published_epoch = command.epoch
        await self._publish_retained(topics.plan(self.fleet), wire.encode(plan))
        # The infeasible plan names no members: the next change of the alive set re-plans.
        self.state = state.apply(self.state, state.PlanPublished(plan, membership, time.monotonic()))

    async def _fine_tune(self, deviations: list[Any]) -> None:
        """ScalPipe: a stage runs off its prediction for a while; move boundary layers instead of re-solving."""
        from fleetpipe.planner.adapt import Deviation, device_factors, fine_tune, rescale_problem

        assert self.monitor is not None and self.current is not None
        problem, result = self.current
        text = ", ".join(f"stage {d.stage} at {d.ratio:.2f}x" for d in deviations)
        # Rescale every measured stage, not only the deviating ones: an error common to all stages (a
        # model that runs slower than profiled everywhere) then cancels instead of shifting layers around.
        flagged = {d.stage for d in deviations}
        deviations = [*deviations, *(
            Deviation(k, measured / self.monitor.predicted_ms[k], 0) for k, measured in self._measured.items()
            if k not in flagged and k < len(result.stages))]
        tuned = await asyncio.to_thread(fine_tune, problem, result.stages, deviations)
        self._cooldown_until = time.monotonic() + max(10 * timing.HEALTH_INTERVAL_S, 2.0)
        # What was measured becomes the model of the fleet from now on, re-plan or not.
        for d, factor in device_factors(result.stages, deviations).items():
            problem = rescale_problem(problem, d, factor)
        if tuned is None:
            log.info("planner: %s off prediction; fine-tuning would not help, keeping epoch %d", text,
                     self.state.epoch)
            from fleetpipe.planner.cost import evaluate

            self.current = (problem, result)
            self.monitor.reset([max(sr.compute_ms, 1e-9) for sr in evaluate(problem, result.stages).stages])
            return
        log.info("planner: %s off prediction; fine-tuned plan %.1f -> %.1f ms", text,
                 result.report.bottleneck_ms, tuned.report.bottleneck_ms)
        await self._adopt(problem, tuned, self.state.epoch + 1, self.state.membership)

    @staticmethod
    def _reported_costs(model: ModelInfo) -> Any:
        from fleetpipe.planner.estimator import layer_features
        from fleetpipe.planner.reported import ReportedCosts

        features = (lambda: layer_features(model.proto, model.graph)) if model.kind == "onnx" else None  # ONNX ops
        return ReportedCosts(model.model_id, model.host_ms, model.host_speed, layer_x=features)

    def _refresh_costs(self) -> None:
        """Refit the cost matrix for the alive nodes in the background once new profiles have settled, so the
        next re-plan for them (or a subset: a death) finds it ready (the fit takes seconds on a busy host)."""
        busy = self._replanning is not None and not self._replanning.done()
        if busy or self.costs is None or not self.costs.reports or self.state.plan is None or \
                (self._cost_refresh is not None and not self._cost_refresh.done()):
            return
        if self._cost_cache is not None and self._cost_cache[0] == self._costs_version:
            return
        if time.monotonic() - self._costs_changed_at < 2 * timing.HEALTH_INTERVAL_S:
            return
        alive = dict(self.state.alive())
        if alive:
            self._cost_refresh = asyncio.create_task(asyncio.to_thread(self._compute_ms, alive), name="costs")

    def _compute_ms(self, nodes: Mapping[str, Any], stale_ok: bool = False) -> np.ndarray | None:
        """Per-layer times of ``nodes`` from what they reported (``fleetpipe.planner.reported``), or None (scaled)."""
        if self.costs is None or not self.costs.reports:
            return None
        assert self.model is not None
        names = list(nodes)
        version = self._costs_version
        cached = self._cost_cache
        if cached is not None and (stale_ok or cached[0] == version) and set(names) <= set(cached[1]):
            columns = [cached[1].index(n) for n in names]
            return cached[2][:, columns]
        matrix = self.costs.matrix(names, [nodes[n].birth for n in names],
                                   lambda birth: node_slowdown(birth, self.model.host_speed))  # type: ignore[union-attr]
        log.info("planner: layer costs: %s", matrix.summary(names))
        self._cost_cache = (version, tuple(names), np.asarray(matrix.compute_ms))
        return matrix.compute_ms

    def _solve(self, problem: Any) -> Any:
        from fleetpipe.planner.partition import solve

        return solve(problem, time_limit_s=self.config.time_limit_s)

    def _solve_bits(self, problem: Any, record: bool = True) -> tuple[Any, Any]:
        """Solve with per-cut bit floors (calibrated, or probed within the tolerance); the problem as solved.
        ``record=False`` (a fallback plan solved in the background) keeps the current plan's bit report."""
        from fleetpipe.planner.bitwidth import solve_problem

        def unprobeable(text: str) -> None:
            log.error("planner: %s", text)
            self._finder = False

        problem, result, bit_plan = solve_problem(
            problem, self._solve, self.config.bits, finder=self._floor_finder(), calibration=self.calibration,
            tolerance=self.config.bit_tolerance, warn=unprobeable)
        if record:
            self.bit_plan = bit_plan
            log.info("planner: %s", bit_plan.summary())
        return problem, result

    def _floor_finder(self) -> Any:
        """The probe floor finder of this model (None: calibrated or floors off; it probes nothing at 32 bits)."""
        if self.calibration is not None or not self.config.bit_floors:
            return None
        if self._finder is None:
            from fleetpipe.planner.bitwidth import FloorFinder

            assert self.model is not None
            self._finder = FloorFinder(self.model.proto, self.model.graph, tolerance=self.config.bit_tolerance,
                                       key=self.model.model_id, loaded=getattr(self.model, "loaded", None))
        return self._finder or None

    def _cut_floor(self, cut: int) -> int | None:
        """The accuracy floor of the cut after layer ``cut``: calibrated, probed, 32 when unprobeable, None (off)."""
        from fleetpipe.planner.bitwidth import BitFloorUnavailable

        if self.calibration is not None:
            return int(self.calibration.min_bits[cut])
        if self.config.bits >= 32 or not self.config.bit_floors:
            return None  # float32 loses nothing; floors off: --bits as given
        if self._finder is False:
            return 32
        try:
            finder = self._floor_finder()
            return None if finder is None else int(finder.floor(cut, at_most=self.config.bits))
        except BitFloorUnavailable as exc:
            log.error("planner: cannot probe the bit floor of cut %d (%s); sending it at 32 bits", cut, exc)
            return 32

    def _solve_intra(self, problem: Any) -> tuple[Any, Any]:
        """Minimum-latency intra plan (single / replicate / split stages) and the problem it solved."""
        from fleetpipe.planner import split_deploy
        from fleetpipe.planner.intra import solve_intra
        from fleetpipe.planner.split_profile import plan_splits

        assert self.model is not None
        if self._split_info is None:
            self._split_info = split_deploy.split_info(self.model.proto, self.model.graph)
        ip = split_deploy.intra_problem(problem, self._split_info, self.config.bits, self._msg_ms)
        plain = solve_intra(ip, modes=("single",) if self.config.intra == "pipeline" else ("single", "replicate"))
        if self.config.intra == "pipeline":
            return plain, ip
        # Split units cost what their part slices take on this host (halo, kernels), not the model's guess.
        split, ip = plan_splits(problem, self._split_info, self.model.proto, self.model.graph, bits=self.config.bits,
                                msg_ms=self._msg_ms, tiles=self.config.intra_tiles,
                                factors=self._part_factors if self.config.intra_measure_parts else None)
        # The cost model is good to some 10-20 % on a busy host: a split must promise a clear gain.
        if split.n_split_units and split.latency_ms > (1.0 - SPLIT_MIN_GAIN) * plain.latency_ms:
            log.info("planner: splits would gain %.1f%% (< %.0f%%); planning without them",
                     100 * (1 - split.latency_ms / plain.latency_ms), 100 * SPLIT_MIN_GAIN)
            return plain, ip
        return split, ip

    async def _adopt_intra(self, problem: Any, ip: Any, plan: Any, epoch: int, membership: int) -> None:
        """Publish the slices and (split) assignments of an intra plan, then the plan once all have loaded."""
        from fleetpipe.planner import split_deploy

        assert self.model is not None
        self._epoch_slices = set()
        names = problem.device_names
        deployed = await asyncio.to_thread(split_deploy.deploy, self.model.proto, self.model.graph, plan, ip, names)
        stages = []
        for k, dep in enumerate(deployed):
            for digest, data in dep.blobs.items():
                await self._publish_slice(digest, data)
            floor = None if k + 1 == len(deployed) else await asyncio.to_thread(self._cut_floor, dep.last)
            stages.append(wire.PlanStage(
                index=k, first_layer=dep.first, last_layer=dep.last, nodes=dep.nodes,
                bits=max(self.config.bits, floor or 0), min_bits=floor,
                slice_hash=dep.slice_hash, input_names=tuple(self.model.graph.inputs_of(dep.first)),
                output_names=tuple(self.model.graph.crossing(dep.last)), predicted_ms=float(dep.predicted_ms)))
        msg = await self._publish_epoch(stages, [d.slice_size for d in deployed],
                                        [{"split": d.split} for d in deployed], epoch, float(plan.period_ms),
                                        float(plan.latency_ms))
        if msg is None:
            return
        self.last_result = plan
        self.current = self.monitor = None  # intra plans are re-solved on membership changes, not fine-tuned
        self.state = state.apply(self.state, state.PlanPublished(msg, membership, time.monotonic()))
        log.info("planner: epoch %d published (intra, predicted latency %.1f ms): %s", epoch, plan.latency_ms,
                 " | ".join(f"s{d.first}-{d.last} {d.mode} {'+'.join(d.nodes)}"
                            + (" units " + ",".join(f"{u.first_layer}-{u.last_layer}:{u.kind or 'lead'}"
                                                    for u in d.split.units) if d.split else "")
                            for d in deployed))

    def _slices(self, result: Any) -> list[tuple[bytes, str]]:
        assert self.model is not None
        out = []
        for stage in result.stages:
            data = self.model.slice(stage.first, stage.last)
            out.append((data, slices.content_hash(data)))
        return out

    async def _adopt(self, problem: Any, result: Any, epoch: int, membership: int) -> None:
        """Publish slices, assignments and (once every node has loaded) the plan of a new epoch."""
        from fleetpipe.planner.adapt import DeviationMonitor

        assert self.model is not None
        self._epoch_slices = set()
        stage_slices = await asyncio.to_thread(self._slices, result)
        self._phases["slices"] = time.monotonic()
        names = problem.device_names
        stages = []
        for k, (stage, (data, digest)) in enumerate(zip(result.stages, stage_slices, strict=True)):
            await self._publish_slice(digest, data)
            report = result.report.stages[k]
            # Never below the cut's floor, also for a fine-tuned plan whose moved boundary was never probed.
            floor = None if k + 1 == len(result.stages) else await asyncio.to_thread(self._cut_floor, stage.last)
            stages.append(wire.PlanStage(
                index=k, first_layer=stage.first, last_layer=stage.last, nodes=tuple(names[d] for d in stage.devices),
                bits=max(int(stage.bits), floor or 0), min_bits=None if floor is None else min(floor, 32),
                slice_hash=digest, input_names=tuple(self.model.graph.inputs_of(stage.first)),
                output_names=tuple(self.model.graph.crossing(stage.last)),
                predicted_ms=float(max(report.compute_ms, report.transfer_ms, report.input_ms)),
                compute_ms=float(report.compute_ms), transfer_ms=float(max(report.transfer_ms, report.input_ms))))
        exits = [{"exit_cache": self._exit_cache(s, len(stages))} for s in stages]
        plan = await self._publish_epoch(stages, [len(data) for data, _ in stage_slices], exits, epoch,
                                         float(result.report.period_ms or result.report.bottleneck_ms),
                                         float(result.report.latency_ms))
        if plan is None:
            return
        self.last_result = result
        self.current = (problem, result)
        if self._fallback_task is not None:
            self._fallback_task.cancel()
        self._fallbacks = {}
        self._fallback_task = asyncio.create_task(self._precompute_fallbacks(problem, result), name="fallbacks")
        predicted = [max(sr.compute_ms, 1e-9) for sr in result.report.stages]
        self.monitor = DeviationMonitor(predicted, threshold=self.config.replan_threshold,
                                        window_s=max(5 * timing.HEALTH_INTERVAL_S, 1.0))
        self._monitor_epoch = epoch
        self._measured = {}
        self._cooldown_until = time.monotonic() + max(10 * timing.HEALTH_INTERVAL_S, 2.0)
        self.state = state.apply(self.state, state.PlanPublished(plan, membership, time.monotonic()))
        log.info("planner: epoch %d published: %s", epoch,
                 " | ".join(f"s{s.index} {'+'.join(s.nodes)} L{s.first_layer}-{s.last_layer}" for s in stages))

    async def _publish_epoch(self, stages: list[Any], sizes: list[int], extra: list[dict[str, Any]], epoch: int,
                             bottleneck_ms: float, latency_ms: float) -> Any:
        """Assign every stage's nodes, clear the nodes left out, and publish the plan once all have loaded.

        ``sizes[k]`` is stage ``k``'s slice size, ``extra[k]`` its further ``StageAssign`` fields (a split, or
        an exit cache). Returns the published ``Plan``, or None when an assigned node died while loading.
        """
        assert self.model is not None
        for s in stages:
            for node_id in s.nodes:
                assign = wire.StageAssign(
                    fleet=self.fleet, node_id=node_id, epoch=epoch, stage=s.index, n_stages=len(stages),
                    first_layer=s.first_layer, last_layer=s.last_layer, slice_hash=s.slice_hash,
                    slice_size=sizes[s.index], model_id=self.model.model_id, input_names=s.input_names,
                    output_names=s.output_names, bits=s.bits, min_bits=s.min_bits,
                    next_stage=s.index + 1 if s.index + 1 < len(stages) else None, ts=time.time(),
                    **extra[s.index])
                if self._signing_key is not None:  # nodes with the planner's public key load nothing unsigned
                    assign = signing.sign_assign(assign, self._signing_key)
                await self._publish_retained(topics.node_assign(self.fleet, node_id), wire.encode(assign))
        assigned = {n for s in stages for n in s.nodes}
        for node_id in self._assigned - assigned:
            await self._publish_retained(topics.node_assign(self.fleet, node_id), b"")
        self._assigned = assigned
        plan = wire.Plan(fleet=self.fleet, epoch=epoch, model_id=self.model.model_id, stages=tuple(stages),
                         bottleneck_ms=bottleneck_ms, latency_ms=latency_ms, ts=time.time(),
                         planner_id=self.planner_id)
        if not await self._wait_loaded(assigned, epoch):
            # An assigned node died or stopped answering while loading: this epoch can never run. Abandon it
            # whole: nodes still serve the committed epoch (they switch only on the plan), so restore its
            # assignments and skip the number; the next step re-plans if the live set differs from the plan.
            self.state = dataclasses.replace(self.state, epoch=max(self.state.epoch, epoch))
            await self._restore_committed()
            return None
        self._published_epoch = epoch
        self._phases["loaded"] = time.monotonic()
        await self._publish_retained(topics.plan(self.fleet), wire.encode(plan))  # the commit
        self._log_phases(epoch)
        self._committed = {t: p for t, p in self._retained.items() if topics.parse(t)[0] is topics.NODE_ASSIGN}
        await self._clear_unused_slices()
        return plan

    async def _restore_committed(self) -> None:
        """Put back the committed epoch's retained assignments; clear those of nodes it does not name."""
        committed = {topics.parse(t)[1]["node_id"]: t for t in self._committed}
        for node_id in sorted(self._assigned | set(committed)):
            topic = committed.get(node_id) or topics.node_assign(self.fleet, node_id)
            await self._publish_retained(topic, self._committed.get(topic, b""))
        self._assigned = set(committed)

    def _exit_cache(self, stage: Any, n_stages: int) -> Any:
        """COACH early exit for a stage that ends at a calibrated cut (never the last stage), or None."""
        cal = self.calibration
        if cal is None or not self.config.early_exit or stage.index + 1 >= n_stages:
            return None
        doc = cal.exits.get(stage.last_layer)
        if doc is None:
            return None
        return wire.ExitCache(threshold=float(doc["threshold"]), centres=tuple(tuple(r) for r in doc["centres"]),
                              counts=tuple(int(c) for c in doc["counts"]))

    async def _publish_slice(self, digest: str, data: bytes) -> None:
        assert self.bus is not None
        self._epoch_slices.add(digest)
        if digest in self._published_slices:
            return
        parts = slices.chunk(data)
        for i, part in enumerate(parts):
            chunk = wire.SliceChunk(slice_hash=digest, index=i, count=len(parts), data=part)
            await self._publish_retained(topics.slice_chunk(self.fleet, digest, i), wire.encode(chunk))
        self._published_slices[digest] = len(parts)

    async def _clear_unused_slices(self) -> None:
        """Clear (empty retained publish) every chunk of the slices the just-published epoch does not use.

        Every node of the new epoch has loaded it (or was given up on) and no other epoch is live, so old
        slices are garbage: without this each re-plan leaves its model on the broker (RAM, and disk with
        persistence). A slice needed again later is simply published again.
        """
        keep, self._epoch_slices = self._epoch_slices, set()
        for digest in sorted(set(self._published_slices) - keep):
            for i in range(self._published_slices.pop(digest)):
                await self._publish_retained(topics.slice_chunk(self.fleet, digest, i), b"")
            log.debug("planner: cleared retained slice %s", digest)

    async def _wait_loaded(self, nodes: set[str], epoch: int) -> bool:
        """Wait until every node in ``nodes`` reports ``epoch`` loaded; False if one of them is gone meanwhile."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(self._loaded.get(n, -1) >= epoch for n in nodes):
                return True
            gone = sorted(n for n in nodes if n not in self.state.nodes or not self.state.nodes[n].alive)
            if gone:
                log.warning("planner: %s gone while loading epoch %d; abandoning it", ",".join(gone), epoch)
                return False
            await asyncio.sleep(0.05)
        missing = sorted(n for n in nodes if self._loaded.get(n, -1) < epoch)
        log.warning("planner: nodes %s did not report epoch %d loaded in %.0f s; publishing anyway",
                    missing, epoch, LOAD_TIMEOUT_S)
        return True

    async def _publish_error(self, kind: str, detail: str) -> None:
        assert self.bus is not None
        report = wire.ErrorReport(fleet=self.fleet, source="planner", kind=kind, detail=detail[:500],
                                  frame_id=None, ts=time.time())
        with contextlib.suppress(FleetpipeError):
            await self.bus.publish(topics.error(self.fleet), wire.encode(report), qos=1)


def _load_calibration(config: PlannerConfig, model: ModelInfo | None) -> Any:
    """The calibration file (``fleetpipe calibrate``: per-cut minimum bits, exit caches), or None."""
    if not config.calibration:
        return None
    if config.calibration.endswith((".npy", ".npz")):
        return None if model is None else _calibrate_samples(config, model)
    from fleetpipe.models.calibrate import Calibration

    try:
        cal = Calibration.from_json(Path(config.calibration).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read calibration {config.calibration}: {exc}") from exc
    if model is not None and cal.model_id not in _calibration_ids(config.model, model):
        raise ConfigError(f"calibration {config.calibration} is for model {cal.model_id}, not {model.model_id}")
    log.info("planner: calibrated minimum bits per cut %s (floor %.2f%%), early exit at cuts %s",
             list(cal.min_bits), 100 * cal.floor, sorted(cal.exits) if config.early_exit else "off")
    return cal


def _calibration_ids(path: str, model: ModelInfo) -> set[str]:
    """Model ids a calibration may name: the planner's (inputs pinned), or the file's as given."""
    ids = {model.model_id}
    with contextlib.suppress(OSError):
        if not path.startswith("zoo:"):
            ids.add(slices.content_hash(Path(path).read_bytes())[:12])
    return ids


def _calibrate_samples(config: PlannerConfig, model: ModelInfo) -> Any:
    """COACH floors measured now on the user's sample inputs (.npy: samples stacked on axis 0; .npz: 'x', 'y')."""
    from fleetpipe.models.calibrate import DEFAULT_FLOOR, calibrate
    from fleetpipe.planner.bitwidth import CANDIDATES

    try:
        data = np.load(config.calibration, allow_pickle=False)  # type: ignore[arg-type]
        if isinstance(data, np.ndarray):
            x, y = data, None
        else:
            with data:
                x, y = data["x"], (data["y"] if "y" in data.files else None)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read calibration samples {config.calibration}: {exc}") from exc
    if not hasattr(model.proto, "SerializeToString"):
        raise ConfigError(f"calibration samples {config.calibration}: calibrating needs an ONNX model (without "
                          f"--calibration the planner probes each cut's bit floor)")
    classifier = len(model.graph.outputs[0].shape) == 2 and model.graph.outputs[0].shape[1] > 1
    try:
        cal = calibrate(model.proto, model.graph, np.asarray(x), y, bits_candidates=CANDIDATES,
                        floor=DEFAULT_FLOOR if classifier else config.bit_tolerance)
    except ValueError as exc:
        raise ConfigError(f"calibration samples {config.calibration}: {exc}") from exc
    log.info("planner: calibrated on %d samples of %s (%s within %g): minimum bits per cut %s", cal.n_samples,
             config.calibration, cal.metric, cal.floor, list(cal.min_bits))
    return cal


def _bw(birth: Any) -> float:
    return float(birth.bandwidth_mbps or DEFAULT_BANDWIDTH_MBPS)


def _wire_bytes(graph: Any, layer: Any) -> float:
    """Float32-equivalent bytes a stage ending at ``layer`` sends (the cost model scales by bits/32)."""
    total = 0.0
    for name in layer.out_tensors:
        info = graph.tensors.get(name)
        nbytes = graph.tensor_bytes.get(name, 0)
        floating = info is None or info.dtype.startswith("float")
        total += nbytes if floating else nbytes * 4  # integers are never quantized
    return total
