"""A whole fleet on the secure broker: TLS + per-identity passwords + the ACL from `broker gen-creds`.

Planner, node and observer run as real processes configured only through their TOML files (no secret
on any command line); the client logs in as ``c1`` and reads only its own result topic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleetpipe import topics, wire
from fleetpipe.client import FleetClient
from fleetpipe.transport import TLSParameters
from tests.integration.fleet_helpers import fleet as fleet_ctx
from tests.integration.fleet_helpers import tiny_resnet18

from .conftest import FLEET, SecureBroker, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _conf(broker: SecureBroker, tmp: Path, identity: str, section: str | None = None) -> Path:
    path = tmp / f"{identity}.toml"
    head = f"[{section}]\nfleet = \"{FLEET}\"\n\n" if section else ""
    path.write_text(f"{head}[broker]\nurl = \"{broker.url}\"\nusername = \"{identity}\"\n"
                    f"password_file = \"{broker.out / (identity + '.password')}\"\nca_certs = \"{broker.ca}\"\n")
    return path


def test_fleet_runs_on_the_secure_broker(secure_broker: SecureBroker, tmp_path: Path) -> None:
    model, shape = tiny_resnet18(tmp_path)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    with fleet_ctx(secure_broker.url, FLEET, tmp_path) as f:
        f.spawn("planner", ["planner", "--config", str(_conf(secure_broker, tmp_path, "planner", "planner")),
                            "--model", str(model), "--bits", "32", "--no-announce"])
        f.spawn("n1", ["node", "--config", str(_conf(secure_broker, tmp_path, "n1", "node")), "--name", "n1",
                       "--no-announce", "--cache-dir", str(tmp_path / "cache")])
        with FleetClient(secure_broker.url, fleet=FLEET, client_id="c1", username="c1",
                         password=secure_broker.password("c1"), tls=TLSParameters(ca_certs=secure_broker.ca)) as c:
            c.wait_plan(90)
            out = c.infer(x, timeout_s=60)
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(out, sess.run(None, {sess.get_inputs()[0].name: x})[0], rtol=1e-4, atol=1e-4)
        # an observer reads everything with its own read-only identity
        top = subprocess.run([sys.executable, "-m", "fleetpipe", "top", "--config",
                              str(_conf(secure_broker, tmp_path, "obs")), "--fleet", FLEET, "--once",
                              "--interval", "2.5", "--width", "160"], capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert "n1" in top.stdout and "plan epoch 1" in top.stdout, top.stdout
        for name in ("planner", "n1"):
            ps = subprocess.run(["ps", "-o", "args=", "-p", str(f.procs[name].pid)], capture_output=True, text=True)
            assert secure_broker.password(name) not in ps.stdout  # secrets never on a command line
        # the planner's pipeline metrics pass the ACL (its grant on node/planner/metrics)
        assert run(_first_message(secure_broker, topics.node_metrics(FLEET, "planner")), 15) is not None


async def _first_message(broker: SecureBroker, topic: str) -> object:
    async with broker.bus("obs") as bus:
        await bus.subscribe(topic, qos=0)
        async for message in bus.messages():
            return wire.decode(message.payload)
    return None
