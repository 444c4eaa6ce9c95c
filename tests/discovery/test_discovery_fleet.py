"""An emulated fleet started with no broker address: zeroconf finds the broker and frames flow.

The planner and the nodes get no ``--broker``; ``fleetpipe broker announce`` advertises the test's
mosquitto on 127.0.0.1. A node with a duplicate id is refused; a node whose config file names a static
fallback runs where discovery finds nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleetpipe.client import FleetClient
from fleetpipe.node.daemon import EXIT_CONFIG
from tests.integration.fleet_helpers import fleet as fleet_ctx
from tests.integration.fleet_helpers import tiny_resnet18

from .conftest import announce_broker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _node_args(name: str, fleet_name: str, tmp_path: Path) -> list[str]:
    return ["node", "--fleet", fleet_name, "--name", name, "--emulate", "2", "--interface", "127.0.0.1",
            "--cache-dir", str(tmp_path / "cache" / name)]


def test_fleet_without_broker_address_finds_it_and_runs(mosquitto, tmp_path, fleet: str) -> None:
    model, shape = tiny_resnet18(tmp_path)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    with announce_broker(mosquitto.url, fleet), fleet_ctx(mosquitto.url, fleet, tmp_path) as f:
        started = time.monotonic()
        f.spawn("planner", ["planner", "--fleet", fleet, "--model", str(model), "--interface", "127.0.0.1",
                            "--expect-nodes", "2", "--bits", "32"])
        for name in ("n0", "n1"):
            f.spawn(name, _node_args(name, fleet, tmp_path))
        with FleetClient(mosquitto.url, fleet=fleet, window=3) as client:
            plan = client.wait_plan(90)
            outs = [r.output for r in client.stream(xs)]
            first_result_s = time.monotonic() - started
        assert {n for s in plan.stages for n in s.nodes} == {"n0", "n1"}, f.logs()
        for x, out in zip(xs, outs, strict=True):
            ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert "found by zeroconf" in (tmp_path / "n0.log").read_text(), f.logs()
        print(f"\nprocess start -> broker discovered -> plan -> 6 results: {first_result_s:.1f} s")

        # the same id again, in the same fleet: refused with a config exit, the first n0 keeps serving
        dup = f.spawn("n0-dup", _node_args("n0", fleet, tmp_path))
        assert dup.wait(60) == EXIT_CONFIG, f.logs()
        assert "duplicate node id 'n0'" in (tmp_path / "n0-dup.log").read_text()
        assert f.procs["n0"].poll() is None


def test_static_fallback_from_the_config_file(mosquitto, tmp_path, fleet: str) -> None:
    """No advert at all: the node resolves the broker from ``[broker] static_fallback`` in its file."""
    model, shape = tiny_resnet18(tmp_path)
    conf = tmp_path / "node.toml"
    conf.write_text(f'[broker]\nstatic_fallback = ["mqtt://127.0.0.1:1", "{mosquitto.url}"]\n')
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with fleet_ctx(mosquitto.url, fleet, tmp_path) as f:
        f.planner(model, "--bits", "32")
        f.spawn("n0", [*_node_args("n0", fleet, tmp_path), "--config", str(conf)])
        with FleetClient(mosquitto.url, fleet=fleet) as client:
            client.wait_plan(90)
            out = client.infer(x, timeout_s=60)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out, sess.run(None, {sess.get_inputs()[0].name: x})[0], rtol=1e-4, atol=1e-4)
    assert "using static fallback" in (tmp_path / "n0.log").read_text(), f.logs()

