"""bridge.conf: a site broker forwards node metrics (only) to a central broker."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fleetpipe import topics
from fleetpipe.deploy import broker_config
from fleetpipe.transport.mqtt import MqttBus
from tests.conftest import mosquitto_binary, start_broker, unused_tcp_port
from tests.deploy.conftest import run

pytestmark = pytest.mark.integration


def test_site_bridge_forwards_metrics_only(tmp_path: Path) -> None:
    central = start_broker(tmp_path)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    bridge = broker_config.render("bridge.conf", site="lab-a", remote=f"127.0.0.1:{central.port}", fleet="+",
                                  remote_username="lab-a", remote_password="unused-on-lab-broker")
    # the site broker: lab.conf + the rendered bridge example
    site = None
    try:
        conf = site_dir / "site.conf"
        conf.write_text(broker_config.render("lab.conf", port="{port}", bind="{bind}") + "\n" + bridge)
        site = _start_from(site_dir, conf)

        async def main() -> list[tuple[str, bytes]]:
            async with MqttBus(central.url, client_id="central-obs") as obs, \
                    MqttBus(site.url, client_id="site-node") as node:
                await obs.subscribe("sites/lab-a/#", qos=1)
                want = "sites/lab-a/" + topics.node_metrics("f1", "n1")
                for _ in range(100):  # the bridge connects asynchronously
                    await node.publish(topics.node_health("f1", "n1"), b"health", qos=1)
                    await node.publish(topics.node_metrics("f1", "n1"), b"metrics", qos=1)
                    try:
                        async with asyncio.timeout(0.1):
                            msg = await anext(obs.messages())
                        return [(msg.topic, bytes(msg.payload))]
                    except TimeoutError:
                        continue
                return [("timeout", want.encode())]

        got = run(main())
        assert got == [("sites/lab-a/" + topics.node_metrics("f1", "n1"), b"metrics")]
    finally:
        if site is not None:
            site.stop()
        central.stop()


class _Proc:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.url = f"mqtt://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _start_from(workdir: Path, conf: Path) -> _Proc:
    port = unused_tcp_port()
    conf.write_text(conf.read_text().replace("{port}", str(port)).replace("{bind}", "127.0.0.1"))
    proc = subprocess.Popen([mosquitto_binary() or "mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, "site mosquitto exited: bad bridge.conf?"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return _Proc(proc, port)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("site mosquitto did not listen")
