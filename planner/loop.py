"""The planner service: the async shell around the pure state, control and partition functions.

Theory of operation. The service follows every node's retained state (birth/death) and health,
folds them into ``FleetState`` (``state.apply``), and asks ``control.decide`` what to do after each
event and tick. A ``Replan`` builds a ``Problem`` from the model graph and the alive nodes' measured
capabilities, solves it, slices the model, publishes the slices (retained chunks, content
addressed), then each node's retained assignment under a new epoch. It publishes the retained plan
(the signal clients switch on) only when every assigned node reports in its health that it has
loaded the new epoch, so a client never sends a frame to a stage nobody has subscribed yet. Nodes
left out of the plan get their retained assignment cleared. On start the retained plan (if any)
is read back, so a restarted planner resumes the epoch count and leaves a running pipeline alone
when the same nodes are alive.

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
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe import slices, timing, topics, wire
from fleetpipe._aio import Stopped, in_daemon_thread, unless_stopped
from fleetpipe.config import PlannerConfig
from fleetpipe.deploy import sdnotify
from fleetpipe.errors import ConfigError, DecodeError, FleetpipeError, InfeasiblePlan, UnsupportedModel
from fleetpipe.metrics import FleetView, pipeline_payload
from fleetpipe.planner import control, state
from fleetpipe.transport import Message
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


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model as the planner needs it: proto, layer graph and host per-layer times."""

    model_id: str
    proto: Any
    graph: Any
    host_ms: np.ndarray
    host_speed: float


def load_model_info(path: str, input_shape: tuple[int, ...] | None = None, profile: str | None = None) -> ModelInfo:
    """Load the model, group its layers and profile them on this host.

    With ``profile`` (a JSON file), per-layer host times and the host speed are read from it when it
    holds this model's layers, else measured and written there: plans made from the same file are
    comparable run to run (a 2-core host's profile varies by up to 2x under load).
    """
    from fleetpipe.models.onnx_graph import load_onnx, read_model
    from fleetpipe.models.profile import profile_layers
    from fleetpipe.node.profile import measure_speed

    if path.startswith("zoo:"):
        from fleetpipe.models import zoo

        try:
            proto = zoo.build(path.removeprefix("zoo:"))
        except KeyError as exc:
            raise UnsupportedModel(str(exc.args[0])) from exc
    else:
        proto = read_model(path)
    shapes = {proto.graph.input[0].name: tuple(input_shape)} if input_shape else None
    graph = load_onnx(proto, input_shapes=shapes)
    model_id = slices.content_hash(proto.SerializeToString())[:12]
    cached = _read_profile(profile, model_id, len(graph.layers)) if profile else None
    if cached is not None:
        return ModelInfo(model_id, proto, graph, cached[0], cached[1])
    prof = profile_layers(proto, graph, runs=5)
    host_ms = np.asarray(prof.per_layer_ms, dtype=np.float64)
    # By CPU time, like an emulated node's own figure: nodes starting up beside the planner (a test fleet, the
    # demo) would otherwise slow the host's figure, and with it every emulated device's predicted time.
    info = ModelInfo(model_id, proto, graph, host_ms, measure_speed(0.2, cpu_time=True))
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
    return Problem(layer_names=tuple(layer.name for layer in graph.layers), compute_ms=compute,
                   out_bytes=out_bytes, param_bytes=np.array([layer.param_bytes for layer in graph.layers]),
                   input_bytes=graph.input_bytes, device_names=names, mem_bytes=mem, bw_mbps=bw,
                   device_types=tuple(nodes[n].birth.device_class for n in names), name=model.model_id,
                   min_bits=cut_bits)


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
        self.last_result: Any = None
        self._split_info: list[Any] | None = None
        # Intra plans: the fixed cost of one message the plan assumes, raised to what split leads measure.
        self._msg_ms = MSG_MS_START if config.intra_msg_ms is None else config.intra_msg_ms
        # Measured split parts of this model (fleetpipe.planner.split_profile), kept across re-plans.
        self._part_factors: dict[tuple[int, int, str, int], tuple[float, ...]] = {}
        self._msg_est: dict[str, float] = {}
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
            self.bus = MqttBus(broker.url or "", client_id=f"fp-{self.fleet}-planner", username=broker.username,
                               password=broker.password(), tls=broker.tls(), on_connect=self._on_connect, wait=True)
            await unless_stopped(self.bus.__aenter__(), self.should_exit)
        except Stopped:
            log.info("planner: stopped before it was connected")
            return EXIT_OK
        except FleetpipeError as exc:
            if self.bus is None:
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
            for task in [*tasks, self._replanning]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*[t for t in tasks if t], return_exceptions=True)
            await self.bus.__aexit__(None, None, None)
            log.info("planner: stopped")
        return EXIT_OK

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
        await self.bus.subscribe(topics.NODE_STATE.filter(fleet=self.fleet), qos=1)
        await self.bus.subscribe(topics.NODE_HEALTH.filter(fleet=self.fleet), qos=0)
        await self.bus.subscribe(topics.plan(self.fleet), qos=1)
        await self.bus.subscribe(topics.NODE_PROFILE.filter(fleet=self.fleet), qos=1)

    async def _receive(self) -> None:
        assert self.bus is not None
        async for message in self.bus.messages():
            try:
                self._fold(message)
            except (DecodeError, ValueError) as exc:
                log.warning("planner: bad message on %s: %s", message.topic, exc)
            self._step()

    def _fold(self, message: Message) -> None:
        if not message.payload:
            return
        msg = wire.decode(message.payload)
        now = time.monotonic()
        self.view.apply(msg)
        if isinstance(msg, wire.NodeBirth):
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
            # The ACL lets a node write only its own profile topic: the payload must name that node too.
            if topics.parse(message.topic)[1].get("node_id") != msg.node_id:
                raise DecodeError(f"profile of {msg.node_id!r} on {message.topic}")
            if self.costs.add(msg):
                log.debug("planner: %s timed layers %d..%d: %.2f ms", msg.node_id, msg.first_layer, msg.last_layer,
                          sum(msg.layer_ms))
        elif isinstance(msg, wire.Plan) and msg.fleet == self.fleet and msg.epoch > self._published_epoch and (
                self.state.plan is None or msg.epoch > self.state.plan.epoch) and self._same_model(msg):
            # A retained plan from an earlier planner instance: resume from it, leave the pipeline alone.
            log.info("planner: resuming from retained plan epoch %d", msg.epoch)
            self.state = state.apply(self.state, state.PlanPublished(msg, self.state.membership, now))
            self._assigned = {n for s in msg.stages for n in s.nodes}
            self._retained[message.topic] = bytes(message.payload)

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
            sdnotify.notify("WATCHDOG=1")
            if time.monotonic() - last_metrics >= 1.0:
                last_metrics = time.monotonic()
                await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        """Pipeline-level figures (throughput, latency, bottleneck utilisation) for any MQTT client."""
        assert self.bus is not None
        values = pipeline_payload(self.view.snapshot(time.time()))
        msg = wire.Metrics(fleet=self.fleet, node_id="planner", ts=time.time(), values=values)
        with contextlib.suppress(FleetpipeError, ValueError):
            await self.bus.publish(topics.node_metrics(self.fleet, "planner"), wire.encode(msg), qos=0)

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
        """Solve for the alive nodes from scratch and publish a new epoch."""
        assert self.model is not None
        membership = self.state.membership
        nodes = {n: self.state.nodes[n] for n in command.node_ids}
        try:
            problem = build_problem(self.model, nodes, self.config.bits, self.min_bits,
                                    await asyncio.to_thread(self._compute_ms, nodes))
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
            result = await asyncio.to_thread(self._solve, problem)
        except InfeasiblePlan as exc:
            log.error("planner: no feasible plan: %s", exc)
            await self._publish_error("InfeasiblePlan", str(exc))
            self.state = state.apply(self.state, state.PlanPublished(
                self.state.plan or _NoPlan(self.state.epoch), membership, time.monotonic()))
            return
        await self._adopt(problem, result, command.epoch, membership)

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

        return ReportedCosts(model.model_id, model.host_ms, model.host_speed,
                             layer_x=lambda: layer_features(model.proto, model.graph))

    def _compute_ms(self, nodes: Mapping[str, Any]) -> np.ndarray | None:
        """Per-layer times of ``nodes`` from what they reported (``fleetpipe.planner.reported``), or None (scaled)."""
        if self.costs is None or not self.costs.reports:
            return None
        assert self.model is not None
        names = list(nodes)
        matrix = self.costs.matrix(names, [nodes[n].birth for n in names],
                                   lambda birth: node_slowdown(birth, self.model.host_speed))  # type: ignore[union-attr]
        log.info("planner: layer costs: %s", matrix.summary(names))
        return matrix.compute_ms

    def _solve(self, problem: Any) -> Any:
        from fleetpipe.planner.partition import solve

        return solve(problem, time_limit_s=self.config.time_limit_s)

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
            stages.append(wire.PlanStage(
                index=k, first_layer=dep.first, last_layer=dep.last, nodes=dep.nodes, bits=self.config.bits,
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
        from fleetpipe.models.slicing import slice_bytes

        assert self.model is not None
        out = []
        for stage in result.stages:
            data = slice_bytes(self.model.proto, self.model.graph, stage.first, stage.last)
            out.append((data, slices.content_hash(data)))
        return out

    async def _adopt(self, problem: Any, result: Any, epoch: int, membership: int) -> None:
        """Publish slices, assignments and (once every node has loaded) the plan of a new epoch."""
        from fleetpipe.planner.adapt import DeviationMonitor

        assert self.model is not None
        self._epoch_slices = set()
        stage_slices = await asyncio.to_thread(self._slices, result)
        names = problem.device_names
        stages = []
        for k, (stage, (data, digest)) in enumerate(zip(result.stages, stage_slices, strict=True)):
            await self._publish_slice(digest, data)
            report = result.report.stages[k]
            stages.append(wire.PlanStage(
                index=k, first_layer=stage.first, last_layer=stage.last, nodes=tuple(names[d] for d in stage.devices),
                bits=int(stage.bits), slice_hash=digest, input_names=tuple(self.model.graph.inputs_of(stage.first)),
                output_names=tuple(self.model.graph.crossing(stage.last)),
                predicted_ms=float(max(report.compute_ms, report.transfer_ms)), compute_ms=float(report.compute_ms),
                transfer_ms=float(report.transfer_ms)))
        exits = [{"exit_cache": self._exit_cache(s, len(stages))} for s in stages]
        plan = await self._publish_epoch(stages, [len(data) for data, _ in stage_slices], exits, epoch,
                                         float(result.report.bottleneck_ms), float(result.report.latency_ms))
        if plan is None:
            return
        self.last_result = result
        self.current = (problem, result)
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
                    output_names=s.output_names, bits=s.bits,
                    next_stage=s.index + 1 if s.index + 1 < len(stages) else None, ts=time.time(),
                    **extra[s.index])
                await self._publish_retained(topics.node_assign(self.fleet, node_id), wire.encode(assign))
        assigned = {n for s in stages for n in s.nodes}
        for node_id in self._assigned - assigned:
            await self._publish_retained(topics.node_assign(self.fleet, node_id), b"")
        self._assigned = assigned
        plan = wire.Plan(fleet=self.fleet, epoch=epoch, model_id=self.model.model_id, stages=tuple(stages),
                         bottleneck_ms=bottleneck_ms, latency_ms=latency_ms, ts=time.time())
        if not await self._wait_loaded(assigned, epoch):
            # An assigned node died or stopped answering while loading: this epoch can never run. Skip its
            # number (nodes may already hold it) and let the next step re-plan for the members still alive.
            self.state = dataclasses.replace(self.state, epoch=max(self.state.epoch, epoch))
            return None
        self._published_epoch = epoch  # our own retained plan comes back to us: not a plan to resume from
        await self._publish_retained(topics.plan(self.fleet), wire.encode(plan))
        await self._clear_unused_slices()
        return plan

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
    from fleetpipe.models.calibrate import Calibration

    try:
        cal = Calibration.from_json(open(config.calibration).read())  # noqa: SIM115
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read calibration {config.calibration}: {exc}") from exc
    if model is not None and cal.model_id != model.model_id:
        raise ConfigError(f"calibration {config.calibration} is for model {cal.model_id}, not {model.model_id}")
    log.info("planner: calibrated minimum bits per cut %s (floor %.2f%%), early exit at cuts %s",
             list(cal.min_bits), 100 * cal.floor, sorted(cal.exits) if config.early_exit else "off")
    return cal


@dataclass(frozen=True, slots=True)
class _NoPlan:
    epoch: int
    stages: tuple[Any, ...] = ()


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
