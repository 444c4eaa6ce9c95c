"""A whole fleet on the secure broker: TLS + per-identity passwords + the ACL from `broker gen-creds`.

Planner, node and observer run as real processes configured only through their TOML files (no secret
on any command line); the client logs in as ``c1`` and reads only its own result topic.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleetpipe import slices, topics, wire
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
        # so does the node's retained layer profile (node/n1/profile), which the planner reads
        assert isinstance(run(_first_message(secure_broker, topics.node_profile(FLEET, "n1")), 15), wire.NodeProfile)


async def _first_message(broker: SecureBroker, topic: str) -> object:
    async with broker.bus("obs") as bus:
        await bus.subscribe(topic, qos=0)
        async for message in bus.messages():
            return wire.decode(message.payload)
    return None


def test_split_stage_and_profiles_pass_the_acl(secure_broker: SecureBroker, tmp_path: Path) -> None:
    """A split stage's part requests and replies pass the ACL (each node reads only its own part topic)."""
    from fleetpipe.models import zoo
    from tests.integration.fleet_helpers import pinned_profile

    kw = {"resolution": 32, "patch": 4, "dim": 128, "depth": 2, "heads": 4, "num_classes": 10}
    model = tmp_path / "vit.onnx"
    import onnx

    proto = zoo.build("vit", **kw)
    onnx.save(proto, model)
    model_id = slices.content_hash(proto.SerializeToString())[:12]
    x = np.random.default_rng(3).standard_normal(zoo.input_shape("vit", **kw)).astype(np.float32)
    profile = pinned_profile(model, tmp_path / "profile.json", 2.6)  # as in tests/integration/test_split.py
    with fleet_ctx(secure_broker.url, FLEET, tmp_path) as f:
        f.spawn("planner", ["planner", "--config", str(_conf(secure_broker, tmp_path, "planner", "planner")),
                            "--model", str(model), "--bits", "8", "--no-announce", "--expect-nodes", "2",
                            "--intra", "latency", "--msg-ms", "2", "--no-adapt", "--profile", str(profile)])
        for name in ("n1", "n2"):
            f.spawn(name, ["node", "--config", str(_conf(secure_broker, tmp_path, name, "node")), "--name", name,
                           "--no-announce", "--emulate", "100", "--cache-dir", str(tmp_path / "cache" / name)])
        with FleetClient(secure_broker.url, fleet=FLEET, client_id="c1", username="c1",
                         password=secure_broker.password("c1"), tls=TLSParameters(ca_certs=secure_broker.ca)) as c:
            # The broker is shared: the first test's retained plan (another model) may come first.
            deadline = time.monotonic() + 90
            plan = c.wait_plan(90)
            while plan.model_id != model_id and time.monotonic() < deadline:
                time.sleep(0.1)
                plan = c.plan
            assert plan.model_id == model_id and any(len(s.nodes) > 1 for s in plan.stages), plan
            out = c.infer(x, timeout_s=60)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = ref.run(None, {ref.get_inputs()[0].name: x})[0]
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 0.05
    # A denied part request would time out and the lead would run the unit alone: right output, no split.
    logs = "".join(log.read_text(errors="replace") for log in tmp_path.glob("*.log"))
    assert "split stage" in logs and "PartTimeout" not in logs and "PartFailed" not in logs, f.logs()
