"""Fault tolerance with real processes: kill -9 nodes and the planner, restart mosquitto, SIGSTOP a node.

Every submitted frame must get exactly one correct result (the client de-duplicates by frame id and
re-sends what a failure swallowed).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fleetpipe.client import FleetClient
from tests.conftest import start_broker
from tests.integration.fleet_helpers import fleet, pinned_profile

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUICK = {
    "FLEETPIPE_TIMING_HEALTH_INTERVAL_S": "0.2",
    "FLEETPIPE_TIMING_LEASE_S": "1.2",
    "FLEETPIPE_TIMING_REPLAN_DEBOUNCE_S": "0.2",
    "FLEETPIPE_TIMING_RECONNECT_MIN_S": "0.1",
    "FLEETPIPE_TIMING_RECONNECT_MAX_S": "0.5",
}


def _model(tmp_path: Path) -> tuple[Path, tuple[int, ...]]:
    from fleetpipe.models import zoo

    kw = {"width": 0.5, "resolution": 64, "num_classes": 10}
    path = tmp_path / "resnet18.onnx"
    onnx.save(zoo.build("resnet18", **kw), path)
    return path, tuple(zoo.input_shape("resnet18", **kw))


class Stream:
    """Submits frames continuously from a thread; remembers every result."""

    def __init__(self, client: FleetClient, xs: list[np.ndarray]) -> None:
        self.client = client
        self.xs = xs
        self.results: dict[int, np.ndarray] = {}
        self.futures: list[object] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def _run(self) -> None:
        try:
            futures = []
            for x in self.xs:
                futures.append(self.client.submit(x))
                time.sleep(0.03)
            for i, future in enumerate(futures):
                self.results[i] = future.result(timeout=120).output
        except BaseException as exc:  # reported by the test
            self.error = exc

    def done_count(self) -> int:
        return self.client.stats.completed

    def wait_done(self, n: int, timeout_s: float, what: str, logs: str = "") -> float:
        start = time.monotonic()
        while self.done_count() < n:
            if time.monotonic() - start > timeout_s:
                pytest.fail(f"{what}: only {self.done_count()}/{n} results after {timeout_s} s\n{logs}")
            time.sleep(0.05)
        return time.monotonic() - start


def _stage_nodes(client: FleetClient, epoch_after: int, logs: object, timeout_s: float = 60) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plan = client.plan
        if plan is not None and plan.epoch > epoch_after:
            return plan
        time.sleep(0.05)
    raise AssertionError(f"no plan newer than epoch {epoch_after} within {timeout_s} s\n{logs()}")  # type: ignore[operator]


def test_kills_restarts_and_stragglers_lose_nothing(mosquitto, tmp_path, quick_timing):
    model, shape = _model(tmp_path)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(160)]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    refs = [sess.run(None, {sess.get_inputs()[0].name: x})[0] for x in xs]
    port = mosquitto.port
    broker2 = None
    with fleet(mosquitto.url, "ifault", tmp_path) as f:
        f.env.update(QUICK)
        # Profiled before the nodes start: the planner's own profile, taken while four nodes import onnxruntime
        # on 2 cores, once put a third of the model in layer 0 and planned 2 stages.
        profile = pinned_profile(model, tmp_path / "profile.json")
        f.planner(model, "--expect-nodes", "4", "--bits", "32", "--profile", str(profile))
        for i in range(4):
            f.node(f"n{i}", "4")
        stopped: str | None = None
        try:
            with FleetClient(mosquitto.url, fleet="ifault", window=4) as client:
                plan = client.wait_plan(120)
                assert len(plan.stages) >= 3, plan
                stream = Stream(client, xs)
                stream.thread.start()
                stream.wait_done(15, 60, "warm-up", f.logs())

                # 1. kill -9 a middle-stage node mid-stream
                victim = plan.stages[len(plan.stages) // 2].nodes[0]
                f.signal(victim, signal.SIGKILL)
                plan = _stage_nodes(client, plan.epoch, f.logs)
                assert victim not in {n for s in plan.stages for n in s.nodes}
                stream.wait_done(stream.done_count() + 10, 60, "after killing a middle node", f.logs())

                # 2. kill -9 the first-stage node
                victim = plan.stages[0].nodes[0]
                f.signal(victim, signal.SIGKILL)
                plan = _stage_nodes(client, plan.epoch, f.logs)
                stream.wait_done(stream.done_count() + 10, 60, "after killing the first-stage node", f.logs())

                # 3. kill -9 the planner and start a new one: the pipeline keeps running on the retained plan
                f.signal("planner", signal.SIGKILL)
                before = stream.done_count()
                stream.wait_done(before + 10, 60, "with the planner dead", f.logs())
                f.procs["planner-old"] = f.procs.pop("planner")
                f.planner(model, "--bits", "32", "--profile", str(profile))
                time.sleep(2.0)
                assert client.plan.epoch == plan.epoch, "a restarted planner must not disturb a running pipeline"

                # 4. restart mosquitto on the same port
                mosquitto.stop()
                time.sleep(0.5)
                broker2 = start_broker(tmp_path, port=port)
                stream.wait_done(stream.done_count() + 10, 90, "after a broker restart", f.logs())

                # 5. SIGSTOP a node that is in the plan: it is routed around
                plan = client.plan
                live = [n for s in plan.stages for n in s.nodes]
                if len(live) >= 2:
                    stopped = live[-1]
                    f.signal(stopped, signal.SIGSTOP)
                    plan = _stage_nodes(client, plan.epoch, f.logs)
                    assert stopped not in {n for s in plan.stages for n in s.nodes}

                stream.thread.join(180)
                assert not stream.thread.is_alive(), "stream did not finish\n" + f.logs()
                assert stream.error is None, f"{stream.error!r}\n{f.logs()}"
                stats = client.stats
        finally:
            if stopped is not None:
                f.signal(stopped, signal.SIGCONT)
            if broker2 is not None:
                broker2.stop()
    assert sorted(stream.results) == list(range(len(xs)))
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(stream.results[i], ref, rtol=1e-4, atol=1e-4, err_msg=f"frame {i}")
    assert stats.completed == len(xs)
    assert stats.submitted == len(xs)
